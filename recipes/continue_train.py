"""Continue-train a patchattn-patched causal LM with accelerate.

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml \
        recipes/continue_train.py --config recipes/smollm2/<variant>.yaml [--max_steps 50 --output_dir runs/x ...]

Any config field can be overridden on the command line as ``--field value`` (the value is parsed as YAML).

What it does: loads the base model (a shipped real-weights name such as ``smollm2-135m``, a local directory, a Hub
id, an already patched checkpoint via ``patchattn.from_pretrained``, or ``tiny-llama``: a tiny random Llama with a
word-level tokenizer built from the shipped text, for tests), patches it, chooses what trains (``variant``: the
variant's new parameters only; ``lora``: PEFT LoRA + the variant's parameters; ``full``), packs the text into
``seq_len`` chunks, trains with AdamW (linear warmup, cosine decay to ``min_lr_ratio``), adds the MoH load-balance
loss, evaluates held-out perplexity every ``eval_every`` steps, checkpoints with ``accelerator.save_state`` every
``save_every`` steps (model, optimizer, RNG states and the step counter, which *is* the data position: the batch of
step ``s`` is a pure function of ``(seed, s)``), resumes from the last checkpoint, and at the end saves the patched
model (LoRA merged into the base weights, so the result loads with ``patchattn.from_pretrained`` and no peft),
the tokenizer, ``log.jsonl`` and ``loss_curve.png``, and optionally pushes to the Hub with the recipe in the card.
The machinery is shared with recipes/distill.py in ``patchattn.training``.
"""
from __future__ import annotations

import dataclasses
import json

import torch
import yaml

from patchattn import training
from patchattn.fields import param
from patchattn.training import ConfigError as ConfigError  # re-exported: callers catch recipe.ConfigError


@dataclasses.dataclass
class RecipeConfig(training.RunFields, training.StageFields, training.TrainableFields, training.DataFields,
                   training.ModelFields):
    # on the variant's auxiliary loss (Variant.auxiliary_loss); None: the variant's own weights
    aux_loss_weight: float | None = param(None, types=(int, float), low=0, nullable=True)
    output_dir: str = param("runs/continue_train", types=(str,))


def load_config(path: str | None, overrides: dict | None = None) -> RecipeConfig:
    return training.load_config(RecipeConfig, path, overrides)


def parse_args(argv: list[str] | None = None) -> RecipeConfig:
    return training.parse_args(RecipeConfig, __doc__.split("\n\n")[0], argv)


def main(config: RecipeConfig) -> dict:
    """Run the recipe; returns ``{"model", "tokenizer", "records", "output_dir", "eval_ppl_start", "eval_ppl_end"}``
    (``model``: the unwrapped, LoRA-merged final model)."""
    import patchattn
    from patchattn.variants import get_variant

    variant = get_variant(config.variant)

    training.preflight(config)  # before Run creates output_dir and before any weights load
    run = training.Run(config)
    acc = run.accelerator
    model, tokenizer, train_chunks, eval_chunks = training.load_patched_model(config, config.batch_size)
    if config.gradient_checkpointing:
        training.set_gradient_checkpointing(model, True)
    model = training.set_trainable(model, config, variant=config.variant)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    training.describe(run, model, config, config.trainable, len(train_chunks))
    model, optimizer = acc.prepare(model, optimizer)
    if run.resume_from is not None:
        run.load_checkpoint(run.resume_from)

    if run.state.step == 0:  # saved with every checkpoint, so a resumed run still reports it
        run.state.metrics["eval_ppl_start"] = training.evaluate(model, eval_chunks, acc, config.batch_size)
        run.print(f"step 0: held-out ppl {run.state.metrics['eval_ppl_start']:.3f}")
    eval_ppl_start = run.state.metrics.get("eval_ppl_start")

    def next_token_loss(model, x):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        aux = variant.auxiliary_loss(acc.unwrap_model(model), weighted=config.aux_loss_weight is None)
        if aux is None:  # the variant has no auxiliary loss: logged as 0
            aux = torch.zeros((), device=loss.device)
        if config.aux_loss_weight is not None:
            aux = aux * config.aux_loss_weight
        return loss + aux.to(loss.dtype), {"loss": loss, "aux_loss": aux}

    eval_ppl = training.train_steps(run, model, optimizer, config, train_chunks, eval_chunks, next_token_loss,
                                    seed=config.seed, name="train", checkpoints=run.output_dir / "checkpoints")

    final_dir = run.output_dir / "final"
    final = training.save_model(run, model, tokenizer, final_dir, merge_lora=config.trainable == "lora")
    final = training.finish(final, config.gradient_checkpointing)
    if run.is_main:
        training.plot_losses(run.records, run.output_dir / "loss_curve.png",
                             f"{config.model} + {config.variant} ({config.trainable}), {acc.num_processes} proc")
        summary = {"eval_ppl_start": eval_ppl_start, "eval_ppl_end": eval_ppl, "steps": run.state.step,
                   "final_loss": run.records[-1]["loss"] if run.records else None}
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.push_to_hub:
            eval_rows = [{"metric": "held-out perplexity", "before": eval_ppl_start, "after": eval_ppl}]
            patchattn.push_to_hub(final, config.push_to_hub, tokenizer=tokenizer, eval_results=eval_rows,
                                  recipe_config=yaml.safe_dump(config.to_dict(), sort_keys=False))
    acc.wait_for_everyone()
    run.print(f"done: {run.state.step} steps; held-out ppl {eval_ppl_start} -> {eval_ppl}; saved to {final_dir}")
    acc.end_training()
    return {"model": final, "tokenizer": tokenizer, "records": run.records, "output_dir": run.output_dir,
            "eval_ppl_start": eval_ppl_start, "eval_ppl_end": eval_ppl}


if __name__ == "__main__":
    training.run_main("continue_train", parse_args, main)

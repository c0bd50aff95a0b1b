"""Distil a pretrained softmax-attention LM into a patched one (e.g. linear attention), in two stages, with accelerate.

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \
        recipes/distill.py --config recipes/smollm2/<variant>.yaml [--stage1.max_steps 100 --output_dir runs/x ...]

Any config field can be overridden as ``--field value`` (parsed as YAML); stage fields as ``--stage2.lr 1e-4``.

Stage 1, attention transfer (LoLCATs' first stage): the whole model is frozen and only the variant's new parameters
train. Inside ``patchattn.distill.attention_transfer`` every patched layer computes its own output and the softmax
output from the same q/k/v, records the MSE between them and passes the *softmax* output on, so every layer learns
on the original model's activations (the teacher is the same frozen weights, computed in the same forward). The
loss is the sum of the per-layer MSEs.

Stage 2, end to end: ``trainable: lora`` (PEFT LoRA on ``lora_targets`` plus the variant's parameters; LoLCATs'
second stage) or ``variant``, with ``loss: lm`` (next-token cross-entropy) or ``loss: kl`` (KL from the original
model's next-token distribution to the student's, at ``temperature``). The KL teacher needs no second model copy:
LoRA never changes the base weights while it trains (the adapters are separate until the final merge), so
``patchattn.training.original_model`` -- adapters disabled, patched layers switched to exact softmax attention --
*is* the original model, run on the same weights just before the student's forward. ``trainable: full`` would
change the base weights, so it is refused with ``loss: kl`` (it would need a frozen copy of the model).

Resume: checkpoints go to ``output_dir/checkpoints/stage{1,2}/step_N``; the end of stage 1 is always checkpointed,
so a run killed anywhere resumes from the last complete checkpoint and reproduces the uninterrupted loss curve
(``(stage, step)`` is the data position and LoRA is initialised from a fixed seed).

Outputs: ``log.jsonl``, one line per step (``stage``, ``step``, ``loss``, ``lr``; at evaluation steps the held-out
perplexity ``eval_ppl`` and the stage's loss on the held-out chunks ``eval_loss``; stage 2 with KL also logs the
student's next-token ``nll``), plus ``step 0`` lines: stage 1's with the teacher's and the converted student's
held-out perplexity and attention-transfer loss, stage 2's with the stage-1 student's stage-2 loss;
``loss_curve.png`` (one panel per stage), ``summary.json``, ``stage1/`` (the student after stage 1) and ``final/``
(LoRA merged), both loadable with ``patchattn.from_pretrained``; ``push_to_hub`` uploads ``final/`` with a card
recording both stages (evaluation table and the recipe). Shared machinery: ``patchattn.training``.
"""
from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn.functional as F
import yaml

from patchattn import training
from patchattn.fields import nested, param
from patchattn.training import ConfigError, field_error


@dataclasses.dataclass
class Stage1Config(training.StageFields):
    lr: float = param(1e-2, low=0, low_open=True)  # LoLCATs' stage-1 learning rate


@dataclasses.dataclass
class Stage2Config(training.StageFields, training.TrainableFields):
    trainable: str = param("lora", choices=("variant", "lora", "full"))
    lora_r: int = param(8, low=1)
    lora_alpha: int = param(16, low=1)
    loss: str = param("kl", choices=("kl", "lm"))
    temperature: float = param(1.0, low=0, low_open=True)  # KL only
    lr: float = param(1e-4, low=0, low_open=True)

    def check(self, prefix):
        super().check(prefix)
        if self.loss == "kl" and self.trainable == "full":
            raise field_error(prefix + "trainable", "must be 'lora' or 'variant' with loss: kl (the teacher is the "
                              "frozen base weights with the patch switched off; training them all would need a "
                              "second, frozen copy of the model)", self.trainable)


@dataclasses.dataclass
class DistillConfig(training.RunFields, training.DataFields, training.ModelFields):
    seq_len: int = param(1024, low=2)
    output_dir: str = param("runs/distill", types=(str,))
    stage1: Stage1Config = nested(Stage1Config)
    stage2: Stage2Config = nested(Stage2Config)

    def check(self, prefix):
        super().check(prefix)
        from patchattn.variants import VARIANTS

        if not VARIANTS[self.variant].trainable:
            raise field_error(prefix + "variant", "must be a trainable variant (stage 1 trains its parameters); "
                              f"trainable variants: {sorted(n for n, c in VARIANTS.items() if c.trainable)}",
                              self.variant)


def load_config(path: str | None, overrides: dict | None = None) -> DistillConfig:
    return training.load_config(DistillConfig, path, overrides)


def parse_args(argv: list[str] | None = None) -> DistillConfig:
    return training.parse_args(DistillConfig, __doc__.split("\n\n")[0], argv)


STAGE1_TITLE = "stage 1: attention transfer (sum of per-layer output MSEs)"


def stage2_title(stage: Stage2Config) -> str:
    trains = "LoRA + variant" if stage.trainable == "lora" else stage.trainable
    return f"stage 2: {trains}, " + (f"KL to the teacher (T={stage.temperature:g})" if stage.loss == "kl"
                                     else "next-token loss")


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions at ``temperature``, times
    ``temperature²`` (so the gradient scale does not depend on it)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def attention_transfer_stage(run: training.Run, config: DistillConfig, model, tokenizer, train_chunks, eval_chunks):
    """Stage 1 (see the module docstring); returns the unwrapped model, its variant parameters trained."""
    from patchattn.distill import attention_transfer, attention_transfer_loss

    stage, acc = config.stage1, run.accelerator
    params = training.variant_parameters(model)
    if not params:
        raise field_error("variant", f"adds no parameters with variant_params {config.variant_params}, so stage 1 "
                          "has nothing to train", config.variant)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if stage.gradient_checkpointing:
        training.set_gradient_checkpointing(model, True)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    training.describe(run, model, config, "variant only, attention transfer", len(train_chunks))
    model, optimizer = acc.prepare(model, optimizer)
    student = acc.unwrap_model(model)
    run.state.stage, run.state.step = 1, 0
    if run.resume_from is not None:
        run.load_checkpoint(run.resume_from)

    def transfer_loss(model, x):
        model(input_ids=x, use_cache=False, logits_to_keep=1)  # the loss is recorded by the patched layers
        loss = attention_transfer_loss(student)
        return loss, {"loss": loss}

    def transfer_mode():
        return attention_transfer(student)

    if run.state.step == 0:
        with training.original_model(student):
            teacher_ppl = training.evaluate(model, eval_chunks, acc, stage.batch_size)
        student_ppl = training.evaluate(model, eval_chunks, acc, stage.batch_size)
        mse = training.held_out_loss(model, eval_chunks, acc, stage.batch_size, transfer_loss, transfer_mode)
        run.print(f"held-out ppl: teacher {teacher_ppl:.3f}, converted student before training {student_ppl:.3f} "
                  f"(attention-transfer loss {mse:.4g})")
        run.log({"stage": 1, "step": 0, "teacher_ppl": teacher_ppl, "eval_ppl": student_ppl, "eval_loss": mse})

    checkpoints = run.output_dir / "checkpoints" / "stage1"
    training.train_steps(run, model, optimizer, stage, train_chunks, eval_chunks, transfer_loss, seed=config.seed,
                         name="stage1", checkpoints=checkpoints, record_fields={"stage": 1},
                         forward_context=transfer_mode, eval_loss=True)
    end = checkpoints / f"step_{stage.max_steps}"
    if not (end / "done").exists():  # stage 2 starts (and resumes) from here
        run.save_checkpoint(end)
    training.save_model(run, model, tokenizer, run.output_dir / "stage1")
    if stage.gradient_checkpointing:
        training.set_gradient_checkpointing(student, False)
    return student


def end_to_end_stage(run: training.Run, config: DistillConfig, model, tokenizer, train_chunks, eval_chunks):
    """Stage 2 (see the module docstring); returns the prepared model."""
    stage, acc = config.stage2, run.accelerator
    if stage.gradient_checkpointing:
        training.set_gradient_checkpointing(model, True)
    model = training.set_trainable(model, stage, variant=config.variant, prefix="stage2.")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=stage.lr,
                                  weight_decay=stage.weight_decay)
    training.describe(run, model, config, f"{stage.trainable}, {stage.loss}", len(train_chunks))
    model, optimizer = acc.prepare(model, optimizer)
    student = acc.unwrap_model(model)
    run.state.stage, run.state.step = 2, 0
    if run.resume_from is not None and training.checkpoint_position(run.resume_from)[0] == 2:
        run.load_checkpoint(run.resume_from)

    def kl_loss(model, x):
        with torch.no_grad(), training.original_model(student):
            teacher_logits = student(input_ids=x, use_cache=False).logits
        logits = model(input_ids=x, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        kl = kl_to_teacher(logits, teacher_logits, stage.temperature)
        return kl, {"loss": kl, "nll": nll}

    def lm_loss(model, x):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        return loss, {"loss": loss}

    loss_fn = kl_loss if stage.loss == "kl" else lm_loss
    if run.state.step == 0:  # the stage-2 loss of the stage-1 student
        run.log({"stage": 2, "step": 0,
                 "eval_loss": training.held_out_loss(model, eval_chunks, acc, stage.batch_size, loss_fn)})
    training.train_steps(run, model, optimizer, stage, train_chunks, eval_chunks, loss_fn, seed=config.seed + 1,
                         name="stage2", checkpoints=run.output_dir / "checkpoints" / "stage2",
                         record_fields={"stage": 2}, eval_loss=True)
    return model


def summarize(records: list[dict], config: DistillConfig) -> dict:
    """Held-out perplexity and held-out loss at the start and end of each stage, and the last training loss, from
    the log (so a resumed run reports the whole run)."""
    def stage(n, what):
        rows = [r for r in records if r.get("stage") == n]
        evals = [r for r in rows if r.get("eval_loss") is not None]
        trained = [r for r in rows if r["step"] > 0]
        return {"what": what, "steps": trained[-1]["step"] if trained else 0,
                "final_train_loss": trained[-1]["loss"] if trained else None,
                "eval_loss_start": evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None,
                "eval_loss_end": evals[-1]["eval_loss"] if evals and evals[-1]["step"] > 0 else None,
                "eval_ppl_end": next((r["eval_ppl"] for r in reversed(trained) if r.get("eval_ppl") is not None),
                                     None)}

    start = next((r for r in records if r.get("stage") == 1 and r["step"] == 0), {})
    return {"teacher_ppl": start.get("teacher_ppl"), "student_ppl_start": start.get("eval_ppl"),
            "stage1": stage(1, STAGE1_TITLE), "stage2": stage(2, stage2_title(config.stage2))}


def card_rows(summary: dict, config: DistillConfig) -> list[dict]:
    """The model card's evaluation table: teacher, converted student, after each stage (held-out text)."""
    s1, s2 = summary["stage1"], summary["stage2"]
    mse, loss2 = "attention-transfer MSE", "KL to teacher" if config.stage2.loss == "kl" else "next-token NLL"
    return [
        {"model": "teacher (original softmax attention)", "held-out ppl": summary["teacher_ppl"]},
        {"model": "converted, before training", "held-out ppl": summary["student_ppl_start"],
         mse: s1["eval_loss_start"]},
        {"model": f"after {s1['what']}, {s1['steps']} steps", "held-out ppl": s1["eval_ppl_end"],
         mse: s1["eval_loss_end"], loss2: s2["eval_loss_start"]},
        {"model": f"after {s2['what']}, {s2['steps']} steps", "held-out ppl": s2["eval_ppl_end"],
         loss2: s2["eval_loss_end"]},
    ]


def main(config: DistillConfig) -> dict:
    """Run both stages; returns ``{"model", "tokenizer", "records", "output_dir", "summary"}`` (``model``: the
    unwrapped, LoRA-merged final model)."""
    from accelerate.utils import set_seed

    import patchattn

    training.preflight(config)  # before Run creates output_dir and before any weights load
    resume_from = training.resume_checkpoint(config)
    if resume_from is not None and training.checkpoint_position(resume_from)[0] == 0:
        raise ConfigError(f"config field 'resume': {resume_from} is not a checkpoint of this recipe "
                          "(checkpoints/stage1/step_N or checkpoints/stage2/step_N)")
    run = training.Run(config)
    acc = run.accelerator
    model, tokenizer, train_chunks, eval_chunks = training.load_patched_model(config, config.stage1.batch_size)
    resume_stage = training.checkpoint_position(run.resume_from)[0] if run.resume_from is not None else 0
    if resume_stage < 2:
        model = attention_transfer_stage(run, config, model, tokenizer, train_chunks, eval_chunks)
        acc.free_memory()  # drop stage 1's wrapper and optimizer from the accelerator's checkpointed objects
    set_seed(config.seed + 2)  # LoRA's initialisation, the same whether or not stage 1 ran in this process
    model = end_to_end_stage(run, config, model, tokenizer, train_chunks, eval_chunks)

    final_dir = run.output_dir / "final"
    stage2 = config.stage2
    final = training.save_model(run, model, tokenizer, final_dir, merge_lora=stage2.trainable == "lora")
    final = training.finish(final, stage2.gradient_checkpointing)
    summary = summarize(run.records, config)
    if run.is_main:
        training.plot_losses(run.records, run.output_dir / "loss_curve.png",
                             f"{config.model}: softmax -> {config.variant}, {acc.num_processes} proc",
                             {1: STAGE1_TITLE, 2: stage2_title(stage2)})
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.push_to_hub:
            recipe = (f"# recipes/distill.py -- {summary['stage1']['what']}, then {summary['stage2']['what']}\n"
                      + yaml.safe_dump(config.to_dict(), sort_keys=False))
            patchattn.push_to_hub(final, config.push_to_hub, tokenizer=tokenizer,
                                  eval_results=card_rows(summary, config), recipe_config=recipe)
    acc.wait_for_everyone()
    run.print(f"done: held-out ppl teacher {summary['teacher_ppl']}, student {summary['student_ppl_start']} -> "
              f"{summary['stage1']['eval_ppl_end']} (stage 1) -> {summary['stage2']['eval_ppl_end']} (stage 2); "
              f"saved to {final_dir}")
    acc.end_training()
    return {"model": final, "tokenizer": tokenizer, "records": run.records, "output_dir": run.output_dir,
            "summary": summary}


if __name__ == "__main__":
    training.run_main("distill", parse_args, main)

"""One optimisation stage with any loss (next-token, attention transfer, KL to a teacher), and held-out evaluation.

Determinism: the batch of optimizer step ``s`` is a pure function of ``(seed, s)`` and the learning rate of ``s``
alone, so the ``(stage, step)`` saved with a checkpoint *is* the data position, and a resumed run reproduces the
uninterrupted loss curve."""
from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .config import StageFields
from .run import Run

KILL_ENV = "PATCHATTN_RECIPE_KILL_AT_STEP"  # tests: "[name:]N" SIGKILLs the process after step N (of stage `name`)


def batch_indices(step: int, micro: int, rank: int, world: int, stage: StageFields, seed: int, n: int) -> torch.Tensor:
    """Chunk indices of (optimizer step ``step`` (0-based), micro-batch, rank): a fixed permutation per epoch."""
    per_step = stage.batch_size * world * stage.grad_accum
    start = step * per_step + (micro * world + rank) * stage.batch_size
    out = []
    for g in range(start, start + stage.batch_size):
        epoch, pos = divmod(g, n)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=gen)[pos]))
    return torch.tensor(out)


def lr_at(step: int, stage: StageFields) -> float:
    """LR of optimizer step ``step`` (1-based): linear warmup, then cosine to ``min_lr_ratio * lr``."""
    if stage.warmup_steps and step <= stage.warmup_steps:
        return stage.lr * step / stage.warmup_steps
    span = max(stage.max_steps - stage.warmup_steps, 1)
    progress = min(max(step - stage.warmup_steps, 0) / span, 1.0)
    ratio = stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return stage.lr * ratio


@torch.no_grad()
def evaluate(model, eval_chunks: torch.Tensor, accelerator, batch_size: int) -> float:
    """Held-out perplexity ``exp(mean NLL)`` over non-overlapping ``seq_len`` windows, sharded over processes (every
    process runs the wrapped model, so this also works under FSDP)."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = eval_chunks[rank::world]
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    steps = math.ceil(math.ceil(len(eval_chunks) / world) / batch_size)  # same number of forwards on every rank
    for s in range(steps):
        x = mine[s * batch_size:(s + 1) * batch_size]
        if len(x) == 0:
            x, weight = eval_chunks[:1], 0.0  # keep collective ops in step (FSDP)
        else:
            weight = 1.0
        x = x.to(accelerator.device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += weight * loss.double()
        count += weight * x[:, 1:].numel()
    model.train()
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    return math.exp((nll / count).item())


@torch.no_grad()
def held_out_loss(model, eval_chunks: torch.Tensor, accelerator, batch_size: int, loss_fn: LossFn,
                  forward_context: Callable = nullcontext) -> float:
    """Mean of a training loss over the held-out chunks, sharded like :func:`evaluate`: the distillation losses
    (attention-transfer MSE, KL to the teacher) on a fixed set, free of the batch-to-batch noise of the train loss."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = eval_chunks[rank::world]
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    rows = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for s in range(math.ceil(math.ceil(len(eval_chunks) / world) / batch_size)):
        x = mine[s * batch_size:(s + 1) * batch_size]
        x, weight = (x, 1.0) if len(x) else (eval_chunks[:1], 0.0)
        with forward_context():
            loss, _ = loss_fn(model, x.to(accelerator.device))
        total += weight * loss.double() * len(x)
        rows += weight * len(x)
    model.train()
    total, rows = accelerator.reduce(total, "sum"), accelerator.reduce(rows, "sum")
    return (total / rows).item()


def _kill_step(name: str) -> int:
    tag, _, step = os.environ.get(KILL_ENV, "").rpartition(":")
    return int(step) if step and tag in ("", name) else 0


LossFn = Callable[[Any, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def train_steps(run: Run, model, optimizer, stage: StageFields, train_chunks: torch.Tensor, eval_chunks: torch.Tensor,
                loss_fn: LossFn, *, seed: int, name: str, checkpoints: Path, record_fields: dict | None = None,
                forward_context: Callable = nullcontext, eval_loss: bool = False) -> float | None:
    """Train from ``run.state.step`` to ``stage.max_steps``; returns the held-out perplexity of the last step.

    ``loss_fn(model, x)`` returns ``(loss to backpropagate, {metric: tensor})``; the metrics are averaged over
    micro-batches and processes into the log record ``{**record_fields, step, *metrics, lr, eval_ppl}``
    (``eval_loss`` adds the loss on the held-out chunks at evaluation steps, see :func:`held_out_loss`). Each
    micro-batch's forward *and* backward run inside ``forward_context()`` (activation checkpointing recomputes the
    forward during backward, so a mode such as attention transfer must still be on then)."""
    acc = run.accelerator
    from tqdm.auto import tqdm

    rank, world = acc.process_index, acc.num_processes
    kill_at = _kill_step(name)
    bar = tqdm(total=stage.max_steps, initial=run.state.step, desc=name, disable=not acc.is_local_main_process)
    eval_ppl = None
    while run.state.step < stage.max_steps:
        step = run.state.step + 1
        lr = lr_at(step, stage)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals: dict[str, torch.Tensor] = {}
        for micro in range(stage.grad_accum):
            x = train_chunks[batch_indices(run.state.step, micro, rank, world, stage, seed, len(train_chunks))]
            x = x.to(acc.device)
            sync = micro == stage.grad_accum - 1
            with (nullcontext() if sync else acc.no_sync(model)), forward_context():
                loss, metrics = loss_fn(model, x)
                acc.backward(loss / stage.grad_accum)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value.detach().float() / stage.grad_accum
        if stage.max_grad_norm:  # the prepared model's parameters (FSDP replaces them)
            acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], stage.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.state.step = step
        means = {key: acc.reduce(value, "mean").item() for key, value in totals.items()}
        evals: dict = {"eval_ppl": None}
        if (stage.eval_every and step % stage.eval_every == 0) or step == stage.max_steps:
            evals["eval_ppl"] = evaluate(model, eval_chunks, acc, stage.batch_size)
            if eval_loss:
                evals["eval_loss"] = held_out_loss(model, eval_chunks, acc, stage.batch_size, loss_fn, forward_context)
        eval_ppl = evals["eval_ppl"]
        run.log({**(record_fields or {}), "step": step, **means, "lr": lr, **evals})
        bar.update(1)
        bar.set_postfix(**{k: f"{v:.4g}" for k, v in means.items()},
                        **{k: f"{v:.4g}" for k, v in evals.items() if v is not None})
        if run.config.log_every and (step % run.config.log_every == 0 or eval_ppl is not None):
            text = " ".join(f"{k} {v:.5g}" for k, v in {**means, **evals}.items() if v is not None)
            run.print(f"{name} step {step}/{stage.max_steps}: {text} lr {lr:.3g}")
        if stage.save_every and step % stage.save_every == 0 and step < stage.max_steps:
            run.save_checkpoint(checkpoints / f"step_{step}")
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return eval_ppl


def describe(run: Run, model, config, trainable: str, n_chunks: int) -> None:
    """One line: what is patched, what trains, how much data, how many processes."""
    import patchattn

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    layers = patchattn.patched_layers(run.accelerator.unwrap_model(model))  # PEFT forwards .config to the base
    run.print(f"model {config.model} + {config.variant} on layers {layers}; trainable {n_trainable:,} / {n_total:,} "
              f"parameters ({trainable}); {n_chunks} train chunks x {config.seq_len} tokens; "
              f"{run.accelerator.num_processes} process(es)")

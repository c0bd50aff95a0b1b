"""One recipe run: the accelerator, ``output_dir``, ``log.jsonl``, the checkpoints (and where to resume) and the
saved model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from .config import RunFields


class TrainState:
    """Saved with every checkpoint (accelerator.register_for_checkpointing): ``(stage, step)`` is the data
    position (``stage`` 0 for single-stage recipes); ``metrics`` holds what a resumed run cannot recompute, such as
    the held-out perplexity before training."""

    def __init__(self):
        self.stage, self.step = 0, 0
        self.metrics: dict[str, float] = {}

    def state_dict(self):
        return {"stage": self.stage, "step": self.step, "metrics": dict(self.metrics)}

    def load_state_dict(self, state):
        self.stage, self.step = int(state.get("stage", 0)), int(state["step"])
        self.metrics = dict(state.get("metrics", {}))  # checkpoints written before metrics existed have none


def checkpoint_position(path: Path) -> tuple[int, int]:
    """``(stage, step)`` of ``checkpoints/step_N`` (stage 0) or ``checkpoints/stage<k>/step_N``."""
    stage = int(path.parent.name[5:]) if path.parent.name.startswith("stage") else 0
    return stage, int(path.name.split("_")[1])


def last_checkpoint(output_dir: Path) -> Path | None:
    """The latest complete checkpoint (``done`` marker written after ``save_state`` returned) in ``output_dir``."""
    root = Path(output_dir) / "checkpoints"
    done = [p for p in [*root.glob("step_*"), *root.glob("stage*/step_*")] if (p / "done").exists()]
    return max(done, key=checkpoint_position, default=None)


def resume_checkpoint(config: RunFields) -> Path | None:
    """The checkpoint ``config.resume`` points at: the last complete one in ``output_dir`` (``true``), the given
    path, or None."""
    if not config.resume:
        return None
    return last_checkpoint(Path(config.output_dir)) if config.resume is True else Path(config.resume)


def _position(record: dict) -> tuple[int, int]:
    return record.get("stage", 0), record["step"]


class Run:
    """One recipe run: the accelerator, ``output_dir`` (``recipe.yaml``, ``log.jsonl``, checkpoints) and where to
    resume. The log is truncated to the resume checkpoint's position at start, so a resumed run continues it
    exactly where the checkpoint was taken."""

    def __init__(self, config: RunFields):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        # Without an accelerator, processes started by `accelerate launch --multi_gpu` / torchrun form a gloo CPU
        # group only when accelerate is told cpu=True (`accelerate launch --cpu` starts one process unless mpirun
        # runs it).
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
        set_seed(config.seed)
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self.log_path = self.output_dir / "log.jsonl"
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "recipe.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(config.to_dict(), f, sort_keys=False)

        self.resume_from = resume_checkpoint(config)
        if config.resume and self.resume_from is None:
            self.print(f"resume: no checkpoint in {self.output_dir / 'checkpoints'}; starting from the beginning")
        self.records: list[dict] = []
        if self.resume_from is not None and self.log_path.exists():
            position = checkpoint_position(self.resume_from)
            with open(self.log_path, encoding="utf-8") as f:
                self.records = [r for r in map(json.loads, filter(str.strip, f)) if _position(r) <= position]
        if self.is_main:
            with open(self.log_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def load_checkpoint(self, path: Path) -> None:
        """Restore model(s), optimizer(s), RNG states and ``(stage, step)`` from ``path``."""
        self.accelerator.load_state(str(path))
        self.print(f"resumed from {path} at {f'stage {self.state.stage} ' if self.state.stage else ''}"
                   f"step {self.state.step}")

    def save_checkpoint(self, path: Path) -> None:
        self.accelerator.save_state(str(path))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            (path / "done").touch()  # a kill during save_state leaves no "done": resume skips it

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.is_main:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def save_model(run: Run, model, tokenizer, directory: Path, *, merge_lora: bool = False):
    """``save_pretrained`` of the unwrapped patched model + tokenizer (a directory ``patchattn.from_pretrained``
    loads); returns the unwrapped model. ``merge_lora`` merges PEFT LoRA into the base weights first (the result
    needs no peft); otherwise the model is left as it was, so training can go on."""
    acc = run.accelerator
    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(model)  # gathers FSDP shards; on the main process only, under FSDP
    unwrapped = acc.unwrap_model(model)
    if merge_lora:
        unwrapped, state_dict = unwrapped.merge_and_unload(), None
    if run.is_main:
        if directory.exists():
            shutil.rmtree(directory)
        use_cache, unwrapped.config.use_cache = unwrapped.config.use_cache, True  # saved for inference
        unwrapped.save_pretrained(directory, state_dict=state_dict)
        unwrapped.config.use_cache = use_cache
        tokenizer.save_pretrained(directory)
    acc.wait_for_everyone()
    return unwrapped

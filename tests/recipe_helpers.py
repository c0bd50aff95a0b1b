"""Shared by the tests of the training recipes (test_recipe.py: recipes/continue_train.py, test_distill_recipe.py:
recipes/distill.py): read a recipe's log, run it in a subprocess, plain or under `accelerate launch` with two CPU
processes (script_helpers.load_script imports one)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from patchattn import training

ROOT = Path(__file__).resolve().parents[1]


def read_log(output_dir: Path) -> list[dict]:
    """The run's ``log.jsonl`` records."""
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def recipe_env(**extra: str) -> dict[str, str]:
    """The environment of a recipe subprocess: the repository importable, no tokenizer threads, ``extra`` on top;
    the kill switch (``training.KILL_ENV``) is set only where ``extra`` sets it, never inherited."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", **extra}
    if training.KILL_ENV not in extra:
        env.pop(training.KILL_ENV, None)
    return env


def accelerate_launch(script: Path, *args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 script *args`` on CPU. `accelerate launch --cpu
    --num_processes 2` starts ONE process (accelerate's simple launcher; several CPU processes need mpirun);
    `--multi_gpu` uses the torchrun launcher and, without CUDA, the recipes ask accelerate for cpu=True, so the two
    processes form a gloo group (MULTI_CPU)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), *args]
    env = {**env, "CUDA_VISIBLE_DEVICES": ""}  # two CPU processes (gloo) on a CUDA machine too: one GPU cannot
    # host a 2-process --multi_gpu run, and these tests are about the CPU/gloo path
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ran_on_two_processes(proc: subprocess.CompletedProcess) -> None:
    """The launched run succeeded, and as two processes."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 process(es)" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-5000:]

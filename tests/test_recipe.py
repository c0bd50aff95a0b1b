"""The continue-training recipe (recipes/continue_train.py) on a tiny random Llama, on CPU.

1. in-process run: the loss falls and the saved model reloads (patchattn.from_pretrained) with identical logits;
2. a real 2-process `accelerate launch --multi_gpu` run on CPU (gloo) completes and its loss falls;
3. a run SIGKILLed after a checkpoint, resumed from it, reproduces the uninterrupted loss curve;
4. bad configs fail with an error naming the field.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patchattn
from patchattn import training

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "continue_train.py"
TINY = ROOT / "recipes" / "tiny" / "gated.yaml"
STEPS = 15


def _recipe():
    spec = importlib.util.spec_from_file_location("continue_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["continue_train"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


def _log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def _falls(losses: list[float]) -> bool:
    return sum(losses[:5]) / 5 > sum(losses[-5:]) / 5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    config = recipe.load_config(str(TINY), {"output_dir": str(out), "max_steps": STEPS})
    return recipe.main(config)


def test_single_process_loss_falls_and_saved_model_reloads(uninterrupted):
    out = uninterrupted["output_dir"]
    records = _log(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert _falls([r["loss"] for r in records])
    assert records[-1]["eval_ppl"] < uninterrupted["eval_ppl_start"]
    assert (out / "loss_curve.png").stat().st_size > 0
    reloaded = patchattn.from_pretrained(str(out / "final")).eval()
    assert reloaded.config.patchattn["variant"] == "gated"
    model = uninterrupted["model"].eval()
    ids = uninterrupted["tokenizer"]("To be, or not to be, that is the question", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    # the trained gate is not the identity any more, and it is what got saved
    gates = [p for n, p in reloaded.named_parameters() if "patchattn_layer.gate" in n]
    assert gates and any(g.abs().sum() > 0 for g in gates)


def _env():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PATCHATTN_RECIPE_KILL_AT_STEP", None)
    return env


@pytest.mark.slow
def test_accelerate_launch_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple launcher; several CPU
    # processes need mpirun). `--multi_gpu` uses the torchrun launcher; without CUDA the recipe asks accelerate for
    # cpu=True, so the two processes form a gloo group (MULTI_CPU).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), "--config", str(TINY),
           "--output_dir", str(out), "--max_steps", "10", "--eval_every", "0", "--save_every", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    records = _log(out)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert _falls([r["loss"] for r in records])
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "checkpoints" / "step_5" / "done").exists()


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_loss_curve(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--output_dir", str(out), "--max_steps", str(STEPS),
           "--save_every", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), "PATCHATTN_RECIPE_KILL_AT_STEP": "8"}, capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILLed after step 8
    assert [r["step"] for r in _log(out)] == list(range(1, 9))
    assert not (out / "final").exists()
    assert training.last_checkpoint(out).name == "step_5"

    resumed = recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out), "max_steps": STEPS,
                                                         "save_every": 5, "resume": True}))
    assert resumed["eval_ppl_start"] is None  # it did not start over
    got = {r["step"]: r["loss"] for r in _log(out)}
    want = {r["step"]: r["loss"] for r in _log(uninterrupted["output_dir"])}
    assert sorted(got) == list(range(1, STEPS + 1))  # steps 6..8 of the killed run were replaced, not duplicated
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


@pytest.mark.parametrize("override, field", [
    ({"lr": -1.0}, "lr"),
    ({"trainable": "everything"}, "trainable"),
    ({"batch_size": "four"}, "batch_size"),
    ({"variant": "nope"}, "variant"),
    ({"variant_params": {"granularity": "diagonal"}}, "variant_params"),
    ({"learning_rate": 1e-3}, "learning_rate"),
])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(recipe.ConfigError, match=field):
        recipe.load_config(str(TINY), override)


def test_bad_config_on_the_command_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text() + "seq_length: 128\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(bad)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "seq_length" in proc.stderr and "unknown config field" in proc.stderr


def test_lora_moh_with_accumulation_and_checkpointing(tmp_path):
    """trainable: lora (merged into the saved weights), MoH with routed heads (the load-balance loss is logged and
    trained on), gradient accumulation and gradient checkpointing."""
    out = tmp_path / "lora-moh"
    result = recipe.main(recipe.load_config(str(TINY), {
        "output_dir": str(out), "max_steps": 3, "eval_every": 0, "variant": "moh",
        "variant_params": {"active_heads": 0.75}, "trainable": "lora", "lora_r": 4, "lora_alpha": 8,
        "grad_accum": 2, "gradient_checkpointing": True}))
    records = _log(out)
    assert len(records) == 3 and all(r["aux_loss"] > 0 for r in records)
    model = result["model"].eval()
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged
    reloaded = patchattn.from_pretrained(str(out / "final")).eval()
    assert reloaded.config.patchattn["variant"] == "moh"
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_are_valid(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    if path.parent.name == "accelerate_configs":
        assert raw["distributed_type"]
    elif "stage1" in raw:
        pytest.skip("a recipes/distill.py config (tests/test_distill_recipe.py validates it)")
    else:
        recipe.load_config(str(path))

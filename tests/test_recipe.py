"""The continue-training recipe (recipes/continue_train.py) on a tiny random Llama, on CPU.

1. in-process run: the loss falls and the saved model reloads (patchattn.from_pretrained) with identical logits;
2. a real 2-process `accelerate launch --multi_gpu` run on CPU (gloo) completes and its loss falls;
3. a run SIGKILLed after a checkpoint, resumed from it, reproduces the uninterrupted loss curve;
4. bad configs fail with an error naming the field, before anything is written or loaded (exit code 2 on the
   command line);
5. resume restores the perplexity before training, and refuses a finished run.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from recipe_helpers import ROOT, accelerate_launch, assert_ran_on_two_processes, read_log, recipe_env
from script_helpers import load_script

import patchattn
from patchattn import training

SCRIPT = ROOT / "recipes" / "continue_train.py"
TINY = ROOT / "recipes" / "tiny" / "gated.yaml"
STEPS = 15

recipe = load_script(SCRIPT, "continue_train")


def _falls(losses: list[float]) -> bool:
    return sum(losses[:5]) / 5 > sum(losses[-5:]) / 5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    config = recipe.load_config(str(TINY), {"output_dir": str(out), "max_steps": STEPS})
    return recipe.main(config)


def test_single_process_loss_falls_and_saved_model_reloads(uninterrupted):
    out = uninterrupted["output_dir"]
    records = read_log(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert _falls([r["loss"] for r in records])
    assert records[-1]["eval_ppl"] < uninterrupted["eval_ppl_start"]
    assert (out / "loss_curve.png").stat().st_size > 0
    reloaded = patchattn.from_pretrained(str(out / "final")).eval()
    assert reloaded.config.patchattn[0]["variant"] == "gated"
    model = uninterrupted["model"].eval().cpu()  # trained on the accelerator's device (CUDA where present)
    ids = uninterrupted["tokenizer"]("To be, or not to be, that is the question", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    # the trained gate is not the identity any more, and it is what got saved
    gates = [p for n, p in reloaded.named_parameters() if "patchattn_layer.gate" in n]
    assert gates and any(g.abs().sum() > 0 for g in gates)


@pytest.mark.slow
def test_accelerate_launch_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    proc = accelerate_launch(SCRIPT, "--config", str(TINY), "--output_dir", str(out), "--max_steps", "10",
                             "--eval_every", "0", "--save_every", "5", env=recipe_env(OMP_NUM_THREADS="1"),
                             timeout=240)
    assert_ran_on_two_processes(proc)
    records = read_log(out)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert _falls([r["loss"] for r in records])
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "checkpoints" / "step_5" / "done").exists()


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_loss_curve(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--output_dir", str(out), "--max_steps", str(STEPS),
           "--save_every", "5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=recipe_env(**{training.KILL_ENV: "8"}), capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILLed after step 8
    assert [r["step"] for r in read_log(out)] == list(range(1, 9))
    assert not (out / "final").exists()
    assert training.last_checkpoint(out).name == "step_5"

    resumed = recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out), "max_steps": STEPS,
                                                         "save_every": 5, "resume": True}))
    # restored from the checkpoint (it did not start over, and it still reports the perplexity before training)
    assert resumed["eval_ppl_start"] == pytest.approx(uninterrupted["eval_ppl_start"], rel=1e-6)
    got = {r["step"]: r["loss"] for r in read_log(out)}
    want = {r["step"]: r["loss"] for r in read_log(uninterrupted["output_dir"])}
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
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(bad)], cwd=ROOT, env=recipe_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "seq_length" in proc.stderr and "unknown config field" in proc.stderr


@pytest.fixture()
def no_weights(monkeypatch):
    """Building the model fails the test: config errors must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the config error")

    monkeypatch.setattr(training.model, "build_model", refuse)


@pytest.mark.parametrize("override, message", [
    ({"data": "no/such/corpus.txt"}, "config field 'data' names a file that does not exist"),
    ({"data": ["shakespeare.txt", "./missing.jsonl"]}, "config field 'data' names a file that does not exist"),
    ({"layers": [5]}, "config field 'layers' for tiny-llama (2 layers): layer index 5 is out of range"),
    ({"layers": "last:3"}, "config field 'layers' for tiny-llama (2 layers): layers='last:3': N must be in [1, 2]"),
    ({"layers": "middle"}, "config field 'layers' for tiny-llama (2 layers): layers='middle' is not understood"),
    ({"model": "smollm2-135"}, "config field 'model': unknown model 'smollm2-135': did you mean 'smollm2-135m'?"),
    ({"model": "./no-such-model"}, "config field 'model': no such directory"),
    ({"variant": "moh", "variant_params": {"aux_loss_weight": float("nan")}},
     "moh: parameter 'aux_loss_weight' must be a finite number"),
])
def test_bad_config_is_refused_before_anything_is_written(override, message, tmp_path, no_weights):
    out = tmp_path / "run"
    with pytest.raises(recipe.ConfigError) as info:
        recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out), **override}))
    assert message in str(info.value)
    assert not out.exists()


def test_missing_data_file_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(TINY), "--output_dir", str(out), "--data",
                           str(tmp_path / "corpus.txt")], cwd=ROOT, env=recipe_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "continue_train: bad config: config field 'data' names a file that does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_bad_layers_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(TINY), "--output_dir", str(out), "--layers",
                           "[0, 7]"], cwd=ROOT, env=recipe_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config field 'layers' for tiny-llama (2 layers): layer index 7 is out of range" in proc.stderr
    assert not out.exists()


def test_missing_matplotlib_is_refused_before_training(tmp_path, monkeypatch, no_weights):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    with pytest.raises(recipe.ConfigError, match=r"pip install 'patchattn\[plot\]'"):
        recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out)}))
    assert not out.exists()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Three steps with a checkpoint after step 2: a finished run to resume from."""
    out = tmp_path_factory.mktemp("short") / "run"
    return recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out), "max_steps": 3, "save_every": 2,
                                                      "eval_every": 0, "eval_tokens": 256}))


def test_resume_restores_the_perplexity_before_training(short_run, tmp_path):
    out = tmp_path / "resumed"
    checkpoint = short_run["output_dir"] / "checkpoints" / "step_2"
    resumed = recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out), "max_steps": 3, "eval_every": 0,
                                                         "eval_tokens": 256, "resume": str(checkpoint)}))
    assert [r["step"] for r in read_log(out)] == [3]  # it resumed at step 2
    assert resumed["eval_ppl_start"] == short_run["eval_ppl_start"]
    assert json.loads((out / "summary.json").read_text())["eval_ppl_start"] == short_run["eval_ppl_start"]


def test_resume_of_a_finished_run_is_refused(short_run, no_weights):
    out = short_run["output_dir"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(recipe.ConfigError, match="holds a finished run .* use a new output_dir"):
        recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out), "max_steps": 3, "resume": True}))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # final/ and the log untouched


def test_lora_moh_with_accumulation_and_checkpointing(tmp_path):
    """trainable: lora (merged into the saved weights), MoH with routed heads (the load-balance loss is logged and
    trained on), gradient accumulation and gradient checkpointing."""
    out = tmp_path / "lora-moh"
    result = recipe.main(recipe.load_config(str(TINY), {
        "output_dir": str(out), "max_steps": 3, "eval_every": 0, "variant": "moh",
        "variant_params": {"active_heads": 0.75}, "trainable": "lora", "lora_r": 4, "lora_alpha": 8,
        "grad_accum": 2, "gradient_checkpointing": True}))
    records = read_log(out)
    assert len(records) == 3 and all(r["aux_loss"] > 0 for r in records)
    model = result["model"].eval().cpu()
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged
    reloaded = patchattn.from_pretrained(str(out / "final")).eval()
    assert reloaded.config.patchattn[0]["variant"] == "moh"
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

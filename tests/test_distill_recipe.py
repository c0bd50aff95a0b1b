"""The two-stage distillation recipe (recipes/distill.py) on a tiny random Llama converted to sigmoid attention, CPU.

1. a real 2-process `accelerate launch --multi_gpu` run (gloo): both stages run, the student's losses fall in each
   (train loss and the held-out distillation loss), checkpoints and outputs are where the README says;
2. that run SIGKILLed in stage 2 and resumed reproduces its losses and its final weights;
3. a single-process run SIGKILLed in stage 1 and resumed reproduces the uninterrupted run's losses;
4. the saved model (LoRA merged) loads with patchattn.from_pretrained and gives the same logits; the card records
   both stages;
5. the stage-2 teacher (adapters off, patched layers on exact attention) is the original model, bit for bit;
6. bad configs fail naming the (nested) field.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from recipe_helpers import ROOT, accelerate_launch, assert_ran_on_two_processes, read_log, recipe_env
from script_helpers import load_script

import patchattn
from patchattn import training

SCRIPT = ROOT / "recipes" / "distill.py"
TINY = ROOT / "recipes" / "tiny" / "distill.yaml"
STEPS = 10  # per stage (tiny/distill.yaml)

recipe = load_script(SCRIPT, "distill_recipe")


def _losses(records: list[dict], stage: int) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["stage"] == stage and r["step"] > 0}


def _env(**extra: str) -> dict[str, str]:
    """Every subprocess of these tests on one thread (two of them share the CPU under accelerate)."""
    return recipe_env(OMP_NUM_THREADS="1", **extra)


def _launch(out: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """The tiny config on two CPU processes (``recipe_helpers.accelerate_launch``), checkpointing every 4 steps."""
    env = _env(**({training.KILL_ENV: kill_at} if kill_at else {}))
    return accelerate_launch(SCRIPT, "--config", str(TINY), "--output_dir", str(out), "--stage1.save_every", "4",
                             "--stage2.save_every", "4", *args, env=env, timeout=300)


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return patchattn.from_pretrained(str(model_dir)).eval()(input_ids=ids).logits


IDS = torch.arange(5, 60)[None]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "ddp"
    assert_ran_on_two_processes(_launch(out))
    return out


@pytest.mark.slow
def test_two_processes_both_stages_learn(ddp_run):
    records = read_log(ddp_run)
    for stage in (1, 2):
        losses = _losses(records, stage)
        assert sorted(losses) == list(range(1, STEPS + 1))
        values = [losses[s] for s in sorted(losses)]
        assert sum(values[:4]) / 4 > sum(values[-4:]) / 4, (stage, values)
        held_out = [r["eval_loss"] for r in records if r["stage"] == stage and r.get("eval_loss") is not None]
        assert len(held_out) == 3 and held_out[0] > held_out[1] > held_out[2], (stage, held_out)  # steps 0, 5, 10
    summary = json.loads((ddp_run / "summary.json").read_text())
    assert summary["teacher_ppl"] > 0 and summary["stage2"]["eval_ppl_end"] > 0
    assert summary["stage2"]["eval_loss_end"] < summary["stage2"]["eval_loss_start"]
    names = {p.relative_to(ddp_run / "checkpoints").as_posix() for p in (ddp_run / "checkpoints").glob("*/step_*")}
    assert names == {"stage1/step_4", "stage1/step_8", "stage1/step_10", "stage2/step_4", "stage2/step_8"}
    assert (ddp_run / "loss_curve.png").stat().st_size > 0
    for d in ("stage1", "final"):
        assert patchattn.from_pretrained(str(ddp_run / d)).config.patchattn[0]["variant"] == "sigmoid"


@pytest.mark.slow
def test_two_processes_kill_in_stage2_and_resume(ddp_run, tmp_path):
    out = tmp_path / "killed"
    proc = _launch(out, kill_at="stage2:6")
    assert proc.returncode != 0 and not (out / "final").exists()
    assert max(_losses(read_log(out), 2)) == 6
    proc = _launch(out, "--resume", "true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resumed from" in proc.stdout + proc.stderr and "stage2/step_4" in proc.stdout + proc.stderr
    want, got = read_log(ddp_run), read_log(out)
    for stage in (1, 2):
        w, g = _losses(want, stage), _losses(got, stage)
        assert sorted(g) == sorted(w)  # the killed run's steps 5..6 were replaced, not duplicated
        for step in w:
            assert abs(g[step] - w[step]) <= 1e-6, (stage, step, g[step], w[step])
    torch.testing.assert_close(_logits(out / "final", IDS), _logits(ddp_run / "final", IDS), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "single"
    return recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out)}))


def test_saved_model_reloads_with_the_same_logits(single):
    final = single["model"].cpu()  # trained on the accelerator's device (CUDA where present)
    assert not any("lora" in n for n, _ in final.named_parameters())  # merged
    with torch.no_grad():
        want = final(input_ids=IDS).logits
    torch.testing.assert_close(_logits(single["output_dir"] / "final", IDS), want, rtol=0, atol=1e-6)
    reloaded = patchattn.from_pretrained(str(single["output_dir"] / "final"))
    gains = [p for n, p in reloaded.named_parameters() if n.endswith("patchattn_layer.gain")]
    assert len(gains) == 2


@pytest.mark.slow
def test_kill_in_stage1_and_resume(single, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--output_dir", str(out), "--stage1.save_every", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(**{training.KILL_ENV: "stage1:6"}), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert training.last_checkpoint(out).as_posix().endswith("stage1/step_4")
    recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out), "stage1": {"save_every": 4},
                                               "resume": True}))
    want, got = read_log(single["output_dir"]), read_log(out)
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    for stage in (1, 2):
        w, g = _losses(want, stage), _losses(got, stage)
        for step in w:
            assert abs(g[step] - w[step]) <= 1e-6, (stage, step, g[step], w[step])


def test_model_card_records_both_stages(single):
    from patchattn.hub import model_card

    config = recipe.load_config(str(TINY))
    rows = recipe.card_rows(single["summary"], config)
    card = str(model_card(single["model"], "me/tiny-sigmoid", eval_results=rows, recipe_config=config.to_dict()))
    assert "stage 1: attention transfer" in card and "stage 2: LoRA + variant, KL to the teacher" in card
    assert "stage1:" in card and "stage2:" in card  # the recipe, both stages
    assert f"{single['summary']['teacher_ppl']:.4g}" in card


def test_teacher_is_the_original_model():
    """Stage 2's teacher: LoRA adapters disabled and the patched layers on exact attention give the unpatched
    model's logits, although the variant changes them and LoRA (made non-zero here) changes the projections."""
    from peft import LoraConfig, get_peft_model

    config = recipe.load_config(str(TINY))
    model, _, _ = training.build_model(config, "to be or not to be that is the question")
    ids = torch.randint(4, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = model(input_ids=ids).logits
    patchattn.patch_model(model, "sigmoid")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
        student = peft_model(input_ids=ids).logits
        with training.original_model(peft_model):
            teacher = peft_model(input_ids=ids).logits
        after = peft_model(input_ids=ids).logits
    assert (student - original).abs().max() > 1e-2
    torch.testing.assert_close(teacher, original, rtol=0, atol=0)
    torch.testing.assert_close(after, student, rtol=0, atol=0)  # the switch is undone


@pytest.mark.parametrize("override, field", [
    ({"stage1": {"lr": -1.0}}, "stage1.lr"),
    ({"stage2": {"loss": "mse"}}, "stage2.loss"),
    ({"stage2": {"trainable": "full"}}, "stage2.trainable"),  # full + KL would need a second model copy
    ({"stage2": {"lora_rank": 4}}, "stage2.lora_rank"),
    ({"stage1": 3}, "stage1"),
    ({"variant": "hyper"}, "variant"),  # training-free: nothing for stage 1 to train
    ({"variant": "nope"}, "variant"),
    ({"max_steps": 5}, "max_steps"),  # a stage field at the top level
])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(training.ConfigError, match=field.replace(".", r"\.")):
        recipe.load_config(str(TINY), override)


@pytest.mark.parametrize("override, message", [
    ({"layers": "first:4"}, "config field 'layers' for tiny-llama (2 layers)"),
    ({"data": "missing.jsonl"}, "config field 'data' names a file that does not exist"),
])
def test_bad_config_is_refused_before_anything_is_written(override, message, tmp_path, monkeypatch):
    monkeypatch.setattr(training.model, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    out = tmp_path / "run"
    with pytest.raises(training.ConfigError) as info:
        recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out), **override}))
    assert message in str(info.value)
    assert not out.exists()


def test_resume_of_a_finished_run_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(training.model, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # what a finished run writes last
    with pytest.raises(training.ConfigError, match="holds a finished run"):
        recipe.main(recipe.load_config(str(TINY), {"output_dir": str(out), "resume": True}))
    assert [p.name for p in out.iterdir()] == ["summary.json"]


def test_command_line_overrides_nested_fields():
    config = recipe.parse_args(["--config", str(TINY), "--stage2.lr", "5e-4", "--stage1.max_steps=3",
                                "--mixed_precision", "no"])  # YAML 1.1 reads 5e-4 as a string and no as false
    assert config.stage2.lr == 5e-4 and config.stage1.max_steps == 3 and config.stage2.max_steps == STEPS
    assert config.mixed_precision == "no"
    with pytest.raises(training.ConfigError, match=r"stage2\.temperature"):
        recipe.parse_args(["--config", str(TINY), "--stage2.temperature", "0"])


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "recipes").glob("*/*.yaml")
                                        if "stage1" in (yaml.safe_load(p.read_text()) or {})),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_distill_configs_are_valid(path):
    variant = yaml.safe_load(path.read_text())["variant"]
    if variant not in patchattn.VARIANTS:
        pytest.skip(f"variant {variant!r} is not registered yet")
    recipe.load_config(str(path))

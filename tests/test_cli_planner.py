"""The command line (list / convert / eval / plan / bad input) and the error-budget planner, on tiny models.

The planner is checked on perplexity and on a task budget: with the task's accuracy replaced by a known function of
the patched layers, the plan must be the best subset found by brute force; the CLI runs a task plan end to end on a
tiny random Llama, and refuses bad plan options before any model loads."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

import patchattn
from patchattn import cli, planner
from patchattn.cli import main
from patchattn.data import read_text
from patchattn.planner import capture, layer_errors, plan_layers, plan_layers_for_task
from patchattn.tasks import setting

APPROX = dict(min_seq_len=16, block_size=8, sample_size=8, exact_tail=0)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(96)


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(read_text()[:4000])
    return path


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("hyper", "exact", "chatglm2", "gemma3", "smollm2-135m"):
        assert word in out


def test_convert_then_load(model_dir, tmp_path):
    out = tmp_path / "converted"
    assert main(["convert", str(model_dir), str(out), "--variant", "hyper", "--layers", "last:2",
                 "--param", "block_size=8", "--param", "min_seq_len=16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["patchattn"][0]["variant"] == "hyper"
    assert config["patchattn"][0]["layers"] == [2, 3]
    assert config["patchattn"][0]["params"]["block_size"] == 8
    loaded = patchattn.from_pretrained(str(out))
    reference = patchattn.patch_model(patchattn.from_pretrained(str(model_dir)), "hyper", layers="last:2",
                                      block_size=8, min_seq_len=16)
    ids = torch.randint(3, 96, (1, 40))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_convert_force_replaces_a_non_empty_output(model_dir, tmp_path):
    out = tmp_path / "outputs" / "converted"
    out.mkdir(parents=True)
    (out / "model-00001-of-00002.safetensors").write_text("stale shard of an older model")
    assert main(["convert", str(model_dir), str(out), "--variant", "exact", "--force"]) == 0
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["patchattn"][0]["variant"] == "exact"
    assert [p.name for p in out.parent.iterdir()] == ["converted"]  # no temporary directory left beside it


def test_eval_exact_variant_matches_original(model_dir, text_file, tmp_path):
    results = []
    for extra in ([], ["--variant", "exact"]):
        path = tmp_path / f"r{len(results)}.json"
        assert main(["eval", str(model_dir), "--text", str(text_file), "--context-length", "64", "--json",
                     str(path), *extra]) == 0
        results.append(json.loads(path.read_text()))
    assert results[0]["tokens_scored"] == results[1]["tokens_scored"] > 100
    assert results[1]["patch"][0]["variant"] == "exact"
    assert results[0]["ppl"] == pytest.approx(results[1]["ppl"], rel=1e-5)


def test_bad_input_exits_with_message(model_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert", str(model_dir), "/tmp/never", "--variant", "hyper", "--param", "block_size=0"])
    assert info.value.code == 2
    assert "argument --param: hyper: parameter 'block_size' must be in [1," in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["eval", str(model_dir), "--variant", "nope"])
    assert info.value.code == 2
    assert "argument --variant: unknown variant 'nope'; known variants" in capsys.readouterr().err


def test_layer_errors_zero_where_variant_falls_back():
    model = tiny_model("gemma3")  # layers 0 and 2 slide (window 24), 1 and 3 are global
    store = capture(model, torch.randint(3, 96, (1, 64)))
    errors = layer_errors(store, "hyper", progress=False, **APPROX)
    assert errors[0] == errors[2] == 0.0
    assert errors[1] > 0 and errors[3] > 0
    assert all(v == 0.0 for v in layer_errors(store, "exact", progress=False).values())


def test_plan_respects_the_budget(tokenizer, text_file):
    model = tiny_model("llama")
    text = text_file.read_text()
    generous = plan_layers(model, tokenizer, text, "hyper", max_ppl_increase=10.0, context_length=64,
                           progress=False, **APPROX)
    assert generous.layers == [0, 1, 2, 3]
    impossible = plan_layers(model, tokenizer, text, "hyper", max_ppl_increase=-0.5, context_length=64,
                             progress=False, **APPROX)
    assert impossible.layers == [] and impossible.ppl == impossible.baseline_ppl
    assert not patchattn.is_patched(model)


def test_plan_on_a_task_under_a_binding_budget_keeps_the_cheapest_layers(monkeypatch):
    """Task accuracy replaced by ``1 - Σ cost(layer)/100`` over the patched layers, each layer's cost (in points) a
    known increasing function of its attention error: the largest affordable set is then, by brute force over all
    subsets, the cheapest k layers; the plan must be exactly that set, measured against the exact model's 100%."""
    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 64), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(planner.TaskMetric, "calibration_ids", lambda self: ids)
    errors = layer_errors(capture(model, ids), "hyper", progress=False, **APPROX)
    assert len(set(errors.values())) == 4 and min(errors.values()) > 0
    cost = {i: 3 * e + e * e for i, e in errors.items()}  # points lost by patching layer i, independent of the rest
    calls = []

    def fake_run_tasks(m, tokenizer, tasks, context_lengths, *, samples, batch_size, haystack, seed, progress):
        assert (tasks, context_lengths, samples, batch_size) == (["niah_multikey"], [512], 3, 2)
        layers = setting(m)["layers"]
        calls.append(layers)
        return [{"task": tasks[0], "accuracy": 1 - sum(cost[i] for i in layers) / 100}]

    monkeypatch.setattr(planner, "run_tasks", fake_run_tasks)
    cheapest = sorted(cost.values())
    for k in range(1, 4):
        budget = sum(cheapest[:k]) + 0.5 * cheapest[k]
        best = max((s for r in range(5) for s in itertools.combinations(range(4), r)
                    if sum(cost[i] for i in s) <= budget), key=lambda s: (len(s), -sum(cost[i] for i in s)))
        calls.clear()
        plan = plan_layers_for_task(model, None, "niah_multikey", "hyper", max_drop=budget, context_length=512,
                                    samples=3, batch_size=2, progress=False, **APPROX)
        assert len(best) == k and plan.layers == sorted(best), (budget, cost, plan.tried)
        assert (plan.metric, plan.baseline, plan.budget) == ("niah_multikey", 1.0, budget)
        assert plan.value == pytest.approx(1 - sum(cost[i] for i in best) / 100)
        assert calls[0] == [] and len(calls) <= 4  # exact first, then a bisection over 4 layers
        assert [t["layers"] for t in plan.tried] == [sorted(c) for c in calls[1:]]
        assert plan.settings == {"context_length": 512, "samples": 3, "batch_size": 2, "haystack": None, "seed": 0}
    generous = plan_layers_for_task(model, None, "niah_multikey", "hyper", max_drop=100, context_length=512,
                                    samples=3, batch_size=2, progress=False, **APPROX)
    strict = plan_layers_for_task(model, None, "niah_multikey", "hyper", max_drop=0, context_length=512,
                                  samples=3, batch_size=2, progress=False, **APPROX)
    assert generous.layers == [0, 1, 2, 3] and strict.layers == [] and strict.value == strict.baseline == 1.0
    with pytest.raises(AttributeError, match="not perplexity"):
        _ = strict.ppl
    assert not patchattn.is_patched(model)


def test_task_budget_is_in_points_of_accuracy():
    metric = planner.TaskMetric(None, "vt", max_drop=2)
    assert metric.within_budget(0.5, 0.48) and metric.within_budget(0.9, 0.95)  # 2.0000000000000018 is 2 points
    assert not metric.within_budget(0.5, 0.475)
    assert planner.TaskMetric(None, "vt", max_drop=0).within_budget(0.3, 0.3)
    with pytest.raises(ValueError, match="unknown task 'needle'"):
        planner.TaskMetric(None, "needle", max_drop=2)


def test_cli_plan_on_a_task(model_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", str(model_dir), "--metric", "niah_single", "--max-drop", "2", "--context-length", "256",
            "--samples", "2", "--json", str(out)]
    for key, value in APPROX.items():
        argv += ["--param", f"{key}={value}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert plan["metric"] == "niah_single" and plan["variant"] == "hyper" and plan["budget"] == 2
    assert plan["settings"] == {"context_length": 256, "samples": 2, "batch_size": 4, "haystack": None, "seed": 0}
    assert 0 <= plan["baseline"] <= 1 and 0 <= plan["value"] <= 1 and plan["baseline"] - plan["value"] <= 0.02
    assert set(plan["layers"]) <= {int(i) for i in plan["errors"]} <= {0, 1, 2, 3} and plan["errors"]
    assert all(set(t) == {"layers", "niah_single"} for t in plan["tried"]) and plan["tried"]
    assert "baseline_ppl" not in plan and plan["model"] == str(model_dir)
    assert "relative attention error" in printed
    assert (f"niah_single accuracy {100 * plan['baseline']:.1f}% -> {100 * plan['value']:.1f}%" in printed
            and f"--layers {','.join(map(str, plan['layers'])) or 'none'}" in printed)


def test_cli_plan_on_perplexity_keeps_its_json(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", str(model_dir), "--text", str(text_file), "--context-length", "64", "--max-tokens", "128",
            "--max-ppl-increase", "1000%", "--json", str(out)]
    for key, value in APPROX.items():
        argv += ["--param", f"{key}={value}"]
    assert main(argv) == 0
    plan = json.loads(out.read_text())
    assert plan["metric"] == "ppl" and plan["budget"] == 10.0 and plan["layers"] == [0, 1, 2, 3]
    assert (plan["baseline_ppl"], plan["ppl"]) == (plan["baseline"], plan["value"])
    assert plan["settings"] == {"context_length": 64, "max_tokens": 128}
    assert f"perplexity {plan['baseline']:.3f} -> {plan['value']:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--metric", "needle"], "argument --metric: unknown metric 'needle'; metrics: ppl, niah_single,"),
    (["--metric", "niah_single"], "argument --max-drop: required with --metric niah_single"),
    (["--metric", "vt", "--max-drop", "2", "--max-ppl-increase", "5%"],
     "argument --max-ppl-increase: perplexity option, not used with --metric vt"),
    (["--metric", "vt", "--max-drop", "2", "--text", "shakespeare.txt"], "argument --text: perplexity option"),
    (["--metric", "vt", "--max-drop", "2", "--max-tokens", "64"], "argument --max-tokens: perplexity option"),
    (["--max-drop", "2"], "argument --max-drop: needs a task metric"),
    (["--metric", "ppl", "--samples", "2"], "argument --samples: needs a task metric"),
    (["--batch-size", "2"], "argument --batch-size: needs a task metric"),
    (["--haystack", "shakespeare.txt"], "argument --haystack: needs a task metric"),
    (["--metric", "vt", "--max-drop", "-1"], "argument --max-drop: expected percentage points of accuracy in [0, 100]"),
    (["--metric", "vt", "--max-drop", "2%"], "points of accuracy in [0, 100] (e.g. 2: 90% may become 88%), got '2%'"),
    (["--metric", "vt", "--max-drop", "nan"], "argument --max-drop: expected percentage points"),
    (["--metric", "vt", "--max-drop", "2", "--samples", "0"], "argument --samples: expected a positive integer"),
    (["--metric", "vt", "--max-drop", "2", "--context-length", "0"], "argument --context-length: expected a positive"),
    (["--metric", "vt", "--max-drop", "2", "--haystack", "no/such.txt"], "argument --haystack: no such file"),
    (["--metric", "vt", "--max-drop", "2", "--variant", "nope"], "argument --variant: unknown variant 'nope'"),
])
def test_cli_plan_options_are_checked_before_loading(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as info:
        main(["plan", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err

"""lm-evaluation-harness: the ``patchattn`` model evaluates patched checkpoints with lm-eval's own runner, from
Python and from the command line, offline, on a small local task (``--include_path``).

Each evaluation is compared, per request, with lm-eval's ``hf`` model given the same patched model object, and with
the unpatched base (so the patch is shown to have run).
"""
from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'patchattn[eval]')")

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from test_hub import hub, tiny_tokenizer  # noqa: F401  (hub: the local Hub server fixture)
from tiny_models import VOCAB, perturb_variant_weights, tiny_model

import patchattn
from patchattn.harness import PatchattnLM

ROOT = Path(__file__).resolve().parent.parent
TASK = "patchattn_tiny_mc"
# hyper really runs on the task's 21-23 token inputs (no exact tail: it would cover them)
HYPER = dict(min_seq_len=16, block_size=8, sample_size=8, sink_tokens=0, exact_tail=0)


def patched():
    return perturb_variant_weights(patchattn.patch_model(tiny_model("llama"), "gated"), 0.5)


def save(model, path) -> str:
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> str:
    """A multiple-choice task over a local JSONL file, as a directory for ``--include_path``."""
    root = tmp_path_factory.mktemp("lm_eval_task")
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(4, VOCAB)}" for _ in range(n))
    with open(root / "data.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"context": words(20), "choices": [words(3), words(3)], "label": i % 2}) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "data.jsonl"}
  cache_dir: {root / "datasets_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return str(root / "tasks")


def scores(results: dict) -> list[float]:
    """The log-likelihood of every (document, choice) request, in document order."""
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [float(ll) for s in samples for ll, _greedy in s["filtered_resps"]]


@pytest.fixture(scope="module")
def tasks(task_dir) -> TaskManager:
    # In-process runs skip indexing lm-eval's thousands of built-in task files (seconds each time); the
    # command-line test indexes them, as a user's run does.
    return TaskManager(include_path=task_dir, include_defaults=False)


def evaluate(tasks: TaskManager, model, model_args=None) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], device="cpu",
                                   task_manager=tasks, log_samples=True)


def evaluate_object(tasks: TaskManager, model) -> list[float]:
    return scores(evaluate(tasks, HFLM(pretrained=model, tokenizer=tiny_tokenizer())))


@pytest.fixture(scope="module")
def reference(tasks):
    """(scores of the patched model object, scores of its unpatched base), through lm-eval's ``hf`` model."""
    return evaluate_object(tasks, patched()), evaluate_object(tasks, tiny_model("llama"))


def as_patchattn_0_1(path: str) -> str:
    config = json.loads(Path(path, "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])  # what patchattn 0.1 wrote
    Path(path, "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("checkpoint", ["patched", "patchattn-0.1"])
def test_python_route_matches_the_patched_model_object(tmp_path, tasks, reference, checkpoint):
    path = save(patched(), tmp_path / "ckpt")
    if checkpoint == "patchattn-0.1":
        as_patchattn_0_1(path)  # lm-eval's `hf` model would load this without its patch
    results = evaluate(tasks, "patchattn", f"pretrained={path},dtype=float32")
    expected, base = reference
    assert scores(results) == expected
    assert scores(results) != base
    assert results["config"]["model"] == "patchattn"
    assert results["config"]["patchattn"][0]["variant"] == "gated"
    picked = [max((0, 1), key=lambda c: expected[2 * doc + c]) for doc in range(4)]  # labels are doc % 2
    assert results["results"][TASK]["acc,none"] == pytest.approx(sum(p == doc % 2 for doc, p in enumerate(picked)) / 4)


@pytest.mark.slow  # a fresh lm-eval process indexes its built-in tasks (~10 s on 2 cores)
def test_cli_route_matches_the_patched_model_object(tmp_path, task_dir, reference):
    path = save(patched(), tmp_path / "ckpt")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "patchattn.harness", "--model", "patchattn", "--model_args", f"pretrained={path}",
         "--tasks", TASK, "--include_path", task_dir, "--device", "cpu", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert TASK in run.stdout  # lm-eval's results table
    (samples_file,) = glob.glob(str(out / "*" / f"samples_{TASK}_*.jsonl"))
    samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    assert json.loads(Path(results_file).read_text())["config"]["patchattn"][0]["variant"] == "gated"
    expected, base = reference
    got = scores({"samples": {TASK: samples}})
    assert got == expected and got != base


def test_model_args_patch_an_unpatched_checkpoint(tmp_path, tasks, reference):
    path = save(tiny_model("llama"), tmp_path / "base")
    results = evaluate(tasks, "patchattn", {"pretrained": path, "variant": "hyper", "layers": [-2, -1],
                                               **{f"param_{k}": v for k, v in HYPER.items()}})
    expected = evaluate_object(tasks, patchattn.patch_model(tiny_model("llama"), "hyper", layers=[-2, -1], **HYPER))
    assert scores(results) == expected
    assert scores(results) != reference[1]  # the unpatched base
    assert results["config"]["patchattn"][0]["layers"] == [2, 3]
    # the string form of model_args (`key=value,...`, values typed by lm-eval) makes the same patch
    text = ",".join([f"pretrained={path}", "variant=hyper", "layers=last:2", *(f"param_{k}={v}" for k, v in HYPER.items())])
    lm = PatchattnLM.create_from_arg_string(text, {"device": "cpu"})
    assert lm.model.config.patchattn == results["config"]["patchattn"]


def test_delta_upload_from_the_hub_with_its_base_tokenizer(hub, tasks, reference):
    tiny_model("llama").push_to_hub("org/tiny-llama")
    tiny_tokenizer().push_to_hub("org/tiny-llama")
    patchattn.push_to_hub(patched(), "me/llama-gated-delta", delta_only=True, base_model="org/tiny-llama")
    assert "tokenizer.json" not in hub.files("me/llama-gated-delta")  # pushed without tokenizer=
    lm = PatchattnLM(pretrained="me/llama-gated-delta", device="cpu", dtype="float32")
    assert patchattn.is_patched(lm.model)
    assert scores(evaluate(tasks, lm)) == reference[0]  # patched() is deterministic


@pytest.mark.parametrize("model_args,message", [
    ({"param_block_size": 8}, "need variant=<name>"),
    ({"layers": "last:2"}, "need variant=<name>"),
    ({"variant": "hyper", "param_blocksize": 8}, "blocksize"),
    ({"variant": "nope"}, "nope"),
    ({"variant": "hyper", "param_block_size": -1}, "block_size"),
])
def test_bad_patch_arguments_fail_before_loading(model_args, message):
    with pytest.raises(ValueError, match=message):
        PatchattnLM(pretrained="/nonexistent/checkpoint", device="cpu", **model_args)


def test_a_patched_checkpoint_is_not_patched_again(tmp_path):
    path = save(patched(), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="already patched with 'gated'"):
        PatchattnLM(pretrained=path, device="cpu", variant="hyper")

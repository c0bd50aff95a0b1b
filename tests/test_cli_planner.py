"""The command line (list / convert / eval / plan / bad input) and the error-budget planner, on tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import patchattn
from patchattn.cli import main
from patchattn.data import read_text
from patchattn.planner import capture, layer_errors, plan_layers

APPROX = dict(min_seq_len=16, block_size=8, sample_size=8, exact_tail=0)


@pytest.fixture(scope="module")
def tokenizer():
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([read_text()[:20000]], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"],
                                                                            vocab_size=96))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>")


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
    assert config["patchattn"]["variant"] == "hyper"
    assert config["patchattn"]["layers"] == [2, 3]
    assert config["patchattn"]["params"]["block_size"] == 8
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
    assert json.loads((out / "config.json").read_text())["patchattn"]["variant"] == "exact"
    assert [p.name for p in out.parent.iterdir()] == ["converted"]  # no temporary directory left beside it


def test_eval_exact_variant_matches_original(model_dir, text_file, tmp_path):
    results = []
    for extra in ([], ["--variant", "exact"]):
        path = tmp_path / f"r{len(results)}.json"
        assert main(["eval", str(model_dir), "--text", str(text_file), "--context-length", "64", "--json",
                     str(path), *extra]) == 0
        results.append(json.loads(path.read_text()))
    assert results[0]["tokens_scored"] == results[1]["tokens_scored"] > 100
    assert results[1]["patch"]["variant"] == "exact"
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

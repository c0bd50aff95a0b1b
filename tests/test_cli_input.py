"""Bad command-line input fails at parse time: argparse names the option, exit code 2, and no model is loaded."""
from __future__ import annotations

import pytest

import patchattn.demo
from patchattn import cli, realweights


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Any model load fails the test: every error below must come before one."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "load", refuse)
    monkeypatch.setattr(patchattn.demo, "load_model", refuse)


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--variant", "hyper", "--seq-lens", "10,abc"], "argument --seq-lens: expected comma-separated positive"),
    (["bench", "--variant", "hyper", "--seq-lens", "0"], "argument --seq-lens: expected comma-separated positive"),
    (["bench", "--variant", "hyper", "--layers", "x"], "argument --layers: expected 'all', 'last:N'"),
    (["eval", "--variant", "hyper", "--layers", "last:0"], "argument --layers: expected 'all', 'last:N'"),
    (["eval", "--variant", "hyper", "--layers", "1,two"], "argument --layers: expected 'all', 'last:N'"),
    (["demo", "--layers", "middle:3"], "argument --layers: expected 'all', 'last:N'"),
    (["demo", "--contexts", "2048,4k"], "argument --contexts: expected comma-separated positive integers"),
    (["plan", "--max-ppl-increase", "lots"], "argument --max-ppl-increase: expected a positive percentage"),
    (["plan", "--max-ppl-increase", "nan%"], "argument --max-ppl-increase: expected a positive percentage"),
    (["plan", "--context-length", "8k"], "argument --context-length: expected a positive integer, got '8k'"),
    (["eval", "--context-length", "0"], "argument --context-length: expected a positive integer, got '0'"),
    (["eval", "--stride", "4096", "--context-length", "2048"], "argument --stride: must be <= --context-length"),
    (["eval", "--text", "no/such/file.txt"], "argument --text: no such file: 'no/such/file.txt'"),
    (["eval", "--variant", "hyper", "--param", "block_size"], "argument --param: expected KEY=VALUE"),
    (["eval", "--variant", "hyper", "--param", "block_size=0"],
     "argument --param: hyper: parameter 'block_size' must be in [1, inf], got 0"),
    (["eval", "--variant", "hyper", "--param", "bucket=4"], "argument --param: hyper: unknown parameter(s) ['bucket']"),
    (["eval", "--variant", "lawcat", "--param", "decay_halflife=nan"],
     "argument --param: lawcat: parameter 'decay_halflife' must be a finite number"),
    (["eval", "--param", "block_size=8"], "argument --param: variant parameters need --variant"),
    (["eval", "--variant", "hyperattention"], "argument --variant: unknown variant 'hyperattention'"),
    (["plan", "--param", "sample_size=-1"], "argument --param: hyper: parameter 'sample_size' must be in [0,"),
    (["demo", "--param", "min_seq_len=0"], "argument --param: hyper: parameter 'min_seq_len' must be in [1,"),
    (["demo", "--model", "smollm2-135"], "argument --model: invalid choice: 'smollm2-135'"),
])
def test_bad_value_names_the_option_before_loading(argv, message, capsys):
    assert message in _usage_error(argv, capsys)


def test_typo_of_a_shipped_model_suggests_it(capsys):
    err = _usage_error(["eval", "smollm2-135"], capsys)
    assert "argument model: unknown model 'smollm2-135': did you mean 'smollm2-135m'?" in err
    assert "smollm2-135m, gemma3-270m" in err


@pytest.mark.parametrize("ref", ["./missing-model", "/no/such/model", "~/no-such-model", "runs/x/final"])
def test_missing_local_directory(ref, capsys):
    assert f"argument model: no such directory: {ref!r}" in _usage_error(["eval", ref], capsys)


def test_model_source(tmp_path):
    assert realweights.model_source("gemma3-270m") == "shipped"
    assert realweights.model_source(str(tmp_path)) == "local"
    assert realweights.model_source("HuggingFaceTB/SmolLM2-135M") == "hub"
    with pytest.raises(ValueError, match=r"unknown model 'gemma-270m': did you mean 'gemma3-270m'\?"):
        realweights.model_source("gemma-270m")
    with pytest.raises(ValueError, match="unknown model 'xyz': shipped models are"):
        realweights.model_source("xyz")


def test_convert_refuses_a_non_empty_output(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    err = _usage_error(["convert", "smollm2-135m", str(out), "--variant", "hyper"], capsys)
    assert f"argument output: {out} is not empty; pass --force" in err
    assert (out / "keep.txt").read_text() == "precious"

"""Passkey retrieval (patchattn.passkey) and scripts/distill_eval.py on tiny models, CPU.

Prompts have exactly the requested token length with the needle at the requested depth; scoring is checked with
stub models whose answers are known (an oracle that reads the key, one that only finds it in the first half);
a tiny random Llama runs through ``generate``; distill_eval writes its JSON / table / plot for a teacher and a
patched student.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn
from script_helpers import SCRIPTS, load_script

import patchattn
from patchattn.data import read_text
from patchattn.passkey import (
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    build_prompt,
    extract_answer,
    make_prompts,
    passkey_accuracy,
)


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level, digits split one per token (as BPE tokenizers of Llama-family models do)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = re.findall(r"[A-Za-z]+|[^\w\s]", read_text()[:200_000])
    prompt_words = re.findall(r"[A-Za-z]+|[^\w\s]", INSTRUCTION + NEEDLE + QUESTION)
    common = [w for w, _ in Counter(words).most_common(400)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(["<unk>", "<pad>", "<s>", "</s>", *"0123456789",
                                                       *prompt_words, *common]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def _needle_ids(tokenizer, key):
    return tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids


@pytest.mark.parametrize("length", [96, 200, 517])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_has_the_length_and_the_needle_at_the_depth(tokenizer, length, depth):
    filler = tokenizer(read_text()[:20_000], add_special_tokens=False).input_ids
    p = build_prompt(tokenizer, filler, length, depth, "48213", offset=77)
    assert p.input_ids.shape == (length,)
    needle = _needle_ids(tokenizer, "48213")
    assert p.input_ids[p.needle_start:p.needle_start + len(needle)].tolist() == needle
    head = len(tokenizer(INSTRUCTION, add_special_tokens=False).input_ids)  # this tokenizer adds no BOS
    assert p.needle_start - head == round(depth * p.filler_tokens)
    assert p.input_ids[head:p.needle_start].tolist() == filler[77:p.needle_start - head + 77]  # text at the offset
    text = tokenizer.decode(p.input_ids)
    assert text.rstrip().endswith("What is the pass key ? The pass key is")
    assert "4 8 2 1 3" in text


def test_prompt_too_short_raises(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        build_prompt(tokenizer, [5, 6, 7], 10, 0.5, "12345")


def test_prompts_are_reproducible_and_keys_random(tokenizer):
    a = make_prompts(tokenizer, 128, [0.0, 1.0], 3, seed=1)
    b = make_prompts(tokenizer, 128, [0.0, 1.0], 3, seed=1)
    assert [p.key for p in a] == [p.key for p in b] and all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert len({p.key for p in a}) == 6 and all(re.fullmatch(r"\d{5}", p.key) for p in a)
    assert [p.depth for p in a] == [0.0] * 3 + [1.0] * 3


@pytest.mark.parametrize("completion, answer", [
    (" 48213. Remember", "48213"), (" 4 8 2 1 3 is", "48213"), ("the key: 07311", "07311"), (" no idea", None),
])
def test_extract_answer(completion, answer):
    assert extract_answer(completion) == answer


class _Stub(nn.Module):
    """Answers with the key it reads in the prompt, if the needle is in the first ``reach`` of it, else 00000."""

    def __init__(self, tokenizer, reach: float = 1.0):
        super().__init__()
        self.tokenizer, self.reach, self.anchor = tokenizer, reach, nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not do_sample and attention_mask.all()
        rows = []
        for row in input_ids:
            text = self.tokenizer.decode(row)
            match = re.search(r"pass key is ((?:\d ){4}\d)", text)
            found = match.start() < self.reach * len(text)
            answer = match.group(1).replace(" ", "") if found else "00000"
            new = self.tokenizer(f" {answer} .", add_special_tokens=False).input_ids[:max_new_tokens]
            rows.append(torch.cat([row, torch.tensor(new)]))
        return torch.stack(rows)


def test_scores_exact_match_per_length_and_depth(tokenizer):
    depths = [0.0, 0.5, 1.0]
    oracle = passkey_accuracy(_Stub(tokenizer), tokenizer, [128, 256], depths, trials=2, progress=False)
    assert oracle.accuracy() == {128: {0.0: 1.0, 0.5: 1.0, 1.0: 1.0}, 256: {0.0: 1.0, 0.5: 1.0, 1.0: 1.0}}
    half = passkey_accuracy(_Stub(tokenizer, reach=0.7), tokenizer, [128, 256], depths, trials=2, batch_size=3,
                            progress=False)
    assert half.accuracy() == {128: {0.0: 1.0, 0.5: 1.0, 1.0: 0.0}, 256: {0.0: 1.0, 0.5: 1.0, 1.0: 0.0}}
    assert half.accuracy_by_length() == {128: pytest.approx(2 / 3), 256: pytest.approx(2 / 3)}
    wrong = [t for t in half.trials if not t.correct]
    assert len(wrong) == 4 and all(t.answer == "00000" and t.depth == 1.0 for t in wrong)
    assert json.loads(json.dumps(half.to_dict()))["accuracy"]["256"]["1.0"] == 0.0


def tiny_llama(tokenizer):
    """A 2-layer random Llama (seed 0) over ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=3))


def test_runs_a_real_model_through_generate(tokenizer):
    model = tiny_llama(tokenizer)
    patchattn.patch_model(model, "sigmoid")
    result = passkey_accuracy(model, tokenizer, [64, 160], [0.0, 1.0], trials=2, max_new_tokens=4, progress=False)
    assert len(result.trials) == 8 and set(result.accuracy()) == {64, 160}
    assert all(0.0 <= a <= 1.0 for a in result.accuracy_by_length().values())


def test_smollm2_tokenizer_prompt_lengths():
    from transformers import AutoTokenizer

    from patchattn.realweights import local_model_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(local_model_path("smollm2-135m"))
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    for length in (1024, 4096):
        for p in make_prompts(tokenizer, length, [0.0, 0.5, 1.0], 1):
            assert p.input_ids.shape == (length,)
            assert f"The pass key is {p.key}." in tokenizer.decode(p.input_ids)


def test_distill_eval_script(tmp_path, tokenizer):
    """Teacher (a tiny Llama) vs student (the same weights patched with sigmoid attention): files and tables."""
    distill_eval = load_script(SCRIPTS / "distill_eval.py", "distill_eval")
    model = tiny_llama(tokenizer)
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    patchattn.patch_model(model, "sigmoid")
    model.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    results = distill_eval.main([
        "--teacher", str(tmp_path / "teacher"), "--student", f"sig={tmp_path / 'student'}", "--ppl-lengths", "32,64",
        "--ppl-tokens", "256", "--passkey-lengths", "80,120", "--depths", "0,1", "--trials", "2",
        "--max-new-tokens", "3", "--out", str(tmp_path / "out" / "eval"), "--no-progress"])
    assert set(results) == {"teacher", "sig"} and results["sig"]["patch"][0]["variant"] == "sigmoid"
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["models"]["teacher"]["ppl"].keys() == {"32", "64"}
    assert len(saved["models"]["sig"]["passkey"]["trials"]) == 8
    table = (tmp_path / "out" / "eval.md").read_text()
    assert "| model | ppl @ 32 | ppl @ 64 | passkey @ 80 | passkey @ 120 |" in table and "| sig |" in table
    assert (tmp_path / "out" / "eval.png").stat().st_size > 0

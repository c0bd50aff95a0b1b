"""`streaming` (StreamingLLM): window >= length is the unpatched model, a small window is exactly sinks + window
masked softmax (prefill, decode, padding, softcap, GQA), generate() with left padding, attn_implementation name."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_models import CACHE_KW, left_padded, logits, random_ids, tiny_model
from transformers import AutoModelForCausalLM

import patchattn
from patchattn import LAYER_ATTR
from patchattn.patching import resolve_family


def tokens(batch=2, n=40, seed=1):
    return random_ids(batch, n, seed)


def reference(query, key, value, sinks, window, scaling, softcap=None, key_valid=None):
    """Hand-written StreamingLLM attention: loops build the kept set, float64 masked softmax, kv heads repeated."""
    b, h, q_len, _ = query.shape
    hk, k_len = key.shape[1], key.shape[2]
    keep = torch.zeros(q_len, k_len, dtype=torch.bool)
    for qi in range(q_len):
        i = k_len - q_len + qi  # the query's key index
        for j in range(i + 1):
            if j < sinks or i - j < window:
                keep[qi, j] = True
    keep = keep[None, None].expand(b, 1, q_len, k_len)
    if key_valid is not None:
        keep = keep & key_valid[:, None, None, :]
    k = key.double().repeat_interleave(h // hk, dim=1)
    v = value.double().repeat_interleave(h // hk, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores.masked_fill(~keep, -math.inf), dim=-1)
    return (weights @ v).transpose(1, 2)  # [b, q, h, d]


def attention_modules(model):
    return resolve_family(model).attention_modules(model)


def capture(layer):
    """Record every call's inputs and output of a variant layer."""
    calls, original = [], layer.attention

    def wrapped(module, query, key, value, attention_mask, **kwargs):
        out = original(module, query, key, value, attention_mask, **kwargs)
        calls.append((query, key, value, attention_mask, kwargs, out[0]))
        return out

    layer.attention = wrapped
    return calls


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gemma2", "gemma3", "qwen3"])
def test_window_covering_the_sequence_equals_unpatched(family):
    model = tiny_model(family)
    ids, mask = left_padded(40, (0, 5, 13))
    ref, ref_pad = logits(model, tokens()), logits(model, ids, mask)
    with patchattn.patched(model, "streaming", window=40):
        torch.testing.assert_close(logits(model, tokens()), ref, atol=1e-5, rtol=0)
        valid = mask.bool()
        torch.testing.assert_close(logits(model, ids, mask)[valid], ref_pad[valid], atol=1e-5, rtol=0)
        assert all(set(p) == {"exact_short"} for p in patchattn.attention_paths(model).values())


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: softcap (eager path), gemma: one kv head
def test_small_window_is_sinks_plus_window_softmax(family):
    model = tiny_model(family)
    sinks, window = 3, 6
    patchattn.patch_model(model, "streaming", layers=[1], sink_tokens=sinks, window=window)
    module = attention_modules(model)[1]
    calls = capture(getattr(module, LAYER_ATTR))
    with torch.no_grad():
        out = model(input_ids=tokens(), use_cache=True)
        model(input_ids=tokens(n=1, seed=5), **{CACHE_KW: out.past_key_values})  # one decode step over the cache
    assert [c[0].shape[2] for c in calls] == [40, 1]
    for query, key, value, _, kwargs, got in calls:
        assert key.shape[1] < query.shape[1]  # GQA: kv heads reach the variant unexpanded
        assert (kwargs.get("softcap") is not None) == (family == "gemma2")
        want = reference(query, key, value, sinks, window, kwargs["scaling"], kwargs.get("softcap"))
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert patchattn.attention_paths(model)[1] == {"approximate": 2}
    # the approximation changes the model (a window of 6 over 40 tokens)
    assert not torch.allclose(logits(model, tokens()), logits(tiny_model(family), tokens()), atol=1e-3)


def test_small_window_with_left_padding_matches_reference():
    model = tiny_model("qwen3")
    ids, mask = left_padded(40, (0, 5, 13))
    patchattn.patch_model(model, "streaming", layers=[0], sink_tokens=2, window=5)
    calls = capture(getattr(attention_modules(model)[0], LAYER_ATTR))
    logits(model, ids, mask)
    (query, key, value, _, kwargs, got), = calls
    want = reference(query, key, value, 2, 5, kwargs["scaling"], key_valid=mask.bool())
    valid = mask.bool()  # padded query rows are never used
    torch.testing.assert_close(got.double()[valid], want[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_left_padded_generate(family):
    model = tiny_model(family)
    ids, mask = left_padded(40, (0, 5, 13))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with patchattn.patched(model, "streaming", window=64):  # covers prompt + new tokens: unchanged
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), ref)
    with patchattn.patched(model, "streaming", sink_tokens=4, window=8):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        paths = patchattn.attention_paths(model)
    assert out.shape == ref.shape and torch.equal(out[:, :ids.shape[1]], ids)
    assert all(p["approximate"] == 6 for p in paths.values())  # the prefill and 5 decode steps


def test_attn_implementation_name(tmp_path):
    model = tiny_model("llama")
    ref = logits(model, tokens())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="patchattn_streaming").eval()
    assert loaded.config._attn_implementation == "patchattn_streaming"
    torch.testing.assert_close(logits(loaded, tokens()), ref, atol=1e-5, rtol=0)  # 40 tokens < 4 + 1024
    info = next(v for v in patchattn.list_variants() if v["name"] == "streaming")
    assert info["attn_implementation"] == "patchattn_streaming" and info["kind"] == "training-free"
    assert {k: p["default"] for k, p in info["params"].items()} == {"sink_tokens": 4, "window": 1024}

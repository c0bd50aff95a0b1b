"""Where approximating variants must not approximate: packed/custom masks (only "causal AND key padding" is read as
padding), attention dropout in training, and output_attentions (every variant returns real weights or refuses)."""
from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import CACHE_KW, random_ids, tiny_model

import patchattn
from patchattn import logging_utils
from patchattn.attention import key_padding_from_mask

pytest.importorskip("triton")

# parameters under which hyper and dhsa run their whole machinery but are exact (see test_patching/test_dhsa)
FULL = {"hyper": dict(min_seq_len=16, block_size=4096, sample_size=16),
        "dhsa": dict(min_seq_len=16, chunk_size=16, query_block=16, budget_tokens=4096, local_window=0)}
KERNEL = {"hyper": "hyper_attention", "dhsa": "dhsa_attention"}
N, CUT = 64, 30  # two packed documents: tokens [0, CUT) and [CUT, N)


def tokens(batch=1, n=N, seed=1):
    return random_ids(batch, n, seed)


def packed_mask(n=N, cut=CUT):
    doc = torch.arange(n) >= cut
    causal = torch.arange(n)[:, None] >= torch.arange(n)[None]
    return (causal & (doc[:, None] == doc[None]))[None, None]


def transformers_mask(padding_2d: torch.Tensor) -> torch.Tensor:
    """The 4-D mask sdpa's mask maker (the one patchattn registers) builds for a padded batch: causal AND valid key,
    so left-padded queries get all-False rows and right-padded ones their causal prefix."""
    n = padding_2d.shape[1]
    causal = torch.arange(n)[:, None] >= torch.arange(n)[None]
    return causal[None, None] & padding_2d.bool()[:, None, None, :]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the approximations' kernel calls (query lengths), per variant."""
    import patchattn.variants.dhsa as dhsa
    import patchattn.variants.hyper as hyper

    calls = {"hyper": [], "dhsa": []}
    for name, module in (("hyper", hyper), ("dhsa", dhsa)):
        real = getattr(module, KERNEL[name])
        spy = (lambda real, log: lambda q, *a, **kw: log.append(q.shape[2]) or real(q, *a, **kw))(real, calls[name])
        monkeypatch.setattr(module, KERNEL[name], spy)
    monkeypatch.setattr(logging_utils, "_seen", set())
    return calls


# -- which masks are "causal AND key padding" ------------------------------------------------------------------------
def test_padding_masks_from_the_mask_maker_are_accepted():
    left, right = torch.ones(3, 12, dtype=torch.long), torch.ones(3, 12, dtype=torch.long)
    left[1, :4], left[2, :11] = 0, 0
    right[1, 9:] = 0
    for padding in (left, right):
        ok, key_valid = key_padding_from_mask(transformers_mask(padding), 12, 12)
        assert ok and torch.equal(key_valid, padding.bool())
    all_true_rows = transformers_mask(left)
    all_true_rows[1, :, :4] = True  # makers that unmask fully masked rows for the fused kernels
    assert key_padding_from_mask(all_true_rows, 12, 12)[0]
    decode = transformers_mask(left)[:, :, -1:]  # one query over the cache
    ok, key_valid = key_padding_from_mask(decode, 1, 12)
    assert ok and torch.equal(key_valid, left.bool())


def test_packed_holes_and_windows_are_rejected():
    assert not key_padding_from_mask(packed_mask(), N, N)[0]
    assert not key_padding_from_mask(packed_mask(12, 1), 12, 12)[0]  # a one-token first document
    holes = torch.ones(1, 12, dtype=torch.long)
    holes[0, 5:7] = 0  # padding in the middle is no batch's padding
    assert not key_padding_from_mask(transformers_mask(holes), 12, 12)[0]
    i, j = torch.arange(12)[:, None], torch.arange(12)[None]
    assert not key_padding_from_mask(((j <= i) & (j > i - 4))[None, None], 12, 12)[0]
    assert not key_padding_from_mask(packed_mask().float(), N, N)[0]


@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_packed_documents_run_exact(variant, kernel_calls, caplog):
    """Full budget is exact, so any difference from the unpatched model means the approximation ran on a mask it
    misread; the fallback is logged once."""
    model, ids, mask = tiny_model("llama"), tokens(), packed_mask()
    positions = torch.cat([torch.arange(CUT), torch.arange(N - CUT)])[None]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        patchattn.patch_model(model, variant, **FULL[variant])
        with caplog.at_level(logging.WARNING, logger="patchattn"):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert kernel_calls[variant] == []
    assert sum("not causal+padding" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_left_padding_still_approximates(variant, kernel_calls):
    model = tiny_model("llama")
    ids = tokens(3, N, seed=2)
    padding = torch.ones_like(ids)
    padding[1, :7], padding[2, :20] = 0, 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=padding).logits
        patchattn.patch_model(model, variant, **FULL[variant])
        out = model(input_ids=ids, attention_mask=padding).logits
    assert kernel_calls[variant] == [N] * 4, "every layer's prefill goes through the approximation"
    valid = padding.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=0)


# -- attention dropout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_dropout_in_training_falls_back_to_exact(variant, kernel_calls, caplog):
    model, ids = tiny_model("llama"), tokens(2)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    model.train()
    torch.manual_seed(7)
    ref = model(input_ids=ids).logits
    patchattn.patch_model(model, variant, **FULL[variant])
    torch.manual_seed(7)
    with caplog.at_level(logging.WARNING, logger="patchattn"):
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # exact attention, the same dropout draws
    assert kernel_calls[variant] == []
    assert sum("attention dropout" in r.getMessage() for r in caplog.records) == 1
    model.eval()  # no dropout in eval: the approximation runs again
    with torch.no_grad():
        model(input_ids=ids)
    assert kernel_calls[variant] == [N] * 4


# -- output_attentions ----------------------------------------------------------------------------------------------
def attentions(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, output_attentions=True, **kwargs).attentions


@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_requested_weights_are_the_exact_ones(variant, kernel_calls, caplog):
    model, ids = tiny_model("llama"), tokens(2)
    patchattn.patch_model(model, "exact")
    ref = attentions(model, ids)
    patchattn.unpatch_model(model)
    patchattn.patch_model(model, variant, **FULL[variant])
    with caplog.at_level(logging.WARNING, logger="patchattn"):
        got = attentions(model, ids)
    assert kernel_calls[variant] == []
    for layer, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        message = f"output_attentions=True needs the attention weights; layer {layer} runs exact attention"
        assert sum(message in r.getMessage() for r in caplog.records) == 1


def test_act_returns_weights_at_decode_steps():
    """Decode rows of the calibrated map use the sinks of every row so far: the same rows as a full forward, up to
    layer 1 (the first calibrated one; ACT is not causal, so later layers' cached keys differ from a full forward's)."""
    from transformers import DynamicCache

    model, ids = tiny_model("llama"), tokens(2, 25, seed=3)
    patchattn.patch_model(model, "act", heads={1: [0, 2], 3: [1]}, theta=0.05)
    full = attentions(model, ids)
    cache = DynamicCache(config=model.config)
    attentions(model, ids[:, :-1], **{CACHE_KW: cache})
    step = attentions(model, ids[:, -1:], **{CACHE_KW: cache})
    for a, b in zip(step[:2], full[:2]):
        torch.testing.assert_close(a[:, :, 0], b[:, :, -1], atol=1e-5, rtol=0)
    assert all(w.shape == (2, 4, 1, 25) for w in step)
    torch.testing.assert_close(step[3].sum(-1), torch.ones(2, 4, 1), atol=1e-5, rtol=0)


def test_zipcache_returns_weights_at_every_step():
    model, ids = tiny_model("llama"), tokens(2, 30, seed=4)
    patchattn.patch_model(model, "zipcache", requant_interval=6)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                         output_attentions=True, pad_token_id=0)
    for step, layers in enumerate(out.attentions):
        for weights in layers:
            assert weights is not None and weights.shape[2] == (30 if step == 0 else 1)
            torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)), atol=1e-3, rtol=0)


def test_moh_and_sigmoid_return_their_weights():
    model, ids = tiny_model("llama"), tokens(2, 20)
    patchattn.patch_model(model, "exact")
    ref = attentions(model, ids)
    patchattn.unpatch_model(model)
    patchattn.patch_model(model, "moh", active_heads=0.75)
    torch.testing.assert_close(attentions(model, ids)[0], ref[0], atol=1e-6, rtol=0)  # softmax weights, ungated
    patchattn.unpatch_model(model)
    patchattn.patch_model(model, "sigmoid", norm="none")
    weights = attentions(model, ids)
    assert all(w is not None and w.shape == (2, 4, 20, 20) for w in weights)
    upper = torch.ones(20, 20, dtype=torch.bool).triu(1)
    assert (weights[0][..., upper] == 0).all() and (weights[0][..., ~upper] > 0).all()
    assert not torch.allclose(weights[0].sum(-1), torch.ones(1))  # sigmoid rows are not normalised


@pytest.mark.parametrize("variant", ["hedgehog", "lawcat", "lightning", "mala", "nala"])
def test_linear_attention_refuses_to_drop_the_weights(variant):
    model = patchattn.patch_model(tiny_model("llama"), variant, layers=[1])
    with pytest.raises(ValueError, match=rf"{variant}: linear attention .* output_attentions=False"):
        attentions(model, tokens(1, 12))

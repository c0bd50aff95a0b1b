"""DHSA (kernels/dhsa, patchattn/variants/dhsa.py): the chunk-level selection against the paper's token-level
description, the selection's guarantees, the Triton block-sparse kernel against masked exact attention, and the
variant on tiny models of several families (full budget == exact, generate: prefill sparse, decode exact).

Without CUDA the kernel runs in Triton's CPU interpreter (fp32/fp16: the interpreter's bf16 is broken) at tiny
sizes; with CUDA the same cases run compiled, plus a bf16 case.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from kernel_helpers import CUDA, DEV, rel_err  # noqa: E402
from tiny_models import logits, random_ids, tiny_model  # noqa: E402

import patchattn  # noqa: E402
from patchattn.kernels.dhsa import (  # noqa: E402
    DhsaSettings,
    dhsa_attention,
    expected_density,
    naive,
    select_blocks,
    selection_density,
)
from patchattn.kernels.dhsa.gathered import gathered_attention  # noqa: E402
from patchattn.kernels.dhsa.ops import KernelConfig, block_sparse_attention  # noqa: E402
from patchattn.kernels.dhsa.select import chunk_scores, structure  # noqa: E402


def qkv(b, h, hk, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, x, n, d, generator=g).to(DEV, dtype) for x in (h, hk, hk)]


def padding(b, n, holes):
    """``key_valid`` with ``holes = {row: (lo, hi)}`` marked invalid."""
    valid = torch.ones(b, n, dtype=torch.bool)
    for row, (lo, hi) in holes.items():
        valid[row, lo:hi] = False
    return valid.to(DEV)


SELECTIONS = {
    "window+budget+sinks": DhsaSettings(chunk_size=16, query_block=32, budget_tokens=64, local_window=40,
                                        sink_tokens=64),
    "sinks, no window": DhsaSettings(chunk_size=16, query_block=16, budget_tokens=48, local_window=0, sink_tokens=5),
    "fraction+wide sinks": DhsaSettings(chunk_size=32, query_block=32, budget_tokens=0, budget_fraction=0.3,
                                        local_window=20, sink_tokens=40),
    "block > chunk, budget not whole": DhsaSettings(chunk_size=16, query_block=64, budget_tokens=40,
                                                    local_window=17, sink_tokens=0),
    "chunk > block": DhsaSettings(chunk_size=32, query_block=16, budget_tokens=64, local_window=8, sink_tokens=0),
}


# ---------------------------------------------------------------------------------------------------- selection

@pytest.mark.parametrize("name", sorted(SELECTIONS))
@pytest.mark.parametrize("padded", [False, True])
def test_selection_matches_token_level_reference(name, padded):
    """Chunk-level top-k over lists == the paper's upsampled token scores with a per-block top-budget."""
    st = SELECTIONS[name]
    q, k, _ = qkv(2, 4, 2, 301, 16)
    valid = padding(2, 301, {1: (0, 37)}) if padded else None
    ref = naive.reference_keep_mask(q, k, st, valid)
    sel = select_blocks(q, k, st, valid)
    rows = valid if padded else torch.ones(2, 301, dtype=torch.bool, device=DEV)  # padded queries: any tie order
    assert torch.equal(sel.keep_rows(0, 301, valid).transpose(1, 2)[rows], ref.transpose(1, 2)[rows])


@pytest.mark.parametrize("max_scores", [1, 5000])
def test_selection_in_slices_of_query_blocks_is_the_same(max_scores):
    """Bounded score slices (one query block at a time, or a few): the same lists as one whole matrix."""
    st = DhsaSettings(chunk_size=16, query_block=32, budget_tokens=80, local_window=50, sink_tokens=20)
    q, k, _ = qkv(2, 6, 2, 333, 32, seed=5)
    whole = select_blocks(q, k, st, max_scores=1 << 40)
    sliced = select_blocks(q, k, st, max_scores=max_scores)
    for name in ("idx", "cnt", "nfull"):
        assert torch.equal(getattr(sliced, name), getattr(whole, name))


def test_selection_guarantees():
    """Causal; own chunks, window and sinks always kept; exactly min(budget, candidates) picks per block, and
    they are the best-scoring candidates; sorted unique lists; density as predicted from the settings."""
    st = DhsaSettings(chunk_size=16, query_block=32, budget_tokens=80, local_window=50, sink_tokens=20)
    n, C, B = 333, 16, 32
    q, k, _ = qkv(2, 6, 2, n, 32, seed=4)
    sel = select_blocks(q, k, st)
    keep = sel.keep_rows(0, n)
    pos = torch.arange(n, device=DEV)
    causal = pos[None, :] <= pos[:, None]
    assert not (keep & ~causal).any()
    blk_start = (pos // B) * B
    window = (pos[None, :] >= (blk_start[:, None] - st.local_window)) & causal
    sinks = (pos[None, :] < st.sink_tokens) & causal
    assert keep[:, :, window].all() and keep[:, :, sinks].all()
    assert (keep[:, :, causal & (pos[None, :] > pos[:, None] - st.local_window)]).all()  # token window, too

    s = structure(n, st, DEV)
    idx, cnt = sel.idx.long(), sel.cnt.long()
    valid = torch.arange(idx.shape[-1], device=DEV) < cnt[..., None]
    assert (idx[..., 1:][valid[..., 1:]] > idx[..., :-1][valid[..., 1:]]).all(), "lists must be ascending, unique"
    before = valid & ((idx + 1) * C <= s.start[:, None])  # chunks the kernel walks without the causal mask
    lead = torch.arange(idx.shape[-1], device=DEV) < sel.nfull.long()[..., None]
    assert torch.equal(before, lead & valid)
    forced = (idx < s.sinks[:, None]) | (idx >= s.win_lo[:, None])
    picks = (valid & ~forced).sum(-1)
    assert torch.equal(picks, torch.minimum(s.budget, s.candidates).expand_as(picks))
    assert (picks > 0).any() and (picks < s.candidates).any(), "the case must exercise a binding budget"
    scores = chunk_scores(q, k, st)
    cm = sel.chunk_mask()
    nc = scores.shape[-1]
    chunks = torch.arange(nc, device=DEV)
    cand = (chunks >= -(-st.sink_tokens // C)) & (chunks[None, :] < s.win_lo[:, None])
    worst_pick = torch.where(cm & cand, scores, float("inf")).amin(-1)
    best_left = torch.where(~cm & cand, scores, float("-inf")).amax(-1)
    assert (worst_pick >= best_left).all()
    assert selection_density(sel) == pytest.approx(expected_density(n, st), rel=1e-9)
    assert selection_density(sel) == pytest.approx((keep.sum((-1, -2)).double().mean() / causal.sum()).item())


def _lists(sel):
    """Each block's kept chunks as a comparable tensor: entries past ``cnt`` set to -1, width trimmed to the most."""
    width = int(sel.cnt.max())
    idx = sel.idx[..., :width].long()
    return torch.where(torch.arange(width, device=idx.device) < sel.cnt[..., None].long(), idx, -1)


@pytest.mark.parametrize("name", sorted(SELECTIONS))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("max_scores", [1 << 40, 700])
def test_triton_pick_matches_torch_pick(name, padded, max_scores):
    """The one-kernel pick (triton_select) and the topk/sort path give the same lists, counts and nfull, also in
    bounded slices of query blocks (``max_scores``: the kernel then fills rows from an offset)."""
    st = SELECTIONS[name]
    q, k, _ = qkv(2, 4, 2, 301, 16, seed=3)
    valid = padding(2, 301, {1: (0, 37)}) if padded else None
    ref = select_blocks(q, k, st, valid, picker="torch")
    got = select_blocks(q, k, st, valid, picker="triton", max_scores=max_scores)
    assert torch.equal(got.cnt, ref.cnt) and torch.equal(got.nfull, ref.nfull)
    assert torch.equal(_lists(got), _lists(ref))


def test_triton_pick_widest_rows():
    """8192 chunks per row (the most the kernel holds: 512k tokens at 64-token chunks), one row per program."""
    from patchattn.kernels.dhsa.triton_select import MAX_CHUNKS

    st = DhsaSettings(chunk_size=16, query_block=4096, budget_tokens=2048, local_window=256, sink_tokens=64)
    q, k, _ = qkv(1, 2, 1, MAX_CHUNKS * 16, 16, seed=2)
    ref = select_blocks(q, k, st, picker="torch")
    got = select_blocks(q, k, st, picker="triton")
    assert torch.equal(got.cnt, ref.cnt) and torch.equal(got.nfull, ref.nfull)
    assert torch.equal(_lists(got), _lists(ref))


def test_triton_pick_breaks_ties_by_lowest_chunk():
    """Identical keys give every chunk the same score: the pick is then the lowest-index candidates, exactly
    ``min(budget, candidates)`` of them (the K-th largest search must count ties, not skip them)."""
    st = DhsaSettings(chunk_size=16, query_block=16, budget_tokens=48, local_window=16, sink_tokens=16)
    n = 400
    q, _, _ = qkv(1, 2, 1, n, 16, seed=1)
    k = torch.ones(1, 1, n, 16, device=DEV)
    sel = select_blocks(q, k, st, picker="triton")
    s = structure(n, st, DEV)
    sinks, picks = s.sinks, torch.minimum(s.budget, s.candidates)
    for blk in range(s.start.shape[0]):
        row = sel.idx[0, 0, blk, : int(sel.cnt[0, 0, blk])].tolist()
        first = int(sinks[blk])
        want = list(range(first)) + list(range(first, first + int(picks[blk])))
        want += list(range(int(s.win_lo[blk]), int(s.win_hi[blk]) + 1))
        assert row == want, blk


def test_picker_is_validated():
    q, k, _ = qkv(1, 2, 1, 64, 16)
    with pytest.raises(ValueError, match="picker"):
        select_blocks(q, k, DhsaSettings(chunk_size=16, query_block=16), picker="fast")


def test_budget_fraction_grows_with_the_prefix():
    st = DhsaSettings(chunk_size=16, query_block=16, budget_tokens=0, budget_fraction=0.25, local_window=0,
                      sink_tokens=0)
    s = structure(640, st)
    assert torch.equal(s.budget, (0.25 * s.end.double()).floor().long() // 16)
    assert expected_density(640, st) == pytest.approx(0.25, abs=0.05)
    full = DhsaSettings(chunk_size=16, query_block=16, budget_tokens=0, budget_fraction=1.0, local_window=0)
    assert expected_density(640, full) == 1.0


# ---------------------------------------------------------------------------------------------------- kernel

KERNEL_CASES = {
    # name: (b, h, hk, n, d, dtype, settings, config, padding holes)
    "fp32 gqa odd n": (2, 4, 2, 201, 16, torch.float32, SELECTIONS["window+budget+sinks"], KernelConfig(32, 16, 4, 1),
                       None),
    "fp16 gqa padding hole": (2, 2, 1, 203, 32, torch.float16, SELECTIONS["sinks, no window"],
                              KernelConfig(16, 16, 4, 1), {0: (0, 29), 1: (40, 90)}),
    "fp32 several tiles per block and chunk": (1, 2, 2, 250, 16, torch.float32,
                                               DhsaSettings(chunk_size=64, query_block=64, budget_tokens=64,
                                                            local_window=30, sink_tokens=0),
                                               KernelConfig(32, 16, 4, 1), None),
    "fp16 chunk > block, d64": (1, 2, 1, 160, 64, torch.float16, SELECTIONS["chunk > block"],
                                KernelConfig(64, 32, 4, 1), None),
}


@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_kernel_matches_masked_attention(name):
    b, h, hk, n, d, dtype, st, cfg, holes = KERNEL_CASES[name]
    q, k, v = qkv(b, h, hk, n, d, dtype, seed=7)
    valid = padding(b, n, holes) if holes else None
    sel = select_blocks(q, k, st, valid)
    keep = sel.keep_rows(0, n, valid)
    out, lse = block_sparse_attention(q, k, v, sel, 0.3, key_valid=valid, config=cfg)
    ref, ref_lse = naive.masked_attention(q, k, v, 0.3, lambda r0, r1: keep[:, :, r0:r1])
    assert out.dtype == dtype and lse.dtype == torch.float32
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), "rows without a kept key must agree (lse -inf)"
    if holes and 0 in holes and holes[0][0] == 0:
        assert not fin[0, :, : holes[0][1]].any() and (out[0, :, : holes[0][1]] == 0).all()
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(out[fin.unsqueeze(-1).expand_as(out)], ref[fin.unsqueeze(-1).expand_as(ref)]) < tol
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["window+budget+sinks", "block > chunk, budget not whole", "chunk > block"])
def test_gathered_torch_path_matches_masked_attention(name):
    """The PyTorch block-sparse path (CPU, softcap): several query-block groups, GQA, padding, softcap."""
    st = SELECTIONS[name]
    q, k, v = qkv(2, 4, 2, 301, 16, seed=2)
    valid = padding(2, 301, {0: (0, 20), 1: (100, 150)})
    sel = select_blocks(q, k, st, valid)
    for softcap in (None, 2.0):
        out, lse = gathered_attention(q, k, v, sel, 0.3, key_valid=valid, softcap=softcap, step_bytes=2**20)
        ref, ref_lse = naive.masked_attention(q, k, v, 0.3, lambda r0, r1: sel.keep_rows(r0, r1, valid),
                                              softcap=softcap)
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin) and torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-5 and (lse[fin] - ref_lse[fin]).abs().max().item() < 1e-4


def test_gradients_flow_through_the_torch_path():
    """With gradients needed the dispatcher takes the PyTorch path (the kernel is forward-only): same gradients as
    autograd through masked exact attention over the same kept set."""
    q, k, v = qkv(1, 4, 2, 150, 16, seed=6)
    st = DhsaSettings(chunk_size=16, query_block=16, budget_tokens=32, local_window=16, sink_tokens=16)
    sel = select_blocks(q, k, st)
    grads = []
    for run in ("dhsa", "reference"):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        if run == "dhsa":
            out, _ = dhsa_attention(*x, 0.3, st)
        else:
            out, _ = naive.masked_attention(*x, 0.3, lambda r0, r1: sel.keep_rows(r0, r1))
        (out * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
        grads.append([t.grad for t in x])
    for got, ref in zip(*grads):
        assert rel_err(got, ref) < 1e-5


def test_full_budget_is_exact_attention():
    """Budget covering every chunk: both the reference path and the kernel are exact causal attention."""
    q, k, v = qkv(1, 4, 2, 200, 16, seed=3)
    st = DhsaSettings(chunk_size=16, query_block=32, budget_tokens=256, local_window=0)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out, _, sel = dhsa_attention(q, k, v, None, st, return_selection=True)
    assert selection_density(sel) == 1.0
    assert rel_err(out, exact) < 1e-5
    out_k, _ = block_sparse_attention(q, k, v, sel, 16**-0.5, config=KernelConfig(32, 16, 4, 1))
    assert rel_err(out_k, exact) < 1e-5


def test_dispatch_and_errors():
    q, k, v = qkv(1, 2, 1, 70, 16)
    st = DhsaSettings(chunk_size=16, query_block=16, budget_tokens=16, local_window=16)
    capped, _ = dhsa_attention(q, k, v, 0.25, st, softcap=3.0)  # softcap: the PyTorch path, also on CUDA
    ref, _ = naive.dhsa_attention(q, k, v, 0.25, st, softcap=3.0)
    assert rel_err(capped, ref) < 1e-6
    assert rel_err(capped, dhsa_attention(q, k, v, 0.25, st)[0]) > 1e-3, "softcap must change the output"
    with pytest.raises(ValueError, match="same length"):
        dhsa_attention(q[:, :, :10], k, v, 0.25, st)
    with pytest.raises(ValueError, match="power-of-two"):
        block_sparse_attention(q, k, v, select_blocks(q, k, DhsaSettings(chunk_size=24, query_block=16)), 0.25)
    with pytest.raises(ValueError, match="budget_fraction"):
        DhsaSettings(budget_fraction=2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_bf16_kernel(d):
    q, k, v = qkv(2, 8, 2, 3000, d, torch.bfloat16)
    st = DhsaSettings(chunk_size=64, query_block=64, budget_tokens=512, local_window=128, sink_tokens=64)
    valid = padding(2, 3000, {1: (0, 111)})
    out, _ = dhsa_attention(q, k, v, None, st, key_valid=valid)
    sel = select_blocks(q, k, st, valid)
    ref, _ = naive.masked_attention(q, k, v, d**-0.5, lambda r0, r1: sel.keep_rows(r0, r1, valid))
    assert rel_err(out[:, :, 111:], ref[:, :, 111:]) < 1e-2


# ---------------------------------------------------------------------------------------------------- variant

FULL = dict(min_seq_len=16, chunk_size=16, query_block=16, budget_tokens=4096, local_window=0)
APPROX = dict(min_seq_len=16, chunk_size=16, query_block=16, budget_tokens=16, local_window=16, sink_tokens=16,
              exact_tail=0)


def tokens(batch=2, n=80, seed=1):
    return random_ids(batch, n, seed)


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "gemma3", "qwen3"])
def test_variant_full_budget_equals_exact_and_real_budget_differs(family):
    model = tiny_model(family)
    ids = tokens()
    ref = logits(model, ids)
    patchattn.patch_model(model, "dhsa", **FULL)
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-4, rtol=0)
    patchattn.unpatch_model(model)
    patchattn.patch_model(model, "dhsa", **APPROX)
    out = logits(model, ids)
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4, "dhsa did not run"


def test_generate_prefill_sparse_decode_exact(monkeypatch):
    import patchattn.variants.dhsa as variant

    calls = []
    real = variant.dhsa_attention
    monkeypatch.setattr(variant, "dhsa_attention", lambda q, *a, **kw: calls.append(q.shape[2]) or real(q, *a, **kw))
    model = tiny_model("llama")
    prompt = tokens(1, 70)
    ref = model.generate(prompt, max_new_tokens=6, do_sample=False)
    patchattn.patch_model(model, "dhsa", layers="last:2", **FULL)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), ref)
    assert calls == [70, 70], "prefill of both patched layers sparse, every decode step exact"
    patchattn.unpatch_model(model)
    patchattn.patch_model(model, "dhsa", **APPROX)
    calls.clear()
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == ref.shape and calls == [70] * 4


def test_left_padded_batched_generate():
    model = tiny_model("qwen3")
    ids = tokens(3, 60, seed=2)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 9, 23]):
        ids[row, :pad], mask[row, :pad] = 0, 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    patchattn.patch_model(model, "dhsa", **FULL)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), ref)


def test_fallbacks_are_exact_and_logged(monkeypatch, caplog):
    import patchattn.logging_utils as lu
    from patchattn.attention import exact_attention

    monkeypatch.setattr(lu, "_seen", set())
    mistral = tiny_model("mistral")  # window 24 on every layer: dhsa must not run there
    ref = logits(mistral, tokens())
    patchattn.patch_model(mistral, "dhsa", **APPROX)
    with caplog.at_level(logging.WARNING, logger="patchattn"):
        torch.testing.assert_close(logits(mistral, tokens()), ref, atol=1e-5, rtol=0)
    assert sum("sliding-window" in r.message for r in caplog.records) == 1

    # chunked prefill (30 new queries over a 70-key cache) reaches the variant as q_len != k_len
    model = patchattn.patch_model(tiny_model("llama"), "dhsa", **APPROX)
    module = model.model.layers[0].self_attn
    q, k, v = qkv(1, 4, 2, 70, 16, seed=5)
    q = q[:, :, 40:]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="patchattn"):
        out, _ = module.patchattn_layer.attention(module, q, k, v, None, scaling=0.25)
    ref, _ = exact_attention(module, q, k, v, None, scaling=0.25)
    assert sum("chunked prefill" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny_model("gemma3")
    patchattn.patch_model(model, "dhsa", layers=[1, 3], **APPROX)  # gemma3's global layers
    ref = logits(model, tokens())
    model.save_pretrained(tmp_path)
    loaded = patchattn.from_pretrained(str(tmp_path))
    assert loaded.config.patchattn[0]["variant"] == "dhsa"
    assert loaded.config.patchattn[0]["params"] == model.config.patchattn[0]["params"]
    torch.testing.assert_close(logits(loaded, tokens()), ref, atol=0, rtol=0)


@pytest.mark.parametrize("params, match", [
    (dict(chunk_size=48), r"dhsa: parameter 'chunk_size' must be one of \[16, 32"),
    (dict(query_block=8), r"'query_block' must be one of"),
    (dict(budget_fraction=1.5), r"'budget_fraction' must be in \[0.0, 1.0\]"),
    (dict(budget_tokens=-1), r"'budget_tokens' must be in \[0,"),
    (dict(window=3), r"unknown parameter\(s\) \['window'\]"),
])
def test_parameters_are_validated(params, match):
    with pytest.raises(ValueError, match=match):
        patchattn.patch_model(tiny_model("llama"), "dhsa", **params)

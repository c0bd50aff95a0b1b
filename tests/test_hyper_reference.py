"""Statistics and exactness of the HyperAttention PyTorch reference (kernels/hyper/naive.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import rel_err

from patchattn.kernels.hyper.naive import HyperSettings, gray_rank, hyper_attention, lsh_projections, lsh_rank


def qkv(b=2, h=4, hk=2, n=600, d=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, x, n, d, generator=g, dtype=dtype) for x in (h, hk, hk)]


def exact(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                          is_causal=mask is None, enable_gqa=True).float()


def test_gray_rank_neighbours_differ_in_one_bit():
    r = 6
    codes = torch.arange(2**r)
    bits = ((codes[:, None] >> torch.arange(r)) & 1).bool()
    rank = gray_rank(bits)
    assert sorted(rank.tolist()) == list(range(2**r)), "rank must be a bijection"
    by_rank = codes[torch.argsort(rank)]
    flips = [bin(int(a) ^ int(b)).count("1") for a, b in zip(by_rank[:-1], by_rank[1:])]
    assert flips == [1] * (2**r - 1)


def test_lsh_is_angular_and_seeded():
    x = torch.randn(50, 16)
    p = lsh_projections(16, 7, seed=3, device="cpu")
    assert torch.equal(p, lsh_projections(16, 7, seed=3, device="cpu"))
    assert torch.equal(lsh_rank(x, p), lsh_rank(3.7 * x, p)), "scaling a vector must not change its bucket"


@pytest.mark.parametrize("n", [600, 513])
def test_full_budget_equals_exact(n):
    q, k, v = qkv(n=n)
    for settings in (HyperSettings(min_seq_len=n), HyperSettings(min_seq_len=64, block_size=n)):
        out, _ = hyper_attention(q, k, v, settings=settings)
        torch.testing.assert_close(out, exact(q, k, v), atol=2e-5, rtol=0)


def test_error_shrinks_as_budget_grows():
    q, k, v = qkv(n=1024, d=32)
    ref = exact(q, k, v)
    errs = []
    for budget in (16, 64, 256):
        out, _ = hyper_attention(q, k, v, settings=HyperSettings(min_seq_len=128, block_size=budget,
                                                                 sample_size=budget))
        errs.append(rel_err(out, ref))
    assert errs[0] > errs[1] > errs[2], errs


def test_lse_is_the_estimated_normaliser():
    q, k, v = qkv(n=600)
    _, lse = hyper_attention(q, k, v, settings=HyperSettings(min_seq_len=600))
    s = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(600, 600, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-4, rtol=0)


def test_padding_is_exact():
    """Left-padded keys never count: changing their content changes nothing for valid queries."""
    q, k, v = qkv(n=500)
    valid = torch.ones(2, 500, dtype=torch.bool)
    valid[1, :77] = False
    settings = HyperSettings(min_seq_len=64, block_size=48, sample_size=32)
    out1, _ = hyper_attention(q, k, v, settings=settings, key_valid=valid)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :77] = 100 * torch.randn_like(k2[1, :, :77])
    v2[1, :, :77] = 1e4
    out2, _ = hyper_attention(q, k2, v2, settings=settings, key_valid=valid)
    assert torch.isfinite(out1).all()
    torch.testing.assert_close(out1[1, :, 77:], out2[1, :, 77:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out1[0], out2[0])
    # with full budget, padded == exact attention under the padding mask
    full, _ = hyper_attention(q, k, v, settings=HyperSettings(min_seq_len=64, block_size=500), key_valid=valid)
    mask = torch.ones(500, 500, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    torch.testing.assert_close(full[1, :, 77:], exact(q, k, v, mask)[1, :, 77:], atol=2e-5, rtol=0)


def test_gqa_keys_hashed_once_per_kv_head():
    """Query heads of one group share the key sort: a group of identical query heads gives identical outputs,
    and GQA with full budget equals exact GQA attention without expanding K/V."""
    q, k, v = qkv(h=4, hk=2, n=400)
    q[:, 1] = q[:, 0]
    out, _ = hyper_attention(q, k, v, settings=HyperSettings(min_seq_len=64, block_size=32, sample_size=16))
    torch.testing.assert_close(out[:, 1], out[:, 0], atol=0, rtol=0)


def test_softcap_is_applied_in_every_part():
    q, k, v = qkv(n=300)
    q = q * 4
    out, _ = hyper_attention(q, k, v, settings=HyperSettings(min_seq_len=32, block_size=300), softcap=5.0)
    s = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = torch.tanh(s / 5.0) * 5.0
    s = s.masked_fill(torch.ones(300, 300, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(s, -1) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_seed_reproducible_and_matters():
    q, k, v = qkv(n=500)
    s0 = HyperSettings(min_seq_len=64, block_size=32, sample_size=16, seed=0)
    a, _ = hyper_attention(q, k, v, settings=s0)
    b, _ = hyper_attention(q, k, v, settings=s0)
    c, _ = hyper_attention(q, k, v, settings=HyperSettings(min_seq_len=64, block_size=32, sample_size=16, seed=1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("levers", [dict(sink_tokens=4), dict(local_window=40), dict(sink_tokens=3, local_window=33),
                                    dict(center_keys=True)])
def test_levers_keep_full_budget_exact(levers):
    q, k, v = qkv(n=515)
    for settings in (HyperSettings(min_seq_len=515, **levers), HyperSettings(min_seq_len=64, block_size=515, **levers)):
        out, _ = hyper_attention(q, k, v, settings=settings)
        torch.testing.assert_close(out, exact(q, k, v), atol=2e-5, rtol=0)


def test_window_covering_everything_is_exact():
    q, k, v = qkv(n=300)
    settings = HyperSettings(min_seq_len=32, block_size=16, sample_size=8, local_window=300)
    out, _ = hyper_attention(q, k, v, settings=settings)
    torch.testing.assert_close(out, exact(q, k, v), atol=2e-5, rtol=0)


def test_sinks_and_window_are_exact_with_padding():
    q, k, v = qkv(n=400)
    valid = torch.ones(2, 400, dtype=torch.bool)
    valid[0, :50] = False
    settings = HyperSettings(min_seq_len=32, block_size=400, sample_size=8, sink_tokens=5, local_window=24)
    out, _ = hyper_attention(q, k, v, settings=settings, key_valid=valid)
    mask = torch.ones(400, 400, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    torch.testing.assert_close(out[0, :, 50:], exact(q, k, v, mask)[0, :, 50:], atol=2e-5, rtol=0)
    torch.testing.assert_close(out[1], exact(q, k, v)[1], atol=2e-5, rtol=0)

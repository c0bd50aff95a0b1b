"""Triton HyperAttention kernels against the PyTorch reference (kernels/hyper/naive.py).

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32/fp16: the interpreter's
bf16 arithmetic is broken) at tiny sizes; with CUDA the same cases run compiled, plus the ``gpu`` cases in bf16.
The reference is fed the same seeded projections and samples (the kernels call its helpers), so outputs agree to
rounding: forward relative error <= 1e-3, gradients against autograd through the reference.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_helpers import DEV, gpu, needs_cuda, rel_err  # noqa: E402

from patchattn.kernels.hyper import HyperSettings, exact_is_faster, hyper_attention, naive  # noqa: E402
from patchattn.kernels.hyper.ops import hyper_attention_triton  # noqa: E402


def make(b, h, hk, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, x, n, d, generator=g).to(DEV, dtype) for x in (h, hk, hk)]


def reference(q, k, v, settings, causal, key_valid, dout, dlse):
    """fp32 reference output, lse and gradients (autograd through naive.py)."""
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    o, lse = naive.hyper_attention(qr, kr, vr, None, settings, causal=causal, key_valid=key_valid)
    fin = torch.isfinite(lse)
    ((o * dout.float()).sum() + (torch.where(fin, lse, 0) * dlse).sum()).backward()
    return o, lse, qr.grad, kr.grad, vr.grad


def check(b, h, hk, n, d, dtype, settings, causal=True, pad=None, fwd_tol=1e-3, bwd_tol=1e-3, **kw):
    q, k, v = make(b, h, hk, n, d, dtype)
    key_valid = None
    if pad is not None:
        key_valid = torch.ones(b, n, dtype=torch.bool)
        for bi, (lo, hi) in pad.items():
            key_valid[bi, lo:hi] = False
        key_valid = key_valid.to(DEV)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = hyper_attention_triton(qs, ks, vs, settings=settings, causal=causal, key_valid=key_valid, **kw)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(DEV, dtype)
    dlse = torch.randn(lse.shape, generator=g).to(DEV)
    fin = torch.isfinite(lse)
    ((out.float() * dout.float()).sum() + (torch.where(fin, lse, 0) * dlse).sum()).backward()
    ro, rl, rdq, rdk, rdv = reference(q, k, v, settings, causal, key_valid, dout, dlse)
    assert torch.equal(fin, torch.isfinite(rl)), "rows without any visible key must agree"
    assert torch.isfinite(out).all()
    errs = dict(out=rel_err(out, ro), lse=rel_err(lse[fin], rl[fin]), dq=rel_err(qs.grad, rdq),
                dk=rel_err(ks.grad, rdk), dv=rel_err(vs.grad, rdv))
    assert errs["out"] <= fwd_tol and errs["lse"] <= 1e-5, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) <= bwd_tol, errs
    return errs


SMALL = HyperSettings(lsh_num_projs=4, block_size=32, sample_size=16, min_seq_len=64, seed=3)


def test_causal_fp32_gqa_batch():
    """GQA 4/2, batch 2, n not a multiple of the block, three levels of recursion, gradient through the lse."""
    check(2, 4, 2, 300, 16, torch.float32, SMALL, bwd_tol=1e-4)


def test_causal_fp16_key_padding():
    """Left padding on one sequence, a hole in the other (rows that see no key at all stay at -inf / 0)."""
    check(2, 4, 2, 437, 16, torch.float16, SMALL, pad={0: (100, 130), 1: (0, 77)}, bwd_tol=2e-3)


def test_noncausal_fp32_padding_d32():
    check(2, 2, 1, 203, 32, torch.float32, HyperSettings(lsh_num_projs=5, block_size=48, sample_size=24, seed=1),
          causal=False, pad={1: (150, 203)}, bwd_tol=1e-4)


LEVERS = HyperSettings(lsh_num_projs=4, block_size=32, sample_size=16, min_seq_len=64, seed=3, sink_tokens=5,
                       local_window=20)


def test_levers_fp32_gqa_padding():
    """Sinks + local window (exact set excluded from blocks and samples, added in the leaf pass), GQA, a hole in
    one sequence that covers some sinks' window, fwd + bwd through the lse."""
    check(2, 4, 2, 300, 16, torch.float32, LEVERS, pad={0: (2, 4), 1: (70, 90)}, bwd_tol=1e-4)


def test_levers_fp16_wide_window_centred():
    """Window longer than a leaf (the band reaches into earlier leaves), more sinks than one key tile row,
    centred-key hashing, left padding, fp16."""
    s = HyperSettings(lsh_num_projs=4, block_size=32, sample_size=16, min_seq_len=48, seed=5, sink_tokens=9,
                      local_window=61, center_keys=True)
    check(1, 2, 1, 260, 16, torch.float16, s, pad={0: (0, 7)}, bwd_tol=2e-3)


def test_centre_keys_fp32_noncausal():
    check(1, 2, 1, 150, 16, torch.float32, HyperSettings(lsh_num_projs=3, block_size=32, sample_size=8,
                                                          center_keys=True, seed=2), causal=False, pad={0: (120, 150)},
          bwd_tol=1e-4)


def _cfg(d=16, **kw):
    import dataclasses

    from patchattn.kernels.hyper.ops import default_config

    return dataclasses.replace(default_config(d), **kw)


def test_backward_kv_head_chunks_int32_orders():
    """The backward's fp32 accumulators one KV head of one row at a time (zero budget), int32 sort orders, with
    levers (the exact-set dK/dV kernel runs per chunk too), GQA and padding: same gradients as the reference."""
    check(2, 4, 2, 300, 16, torch.float32, LEVERS, pad={0: (2, 4), 1: (70, 90)}, bwd_tol=1e-4,
          config=_cfg(acc_budget_mb=0, qperm16=False))


def test_forward_sample_chunks_int16_key_orders():
    """The forward's sample buffers gathered one KV head of one row at a time (zero budget) and int16 key sort
    orders, with levers, GQA and padding: same outputs and gradients as the reference."""
    check(2, 4, 2, 300, 16, torch.float32, LEVERS, pad={0: (2, 4), 1: (70, 90)}, bwd_tol=1e-4,
          config=_cfg(sample_budget_mb=0, kperm16=True))


def test_backward_row_chunks_noncausal():
    """Non-causal (no exact leaves: the chunk accumulators are copied out) with one batch row per chunk."""
    check(2, 2, 1, 203, 32, torch.float32, HyperSettings(lsh_num_projs=5, block_size=48, sample_size=24, seed=1),
          causal=False, pad={1: (150, 203)}, bwd_tol=1e-4, config=_cfg(acc_budget_mb=0.1))


def test_exact_corner_cases():
    """Below min_seq_len the op is exact causal attention; a block covering every node is exact too."""
    q, k, v = make(1, 2, 2, 90, 16, torch.float32)
    exact = naive.exact_attention_lse(q.reshape(1, 2, 1, 90, 16), k, v, 0.25, causal=True)[0].reshape(q.shape)
    for settings in (HyperSettings(min_seq_len=128), HyperSettings(block_size=128, sample_size=8, min_seq_len=16)):
        out, _ = hyper_attention_triton(q, k, v, settings=settings)
        assert rel_err(out, exact) < 1e-5


def test_dispatch_and_crossover():
    q, k, v = make(1, 2, 1, 40, 16, torch.float32)
    s = HyperSettings(min_seq_len=16, block_size=8, sample_size=4)
    ref, _ = naive.hyper_attention(q, k, v, settings=s)
    out, _ = hyper_attention(q, k, v, settings=s)  # CPU tensors (or the reference) -> same numbers
    assert rel_err(out, ref) < 1e-5
    capped, _ = hyper_attention(q, k, v, settings=s, softcap=5.0)  # softcap always takes the reference
    assert torch.equal(capped, naive.hyper_attention(q, k, v, settings=s, softcap=5.0)[0])
    assert exact_is_faster(1024, 128, "cuda") and not exact_is_faster(131072, 128, "cuda")
    # inference: the forward alone wins from shorter prompts than training does (d=256: ~12k vs ~32k)
    assert exact_is_faster(16384, 256, "cuda") and not exact_is_faster(16384, 256, "cuda", backward=False)
    assert not exact_is_faster(1024, 128, "cpu")
    from patchattn.kernels.hyper.plan import settings_supported

    assert settings_supported(HyperSettings(sink_tokens=16, local_window=112, center_keys=True))
    with pytest.raises(ValueError):
        hyper_attention_triton(q, k, v, settings=HyperSettings(sink_tokens=4), causal=False)


def test_deterministic_mode_is_told_of_the_atomic_backward():
    """The sampled keys' dK/dV adds floats atomically: under torch.use_deterministic_algorithms(True) the backward
    raises (before any work) naming the op, and with warn_only=True it warns and gives the usual gradients."""
    q, k, v = make(1, 2, 2, 200, 16, torch.float32)

    def fresh():
        return [x.clone().requires_grad_() for x in (q, k, v)]

    def backward(leaves, **deterministic):
        out, _ = hyper_attention_triton(*leaves, settings=SMALL)
        before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        try:
            if deterministic:
                torch.use_deterministic_algorithms(True, **deterministic)
            out.square().sum().backward()
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        return [x.grad for x in leaves]

    usual = backward(fresh())
    leaves = fresh()
    with pytest.raises(RuntimeError, match="HyperAttention's Triton backward adds floats atomically"):
        backward(leaves, warn_only=False)
    assert all(x.grad is None for x in leaves)
    with pytest.warns(UserWarning, match="warn_only=True"):
        warned = backward(fresh(), warn_only=True)
    for a, b in zip(warned, usual):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_bf16_against_reference(d):
    settings = HyperSettings(block_size=64, sample_size=64, min_seq_len=256)
    errs = check(2, 8, 2, 1500, d, torch.bfloat16, settings, pad={1: (0, 111)}, fwd_tol=1e-2, bwd_tol=2e-2)
    print(d, errs)


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_bf16_levers(d):
    settings = HyperSettings(block_size=64, sample_size=32, min_seq_len=256, sink_tokens=16, local_window=112,
                             center_keys=d == 64)
    errs = check(2, 8, 2, 1500, d, torch.bfloat16, settings, pad={1: (0, 111)}, fwd_tol=1e-2, bwd_tol=2e-2)
    print(d, errs)


@gpu
@needs_cuda
def test_gpu_levers_mha_long():
    """The recommended levers at the default estimator settings, MHA without padding (cuDNN would take the
    leaves without levers), fp16, three leaves."""
    settings = HyperSettings(sample_size=128, sink_tokens=16, local_window=112)
    check(1, 4, 4, 12000, 128, torch.float16, settings, fwd_tol=2e-3, bwd_tol=5e-3)


@gpu
@needs_cuda
def test_gpu_fp16_default_settings_long():
    settings = HyperSettings()
    check(1, 4, 2, 9000, 128, torch.float16, settings, fwd_tol=2e-3, bwd_tol=5e-3)


@gpu
@needs_cuda
def test_gpu_cudnn_leaves_mha():
    """MHA without padding: the exact leaves come from cuDNN SDPA (diag_impl='cudnn'), the rest from Triton."""
    settings = HyperSettings(block_size=64, sample_size=64, min_seq_len=512)
    check(2, 4, 4, 4096, 128, torch.bfloat16, settings, fwd_tol=1e-2, bwd_tol=2e-2, diag_impl="cudnn")


@gpu
@needs_cuda
@pytest.mark.parametrize("b, chunk_mb", [(2, 1024), (2, 20), (1, 0)])
def test_gpu_cudnn_leaves_backward(b, chunk_mb):
    """Loss on the output only (no gradient into the lse): the leaves' gradients come from cuDNN's backward fed
    the final out / lse, the levels' from Triton on top; same gradients as the reference and as Triton leaves.
    ``chunk_mb=20``: accumulator chunks of two heads of one row, cuDNN one head at a time inside them; ``0``: one
    head at a time through both."""
    settings = HyperSettings(block_size=64, sample_size=64, min_seq_len=512)
    q, k, v = make(b, 4, 4, 4096, 128, torch.bfloat16)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    grads = {}
    for diag in ("cudnn", "triton"):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out, _ = hyper_attention_triton(*xs, settings=settings, diag_impl=diag, config=_cfg(128, acc_budget_mb=chunk_mb))
        (out.float() * dout.float()).sum().backward()
        grads[diag] = [x.grad for x in xs]
    _, _, rdq, rdk, rdv = reference(q, k, v, settings, True, None, dout, torch.zeros(q.shape[:3], device=DEV))
    for got, want in zip(grads["cudnn"], (rdq, rdk, rdv)):
        assert rel_err(got, want) <= 2e-2
    for got, want in zip(grads["cudnn"], grads["triton"]):
        assert rel_err(got, want) <= 1e-2


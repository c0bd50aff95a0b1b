"""HyperAttention ops: ``naive`` is the PyTorch reference (any device); ``ops`` the Triton kernels (CUDA).

``hyper_attention`` dispatches to Triton on CUDA when the kernels cover the call (no softcap, head dim in
``SUPPORTED_HEAD_DIMS``, nq == nk, no settings the kernels do not implement) and to the reference otherwise.
``exact_is_faster`` says where exact attention beats the Triton path, so callers can fall back to SDPA.
"""
from __future__ import annotations

import torch

from .. import triton_available
from . import naive
from .naive import HyperSettings
from .plan import SUPPORTED_HEAD_DIMS

# Shortest causal length from which the Triton HyperAttention (default settings: 7 projections, block 256,
# 256 samples, min_seq_len 4096) beats cuDNN SDPA in BOTH forward and forward+backward, per head dim.
# Measured 2026-11-29 on an NVIDIA H200 (torch 2.11, triton 3.6, bf16, b=1, h=32, causal) with
# scripts/bench_hyper.py (benchmarks/results/hyper_attention*.json); speedup vs cuDNN as fwd / fwd+bwd:
#   d=128:  8192: 1.18 / 0.90   10240: 1.27 / 1.14   12288: 1.46 / 1.24   16384: 1.82 / 1.48
#   d=64:   8192: 1.08 / 0.87   10240: 0.87 / 1.09   12288: 1.01 / 1.17   16384: 1.65 / 1.42
#   d=256 (2026-12-03, benchmarks/results/hyper_attention_crossover_d256.json):
#           8192: 1.01 / 0.39   12288: 1.14 / 0.59   16384: 1.40 / 0.68   20480: 1.47 / 0.90
#           24576: 1.73 / 0.98   32768: 2.15 / 1.17  (the forward alone wins from ~12k; training only past 24k)
# At or below min_seq_len the estimator *is* exact causal attention, so SDPA is always the right call there.
CROSSOVER_N = {64: 16384, 128: 10240, 256: 32768}
# The same for the forward alone (inference: no graph kept), from the same measurements: the shortest length from
# which every measured forward wins (d=64 dips to 0.87 at 10240; d=128 was not measured below 8192).
FORWARD_CROSSOVER_N = {64: 12288, 128: 8192, 256: 12288}


def exact_is_faster(n: int, head_dim: int, device=None, *, backward: bool = True) -> bool:
    """True where exact attention (SDPA) is at least as fast as HyperAttention for a causal prefill of ``n``;
    ``backward``: whether a backward pass follows (training), else the forward alone is compared."""
    if device is not None and torch.device(device).type != "cuda":
        return False  # the question is only asked of the GPU path; the reference is never about speed
    table = CROSSOVER_N if backward else FORWARD_CROSSOVER_N
    key = min((d for d in table if d >= head_dim), default=max(table))
    return n < table[key]


def triton_supported(q, k, v, settings: HyperSettings, softcap=None) -> bool:
    if softcap is not None or not q.is_cuda:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1] or k.shape[-2] != q.shape[-2]:
        return False
    if not triton_available():
        return False
    from .plan import settings_supported

    return settings_supported(settings)


def hyper_attention(q, k, v, scaling=None, settings: HyperSettings = HyperSettings(), *, causal=True,
                    key_valid=None, softcap=None):
    """Same contract as ``naive.hyper_attention``: q ``[b, h, n, d]``, k/v ``[b, hk, n, d]``, ``key_valid``
    ``[b, n]`` bool or None; returns ``(out [b, h, n, d] in q's dtype, lse [b, h, n] fp32)``, differentiable."""
    if triton_supported(q, k, v, settings, softcap):
        from .ops import hyper_attention_triton

        return hyper_attention_triton(q, k, v, scaling, settings, causal=causal, key_valid=key_valid)
    return naive.hyper_attention(q, k, v, scaling, settings, causal=causal, key_valid=key_valid, softcap=softcap)


__all__ = ["HyperSettings", "hyper_attention", "exact_is_faster", "triton_supported", "SUPPORTED_HEAD_DIMS"]

"""FlashSigmoid: sigmoid attention (arXiv 2409.04431) as Triton kernels, forward and backward.

``naive`` is the PyTorch reference (any device); ``triton_fwd`` / ``triton_bwd`` the kernels (CUDA, or Triton's CPU
interpreter under ``TRITON_INTERPRET=1``); ``ops`` their launches and autograd. ``softmax_attention`` is a flash
softmax built in the same kernels, the like-for-like baseline of ``scripts/bench_sigmoid.py``.
"""
from __future__ import annotations

import torch

from .. import triton_available
from . import naive
from .limits import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS


def kernel_supports(q, k, v) -> bool:
    """Whether the Triton kernels take these tensors (head dim, dtypes; the device is the caller's choice)."""
    return (triton_available() and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and k.shape[-1] == q.shape[-1] == v.shape[-1])


def sigmoid_attention(q, k, v, *, scale: float, row_bias=None, causal: bool = True, key_start=None,
                      approx_sigmoid: bool | None = None, config=None) -> torch.Tensor:
    """FlashSigmoid: ``o = σ(q kᵀ·scale + row_bias)·v`` with the masks of ``naive.sigmoid_attention``.

    q ``[b, h, nq, d]``, k/v ``[b, hk, nk, d]`` (``h % hk == 0``, fp16/bf16/fp32, d in ``SUPPORTED_HEAD_DIMS``);
    ``row_bias``: float or ``[b, nq]`` tensor (a constant: no gradient); ``key_start``: int ``[b]`` (left padding);
    causal masks are bottom-right aligned (query i at position nk − nq + i). Returns ``[b, h, nq, d]`` in q's dtype,
    stored as ``[b, nq, h, d]`` (``.transpose(1, 2)`` is free), differentiable in q, k, v.
    ``approx_sigmoid`` (default: on for fp16/bf16 CUDA tensors) computes σ with the hardware tanh (one
    special-function op per score, ~2^-11 relative error). Raises ``ValueError`` naming the problem when the kernels
    cannot take the inputs."""
    from .ops import flash_attention

    return flash_attention(q, k, v, scale=scale, row_bias=row_bias, causal=causal, key_start=key_start,
                           sigmoid=True, approx_sigmoid=approx_sigmoid, config=config)


def softmax_attention(q, k, v, *, scale: float, causal: bool = True, key_start=None, config=None) -> torch.Tensor:
    """Flash softmax attention from the same kernels (same contract as ``sigmoid_attention``, no bias)."""
    from .ops import flash_attention

    return flash_attention(q, k, v, scale=scale, causal=causal, key_start=key_start, sigmoid=False, config=config)


__all__ = ["naive", "sigmoid_attention", "softmax_attention", "kernel_supports", "triton_available",
           "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]

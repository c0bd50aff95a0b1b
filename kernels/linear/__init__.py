"""Normalised gated linear attention: ``normalized_gla`` (prefill / training) and ``normalized_gla_step`` (decode).

    o_t = q_t S_t / (q_t · z_t + eps)      S_t = γ_t S_{t-1} + k_tᵀ v_t      z_t = γ_t z_{t-1} + k_t

(``naive.py`` is the spec.) Shapes: ``q [b, h, n, dk]``, ``k [b, hk, n, dk]``, ``v [b, hk, n, dv]`` with
``h % hk == 0`` (GQA), ``log_decay`` None or ``[b, hk, n]`` (log γ <= 0, per KV head and token, may be data
dependent: it gets a gradient), state ``(S [b, hk, dk, dv], z [b, hk, dk])`` in float32. Output in v's dtype.

Dispatch (``backend()``):
  * CUDA tensors with Triton installed -> the chunked Triton kernels (``ops.py``: forward, backward incl.
    d log_decay and d initial_state, and a fused decode step);
  * anything else (CPU) -> the chunked PyTorch implementation (``chunk.py``), differentiable through autograd.
The switch ``PATCHATTN_LINEAR_BACKEND`` (environment, read at import) or ``patchattn.kernels.linear.BACKEND``
(at call time) is ``"auto"`` (the above), ``"torch"`` (always PyTorch) or ``"triton"`` (always Triton: on CPU
tensors this only works under ``TRITON_INTERPRET=1``, Triton's CPU interpreter, which is how the tests run it).
The decode step runs the fused Triton kernel only where no gradient is needed, else the (differentiable) PyTorch
step.
"""
from __future__ import annotations

import os

import torch

from .. import triton_available
from . import chunk, naive
from .chunk import normalized_gla_chunked, normalized_gla_step_torch
from .naive import normalized_gla_recurrent

BACKEND = os.environ.get("PATCHATTN_LINEAR_BACKEND", "auto")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def backend(x: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: which implementation a call on tensors like ``x`` takes."""
    choice = BACKEND
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"BACKEND / PATCHATTN_LINEAR_BACKEND must be 'auto', 'torch' or 'triton', not {choice!r}")
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if choice == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("BACKEND='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported)")
    return choice


def _check(q, k, v, log_decay, state, *, step: bool):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [batch, heads, tokens, dim], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, n, dk = q.shape
    hk = k.shape[1]
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"token counts differ: q {n}, k {k.shape[2]}, v {v.shape[2]}")
    if step and n != 1:
        raise ValueError(f"normalized_gla_step takes one token (q [b, h, 1, dk]), got {n}")
    if k.shape[3] != dk:
        raise ValueError(f"q and k head dims differ: {dk} vs {k.shape[3]}")
    if v.shape[1] != hk:
        raise ValueError(f"k and v head counts differ: {hk} vs {v.shape[1]}")
    if hk == 0 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    dv = v.shape[3]
    if log_decay is not None:
        if not isinstance(log_decay, torch.Tensor) or tuple(log_decay.shape) != (b, hk, n):
            raise ValueError(f"log_decay must be [batch, kv_heads, tokens] = {(b, hk, n)}, got "
                             f"{tuple(log_decay.shape) if isinstance(log_decay, torch.Tensor) else log_decay}")
        if not log_decay.is_floating_point():
            raise TypeError(f"log_decay must be floating point, got {log_decay.dtype}")
        if log_decay.device != q.device:
            raise ValueError(f"log_decay is on {log_decay.device}, q on {q.device}")
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError("the state must be a pair (S [b, hk, dk, dv], z [b, hk, dk])")
        S, z = state
        if tuple(S.shape) != (b, hk, dk, dv) or tuple(z.shape) != (b, hk, dk):
            raise ValueError(f"state shapes must be S {(b, hk, dk, dv)} and z {(b, hk, dk)}, got "
                             f"{tuple(S.shape)} and {tuple(z.shape)}")
        if not (S.is_floating_point() and z.is_floating_point()):
            raise TypeError("the state (S, z) must be floating point (it is kept in float32)")
        if S.device != q.device or z.device != q.device:
            raise ValueError(f"the state is on {S.device}/{z.device}, q on {q.device}")


def normalized_gla(q, k, v, log_decay=None, *, initial_state=None, output_final_state=False, normalize=True,
                   eps=1e-6):
    """Chunked normalised gated linear attention over a whole sequence (causal by construction).

    Returns ``(o [b, h, n, dv] in v's dtype, (S, z) float32 or None)``; ``(S, z)`` (the state after the last
    token, z included even when ``normalize=False``) only with ``output_final_state``. Differentiable in q, k,
    v, log_decay and initial_state on both backends."""
    _check(q, k, v, log_decay, initial_state, step=False)
    if q.shape[2] == 0:
        raise ValueError("normalized_gla needs at least one token")
    if backend(q) == "triton":
        from .ops import normalized_gla_triton

        o, state = normalized_gla_triton(q, k, v, log_decay, initial_state=initial_state, normalize=normalize,
                                         eps=eps, output_final_state=output_final_state)
    else:
        o, state = normalized_gla_chunked(q, k, v, log_decay, initial_state=initial_state, normalize=normalize,
                                          eps=eps)
    return o, (state if output_final_state else None)


def normalized_gla_step(q, k, v, log_decay, state, *, normalize=True, eps=1e-6):
    """One decode token: ``q [b, h, 1, dk]``, ``k [b, hk, 1, dk]``, ``v [b, hk, 1, dv]``, ``log_decay [b, hk, 1]``
    or None, ``state = (S, z)`` (None = zeros). Returns ``(o [b, h, 1, dv] in v's dtype, (S', z') float32)``;
    the input state is not modified. Chaining steps equals ``normalized_gla`` over the same tokens."""
    _check(q, k, v, log_decay, state, step=True)
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, log_decay, *(state if state is not None else ())))
    if not grad and backend(q) == "triton":
        from .ops import normalized_gla_step_triton

        return normalized_gla_step_triton(q, k, v, log_decay, state, normalize=normalize, eps=eps)
    return normalized_gla_step_torch(q, k, v, log_decay, state, normalize=normalize, eps=eps)


__all__ = ["normalized_gla", "normalized_gla_step", "normalized_gla_recurrent", "normalized_gla_chunked",
           "normalized_gla_step_torch", "backend", "BACKEND", "naive", "chunk"]

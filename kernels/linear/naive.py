"""Reference (PyTorch, step by step) for normalised gated linear attention: the spec the kernels are tested against.

Shapes: ``q [b, h, n, dk]``, ``k [b, hk, n, dk]``, ``v [b, hk, n, dv]`` with ``h % hk == 0`` (GQA: the query heads
of a group read their KV head's state), ``log_decay`` None or ``[b, hk, n]`` (log γ_t ≤ 0, per KV head and token).
State per KV head: ``S [b, hk, dk, dv]`` and ``z [b, hk, dk]``, kept in float32.

    S_t = γ_t S_{t-1} + k_tᵀ v_t          z_t = γ_t z_{t-1} + k_t          (inclusive of token t)
    o_t = q_t S_t / (q_t · z_t + eps)    if normalize, else    o_t = q_t S_t

q and k are feature-mapped already (non-negative when ``normalize``: the denominator is then a positive sum). The
normaliser is the same recurrence with a value column of ones, which is how the kernels carry it.
"""
from __future__ import annotations

import torch


def normalized_gla_recurrent(q, k, v, log_decay=None, *, initial_state=None, normalize=True, eps=1e-6):
    """Token-by-token recurrence. Returns ``(o [b, h, n, dv] in v's dtype, (S, z))``."""
    b, h, n, dk = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    group = h // hk
    if initial_state is None:
        S = q.new_zeros(b, hk, dk, dv, dtype=torch.float32)
        z = q.new_zeros(b, hk, dk, dtype=torch.float32)
    else:
        S, z = (t.float().clone() for t in initial_state)
    qf = q.float().reshape(b, hk, group, n, dk)
    kf, vf = k.float(), v.float()
    out = q.new_empty(b, hk, group, n, dv, dtype=torch.float32)
    for t in range(n):
        if log_decay is not None:
            gamma = log_decay[:, :, t].float().exp()
            S = S * gamma[..., None, None]
            z = z * gamma[..., None]
        S = S + kf[:, :, t, :, None] * vf[:, :, t, None, :]
        z = z + kf[:, :, t]
        qt = qf[:, :, :, t]  # [b, hk, group, dk]
        num = torch.einsum("bgqd,bgde->bgqe", qt, S)
        if normalize:
            num = num / (torch.einsum("bgqd,bgd->bgq", qt, z)[..., None] + eps)
        out[:, :, :, t] = num
    return out.reshape(b, h, n, dv).to(v.dtype), (S, z)

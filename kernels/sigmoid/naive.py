"""Sigmoid attention in plain PyTorch: the reference the Triton FlashSigmoid kernels are tested against.

    o_i = Σ_j σ(q_i·k_j·scale + bias_i) v_j      over the keys j that query i may see

Shapes follow patchattn's GQA layout: ``q [b, h, nq, d]``, ``k``/``v`` ``[b, hk, nk, d]`` with ``h % hk == 0``
(the ``h // hk`` query heads of a group read their key/value head; K/V are never expanded). ``nq <= nk`` under
``causal``: query ``i`` sits at position ``nk - nq + i`` (a decode step or a chunk of prefill over a cache) and sees
the keys ``j <= nk - nq + i``. ``key_start [b]`` (left padding) hides the keys ``j < key_start[b]``; a query that
sees no key returns 0. ``row_bias`` is a float (the paper's constant ``-log n``) or a tensor broadcastable to
``[b, nq]`` (one bias per query, e.g. ``-log`` of the number of keys it sees).
"""
from __future__ import annotations

import torch


def visible(nq: int, nk: int, causal: bool, key_start: torch.Tensor | None, device) -> torch.Tensor | None:
    """``[b | 1, nq, nk]`` bool: which keys each query sees (None: all of them)."""
    if nq > nk and causal:
        raise ValueError(f"causal attention needs nq <= nk (queries are the last nq positions), got {nq} > {nk}")
    cols = torch.arange(nk, device=device)
    mask = None
    if causal:
        pos = torch.arange(nq, device=device) + (nk - nq)
        mask = (cols[None, :] <= pos[:, None])[None]
    if key_start is not None:
        pad = (cols[None, :] >= key_start.to(device).long()[:, None])[:, None, :]
        mask = pad if mask is None else mask & pad
    return mask


def sigmoid_attention(q, k, v, *, scale: float, row_bias=None, causal: bool = True,
                      key_start: torch.Tensor | None = None) -> torch.Tensor:
    """``[b, h, nq, d]`` in q's dtype; fp32 math, differentiable in q, k, v (and a tensor ``row_bias``)."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    qg = q.float().reshape(b, hk, h // hk, nq, d)
    s = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)) * scale  # [b, hk, g, nq, nk]
    if torch.is_tensor(row_bias):
        s = s + row_bias.float().expand(b, nq).reshape(b, 1, 1, nq, 1)
    elif row_bias is not None:
        s = s + float(row_bias)
    p = torch.sigmoid(s)
    mask = visible(nq, nk, causal, key_start, q.device)
    if mask is not None:
        p = p * mask[:, None, None]
    out = torch.matmul(p, v.float().unsqueeze(2))
    return out.reshape(b, h, nq, -1).to(q.dtype)

"""Reference for one decode step of attention over a KV cache restricted to the active heads of each sequence.

``query [b, h, 1, d]``, ``key``/``value [b, hk, n, d]`` (GQA: query head ``j`` reads KV head ``j // (h // hk)``),
``head_table [b, a]`` int: the ``a`` active query heads of each sequence. Returns ``[b, 1, h, d]`` (transformers'
attention-output layout) with zeros for the heads that are not in the table.
"""
from __future__ import annotations

import torch


def active_head_decode_reference(query, key, value, head_table, scale: float) -> torch.Tensor:
    b, h, _, d = query.shape
    group = h // key.shape[1]
    out = query.new_zeros(b, 1, h, value.shape[-1])
    for i in range(b):
        for head in head_table[i].tolist():
            k, v = key[i, head // group].float(), value[i, head // group].float()
            weights = torch.softmax(query[i, head, 0].float() @ k.T * scale, dim=-1)
            out[i, 0, head] = (weights @ v).to(out.dtype)
    return out

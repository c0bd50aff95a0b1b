"""Reference for one decode step over a ZipCache layer: the spec the fused kernel is tested against.

``query [b, h, 1, d]`` (GQA: query head ``j`` reads KV head ``j // (h // hk)``), ``blocks``: the layer's
``QuantizedBlock``s, ``keys``/``values [b, hk, m, d]``: its full-precision tokens (sinks + recent buffer). Every
block is dequantised as stored (salient first: with every key visible the order does not matter) in float32, and
attention is a plain softmax over all keys. Returns ``[b, 1, h, d]`` (transformers' attention-output layout) in the
query's dtype.
"""
from __future__ import annotations

import torch


def quantized_decode_attention_reference(query, blocks, keys, values, *, scaling: float,
                                         softcap: float | None = None) -> torch.Tensor:
    parts = [block.dequantize(torch.float32, in_order=False) for block in blocks]
    k = torch.cat([pk for pk, _ in parts] + [keys.float()], dim=2)
    v = torch.cat([pv for _, pv in parts] + [values.float()], dim=2)
    b, h, _, d = query.shape
    hk = k.shape[1]
    scores = query.float().reshape(b, hk, h // hk, d) @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    out = torch.softmax(scores, dim=-1) @ v  # [b, hk, g, d]
    return out.reshape(b, 1, h, -1).to(query.dtype)

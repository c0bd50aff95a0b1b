"""References for ZipCache's kernels (any device): the specs the fused kernels are tested against.

One decode step over a ZipCache layer (:func:`quantized_decode_attention_reference`):

``query [b, h, 1, d]`` (GQA: query head ``j`` reads KV head ``j // (h // hk)``), ``blocks``: the layer's
``QuantizedBlock``s, ``keys``/``values [b, hk, m, d]``: its full-precision tokens (sinks + recent buffer). Every
block is dequantised as stored (salient first: with every key visible the order does not matter) in float32, and
attention is a plain softmax over all keys. Returns ``[b, 1, h, d]`` (transformers' attention-output layout) in the
query's dtype, with ``return_lse`` also each query head's logsumexp ``[b, h]`` in float32.

The prefill saliency probes (:func:`probe_scores_reference`, causal only): see its docstring.
"""
from __future__ import annotations

import torch


def quantized_decode_attention_reference(query, blocks, keys, values, *, scaling: float,
                                         softcap: float | None = None, return_lse: bool = False):
    parts = [block.dequantize(torch.float32, in_order=False) for block in blocks]
    k = torch.cat([pk for pk, _ in parts] + [keys.float()], dim=2)
    v = torch.cat([pv for _, pv in parts] + [values.float()], dim=2)
    b, h, _, d = query.shape
    hk = k.shape[1]
    scores = query.float().reshape(b, hk, h // hk, d) @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    out = (torch.softmax(scores, dim=-1) @ v).reshape(b, 1, h, -1).to(query.dtype)  # from [b, hk, g, d]
    return (out, torch.logsumexp(scores, dim=-1).reshape(b, h)) if return_lse else out


def causal_probe_counts(rows: torch.Tensor, q_len: int, k_len: int, columns: int, group: int) -> torch.Tensor:
    """How many (query head, probe) pairs see each of the last ``columns`` keys under a causal mask: probe row ``r``
    of a ``q_len``-query forward over ``k_len`` keys sees keys ``j <= r + k_len - q_len``. ``[columns]`` float32."""
    ends = (rows.sort().values + (k_len - q_len)).to(torch.int64)
    keys = torch.arange(k_len - columns, k_len, device=rows.device)
    return (rows.numel() - torch.searchsorted(ends, keys)).to(torch.float32) * group


def probe_scores_reference(query, key, rows, *, scaling: float, softcap: float | None = None,
                           columns: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for the fused probe kernel (causal, no mask): the probe ``rows``' softmax over the keys each sees,
    summed over the GQA group's heads and the probes on the last ``columns`` keys, and how many (head, probe) pairs
    see each key: ``(sums, counts)``, both ``[b, hk, columns]`` float32. ``query [b, h, q_len, d]``, ``key [b, hk,
    k_len, d]``, ``k_len >= q_len``. The whole probe × key matrix at once, in float32."""
    b, h, q_len, d = query.shape
    hk, k_len = key.shape[1], key.shape[2]
    columns = k_len if columns is None else columns
    q = query[:, :, rows].float().reshape(b, hk, h // hk, rows.numel(), d)
    scores = q @ key.float().unsqueeze(2).transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = torch.arange(k_len, device=query.device) <= (rows + (k_len - q_len))[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    sums = probs[..., k_len - columns:].sum((2, 3))
    counts = causal_probe_counts(rows, q_len, k_len, columns, h // hk).expand(b, hk, columns).contiguous()
    return sums, counts

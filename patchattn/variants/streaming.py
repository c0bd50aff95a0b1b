"""`streaming`: StreamingLLM attention (Xiao et al., arXiv 2309.17453), training-free attention sinks + window.

Each query attends exactly to the first ``sink_tokens`` keys (the attention sinks) and to the last ``window`` keys
up to and including itself; every other key is masked. This holds in prefill (each query row gets its own sinks +
window), in chunked prefill and in decode steps (the one new query over the whole cache). The method is an explicit
boolean mask ANDed with the model's own mask (causal, key padding, sliding windows stay as they were), run by
patchattn's exact attention: SDPA with the mask, or the eager path where ``softcap`` or the weights are needed.
GQA heads are never expanded here (the exact paths handle them natively).

Differences from the paper, in this first version:

* The KV cache is **not evicted**: it keeps every key and the mask hides those outside sinks + window, so the
  output is the paper's but memory and decode time still grow with the sequence (an evicting cache layer with
  re-positioned keys is future work). Positions are therefore the model's original ones; the paper re-assigns
  positions inside the rolling cache, which only matters beyond the model's trained length.
* Sinks and window are counted in raw key indices of the cache, not over valid keys: with left padding the first
  ``sink_tokens`` keys of a padded row are padding (masked), so that row runs with fewer (or no) sinks until its
  sequence starts at index 0. The window is unaffected (padding is contiguous, so distances between valid keys are
  raw index distances).
* ``window`` defaults to 1024 keys; in the paper the window is the cache size (set it to the context you want).

Calls where no query has a key outside sinks + window (``k_len <= sink_tokens + window``) run exact attention
unchanged and are recorded as ``exact_short``; the others are ``approximate``.
"""
from __future__ import annotations

import dataclasses

import torch

from ..attention import causal_bool_mask, exact_attention
from .base import KV_CACHE, Variant, VariantParams, param, register_variant


@dataclasses.dataclass
class StreamingParams(VariantParams):
    sink_tokens: int = param(4, low=0, help="first keys every query attends to (attention sinks; paper: 4)")
    window: int = param(1024, low=1, help="last keys before each query, itself included, it attends to "
                                          "(paper: the cache size)")


def streaming_mask(q_len: int, k_len: int, sink_tokens: int, window: int, device) -> torch.Tensor:
    """``[q, k]`` boolean: causal (last query aligned with the last key) AND (key index < ``sink_tokens`` OR the
    key is one of the last ``window`` keys up to the query, itself included)."""
    qi = torch.arange(q_len, device=device).unsqueeze(-1) + (k_len - q_len)
    kj = torch.arange(k_len, device=device)
    return causal_bool_mask(q_len, k_len, device) & ((kj < sink_tokens) | (qi - kj < window))


@register_variant
class StreamingAttention(Variant):
    name = "streaming"
    description = "StreamingLLM: attention sinks (first keys) + a window of recent keys, masked exact attention."
    Params = StreamingParams
    attention_function_only = True
    presets = {}
    #: what the method is, an eviction policy of the KV cache (the cache is not evicted yet): so it excludes
    #: zipcache. It does not run over a prefill approximation: its sinks+window mask would make one fall back.
    role = KV_CACHE

    def attention(self, module, query, key, value, attention_mask, *, scaling, dropout=0.0, sliding_window=None,
                  softcap=None, output_attentions=False, **kwargs):
        q_len, k_len = query.shape[2], key.shape[2]
        p = self.params
        if k_len <= p.sink_tokens + p.window:
            self.record_path("exact_short")
            mask = attention_mask
        else:
            self.record_path("approximate")
            keep = streaming_mask(q_len, k_len, p.sink_tokens, p.window, query.device)[None, None]
            mask = _combine(attention_mask, keep)
        return exact_attention(module, query, key, value, mask, scaling=scaling, dropout=dropout, softcap=softcap,
                               output_attentions=output_attentions, **kwargs)


def _combine(attention_mask: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """The model's mask (None = causal, boolean or additive ``[b, 1|h, q, k]``) restricted to ``keep [1, 1, q, k]``.

    A row the model's mask already hides entirely (a padded query) keeps the model's row: its output is never used,
    and a fully masked row must not turn into NaNs on fused kernels."""
    if attention_mask is None:
        return keep
    if attention_mask.dtype == torch.bool:
        combined = attention_mask & keep
        return torch.where(combined.any(dim=-1, keepdim=True), combined, attention_mask)
    # additive float mask: hide the dropped keys with the dtype's minimum, as transformers' own masks do
    return attention_mask.masked_fill(~keep, torch.finfo(attention_mask.dtype).min)

"""`dhsa`: Dynamic Hierarchical Sparse Attention (Xiong et al., arXiv 2510.24606), training-free sparse prefill.

Each query block keeps its own chunks, a local window, optional sink chunks and the ``budget`` key chunks whose
length-normalised representation (mean * sqrt(len)) scores highest against the block's; attention is exact over
that kept set (block-sparse Triton kernel on CUDA, masked exact attention elsewhere).

Differences from the paper: chunk boundaries are fixed-size (the paper places them with a learned boundary
predictor, whose weights are model-specific and not shipped), so the kept set is a union of whole chunks and the
token budget is rounded down to whole chunks; the local window and the sinks (the first 64 keys by default, not in
the paper: without them the mean-pooled first chunk rarely wins a pick and the attention sink is lost, which is
most of the quality loss measured on SmolLM2-135M) are always-kept extras on top of the budget.

Runs only on causal prefill (queries == keys) longer than ``min_seq_len`` under a plain causal mask with optional
key padding. Decode steps use exact attention by design; chunked prefill over a cache, sliding-window layers longer
than their window and packed/custom masks fall back to exact attention, logged once.
"""
from __future__ import annotations

import dataclasses

from patchattn.kernels.dhsa import DhsaSettings, dhsa_attention

from ..attention import exact_attention, exact_tail, long_causal_prefill
from .base import param, register_variant
from .prefill import PrefillParams, PrefillVariant

POW2 = (16, 32, 64, 128, 256, 512, 1024)


@dataclasses.dataclass
class DhsaParams(PrefillParams):
    chunk_size: int = param(64, choices=POW2, help="keys per chunk: the unit of selection and of the kernel")
    query_block: int = param(64, choices=POW2, help="queries per block; a block shares one kept set")
    budget_tokens: int = param(2048, low=0, help="keys selected per query block beyond window and sinks "
                                                 "(rounded down to whole chunks)")
    budget_fraction: float = param(0.0, low=0.0, high=1.0, help="if > 0: select this fraction of each query "
                                                                "block's causal prefix instead of budget_tokens")
    local_window: int = param(256, low=0, help="keys before each query block always kept (its own chunks are)")
    sink_tokens: int = param(64, low=0, help="first keys always kept (attention sinks; 0 = the paper's selection)")
    min_seq_len: int = param(4096, low=1, help="prefills of at most this many tokens use exact attention")
    exact_tail: int = param(256, low=0, help="last queries of a prefill attended exactly over all keys (where a long "
                                           "prompt's question sits; 0 = the paper's method)")


@register_variant
class DynamicHierarchicalSparseAttention(PrefillVariant):
    name = "dhsa"
    description = "DHSA: chunk-scored top-budget key chunks + local window, block-sparse exact attention (prefill)."
    Params = DhsaParams
    attention_function_only = True
    presets = {"paper": {"sink_tokens": 0, "exact_tail": 0, "retrieval_heads": 0.0}}

    def settings(self) -> DhsaSettings:
        p = self.params
        return DhsaSettings(p.chunk_size, p.query_block, p.budget_tokens, p.budget_fraction, p.local_window,
                            p.sink_tokens)

    def attention(self, module, query, key, value, attention_mask, *, scaling, dropout=0.0, sliding_window=None,
                  softcap=None, output_attentions=False, **kwargs):
        exact = lambda: exact_attention(module, query, key, value, attention_mask, scaling=scaling,
                                        dropout=dropout, softcap=softcap, output_attentions=output_attentions,
                                        **kwargs)
        path, key_valid = long_causal_prefill("dhsa", query, key, attention_mask,
                                              min_seq_len=self.params.min_seq_len, sliding_window=sliding_window,
                                              dropout=dropout, training=module.training,
                                              output_attentions=output_attentions, layer_idx=self.layer_idx)
        path = self.path_with_exact_heads(path, key.shape[1])
        self.record_path(path)
        if path != "approximate":
            return exact()  # decode steps (exact by design), short inputs, fallbacks, requested weights
        settings = self.settings()

        def approximate(q, k, v):
            return dhsa_attention(q, k, v, scaling, settings, key_valid=key_valid, softcap=softcap)[0].transpose(1, 2)

        out = self.split_heads(module, query, key, value, attention_mask, approximate=approximate, scaling=scaling,
                               softcap=softcap)
        return exact_tail(module, out, query, key, value, attention_mask, self.params.exact_tail, scaling=scaling,
                          softcap=softcap).contiguous(), None

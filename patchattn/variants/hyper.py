"""`hyper`: HyperAttention (Han et al., arXiv 2310.05869), training-free near-linear causal prefill.

Runs only where it is an approximation worth making: causal prefill (queries == keys) longer than
``min_seq_len`` under a plain causal mask with optional key padding. Everything else (decode steps over the
cache, chunked prefill, sliding-window layers longer than their window, packed/custom masks) takes exact
attention; the unexpected cases are logged once.
"""
from __future__ import annotations

import dataclasses

import torch

from patchattn.kernels.hyper import HyperSettings, exact_is_faster, hyper_attention

from ..attention import exact_attention, exact_tail, long_causal_prefill
from .base import param, register_variant
from .prefill import PrefillParams, PrefillVariant


@dataclasses.dataclass
class HyperParams(PrefillParams):
    lsh_num_projs: int = param(7, low=1, high=16, help="sign bits of the angular LSH (2^r buckets)")
    block_size: int = param(256, low=1, help="sorted-block size for exact attention inside buckets")
    sample_size: int = param(240, low=0, help="uniformly sampled keys for the residual (0 = none; 240 + 16 sinks "
                                              "= the paper's 256 columns)")
    min_seq_len: int = param(4096, low=1, help="causal recursion stops here and uses exact attention")
    seed: int = param(0, low=0, help="seed of hash projections and samples (offset by layer index)")
    sink_tokens: int = param(16, low=0, help="first keys every query attends to exactly (attention sinks; 0 = "
                                             "the paper)")
    local_window: int = param(0, low=0, help="keys before each query attended exactly (0 = none)")
    center_keys: bool = param(False, help="hash keys after subtracting their mean")
    exact_tail: int = param(256, low=0, help="last queries of a prefill attended exactly over all keys (where a "
                                             "long prompt's question sits; 0 = the paper's method)")


@register_variant
class HyperAttention(PrefillVariant):
    name = "hyper"
    description = "HyperAttention: LSH-sorted block attention + sampled residual for long causal prefill."
    Params = HyperParams
    attention_function_only = True
    #: defaults = measured on Qwen2.5-0.5B at 32k (benchmarks/README.md, "Long-context task accuracy"): the sinks cost
    #: no columns (16 + 240 = 256) and took niah_single from 82% to 100%; the exact tail took it from 35% to 85%
    #: before them (benchmarks/results/longctx_tasks_20samples_c28a9b3.json)
    presets = {"paper": {"exact_tail": 0, "sink_tokens": 0, "sample_size": 256, "retrieval_heads": 0.0}}

    def settings(self) -> HyperSettings:
        p = self.params
        return HyperSettings(p.lsh_num_projs, p.block_size, p.sample_size, p.min_seq_len,
                             seed=p.seed + 10_007 * self.layer_idx, sink_tokens=p.sink_tokens,
                             local_window=p.local_window, center_keys=p.center_keys)

    def attention(self, module, query, key, value, attention_mask, *, scaling, dropout=0.0, sliding_window=None,
                  softcap=None, output_attentions=False, **kwargs):
        q_len = query.shape[2]
        exact = lambda: exact_attention(module, query, key, value, attention_mask, scaling=scaling,
                                        dropout=dropout, softcap=softcap, output_attentions=output_attentions,
                                        **kwargs)
        path, key_valid = long_causal_prefill("hyper", query, key, attention_mask,
                                              min_seq_len=self.params.min_seq_len, sliding_window=sliding_window,
                                              dropout=dropout, training=module.training,
                                              output_attentions=output_attentions, layer_idx=self.layer_idx)
        path = self.path_with_exact_heads(path, key.shape[1])
        backward = module.training or (torch.is_grad_enabled() and query.requires_grad)
        if path == "approximate" and query.is_cuda and exact_is_faster(q_len, query.shape[-1], query.device,
                                                                       backward=backward):
            path = "exact_crossover"  # below the measured crossover, fused SDPA is faster than the estimator
        self.record_path(path)
        if path != "approximate":
            return exact()
        settings = self.settings()

        def approximate(q, k, v):
            out, _ = hyper_attention(q, k, v, scaling, settings, causal=True, key_valid=key_valid, softcap=softcap)
            return out.transpose(1, 2)

        out = self.split_heads(module, query, key, value, attention_mask, approximate=approximate, scaling=scaling,
                               softcap=softcap)
        return exact_tail(module, out, query, key, value, attention_mask, self.params.exact_tail, scaling=scaling,
                          softcap=softcap).contiguous(), None

"""`exact`: patchattn's plumbing with unchanged math — proves the dispatch, masks and caches are right."""
from __future__ import annotations

import dataclasses

from ..attention import exact_attention
from .base import REPLACEMENT, Variant, VariantParams, register_variant


@dataclasses.dataclass
class ExactParams(VariantParams):
    pass


@register_variant
class ExactAttention(Variant):
    name = "exact"
    description = "Exact attention routed through patchattn (plumbing check; same logits as the original)."
    Params = ExactParams
    attention_function_only = True
    role = REPLACEMENT

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        return exact_attention(module, query, key, value, attention_mask, **kwargs)

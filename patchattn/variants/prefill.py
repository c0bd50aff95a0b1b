"""What the long-prefill approximations (``hyper``, ``dhsa``) share: retrieval heads kept exact.

Measured on Qwen2.5-Coder-0.5B-Instruct at 32k (benchmarks/README.md, "Long-context task accuracy"): approximating
every head kept single-needle retrieval but lost 9 points on the task mean (multi-key retrieval, variable
tracking); keeping the quarter of KV heads that copy tokens forward exact (:mod:`patchattn.retrieval_heads`) brought
``dhsa`` to 0.7 and ``hyper`` to 4 points of exact attention (0.0 and 3.3 in the run of the defaults), still
prefilling faster. ``patch_model`` runs the search (one forward of a 1,024-token copy task) and the spec stores the
heads it found, so a saved model loads without searching again; ``retrieval_heads=0`` approximates every head (the
papers' methods), and so do specs saved before the search existed (``legacy_defaults``) and
``attn_implementation="patchattn_<name>"`` (an attention function never sees the whole model; logged once).
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from ..attention import exact_attention, split_kv_heads
from ..families.base import config_layer_types
from ..logging_utils import warn_once
from ..retrieval_heads import retrieval_heads
from .base import PREFILL, Variant, VariantParams, check_heads_fit, normalize_heads, param


@dataclasses.dataclass
class PrefillParams(VariantParams):
    retrieval_heads: float = param(0.25, low=0.0, high=1.0, help="share of the patched layers' KV heads attended "
                                                                 "exactly: the top copy-task scorers, found by "
                                                                 "patch_model (0 = approximate every head)")
    exact_kv_heads: dict | None = param(None, help="{layer: [kv_head, ...]} attended exactly over the whole prompt "
                                                   "(set by patch_model from retrieval_heads, or by hand)")

    def validate(self) -> None:
        super().validate()
        if self.exact_kv_heads is not None:
            self.exact_kv_heads = normalize_heads(self.exact_kv_heads, self.variant_name, "exact_kv_heads")


class PrefillVariant(Variant):
    """Base of the prefill approximations: finds and checks the exact KV heads, and splits a layer's heads."""

    role = PREFILL
    legacy_defaults = {"retrieval_heads": 0.0}  # specs saved before the search approximated every head

    @classmethod
    def prepare(cls, model: nn.Module, params: PrefillParams, layers: list[int]) -> None:
        """The share is of the full-attention layers' KV heads: sliding-window layers keep exact attention over
        long prompts anyway (Gemma 2/3's local layers, Mistral's window), so a head kept exact there buys nothing."""
        if params.exact_kv_heads is None and params.retrieval_heads > 0:
            types = config_layer_types(model.config, model.config.get_text_config().num_hidden_layers)
            full = [i for i in layers if types[i] == "full_attention"]
            params.exact_kv_heads = retrieval_heads(model, params.retrieval_heads, layers=full) if full else {}

    def attach(self, attention_module: nn.Module) -> None:
        check_heads_fit(self.params.exact_kv_heads or {}, attention_module, self.name, "exact_kv_heads",
                        kv_heads=True)

    def path_with_exact_heads(self, path: str, kv_heads: int) -> str:
        """``path``, or ``exact_retrieval`` where the method would run on a layer whose every KV head is an exact
        (retrieval) head: nothing is approximated there, and :func:`patchattn.attention_paths` must not say so."""
        if path == "approximate" and len((self.params.exact_kv_heads or {}).get(self.layer_idx, ())) >= kv_heads:
            return "exact_retrieval"
        return path

    def split_heads(self, module, query, key, value, attention_mask, *, approximate, scaling, softcap):
        """``[b, n, h, d]``: this layer's exact KV heads through exact attention, the others through
        ``approximate(q, k, v) -> [b, n, h', d]``."""
        heads = self.params.exact_kv_heads
        if heads is None and self.params.retrieval_heads > 0:
            warn_once(f"{self.name}: no retrieval-head search ran (the variant was not applied by patch_model, e.g. "
                      f"attn_implementation='patchattn_{self.name}'): every head is approximated")

        def exact(q, k, v):
            return exact_attention(module, q, k, v, attention_mask, scaling=scaling, softcap=softcap)[0]

        return split_kv_heads(query, key, value, (heads or {}).get(self.layer_idx, ()), approximate=approximate,
                              exact=exact)

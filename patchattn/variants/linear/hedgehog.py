"""`hedgehog`: linear attention with a learnable softmax-mimicking feature map (Hedgehog, arXiv 2402.04347; the
feature map LoLCATs linearises Llama 3 / Mistral with, arXiv 2410.10254).

``φ(x) = [softmax(x W), softmax(−x W)]`` over ``f`` features per head, separate (untied) maps for queries (per query
head) and keys (per KV head), normalised linear attention ``φ(q)S / (φ(q)·z + ε)`` on the post-RoPE q/k.

Init: LoLCATs draws W at random (Kaiming). Here ``W = √scaling · N(0, 1)``, the same draw for a KV head's key map
and its query heads' maps: softmax over the features is then ≈ ``exp(x·w − ‖x‖²/2) / f`` and ``φ(q)·φ(k)`` a
positive random-feature estimate of ``(2/f)·exp(scaling · q·k)``, so the layer starts close to the softmax it
replaces and attention transfer (``patchattn.distill``) refines it. ``window=W`` adds LoLCATs' exact sliding-window
softmax (their best setting: 64), with ``β_h = log(2/f)`` at init matching the two scales.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from ..base import VariantParams, param, register_variant
from .base import HedgehogFeatureMap, LinearAttentionVariant, softmax_features, window_param


@dataclasses.dataclass
class HedgehogParams(VariantParams):
    feature_dim: int = param(64, low=1, high=4096, help="f: softmax features per sign (φ has 2f dims)")
    window: int = window_param()


@register_variant
class HedgehogAttention(HedgehogFeatureMap, LinearAttentionVariant):
    name = "hedgehog"
    description = ("Hedgehog/LoLCATs linear attention (arXiv 2402.04347, 2410.10254): learnable [softmax(xW), "
                   "softmax(−xW)] feature maps, random-feature init ≈ softmax; optional exact sliding window.")
    Params = HedgehogParams

    def build_variant(self, attention_module):
        w = self.initial_feature_map()
        self.k_map = nn.Parameter(w)
        self.q_map = nn.Parameter(w.repeat_interleave(self.heads // self.kv_heads, dim=0))

    def feature_maps(self, q, k):
        return softmax_features(q, self.q_map), softmax_features(k, self.k_map)

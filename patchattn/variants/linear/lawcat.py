"""`lawcat`: LAWCAT, Linear Attention With Convolution Across Time (Liu et al., arXiv 2509.18467).

LAWCAT linearises a pretrained transformer with (paper, Sec. 3):

* a causal depthwise Conv1D of kernel ``r + 1 = 4`` on the queries and on the keys (no activation after it), so
  ``q̃_t = f(q_{t-r}, …, q_t)``: a key scores high when its neighbours match the query too, the local "group"
  behaviour softmax has and plain linear attention lacks (replacing LoLCATs' sliding window);
* one feature map shared by queries and keys (the kernel ``φ(q)·φ(k)`` stays a kernel): a learnable linear layer
  with a nonlinearity, here Hedgehog's ``[softmax(xW), softmax(−xW)]`` as in LoLCATs which LAWCAT builds on;
* normalised gated linear attention: ``S_t = γ_t S_{t-1} + φ(k_t)ᵀv_t``, ``z_t = γ_t z_{t-1} + φ(k_t)``,
  ``o_t = φ(q_t)S_t / (φ(q_t)·z_t + ε)``; the decay lets a model distilled on short sequences generalise to long
  ones (their passkey results at 22K tokens from 1K training).

The released code is not available here, so two parametrisation choices follow GLA (arXiv 2312.06635), the gated
linear attention LAWCAT normalises: the gate is data dependent, ``log γ_t = logsigmoid(x_t W_γ + b_γ) / 16``
(GLA's temperature 16) from the layer's input ``x``; it is one scalar per KV head and token (the form the
``patchattn.kernels.linear`` kernels take; GLA gates each key channel). ``W_γ`` starts at zero and ``b_γ`` at the
value giving every head the half-life ``decay_halflife`` tokens, so the layer starts as (nearly) undecayed.

Init: the convs start at the identity tap (``[0, …, 0, 1]``) and the feature map at Hedgehog's random-feature
estimate of softmax (see ``hedgehog``), so before training LAWCAT ≈ ``hedgehog`` with a shared q/k map.
``window=W`` adds the LoLCATs-style exact softmax window on top (not in the paper; off by default).
"""
from __future__ import annotations

import dataclasses
import math

import torch.nn as nn
import torch.nn.functional as F

from ..base import VariantParams, param, register_variant
from .base import HedgehogFeatureMap, LinearAttentionVariant, softmax_features, window_param

GATE_TEMPERATURE = 16.0


def gate_bias(halflife: float) -> float:
    """``b`` with ``logsigmoid(b) / 16 = log(1/2) / halflife``: the gate's bias for a given half-life in tokens."""
    target = GATE_TEMPERATURE * -math.log(2.0) / halflife  # logsigmoid(b), < 0
    return target - math.log(-math.expm1(target))


@dataclasses.dataclass
class LawcatParams(VariantParams):
    feature_dim: int = param(64, low=1, high=4096, help="f: softmax features per sign of the shared q/k map")
    conv_size: int = param(4, low=1, high=64, help="kernel of the causal conv on q and k (1 = no conv)")
    decay_halflife: float = param(8192.0, low=1.0, help="initial half-life of the gate in tokens (every head)")
    window: int = window_param()


@register_variant
class LawcatAttention(HedgehogFeatureMap, LinearAttentionVariant):
    name = "lawcat"
    description = ("LAWCAT (arXiv 2509.18467): causal conv on q/k, shared learnable feature map, normalised "
                   "gated linear attention; constant-memory cache.")
    Params = LawcatParams

    def build_variant(self, attention_module):
        self.feature_map = nn.Parameter(self.initial_feature_map())  # Hedgehog's map, one for q and k
        self.gate = nn.Linear(self.hidden_size, self.kv_heads)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias(self.params.decay_halflife))

    def feature_maps(self, q, k):
        return softmax_features(q, self.feature_map), softmax_features(k, self.feature_map)

    def log_decay(self, x, n):
        z = self.gate(x.to(self.gate.weight.dtype)).float()  # [b, n, hk]
        return (F.logsigmoid(z) / GATE_TEMPERATURE).transpose(1, 2)

"""`lightning`: decayed linear attention with an output norm, as in Lightning Attention-2 / TransNormerLLM
(Qin et al., arXiv 2401.04658, 2307.14995) and MiniMax-01's lightning layers.

``S_t = λ_h S_{t-1} + φ(k_t)ᵀ v_t``, ``o_t = RMSNorm(φ(q_t) S_t)``: no normaliser (the norm bounds the output, the
"NormAttention" of TransNormer), ``φ = SiLU`` on q and k (the released models apply SiLU to their projections; v
keeps the pretrained values), and fixed per-head decays ``λ_h = exp(−s_h (1 − l/(L−1) + 10⁻⁵))`` with ALiBi's
slopes ``s_h = 2^{−8h/H}`` (h = 1..H) and layer ``l`` of ``L`` (early layers forget fast, the last nearly not at
all), over the KV heads (the state is per KV head). Lightning Attention-2's contribution is the blocked
intra/inter-chunk computation, which is what ``patchattn.kernels.linear`` does; the math is this recurrence.

The norm is per head over ``head_dim`` (a group norm: each query head is normalised on its own), gain starting at
1: the variant's trainable part. Without a normaliser the layer cannot start at the original model: it needs
attention transfer (``patchattn.distill``) or training.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import VariantParams, register_variant
from .base import LinearAttentionVariant, _pair, scan

_EPS = 1e-6


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes (arXiv 2108.12409), the geometric sequence 2^{-8/n}, 2^{-16/n}, … for n a power of 2;
    for other counts the closest power of two's slopes, then every other slope of the next power."""
    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_two(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


@dataclasses.dataclass
class LightningParams(VariantParams):
    pass


@register_variant
class LightningAttention(LinearAttentionVariant):
    name = "lightning"
    description = ("Lightning Attention-2 / TransNormerLLM (arXiv 2401.04658): SiLU kernel, fixed per-head decays, "
                   "no normaliser, per-head RMSNorm on the output (learnable gain).")
    Params = LightningParams

    def build_variant(self, attention_module):
        self.register_buffer("log_lambda", self._log_lambda(attention_module), persistent=False)
        self.norm_gain = nn.Parameter(torch.ones(self.heads, self.head_dim))

    def reset_buffers(self, attention_module):
        self.log_lambda = self._log_lambda(attention_module).to(self.norm_gain.device)

    def _log_lambda(self, attention_module) -> torch.Tensor:
        """Fixed per-KV-head log decays: ALiBi slopes scaled down with depth (deeper layers remember longer)."""
        layers = int(attention_module.config.num_hidden_layers)
        depth = 1.0 - self.layer_idx / (layers - 1) + 1e-5 if layers > 1 else 1.0 + 1e-5
        return -torch.tensor(alibi_slopes(self.kv_heads)) * depth

    def feature_maps(self, q, k):
        return F.silu(q), F.silu(k)

    def log_decay(self, x, n):
        return self.log_lambda.float()[None, :, None].expand(x.shape[0], -1, n).contiguous()

    def mix(self, fq, fk, v, log_decay, valid, state, new):
        out, (new["S"], new["z"]) = scan(fq, fk, v, log_decay, _pair(state), normalize=False)
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + _EPS)
        return out * self.norm_gain.float()[None, :, None, :]

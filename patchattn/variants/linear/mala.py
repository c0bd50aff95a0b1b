"""`mala`: Magnitude-Aware Linear Attention (Fan et al., "Rectifying Magnitude Neglect in Linear Attention",
arXiv 2507.00698, ICCV 2025), causal prefix version.

Normalised linear attention ``φ(q)S / φ(q)z`` ignores the query's magnitude (it cancels), so its attention cannot
sharpen as ‖q‖ grows the way softmax does. MALA adds a scaling β and an offset γ to the kernel scores (paper
Sec. 4, ``φ = elu + 1``, ``a_j = φ(q)·φ(k_j)`` over the ``N`` keys a query sees, ``ā`` their mean)::

    w_j = β a_j − γ,   β = 1/Σ_m a_m + τ/N,   γ = τ ā / N      (Σ_j w_j = 1)

so ``o = φ(q)S/φ(q)z + (τ/N)·(φ(q)S − φ(q)z · v̄)``: plain linear attention plus a term that grows with the query's
magnitude and spreads the weights around their mean (they may go negative). For a causal LM ``N`` is the query's
prefix (padding excluded) and ``v̄`` the mean of its values, carried as running sums, so decoding keeps a
constant-size state (``S``, ``z``, ``Σv``, ``N``).

``τ`` is the paper's ``1/√d`` (the attention module's ``scaling``); here it is a learnable per-head parameter
(log-parametrised, starting at ``scaling``), the variant's trainable part; ``φ`` has no parameters.
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


@dataclasses.dataclass
class MalaParams(VariantParams):
    pass


@register_variant
class MalaAttention(LinearAttentionVariant):
    name = "mala"
    description = ("Magnitude-aware linear attention (arXiv 2507.00698), causal: elu+1 kernel plus a query-magnitude "
                   "term τ/N·(φ(q)S − φ(q)z·v̄); learnable per-head τ.")
    Params = MalaParams

    def build_variant(self, attention_module):
        self.log_tau = nn.Parameter(torch.full((self.heads,), math.log(self.scaling)))

    def feature_maps(self, q, k):
        return F.elu(q) + 1.0, F.elu(k) + 1.0

    def mix(self, fq, fk, v, log_decay, valid, state, new):
        b, h, n, _ = fq.shape
        hk, dv = v.shape[1], v.shape[-1]
        g = h // hk
        ones = v.new_ones(b, hk, n, 1)
        lin, (new["S"], new["z"]) = scan(fq, fk, torch.cat([v, ones], -1), None, _pair(state), normalize=False)
        num, den = lin[..., :dv].reshape(b, hk, g, n, dv), lin[..., dv:].reshape(b, hk, g, n, 1)
        count = torch.ones(b, n, device=v.device) if valid is None else valid.float()
        count = count.cumsum(-1) + (0.0 if state is None else state["count"][:, None])  # keys each query sees
        v_sum = v.cumsum(2) + (0.0 if state is None else state["v_sum"][:, :, None])
        new["count"], new["v_sum"] = count[:, -1], v_sum[:, :, -1]
        seen = count.clamp_min(1.0)[:, None, None, :, None]
        mean_v = (v_sum[:, :, None] / seen)
        tau = self.log_tau.float().exp().reshape(1, hk, g, 1, 1)
        out = num / (den + _EPS) + tau / seen * (num - den * mean_v)
        return out.reshape(b, h, n, dv)

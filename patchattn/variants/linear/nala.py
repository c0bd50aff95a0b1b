"""`nala`: Norm-Aware Linear Attention (Meng et al., NaLaFormer, arXiv 2506.21137), causal.

Two kernel changes to normalised linear attention (paper Sec. 4; released code ``NormAwareLinearAttn``):

* query-norm-aware spikiness: the query is split into norm and direction and the direction is raised to a power
  that grows with the norm, ``p(q) = λ (½ + tanh(α‖q‖))`` (λ = 3), so larger queries give sharper (lower-entropy)
  attention as in softmax, instead of the norm cancelling out;
* non-negativity without losing signs: each vector is split into its positive and negative parts,
  ``φ(x) = [relu(x), relu(−x)]``, so ``φ(q)·φ(k)`` keeps the same-sign products (a cosine-like similarity)
  where ``relu``/``elu`` maps drop or distort negative coordinates.

``φ_q(q) = [relu(q̂), relu(−q̂)]^{p(q)}`` with ``q̂ = q/‖q‖``; ``φ_k(k) = [relu(k³), relu(−k³)]`` (the code's cubic
key map); output ``φ(q)S / (φ(q)·z + ε)`` on post-RoPE q/k (the vision model's extra rotation of the features is
left out: an LLM's q/k already carry RoPE). Trainable: ``λ`` and ``α`` per head, log-parametrised. ``λ`` starts at
the paper's 3; ``α`` at the module's ``scaling`` (1/√d) instead of the paper's 1, so ``α‖q‖`` is the query's RMS:
a pretrained LLM's queries have norms of tens, where ``tanh(‖q‖)`` is flat at 1, the power would be the same for
every query and the norm-awareness could not train. ``window=W`` adds the exact softmax window (``β_h`` starts
at 0).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from ..base import VariantParams, register_variant
from .base import LinearAttentionVariant, window_param


@dataclasses.dataclass
class NalaParams(VariantParams):
    window: int = window_param()


def _power(base: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``base ** exponent`` for ``base >= 0`` with finite gradients at 0 (where it is 0)."""
    positive = base > 0
    return torch.where(positive, torch.exp(exponent * torch.log(torch.where(positive, base, 1.0))), 0.0)


@register_variant
class NalaAttention(LinearAttentionVariant):
    name = "nala"
    description = ("Norm-aware linear attention (NaLaFormer, arXiv 2506.21137): sign-split kernel, query direction "
                   "raised to a norm-dependent power λ(½+tanh(α‖q‖)); learnable λ, α per head.")
    Params = NalaParams

    def build_variant(self, attention_module):
        self.log_power = nn.Parameter(torch.full((self.heads,), math.log(3.0)))
        self.log_norm_scale = nn.Parameter(torch.full((self.heads,), math.log(self.scaling)))

    def feature_maps(self, q, k):
        norm = q.norm(dim=-1, keepdim=True)
        shape = (1, -1, 1, 1)
        power = self.log_power.float().exp().view(shape) * (0.5 + torch.tanh(self.log_norm_scale.float().exp()
                                                                             .view(shape) * norm))
        direction = q / norm.clamp_min(1e-6)
        fq = _power(torch.cat([direction.clamp_min(0), (-direction).clamp_min(0)], -1), power)
        cube = k.pow(3)
        return fq, torch.cat([cube.clamp_min(0), (-cube).clamp_min(0)], -1)

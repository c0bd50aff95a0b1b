"""`affine`: Affine-Scaled Attention (Bae et al., arXiv 2602.23057).

The paper (Sec. 3.2, Eqs. 6-9, 11) replaces the softmax weights ``P`` by an input-dependent affine map::

    Attn(Q, K, V, X) = [α(X) · softmax(QKᵀ/√d) + β(X)] V
    α(X) = φ(X W_α)                       per query token and head
    β(X) = (α_ma − α(X)) / N              N = number of keys
    α_ma ← ρ α_ma + (1 − ρ) E_batch[α]    running mean, ρ = 0.9, α_ma,0 = 0
    φ = linear_clipping(z) = clip(0.1 z + 0.5, 0, 1)   (the paper's choice over sigmoid, Sec. 6)

so per query ``i`` (causal: ``N_i`` = the keys query ``i`` may see) the output is
``o_i = α_i · softmax_i V + β_i · Σ_{j visible} v_j = α_i · softmax_i V + (α_ma − α_i) · mean_{j visible}(v_j)``:
the softmax part is rescaled and the total weight becomes ``α_ma`` instead of 1.

What patchattn changes to continue-train a *pretrained* model (the paper trains from scratch):

* ``α = 2·φ(x W_α [+ b_α])`` with zero-initialised ``W_α``: ``α = 2·φ(0) = 1`` at init, range ``[0, 2]``
  (the paper's range is ``[0, 1]``, which cannot contain the pretrained model's α = 1 in its interior).
* ``α_ma`` starts at 1 (not 0), so ``β = 0`` at init: the patched model is exactly the original.
* ``α_ma`` is kept per head (mean over the batch's valid tokens), updated in training mode only (frozen in eval,
  like BatchNorm statistics), stored as a persistent buffer so it saves/loads with the weights. ``momentum=1``
  freezes it at 1 (total attention mass fixed at 1).

The β term is a masked mean of the values over the visible keys, computed in O(n) with prefix sums whenever every
query sees one contiguous key interval minus padded keys (causal, padding, sliding windows, packed documents);
other masks fall back to a mask-times-values product. The softmax part is ``exact_attention`` (GQA, softcap,
sliding windows, KV cache unchanged). With gradient checkpointing the running mean sees each batch twice (once
more in the recomputation); this only changes its effective momentum.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import MODIFIER, PREFILL, VariantParams, module_dims, param, register_variant
from .gated import HiddenStatesVariant


def linear_clipping(z: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 11: 0 below -5, 1 above 5, linear (0.1 z + 0.5) in between."""
    return (0.1 * z + 0.5).clamp(0.0, 1.0)


def visible_keys(attention_mask: torch.Tensor | None, q_len: int, k_len: int) -> torch.Tensor | None:
    """``[b, q, k]`` bool: which keys each query may attend (None = plain causal, bottom-right aligned)."""
    if attention_mask is None:
        return None
    m = attention_mask[:, 0]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    return m.expand(m.shape[0], q_len, k_len)


def visible_value_mean(value: torch.Tensor, attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor:
    """Mean of ``value [b, hk, k, d]`` over the keys each query may see → ``[b, hk, q, d]`` in float32
    (zeros for queries that see nothing). O(n) prefix sums for interval-shaped masks, a matmul otherwise."""
    b, hk, k_len, d = value.shape
    v = value.float()
    if attention_mask is None:  # plain causal: query i sees keys 0 .. k_len - q_len + i
        if q_len == 1:
            return v.mean(dim=-2, keepdim=True)
        count = torch.arange(k_len - q_len + 1, k_len + 1, device=v.device, dtype=v.dtype)
        return v.cumsum(dim=-2)[:, :, k_len - q_len:] / count[:, None]
    m = visible_keys(attention_mask, q_len, k_len)
    count = m.sum(dim=-1)  # [b, q]
    nonempty = count > 0
    key_used = m.any(dim=1)  # [b, k]: keys some query sees (padding excluded)
    lo = m.int().argmax(dim=-1)  # first visible key
    hi = k_len - 1 - m.flip(-1).int().argmax(dim=-1)  # last visible key
    idx = torch.arange(k_len, device=m.device)
    interval = (idx >= lo[..., None]) & (idx <= hi[..., None]) & key_used[:, None, :] & nonempty[..., None]
    if torch.equal(interval, m):
        vz = torch.where(key_used[:, None, :, None], v, 0.0)
        prefix = F.pad(vz.cumsum(dim=-2), (0, 0, 1, 0))  # [b, hk, k + 1, d]; prefix[j] = sum of keys < j
        end = torch.where(nonempty, hi + 1, lo)
        gather = lambda at: torch.gather(prefix, 2, at[:, None, :, None].expand(b, hk, q_len, d))
        total = gather(end) - gather(lo)
    else:
        total = torch.einsum("bqk,bhkd->bhqd", m.to(v.dtype), torch.where(key_used[:, None, :, None], v, 0.0))
    return total / count.clamp(min=1).to(v.dtype)[:, None, :, None]


def valid_queries(attention_mask: torch.Tensor | None, b: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """``[b, q]`` bool: queries that see at least one key (padded queries don't)."""
    m = visible_keys(attention_mask, q_len, k_len)
    return torch.ones(b, q_len, dtype=torch.bool, device=device) if m is None else m.any(dim=-1)


@dataclasses.dataclass
class AffineParams(VariantParams):
    activation: str = param("linear_clipping", choices=("linear_clipping", "sigmoid"),
                            help="φ in α = 2φ(x W_α): the paper's linear clipping or its sigmoid ablation")
    momentum: float = param(0.9, low=0.0, high=1.0,
                            help="ρ of the running mean α_ma (β = (α_ma − α)/N); 1 freezes α_ma at 1")
    bias: bool = param(False, help="learn a (zero-initialised) bias in the α projection")


@register_variant
class AffineScaledAttention(HiddenStatesVariant):
    name = "affine"
    description = ("Affine-Scaled Attention (arXiv 2602.23057): [α(x)·softmax + (α_ma − α(x))/N]·V with per-head "
                   "input-dependent α; α=1, β=0 at init.")
    trainable = True
    Params = AffineParams
    role = MODIFIER
    #: not over a KV-cache variant: the beta term averages the values the cache hands back, which zipcache hands
    #: back partly (packed blocks stay out of them on decode steps) and streaming masks by its own rule
    stacks_over = (PREFILL,)

    def build(self, attention_module):
        heads, _, hidden = module_dims(attention_module)
        self.heads = heads
        self.alpha_proj = nn.Linear(hidden, heads, bias=self.params.bias)
        nn.init.zeros_(self.alpha_proj.weight)
        if self.alpha_proj.bias is not None:
            nn.init.zeros_(self.alpha_proj.bias)
        self.register_buffer("alpha_ma", torch.ones(heads))

    def alpha(self, x: torch.Tensor) -> torch.Tensor:
        z = self.alpha_proj(x.to(self.alpha_proj.weight.dtype)).float()
        phi = linear_clipping(z) if self.params.activation == "linear_clipping" else torch.sigmoid(z)
        return 2.0 * phi  # [b, q, h]; exactly 1 at init

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        b, h, q_len, _ = query.shape
        hk, k_len, d = key.shape[1], key.shape[2], value.shape[-1]
        x = self.take_hidden_states(module, q_len)
        out, weights = self.inner_attention(module, query, key, value, attention_mask, **kwargs)
        alpha = self.alpha(x)
        if self.training and self.params.momentum < 1.0:
            with torch.no_grad():
                valid = valid_queries(attention_mask, b, q_len, k_len, alpha.device)[..., None].float()
                batch_mean = (alpha * valid).sum(dim=(0, 1)) / valid.sum().clamp(min=1.0)
                rho = self.params.momentum
                self.alpha_ma.copy_((rho * self.alpha_ma.float() + (1.0 - rho) * batch_mean).to(self.alpha_ma.dtype))
        beta = self.alpha_ma.float() - alpha  # [b, q, h]; times the visible-value mean = β_i · Σ_j v_j
        mean_v = visible_value_mean(value, attention_mask, q_len)  # [b, hk, q, d]
        mean_v = mean_v[:, :, None].expand(b, hk, h // hk, q_len, d).reshape(b, h, q_len, d).transpose(1, 2)
        result = alpha[..., None] * out.float() + beta[..., None] * mean_v
        if weights is not None:  # report the effective (affine) weights when they were asked for
            m = visible_keys(attention_mask, q_len, k_len)
            if m is None:
                from ..attention import causal_bool_mask
                m = causal_bool_mask(q_len, k_len, query.device)[None].expand(b, q_len, k_len)
            count = m.sum(dim=-1).clamp(min=1)[:, None, :, None]
            a, bt = alpha.transpose(1, 2)[..., None], beta.transpose(1, 2)[..., None]
            weights = (a * weights.float() + bt * m[:, None].float() / count).to(weights.dtype)
        return result.to(out.dtype), weights

"""`moh`: Mixture-of-Head attention (Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head Attention",
arXiv 2410.11842; code github.com/SkyworkAI/MoH).

Heads are experts. The first ``shared`` heads are always active; of the other ``routed`` heads each token keeps the
top-k. The head outputs (before ``o_proj``) are multiplied by per-token routing weights. Two routers:

``router="learned"`` (the paper's, as in SkyworkAI/MoH ``MoH-ViT/attention.py``), all projections of the
attention module's input ``x`` without bias:

* routed: ``g = softmax(x W_r)`` over the routed heads, top-k mask, renormalised over the selected heads and
  multiplied by k;
* shared: ``softmax(x W_s) · shared`` (a constant 1 when there is a single shared head);
* two-stage: ``[w_shared, w_routed] = 2 · softmax(x W_h)`` multiplies the shared and the routed weights;
* load balance: ``L = R² · mean_e(mean_tokens(g_e) · mean_tokens(mask_e))`` over the R routed heads, stored on each
  layer after every training forward (``aux_loss``); :func:`load_balance_loss` sums them times
  ``aux_loss_weight`` (0.01, the paper's) for the trainer to add to the LM loss.

``router="query_norm"``: the parameter-free router the authors used to convert LLaMA3-8B (SkyworkAI/MoH
``MoH-LLaMA3/Inference_code/modeling_llama.py``): the routed heads are ranked by the L2 norm of their query, top-k
kept with weight 1, the rest dropped (their code takes a softmax of the norms divided by their std before top-k,
which does not change the ranking). MoH-LLaMA3-8B: 50% shared + 25% routed = 75% active heads. The query here is
the one the attention function receives (after q-norm and RoPE; RoPE rotates, so the norm is the pre-RoPE one).

"Starts at the original" for MoH: with every head active (``active_heads=1.0``, i.e. top-k = all routed heads,
the default) the zero-initialised router gives every head weight exactly 1 (uniform softmax × count), so the
patched model is the original one up to float rounding; training then learns the two-stage weights. With
``active_heads < 1`` (the paper's sparse setting) a zero-step model drops heads: the learned router's tied
zero-init scores keep a fixed, arbitrary k of the routed heads (``torch.topk``'s tie order) for every token, the
query-norm router the k largest queries, and the quality change has to be trained away. Measured on
SmolLM2-135M (9 heads: 4 shared + top-2 of 5 routed = 6 active per layer, all 30 layers, Shakespeare, 256-token
windows): perplexity 26.8 → 324 (learned, zero-step) and → 236 (query norm) before any training.

Dropped heads are computed and multiplied by 0. Skipping them can only pay at decode (one token per sequence,
memory-bound on the KV cache; prefill routes per token, so whole tiles are rarely skippable): with
``skip_inactive_heads=True`` a Triton split-K kernel (patchattn.kernels.moh) reads only the active heads' keys and
values. Measured on the H200 (scripts/bench_moh_decode.py, benchmarks/results/moh_decode.json) it does not pay yet:
skipping cuts the kernel's own time by up to 42% (MHA, 50% active, 131k context: 1.58 → 0.92 ms) but the kernel is
~3x slower than cuDNN's dense decode (0.52 ms), and with GQA nearly every KV head stays needed. Hence off by default.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import exact_attention
from .affine import valid_queries
from .base import REPLACEMENT, VariantParams, module_dims, param, register_variant
from .gated import HiddenStatesVariant


@dataclasses.dataclass
class MoHParams(VariantParams):
    router: str = param("learned", choices=("learned", "query_norm"),
                        help="learned two-stage router (paper) or the parameter-free query-norm router (LLaMA3-8B)")
    shared_heads: float = param(0.5, low=0.0, high=1.0, help="fraction of heads (the first ones) always active")
    active_heads: float = param(1.0, low=0.0, high=1.0,
                                help="fraction of all heads active per token: shared + top-k routed (1.0 = all)")
    aux_loss_weight: float = param(0.01, low=0.0, help="weight of the load-balance loss (load_balance_loss)")
    skip_inactive_heads: bool = param(False, help="decode steps on CUDA read only the active heads' KV cache (Triton "
                                                  "kernel; slower than dense SDPA on the H200, see module docstring)")

    def validate(self) -> None:
        super().validate()
        if self.active_heads < self.shared_heads:
            raise ValueError(f"moh: parameter 'active_heads' ({self.active_heads}) must be >= 'shared_heads' "
                             f"({self.shared_heads}): shared heads are always active")
        if self.active_heads == 0.0:
            raise ValueError("moh: parameter 'active_heads' must be in (0, 1], got 0.0")


def head_counts(params: MoHParams, heads: int) -> tuple[int, int, int]:
    """``(shared, routed, top_k)`` head counts for a ``heads``-head layer (floor, as MoH-LLaMA3 does)."""
    shared = int(math.floor(params.shared_heads * heads + 1e-6))
    active = int(math.floor(params.active_heads * heads + 1e-6))
    routed, top_k = heads - shared, active - shared
    if active < 1:
        raise ValueError(f"moh: parameter 'active_heads'={params.active_heads} leaves no active head on a {heads}-head "
                         f"layer; use at least {1 / heads:.4g}")
    if routed > 0 and top_k < 1:
        raise ValueError(f"moh: parameter 'active_heads'={params.active_heads} selects no routed head on a "
                         f"{heads}-head layer ({shared} shared, {routed} routed); it must exceed 'shared_heads' by at "
                         f"least {1 / heads:.4g}, or set shared_heads=1.0")
    return shared, routed, top_k


@register_variant
class MoHAttention(HiddenStatesVariant):
    name = "moh"
    description = ("Mixture-of-Head attention (arXiv 2410.11842): shared heads + top-k routed heads per token with "
                   "two-stage weights and a load-balance loss, or the query-norm router (MoH-LLaMA3).")
    trainable = True
    Params = MoHParams
    role = REPLACEMENT

    def __init__(self, params, layer_idx):
        super().__init__(params, layer_idx)
        self.aux_loss: torch.Tensor | None = None

    @classmethod
    def auxiliary_loss(cls, model: nn.Module, weighted: bool = True) -> torch.Tensor:
        """The load-balance loss (:func:`load_balance_loss`)."""
        return load_balance_loss(model, weighted=weighted)

    def build(self, attention_module):
        heads, _, hidden = module_dims(attention_module)
        self.heads = heads
        self.shared, self.routed, self.top_k = head_counts(self.params, heads)
        if self.params.router != "learned":
            return
        if self.routed > 0:
            self.routed_router = self._zero_linear(hidden, self.routed)
        if self.shared > 1:
            self.shared_router = self._zero_linear(hidden, self.shared)
        if self.shared > 0 and self.routed > 0:
            self.stage_router = self._zero_linear(hidden, 2)

    @staticmethod
    def _zero_linear(n_in: int, n_out: int) -> nn.Linear:
        layer = nn.Linear(n_in, n_out, bias=False)
        nn.init.zeros_(layer.weight)
        return layer

    def _logits(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return layer(x.to(layer.weight.dtype)).float()

    def _topk_mask(self, scores: torch.Tensor) -> torch.Tensor:
        if self.top_k >= self.routed:
            return torch.ones_like(scores)
        indices = scores.topk(self.top_k, dim=-1).indices
        return torch.zeros_like(scores).scatter_(-1, indices, 1.0)

    def head_weights(self, x: torch.Tensor, query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-token head weights ``[b, q, heads]`` (float32); sets ``aux_loss`` in training mode."""
        b, q_len = x.shape[:2]
        self.aux_loss = None
        if self.params.router == "query_norm":
            if self.routed == 0 or self.top_k >= self.routed:
                return torch.ones(b, q_len, self.heads, device=x.device)
            norms = query[:, self.shared:].float().norm(dim=-1).transpose(1, 2)  # [b, q, routed]
            mask = self._topk_mask(norms)
            return torch.cat([torch.ones(b, q_len, self.shared, device=x.device), mask], dim=-1)

        parts = []
        if self.shared > 0:
            shared = (F.softmax(self._logits(self.shared_router, x), dim=-1) * self.shared if self.shared > 1
                      else torch.ones(b, q_len, 1, device=x.device))
            parts.append(shared)
        if self.routed > 0:
            gates = F.softmax(self._logits(self.routed_router, x), dim=-1)  # [b, q, routed]
            mask = self._topk_mask(gates)
            selected = gates * mask
            routed = selected / selected.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
            parts.append(routed * self.top_k)
            if self.training:
                w = valid[..., None].float()
                n = w.sum().clamp(min=1.0)
                me, ce = (gates * w).sum(dim=(0, 1)) / n, (mask * w).sum(dim=(0, 1)) / n
                self.aux_loss = (me * ce).mean() * self.routed ** 2
        if self.shared > 0 and self.routed > 0:
            stage = F.softmax(self._logits(self.stage_router, x), dim=-1) * 2.0  # [b, q, 2]
            parts = [parts[0] * stage[..., :1], parts[1] * stage[..., 1:]]
        return torch.cat(parts, dim=-1)

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        b, _, q_len, _ = query.shape
        x = self.take_hidden_states(module, q_len)
        valid = valid_queries(attention_mask, b, q_len, key.shape[2], query.device)
        gates = self.head_weights(x, query, valid)
        if self._can_skip_heads(query, attention_mask, kwargs):
            out, weights = self._active_heads_decode(query, key, value, gates, kwargs["scaling"]), None
        else:
            out, weights = exact_attention(module, query, key, value, attention_mask, **kwargs)
        return out * gates[..., None].to(out.dtype), weights

    def _can_skip_heads(self, query, attention_mask, kwargs) -> bool:
        """Skipping pays at decode (one token, memory-bound on the KV cache) with fewer heads active than exist;
        the kernel handles plain causal decode (no mask tensor: no padding, no sliding window), no softcap."""
        return (self.params.skip_inactive_heads and query.is_cuda and query.shape[2] == 1
                and self.top_k < self.routed and attention_mask is None and kwargs.get("softcap") is None
                and not kwargs.get("output_attentions") and not (self.training and kwargs.get("dropout")))

    def _active_heads_decode(self, query, key, value, gates, scale):
        from patchattn.kernels.moh.triton_decode import active_head_decode

        # Active heads in ascending order: dropped heads (weight exactly 0) sort after every active index.
        heads = torch.arange(self.heads, device=query.device)
        order = heads + self.heads * (gates[:, 0] == 0).long()
        table = order.sort(dim=-1).values[:, : self.shared + self.top_k]
        return active_head_decode(query, key, value, table, scale)


def load_balance_loss(model: nn.Module, weighted: bool = True) -> torch.Tensor:
    """Sum of the MoH layers' load-balance losses from the last training forward, times each layer's
    ``aux_loss_weight`` (``weighted=False``: unweighted). Add it to the LM loss before ``backward``. A zero tensor
    when no MoH layer produced one (eval mode, the query-norm router, no routed heads). With every routed head
    active the loss is the constant R per layer and has no gradient."""
    losses = [m.aux_loss * (m.params.aux_loss_weight if weighted else 1.0)
              for m in model.modules() if isinstance(m, MoHAttention) and m.aux_loss is not None]
    if not losses:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=None if ref is None else ref.device)
    device = losses[0].device
    return torch.stack([loss.to(device) for loss in losses]).sum()

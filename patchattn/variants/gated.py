"""`gated`: the G1 output gate of "Gated Attention for Large Language Models" (Qiu et al., arXiv 2505.06708).

The paper's best position (G1) multiplies the SDPA output of every head, before ``o_proj``, by a sigmoid gate
computed from the same (pre-normalised) hidden states ``X`` the query/key/value projections read:
``Y' = Y ⊙ σ(X W_θ)``, per head (one scalar per head, "headwise") or per channel ("elementwise"). The released
Qwen3 code (github.com/qiuzh20/gated_attention) widens ``q_proj`` to produce the gate scores, so the gate has a
bias exactly when ``q_proj`` has one; the paper's formula has none.

To continue-train a pretrained model, patchattn writes the gate as ``2·σ(X W_g [+ b_g])`` with ``W_g`` (and
``b_g``) zero-initialised: ``2·σ(0) = 1`` exactly, so the patched model starts at the original one, bit for bit,
and the gate can learn to damp (→ 0) or amplify (→ 2) each head. Attention itself is untouched (``exact_attention``,
or in a composition the attention of the variant under the gate, ``Variant.inner_attention``:
sliding windows, softcap, GQA, KV cache all as before).

This module also holds :class:`HiddenStatesVariant`, the base class of the variants whose parameters act on the
attention module's input (gated, affine, moh): it captures ``hidden_states`` with a forward pre-hook on the
attention module for the duration of the call.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .base import KV_CACHE, MODIFIER, PREFILL, Variant, VariantParams, handoff, module_dims, param, register_variant

_HIDDEN_STATES = "hidden_states"


def _reference_parameter(module: nn.Module, own: nn.Module):
    own_ids = {id(p) for p in own.parameters()}
    return next((p for p in module.parameters() if id(p) not in own_ids), None)


class HiddenStatesVariant(Variant):
    """A variant whose parameters read the attention module's input ``x`` (gates, routers, scale predictors).

    ``attach`` registers a forward pre-hook that hands ``hidden_states`` (first positional argument or keyword)
    to the variant through the module's :func:`handoff`, calls :meth:`build` to create the parameters for this
    module's shapes, and moves them to the module's device and dtype. ``attention`` takes the stored ``x``
    (``[b, q, hidden]``: at decode steps the new token's hidden state) with :meth:`take_hidden_states`, which also
    drops the reference. ``detach`` removes the hook.
    """

    def __init__(self, params: VariantParams, layer_idx: int):
        super().__init__(params, layer_idx)
        self._hook = None

    def build(self, attention_module: nn.Module) -> None:
        """Create this layer's parameters (zero/identity-initialised) for ``attention_module``'s shapes."""

    def attach(self, attention_module: nn.Module) -> None:
        self.build(attention_module)
        self.train(attention_module.training)  # a new module defaults to training mode; follow the model's
        ref = _reference_parameter(attention_module, self)
        if ref is not None:
            self.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        self._hook = attention_module.register_forward_pre_hook(self._capture, with_kwargs=True)

    def detach(self, attention_module: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = None
        handoff(attention_module).pop(_HIDDEN_STATES, None)

    @staticmethod
    def _capture(module, args, kwargs):
        handoff(module)[_HIDDEN_STATES] = args[0] if args else kwargs.get("hidden_states")
        return None

    def take_hidden_states(self, module: nn.Module, q_len: int) -> torch.Tensor:
        x = handoff(module).pop(_HIDDEN_STATES, None)
        if x is None:
            raise RuntimeError(f"{self.name}: no hidden states were captured for layer {self.layer_idx}; the attention "
                               "function must run inside the attention module's forward (call the module)")
        if x.shape[-2] != q_len:
            raise RuntimeError(f"{self.name}: captured hidden states have {x.shape[-2]} positions but the attention "
                               f"call has {q_len} queries (layer {self.layer_idx})")
        return x


@dataclasses.dataclass
class GatedParams(VariantParams):
    granularity: str = param("head", choices=("head", "channel"),
                             help="one gate per head (headwise) or per head-dim channel (elementwise)")
    bias: bool = param(False, help="learn a (zero-initialised) bias in the gate projection")


@register_variant
class GatedAttention(HiddenStatesVariant):
    name = "gated"
    description = ("Gated attention (G1, arXiv 2505.06708): SDPA output × 2σ(x W_g), per head or channel; "
                   "zero-init W_g starts at the original model.")
    trainable = True
    Params = GatedParams
    role = MODIFIER
    stacks_over = (KV_CACHE, PREFILL)  # the gate multiplies whatever output the attention under it gives

    def build(self, attention_module):
        heads, head_dim, hidden = module_dims(attention_module)
        self.heads = heads
        self.width = 1 if self.params.granularity == "head" else head_dim
        self.gate = nn.Linear(hidden, heads * self.width, bias=self.params.bias)
        nn.init.zeros_(self.gate.weight)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        b, _, q_len, _ = query.shape
        x = self.take_hidden_states(module, q_len)
        out, weights = self.inner_attention(module, query, key, value, attention_mask, **kwargs)
        gate = 2.0 * torch.sigmoid(self.gate(x.to(self.gate.weight.dtype)).float())  # exactly 1.0 at init
        out = out * gate.view(b, q_len, self.heads, self.width).to(out.dtype)
        return out, weights

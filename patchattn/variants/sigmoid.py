"""`sigmoid`: sigmoid attention (Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid
Self-Attention", arXiv 2409.04431; code github.com/apple/ml-sigmoid-attention).

``SigmoidAttn(Q, K, V) = σ(QKᵀ·scaling + b) V`` with no row normalisation. The paper's best practices: the bias
``b = −log n`` keeps each row's total weight O(1) at initialisation, and a normalisation of the attention output
("Hybrid-Norm", or LayerScale) stabilises the large initial attention-output norms. The released LM configs use a
constant ``b = −log(training length)`` (``sigmoid_bias: -7.62`` = −log 2048).

Choices here (``bias``):

* ``"visible_keys"`` (default): ``b_i = −log n_i`` with ``n_i`` the number of keys query ``i`` may attend
  (causal prefix, minus padding, inside a sliding window). For a causal LM this is the paper's ``−log n`` applied
  row by row, so early positions are not starved, and it is the same at a decode step as in a full forward.
* ``"context"``: the released configs' constant ``b = −log(context_length)``.

Output norm (``norm``), an RMSNorm (the supported families are RMSNorm models):

* ``"head"`` (default): per head over ``head_dim`` on the attention output before ``o_proj``. It removes the
  per-token, per-head scale sigmoid attention introduces relative to softmax (σ(s − log n) ≈ e^s / n, so a row
  sums to mean(e^s) instead of 1), which suits converting a softmax-trained model.
* ``"output"``: the paper's Hybrid-Norm placement, over ``hidden_size`` on the attention module's output (after
  ``o_proj``, before the residual add), applied with a forward hook.
* ``"none"``.

The gains start at 1. "Initialised to preserve scale": :func:`calibrate_output_norm` runs one batch through the
original softmax attention and sets each gain to the mean RMS the original model produces at that point (per
head for ``"head"``, per layer for ``"output"``), so the normalised sigmoid output has the original's scale.
Call it once on real text before training (and before DDP/FSDP wrapping: it is a data-dependent initialisation).
Zero-step perplexity of SmolLM2-135M on Shakespeare (256-token windows, calibrated on 512 tokens of the KJV
sample): 26.8 softmax; sigmoid with ``norm="head"`` uncalibrated ~1e6, calibrated 120; ``norm="output"``
calibrated 669.

Sigmoid attention cannot start at the original model (different normalisation): a patched model needs training.

Two implementations of the same function:

* On CUDA, the Triton FlashSigmoid kernels (``patchattn.kernels.sigmoid``: tiled forward and backward, no
  ``[q, k]`` weights in memory, no row max/sum, GQA without expanding K/V) whenever they express the call: causal
  mask (prefill, chunked prefill over a cache and decode steps alike), optionally with left padding, head dim in
  ``SUPPORTED_HEAD_DIMS``, fp16/bf16/fp32, no softcap, no attention dropout, weights not requested.
* Otherwise the PyTorch path (materialised ``[q, k]`` weights, GQA without expanding K/V): the implementation on CPU,
  and the documented fallback on CUDA for softcap (Gemma 2), sliding-window / packed / custom masks, right padding,
  attention dropout in training, ``output_attentions`` and other head dims; the fallback is logged once per reason.

``KERNEL_ON_CPU = True`` sends CPU tensors to the kernels as well; that only works under Triton's CPU interpreter
(``TRITON_INTERPRET=1`` set before triton is imported; without it CPU tensors keep the PyTorch path, logged) and is
how the tests compare both paths without a GPU.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchattn.kernels import triton_can_take
from patchattn.kernels.sigmoid import kernel_supports, sigmoid_attention, triton_available

from ..attention import causal_bool_mask, exact_attention, key_padding_from_mask
from ..logging_utils import warn_once
from .affine import valid_queries, visible_keys
from .base import REPLACEMENT, Variant, VariantParams, module_dims, param, register_variant
from .gated import _reference_parameter

_EPS = 1e-6
#: send CPU tensors to the Triton kernels too (only under TRITON_INTERPRET=1; see the module docstring)
KERNEL_ON_CPU = False


def _rms_norm(x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + _EPS) * gain.float()


@dataclasses.dataclass
class SigmoidParams(VariantParams):
    bias: str = param("visible_keys", choices=("visible_keys", "context"),
                      help="b = −log n per query (n = visible keys) or constant −log(context_length)")
    context_length: int = param(4096, low=1, help="n of the constant bias when bias='context'")
    norm: str = param("head", choices=("head", "output", "none"),
                      help="RMSNorm on each head's output (before o_proj), on the attention output (Hybrid-Norm), "
                           "or none")


@register_variant
class SigmoidAttention(Variant):
    name = "sigmoid"
    description = ("Sigmoid attention (arXiv 2409.04431): σ(QKᵀ/√d − log n)·V with an output RMSNorm; needs training "
                   "(different normalisation).")
    trainable = True
    Params = SigmoidParams
    role = REPLACEMENT

    def __init__(self, params, layer_idx):
        super().__init__(params, layer_idx)
        self._hook = None
        self._calibration: list | None = None  # [sum of RMS, count] while calibrate_output_norm runs
        self._valid: torch.Tensor | None = None

    def attach(self, attention_module):
        heads, head_dim, hidden = module_dims(attention_module)
        if self.params.norm == "head":
            self.gain = nn.Parameter(torch.ones(heads, head_dim))
        elif self.params.norm == "output":
            self.gain = nn.Parameter(torch.ones(hidden))
            self._hook = attention_module.register_forward_hook(self._norm_output)
        self.train(attention_module.training)
        ref = _reference_parameter(attention_module, self)
        if ref is not None:
            self.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)

    def detach(self, attention_module):
        if self._hook is not None:
            self._hook.remove()
        self._hook = None

    # -- the attention function ------------------------------------------------------------------------------
    def attention(self, module, query, key, value, attention_mask, *, scaling, dropout=0.0, softcap=None,
                  output_attentions=False, **kwargs):
        b, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        if self._calibration is not None:
            return self._calibrate(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                   softcap=softcap, **kwargs)
        out = self._kernel_attention(query, key, value, attention_mask, scaling, dropout, softcap, output_attentions)
        attn = None
        if out is None:
            out, attn = self._torch_attention(query, key, value, attention_mask, scaling, dropout, softcap,
                                              output_attentions)
        if self.params.norm == "head":
            out = _rms_norm(out, self.gain).to(value.dtype)
        elif self.params.norm == "output":
            self._valid = valid_queries(attention_mask, b, q_len, k_len, query.device)
        return out.contiguous(), attn

    def _kernel_attention(self, query, key, value, attention_mask, scaling, dropout, softcap, output_attentions):
        """FlashSigmoid output ``[b, q, h, d]`` (before the norm), or None where the PyTorch path must run."""
        if not (query.is_cuda or KERNEL_ON_CPU):
            return None  # on CPU the PyTorch path is the implementation, not a fallback
        q_len, k_len = query.shape[2], key.shape[2]
        key_start, reason = None, None
        if not triton_available():
            reason = "triton is not installed"
        elif not triton_can_take(query):
            reason = f"{query.device} tensors need TRITON_INTERPRET=1 for the kernels"
        elif not kernel_supports(query, key, value):
            reason = f"head dim {query.shape[-1]} / dtype {query.dtype} is not covered by the kernels"
        elif softcap is not None:
            reason = "attention logit softcapping is not in the kernels"
        elif output_attentions:
            reason = "attention weights were requested"
        elif dropout and self.training:
            reason = "attention dropout is not in the kernels"
        else:
            ok, key_valid = key_padding_from_mask(attention_mask, q_len, k_len)
            if not ok:
                reason = "the mask is not causal + padding (sliding window, packed or custom mask)"
            elif key_valid is not None:
                key_start = _left_padding_starts(key_valid)
                if key_start is None:
                    reason = "key padding other than left padding"
        if reason is not None:
            warn_once(f"sigmoid: {reason}; using the PyTorch path (materialised attention weights)")
            return None
        if self.params.bias == "context":
            row_bias = -math.log(self.params.context_length)
        else:  # −log(visible keys): query i at position k_len − q_len + i sees the keys key_start .. position
            count = torch.arange(q_len, device=query.device) + (k_len - q_len + 1)
            if key_start is not None:
                count = count - key_start[:, None]
            row_bias = -torch.log(count.clamp(min=1).float())
        out = sigmoid_attention(query, key, value, scale=scaling, row_bias=row_bias, causal=True,
                                key_start=key_start)
        return out.transpose(1, 2)

    def _torch_attention(self, query, key, value, attention_mask, scaling, dropout, softcap, output_attentions):
        """Materialised weights: ``(out [b, q, h, d] before the norm, weights [b, h, q, k] | None)``."""
        b, h, q_len, d = query.shape
        hk, k_len = key.shape[1], key.shape[2]
        visible = visible_keys(attention_mask, q_len, k_len)
        if visible is None and q_len > 1:
            visible = causal_bool_mask(q_len, k_len, query.device)[None].expand(b, q_len, k_len)
        qg = query.reshape(b, hk, h // hk, q_len, d)  # GQA: group the query heads, K/V stay [b, hk, k, d]
        scores = torch.matmul(qg, key.unsqueeze(2).transpose(-1, -2)).float() * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if self.params.bias == "context":
            scores = scores - math.log(self.params.context_length)
        else:
            count = (torch.full((b, q_len), k_len, device=query.device) if visible is None
                     else visible.sum(dim=-1)).clamp(min=1)
            scores = scores - torch.log(count.float())[:, None, None, :, None]
        weights = torch.sigmoid(scores)
        if visible is not None:
            weights = weights.masked_fill(~visible[:, None, None], 0.0)
        if dropout and self.training:
            weights = F.dropout(weights, p=dropout)
        out = torch.matmul(weights.to(value.dtype), value.unsqueeze(2)).reshape(b, h, q_len, -1).transpose(1, 2)
        attn = weights.reshape(b, h, q_len, k_len).to(query.dtype) if output_attentions else None
        return out, attn

    def _norm_output(self, module, args, output):
        valid, self._valid = self._valid, None
        hidden = output[0] if isinstance(output, tuple) else output
        if self._calibration is not None:
            self._record(hidden.float().pow(2).mean(dim=-1).sqrt(), valid)
            return None
        normed = _rms_norm(hidden, self.gain).to(hidden.dtype)
        return (normed, *output[1:]) if isinstance(output, tuple) else normed

    # -- calibration -----------------------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """The output-norm gains (:func:`calibrate_output_norm`)."""
        calibrate_output_norm(model, input_ids, attention_mask)

    def _calibrate(self, module, query, key, value, attention_mask, **kwargs):
        """Run the original softmax attention (so every layer sees the original model's activations) and record
        the RMS the gain should reproduce."""
        out, weights = exact_attention(module, query, key, value, attention_mask, **kwargs)
        valid = valid_queries(attention_mask, query.shape[0], query.shape[2], key.shape[2], query.device)
        if self.params.norm == "head":
            self._record(out.float().pow(2).mean(dim=-1).sqrt(), valid)  # [b, q, h]
        elif self.params.norm == "output":
            self._valid = valid
        return out, weights

    def _record(self, rms: torch.Tensor, valid: torch.Tensor | None) -> None:
        if valid is None:
            valid = torch.ones(rms.shape[:2], dtype=torch.bool, device=rms.device)
        w = valid.float().reshape(*valid.shape, *([1] * (rms.dim() - 2)))
        total = torch.nan_to_num(rms * w).sum(dim=(0, 1))
        self._calibration[0] = self._calibration[0] + total
        self._calibration[1] = self._calibration[1] + w.sum()


def _left_padding_starts(key_valid: torch.Tensor) -> torch.Tensor | None:
    """``[b]`` index of the first valid key when ``key_valid [b, k]`` is left padding (a run of invalid keys, then
    valid ones), else None."""
    start = key_valid.shape[1] - key_valid.sum(dim=-1)
    left = torch.arange(key_valid.shape[1], device=key_valid.device) >= start[:, None]
    return start if torch.equal(left, key_valid) else None


@torch.no_grad()
def calibrate_output_norm(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                          ) -> int:
    """Set the output-norm gains of every `sigmoid` layer so the normalised output has the RMS of the original
    softmax attention on this batch (per head for ``norm="head"``, per layer for ``norm="output"``). Returns the
    number of layers calibrated. A data-dependent initialisation: call it once, before training and before wrapping
    the model for distributed training."""
    layers = [m for m in model.modules() if isinstance(m, SigmoidAttention) and m.params.norm != "none"]
    for layer in layers:
        layer._calibration = [0.0, 0.0]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        for layer in layers:
            total, count = layer._calibration
            if not torch.is_tensor(total):
                raise RuntimeError(f"sigmoid: layer {layer.layer_idx} did not run during calibration")
            mean_rms = (total / count.clamp(min=1.0)).to(layer.gain.dtype)
            if layer.params.norm == "head":
                layer.gain.copy_(mean_rms[:, None].expand_as(layer.gain))
            else:
                layer.gain.fill_(float(mean_rms))
    finally:
        for layer in layers:
            layer._calibration = None
            layer._valid = None
    return len(layers)

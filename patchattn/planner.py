"""Error-budget planning: which layers can take an approximate variant for a given perplexity budget.

Two measurements, cheap first:
  1. one exact forward over a calibration window captures every layer's attention inputs; each layer's variant
     output is compared with exact attention on those real tensors (relative error, per layer);
  2. layers are added in order of increasing error while the measured perplexity increase stays in budget
     (bisection on the number of layers, a handful of forwards).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import exact_attention
from .evaluation import perplexity
from .patching import patch_model, resolve_family, unpatch_model
from .variants import get_variant

_CAPTURE = "patchattn_capture"


@contextmanager
def capture_attention_inputs(model):
    """Run exact attention while keeping every layer's ``(query, key, value, kwargs)`` (last call per layer)."""
    resolve_family(model)
    store: dict[int, tuple] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        store[module.layer_idx] = (query.detach(), key.detach(), value.detach(), attention_mask,
                                   {k: kwargs[k] for k in ("scaling", "softcap", "sliding_window") if k in kwargs})
        return exact_attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
    original = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE)
    try:
        yield store
    finally:
        model.set_attn_implementation(original)


class _Module:
    """Stand-in for an attention module when replaying captured tensors."""

    training = False
    is_causal = True

    def __init__(self, layer_idx: int, num_key_value_groups: int):
        self.layer_idx = layer_idx
        self.num_key_value_groups = num_key_value_groups


@torch.inference_mode()
def capture(model, input_ids: torch.Tensor) -> dict[int, tuple]:
    """One exact forward; returns each layer's attention inputs."""
    with capture_attention_inputs(model) as store:
        model(input_ids=input_ids, logits_to_keep=1)
    return store


@torch.inference_mode()
def layer_errors(store: dict[int, tuple], variant: str, progress: bool = True, **params) -> dict[int, float]:
    """Relative error ``||o - o_exact|| / ||o_exact||`` of ``variant`` on each layer's captured attention inputs."""
    cls = get_variant(variant)
    vparams = cls.make_params(**params)
    errors = {}
    for idx in tqdm(sorted(store), desc=f"{variant} error per layer", disable=not progress):
        q, k, v, mask, kw = store[idx]
        module = _Module(idx, q.shape[1] // k.shape[1])
        ref, _ = exact_attention(module, q, k, v, mask, **kw)
        out, _ = cls(vparams, layer_idx=idx).attention(module, q, k, v, mask, **kw)
        errors[idx] = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return errors


@dataclass
class Plan:
    variant: str
    params: dict
    layers: list[int]
    baseline_ppl: float
    ppl: float
    budget: float
    errors: dict[int, float]
    tried: list[dict] = field(default_factory=list)


def plan_layers(model, tokenizer, text: str, variant: str, *, max_ppl_increase: float = 0.05,
                context_length: int = 8192, max_tokens: int | None = None, candidates: list[int] | None = None,
                progress: bool = True, **params) -> Plan:
    """The largest set of lowest-error layers whose perplexity increase stays within ``max_ppl_increase``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :context_length]
    errors = layer_errors(capture(model, ids), variant, progress=progress, **params)
    # layers where the variant falls back to exact (error 0, e.g. sliding-window layers) stay unpatched
    errors = {i: e for i, e in errors.items() if e > 0 and (candidates is None or i in candidates)}
    order = sorted(errors, key=errors.get)
    evaluate = lambda: perplexity(model, tokenizer, text, context_length=context_length,  # noqa: E731
                                  max_tokens=max_tokens, progress=progress).ppl
    baseline = evaluate()
    tried = []

    def ppl_with(count: int) -> float:
        patch_model(model, variant, layers=order[:count], **params)
        try:
            value = evaluate()
        finally:
            unpatch_model(model)
        tried.append({"layers": sorted(order[:count]), "ppl": value})
        return value

    lo, hi, best_ppl = 0, len(order), baseline  # invariant: lo layers fit the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        value = ppl_with(mid)
        if value <= baseline * (1 + max_ppl_increase):
            lo, best_ppl = mid, value
        else:
            hi = mid - 1
    return Plan(variant, params, sorted(order[:lo]), baseline, best_ppl, max_ppl_increase, errors, tried)

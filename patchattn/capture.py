"""Capture every layer's attention inputs ``(query, key, value, mask, kwargs)`` in one forward of exact attention.

Used wherever a decision is measured on a model's real tensors: the planner's per-layer errors, ACT's head search,
the retrieval-head search that prefill variants run when they are patched. On a patched model (a composition) the
dispatcher hands every layer to the open capture instead of its variants (:func:`active_capture`): queries and keys
are the model's own either way, and no variant records a call it did not run. It sits below patching.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import EXACT_BACKEND_ATTR, exact_attention

_CAPTURE = "capture_attention_inputs"  # not "patchattn_*": those names are the variants' own
_ACTIVE: list[Callable] = []


def active_capture() -> Callable | None:
    """The attention function of the innermost open :func:`capture_attention_inputs` (patched models' dispatcher
    runs it instead of the variants), or None."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def capture_attention_inputs(model):
    """Run exact attention while keeping every layer's ``(query, key, value, mask, kwargs)`` (last call per layer)."""
    store: dict[int, tuple] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        store[module.layer_idx] = (query.detach(), key.detach(), value.detach(), attention_mask,
                                   {k: kwargs[k] for k in ("scaling", "softcap", "sliding_window") if k in kwargs})
        return exact_attention(module, query, key, value, attention_mask, **kwargs)

    _ACTIVE.append(capture)
    original = model.config._attn_implementation
    # patch_model / from_pretrained set the exact backend on a patched model's layers: its dispatcher asks
    # active_capture(). Others (incl. attn_implementation="patchattn_<name>", which has no dispatcher) switch over.
    patched = any(EXACT_BACKEND_ATTR in m.__dict__ for m in model.modules())
    if not patched:
        AttentionInterface.register(_CAPTURE, capture)
        AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
        model.set_attn_implementation(_CAPTURE)
    try:
        yield store
    finally:
        _ACTIVE.remove(capture)
        if not patched:
            model.set_attn_implementation(original)

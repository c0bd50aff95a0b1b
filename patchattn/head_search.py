"""Head search for the ``act`` variant (ACT, arXiv 2406.15765): which heads to calibrate, found on calibration data
by patching the model one head at a time. It drives ``patch_model``, so it sits above :mod:`patchattn.patching`
(the variant itself, :mod:`patchattn.variants.act`, knows nothing of patching).

    found = search_heads(model, input_ids, score)
    patchattn.patch_model(model, "act", heads=found.heads, **found.params)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .capture import capture_attention_inputs
from .patching import is_patched, patch_model, resolve_family, unpatch_model
from .variants.act import ActAttention, head_changes


@dataclass
class HeadSearch:
    """Result of :func:`search_heads`; ``heads`` goes to ``patch_model(model, "act", heads=...)``."""

    heads: dict[int, list[int]]
    baseline: float  # calibration score of the original model
    score: float  # calibration score with ``heads`` calibrated
    changes: dict[str, float] = field(default_factory=dict)  # "layer.head" -> relative change of that head's output
    gains: dict[str, float] = field(default_factory=dict)  # "layer.head" -> score gain of that head alone
    without_sinks: int = 0  # heads with no hidden sink on the calibration input: calibrating them changes nothing
    params: dict = field(default_factory=dict)


@contextmanager
def _replay_prefix(layers: nn.ModuleList, outputs: list, stop: int):
    """Decoder layers before ``stop`` return their recorded outputs instead of computing them: calibrating layer
    ``stop`` cannot change them, so the forward is the same, minus the work."""
    saved = [layers[i].__dict__.get("forward") for i in range(stop)]  # e.g. accelerate's device hooks
    for i in range(stop):
        layers[i].forward = (lambda out: lambda *args, **kwargs: out)(outputs[i])
    try:
        yield
    finally:
        for i in range(stop):
            if saved[i] is None:
                del layers[i].forward
            else:
                layers[i].forward = saved[i]


@torch.inference_mode()
def search_heads(model, input_ids: torch.Tensor, score: Callable[[torch.Tensor], float], *,
                 attention_mask: torch.Tensor | None = None, layers: Sequence[int] | None = None, beta: float = 0.4,
                 theta: float = 0.1, threshold: str = "absolute", block_size: int = 256, max_heads: int | None = None,
                 min_gain: float = 0.0, combine: str = "greedy", known: dict[str, float] | None = None,
                 on_trial: Callable[[str, float], None] | None = None, progress: bool = True) -> HeadSearch:
    """Choose the heads to calibrate on a calibration batch, as in the paper: calibrate one head at a time and keep
    those that improve ``score`` (a function of the last position's logits ``[batch, vocab]``, higher is better)
    by more than ``min_gain``. ``combine="union"`` keeps all of them (the paper); ``"greedy"`` then adds them in
    order of their own gain and keeps each only if the score with the heads kept so far still improves.

    Cheap first: one forward records every layer's attention inputs; heads without a hidden sink on this input are
    skipped (calibrating them is the identity), and ``max_heads`` keeps only the heads whose own output changes
    most under calibration (None: all). Each single-head forward replays the unchanged layers before it.

    A long search can be resumed: ``on_trial(key, gain)`` is called after each single-head trial ("layer.head"),
    and ``known`` passes those results back (same model, data and settings); they are not measured again.
    """
    if combine not in ("greedy", "union"):
        raise ValueError(f"combine must be 'greedy' or 'union', got {combine!r}")
    if max_heads is not None and max_heads < 1:
        raise ValueError(f"max_heads must be at least 1 (or None for all), got {max_heads}")
    if is_patched(model):
        raise ValueError("search_heads needs the original model; call patchattn.unpatch_model(model) first")
    act = dict(beta=beta, theta=theta, threshold=threshold, block_size=block_size)
    ActAttention.make_params(**act)  # validate before the expensive part
    decoder_layers = resolve_family(model).decoder_layers(model)
    candidates = range(len(decoder_layers)) if layers is None else sorted(set(layers))

    def run() -> float:
        return float(score(model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1,
                                 use_cache=False).logits[:, -1].float()))

    outputs: list = [None] * len(decoder_layers)
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
             for i, layer in enumerate(decoder_layers)]
    try:
        with capture_attention_inputs(model) as store:
            baseline = run()
    finally:
        for hook in hooks:
            hook.remove()

    changes = {}
    for layer in candidates:
        q, k, v, mask, kw = store.pop(layer)
        per_head = head_changes(q, k, v, mask, scaling=kw["scaling"], softcap=kw.get("softcap"), **act)
        changes.update({(layer, h): float(c) for h, c in enumerate(per_head)})
    store.clear()
    ranked = sorted((lh for lh, c in changes.items() if c > 0), key=lambda lh: -changes[lh])[:max_heads]

    gains = {}
    for layer, head in tqdm(sorted(ranked), desc="act: heads", disable=not progress):
        if known and f"{layer}.{head}" in known:
            gains[(layer, head)] = known[f"{layer}.{head}"]
            continue
        patch_model(model, "act", layers=[layer], heads={layer: [head]}, **act)
        try:
            with _replay_prefix(decoder_layers, outputs, layer):
                gains[(layer, head)] = run() - baseline
        finally:
            unpatch_model(model)
        if on_trial is not None:
            on_trial(f"{layer}.{head}", gains[(layer, head)])
    improving = sorted((lh for lh, g in gains.items() if g > min_gain), key=lambda lh: -gains[lh])

    def score_with(chosen: list[tuple[int, int]]) -> float:
        if not chosen:
            return baseline
        patch_model(model, "act", heads=_as_spec(chosen), **act)
        try:
            return run()
        finally:
            unpatch_model(model)

    if combine == "union":
        kept = improving
        final = score_with(kept)
    else:
        kept, final = [], baseline
        for lh in tqdm(improving, desc="act: greedy", disable=not progress):
            trial = score_with(kept + [lh])
            if trial > final + min_gain:
                kept, final = kept + [lh], trial
    key = lambda lh: f"{lh[0]}.{lh[1]}"
    return HeadSearch(heads=_as_spec(kept), baseline=baseline, score=final,
                      changes={key(lh): c for lh, c in sorted(changes.items())},
                      gains={key(lh): g for lh, g in sorted(gains.items())},
                      without_sinks=sum(c == 0 for c in changes.values()), params=act)


def _as_spec(pairs: list[tuple[int, int]]) -> dict[int, list[int]]:
    spec: dict[int, list[int]] = {}
    for layer, head in sorted(pairs):
        spec.setdefault(layer, []).append(head)
    return spec

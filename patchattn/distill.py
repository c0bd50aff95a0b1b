"""Layer-by-layer attention transfer: the shared machinery of stage 1 of ``recipes/distill.py``.

Inside ``with attention_transfer(model):`` every patched layer runs its variant *and* the original softmax attention,
returns the original's output (so each layer sees the teacher's activations) and accumulates the MSE between the
two. ``attention_transfer_loss(model)`` sums and clears those losses; train the variant's new parameters on it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .variants.base import Variant


def _variant_layers(model: nn.Module) -> list[Variant]:
    return [m for m in model.modules() if isinstance(m, Variant)]


@contextmanager
def attention_transfer(model: nn.Module):
    layers = _variant_layers(model)
    if not layers:
        raise ValueError("attention_transfer: the model has no patched layers; call patchattn.patch_model first")
    for layer in layers:
        layer.transfer_mode, layer.transfer_loss = True, None
    try:
        yield layers
    finally:
        for layer in layers:
            layer.transfer_mode, layer.transfer_loss = False, None


def attention_transfer_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the per-layer output MSEs recorded since the last call (and clear them)."""
    losses = []
    for layer in _variant_layers(model):
        if layer.transfer_loss is not None:
            losses.append(layer.transfer_loss)
            layer.transfer_loss = None
    if not losses:
        raise RuntimeError("attention_transfer_loss: no layer recorded a loss; run a forward pass inside "
                           "`with attention_transfer(model):` first")
    return torch.stack(losses).sum()

"""Generation caches for variants that keep their own per-layer state (quantised KV, recurrent state).

A variant that needs one overrides ``Variant.make_cache_layer(default_layer)`` and returns a transformers cache
layer (``CacheLayerMixin`` / ``LinearAttentionCacheLayerMixin``) for its attention layer. ``patch_model`` then makes
``generate()`` build a :class:`PatchattnCache`: the cache transformers would have built (so unpatched layers and
sliding-window layers keep their usual layers) with the patched layers' entries replaced by the variants' own.
A cache the user passes to ``generate(past_key_values=...)`` is left alone; a plain ``model(...)`` call that creates
its own ``DynamicCache`` also gets the default layers, so variants must accept those too (with full keys/values).
"""
from __future__ import annotations

import types

import torch.nn as nn
from transformers.cache_utils import Cache, DynamicCache

_PREPARE = "_prepare_cache_for_generation"


def layer_nbytes(layer) -> int:
    """Bytes a cache layer holds: its own ``nbytes()`` if it has one, else its key and value tensors."""
    own = getattr(layer, "nbytes", None)
    if callable(own):
        return int(own())
    return sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if t is not None and hasattr(t, "numel"))


class PatchattnCache(Cache):
    """A ``Cache`` whose patched layers are the variants' own cache layers."""

    def nbytes(self) -> int:
        """True storage of the cache in bytes (packed codes, scales and states included)."""
        return sum(layer_nbytes(layer) for layer in self.layers)


def build_cache(variant_layers: dict[int, nn.Module], default: Cache) -> PatchattnCache:
    """``default``'s layers with each patched layer's entry replaced by ``variant.make_cache_layer(entry)``."""
    layers = list(default.layers)
    for idx, variant in variant_layers.items():
        if idx < len(layers):
            own = variant.make_cache_layer(layers[idx])
            if own is not None:
                layers[idx] = own
    return PatchattnCache(layers=layers)


def install_generation_cache(model: nn.Module, variant_layers: dict[int, nn.Module]) -> None:
    """Make ``model.generate()`` use the variants' cache layers (an instance-level wrapper; see module docstring)."""
    original = getattr(type(model), _PREPARE)

    def prepare(self, generation_config, model_kwargs, *args, **kwargs):
        before = {key: model_kwargs.get(key) for key in ("cache", "past_key_values")}
        result = original(self, generation_config, model_kwargs, *args, **kwargs)
        for key, previous in before.items():
            made = model_kwargs.get(key)
            if made is not previous and type(made) is DynamicCache:  # built by generate, not passed by the user
                model_kwargs[key] = build_cache(variant_layers, made)
        return result

    model.__dict__[_PREPARE] = types.MethodType(prepare, model)


def remove_generation_cache(model: nn.Module) -> None:
    model.__dict__.pop(_PREPARE, None)

"""Generation caches for variants that keep their own per-layer state (quantised KV, recurrent state).

A variant that needs one overrides ``Variant.make_cache_layer(default_layer)`` and returns a transformers cache
layer (``CacheLayerMixin`` / ``LinearAttentionCacheLayerMixin``) for its attention layer. A patched model's
``generate()`` then builds a :class:`PatchattnCache` (``PatchedModel._prepare_cache_for_generation``): the cache
transformers would have built (so unpatched layers and sliding-window layers keep their usual layers) with the
patched layers' entries replaced by the variants' own. A cache the user passes to ``generate(past_key_values=...)``
is left alone; a plain ``model(...)`` call that creates its own ``DynamicCache`` also gets the default layers, so
variants must accept those too (with full keys/values).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.cache_utils import Cache


class TensorMapLayerMixin:
    """The batch plumbing of a cache layer that holds more tensors than ``keys``/``values``, written once.

    transformers calls these on every layer of a cache: ``reorder_cache`` in beam search, ``batch_repeat_interleave``
    and ``batch_select_indices`` when generate expands or filters the batch (beam search, assisted and contrastive
    decoding), ``offload``/``prefetch`` for offloaded caches. ``CacheLayerMixin``'s versions touch only
    ``self.keys``/``self.values``, so a layer that keeps its own tensors (a recurrent state, quantised blocks with
    their scales, ...) must apply each operation to all of them, which is all these methods do.

    A subclass implements ``_map(fn)``: replace every tensor ``t`` it holds (batch first) by ``fn(t)``, doing
    nothing while it holds none; and has ``self.device`` (needed only once it holds tensors), where ``prefetch``
    brings them back. List the mixin before ``CacheLayerMixin`` in the bases so that its methods win.
    """

    def _map(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        # ``self.device`` is read only when there is a tensor to move: a layer may set it on its first update, and
        # an offloaded cache prefetches the next layer before that layer has seen any tokens
        self._map(lambda t: t.to(self.device, non_blocking=True))


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


def build_cache(variant_layers: dict[int, nn.Module | list[nn.Module]], default: Cache) -> PatchattnCache:
    """``default``'s layers with each patched layer's entry replaced by ``variant.make_cache_layer(entry)``. A layer
    patched by several variants (a composition) gets the first cache layer one of them makes: roles allow at most
    one variant that owns a layer's cache (a KV-cache representation or a whole-attention replacement)."""
    layers = list(default.layers)
    for idx, variants in variant_layers.items():
        if idx < len(layers):
            for variant in variants if isinstance(variants, (list, tuple)) else [variants]:
                own = variant.make_cache_layer(layers[idx])
                if own is not None:
                    layers[idx] = own
                    break
    return PatchattnCache(layers=layers)

"""The generation-cache layer of the linear-attention variants: a recurrent state of constant size.

One :class:`LinearStateLayer` per patched layer holds whatever the variant needs to continue the sequence (the
state ``S``/``z``, the conv tails of q and k, the hybrid window's last keys and values, ...) as a dict of tensors
whose shapes do not depend on the context length. transformers' attention module calls ``update(key, value)``
right before the attention function; the layer hands itself to its variant through the attention module's
``handoff`` (key ``STATE_KEY``) and returns the new keys/values unchanged, and the variant reads and replaces
``state``.

Why not transformers' ``LinearAttentionCacheLayerMixin``: transformers 5.17 counts every instance of it as a pure
linear layer (``Cache.is_linear``), so masks, ``get_seq_length`` and generate's input slicing would skip it. The
layer is a plain ``CacheLayerMixin`` instead and copies the mask geometry of the layer it replaces (full or sliding
window), so the masks of the unpatched layers that share it stay exactly what they were.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ...cache import TensorMapLayerMixin
from ..base import handoff

STATE_KEY = "linear_state"


class LinearStateLayer(TensorMapLayerMixin, CacheLayerMixin):
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, variant, default_layer):
        super().__init__()
        self.variant = variant
        self.state: dict[str, torch.Tensor] | None = None
        self.cumulative_length = 0
        self.is_sliding = bool(getattr(default_layer, "is_sliding", False))
        self.sliding_window = getattr(default_layer, "sliding_window", None) if self.is_sliding else None
        self.is_initialized = True  # nothing to allocate ahead: the variant builds the state on its first call

    def __deepcopy__(self, memo):
        """Copies the state, shares the variant (a copied cache must still feed the model's own layers)."""
        copy = self.__class__.__new__(self.__class__)
        copy.__dict__.update(self.__dict__)
        copy.state = None if self.state is None else {name: t.clone() for name, t in self.state.items()}
        return copy

    def lazy_initialization(self, key_states, value_states) -> None:
        """Nothing to do: the state is created by the variant on the first call."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.cumulative_length += key_states.shape[-2]
        handoff(self.variant.host)[STATE_KEY] = self
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The replaced layer's geometry: masks built from this layer serve the unpatched layers too."""
        if self.sliding_window is None:
            return self.cumulative_length + query_length, 0
        offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        seen = min(self.cumulative_length, self.sliding_window - 1)
        return seen + query_length, offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held: independent of the context length."""
        return sum(t.numel() * t.element_size() for t in (self.state or {}).values())

    @property
    def device(self) -> torch.device:
        """Where the state lives when not offloaded (``prefetch`` brings it back): the variant's device."""
        return next(self.variant.parameters()).device

    def _map(self, fn) -> None:
        """Batch plumbing (``TensorMapLayerMixin``): ``fn`` on every tensor of the state."""
        if self.state is not None:
            self.state = {name: fn(t) for name, t in self.state.items()}

    def reset(self) -> None:
        self.state = None
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise RuntimeError(f"{self.variant.name}: a recurrent state cannot be cropped (assisted/speculative "
                               "decoding rolls the cache back); generate without an assistant model")

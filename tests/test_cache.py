"""patchattn.cache: the batch plumbing shared by the variants' own cache layers (``TensorMapLayerMixin``)."""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from patchattn.cache import PatchattnCache, TensorMapLayerMixin
from patchattn.variants.linear import LinearStateLayer


class TwoTensorLayer(TensorMapLayerMixin, CacheLayerMixin):
    """The least a layer needs for the mixin: ``_map`` over everything it holds, and ``device`` once it holds
    anything (set on the first update, as ZipCache's layer does)."""

    def __init__(self, first=None, second=None):
        super().__init__()
        self.first, self.second = first, second
        self.is_initialized = first is not None
        if self.is_initialized:
            self.device = first.device

    def _map(self, fn):
        if self.is_initialized:
            self.first, self.second = fn(self.first), fn(self.second)

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, query_length):
        return query_length, 0

    def get_seq_length(self):
        return 0

    def get_max_length(self):
        return -1


def held(batch=3):
    """Two batch-first tensors of different shapes and dtypes; row ``i`` of each is filled with ``i``."""
    rows = torch.arange(batch)
    return rows.float().view(batch, 1, 1).expand(batch, 2, 5).clone(), rows.view(batch, 1).expand(batch, 4).clone()


def rows(layer):
    """Which original batch row each current row of both tensors came from."""
    first, second = layer.first[:, 0, 0].long().tolist(), layer.second[:, 0].tolist()
    assert first == second, (first, second)
    return first


def test_reorders_repeats_and_selects_every_tensor():
    layer = TwoTensorLayer(*held())
    cache = PatchattnCache(layers=[layer])  # transformers' Cache calls the layer's methods (beam search, ...)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert rows(layer) == [2, 0, 0]
    cache.batch_repeat_interleave(2)
    assert rows(layer) == [2, 2, 0, 0, 0, 0]
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert rows(layer) == [2, 0]
    assert layer.first.shape == (2, 2, 5) and layer.second.shape == (2, 4) and layer.second.dtype == torch.int64


def test_offload_and_prefetch_move_every_tensor():
    layer = TwoTensorLayer(*held())
    layer.offload()
    assert layer.first.device.type == layer.second.device.type == "cpu"
    layer.prefetch()
    assert layer.first.device == layer.second.device == layer.device
    assert rows(layer) == [0, 1, 2]


def test_nothing_held_is_a_no_op():
    """Before its first update a layer holds nothing and has no device yet (an offloaded cache prefetches it)."""
    layer = TwoTensorLayer()
    for call in (lambda: layer.reorder_cache(torch.tensor([0])), lambda: layer.batch_repeat_interleave(2),
                 lambda: layer.batch_select_indices(torch.tensor([0])), layer.offload, layer.prefetch):
        call()
    assert layer.first is None and layer.second is None


def test_linear_state_layer_uses_the_mixin():
    """The linear variants' layer applies the plumbing to its whole state dict."""
    variant = torch.nn.Linear(2, 2)  # stands in for the variant: prefetch goes back to its device
    layer = LinearStateLayer(variant, default_layer=None)
    first, second = held()
    layer.state = {"S": first, "z": second}
    layer.reorder_cache(torch.tensor([1, 1, 0]))
    layer.batch_repeat_interleave(2)
    layer.batch_select_indices(torch.tensor([0, 5]))
    layer.offload()
    layer.prefetch()
    assert isinstance(layer, TensorMapLayerMixin) and layer.device == variant.weight.device
    assert layer.state["S"][:, 0, 0].long().tolist() == layer.state["z"][:, 0].tolist() == [1, 0]

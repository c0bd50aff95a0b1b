"""Tensor descriptors for the attention kernels: on Hopper a descriptor load is one TMA copy of a whole tile (no
per-thread address arithmetic, rows past the end read as zeros); Triton lowers the same loads to ordinary ones on
older GPUs and runs them in the CPU interpreter."""
from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor


def row_tiles(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """Descriptor of a ``[b, h, n, d]`` tensor whose loads are ``[1, 1, rows, d]`` tiles (``rows`` rows of one
    head). TMA wants a 16-byte-aligned base and 16-byte-multiple strides; a view with neither (a slice at an odd
    offset, a non-unit last stride) is copied first."""
    size = x.element_size()
    if x.stride(-1) != 1 or x.data_ptr() % 16 or any(st * size % 16 for st in x.stride()[:-1]):
        x = x.clone(memory_format=torch.contiguous_format)  # a fresh allocation (contiguous() may return x)
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, x.shape[-1]])

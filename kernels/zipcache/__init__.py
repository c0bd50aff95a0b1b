"""ZipCache decode attention read straight from the packed cache (see ``triton_decode.py``).

``naive`` is the reference (dequantise every block, plain softmax; any device), ``triton_decode`` the fused kernel
(CUDA, or Triton's CPU interpreter under ``TRITON_INTERPRET=1``), ``ops`` the launches, the logsumexp merge and the
device choice (its ``KERNEL_ON_CPU`` switch sends CPU tensors to the kernel, as the tests do).
"""
from __future__ import annotations

from .naive import quantized_decode_attention_reference
from .ops import kernel_usable, quantized_decode_attention

__all__ = ["quantized_decode_attention", "quantized_decode_attention_reference", "kernel_usable"]

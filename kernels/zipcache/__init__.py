"""ZipCache's kernels: decode attention read straight from the packed cache (``triton_decode.py``), and the
prefill saliency probes' column sums without the probe × key matrix (``triton_probe.py``).

``naive`` holds the references (dequantise every block, plain softmax; the probes' full matrix; any device),
``triton_decode`` / ``triton_probe`` the fused kernels (CUDA, or Triton's CPU interpreter under
``TRITON_INTERPRET=1``), ``ops`` the launches, the logsumexp merge and the device choice (its ``KERNEL_ON_CPU``
switch sends CPU tensors to the kernels, as the tests do).
"""
from __future__ import annotations

from .naive import causal_probe_counts, probe_scores_reference, quantized_decode_attention_reference
from .ops import kernel_usable, probe_column_scores, quantized_decode_attention

__all__ = ["quantized_decode_attention", "quantized_decode_attention_reference", "kernel_usable",
           "probe_column_scores", "probe_scores_reference", "causal_probe_counts"]

"""What the kernel tests share: where they run and how they compare.

Without CUDA the kernels run in Triton's CPU interpreter: conftest.py sets ``TRITON_INTERPRET=1`` before anything
imports triton (fp32/fp16 only there, the interpreter's bf16 is broken); with CUDA the same cases run compiled.
"""
import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def rel_err(a, b):
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

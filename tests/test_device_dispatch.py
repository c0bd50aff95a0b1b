"""Kernel dispatch follows the tensors' device: on a machine where CUDA exists but the tensors are on the CPU (and
Triton's interpreter is off), no CPU tensor reaches a Triton launch, even with the test switches that open the
kernels to CPU tensors. Simulated on CPU: ``torch.cuda.is_available`` answers True, TRITON_INTERPRET is unset, and
every Triton launch (``kernel[grid](...)``) is recorded."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from tiny_models import random_ids, tiny_model  # noqa: E402

import patchattn  # noqa: E402
from patchattn.kernels.zipcache import ops as zipcache_ops  # noqa: E402
from patchattn.variants import sigmoid as sigmoid_variant  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CUDA machine on the CPU")


@pytest.fixture
def launches(monkeypatch):
    """A CUDA machine without the interpreter, seen from CPU tensors; returns the list of kernel launches."""
    from triton.runtime.jit import KernelInterface

    launched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(KernelInterface, "__getitem__", lambda self, grid: launched.append(self) or (lambda *a, **k: None))
    monkeypatch.setattr(sigmoid_variant, "KERNEL_ON_CPU", True)
    monkeypatch.setattr(zipcache_ops, "KERNEL_ON_CPU", True)
    return launched


def ids(batch=2, n=40):
    return random_ids(batch, n, seed=0)


@pytest.mark.parametrize("variant, params", [
    ("hyper", dict(min_seq_len=16, block_size=8, sample_size=8, exact_tail=0)),
    ("dhsa", dict(min_seq_len=16, chunk_size=16, query_block=16, budget_tokens=16, local_window=16, exact_tail=0)),
    ("sigmoid", {}),
    ("moh", dict(router="query_norm", shared_heads=0.25, active_heads=0.5)),
    ("zipcache", dict(requant_interval=5)),
    ("lightning", {}),
])
def test_cpu_tensors_take_the_torch_paths(launches, variant, params):
    model = patchattn.patch_model(tiny_model("llama"), variant, **params)
    out = model.generate(ids(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 48) and launches == []


def test_moh_kernel_refuses_cpu_tensors(launches):
    from patchattn.kernels.moh.triton_decode import active_head_decode

    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    with pytest.raises(ValueError, match="one CUDA device .*active_head_decode_reference"):
        active_head_decode(q, k, v, torch.tensor([[0, 2]]), 0.25)
    assert launches == []

"""MoH decode kernel (reads only the active heads' KV cache) vs its reference, and inside the variant.

Everything runs on the kernel's device (``DEV``): compiled on CUDA, Triton's CPU interpreter otherwise."""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEV
from tiny_models import VOCAB, tiny_model

import patchattn
from patchattn.kernels.moh.naive import active_head_decode_reference
from patchattn.variants.moh import MoHAttention

triton = pytest.importorskip("triton")
from patchattn.kernels.moh.triton_decode import active_head_decode  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,h,hk,n,d", [(2, 6, 2, 300, 16), (1, 4, 4, 70, 20), (3, 8, 1, 129, 32)])
def test_kernel_matches_reference(dtype, b, h, hk, n, d):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, x, length, d, generator=g).to(DEV, dtype) for x, length in ((h, 1), (hk, n), (hk, n)))
    table = torch.stack([torch.randperm(h, generator=g)[: h // 2].sort().values for _ in range(b)]).to(DEV)
    expected = active_head_decode_reference(q, k, v, table, 0.25)
    got = active_head_decode(q, k, v, table, 0.25, block_n=32)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    inactive = torch.ones(b, h, dtype=torch.bool, device=DEV).scatter_(1, table, False)
    assert torch.all(got[:, 0][inactive] == 0)


def test_variant_decode_with_skipped_heads_equals_dense(monkeypatch):
    """generate() with the head-skipping kernel gives the dense path's tokens and logits (the CUDA-only switch is
    opened on CPU: the kernel runs under the Triton interpreter)."""
    model = patchattn.patch_model(tiny_model("llama").to(DEV), "moh", router="query_norm", shared_heads=0.25,
                                  active_heads=0.5)
    x = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEV)
    dense = model.generate(x, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    calls = []
    original = MoHAttention._active_heads_decode

    def counted(self, *args):
        calls.append(self.layer_idx)
        return original(self, *args)

    monkeypatch.setattr(MoHAttention, "_can_skip_heads",
                        lambda self, query, mask, kwargs: query.shape[2] == 1 and mask is None)
    monkeypatch.setattr(MoHAttention, "_active_heads_decode", counted)
    skipped = model.generate(x, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert len(calls) == 5 * model.config.num_hidden_layers  # every decode step of every layer took the kernel
    assert torch.equal(skipped.sequences, dense.sequences)
    for a, b in zip(skipped.scores, dense.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

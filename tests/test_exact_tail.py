"""The exact query tail of the long-prefill approximations, and the per-layer record of which path ran."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import patchattn
from patchattn.attention import exact_attention

APPROX = {"hyper": dict(min_seq_len=16, block_size=16, sample_size=16, lsh_num_projs=3),
          "dhsa": dict(min_seq_len=16, chunk_size=16, query_block=16, budget_tokens=16, local_window=16,
                       sink_tokens=0)}


@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_exact_tail_rows_are_exact_and_the_rest_approximate(variant):
    model = tiny_model("llama")
    patchattn.patch_model(model, variant, layers=[0], exact_tail=8, **APPROX[variant])
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 96, 16, generator=g), torch.randn(1, 2, 96, 16, generator=g), torch.randn(
        1, 2, 96, 16, generator=g)
    out, _ = module.patchattn_layer.attention(module, q, k, v, None, scaling=0.25)
    want, _ = exact_attention(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out[:, -8:], want[:, -8:], atol=1e-5, rtol=0)
    assert (out[:, :-8] - want[:, :-8]).abs().max() > 1e-3  # the approximation really ran before the tail


@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_attention_paths_say_what_ran(variant):
    model = tiny_model("llama")
    patchattn.patch_model(model, variant, layers=[1, 3], **APPROX[variant])
    ids = torch.randint(3, 96, (1, 64), generator=torch.Generator().manual_seed(1))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    model(input_ids=ids[:, :12])
    paths = patchattn.attention_paths(model, reset=True)
    assert paths == {i: {"approximate": 1, "exact_decode": 2, "exact_short": 1} for i in (1, 3)}
    assert patchattn.attention_paths(model) == {1: {}, 3: {}}

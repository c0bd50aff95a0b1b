"""Exact KV heads inside an approximate prefill, and the copy-task search that picks them (patchattn.retrieval_heads)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import logits, random_ids, tiny_model
from transformers import AutoModelForCausalLM

import patchattn
from patchattn.attention import EXACT_BACKEND_ATTR, exact_attention, split_kv_heads
from patchattn.retrieval_heads import _copy_task_ids, retrieval_head_scores

APPROX = {"hyper": dict(min_seq_len=16, block_size=16, sample_size=16, lsh_num_projs=3, exact_tail=0),
          "dhsa": dict(min_seq_len=16, chunk_size=16, query_block=16, budget_tokens=16, local_window=16,
                       sink_tokens=0, exact_tail=0)}


def _qkv(h=4, hk=2, n=96, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, n, d, generator=g), torch.randn(1, hk, n, d, generator=g),
            torch.randn(1, hk, n, d, generator=g))


def test_split_kv_heads_routes_each_query_head_with_its_kv_head():
    q, k, v = _qkv(h=6, hk=3)
    module = tiny_model("llama").model.layers[0].self_attn
    module.num_key_value_groups = 2

    def exact(qq, kk, vv):
        return exact_attention(module, qq, kk, vv, None, scaling=0.25)[0]

    want = exact(q, k, v)
    torch.testing.assert_close(split_kv_heads(q, k, v, [1], approximate=exact, exact=exact), want)
    out = split_kv_heads(q, k, v, [1], approximate=lambda qq, kk, vv: torch.zeros_like(qq).transpose(1, 2),
                         exact=exact)
    torch.testing.assert_close(out[:, :, 2:4], want[:, :, 2:4])  # query heads 2, 3 read KV head 1
    assert out[:, :, :2].abs().max() == 0 and out[:, :, 4:].abs().max() == 0


@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_exact_kv_heads_are_exact_and_the_others_approximate(variant):
    model = tiny_model("llama")
    patchattn.patch_model(model, variant, layers=[0], exact_kv_heads={0: [1]}, **APPROX[variant])
    module = model.model.layers[0].self_attn
    q, k, v = _qkv()
    out, _ = module.patchattn_layer.attention(module, q, k, v, None, scaling=0.25)
    want, _ = exact_attention(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out[:, :, 2:], want[:, :, 2:], atol=1e-5, rtol=0)  # KV head 1 = query heads 2, 3
    assert (out[:, 16:, :2] - want[:, 16:, :2]).abs().max() > 1e-3  # the approximation ran on the others


@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_a_layer_whose_kv_heads_are_all_exact_is_not_counted_as_approximated(variant):
    model = tiny_model("llama")  # 4 layers of 2 KV heads
    patchattn.patch_model(model, variant, exact_kv_heads={0: [0, 1], 1: [1]}, **APPROX[variant])
    model(random_ids(1, 80))
    paths = patchattn.attention_paths(model)
    assert paths[0] == {"exact_retrieval": 1}
    assert paths[1] == paths[2] == paths[3] == {"approximate": 1}


@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_all_kv_heads_exact_is_the_original_model(variant, tmp_path):
    model = tiny_model("qwen2")
    ids = random_ids(1, 80)
    base = logits(model, ids)
    every = {layer: [0, 1] for layer in range(4)}
    patchattn.patch_model(model, variant, exact_kv_heads=every, **APPROX[variant])
    torch.testing.assert_close(logits(model, ids), base, atol=1e-5, rtol=0)
    patchattn.unpatch_model(model)
    patchattn.patch_model(model, variant, exact_kv_heads={2: [0]}, **APPROX[variant])
    some = logits(model, ids)
    assert (some - base).abs().max() > 1e-4
    model.save_pretrained(tmp_path)  # JSON turns the layer keys into strings; loading must read them back
    for loaded in (patchattn.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert patchattn.patch_specs(loaded)[0]["params"]["exact_kv_heads"] == {2: [0]}
        torch.testing.assert_close(logits(loaded, ids), some, atol=0, rtol=0)


@pytest.mark.parametrize("heads, problem", [({0: [2]}, "head 2 of layer 0"), ({7: [0]}, "layer 7"),
                                            ({0: "all"}, "list of head indices")])
def test_bad_exact_kv_heads_are_refused_and_the_model_left_as_it_was(heads, problem):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=f"^hyper: .*{problem}"):  # names the variant the user asked for
        patchattn.patch_model(model, "hyper", exact_kv_heads=heads)
    assert not patchattn.is_patched(model)


def test_copy_scores_match_the_eager_attention_weights():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    length = 24
    scores = retrieval_head_scores(model, length=length, seed=3)
    ids = _copy_task_ids(model.config.vocab_size, length, 3)
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions
    rows = torch.arange(length + 1, 2 * length)
    for layer, w in enumerate(weights):
        per_query_head = (w[0, :, rows, rows - length] + w[0, :, rows, rows - length + 1]).mean(-1)
        torch.testing.assert_close(scores[layer], per_query_head.reshape(2, 2).max(-1).values, atol=1e-5, rtol=0)


def test_retrieval_heads_keep_the_top_fraction_of_the_chosen_layers():
    model = tiny_model("llama")
    scores = retrieval_head_scores(model, length=32)
    heads = patchattn.retrieval_heads(model, 0.5, layers=[2, -1], length=32)
    assert set(heads) <= {2, 3} and sum(map(len, heads.values())) == 2
    kept = [float(scores[layer][h]) for layer, hs in heads.items() for h in hs]
    dropped = [float(scores[layer][h]) for layer in (2, 3) for h in (0, 1) if h not in heads.get(layer, [])]
    assert min(kept) >= max(dropped)
    assert patchattn.retrieval_heads(model, 0.0) == {}
    assert patchattn.retrieval_heads(model, 1.0) == {layer: [0, 1] for layer in range(4)}
    with pytest.raises(ValueError, match="fraction"):
        patchattn.retrieval_heads(model, 1.5)


@pytest.mark.parametrize("variant", ["hyper", "dhsa"])
def test_patch_model_finds_the_heads_once_and_the_checkpoint_keeps_them(variant, tmp_path, monkeypatch):
    model = tiny_model("qwen2")
    want = patchattn.retrieval_heads(model, 0.25, layers=[1, 2, 3])
    assert sum(map(len, want.values())) == 2  # a quarter of 3 layers x 2 KV heads
    patchattn.patch_model(model, variant, layers="last:3", **APPROX[variant])
    assert patchattn.patch_specs(model)[0]["params"]["exact_kv_heads"] == want
    ids = random_ids(1, 80)
    out = logits(model, ids)
    model.save_pretrained(tmp_path)

    def no_search(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not search for retrieval heads again")

    monkeypatch.setattr("patchattn.variants.prefill.retrieval_heads", no_search)
    loaded = patchattn.from_pretrained(tmp_path)
    assert patchattn.patch_specs(loaded)[0]["params"]["exact_kv_heads"] == want
    torch.testing.assert_close(logits(loaded, ids), out, atol=0, rtol=0)


def test_the_search_runs_on_a_patched_model_and_leaves_its_exact_backend():
    """Composition: a prefill variant patched over a KV-cache variant finds the same heads as on the original."""
    model = tiny_model("llama")
    want = patchattn.retrieval_heads(model, 0.5)
    patchattn.patch_model(model, "zipcache")
    patchattn.patch_model(model, "hyper", retrieval_heads=0.5, **APPROX["hyper"])
    assert patchattn.patch_specs(model)[1]["params"]["exact_kv_heads"] == want
    assert {m.__dict__.get(EXACT_BACKEND_ATTR) for m in (layer.self_attn for layer in model.model.layers)} == {"sdpa"}


def test_paper_preset_approximates_every_head():
    model = tiny_model("llama")
    patchattn.patch_model(model, "hyper", preset="paper")
    params = patchattn.patch_specs(model)[0]["params"]
    assert params["retrieval_heads"] == 0 and params["exact_kv_heads"] is None


def test_a_checkpoint_saved_before_the_search_keeps_approximating_every_head(tmp_path):
    """A spec without ``retrieval_heads`` predates it: it loads as ``retrieval_heads=0`` (how it ran when saved),
    not as the new default."""
    model = tiny_model("llama")
    patchattn.patch_model(model, "hyper", retrieval_heads=0, **APPROX["hyper"])
    ids = random_ids(1, 80)
    out = logits(model, ids)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("retrieval_heads", "exact_kv_heads"):
        del config["patchattn"][0]["params"][key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = patchattn.from_pretrained(tmp_path)
    params = patchattn.patch_specs(loaded)[0]["params"]
    assert params["retrieval_heads"] == 0 and params["exact_kv_heads"] is None
    torch.testing.assert_close(logits(loaded, ids), out, atol=0, rtol=0)


@pytest.mark.parametrize("family, full_layers", [("gemma3", {1, 3}), ("gemma2", {1, 3}), ("mistral", set())])
def test_the_search_spends_the_share_on_full_attention_layers(family, full_layers):
    """Sliding-window layers keep exact attention over long prompts anyway: the share is of the full layers' heads."""
    model = tiny_model(family)
    patchattn.patch_model(model, "hyper")
    heads = patchattn.patch_specs(model)[0]["params"]["exact_kv_heads"]
    assert set(heads) <= full_layers
    assert sum(map(len, heads.values())) == round(0.25 * 2 * len(full_layers))


def test_the_attention_function_path_says_that_no_search_ran(caplog, monkeypatch):
    """``attn_implementation="patchattn_hyper"`` never sees the whole model: every head is approximated, logged."""
    monkeypatch.setattr("patchattn.logging_utils._seen", set())
    model = tiny_model("llama")
    model.set_attn_implementation("patchattn_hyper")
    with caplog.at_level(logging.WARNING, logger="patchattn"), torch.no_grad():
        model(random_ids(1, 4096 + 64))
    assert caplog.text.count("no retrieval-head search ran") == 1


def test_the_search_runs_on_a_model_with_a_variant_attention_function():
    """``attn_implementation="patchattn_hyper"`` has no dispatcher to hand layers to the capture: it switches over."""
    model = tiny_model("llama")
    want = patchattn.retrieval_heads(model, 0.5)
    model.set_attn_implementation("patchattn_hyper")
    assert patchattn.retrieval_heads(model, 0.5) == want
    assert model.config._attn_implementation == "patchattn_hyper"

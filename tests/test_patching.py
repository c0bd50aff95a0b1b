"""patch_model on every family: plumbing exactness, full-budget hyper == exact, generate, padding, unpatch,
save/load round trip, attn_implementation registration, and the error messages."""
from __future__ import annotations

import pytest
import torch
from tiny_models import BUILDERS, VOCAB, left_padded, logits, random_ids, tiny_model
from transformers import AutoModelForCausalLM, BertConfig, BertModel, T5Config, T5ForConditionalGeneration

import patchattn
from patchattn import patch_model, unpatch_model
from patchattn.variants import register_variant

FAMILIES = sorted(BUILDERS)
# hyper settings that run the whole machinery (recursion, sorting, LSE merges) but with one block per level, so the
# estimator is exact: any difference from exact attention is a plumbing bug.
FULL_BUDGET = dict(min_seq_len=16, block_size=4096, sample_size=16)
# a real approximation on 64-token prompts
APPROX = dict(min_seq_len=16, block_size=8, sample_size=8, exact_tail=0)


def tokens(batch=2, n=64, seed=1):
    return random_ids(batch, n, seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_variant_matches_unpatched(family):
    model = tiny_model(family)
    ids, mask = left_padded(48, (0, 7, 20))
    ref, ref_pad = logits(model, tokens()), logits(model, ids, mask)
    patchattn.patch_model(model, "exact")
    torch.testing.assert_close(logits(model, tokens()), ref, atol=1e-5, rtol=0)
    valid = mask.bool()
    torch.testing.assert_close(logits(model, ids, mask)[valid], ref_pad[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_hyper_full_budget_equals_exact(family):
    model = tiny_model(family)
    ref = logits(model, tokens())
    patchattn.patch_model(model, "hyper", **FULL_BUDGET)
    torch.testing.assert_close(logits(model, tokens()), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mistral"])  # mistral slides everywhere
def test_hyper_approximates_on_global_layers_only(family):
    """A real budget changes the logits (hyper runs) and stays finite; sliding layers keep exact attention."""
    model = tiny_model(family)
    ref = logits(model, tokens())
    patchattn.patch_model(model, "hyper", **APPROX)
    out = logits(model, tokens())
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-4, "hyper did not run"


def test_sliding_window_layers_fall_back_to_exact():
    """Mistral slides on every layer: hyper must leave it exact (and the window must reach the function)."""
    model = tiny_model("mistral")
    ref = logits(model, tokens())
    patchattn.patch_model(model, "hyper", **APPROX)
    torch.testing.assert_close(logits(model, tokens()), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_unchanged_below_min_seq_len(family):
    model = tiny_model(family)
    prompt = tokens(1, 12)
    ref = model.generate(prompt, max_new_tokens=8, do_sample=False)
    patchattn.patch_model(model, "hyper", layers="last:2")  # default min_seq_len 4096 >> prompt
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), ref)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_left_padded_batched_generate(family):
    model = tiny_model(family)
    ids, mask = left_padded(48, (0, 7, 20))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    patchattn.patch_model(model, "hyper", **FULL_BUDGET)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), ref)
    patchattn.unpatch_model(model)
    patchattn.patch_model(model, "hyper", **APPROX)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == ref.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_bit_for_bit(family):
    model = tiny_model(family)
    impl = model.config._attn_implementation
    keys = set(model.state_dict())
    ref = logits(model, tokens())
    patchattn.patch_model(model, "hyper", layers=[0, -1], **APPROX)
    patchattn.unpatch_model(model)
    assert model.config._attn_implementation == impl
    assert set(model.state_dict()) == keys
    assert not hasattr(model.config, "patchattn")
    assert torch.equal(logits(model, tokens()), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_from_pretrained_round_trip(family, tmp_path):
    model = tiny_model(family)
    patchattn.patch_model(model, "hyper", layers="last:2", **APPROX)
    ref = logits(model, tokens())
    model.save_pretrained(tmp_path)
    loaded = patchattn.from_pretrained(str(tmp_path))
    assert loaded.config.patchattn[0]["variant"] == "hyper"
    assert loaded.config.patchattn[0]["layers"] == [2, 3]
    assert loaded.config.patchattn[0]["params"] == model.config.patchattn[0]["params"]
    torch.testing.assert_close(logits(loaded, tokens()), ref, atol=0, rtol=0)


def test_attn_implementation_name_registered(tmp_path):
    model = tiny_model("llama")
    ref = logits(model, tokens())
    model.save_pretrained(tmp_path)
    exact = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="patchattn_exact").eval()
    assert exact.config._attn_implementation == "patchattn_exact"
    torch.testing.assert_close(logits(exact, tokens()), ref, atol=1e-5, rtol=0)
    hyper = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="patchattn_hyper").eval()
    torch.testing.assert_close(logits(hyper, tokens()), ref, atol=1e-5, rtol=0)  # 64 tokens < default min_seq_len


def test_layer_selection():
    model = tiny_model("llama")
    patchattn.patch_model(model, "exact", layers="first:3")
    assert patchattn.patched_layers(model) == [0, 1, 2]
    layers = model.model.layers
    assert [hasattr(l.self_attn, "patchattn_layer") for l in layers] == [True, True, True, False]


def test_list_variants_and_families():
    variants = {v["name"]: v for v in patchattn.list_variants()}
    assert {"exact", "hyper"} <= set(variants)
    hyper = variants["hyper"]
    assert hyper["kind"] == "training-free"
    assert {k: p["default"] for k, p in hyper["params"].items()} == {
        "lsh_num_projs": 7, "block_size": 256, "sample_size": 240, "min_seq_len": 4096, "seed": 0,
        "sink_tokens": 16, "local_window": 0, "center_keys": False, "exact_tail": 256, "retrieval_heads": 0.25,
        "exact_kv_heads": None}
    families = {f["name"] for f in patchattn.list_families()}
    assert {"llama", "mistral", "gemma", "gemma2", "gemma3", "qwen", "chatglm2"} <= families


@pytest.mark.parametrize("call, match", [
    (lambda m: patchattn.patch_model(m, "nope"), r"unknown variant 'nope'; known variants: \[.*'hyper'"),
    (lambda m: patchattn.patch_model(m, "hyper", block_size=0), r"hyper: parameter 'block_size' must be in \[1,"),
    (lambda m: patchattn.patch_model(m, "hyper", block_size=2.5), r"'block_size' must be an integer"),
    (lambda m: patchattn.patch_model(m, "hyper", bucket=3), r"unknown parameter\(s\) \['bucket'\]"),
    (lambda m: patchattn.patch_model(m, "hyper", layers=[7]), r"layer index 7 is out of range .* 4 layers"),
    (lambda m: patchattn.patch_model(m, "hyper", layers="last:9"), r"N must be in \[1, 4\]"),
    (lambda m: patchattn.patch_model(m, "hyper", layers="middle"), r"not understood"),
    (lambda m: patchattn.unpatch_model(m), r"not patched"),
])
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_model("llama"))


def test_patching_twice_is_an_error():
    model = tiny_model("llama")
    patchattn.patch_model(model, "exact")
    with pytest.raises(ValueError, match="already patched with .exact.; call patchattn.unpatch_model"):
        patchattn.patch_model(model, "exact", layers="last:1")
    with pytest.raises(ValueError, match="cannot combine 'hyper' .prefill approximation. with 'exact' "
                                         ".whole-attention replacement."):
        patchattn.patch_model(model, "hyper")
    assert [spec["variant"] for spec in model.config.patchattn] == ["exact"]


def test_unsupported_and_encoder_models_are_rejected():
    bert = BertModel(BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    with pytest.raises(ValueError, match="unsupported model type 'bert'; supported model types: .*llama"):
        patchattn.patch_model(bert, "hyper")
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=32, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=16))
    with pytest.raises(ValueError, match="encoder-decoder"):
        patchattn.patch_model(t5, "hyper")
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel"):
        patchattn.patch_model(torch.nn.Linear(2, 2), "hyper")


def test_variant_cache_layers_reach_generate_and_leave_with_unpatch():
    """A variant that brings its own cache layer gets it inside generate(); unpatched layers keep theirs."""
    from transformers.cache_utils import DynamicLayer

    from patchattn.cache import PatchattnCache
    from patchattn.variants import VARIANTS
    from patchattn.variants.exact import ExactAttention

    class CountingLayer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self.updates = 0

        def update(self, key_states, value_states, *args, **kwargs):
            self.updates += 1
            return super().update(key_states, value_states, *args, **kwargs)

    made: list[CountingLayer] = []

    class WithCache(ExactAttention):
        name = "test_with_cache"

        def make_cache_layer(self, default_layer):
            made.append(CountingLayer())
            return made[-1]

    register_variant(WithCache)
    try:
        model = tiny_model("llama")
        x = torch.randint(3, VOCAB, (1, 6))
        ref = model.generate(x, max_new_tokens=5, do_sample=False)
        patch_model(model, "test_with_cache", layers=[1, 3])
        captured = {}
        out = model.generate(x, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        captured["cache"] = out.past_key_values
        assert torch.equal(out.sequences, ref)
        assert isinstance(captured["cache"], PatchattnCache)
        assert len(made) == 2 and all(layer.updates == 5 for layer in made)  # prefill + 4 decode steps
        assert [type(layer) for layer in captured["cache"].layers].count(CountingLayer) == 2
        assert captured["cache"].nbytes() > 0
        unpatch_model(model)
        assert "_prepare_cache_for_generation" not in model.__dict__
        assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=False), ref)
    finally:
        VARIANTS.pop("test_with_cache", None)


def test_patched_context_manager_patches_then_restores_bit_for_bit():
    model = tiny_model("qwen2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config, cls, ref = model.config.to_dict(), type(model), logits(model, tokens())
    other = tiny_model("qwen2")
    patch_model(other, "hyper", **APPROX)
    expected = logits(other, tokens())
    with patchattn.patched(model, "hyper", **APPROX) as m:
        assert m is model and patchattn.is_patched(model)
        torch.testing.assert_close(logits(model, tokens()), expected, atol=0, rtol=0)
    assert not patchattn.is_patched(model) and type(model) is cls
    assert model.config.to_dict() == config
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    assert torch.equal(logits(model, tokens()), ref)


def test_patched_context_manager_unpatches_on_exception_and_refuses_patched_model():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with patchattn.patched(model, "exact"):
            raise RuntimeError("boom")
    assert not patchattn.is_patched(model)
    patch_model(model, "exact")
    with pytest.raises(ValueError, match="already patched"):
        with patchattn.patched(model, "exact"):
            pass
    assert patchattn.is_patched(model)  # the refusal leaves the outer patch alone

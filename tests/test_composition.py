"""Composition (patch_model on a patched model): every compatible pair on every family — prefill logits equal the
inner variant alone, generate works, zipcache's cache compresses, save -> load identical, unpatch one and all
bit-exact — plus the conflicts, the CLI and old single-spec configs."""
from __future__ import annotations

import json

import pytest
import tiny_models
import torch
from tiny_models import BUILDERS, CACHE_KW, VOCAB
from transformers import AutoModelForCausalLM

import patchattn
from patchattn import patch_model, unpatch_model
from patchattn.cache import layer_nbytes
from patchattn.variants import KV_CACHE, ROLE_LABELS, VARIANTS, composition_conflict, get_variant
from patchattn.variants.base import ROLE_RANK

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = sorted(BUILDERS) + ["chatglm2"]
# settings under which each variant really changes a 64-token prefill (hyper/dhsa approximate, streaming masks)
PARAMS = {
    "hyper": dict(layers="last:2", min_seq_len=16, block_size=8, sample_size=8, sink_tokens=0, exact_tail=0),
    "dhsa": dict(layers="last:2", min_seq_len=16, chunk_size=16, query_block=16, budget_tokens=16, local_window=16,
                 sink_tokens=16, exact_tail=0),
    "zipcache": dict(requant_interval=4),
    "streaming": dict(sink_tokens=2, window=16),
    "gated": {},
    "affine": {},
}
# (first patched, second patched): patch order is not execution order (gated runs over zipcache patched before it)
PAIRS = [("hyper", "zipcache"), ("dhsa", "zipcache"), ("zipcache", "gated"), ("gated", "hyper"), ("gated", "dhsa"),
         ("affine", "hyper"), ("dhsa", "affine"), ("streaming", "gated")]


def tiny_model(family: str):
    """tiny_models' families, and ChatGLM2 (patchattn's native port) at the size of test_chatglm2's checkpoint."""
    if family != "chatglm2":
        return tiny_models.tiny_model(family)
    from test_chatglm2 import ORIGINAL_CONFIG

    from patchattn.models.chatglm2 import ChatGLM2Config, ChatGLM2ForCausalLM, register

    register()
    fields = {k: v for k, v in ORIGINAL_CONFIG.items()
              if k not in ("_name_or_path", "model_type", "architectures", "auto_map", "torch_dtype",
                           "transformers_version")}
    torch.manual_seed(0)
    return ChatGLM2ForCausalLM(ChatGLM2Config(**fields)).eval()


def tokens(batch=2, n=64, seed=1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def patch(model, *names):
    for name in names:
        patch_model(model, name, **PARAMS[name])
    return model


def inner(pair) -> str:
    """The variant whose attention the other wraps (the higher role rank): the prefill logits are its alone."""
    return max(pair, key=lambda n: ROLE_RANK[get_variant(n).role])


@torch.no_grad()
def prefill_logits(model, ids=None):
    cache = patchattn.generation_cache(model) if patchattn.is_patched(model) else None
    return model(input_ids=tokens() if ids is None else ids, **{CACHE_KW: cache}).logits


def perturb(model):
    """Non-initial values for the variants' parameters (gates, α projections): modifiers then really modify."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{patchattn.LAYER_ATTR}" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)


def generate(model, ids):
    return model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)


def alone(family, name, state=None):
    model = patch(tiny_model(family), name)
    if state is not None:
        model.load_state_dict(state)  # strict: the same variant weights under the same names
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_compatible_pair(pair, family, tmp_path):
    original = tiny_model(family)
    original_logits = prefill_logits(original)
    original_state = {k: v.clone() for k, v in original.state_dict().items()}
    original_config = original.config.to_dict()
    model = patch(tiny_model(family), *pair)
    assert [s["variant"] for s in model.config.patchattn] == list(pair)
    assert composition_conflict(get_variant(pair[0]), get_variant(pair[1])) is None

    # prefill: what the inner variant alone computes (modifiers start as the identity, zipcache stores afterwards)
    reference = alone(family, inner(pair))
    expected = prefill_logits(reference)
    torch.testing.assert_close(prefill_logits(model), expected, atol=0, rtol=0)
    if "hyper" in pair or "dhsa" in pair:
        paths = patchattn.attention_paths(model)
        approximated = any(p.get("approximate") for p in paths.values())
        assert approximated == any(p.get("approximate") for p in patchattn.attention_paths(reference).values())
        if family != "mistral":  # mistral slides on every layer: its prefill approximations fall back by design
            assert approximated
        assert not expected.equal(original_logits) or family == "mistral"

    # generate: the modifiers at init change nothing; zipcache stores less than transformers' cache
    ids = tokens(1, 40, seed=3)
    out = generate(model, ids)
    assert out.sequences.shape == (1, 46)
    if KV_CACHE not in {get_variant(n).role for n in pair if n != inner(pair)}:
        assert torch.equal(out.sequences, generate(reference, ids).sequences)
    if "zipcache" in pair:
        plain = generate(original, ids).past_key_values
        assert out.past_key_values.nbytes() < sum(layer_nbytes(layer) for layer in plain.layers)
        assert torch.equal(out.sequences[:, :41], generate(reference, ids).sequences[:, :41])  # same prefill

    # trained modifiers modify: the composition differs from the inner variant alone
    perturb(model)
    logits = prefill_logits(model)
    if any(get_variant(n).trainable for n in pair):
        assert not logits.equal(expected)

    # save -> load: the same list of specs, the same logits (patchattn.from_pretrained and the Auto class)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["patchattn"]
    assert [s["variant"] for s in saved] == list(pair)
    for loaded in (patchattn.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert loaded.config.patchattn == model.config.patchattn
        torch.testing.assert_close(prefill_logits(loaded.eval()), logits, atol=0, rtol=0)

    # unpatch the first-patched variant: bit-exact the model patched with the second alone (its weights renamed)
    unpatch_model(model, pair[0])
    rest = alone(family, pair[1], model.state_dict())
    assert model.config.patchattn == rest.config.patchattn
    assert model.state_dict().keys() == rest.state_dict().keys()
    torch.testing.assert_close(prefill_logits(model), prefill_logits(rest), atol=0, rtol=0)

    # unpatch all: the original model, bit for bit
    unpatch_model(model)
    assert type(model) is type(original) and not patchattn.is_patched(model)
    written_by_save = ("architectures", "dtype")  # save_pretrained records these on the model's config
    assert ({k: v for k, v in model.config.to_dict().items() if k not in written_by_save}
            == {k: v for k, v in original_config.items() if k not in written_by_save})
    state = model.state_dict()
    assert state.keys() == original_state.keys() and all(torch.equal(state[k], original_state[k]) for k in state)
    assert torch.equal(prefill_logits(model), original_logits)


def test_unpatch_the_second_and_the_inner_variant():
    """Removing the variant patched last (no renaming) or the one run innermost leaves the other running alone."""
    model = patch(tiny_model("llama"), "gated", "hyper")
    perturb(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    unpatch_model(model, "hyper")
    gated = alone("llama", "gated", state)
    assert model.config.patchattn == gated.config.patchattn
    assert torch.equal(prefill_logits(model), prefill_logits(gated))
    patch(model, "hyper")  # and back: the composition again, with the same gate
    again = patch(tiny_model("llama"), "gated", "hyper")
    again.load_state_dict(state)
    assert torch.equal(prefill_logits(model), prefill_logits(again))


def test_three_variants_stack():
    """gated over zipcache over hyper: the gate multiplies what zipcache returns, which runs hyper's prefill."""
    model = patch(tiny_model("qwen3"), "hyper", "zipcache", "gated")
    torch.testing.assert_close(prefill_logits(model), prefill_logits(alone("qwen3", "hyper")), atol=0, rtol=0)
    stack = model.model.layers[3].self_attn.__dict__["_patchattn_stack"]
    assert [model.model.layers[3].self_attn._modules[n].name for n in stack] == ["gated", "zipcache", "hyper"]
    assert [model.model.layers[0].self_attn._modules[n].name for n in
            model.model.layers[0].self_attn.__dict__["_patchattn_stack"]] == ["gated", "zipcache"]
    out = generate(model, tokens(1, 40, seed=3))
    assert out.past_key_values.nbytes() < sum(layer_nbytes(layer) for layer in
                                              generate(tiny_model("qwen3"), tokens(1, 40, seed=3)).past_key_values.layers)
    perturb(model)
    unpatch_model(model, "zipcache")  # the middle one: gated then runs over hyper, its gate now patchattn_layer_1
    rest = patch(tiny_model("qwen3"), "hyper", "gated")
    rest.load_state_dict(model.state_dict())
    assert model.config.patchattn == rest.config.patchattn
    assert torch.equal(prefill_logits(model), prefill_logits(rest))


NAMES = ["hyper", "dhsa", "zipcache", "streaming", "gated", "affine", "act", "moh", "sigmoid", "lawcat", "exact"]
CONFLICTS = [(a, b) for a in NAMES for b in NAMES
             if a != b and composition_conflict(VARIANTS[a], VARIANTS[b]) is not None]


def test_roles_of_every_variant():
    roles = {name: cls.role for name, cls in VARIANTS.items()}
    assert {n for n, r in roles.items() if r == "prefill"} == {"hyper", "dhsa"}
    assert {n for n, r in roles.items() if r == "kv_cache"} == {"zipcache", "streaming"}
    assert {n for n, r in roles.items() if r == "modifier"} == {"gated", "affine", "act"}
    assert {n for n, r in roles.items() if r == "replacement"} == set(VARIANTS) - {
        "hyper", "dhsa", "zipcache", "streaming", "gated", "affine", "act"}
    compatible = {frozenset((a, b)) for a in VARIANTS for b in VARIANTS
                  if a < b and composition_conflict(VARIANTS[a], VARIANTS[b]) is None}
    assert compatible == {frozenset(p) for p in PAIRS}  # exactly the pairs test_compatible_pair proves
    assert {v["name"]: v["role"] for v in patchattn.list_variants()} == roles


@pytest.mark.parametrize("pair", CONFLICTS, ids="+".join)
def test_conflicts_raise_naming_both_variants_and_roles(pair):
    first, second = pair
    model = patch_model(tiny_model("llama"), first)
    before = [dict(s) for s in model.config.patchattn]
    stacks = [m.__dict__.get("_patchattn_stack") for m in (layer.self_attn for layer in model.model.layers)]
    a, b = get_variant(second), get_variant(first)
    with pytest.raises(ValueError) as info:
        patch_model(model, second, layers="last:2")
    message = str(info.value)
    for cls in (a, b):
        assert f"'{cls.name}' ({ROLE_LABELS[cls.role]})" in message
    assert "layers [2, 3]" in message and f"unpatch_model(model, '{first}')" in message
    assert model.config.patchattn == before  # refused before anything changed
    assert [m.__dict__.get("_patchattn_stack") for m in (layer.self_attn for layer in model.model.layers)] == stacks


def test_same_variant_twice_and_unknown_unpatch_are_refused():
    model = patch_model(tiny_model("llama"), "gated")
    with pytest.raises(ValueError, match="already patched with 'gated'; call patchattn.unpatch_model.model, 'gated'"):
        patch_model(model, "gated", layers=[0])
    with pytest.raises(ValueError, match=r"not patched with 'hyper'; its patches: \['gated'\]"):
        unpatch_model(model, "hyper")
    unpatch_model(model, "gated")  # the only one: the whole patch goes
    assert not patchattn.is_patched(model)


def test_conflicting_roles_on_disjoint_layers_are_allowed():
    """A conflict is about sharing a layer: two prefill approximations on different layers both run."""
    model = tiny_model("llama")
    patch_model(model, "hyper", **{**PARAMS["hyper"], "layers": [2]})
    patch_model(model, "dhsa", **{**PARAMS["dhsa"], "layers": [3]})
    prefill_logits(model)
    paths = patchattn.attention_paths(model)
    assert paths == {2: {"approximate": 1}, 3: {"approximate": 1}}
    assert patchattn.patched_layers(model) == [2, 3]
    assert [s["variant"] for s in patchattn.patch_specs(model)] == ["hyper", "dhsa"]


def test_conflicting_specs_in_a_config_are_refused_before_loading(tmp_path):
    model = patch_model(tiny_model("llama"), "hyper", layers=[3])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["patchattn"].append({**config["patchattn"][0], "variant": "dhsa", "params": {}})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cannot combine 'dhsa' .prefill approximation. with 'hyper'"):
        patchattn.from_pretrained(tmp_path)


def test_single_spec_config_of_earlier_versions_still_loads(tmp_path):
    """config.json with one spec object instead of a list (what patchattn wrote before compositions), with the
    patched or (0.1) the base model type."""
    model = patch_model(tiny_model("llama"), "gated")
    perturb(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["patchattn"] = config["patchattn"][0]
    for model_type in ("patchattn_llama", "llama"):
        (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        loaded = patchattn.from_pretrained(tmp_path)
        assert isinstance(loaded.config.patchattn, list) and loaded.config.patchattn == model.config.patchattn
        assert torch.equal(prefill_logits(loaded.eval()), prefill_logits(model))


def test_cli_convert_composes(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from patchattn.cli import main

    source = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(source)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(source)
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out), "--variant", "hyper", "--variant", "zipcache",
                 "--layers", "hyper=last:2", "--param", "hyper.min_seq_len=16", "--param", "zipcache.high_bits=8"]) == 0
    specs = json.loads((out / "config.json").read_text())["patchattn"]
    assert [(s["variant"], s["layers"]) for s in specs] == [("hyper", [2, 3]), ("zipcache", [0, 1, 2, 3])]
    assert specs[0]["params"]["min_seq_len"] == 16 and specs[1]["params"]["high_bits"] == 8
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(specs))
    again = tmp_path / "again"
    assert main(["convert", str(source), str(again), "--spec", str(spec_file)]) == 0
    assert json.loads((again / "config.json").read_text())["patchattn"] == specs


@pytest.mark.parametrize("argv, message", [
    (["--variant", "hyper", "--variant", "zipcache", "--param", "min_seq_len=16"],
     "with several --variant, name the variant: NAME.min_seq_len=VALUE"),
    (["--variant", "hyper", "--param", "zipcache.high_bits=8"], "zipcache.high_bits names no --variant"),
    (["--variant", "hyper", "--layers", "dhsa=last:2"], "dhsa=last:2 names no --variant"),
    (["--variant", "hyper", "--variant", "dhsa"],
     "argument --variant: cannot combine 'dhsa' (prefill approximation) with 'hyper' (prefill approximation)"),
    (["--variant", "hyper", "--variant", "zipcache", "--param", "zipcache.high_bits=3"],
     "argument --param: zipcache: parameter 'high_bits' must be one of"),
])
def test_cli_composition_errors(argv, message, capsys, tmp_path):
    from patchattn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "smollm2-135m", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_peft_runs_and_trains_a_composition():
    """PEFT's modules_to_save copies of the variants keep the chain: the gate (``patchattn_layer_1``) runs over
    hyper and trains beside LoRA (``patching.layer_attrs`` names every variant submodule)."""
    from peft import LoraConfig, get_peft_model

    from patchattn.patching import layer_attrs

    model = patch(tiny_model("llama"), "hyper", "gated")
    perturb(model)
    expected = prefill_logits(model)
    assert layer_attrs(model) == ["patchattn_layer", "patchattn_layer_1"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=layer_attrs(model)))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=tokens()).logits, expected, atol=1e-6, rtol=0)
    ids = tokens()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    gates = [p for n, p in peft_model.named_parameters() if ".patchattn_layer_1." in n and p.requires_grad]
    assert gates and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_left_padded_batch(family):
    """Padding reaches every variant of the chain: the padded prefill equals hyper alone on the valid rows, and a
    padded generate decodes over zipcache's blocks under the gate."""
    ids = tokens(3, 48, seed=2)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 7, 20]):
        ids[row, :pad], mask[row, :pad] = 0, 0
    model = patch(tiny_model(family), "hyper", "zipcache", "gated")
    reference = alone(family, "hyper")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, **{CACHE_KW: patchattn.generation_cache(model)}).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=0, rtol=0)
    assert any(p.get("approximate") for p in patchattn.attention_paths(model).values())
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (3, 54) and out.past_key_values.layers[0].quantized_length > 0

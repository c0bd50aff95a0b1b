"""Patched checkpoints load right with every loader or are refused; the patch record belongs to its model;
patch_model is atomic; PEFT trains, saves and reloads the variant."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import perturb_variant_weights, random_ids, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import patchattn
from patchattn.attention import EXACT_BACKEND_ATTR
from patchattn.variants.gated import GatedAttention

APPROX = dict(min_seq_len=16, block_size=16, sample_size=16, lsh_num_projs=3, exact_tail=0)


def tokens(n=48, batch=2, seed=0):
    return random_ids(batch, n, seed)


@torch.no_grad()
def logits(model, ids=None):
    return model(input_ids=tokens() if ids is None else ids).logits


def perturb(model):
    """Give the variant's parameters non-initial values, so a load that dropped them would show."""
    perturb_variant_weights(model, 0.3)


def saved_patched(tmp_path, family="llama", variant="gated", **params):
    model = tiny_model(family)
    patchattn.patch_model(model, variant, **params)
    perturb(model)
    model.save_pretrained(tmp_path)
    return model


def test_plain_transformers_refuses_a_patched_checkpoint(tmp_path):
    saved_patched(tmp_path)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert run.returncode != 0
    assert "patchattn_llama" in run.stderr


@pytest.mark.parametrize("family,variant,params", [
    ("llama", "gated", {}), ("qwen3", "lawcat", {"window": 4}), ("gemma3", "hyper", APPROX),
    ("mistral", "moh", {}), ("gemma2", "lightning", {}),
])
def test_auto_class_loads_the_patched_model(tmp_path, family, variant, params):
    model = saved_patched(tmp_path, family, variant, **params)
    ref = logits(model)
    auto, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no "UNEXPECTED keys" report
    assert patchattn.is_patched(auto) and auto.config.patchattn == model.config.patchattn
    assert torch.equal(logits(auto.eval()), ref)
    assert torch.equal(logits(patchattn.from_pretrained(tmp_path).eval()), ref)


def test_checkpoint_of_patchattn_0_1_still_loads(tmp_path):
    model = saved_patched(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])  # what 0.1 wrote
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = patchattn.from_pretrained(tmp_path)
    assert patchattn.is_patched(loaded)
    assert torch.equal(logits(loaded.eval()), logits(model))


def test_corrupt_spec_is_refused_before_loading(tmp_path):
    saved_patched(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["patchattn"][0]["params"] = {"granularity": "diagonal"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="patchattn spec has invalid parameters.*granularity"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="patchattn spec has invalid parameters"):
        patchattn.from_pretrained(tmp_path)


def test_missing_local_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        patchattn.from_pretrained(str(tmp_path / "nope"))


def test_patch_record_belongs_to_the_model_when_configs_are_shared(tmp_path):
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    a, b = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    patchattn.patch_model(a, "gated")
    perturb(a)
    assert patchattn.is_patched(a) and not patchattn.is_patched(b)
    assert not hasattr(b.config, "patchattn") and not hasattr(config, "patchattn")
    with pytest.raises(ValueError, match="not patched"):
        patchattn.unpatch_model(b)
    a.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["patchattn"][0]["variant"] == "gated"
    assert a.model.layers[0].self_attn.config is a.config  # submodules follow the model's own copy
    patchattn.unpatch_model(a)
    assert type(a) is LlamaForCausalLM and not hasattr(a.config, "patchattn")


def test_failed_patch_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_model("llama")
    ref, keys = logits(model), set(model.state_dict())
    attach = GatedAttention.attach

    def fails_on_layer_2(self, module):
        if self.layer_idx == 2:
            raise RuntimeError("attach failed")
        attach(self, module)

    monkeypatch.setattr(GatedAttention, "attach", fails_on_layer_2)
    with pytest.raises(RuntimeError, match="attach failed"):
        patchattn.patch_model(model, "gated")
    assert not patchattn.is_patched(model) and type(model) is LlamaForCausalLM
    assert set(model.state_dict()) == keys
    assert all(not layer.self_attn._forward_pre_hooks for layer in model.model.layers)  # no hook left behind
    assert torch.equal(logits(model), ref)


def test_set_attn_implementation_keeps_the_variant_and_sets_the_exact_backend():
    model = tiny_model("llama")
    patchattn.patch_model(model, "gated", layers=[0])
    perturb(model)
    patched = logits(model)
    model.set_attn_implementation("eager")
    assert patchattn.is_patched(model) and model.config._attn_implementation == "patchattn"
    assert model.model.layers[1].self_attn.__dict__[EXACT_BACKEND_ATTR] == "eager"
    torch.testing.assert_close(logits(model), patched, atol=1e-5, rtol=0)
    patchattn.unpatch_model(model)
    assert model.config._attn_implementation == "eager"  # the user's choice comes back


def test_exact_layers_keep_the_backend_the_model_was_loaded_with(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    patchattn.patch_model(model, "exact", layers=[0])
    assert {layer.self_attn.__dict__[EXACT_BACKEND_ATTR] for layer in model.model.layers} == {"eager"}
    patchattn.unpatch_model(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("first,second", [("20KB", "2GB"), ("2GB", "20KB")])
def test_resaving_into_a_used_folder_leaves_one_weights_layout(tmp_path, first, second):
    model = tiny_model("llama")
    patchattn.patch_model(model, "gated")
    model.save_pretrained(tmp_path, max_shard_size=first)
    perturb(model)  # the second save holds other variant weights: a mix would show in the logits
    model.save_pretrained(tmp_path, max_shard_size=second)
    names = set(os.listdir(tmp_path))
    assert ("model.safetensors" in names) != ("model.safetensors.index.json" in names)
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path), patchattn.from_pretrained(tmp_path)):
        assert torch.equal(logits(loaded.eval()), logits(model))


def test_fixed_attn_implementations_are_offered_only_where_they_work(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    for name in ("patchattn_zipcache", "patchattn_act", "patchattn_gated"):
        with pytest.raises(ValueError, match=name):
            AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name)


# -- PEFT ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["gated", "lawcat"])
def test_peft_trains_saves_and_reloads_the_variant(tmp_path, variant):
    base = tiny_model("llama")
    fresh_base = copy.deepcopy(base)
    patchattn.patch_model(base, variant)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=[patchattn.LAYER_ATTR])
    peft_model = get_peft_model(base, lora)
    trained = {n: p.detach().clone() for n, p in peft_model.named_parameters()
               if p.requires_grad and f".{patchattn.LAYER_ATTR}." in n}
    assert trained, "the variant's parameters must train beside LoRA"
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(24)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, trained[n]) for n, p in peft_model.named_parameters() if n in trained)
    peft_model.eval()
    ref = logits(peft_model, ids)
    generated = peft_model.generate(input_ids=ids[:1, :8], max_new_tokens=4, do_sample=False)
    peft_model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(patchattn.patch_model(fresh_base, variant), tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), ref)
    assert torch.equal(reloaded.generate(input_ids=ids[:1, :8], max_new_tokens=4, do_sample=False), generated)
    merged = reloaded.merge_and_unload()
    assert patchattn.is_patched(merged)
    torch.testing.assert_close(logits(merged, ids), ref, atol=1e-5, rtol=0)


def test_patching_a_peft_model_says_patch_first():
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="patch the transformers model before wrapping"):
        patchattn.patch_model(peft_model, "gated")


@pytest.mark.parametrize("variant", ["gated", "lawcat"])
def test_deepcopy_of_a_patched_model_is_independent(variant):
    """A copy's variants serve the copy's attention modules (the linear cache layer hands its state over there)."""
    model = tiny_model("llama")
    patchattn.patch_model(model, variant)
    perturb(model)
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].self_attn.patchattn_layer.host is twin.model.layers[0].self_attn
    ids = tokens(12, batch=1)
    assert torch.equal(twin.generate(ids, max_new_tokens=5, do_sample=False),
                       model.generate(ids, max_new_tokens=5, do_sample=False))
    assert torch.equal(logits(twin), logits(model))

"""Hub round trips (push → download → same logits) against a real HTTP server speaking the Hub API.

Each test starts ``tests/hub_server.py`` on 127.0.0.1 (a free port) and gets a fresh ``HF_HOME``. huggingface_hub
reads ``HF_ENDPOINT`` and ``HF_HOME`` once, at import, into ``huggingface_hub.constants`` (and transformers keeps a
shared ``HfApi`` built from them), and both are imported long before a test runs. So the ``hub`` fixture sets the
environment variables (inherited by subprocesses) *and* patches the constants derived from them, restoring all of
it afterwards. ``test_cli_push_with_hf_endpoint_env`` covers the user's route with no patching at all: a subprocess
whose only configuration is the environment.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
import transformers.utils.hub
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tiny_models import VOCAB, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import patchattn
from patchattn.loading import DELTA_FILE
from patchattn.models.chatglm2 import ChatGLM2ForCausalLM
from patchattn.patching import read_specs

HYPER = dict(layers="last:2", min_seq_len=16, block_size=8, sample_size=8, exact_tail=0)  # hyper really runs on IDS
IDS = torch.randint(4, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubServer(tmp_path / "server") as server:
        home = tmp_path / "hf_home"
        for key, value in {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_TOKEN": "hf_local_test",
                           "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
            monkeypatch.setenv(key, value)
        for key in ("HF_HUB_OFFLINE", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(key, raising=False)
        for name, value in {"ENDPOINT": server.url,
                            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
                            "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                            "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                            "HF_HUB_OFFLINE": False}.items():
            monkeypatch.setattr(constants, name, value)
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # its shared HfApi keeps the old endpoint
        yield server


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def patched(family: str = "llama"):
    return patchattn.patch_model(tiny_model(family), "hyper", **HYPER)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_chatglm2():
    chatglm2 = pytest.importorskip("patchattn.models.chatglm2")
    config = chatglm2.ChatGLM2Config(num_layers=2, padded_vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=96,
                                     kv_channels=16, num_attention_heads=4, multi_query_attention=True,
                                     multi_query_group_num=2, add_qkv_bias=True, seq_length=256)
    torch.manual_seed(0)
    return chatglm2.ChatGLM2ForCausalLM(config).eval()


def train(model, *keys: str) -> None:
    """Simulate training: nudge these parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in keys:
            params[key].add_(0.05)


#: huggingface_hub 1.x posts ModelCard.validate() to https://huggingface.co whatever HF_ENDPOINT says (no network in
#: tests); later versions post to the configured endpoint, the local server
VALIDATES_ON_ENDPOINT = "constants.ENDPOINT" in inspect.getsource(ModelCard.validate)


def delta_keys(hub, repo_id: str) -> set[str]:
    return set(safetensors.torch.load(hub.files(repo_id)[DELTA_FILE]))


def test_full_round_trip(hub, tmp_path):
    model = patched()
    info = patchattn.push_to_hub(
        model, "me/llama-hyper", tokenizer=tiny_tokenizer(), max_shard_size="200KB",
        eval_results=[{"context": 2048, "perplexity": 12.3456, "patch": {"nested": "left out"}},
                      {"context": 4096, "perplexity": 13.5}],
        recipe_config={"lr": 1e-4, "steps": 100})

    files = hub.files("me/llama-hyper")
    shards = [f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".py"))]  # no pickle, no remote code
    uploaded = SimpleNamespace(patchattn=json.loads(files["config.json"])["patchattn"])
    assert read_specs(uploaded) == model.config.patchattn  # the same spec (JSON turned int keys into strings)
    commits = hub.commits("me/llama-hyper")
    assert len(commits) == 2 and commits[0] == info.oid  # the repo's initial commit + the push

    card = ModelCard(files["README.md"].decode())
    if VALIDATES_ON_ENDPOINT:  # POST /api/validate-yaml on the local server, which does reject bad metadata:
        card.validate()
        with pytest.raises(ValueError, match="base_model_relation"):
            ModelCard("---\nbase_model: a/b\nbase_model_relation: remix\n---\n").validate()
    assert card.data.library_name == "patchattn" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["patchattn", "hyper", "llama"]
    assert "| 2048 | 12.35 |" in card.text and "nested" not in card.text and "lr: 0.0001" in card.text
    assert f"transformers {transformers.__version__}" in card.text and "min_seq_len" in card.text
    assert "patchattn_llama" in card.text and "modules_to_save" in card.text  # plain loaders, PEFT
    index = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}  # model-index
    assert index == {("context=2048", "perplexity"): 12.3456, ("context=4096", "perplexity"): 13.5}

    expected = logits(model)
    fresh = patchattn.from_pretrained("me/llama-hyper", cache_dir=tmp_path / "fresh_cache")
    assert fresh.config.patchattn == model.config.patchattn
    assert torch.equal(logits(fresh), expected)
    prompt = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(3))  # > min_seq_len: hyper runs
    assert torch.equal(fresh.generate(prompt, max_new_tokens=8, do_sample=False),
                       model.generate(prompt, max_new_tokens=8, do_sample=False))

    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)  # the card's "how to load" runs as is
    namespace = {}
    exec(snippet, namespace)
    assert torch.equal(logits(namespace["model"]), expected)
    assert namespace["tokenizer"]("w5 w6")["input_ids"] == [5, 6]


def test_delta_round_trip_matches_full_upload(hub):
    tiny_model("llama").push_to_hub("org/tiny-llama")
    HfApi().upload_file(path_or_fileobj=b"---\nlicense: apache-2.0\n---\nA tiny base model.\n",
                        path_in_repo="README.md", repo_id="org/tiny-llama")
    base_sha = hub.commits("org/tiny-llama")[0]
    model = patched()
    trained = ["model.layers[1].mlp.down_proj.weight", "model.norm.weight"]
    train(model, *[k.replace("[1]", ".1") for k in trained])

    patchattn.push_to_hub(model, "me/llama-hyper-delta", delta_only=True, base_model="org/tiny-llama")
    patchattn.push_to_hub(model, "me/llama-hyper-full", base_model="org/tiny-llama")

    assert delta_keys(hub, "me/llama-hyper-delta") == {"model.layers.1.mlp.down_proj.weight", "model.norm.weight"}
    files = hub.files("me/llama-hyper-delta")
    assert not [f for f in files if f.startswith("model")]
    assert json.loads(files["config.json"])["patchattn"][0]["delta"] == {
        "base_model": "org/tiny-llama", "base_revision": base_sha, "file": DELTA_FILE}
    card = ModelCard(files["README.md"].decode())
    assert (card.data.base_model, card.data.base_model_relation) == ("org/tiny-llama", "adapter")
    assert card.data.license == "apache-2.0"  # carried over from the base model's card
    full_card = ModelCard(hub.files("me/llama-hyper-full")["README.md"].decode())
    assert full_card.data.base_model_relation == "finetune"

    expected = logits(model)
    from_delta = patchattn.from_pretrained("me/llama-hyper-delta")
    assert torch.equal(logits(from_delta), expected)
    assert "delta" not in from_delta.config.patchattn[0]  # a re-save of the loaded model is a whole model
    assert torch.equal(logits(patchattn.from_pretrained("me/llama-hyper-full")), expected)
    with pytest.raises(ValueError, match="delta upload"):
        AutoModelForCausalLM.from_pretrained("me/llama-hyper-delta")


def test_trainable_variant_round_trip_full_and_delta(hub):
    """A trained `gated` model: the delta holds exactly the gate weights; both uploads reload to the same logits."""
    tiny_model("llama").push_to_hub("org/tiny-llama")
    model = patchattn.patch_model(tiny_model("llama"), "gated", layers="last:2")
    gates = [k for k, _ in model.named_parameters() if ".patchattn_layer." in k]
    assert gates
    train(model, *gates)

    patchattn.push_to_hub(model, "me/llama-gated-delta", delta_only=True, base_model="org/tiny-llama")
    patchattn.push_to_hub(model, "me/llama-gated-full", base_model="org/tiny-llama")

    assert delta_keys(hub, "me/llama-gated-delta") == set(gates)
    expected = logits(model)
    for repo in ("me/llama-gated-delta", "me/llama-gated-full"):
        loaded = patchattn.from_pretrained(repo)
        assert loaded.config.patchattn[0]["variant"] == "gated"
        assert torch.equal(logits(loaded), expected)


def test_composition_round_trip_full_and_delta(hub):
    """hyper then gated (its gate under ``patchattn_layer_1``): the delta holds the gates, its record sits on the
    first spec, the card names both variants, and both uploads reload the composition with the same logits."""
    tiny_model("llama").push_to_hub("org/tiny-llama")
    model = patchattn.patch_model(tiny_model("llama"), "hyper", **HYPER)
    patchattn.patch_model(model, "gated", layers="last:2")
    gates = [k for k, _ in model.named_parameters() if ".patchattn_layer_1." in k]
    assert gates
    train(model, *gates)
    patchattn.push_to_hub(model, "me/llama-hg-delta", delta_only=True, base_model="org/tiny-llama")
    patchattn.push_to_hub(model, "me/llama-hg-full", base_model="org/tiny-llama")
    assert delta_keys(hub, "me/llama-hg-delta") == set(gates)
    specs = json.loads(hub.files("me/llama-hg-delta")["config.json"])["patchattn"]
    assert [s["variant"] for s in specs] == ["hyper", "gated"] and "delta" in specs[0] and "delta" not in specs[1]
    card = hub.files("me/llama-hg-full")["README.md"].decode()
    assert "`hyper + gated`" in card and "`gated.granularity`" in card
    expected = logits(model)
    for repo in ("me/llama-hg-delta", "me/llama-hg-full"):
        loaded = patchattn.from_pretrained(repo)
        assert loaded.config.patchattn == model.config.patchattn
        assert torch.equal(logits(loaded), expected)


def test_tied_weights_and_merged_lora_in_a_delta(hub):
    peft = pytest.importorskip("peft")
    base = tiny_model("gemma")  # ties lm_head to embed_tokens
    base.push_to_hub("org/tiny-gemma")
    model = patchattn.patch_model(copy.deepcopy(base), "hyper", **HYPER)
    train(model, "model.embed_tokens.weight")
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))

    with pytest.raises(ValueError, match="merge_and_unload"):
        patchattn.push_to_hub(lora, "me/gemma-lora", delta_only=True, base_model="org/tiny-gemma")
    merged = lora.merge_and_unload()
    patchattn.push_to_hub(merged, "me/gemma-lora", delta_only=True, base_model="org/tiny-gemma")

    q_proj = {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)}
    assert delta_keys(hub, "me/gemma-lora") == {"model.embed_tokens.weight"} | q_proj  # lm_head: tied, once
    assert torch.equal(logits(patchattn.from_pretrained("me/gemma-lora")), logits(merged))


def test_chatglm2_port_round_trip(hub):
    base = tiny_chatglm2()
    base.push_to_hub("org/tiny-chatglm2")
    model = patchattn.patch_model(copy.deepcopy(base), "hyper", **HYPER)
    train(model, "transformer.encoder.layers.0.self_attention.dense.weight")
    patchattn.push_to_hub(model, "me/chatglm2-hyper")
    patchattn.push_to_hub(model, "me/chatglm2-hyper-delta", delta_only=True, base_model="org/tiny-chatglm2")

    config = json.loads(hub.files("me/chatglm2-hyper")["config.json"])
    assert config["model_type"] == "patchattn_chatglm" and "auto_map" not in config  # the native port, no remote code
    expected = logits(model)
    for repo in ("me/chatglm2-hyper", "me/chatglm2-hyper-delta"):
        loaded = patchattn.from_pretrained(repo)
        assert isinstance(loaded, ChatGLM2ForCausalLM)  # the native port (its patched twin)
        assert torch.equal(logits(loaded), expected)


def test_update_is_one_commit_and_revision_pins_older_weights(hub):
    model = patched()
    v1 = patchattn.push_to_hub(model, "me/llama-hyper", max_shard_size="200KB")
    v1_logits = logits(model)
    train(model, "model.layers.0.self_attn.o_proj.weight")
    v2 = patchattn.push_to_hub(model, "me/llama-hyper", commit_message="retrained")

    assert hub.commits("me/llama-hyper")[:2] == [v2.oid, v1.oid]
    assert hub.repos["me/llama-hyper"].commits[v2.oid].message == "retrained"
    files = hub.files("me/llama-hyper")
    assert "model.safetensors" in files and not [f for f in files if f.startswith("model-")]  # stale shards gone
    assert "model.safetensors.index.json" not in files
    assert torch.equal(logits(patchattn.from_pretrained("me/llama-hyper")), logits(model))
    assert torch.equal(logits(patchattn.from_pretrained("me/llama-hyper", revision=v1.oid)), v1_logits)

    train(model, "model.norm.weight")
    dev = patchattn.push_to_hub(model, "me/llama-hyper", revision="dev")
    assert hub.commits("me/llama-hyper", "dev")[:2] == [dev.oid, v2.oid]
    assert hub.commits("me/llama-hyper")[0] == v2.oid  # main untouched
    assert torch.equal(logits(patchattn.from_pretrained("me/llama-hyper", revision="dev")), logits(model))


def test_interrupted_push_raises_leaves_nothing_and_retry_succeeds(hub, tmp_path, monkeypatch):
    staging_root = tmp_path / "tmp"
    staging_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging_root))
    model = patched()
    hub.fail_next_commits(1)
    with pytest.raises(HfHubHTTPError) as failure:
        patchattn.push_to_hub(model, "me/llama-hyper")
    assert failure.value.response.status_code == 500
    assert "run the same push again" in "\n".join(failure.value.__notes__)
    assert list(staging_root.iterdir()) == []
    assert len(hub.commits("me/llama-hyper")) == 1 and "config.json" not in hub.files("me/llama-hyper")

    patchattn.push_to_hub(model, "me/llama-hyper")
    assert torch.equal(logits(patchattn.from_pretrained("me/llama-hyper")), logits(model))

    hub.stop()  # the server is gone
    with pytest.raises(Exception) as gone:
        patchattn.push_to_hub(model, "me/llama-hyper")
    assert "run the same push again" in "\n".join(gone.value.__notes__)
    assert list(staging_root.iterdir()) == []


def test_missing_repo_revision_and_file_errors_keep_the_hub_error_with_a_hint(hub):
    with pytest.raises(RepositoryNotFoundError) as missing_repo:
        patchattn.from_pretrained("nobody/missing")
    assert "does not exist" in missing_repo.value.__notes__[-1]

    tiny_model("llama").push_to_hub("org/tiny-llama")
    patchattn.push_to_hub(patched(), "me/delta", delta_only=True, base_model="org/tiny-llama")
    with pytest.raises(RevisionNotFoundError) as missing_revision:
        patchattn.from_pretrained("me/delta", revision="0" * 40)
    assert "has no revision" in missing_revision.value.__notes__[-1]

    HfApi().delete_file(DELTA_FILE, "me/delta")
    with pytest.raises(RemoteEntryNotFoundError) as missing_file:
        patchattn.from_pretrained("me/delta")
    assert "push it again" in missing_file.value.__notes__[-1]

    with pytest.raises(RepositoryNotFoundError) as missing_base:
        patchattn.push_to_hub(patched(), "me/other", delta_only=True, base_model="nobody/missing")
    assert "base model" in missing_base.value.__notes__[0]


def test_push_refuses_what_it_cannot_upload(hub):
    with pytest.raises(ValueError, match="not patched"):
        patchattn.push_to_hub(tiny_model("llama"), "me/plain")
    with pytest.raises(ValueError, match="base_model"):
        patchattn.push_to_hub(patched(), "me/delta", delta_only=True)
    assert "me/plain" not in hub.repos and "me/delta" not in hub.repos


def test_cli_push_with_hf_endpoint_env(hub, tmp_path):
    """``patchattn push`` in a fresh interpreter configured only through HF_ENDPOINT / HF_HOME."""
    model = patched()
    model.save_pretrained(tmp_path / "converted")
    tiny_tokenizer().save_pretrained(tmp_path / "converted")
    (tmp_path / "eval.json").write_text(json.dumps({"perplexity": 9.87, "tokens_per_second": 1234.5}))
    cli = ("import argparse, sys; from patchattn.hub import add_cli; parser = argparse.ArgumentParser(); "
           "add_cli(parser.add_subparsers()); args = parser.parse_args(sys.argv[1:]); args.fn(args)")
    env = {**os.environ, "HF_HOME": str(tmp_path / "cli_home")}
    result = subprocess.run(
        [sys.executable, "-c", cli, "push", str(tmp_path / "converted"), "me/cli-hyper", "--eval-json",
         str(tmp_path / "eval.json"), "--commit-message", "from the CLI"],
        env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pushed me/cli-hyper" in result.stdout

    files = hub.files("me/cli-hyper")
    assert "tokenizer.json" in files and "| 9.87 | 1234 |" in files["README.md"].decode()
    assert torch.equal(logits(patchattn.from_pretrained("me/cli-hyper")), logits(model))

"""Native ChatGLM2 port: loads the original checkpoint format and reproduces the original math.

The reference below re-implements the original remote code's forward pass ([seq, batch] layout, fused qkv split,
interleaved half-head rotary, MQA expansion, query-key layer scaling, SwiGLU, RMSNorm) from the raw checkpoint
tensors, independently of the port.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import random_ids
from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from patchattn.models.chatglm2 import (
    ChatGLM2Config,
    ChatGLM2ForCausalLM,
    ChatGLM2Model,
    is_remote_chatglm,
    register,
)

VOCAB = 128
# An original-format config.json (as shipped with THUDM/chatglm2-6b), shrunk.
ORIGINAL_CONFIG = {
    "_name_or_path": "THUDM/chatglm2-6b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 128,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 64,
    "kv_channels": 16,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 4,
    "num_layers": 2,
    "original_rope": True,
    "padded_vocab_size": VOCAB,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 256,
    "use_cache": True,
    "torch_dtype": "float32",
    "transformers_version": "4.27.1",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# The code paths the released checkpoints do not take: per-head qkv layout, LayerNorm, post-norm residuals, biases.
UNUSUAL = dict(multi_query_attention=False, rmsnorm=False, apply_residual_connection_post_layernorm=True,
               add_bias_linear=True, add_qkv_bias=False)
# Remote code that must never run: the native port has to win over auto_map.
POISON = "raise RuntimeError('remote code was executed')\n"


def original_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original key names, scaled so activations and logits are O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    hidden, ffn, hd = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["kv_channels"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads
    qkv = (heads + 2 * kv_heads) * hd
    rotary_dim = hd // 2

    def norm(prefix):
        out = {prefix + ".weight": 1 + rnd(hidden, scale=0.1)}
        if not cfg["rmsnorm"]:
            out[prefix + ".bias"] = rnd(hidden, scale=0.1)
        return out

    sd = {
        "transformer.embedding.word_embeddings.weight": rnd(VOCAB, hidden, scale=1.0),
        # stored by the original (without rope_ratio, and unused by its forward)
        "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)),
        "transformer.output_layer.weight": rnd(VOCAB, hidden, scale=2 * hidden**-0.5),
        **norm("transformer.encoder.final_layernorm"),
    }
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd.update(norm(p + "input_layernorm"))
        sd.update(norm(p + "post_attention_layernorm"))
        sd[p + "self_attention.query_key_value.weight"] = rnd(qkv, hidden, scale=hidden**-0.5)
        sd[p + "self_attention.dense.weight"] = rnd(hidden, heads * hd, scale=(heads * hd) ** -0.5)
        sd[p + "mlp.dense_h_to_4h.weight"] = rnd(2 * ffn, hidden, scale=hidden**-0.5)
        sd[p + "mlp.dense_4h_to_h.weight"] = rnd(hidden, ffn, scale=ffn**-0.5)
        if cfg["add_bias_linear"] or cfg["add_qkv_bias"]:
            sd[p + "self_attention.query_key_value.bias"] = rnd(qkv, scale=0.1)
        if cfg["add_bias_linear"]:
            sd[p + "self_attention.dense.bias"] = rnd(hidden, scale=0.1)
            sd[p + "mlp.dense_h_to_4h.bias"] = rnd(2 * ffn, scale=0.1)
            sd[p + "mlp.dense_4h_to_h.bias"] = rnd(hidden, scale=0.1)
    return sd


def write_checkpoint(path, seed: int = 0, **overrides):
    """An original-format checkpoint directory (config.json with auto_map + remote code files + safetensors)."""
    cfg = {**ORIGINAL_CONFIG, **overrides}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "configuration_chatglm.py").write_text(POISON)
    (path / "modeling_chatglm.py").write_text(POISON)
    sd = original_weights(cfg, seed)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return cfg, sd


def reference_logits(sd: dict, cfg: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """The original ChatGLM2 forward ([seq, batch] layout), no padding, no cache."""
    heads, hd, eps = cfg["num_attention_heads"], cfg["kv_channels"], cfg["layernorm_epsilon"]
    mqa = cfg["multi_query_attention"]
    groups = cfg["multi_query_group_num"] if mqa else heads
    post_ln_residual = cfg["apply_residual_connection_post_layernorm"]

    def get(name):
        return sd.get(name)

    def norm(x, prefix):
        if not cfg["rmsnorm"]:
            return F.layer_norm(x, x.shape[-1:], get(prefix + ".weight"), get(prefix + ".bias"), eps)
        return get(prefix + ".weight") * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def linear(x, prefix):
        return F.linear(x, get(prefix + ".weight"), get(prefix + ".bias"))

    x = get("transformer.embedding.word_embeddings.weight")[input_ids].transpose(0, 1)  # [s, b, h]
    s, b = x.shape[:2]

    # rope cache [s, n_elem / 2, 2] over n_elem = head_dim / 2 dims, base 10000 * rope_ratio
    n_elem = hd // 2
    theta = 1.0 / ((10000 * cfg.get("rope_ratio", 1)) ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    idx_theta = torch.outer(torch.arange(s, dtype=torch.float), theta)
    rope = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)

    def rotary(t):  # [s, b, n, hd]: rotate interleaved pairs of the first rot_dim dims
        rot_dim = rope.shape[-2] * 2
        t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
        ts = t_rot.reshape(s, b, t.shape[2], rot_dim // 2, 2)
        c = rope.view(s, 1, 1, rot_dim // 2, 2)
        out = torch.stack([ts[..., 0] * c[..., 0] - ts[..., 1] * c[..., 1],
                           ts[..., 1] * c[..., 0] + ts[..., 0] * c[..., 1]], -1).flatten(3)
        return torch.cat((out, t_pass), dim=-1)

    masked = ~torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        ln = norm(x, p + "input_layernorm")
        mixed = linear(ln, p + "self_attention.query_key_value")
        if mqa:
            q, k, v = mixed.split([heads * hd, groups * hd, groups * hd], dim=-1)
            q, k, v = q.view(s, b, heads, hd), k.view(s, b, groups, hd), v.view(s, b, groups, hd)
        else:
            q, k, v = mixed.view(s, b, heads, 3 * hd).split(hd, dim=-1)
        q, k = rotary(q), rotary(k)
        k = k.unsqueeze(-2).expand(-1, -1, -1, heads // groups, -1).reshape(s, b, heads, hd)
        v = v.unsqueeze(-2).expand(-1, -1, -1, heads // groups, -1).reshape(s, b, heads, hd)
        # query-key layer scaling: divide by sqrt(hd) * layer_number, multiply the layer number back in fp32
        coeff = i + 1
        scores = torch.einsum("sbnd,tbnd->bnst", q, k) / (math.sqrt(hd) * coeff)
        probs = (scores.float() * coeff).masked_fill(masked, float("-inf")).softmax(dim=-1)
        context = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(s, b, heads * hd)
        attn = linear(context, p + "self_attention.dense")
        x = (ln if post_ln_residual else x) + attn
        ln = norm(x, p + "post_attention_layernorm")
        gate, up = linear(ln, p + "mlp.dense_h_to_4h").chunk(2, dim=-1)
        x = (ln if post_ln_residual else x) + linear(F.silu(gate) * up, p + "mlp.dense_4h_to_h")
    x = norm(x, "transformer.encoder.final_layernorm")
    return F.linear(x, get("transformer.output_layer.weight")).transpose(0, 1)


def tokens(batch=2, n=12, seed=1):
    return random_ids(batch, n, seed, vocab=VOCAB)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatglm2-6b")
    cfg, sd = write_checkpoint(path)
    return path, cfg, sd


def load(path, **kwargs):
    register()
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@torch.no_grad()
def greedy_without_cache(model, ids, steps, attention_mask=None):
    """Greedy decoding that re-runs the full forward each step (eos suppressed, as min_new_tokens does)."""
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits[:, -1]
        logits[:, model.generation_config.eos_token_id] = -float("inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(ids), 1)], dim=-1)
    return ids


def greedy(model, ids, steps, **kwargs):
    return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **kwargs)


def test_config_keeps_original_fields_and_maps_standard_names():
    default = ChatGLM2Config()
    assert (default.num_layers, default.padded_vocab_size, default.seq_length, default.kv_channels) == (28, 65024, 2048, 128)
    assert (default.multi_query_attention, default.multi_query_group_num, default.add_qkv_bias) == (False, 1, False)
    assert default.num_key_value_heads == default.num_attention_heads == 32
    assert (default.rope_ratio, default.pre_seq_len, default.quantization_bit) == (1, None, 0)

    config = ChatGLM2Config(**{k: v for k, v in ORIGINAL_CONFIG.items() if k != "model_type"}, max_length=8192,
                            interleaved_qkv=False)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (2, 2, 16)
    assert (config.max_position_embeddings, config.vocab_size, config.intermediate_size) == (256, VOCAB, 128)
    assert config.use_cache is True and config.original_rope is True
    saved = config.to_dict()
    assert saved["num_layers"] == 2 and saved["padded_vocab_size"] == VOCAB and "num_hidden_layers" not in saved


def test_register_is_idempotent_and_wins_over_auto_map(checkpoint):
    path, _, _ = checkpoint
    register()
    register()
    assert type(AutoConfig.from_pretrained(path)) is ChatGLM2Config
    # Even with trust_remote_code=True the checkpoint's (here: poisoned) remote code is not run.
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert type(model) is ChatGLM2ForCausalLM
    assert type(AutoModel.from_pretrained(path)) is ChatGLM2Model


def test_original_checkpoint_loads_without_missing_or_unexpected_keys(checkpoint):
    path, _, sd = checkpoint
    register()
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model) is ChatGLM2ForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    assert set(state) == set(sd) - {"transformer.rotary_pos_emb.inv_freq"}
    for name, tensor in state.items():
        assert torch.equal(tensor, sd[name]), name
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("overrides", [{}, {"rope_ratio": 16}, UNUSUAL], ids=["chatglm2-6b", "rope_ratio16", "unusual"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_original_math(tmp_path, overrides, attn):
    cfg, sd = write_checkpoint(tmp_path, **overrides)
    model = load(tmp_path, attn_implementation=attn)
    ids = tokens()
    with torch.no_grad():
        logits = model(ids).logits
    expected = reference_logits(sd, cfg, ids)
    assert expected.abs().max() > 1  # logits are O(1), so the tolerance is meaningful
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_rope_ratio_scales_the_rotary_base(tmp_path):
    write_checkpoint(tmp_path / "base")
    write_checkpoint(tmp_path / "32k", rope_ratio=16)
    base, long = load(tmp_path / "base"), load(tmp_path / "32k")
    dims = torch.arange(0, 8, 2).float() / 8  # kv_channels 16 -> rotary over 8 dims
    torch.testing.assert_close(base.transformer.rotary_pos_emb.inv_freq, 1.0 / 10000**dims)
    torch.testing.assert_close(long.transformer.rotary_pos_emb.inv_freq, 1.0 / 160000**dims)
    ids = tokens()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, long(ids).logits, atol=1e-3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generate_with_cache_matches_full_recompute(checkpoint, attn):
    model = load(checkpoint[0], attn_implementation=attn)
    ids = tokens(batch=1, n=10)
    out = greedy(model, ids, steps=12)
    assert out.shape[1] == ids.shape[1] + 12
    assert torch.equal(out, greedy_without_cache(model, ids, steps=12))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_generates_like_each_prompt_alone(checkpoint, attn):
    model = load(checkpoint[0], attn_implementation=attn)
    prompts = [tokens(1, 11, seed=3)[0], tokens(1, 5, seed=4)[0], tokens(1, 8, seed=5)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    batched = greedy(model, ids, steps=8, attention_mask=mask)[:, width:]
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None], steps=8)[0, len(prompt):]
        assert torch.equal(batched[row], alone), row
    # and the cached batch agrees with full recomputation under the same padding
    assert torch.equal(batched, greedy_without_cache(model, ids, steps=8, attention_mask=mask)[:, width:])


def test_save_pretrained_round_trip_keeps_original_format(checkpoint, tmp_path):
    model = load(checkpoint[0])
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        saved_keys = set(f.keys())
    assert saved_keys == set(checkpoint[2]) - {"transformer.rotary_pos_emb.inv_freq"}
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["model_type"] == "chatglm" and saved_config["num_layers"] == 2
    reloaded = load(tmp_path)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_half_precision_keeps_fp32_rotary_frequencies(checkpoint):
    """The original builds the rotary angles in fp32 whatever the model dtype; `.to(bf16)` must not round them."""
    model = load(checkpoint[0])
    rope = model.transformer.rotary_pos_emb
    positions = torch.arange(4000)[None]
    expected = rope(positions, torch.bfloat16)
    model.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.bfloat16  # torch casts the buffer ...
    for got, want in zip(rope(positions, torch.bfloat16), expected):
        assert torch.equal(got, want)  # ... but the angles are still exact
    assert load(checkpoint[0], dtype=torch.bfloat16).transformer.rotary_pos_emb.inv_freq.dtype == torch.float32
    assert greedy(model, tokens(1, 6), steps=3).shape == (1, 9)


def test_loss_and_gradient_checkpointing(checkpoint):
    model = load(checkpoint[0])
    ids = tokens()
    out = model(ids, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    model.train()
    # renamed in transformers 5.24
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert model.transformer.encoder.layers[0].gradient_checkpointing
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, expected)
    assert model.transformer.encoder.layers[0].self_attention.query_key_value.weight.grad.abs().sum() > 0


def test_custom_attention_implementation_gets_grouped_kv(checkpoint):
    """What patchattn relies on: a registered implementation sees GQA-shaped (not expanded) K/V and a cache."""
    model = load(checkpoint[0])
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    calls = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, tuple(query.shape), tuple(key.shape), tuple(value.shape)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("chatglm2_test_recorder", recording_attention)
    AttentionMaskInterface.register("chatglm2_test_recorder", sdpa_mask)
    model.set_attn_implementation("chatglm2_test_recorder")
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert calls == [(i, (2, 4, 12, 16), (2, 2, 12, 16), (2, 2, 12, 16)) for i in range(2)]
    calls.clear()
    greedy(model, ids[:1], steps=3)
    assert [c[2] for c in calls[-2:]] == [(1, 2, 14, 16)] * 2  # last decode step: 12 + 2 cached keys, 2 groups


def test_is_remote_chatglm():
    config = ChatGLM2Config(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=32,
                            padded_vocab_size=VOCAB)
    native = ChatGLM2ForCausalLM(config)
    remote_cls = type("ChatGLMForConditionalGeneration", (torch.nn.Module,),
                      {"__module__": "transformers_modules.THUDM.chatglm2-6b.abc123.modeling_chatglm"})
    remote = remote_cls()
    remote.config = config
    assert is_remote_chatglm(remote)
    assert not is_remote_chatglm(native)
    other = remote_cls()
    other.config = type("Cfg", (), {"model_type": "qwen"})()
    assert not is_remote_chatglm(other)


def test_unsupported_original_features_fail_loudly():
    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=32,
                padded_vocab_size=VOCAB)
    with pytest.raises(NotImplementedError, match="quantization_bit"):
        ChatGLM2ForCausalLM(ChatGLM2Config(**base, quantization_bit=4))
    with pytest.raises(NotImplementedError, match="pre_seq_len"):
        ChatGLM2ForCausalLM(ChatGLM2Config(**base, pre_seq_len=8))

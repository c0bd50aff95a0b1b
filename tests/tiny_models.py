"""Tiny random models of every supported family, built from configs (no downloads)."""
from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_outputs import BaseModelOutputWithPast

VOCAB = 96
#: the keyword a model call takes its cache by (transformers renamed past_key_values -> cache after 5.17)
CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(config_cls, model_cls, **overrides):
    config = config_cls(**{**COMMON, **overrides})
    torch.manual_seed(0)
    return model_cls(config).eval()


BUILDERS = {
    "llama": lambda: _build(LlamaConfig, LlamaForCausalLM, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "mistral": lambda: _build(MistralConfig, MistralForCausalLM, sliding_window=24, head_dim=16),
    "gemma": lambda: _build(GemmaConfig, GemmaForCausalLM, head_dim=16, num_key_value_heads=1),
    "gemma2": lambda: _build(Gemma2Config, Gemma2ForCausalLM, head_dim=16, sliding_window=24,
                             query_pre_attn_scalar=24, attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                             attn_implementation="eager"),
    "gemma3": lambda: _build(Gemma3TextConfig, Gemma3ForCausalLM, head_dim=16, sliding_window=24,
                             query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"] * 2),
    "qwen2": lambda: _build(Qwen2Config, Qwen2ForCausalLM),
    "qwen3": lambda: _build(Qwen3Config, Qwen3ForCausalLM, head_dim=16),
}


def tiny_model(family: str):
    return BUILDERS[family]()


def gqa_mistral():
    """Full attention (no sliding window), four query heads per KV head."""
    return _build(MistralConfig, MistralForCausalLM, num_key_value_heads=1, sliding_window=None, head_dim=16)


#: models ZipCache's fused kernels are checked on inside generate(): plain, grouped-query, sliding + softcap
ZIPCACHE_MODELS = {"llama": lambda: tiny_model("llama"), "mistral-gqa": gqa_mistral,
                   "gemma2": lambda: tiny_model("gemma2")}


def random_ids(batch: int, n: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """``[batch, n]`` token ids drawn from ``[3, vocab)`` (clear of pad/bos/eos 0-2) by a generator seeded ``seed``."""
    return torch.randint(3, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def left_padded(n: int, pads, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``len(pads)`` rows of ``n`` random ids, row ``i`` left-padded with ``pads[i]`` pad tokens (0): (ids, mask)."""
    ids = random_ids(len(pads), n, seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


@torch.no_grad()
def perturb_variant_weights(model, scale: float):
    """Add ``scale`` x seeded noise to every parameter of the patched variants (names holding the variant layer's
    attribute), so that they leave their initial values (the gated variant starts as the original model) and a
    lost or mixed-up weight would show; returns ``model``."""
    from patchattn import LAYER_ATTR

    for name, p in model.named_parameters():
        if f".{LAYER_ATTR}." in name:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * scale)
    return model


def word_tokenizer(vocab_size: int):
    """Word-level tokenizer (``<unk>``, BOS ``<s>``) trained on the shipped text's first 20000 characters: offline,
    instant."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from patchattn.data import read_text

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([read_text()[:20000]], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"],
                                                                            vocab_size=vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>")


@torch.no_grad()
def logits(model, ids, mask=None, **kwargs) -> torch.Tensor:
    """The model's logits for ``ids`` (``attention_mask=mask``, ``kwargs`` passed on), without autograd."""
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits

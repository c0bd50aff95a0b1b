"""The model and tokenizer of a recipe: built (or loaded), patched, calibrated, set to train what the config says,
turned back into an inference model, and run as the original softmax model (the distillation teacher)."""
from __future__ import annotations

import os
import re
from collections import Counter
from contextlib import contextmanager, nullcontext

import torch

from .config import ConfigError, ModelFields, TrainableFields
from .data import pack, read_corpus, split_corpus, tokenize_docs

_WORD = re.compile(r"\w+|[^\w\s]+")


def word_level_tokenizer(text: str, vocab_size: int):
    """A deterministic word-level tokenizer (most frequent words of ``text``; ties broken alphabetically)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    counts = Counter(_WORD.findall(text))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max(vocab_size - len(specials), 0)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


#: LlamaConfig of ``model: tiny-llama`` (``model_config`` overrides it)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)


def build_model(config: ModelFields, text: str):
    """``(model, tokenizer, already_patched)`` in float32 (mixed precision is autocast by accelerate)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import patchattn

    if config.model == "tiny-llama":
        tokenizer = word_level_tokenizer(text, config.tokenizer_vocab)
        kwargs = dict(TINY_LLAMA, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        kwargs.update(config.model_config)
        torch.manual_seed(getattr(config, "seed", 0))
        return LlamaForCausalLM(LlamaConfig(**kwargs)), tokenizer, False
    from patchattn.realweights import KNOWN_MODELS, load_model

    if config.model in KNOWN_MODELS:
        model, tokenizer = load_model(config.model)
        return model, tokenizer, False
    ref = os.path.expanduser(config.model)
    hf_config = AutoConfig.from_pretrained(ref)
    tokenizer = AutoTokenizer.from_pretrained(ref)
    if getattr(hf_config, "patchattn", None) is not None:
        return patchattn.from_pretrained(ref, dtype=torch.float32), tokenizer, True
    return AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32), tokenizer, False


def load_patched_model(config, calibration_rows: int):
    """Read and split the data, build the model, patch it (or check an already patched checkpoint's variant), pack
    the train and held-out chunks, and calibrate data-dependent variant state (``Variant.calibrate``, e.g. an output
    norm, on the first ``calibration_rows`` chunks, identically on every process).
    ``config`` has ModelFields and DataFields.
    Returns ``(model, tokenizer, train_chunks, eval_chunks)``."""
    import patchattn

    train_docs, held_out = split_corpus(read_corpus(config), config.eval_fraction)
    model, tokenizer, already_patched = build_model(config, "\n".join(train_docs))
    if already_patched:
        names = [spec["variant"] for spec in model.config.patchattn]
        if config.variant not in names:
            raise ConfigError(f"config field 'variant': {config.model} is already patched with {names}")
    else:
        try:
            patchattn.patch_model(model, config.variant, layers=config.layers, **config.variant_params)
        except ValueError as exc:  # e.g. layers out of range, or a variant this family does not support
            raise ConfigError(f"config fields 'variant' / 'layers': patching {config.model}: {exc}") from None
    train_chunks = pack(tokenize_docs(tokenizer, train_docs), config.seq_len)
    eval_stream = tokenize_docs(tokenizer, [held_out])[: config.eval_tokens]
    eval_chunks = pack(eval_stream, min(config.seq_len, len(eval_stream)))
    if not already_patched:  # a trained checkpoint keeps its calibrated state
        from patchattn.variants import get_variant

        with torch.no_grad():
            get_variant(config.variant).calibrate(model, train_chunks[:calibration_rows])
    model.config.use_cache = False
    return model, tokenizer, train_chunks, eval_chunks


def set_gradient_checkpointing(model, enable: bool) -> None:
    """Non-reentrant activation checkpointing on/off (transformers renamed the methods in 5.2x)."""
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def variant_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the patch added (they live under ``patchattn_layer``, and ``patchattn_layer_<i>`` for the
    later variants of a composition, in the attention modules)."""
    from patchattn.patching import layer_attrs

    names = layer_attrs(model)
    return [p for n, p in model.named_parameters() if any(f".{name}." in n for name in names)]


def set_trainable(model, config: TrainableFields, *, variant: str, prefix: str = ""):
    """Freeze/unfreeze per ``config.trainable`` (``lora``: PEFT LoRA on ``lora_targets`` plus the variant's
    parameters); returns the (possibly PEFT-wrapped) model."""
    if config.trainable == "full":
        model.requires_grad_(True)
        return model
    params = variant_parameters(model)
    if config.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        from patchattn.patching import layer_attrs

        # modules_to_save: PEFT trains the variant(s) beside LoRA and stores them in the adapter
        return get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                lora_dropout=config.lora_dropout,
                                                target_modules=list(config.lora_targets),
                                                modules_to_save=layer_attrs(model) if params else None))
    if not params:
        raise ConfigError(f"config field {prefix + 'trainable'!r}: variant {variant!r} adds no parameters; use "
                          "trainable: lora or full")
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return model


def finish(model, gradient_checkpointing: bool):
    """Turn the trained model into an inference model (eval mode, KV cache on, no activation checkpointing)."""
    model.eval()
    model.config.use_cache = True
    if gradient_checkpointing:
        set_gradient_checkpointing(model, False)
    return model


@contextmanager
def original_model(model):
    """Run ``model`` as the softmax model it was converted from, without a second copy of the weights.

    Every patched layer runs in attention-transfer mode, which returns the exact softmax attention of the same
    q/k/v (the variant's own output is computed too and discarded: a cost of the shared switch, small next to the
    rest of the forward), and PEFT adapters are disabled, so LoRA's deltas vanish: the frozen base weights plus
    exact attention *are* the original model. A base that itself trains (``trainable: full``) no longer is, so
    recipes must not use this as the teacher then."""
    from patchattn.distill import attention_transfer

    adapters = model.disable_adapter() if getattr(model, "peft_config", None) else nullcontext()
    with adapters, attention_transfer(model):
        yield model

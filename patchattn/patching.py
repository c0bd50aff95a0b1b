"""patch_model / unpatch_model and the attention dispatcher transformers calls.

How a patch works: every attention module of a patched model calls the ``"patchattn"`` attention function (set
through ``model.set_attn_implementation``). Patched layers carry their variant as the submodule
``patchattn_layer``; the dispatcher hands those layers to the variant and runs exact attention for the rest. The
patch spec (variant, layers, parameters) is stored in ``model.config.patchattn`` so ``save_pretrained`` writes it
to config.json and ``patchattn.from_pretrained`` can re-apply it.

The same name is registered with ``AttentionMaskInterface`` (sdpa's mask maker): without it transformers hands a
custom attention function ``attention_mask=None`` and sliding windows and padding are silently lost.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch.nn as nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import __version__
from .attention import exact_attention
from .cache import install_generation_cache, remove_generation_cache
from .families import Family, family_for_model_type, supported_model_types
from .variants import VARIANTS, Variant, get_variant

IMPLEMENTATION = "patchattn"
LAYER_ATTR = "patchattn_layer"
_ORIGINAL_IMPL_ATTR = "_patchattn_original_attn_implementation"


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    layer = module._modules.get(LAYER_ATTR)
    if layer is None:
        return exact_attention(module, query, key, value, attention_mask, **kwargs)
    if layer.transfer_mode:
        return layer.attention_transfer(module, query, key, value, attention_mask, **kwargs)
    return layer.attention(module, query, key, value, attention_mask, **kwargs)


def _fixed_variant_function(cls: type[Variant]):
    """Attention function for ``attn_implementation="patchattn_<name>"``: the variant with default parameters on
    every layer, created lazily per attention module (parameter-free variants only)."""
    params = cls.make_params()

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = module.__dict__.get("_patchattn_fixed_" + cls.name)
        if layer is None:
            layer = cls(params, layer_idx=getattr(module, "layer_idx", 0))
            module.__dict__["_patchattn_fixed_" + cls.name] = layer
        return layer.attention(module, query, key, value, attention_mask, **kwargs)

    return attention


def register_attention_functions() -> None:
    """Register ``patchattn`` and ``patchattn_<variant>`` (parameter-free variants) with transformers."""
    AttentionInterface.register(IMPLEMENTATION, _dispatch)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    for name, cls in VARIANTS.items():
        if not cls.trainable:
            AttentionInterface.register(f"{IMPLEMENTATION}_{name}", _fixed_variant_function(cls))
            AttentionMaskInterface.register(f"{IMPLEMENTATION}_{name}", sdpa_mask)


def resolve_family(model: nn.Module) -> Family:
    """The model's family, or an error that says what is supported and how to get there."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}")
    if type(model).__module__.startswith("transformers_modules"):
        if getattr(config, "model_type", None) == "chatglm":
            raise ValueError(
                "this ChatGLM model was loaded with trust_remote_code (the original remote code, which does not run "
                "on transformers 5). Load the checkpoint with patchattn's native port instead: "
                "`patchattn.from_pretrained(path)` (or `patchattn convert` on the command line)."
            )
        raise ValueError(f"{type(model).__name__} is remote code; patchattn supports native transformers models "
                         f"of the families: {', '.join(supported_model_types())}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{config.model_type} is an encoder-decoder model; patchattn patches causal decoder-only "
                         f"language models ({', '.join(supported_model_types())})")
    family = family_for_model_type(getattr(config, "model_type", ""))
    if family is None:
        raise ValueError(f"unsupported model type {getattr(config, 'model_type', None)!r}; supported model types: "
                         f"{', '.join(supported_model_types())}")
    return family


def parse_layers(layers: Any, num_layers: int) -> list[int]:
    """``None``/"all", "last:N", "first:N", or an iterable of (possibly negative) indices → sorted indices."""
    if layers is None or layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        kind, _, count = layers.partition(":")
        if kind in ("last", "first") and count.isdigit():
            n = int(count)
            if not 1 <= n <= num_layers:
                raise ValueError(f"layers={layers!r}: N must be in [1, {num_layers}] for this {num_layers}-layer model")
            return list(range(num_layers - n, num_layers)) if kind == "last" else list(range(n))
        raise ValueError(f"layers={layers!r} is not understood; use None/'all', 'last:N', 'first:N' or a list of "
                         "layer indices")
    indices = []
    for i in layers if isinstance(layers, Iterable) else [layers]:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layer index {i!r} is not an integer")
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layer index {i} is out of range for a model with {num_layers} layers "
                             f"(valid: 0..{num_layers - 1} or negative from the end)")
        indices.append(i % num_layers)
    if not indices:
        raise ValueError("layers is empty; pass None to patch every layer")
    return sorted(set(indices))


def is_patched(model: nn.Module) -> bool:
    return getattr(model.config, "patchattn", None) is not None


def patch_model(model: nn.Module, variant: str, *, layers=None, **params) -> nn.Module:
    """Patch ``model`` in place with ``variant`` on ``layers`` and return it.

    Patching an already patched model raises; call ``unpatch_model`` first (re-patching on top would make the
    recorded spec lie about what runs).
    """
    family = resolve_family(model)
    cls = get_variant(variant)
    if cls.families is not None and family.name not in cls.families:
        raise ValueError(f"variant {variant!r} supports the families {list(cls.families)}, not {family.name!r}")
    if is_patched(model):
        raise ValueError(f"model is already patched with {model.config.patchattn['variant']!r}; call "
                         "patchattn.unpatch_model(model) first")
    variant_params = cls.make_params(**params)
    modules = family.attention_modules(model)
    if not all(getattr(m, "is_causal", True) for m in modules):
        raise ValueError("patchattn patches causal (decoder) attention; this model has non-causal attention layers")
    indices = parse_layers(layers, len(modules))

    variant_layers = {}
    for i in indices:
        module = modules[i]
        layer = cls(variant_params, layer_idx=i)
        ref = next(module.parameters(), None)
        if ref is not None:
            layer.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        module.add_module(LAYER_ATTR, layer)
        layer.attach(module)
        variant_layers[i] = layer
    if cls.make_cache_layer is not Variant.make_cache_layer:
        install_generation_cache(model, variant_layers)

    setattr(model, _ORIGINAL_IMPL_ATTR, model.config._attn_implementation)
    model.set_attn_implementation(IMPLEMENTATION)
    model.config.patchattn = {
        "variant": cls.name,
        "layers": indices,
        "params": variant_params.to_dict(),
        "family": family.name,
        "patchattn_version": __version__,
    }
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove the patch: the original modules, forwards and attention implementation come back exactly."""
    if not is_patched(model):
        raise ValueError("model is not patched by patchattn")
    family = resolve_family(model)
    for module in family.attention_modules(model):
        layer = module._modules.get(LAYER_ATTR)
        if layer is not None:
            layer.detach(module)
            del module._modules[LAYER_ATTR]
    remove_generation_cache(model)
    original = getattr(model, _ORIGINAL_IMPL_ATTR, None) or "sdpa"
    model.set_attn_implementation(original)
    if hasattr(model, _ORIGINAL_IMPL_ATTR):
        delattr(model, _ORIGINAL_IMPL_ATTR)
    del model.config.patchattn
    return model


def patched_layers(model: nn.Module) -> list[int]:
    return list(model.config.patchattn["layers"]) if is_patched(model) else []

"""Model families: where a family keeps its attention modules and which layers slide.

transformers' decoder families share one attention convention (functional attention interface, GQA tensors,
``layer_idx``), so a family here is a small declaration. Adding one is one file in ``patchattn/families/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

FAMILIES: dict[str, Family] = {}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    description: str
    #: dotted paths tried in order to reach the decoder layers (ForCausalLM, bare model, multimodal wrapper)
    layers_paths: tuple[str, ...] = ("model.layers", "layers", "model.language_model.layers")
    attention_attr: str = "self_attn"
    features: tuple[str, ...] = field(default_factory=tuple)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        for path in self.layers_paths:
            obj = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList):
                return obj
        raise ValueError(f"{self.name}: could not find the decoder layers of {type(model).__name__} "
                         f"(looked for {', '.join(self.layers_paths)})")

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.attention_attr) for layer in self.decoder_layers(model)]

    def layer_types(self, config, num_layers: int) -> list[str]:
        """``full_attention`` / ``sliding_attention`` per layer, as the model will run them."""
        return config_layer_types(config, num_layers)


def config_layer_types(config, num_layers: int) -> list[str]:
    """``full_attention`` / ``sliding_attention`` per layer of a supported model's config."""
    text = getattr(config, "text_config", None) or config
    types = getattr(text, "layer_types", None)
    if types:
        return list(types)[:num_layers]
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return ["sliding_attention"] * num_layers
    return ["full_attention"] * num_layers


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def family_for_model_type(model_type: str) -> Family | None:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)

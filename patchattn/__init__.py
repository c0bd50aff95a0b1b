"""patchattn: efficient attention variants for pretrained Hugging Face models.

    import patchattn
    patchattn.patch_model(model, "hyper", layers="last:16", block_size=256)
"""
from __future__ import annotations

from . import _source_checkout  # noqa: F401 (first: it fixes sys.path before transformers is imported)
from ._version import __version__
from .families import FAMILIES
from .hub import push_to_hub
from .loading import from_pretrained
from .logging_utils import logger
from .models import register_models
from .patching import (
    LAYER_ATTR,
    attention_paths,
    generation_cache,
    is_patched,
    patch_model,
    patch_specs,
    patched,
    patched_layers,
    register_attention_functions,
    register_auto_classes,
    unpatch_model,
)
from .retrieval_heads import retrieval_heads
from .variants import VARIANTS, describe_params

register_models()
register_attention_functions()
register_auto_classes()


def list_variants() -> list[dict]:
    """Every variant: name, description, kind, supported families, parameters with defaults and ranges."""
    return [
        {
            "name": cls.name,
            "description": cls.description,
            "kind": "trainable" if cls.trainable else "training-free",
            "role": cls.role,
            "families": list(cls.families) if cls.families is not None else sorted(FAMILIES),
            "params": describe_params(cls),
            "attn_implementation": None if cls.trainable else f"patchattn_{cls.name}",
        }
        for cls in VARIANTS.values()
    ]


def list_families() -> list[dict]:
    """Every model family: name, model types, description, features honoured."""
    return [
        {"name": f.name, "model_types": list(f.model_types), "description": f.description, "features": list(f.features)}
        for f in FAMILIES.values()
    ]


__all__ = [
    "__version__", "patch_model", "unpatch_model", "patched", "is_patched", "patched_layers", "from_pretrained",
    "push_to_hub", "list_variants", "list_families", "logger", "LAYER_ATTR", "attention_paths", "generation_cache",
    "patch_specs", "retrieval_heads",
]

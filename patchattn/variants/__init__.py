"""Variant registry. Importing a variant module registers it; add new variants to this list."""
from .base import (
    KV_CACHE,
    MODIFIER,
    PREFILL,
    REPLACEMENT,
    ROLE_LABELS,
    VARIANTS,
    Variant,
    VariantParams,
    composition_conflict,
    describe_params,
    get_variant,
    param,
    register_variant,
)

# registration, in listing order (isort must not sort it); `linear` holds lawcat, hedgehog, mala, nala, lightning
# isort: off
from . import exact, hyper, dhsa, zipcache, act, gated, affine, moh, sigmoid, linear, streaming  # noqa: F401
# isort: on

__all__ = ["VARIANTS", "Variant", "VariantParams", "describe_params", "get_variant", "param", "register_variant",
           "composition_conflict", "ROLE_LABELS", "MODIFIER", "KV_CACHE", "PREFILL", "REPLACEMENT"]

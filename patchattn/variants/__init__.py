"""Variant registry. Importing a variant module registers it; add new variants to this list."""
from .base import VARIANTS, Variant, VariantParams, describe_params, get_variant, param, register_variant
from . import exact, hyper, gated, affine, moh, sigmoid, dhsa, zipcache, act  # noqa: F401  (registration, in listing order)
from . import linear  # noqa: F401  (lawcat, hedgehog, mala, nala, lightning)

__all__ = ["VARIANTS", "Variant", "VariantParams", "describe_params", "get_variant", "param", "register_variant"]

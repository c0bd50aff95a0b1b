"""Variant registry. Importing a variant module registers it; add new variants to this list."""
from .base import VARIANTS, Variant, VariantParams, describe_params, get_variant, param, register_variant

# registration, in listing order (isort must not sort it); `linear` holds lawcat, hedgehog, mala, nala, lightning
# isort: off
from . import exact, hyper, dhsa, zipcache, act, gated, affine, moh, sigmoid, linear, streaming  # noqa: F401
# isort: on

__all__ = ["VARIANTS", "Variant", "VariantParams", "describe_params", "get_variant", "param", "register_variant"]

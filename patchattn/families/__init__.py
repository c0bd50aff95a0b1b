"""Family registry. Importing a family module registers it; add new families to this list."""
from . import chatglm2, gemma, llama, mistral, qwen  # noqa: F401  (registration)
from .base import FAMILIES, Family, family_for_model_type, register_family, supported_model_types

__all__ = ["FAMILIES", "Family", "family_for_model_type", "register_family", "supported_model_types"]

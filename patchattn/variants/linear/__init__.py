"""The linear-attention family: one shared base (``base.py``: masks, causal conv, recurrence through
``patchattn.kernels.linear``, hybrid window; ``cache.py``: the constant-size generation-cache layer) and one small
file per variant. Importing the package registers them."""
from .base import LinearAttentionVariant
from .cache import LinearStateLayer

# isort: off
from . import lawcat, hedgehog, mala, nala, lightning  # noqa: F401  (registration, in listing order)
# isort: on

__all__ = ["LinearAttentionVariant", "LinearStateLayer"]

"""HyperAttention ops: ``naive`` is the PyTorch reference (any device)."""
from .naive import HyperSettings, hyper_attention

__all__ = ["HyperSettings", "hyper_attention"]

"""Mixture-of-Head decode kernel: attention for the active heads only (see triton_decode.py)."""
from .naive import active_head_decode_reference

__all__ = ["active_head_decode_reference"]

"""DHSA ops: ``naive`` is the token-level reference (the paper's description, any device), ``select`` the cheap
chunk-level selection (on CUDA its per-block pick is one Triton kernel, ``triton_select``), ``ops`` the Triton
block-sparse attention (CUDA), ``gathered`` the same attention in PyTorch (gathers only the kept chunks).

``dhsa_attention`` always selects with ``select.select_blocks`` and attends with Triton on CUDA when the kernel
covers the call (no softcap, head dim in ``SUPPORTED_HEAD_DIMS``, power-of-two chunk/query block >= 16, no gradient
needed: the kernel is forward-only), and with ``gathered_attention`` (differentiable) over the same kept set
otherwise.
"""
from __future__ import annotations

import torch

from .. import triton_available
from . import naive
from .gathered import gathered_attention
from .limits import SUPPORTED_HEAD_DIMS
from .naive import DhsaSettings
from .select import BlockSelection, expected_density, select_blocks, selection_density


def _pow2_at_least_16(x: int) -> bool:
    return x >= 16 and not x & (x - 1)


def triton_supported(q, k, v, settings: DhsaSettings, softcap=None) -> bool:
    if softcap is not None or not q.is_cuda:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        return False
    if not (_pow2_at_least_16(settings.chunk_size) and _pow2_at_least_16(settings.query_block)):
        return False
    return triton_available()


def dhsa_attention(q, k, v, scaling=None, settings: DhsaSettings = DhsaSettings(), *, key_valid=None, softcap=None,
                   return_selection: bool = False):
    """DHSA causal prefill. q ``[b, h, n, d]``, k/v ``[b, hk, n, d]``, ``key_valid`` ``[b, n]`` bool or None.
    Returns ``(out [b, h, n, d] in q's dtype, lse [b, h, n] fp32)``, plus the ``BlockSelection`` when asked."""
    if k.shape[2] != q.shape[2]:
        raise ValueError("DHSA is a prefill method: queries and keys must have the same length")
    scaling = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    sel = select_blocks(q, k, settings, key_valid)
    if triton_supported(q, k, v, settings, softcap):
        from .ops import block_sparse_attention

        out, lse = block_sparse_attention(q, k, v, sel, scaling, key_valid=key_valid)
    else:
        out, lse = gathered_attention(q, k, v, sel, scaling, key_valid=key_valid, softcap=softcap)
    return (out, lse, sel) if return_selection else (out, lse)


__all__ = ["naive", "DhsaSettings", "BlockSelection", "dhsa_attention", "select_blocks", "selection_density",
           "expected_density", "triton_supported", "SUPPORTED_HEAD_DIMS"]

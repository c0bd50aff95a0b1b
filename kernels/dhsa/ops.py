"""Host side of the Triton block-sparse attention: tile configuration and the launch.

``block_sparse_attention(q, k, v, sel, scaling, key_valid=...)`` attends every query block to the key chunks a
``BlockSelection`` kept and returns ``(out [b, h, n, d] in q's dtype, lse [b, h, n] fp32)`` (forward only).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from ..descriptors import row_tiles
from .limits import SUPPORTED_HEAD_DIMS
from .select import BlockSelection
from .triton_fwd import _dhsa_fwd_kernel


@dataclass(frozen=True)
class KernelConfig:
    """Largest query rows (BM) / keys (BN) per tile; each is capped by the query block / chunk size it tiles."""
    bm: int = 128
    bn: int = 64
    warps: int = 4
    stages: int = 3


def default_config(d: int, query_block: int = 128) -> KernelConfig:
    """Tiles per head dim; 8 warps only for the largest query tiles (a 64-row tile keeps 4 busy).
    Not yet tuned on the GPU: ``scripts/bench_dhsa.py --sweep`` times alternatives."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return KernelConfig(64, 64, 4, 1)  # CPU interpreter: few, large numpy ops
    if d <= 128:
        bm = min(128, query_block)
        return KernelConfig(bm, 64, 8 if d > 64 and bm == 128 else 4, 3)
    return KernelConfig(64, 32, 8 if query_block >= 64 else 4, 2)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else None  # fp32 only for exactness tests: no TF32


def block_sparse_attention(q, k, v, sel: BlockSelection, scaling: float, *, key_valid=None,
                           config: KernelConfig | None = None):
    b, h, n, d = q.shape
    hk = k.shape[1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if k.shape[2] != n or v.shape[2] != n or v.shape[-1] != d:
        raise ValueError("block-sparse DHSA needs as many keys as queries and equal q/k/v head dims")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} not supported by the Triton kernel (supported: {SUPPORTED_HEAD_DIMS})")
    C, B = sel.chunk_size, sel.query_block
    if C & (C - 1) or B & (B - 1) or C < 16 or B < 16:
        raise ValueError(f"the kernel needs power-of-two chunk_size and query_block >= 16, got {C}, {B}")
    if sel.n != n:
        raise ValueError(f"selection is for {sel.n} tokens, inputs have {n}")
    cfg = config or default_config(d, B)
    bm, bn = min(cfg.bm, B), min(cfg.bn, C)
    out = torch.empty(b, h, n, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    kvalid = None if key_valid is None else key_valid.to(torch.int8).contiguous()
    idx, cnt, nfull = sel.idx, sel.cnt, sel.nfull
    num_m = triton.cdiv(n, bm)
    _dhsa_fwd_kernel[(num_m, b * h)](
        row_tiles(q, bm), row_tiles(k, bn), row_tiles(v, bn), out, lse, idx, cnt, nfull,
        kvalid if kvalid is not None else cnt, scaling * 1.4426950408889634, *out.stride()[:3],
        idx.stride(0), idx.stride(1), idx.stride(2), cnt.stride(0), cnt.stride(1),
        n, h, h // hk, num_m,
        QBLOCK=B, CHUNK=C, HAS_VALID=kvalid is not None, BM=bm, BN=bn, D=d, PREC=_prec(q.dtype),
        num_warps=cfg.warps, num_stages=cfg.stages)
    return out, lse


__all__ = ["KernelConfig", "default_config", "block_sparse_attention", "SUPPORTED_HEAD_DIMS"]

"""Split-K decode attention (flash-decoding) that reads only the active heads' keys and values.

The grid is ``(sequence × active head, key split)``: each program streams one split of its head's KV cache with an
online softmax and writes a partial ``(max, sum, accumulator)``; :func:`active_head_decode` merges the splits and
scatters the active heads into the output. Heads a token does not use are never read: with MHA that is the saved
memory traffic; with GQA a KV head is still read while any query head of its group is active.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import triton_can_take

_TARGET_PROGRAMS = 264  # about two per H200 multiprocessor


@triton.jit
def _partial_kernel(Q, K, V, HEADS, M, L, ACC, scale, k_len, split_len, n_active, group,
                    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    slot = tl.program_id(0)  # = sequence * n_active + active-head slot
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    seq = slot // n_active
    head = tl.load(HEADS + slot)
    kv_head = head // group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(Q + seq * stride_qb + head * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
    k_base = K + seq * stride_kb + kv_head * stride_kh
    v_base = V + seq * stride_vb + kv_head * stride_vh
    start = split * split_len
    end = tl.minimum(start + split_len, k_len)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=tile_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        correction = tl.exp(m - m_new)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=tile_mask, other=0.0)
        acc = acc * correction + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l = l * correction + tl.sum(p, axis=0)
        m = m_new
    out = slot * n_splits + split
    tl.store(M + out, m)
    tl.store(L + out, l)
    tl.store(ACC + out * BLOCK_D + offs_d, acc)


def active_head_decode(query, key, value, head_table, scale: float, block_n: int = 64) -> torch.Tensor:
    """One decode step over the active heads only; same contract as the reference in ``naive.py``."""
    b, h, q_len, d = query.shape
    hk, k_len = key.shape[1], key.shape[2]
    if q_len != 1:
        raise ValueError(f"active_head_decode handles one query token per sequence, got {q_len}")
    if not triton_can_take(query) or {key.device, value.device, head_table.device} != {query.device}:
        raise ValueError(f"active_head_decode needs query, key, value and head_table on one CUDA device (got "
                         f"{query.device}, {key.device}, {value.device}, {head_table.device}); CPU tensors only run "
                         "under TRITON_INTERPRET=1. Use patchattn.kernels.moh.active_head_decode_reference on CPU")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("active_head_decode needs the head dimension contiguous (stride 1)")
    n_active = head_table.shape[1]
    slots = b * n_active
    blocks = triton.cdiv(k_len, block_n)
    n_splits = max(1, min(blocks, math.ceil(_TARGET_PROGRAMS / max(slots, 1))))
    split_len = triton.cdiv(blocks, n_splits) * block_n
    n_splits = triton.cdiv(k_len, split_len)
    block_d = triton.next_power_of_2(d)
    dev = query.device
    m = torch.empty(slots, n_splits, device=dev, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(slots, n_splits, block_d, device=dev, dtype=torch.float32)
    heads = head_table.to(torch.int32).contiguous()
    _partial_kernel[(slots, n_splits)](
        query, key, value, heads, m, l, acc, scale, k_len, split_len, n_active, h // hk,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        D=d, BLOCK_D=block_d, BLOCK_N=block_n)
    weight = torch.exp(m - m.amax(dim=1, keepdim=True))  # merge the splits
    merged = (acc * weight[..., None]).sum(dim=1) / (l * weight).sum(dim=1, keepdim=True)
    out = query.new_zeros(b, h, value.shape[-1])
    out.scatter_(1, head_table.long()[..., None].expand(b, n_active, value.shape[-1]),
                 merged[:, :d].reshape(b, n_active, -1).to(out.dtype))
    return out[:, None]

"""ZipCache's prefill saliency probes, fused: per-key column sums of the probe queries' causal softmax, never
materialising the probe × key probability matrix.

A *probe* is one query row ``r`` of a ``q_len``-query forward over ``k_len`` keys (the last ``q_len`` keys are the
forward's own; ``offset = k_len - q_len`` keys come from the cache before it): causally it sees keys
``j <= r + offset``. Its probability of key ``j`` is ``exp(s_rj - lse_r)``, ``lse_r`` the log-sum-exp of its visible
scores. GQA: the KV head's group of ``g`` query heads supplies ``g`` rows per probe, flattened probe-major
(``m = probe · g + head``), so with the probes sorted a tile's last row holds its latest probe.

Two launches, flash-backward style (the scores are computed twice instead of stored once):

- ``_probe_lse_kernel``, grid ``(row tiles, sequence × KV head)``: each tile of ``BLOCK_M`` rows streams the keys
  its latest probe sees, ``BLOCK_N`` at a time, with an online max/sum, and writes ``lse`` (base 2) per row.
- ``_probe_sums_kernel``, grid ``(key tiles of the last columns, sequence × KV head)``: each tile of ``BLOCK_N``
  keys loops over the row tiles from the first that sees any of them (``FIRST``, from the host: earlier probes see
  none of these keys), adds ``exp2(s - lse)`` over the visible (row, key) pairs and writes the column sums.

Scores are ``q·k · scaling`` (optionally Gemma 2's ``softcap · tanh(· / softcap)``), kept in base 2 (times
``log2 e``) so both passes use ``exp2``; float32 accumulation for fp16/bf16/fp32 inputs (fp32: exact ``ieee``
dots, no TF32). Block sizes on CUDA (64 × 64 tiles, 4 warps; 32-row tiles and 8 warps above head dim 128) are a
sensible guess, not yet timed on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_decode import _prec, _tanh

LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k, scale, softcap, SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` base-2 scores: ``scale`` is ``scaling · log2 e`` without softcap, ``scaling`` with."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    if SOFTCAP:
        s = (softcap * 1.4426950408889634) * _tanh(s / softcap)
    return s


@triton.jit
def _load_rows(Q, ROWS, m, n_total, seq, kv, g, stride_qb, stride_qh, stride_qn, offs_d, d_mask):
    """Tile rows ``m`` (probe-major): their query vectors and query positions."""
    m_mask = m < n_total
    pos = tl.load(ROWS + m // g, mask=m_mask, other=0)
    q = tl.load(Q + seq * stride_qb + (kv * g + m % g)[:, None] * stride_qh + pos[:, None] * stride_qn
                + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    return q, pos, m_mask


@triton.jit
def _probe_lse_kernel(Q, K, ROWS, LSE, scale, softcap, n_probes, g, hk, offset,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    tile = tl.program_id(0)
    pid = tl.program_id(1)  # = sequence * hk + KV head
    seq = (pid // hk).to(tl.int64)  # sequence offsets can pass 2**31 elements (long prompts, big batches)
    kv = pid % hk
    n_total = n_probes * g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q, pos, m_mask = _load_rows(Q, ROWS, m, n_total, seq, kv, g, stride_qb, stride_qh, stride_qn, offs_d, d_mask)
    limit = pos + offset  # the last key each row sees (>= 0: key 0 is always visible)
    last = tl.load(ROWS + (tl.minimum(tile * BLOCK_M + BLOCK_M, n_total) - 1) // g)  # the tile's latest probe
    end = last + offset + 1
    k_base = K + seq * stride_kb + kv * stride_kh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < end)[:, None] & d_mask[None, :],
                    other=0.0)
        s = _scores(q, k, scale, softcap, SOFTCAP, PREC)
        s = tl.where(cols[None, :] <= limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite from the first tile on (key 0)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + pid * n_total + m, m_i + tl.log2(l_i), mask=m_mask)


@triton.jit
def _probe_sums_kernel(Q, K, ROWS, LSE, FIRST, SUMS, scale, softcap, n_probes, g, hk, offset, col0, k_len,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_sb, stride_sh,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    tile = tl.program_id(0)
    pid = tl.program_id(1)  # = sequence * hk + KV head
    seq = (pid // hk).to(tl.int64)  # sequence offsets can pass 2**31 elements (long prompts, big batches)
    kv = pid % hk
    n_total = n_probes * g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    cols = col0 + tile * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = cols < k_len
    k = tl.load(K + seq * stride_kb + kv * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=c_mask[:, None] & d_mask[None, :], other=0.0)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    first = tl.load(FIRST + tile)  # the first row tile that sees any of these keys
    for m0 in range(first * BLOCK_M, n_total, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        q, pos, m_mask = _load_rows(Q, ROWS, m, n_total, seq, kv, g, stride_qb, stride_qh, stride_qn, offs_d,
                                    d_mask)
        lse = tl.load(LSE + pid * n_total + m, mask=m_mask, other=0.0)
        s = _scores(q, k, scale, softcap, SOFTCAP, PREC)
        seen = m_mask[:, None] & (cols[None, :] <= (pos + offset)[:, None])
        acc += tl.sum(tl.where(seen, tl.exp2(s - lse[:, None]), 0.0), axis=0)
    tl.store(SUMS + seq * stride_sb + kv * stride_sh + (cols - col0), acc, mask=c_mask)


def block_sizes(query: torch.Tensor) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)``: tiny tiles under the interpreter (several tiles per test, seconds), a
    guess on CUDA (not yet timed on the GPU)."""
    if not query.is_cuda:
        return 16, 16, 1
    return (64, 64, 4) if query.shape[-1] <= 128 else (32, 64, 8)


def launch_probe_sums(query, key, rows, sums, *, scaling: float, softcap: float | None, columns: int,
                      block_m: int, block_n: int, num_warps: int) -> None:
    """Write the probe column sums of the last ``columns`` keys into ``sums [b, hk, columns]`` (float32).

    ``query [b, h, q_len, d]``, ``key [b, hk, k_len, d]`` (last dim contiguous, any other strides), ``rows``: the
    probe query rows, sorted ascending, int32, on the query's device."""
    b, h, q_len, d = query.shape
    hk, k_len = key.shape[1], key.shape[2]
    g, n_probes = h // hk, rows.numel()
    offset, col0 = k_len - q_len, k_len - columns
    block_d = max(16, triton.next_power_of_2(d))
    scale = scaling if softcap is not None else scaling * LOG2E
    cap = 1.0 if softcap is None else softcap
    lse = torch.empty(b * hk, n_probes * g, device=query.device, dtype=torch.float32)
    common = dict(D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, SOFTCAP=softcap is not None,
                  PREC=_prec(query.dtype), num_warps=num_warps)
    strides = (query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2))
    _probe_lse_kernel[(triton.cdiv(n_probes * g, block_m), b * hk)](
        query, key, rows, lse, scale, cap, n_probes, g, hk, offset, *strides, **common)
    # per key tile: the first probe whose last visible key reaches the tile, as a row tile (probe-major rows)
    starts = col0 + torch.arange(0, columns, block_n, device=rows.device, dtype=torch.int32)
    first = torch.searchsorted(rows + offset, starts).to(torch.int32) * g // block_m
    _probe_sums_kernel[(triton.cdiv(columns, block_n), b * hk)](
        query, key, rows, lse, first, sums, scale, cap, n_probes, g, hk, offset, col0, k_len, *strides,
        sums.stride(0), sums.stride(1), **common)

"""Block-sparse causal attention forward (Triton): each program owns ``BM`` query rows of one query head and walks
the key chunks its query block kept (``idx[:cnt]``), ``BN`` keys at a time, with an fp32 online softmax.

GQA: a query head reads its KV head's rows in place (``kv_head = head // g``), so K/V are never expanded. Q, K
and V arrive as tensor descriptors (``kernels/descriptors.py``): on Hopper each tile is one TMA copy. The
chunks that end before the query block (``nfull`` of them, first in the sorted list) are walked without the causal
mask, the rest with it (two loops, as in FlashAttention); key padding is a per-key mask. Rows that see no key
end with output 0 and lse -inf (never NaN, so padded rows cannot poison later layers).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _walk(q, m_i, l_i, acc, KD, VD, bi, kvh, kvalid, list_base, j0, j1, offs_m, n, qk_scale,
          CHUNK: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr,
          PREC: tl.constexpr):
    """Online softmax over the BN-key tiles ``[j0, j1)`` of the kept chunks (tile j: chunk j // (CHUNK // BN))."""
    for j in range(j0, j1):
        chunk = tl.load(list_base + j // (CHUNK // BN))
        start = chunk * CHUNK + (j % (CHUNK // BN)) * BN
        offs_n = start + tl.arange(0, BN)
        col_ok = offs_n < n
        k = KD.load([bi, kvh, start, 0]).reshape(BN, D)  # keys past n read as 0
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if CAUSAL:  # keys past n are past every row too
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        if HAS_VALID:
            kv = tl.load(kvalid + offs_n, mask=col_ok, other=0)
            s = tl.where(kv[None, :] != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = VD.load([bi, kvh, start, 0]).reshape(BN, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _dhsa_fwd_kernel(QD, KD, VD, O, LSE, IDX, CNT, NFULL, KVALID, qk_scale, sob, soh, son,
                     sib, sih, siq, scb, sch,
                     n, h, g, num_m,
                     QBLOCK: tl.constexpr, CHUNK: tl.constexpr, HAS_VALID: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    pid_m = num_m - 1 - tl.program_id(0)  # the last rows keep the most chunks: start them first
    pid_bh = tl.program_id(1)
    bi = pid_bh // h
    hi = pid_bh % h
    kvh = hi // g
    q0 = pid_m * BM
    qb = q0 // QBLOCK
    offs_m = q0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < n
    # output offsets in int64: at 1M tokens a row offset (n * son of [b, n, h, d]) and a head offset (hi * soh of
    # [b, h, n, d]: 23 heads x 1M x 128 = 3.1e9, the illegal address of a 3B-shaped 1M prefill) both pass 2**31;
    # the descriptors' row coordinates stay 32-bit
    rows_m = offs_m.to(tl.int64)
    bi64, hi64 = bi.to(tl.int64), hi.to(tl.int64)
    q = QD.load([bi, hi, q0, 0]).reshape(BM, D)  # rows past n read as 0
    kvalid = KVALID + bi64 * n
    list_base = IDX + bi * sib + hi * sih + qb * siq
    cnt = tl.load(CNT + bi * scb + hi * sch + qb)
    nfull = tl.load(NFULL + bi * scb + hi * sch + qb)  # leading chunks that end before the block: no causal mask

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    tiles = CHUNK // BN
    m_i, l_i, acc = _walk(q, m_i, l_i, acc, KD, VD, bi, kvh, kvalid, list_base, 0, nfull * tiles, offs_m, n,
                          qk_scale, CHUNK, BN, D, False, HAS_VALID, PREC)
    m_i, l_i, acc = _walk(q, m_i, l_i, acc, KD, VD, bi, kvh, kvalid, list_base, nfull * tiles, cnt * tiles, offs_m,
                          n, qk_scale, CHUNK, BN, D, True, HAS_VALID, PREC)

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + bi64 * sob + hi64 * soh + rows_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * n + rows_m, lse, mask=row_ok)

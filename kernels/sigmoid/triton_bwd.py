"""FlashSigmoid backward in Triton (and the flash softmax backward, same kernels, ``SIGMOID=False``).

Scores are recomputed tile by tile (nothing ``[n, n]`` is stored). With x = S·scale + bias and P = σ(x):

    dV = Pᵀ·dO      dP = dO·Vᵀ      dX = P ⊙ (1 − P) ⊙ dP      dQ = scale·dX·K      dK = scale·dXᵀ·Q

Each element of dX needs only its own P: no row statistics at all, where softmax needs the stored log-sum-exp to
rebuild P and Delta = rowsum(dO ⊙ O) for dX = P ⊙ (dP − Delta) (``_delta_kernel``, softmax only).

Two ways to get dQ (``KernelConfig.dq_atomic``):
  * two kernels, FlashAttention-2 style, neither with atomics: ``_dkdv_kernel`` (a program owns ``BN`` keys of one
    key/value head and walks the query tiles of every query head of its GQA group that can see them, diagonal
    tiles masked, later tiles not) and ``_dq_kernel`` (a program owns ``BM`` query rows, walks the keys like the
    forward), which recomputes S and dP: 7 matmuls a tile pair;
  * one kernel (``ATOMIC_DQ``): ``_dkdv_kernel`` also adds each tile pair's dS·K into an fp32 dQ accumulator
    (a TMA reduce-add on CUDA, element atomics in the interpreter), 5 matmuls a tile pair plus the adds; the host
    casts the accumulator.
Q, K, V and dO are read by tensor descriptors, as in the forward. Rows past the end (read as zero) contribute
nothing: for sigmoid their dO is 0, for softmax their lse is −inf. Keys hidden by left padding get dK = dV = 0
(their column of dX/P is dropped as a whole).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import _key_range, _row_bias, _sigmoid, _visible

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, NQ, H, BT: tl.constexpr, D: tl.constexpr):
    """Softmax only: Delta = rowsum(dO ⊙ O) in fp32."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hh = (bh % H).to(tl.int64)
    rows = pid * BT + tl.arange(0, BT)
    ok = rows < NQ
    dcol = tl.arange(0, D)
    o = tl.load(O + b * sob + hh * soh + rows[:, None].to(tl.int64) * son + dcol[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + hh * sdh + rows[:, None].to(tl.int64) * sdn + dcol[None, :], mask=ok[:, None],
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * NQ + rows, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _row_stats(LSE, DELTA, off, mask):
    """Softmax: row lse in exp2 units (+inf for rows that saw no key, so their P is 0) and Delta."""
    lse = tl.load(LSE + off, mask=mask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse2, tl.load(DELTA + off, mask=mask, other=0.0)


@triton.jit
def _dkdv_tile(dk, dv, k, v, QD, DOD, LSE, DELTA, BIAS, DQA, start, b, hh, bh, cols, col_ok, off, NQ, zscale,
               bias_const, bias_mul, sm_scale,
               SIGMOID: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_START: tl.constexpr,
               FAST: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA_DQ: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
               PREC: tl.constexpr):
    """Add one query tile's contribution to the block's dK, dV (scores transposed: ``[BN keys, BM rows]``) and,
    with ``ATOMIC_DQ``, its dS·K to the dQ accumulator ``DQA`` (fp32 ``[b, h, NQ, D]``; a descriptor when
    ``TMA_DQ``)."""
    start = tl.multiple_of(start, BM)
    r = start + tl.arange(0, BM)
    rok = r < NQ
    q = QD.load([b, hh, start, 0]).reshape(BM, D)  # rows past NQ read as 0
    do = DOD.load([b, hh, start, 0]).reshape(BM, D)
    sT = tl.dot(k, tl.trans(q), input_precision=PREC)
    if SIGMOID:
        zb = _row_bias(BIAS, b, r, rok, NQ, bias_const, bias_mul, HAS_BIAS, True)
        pT = _sigmoid(sT * zscale + zb, FAST)
    else:
        lse2, delta = _row_stats(LSE, DELTA, bh * NQ + r, rok)
        pT = tl.math.exp2(sT * zscale - lse2[None, :])
    if MASKED:
        pT = tl.where(cols[:, None] <= r[None, :] + off, pT, 0.0)
    if ATOMIC_DQ and HAS_START:  # keys hidden by padding add nothing to dQ (their dK, dV are dropped at the end)
        pT = tl.where(col_ok[:, None], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    if SIGMOID:
        dsT = pT * (1.0 - pT) * dpT
    else:
        dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC) * sm_scale
        if TMA_DQ:  # rows past NQ fall outside the descriptor and are dropped
            DQA.atomic_add([b, hh, start, 0], dq.reshape(1, 1, BM, D))
        else:
            dcol = tl.arange(0, D)
            tl.atomic_add(DQA + (bh * NQ + r)[:, None] * D + dcol[None, :], dq, mask=rok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(QD, KD, VD, DOD, LSE, DELTA, BIAS, KSTART, DK, DV, DQA, zscale, bias_const, bias_mul, sm_scale,
                 sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                 NQ, NK, H, HK, G,
                 SIGMOID: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_START: tl.constexpr,
                 FAST: tl.constexpr, ATOMIC_DQ: tl.constexpr, TMA_DQ: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    bkv = tl.program_id(1)
    b32, kvh32 = bkv // HK, bkv % HK  # descriptor coordinates are 32-bit
    b, kvh = b32.to(tl.int64), kvh32.to(tl.int64)
    off = NK - NQ
    col0 = pid * BN
    cols = col0 + tl.arange(0, BN)
    col_ok = cols < NK
    kstart = 0
    if HAS_START:
        kstart = tl.load(KSTART + b)
        col_ok = col_ok & (cols >= kstart)
    dcol = tl.arange(0, D)
    k = KD.load([b32, kvh32, col0, 0]).reshape(BN, D)  # keys past NK read as 0; padding keys' dK, dV are dropped
    v = VD.load([b32, kvh32, col0, 0]).reshape(BN, D)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    # Query rows that see a key of this block start at the first visible key's position; rows whose position is
    # past the block's last key see all of it (no mask). Tiles of BM rows, aligned on r_lo.
    first = tl.maximum(col0, kstart)
    r_end = NQ
    if CAUSAL:
        r_lo = (tl.maximum(first - off, 0) // BM) * BM
        r_mid = r_lo + tl.cdiv(tl.maximum(col0 + BN - 1 - off - r_lo, 0), BM) * BM
    else:
        r_lo = 0
        r_mid = 0
    if HAS_START:
        r_end = tl.where(first < col0 + BN, r_end, 0)  # a block of padding only: nothing to do
    r_mask_end = tl.minimum(r_mid, r_end)
    for gi in range(G):
        hh = kvh32 * G + gi
        bh = b * H + hh
        for start in range(r_lo, r_mask_end, BM):
            dk, dv = _dkdv_tile(dk, dv, k, v, QD, DOD, LSE, DELTA, BIAS, DQA, start, b32, hh, bh, cols, col_ok, off,
                                NQ, zscale, bias_const, bias_mul, sm_scale, SIGMOID, CAUSAL, HAS_BIAS, HAS_START,
                                FAST, ATOMIC_DQ, TMA_DQ, BM, D, PREC)
        for start in range(r_mid, r_end, BM):
            dk, dv = _dkdv_tile(dk, dv, k, v, QD, DOD, LSE, DELTA, BIAS, DQA, start, b32, hh, bh, cols, col_ok, off,
                                NQ, zscale, bias_const, bias_mul, sm_scale, SIGMOID, False, HAS_BIAS, HAS_START,
                                FAST, ATOMIC_DQ, TMA_DQ, BM, D, PREC)
    dk = dk * sm_scale
    if HAS_START:  # keys hidden by padding: their whole column of P is dropped
        dk = tl.where(col_ok[:, None], dk, 0.0)
        dv = tl.where(col_ok[:, None], dv, 0.0)
    out_ok = (cols < NK)[:, None]
    tl.store(DK + b * sdkb + kvh * sdkh + cols[:, None].to(tl.int64) * sdkn + dcol[None, :],
             dk.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + b * sdvb + kvh * sdvh + cols[:, None].to(tl.int64) * sdvn + dcol[None, :],
             dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _dq_step(dq, q, do, k, v, ra, rb, ok, zscale, SIGMOID: tl.constexpr, FAST: tl.constexpr,
             MASKED: tl.constexpr, PREC: tl.constexpr):
    """One key block of dQ. Row terms: ``ra`` = bias in z units, ``[BM, 1]`` or a scalar (sigmoid; ``rb`` unused),
    or ``ra`` = lse in exp2 units and ``rb`` = Delta, ``[BM]`` (softmax)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if SIGMOID:
        p = _sigmoid(s * zscale + ra, FAST)
    else:
        p = tl.math.exp2(s * zscale - ra[:, None])
    if MASKED:
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if SIGMOID:
        ds = p * (1.0 - p) * dp
    else:
        ds = p * (dp - rb[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


@triton.jit
def _dq_kernel(QD, KD, VD, DOD, LSE, DELTA, BIAS, KSTART, DQ, zscale, bias_const, bias_mul, sm_scale, sdqb, sdqh, sdqn,
               NQ, NK, H, G,
               SIGMOID: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_START: tl.constexpr,
               FAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if CAUSAL:
        pid = tl.num_programs(0) - 1 - pid
    bh = tl.program_id(1)
    b32, h32 = bh // H, bh % H  # descriptor coordinates are 32-bit
    kvh = h32 // G
    b, hh = b32.to(tl.int64), h32.to(tl.int64)
    off = NK - NQ
    row0 = pid * BM
    rows = row0 + tl.arange(0, BM)
    row_ok = rows < NQ
    dcol = tl.arange(0, D)
    q = QD.load([b32, h32, row0, 0]).reshape(BM, D)  # rows past NQ read as 0
    do = DOD.load([b32, h32, row0, 0]).reshape(BM, D)
    kstart = 0
    if HAS_START:
        kstart = tl.load(KSTART + b)
    if SIGMOID:  # row terms: the bias (sigmoid needs nothing else) ...
        ra = _row_bias(BIAS, b, rows, row_ok, NQ, bias_const, bias_mul, HAS_BIAS, False)
        rb = ra
    else:  # ... or the lse and Delta (softmax)
        ra, rb = _row_stats(LSE, DELTA, bh.to(tl.int64) * NQ + rows, row_ok)
    dq = tl.zeros([BM, D], tl.float32)
    lo, mid, hi = _key_range(row0, off, NK, kstart, CAUSAL, BM, BN)
    for start in range(lo, mid, BN):
        start = tl.multiple_of(start, BN)
        cols = start + tl.arange(0, BN)
        k = KD.load([b32, kvh, start, 0]).reshape(BN, D)
        v = VD.load([b32, kvh, start, 0]).reshape(BN, D)
        ok = cols[None, :] >= kstart
        dq = _dq_step(dq, q, do, k, v, ra, rb, ok, zscale, SIGMOID, FAST, HAS_START, PREC)
    for start in range(mid, hi, BN):
        start = tl.multiple_of(start, BN)
        cols = start + tl.arange(0, BN)
        k = KD.load([b32, kvh, start, 0]).reshape(BN, D)  # keys past NK read as 0
        v = VD.load([b32, kvh, start, 0]).reshape(BN, D)
        ok = _visible(rows, cols, off, NK, kstart, CAUSAL, HAS_START)
        dq = _dq_step(dq, q, do, k, v, ra, rb, ok, zscale, SIGMOID, FAST, True, PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + hh * sdqh + rows[:, None].to(tl.int64) * sdqn + dcol[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])

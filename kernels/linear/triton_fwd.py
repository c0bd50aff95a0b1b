"""Triton forward of normalised gated linear attention (chunked) and the fused decode step.

Notation (see ``chunk.py`` for the same math in PyTorch): chunks of ``C`` tokens, ``B_t`` the inclusive in-chunk
cumulative log decay of the token's KV head, ``B_C`` its value at the chunk's end; ``(S, z)`` the state at the
start of a chunk.
  1. ``_fwd_state_kernel`` (grid: dk-blocks x (dv-blocks + 1 for z), segments, b*hk): the only sequential part.
     Walks the chunks of one KV head (long sequences: in segments, two passes), writes the state at the start of
     every chunk (``S`` snapshot in bf16 for bf16 inputs else fp32; ``z`` always fp32) and carries
     ``S <- exp(B_C) S + (k * exp(B_C - B))ᵀ v``, ``z`` likewise, in fp32 registers.
  2. ``_fwd_out_kernel`` (grid: dv-blocks x G query heads of a KV head, chunks, b*hk):
     ``A = (q kᵀ) * exp(B_t - B_s)`` masked causal, ``num = A v + exp(B) q S``, ``den = rowsum(A) + exp(B) q·z``
     (the normaliser is the value column of ones, as a row sum), ``o = num / (den + eps)``; stores
     ``1 / (den + eps)`` for the backward.
  3. ``_step_kernel`` (grid: dv-blocks, b*hk): one decode token for all query heads of a KV head, fp32 state.
Every exponent is <= 0 (later minus earlier cumulative log decay). Dots take the inputs' dtype (tensor cores for
fp16/bf16; IEEE fp32 for fp32 inputs, as the CPU interpreter tests use) with fp32 accumulation.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n", "NC", "SEG"])
def _fwd_state_kernel(K_, V_, BC, S0, Z0, HS, ZS, SF, ZF, LS, LZ, LD, skb, skh, skn, svb, svh, svn, n, NC, SEG, HK,
                      DK, DV, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr,
                      HAS_INIT: tl.constexpr, LOCAL: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    """Sequential over the ``SEG`` chunks of one segment of the sequence (grid axis 1; one segment: the whole
    sequence). The loop carries as little as possible: ``BC`` holds the chunk-local cumulative log decays (host
    side: no scan in the loop), and ``z`` has programs of its own (the extra dv-block index ``nvb``, whose v columns
    are all masked), so no ``S`` program waits on a row reduction. The next chunk's
    k/v/decay tiles are loaded one iteration ahead (register double buffering: Triton's pipeliner does not stage
    these tiles, whose values are rescaled and summed in registers).

    Two passes when there are several segments (a small grid of one walk leaves most of the GPU idle; segments
    fill it, and the sequential walk shortens to two segments' worth):
    ``LOCAL`` walks each segment from a zero state and writes only its end state ``LS``/``LZ`` and its total log
    decay ``LD``; the snapshot pass starts each segment from the initial state folded through the earlier
    segments' ``(LD, LS, LZ)`` (``S <- exp(D_j) S + L_j``) and writes the per-chunk snapshots."""
    i_kv = tl.program_id(0)
    i_seg = tl.program_id(1)
    i_bh = tl.program_id(2)
    n_seg = tl.num_programs(1)
    nvb = tl.cdiv(DV, BV)
    i_k = i_kv // (nvb + 1)
    i_v = i_kv % (nvb + 1)
    is_z = i_v == nvb
    i_b = i_bh // HK
    i_h = i_bh % HK
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)  # all >= DV in the z program
    ot = tl.arange(0, C)
    mk = ok < DK
    mv = ov < DV
    mkv = mk[:, None] & mv[None, :]
    kb = K_ + i_b.to(tl.int64) * skb + i_h.to(tl.int64) * skh + ok[:, None]  # kᵀ tile [BK, C]
    vb = V_ + i_b.to(tl.int64) * svb + i_h.to(tl.int64) * svh + ov[None, :]
    bb = BC + i_bh.to(tl.int64) * NC * C
    sidx = ok[:, None] * DV + ov[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if not LOCAL:
        if HAS_INIT:
            S = tl.load(S0 + i_bh.to(tl.int64) * DK * DV + sidx, mask=mkv, other=0.0)
            if is_z:
                z = tl.load(Z0 + i_bh.to(tl.int64) * DK + ok, mask=mk, other=0.0)
        for j in range(i_seg):  # fold the earlier segments in
            seg = i_bh.to(tl.int64) * n_seg + j
            if HAS_DECAY:
                S = S * tl.exp(tl.load(LD + seg))
                z = z * tl.exp(tl.load(LD + seg))
            S += tl.load(LS + seg * DK * DV + sidx, mask=mkv, other=0.0)
            if is_z:
                z += tl.load(LZ + seg * DK + ok, mask=mk, other=0.0)
    hb = HS + i_bh.to(tl.int64) * NC * DK * DV
    zb = ZS + i_bh.to(tl.int64) * NC * DK
    c0 = i_seg * SEG
    c1 = tl.minimum(c0 + SEG, NC)
    lim = tl.minimum(c1 * C, n)  # rows of this segment: prefetches past it are masked (no memory traffic)
    rows = c0 * C + ot
    mt = rows < lim
    r64 = rows.to(tl.int64)
    ktn = tl.load(kb + r64[None, :] * skn, mask=mk[:, None] & mt[None, :], other=0.0)
    vtn = tl.load(vb + r64[:, None] * svn, mask=mt[:, None] & mv[None, :], other=0.0)
    btn = tl.zeros([C], dtype=tl.float32)
    endn = 0.0
    total = 0.0
    if HAS_DECAY:
        btn = tl.load(bb + rows)
        endn = tl.load(bb + (c0 + 1) * C - 1)
    for c in range(c0, c1):
        ktt = ktn
        vt = vtn
        bcum = btn
        bend = endn
        rows = (c + 1) * C + ot  # prefetch the next chunk
        mt = rows < lim
        r64 = rows.to(tl.int64)
        ktn = tl.load(kb + r64[None, :] * skn, mask=mk[:, None] & mt[None, :], other=0.0)
        vtn = tl.load(vb + r64[:, None] * svn, mask=mt[:, None] & mv[None, :], other=0.0)
        if HAS_DECAY:
            btn = tl.load(bb + rows, mask=rows < c1 * C, other=0.0)
            endn = tl.load(bb + tl.minimum(c + 2, c1) * C - 1)
        if not LOCAL:
            tl.store(hb + c * DK * DV + sidx, S.to(HS.dtype.element_ty), mask=mkv)
            if is_z:
                tl.store(zb + c * DK + ok, z, mask=mk)
        if HAS_DECAY:
            total += bend
            kdec = tl.exp(bend - bcum)
            S = S * tl.exp(bend)
            if is_z:
                z = z * tl.exp(bend) + tl.sum(ktt.to(tl.float32) * kdec[None, :], 1)
            vt = (vt.to(tl.float32) * kdec[:, None]).to(ktt.dtype)
        elif is_z:
            z = z + tl.sum(ktt.to(tl.float32), 1)
        S += tl.dot(ktt, vt, input_precision=PREC)
    if LOCAL:
        seg = i_bh.to(tl.int64) * n_seg + i_seg
        tl.store(LS + seg * DK * DV + sidx, S, mask=mkv)
        if is_z:
            tl.store(LZ + seg * DK + ok, z, mask=mk)
            if HAS_DECAY:
                tl.store(LD + seg, total)
    elif STORE_FINAL:
        if i_seg == n_seg - 1:
            tl.store(SF + i_bh.to(tl.int64) * DK * DV + sidx, S, mask=mkv)
            if is_z:
                tl.store(ZF + i_bh.to(tl.int64) * DK + ok, z, mask=mk)


@triton.jit(do_not_specialize=["n", "NC"])
def _fwd_out_kernel(Q, K_, V_, A_, HS, ZS, O, RDEN, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                    n, NC, H, G, DK, DV, eps, C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
                    HAS_DECAY: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr):
    # the G query heads of a KV head are adjacent programs: they read the same k/v tiles and state snapshot
    # while those are in L2
    i_v = tl.program_id(0) // G
    i_c = tl.program_id(1)
    i_bk = tl.program_id(2)
    hk = H // G
    i_b = i_bk // hk
    i_kh = i_bk % hk
    i_h = i_kh * G + tl.program_id(0) % G
    i_bh = i_b * H + i_h
    ot = tl.arange(0, C)
    rows = i_c * C + ot
    mt = rows < n
    ok = tl.arange(0, KP)
    mk = ok < DK
    ov = i_v * BV + tl.arange(0, BV)
    mv = ov < DV
    r64 = rows[:, None].to(tl.int64)
    qt = tl.load(Q + i_b.to(tl.int64) * sqb + i_h.to(tl.int64) * sqh + r64 * sqn + ok[None, :],
                 mask=mt[:, None] & mk[None, :], other=0.0)
    kt = tl.load(K_ + i_b.to(tl.int64) * skb + i_kh.to(tl.int64) * skh + r64 * skn + ok[None, :],
                 mask=mt[:, None] & mk[None, :], other=0.0)
    vt = tl.load(V_ + i_b.to(tl.int64) * svb + i_kh.to(tl.int64) * svh + r64 * svn + ov[None, :],
                 mask=mt[:, None] & mv[None, :], other=0.0)
    causal = ot[:, None] >= ot[None, :]
    p = tl.dot(qt, tl.trans(kt), input_precision=PREC)
    if HAS_DECAY:
        at = tl.load(A_ + i_bk.to(tl.int64) * n + rows, mask=mt, other=0.0)
        bcum = tl.cumsum(at, 0)
        p = tl.where(causal, p * tl.exp(tl.where(causal, bcum[:, None] - bcum[None, :], 0.0)), 0.0)
    else:
        p = tl.where(causal, p, 0.0)
    hsb = HS + (i_bk.to(tl.int64) * NC + i_c) * DK * DV
    st = tl.load(hsb + ok[:, None] * DV + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
    inter = tl.dot(qt.to(st.dtype), st, input_precision=PREC)
    if HAS_DECAY:
        inter = inter * tl.exp(bcum)[:, None]
    acc = tl.dot(p.to(vt.dtype), vt, input_precision=PREC) + inter
    if NORM:
        zt = tl.load(ZS + (i_bk.to(tl.int64) * NC + i_c) * DK + ok, mask=mk, other=0.0)
        qz = tl.sum(qt.to(tl.float32) * zt[None, :], 1)
        if HAS_DECAY:
            qz = qz * tl.exp(bcum)
        r = 1.0 / (tl.sum(p, 1) + qz + eps)
        acc = acc * r[:, None]
        if i_v == 0:
            tl.store(RDEN + i_bh.to(tl.int64) * n + rows, r, mask=mt)
    tl.store(O + i_b.to(tl.int64) * sob + i_h.to(tl.int64) * soh + r64 * son + ov[None, :],
             acc.to(O.dtype.element_ty), mask=mt[:, None] & mv[None, :])


@triton.jit
def _step_kernel(Q, K_, V_, A_, S_, Z_, O, SN, ZN, sqb, sqh, skb, skh, svb, svh, sob, soh, H, G, DK, DV, eps,
                 KP: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr, NORM: tl.constexpr):
    """One token: ``S' = γ S + kᵀ v``, ``z' = γ z + k``, then ``o = q S' / (q·z' + eps)`` for the KV head's G query
    heads. Elementwise + reductions (a single row is no shape for tensor cores); state in and out in fp32."""
    i_v = tl.program_id(0)
    i_bk = tl.program_id(1)
    hk = H // G
    i_b = i_bk // hk
    i_kh = i_bk % hk
    ok = tl.arange(0, KP)
    mk = ok < DK
    ov = i_v * BV + tl.arange(0, BV)
    mv = ov < DV
    mkv = mk[:, None] & mv[None, :]
    sidx = i_bk.to(tl.int64) * DK * DV + ok[:, None] * DV + ov[None, :]
    S = tl.load(S_ + sidx, mask=mkv, other=0.0)
    z = tl.load(Z_ + i_bk.to(tl.int64) * DK + ok, mask=mk, other=0.0)
    kt = tl.load(K_ + i_b.to(tl.int64) * skb + i_kh.to(tl.int64) * skh + ok, mask=mk, other=0.0).to(tl.float32)
    vt = tl.load(V_ + i_b.to(tl.int64) * svb + i_kh.to(tl.int64) * svh + ov, mask=mv, other=0.0).to(tl.float32)
    if HAS_DECAY:
        gamma = tl.exp(tl.load(A_ + i_bk).to(tl.float32))
        S = S * gamma
        z = z * gamma
    S = S + kt[:, None] * vt[None, :]
    z = z + kt
    tl.store(SN + sidx, S, mask=mkv)
    if i_v == 0:
        tl.store(ZN + i_bk.to(tl.int64) * DK + ok, z, mask=mk)
    for j in range(G):
        hq = i_kh * G + j
        qt = tl.load(Q + i_b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + ok, mask=mk, other=0.0).to(tl.float32)
        num = tl.sum(qt[:, None] * S, 0)
        if NORM:
            num = num / (tl.sum(qt * z, 0) + eps)
        tl.store(O + i_b.to(tl.int64) * sob + hq.to(tl.int64) * soh + ov, num.to(O.dtype.element_ty), mask=mv)

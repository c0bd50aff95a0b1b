"""Triton backward of normalised gated linear attention (chunked).

With ``r = 1 / (den + eps)`` (saved by the forward) the normalised output is an unnormalised GLA with the
"extended" value ``[v, 1]`` and the extended output gradient ``[do * r, dden]``, ``dden = -(do · o) r``
(``_bwd_pre_kernel``; without normalisation ``r = 1``, ``dden = 0``). Per chunk, with ``(S, z)`` the state at its
start (recomputed by the forward's state kernel) and ``(dS, dz)`` the gradient of the state at its END:
  * ``_bwd_dstate_kernel`` (grid: dk-blocks x dv-blocks, b*hk; sequential over chunks, last to first) writes
    ``(dS, dz)`` of every chunk and carries ``dS <- exp(B_C) dS + Σ_heads (q * exp(B) * r)ᵀ do``,
    ``dz <- exp(B_C) dz + Σ_heads Σ_t q_t exp(B_t) dden_t``; what is left at the start is d initial_state.
  * ``dP_ts = exp(B_t - B_s) [s <= t] (r_t do_t · v_s + dden_t)`` and ``P_ts = exp(B_t - B_s) [s <= t] q_t · k_s``;
    ``_bwd_dq_kernel`` (per query head, a KV head's G heads adjacent): dq = dP k + exp(B) (r do Sᵀ + dden z)
    ``_bwd_dk_kernel`` (per KV head, its query heads summed): dk = Σ dPᵀ q + exp(B_C - B) (v dSᵀ + dz)
    ``_bwd_dv_kernel`` (per KV head and dv-block):           dv = Σ (P r)ᵀ do + exp(B_C - B) k dS
  * the log-decay gradient: the output depends on the global cumulative log decay L only through
    ``exp(L_t - L_s)`` and the final state through ``exp(L_N - L_s)``, so ``dL_t = Σ_heads q_t · dq_t - k_t · dk_t``
    (+ <dS_N, S_N> + <dz_N, z_N> at the last token) and ``d log_decay = reverse cumsum of dL`` (host side). The dq /
    dk kernels write the row dots ``q·dq`` / ``k·dk`` from their fp32 accumulators.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n"])
def _bwd_pre_kernel(O, DO, RDEN, DDEN, sob, soh, son, sdb, sdh, sdn, n, H, DV,
                    BT: tl.constexpr, VP: tl.constexpr):
    """``dden = -(do · o) * r`` per query row (fp32)."""
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    rows = i_t * BT + tl.arange(0, BT)
    mt = rows < n
    ov = tl.arange(0, VP)
    m = mt[:, None] & (ov < DV)[None, :]
    r64 = rows[:, None].to(tl.int64)
    o = tl.load(O + i_b.to(tl.int64) * sob + i_h.to(tl.int64) * soh + r64 * son + ov[None, :], mask=m, other=0.0)
    do = tl.load(DO + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh + r64 * sdn + ov[None, :], mask=m, other=0.0)
    r = tl.load(RDEN + i_bh.to(tl.int64) * n + rows, mask=mt, other=0.0)
    dd = -tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) * r
    tl.store(DDEN + i_bh.to(tl.int64) * n + rows, dd, mask=mt)


@triton.jit(do_not_specialize=["n", "NC"])
def _bwd_dstate_kernel(Q, DO, BC, RDEN, DDEN, DSF, DZF, DHS, DZS, DS0, DZ0, sqb, sqh, sqn, sdb, sdh, sdn,
                       n, NC, HK, G, DK, DV, C: tl.constexpr, GP: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, HAS_DECAY: tl.constexpr, NORM: tl.constexpr, HAS_DFINAL: tl.constexpr,
                       STORE_DINIT: tl.constexpr, PREC: tl.constexpr):
    """Sequential over chunks, last to first. All G query heads of the KV head are one ``[GP * C]`` row axis
    (row ``j * C + t`` = head j, token t; heads past G masked), so each chunk is one ``[BK, GP*C] x [GP*C, BV]``
    dot; ``BC`` holds the chunk-local cumulative log decays (host side), gathered per row. The next chunk's tiles
    are loaded one iteration ahead (register double buffering)."""
    i_kv = tl.program_id(0)
    i_bk = tl.program_id(1)
    nvb = tl.cdiv(DV, BV)
    i_k = i_kv // nvb
    i_v = i_kv % nvb
    i_b = i_bk // HK
    i_kh = i_bk % HK
    H = HK * G
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk = ok < DK
    mv = ov < DV
    mkv = mk[:, None] & mv[None, :]
    sidx = ok[:, None] * DV + ov[None, :]
    ig = tl.arange(0, GP * C)
    jj = ig // C  # query head within the group
    tt = ig % C  # token within the chunk
    mj = jj < G
    hq = i_b * H + i_kh * G + jj  # flat (batch, query head) per row
    qb = Q + i_b.to(tl.int64) * sqb + (i_kh * G + jj).to(tl.int64)[None, :] * sqh + ok[:, None]  # qᵀ [BK, GP*C]
    db = DO + i_b.to(tl.int64) * sdb + (i_kh * G + jj).to(tl.int64)[:, None] * sdh + ov[None, :]  # [GP*C, BV]
    rb = hq.to(tl.int64) * n
    bb = BC + i_bk.to(tl.int64) * NC * C
    if HAS_DFINAL:
        dS = tl.load(DSF + i_bk.to(tl.int64) * DK * DV + sidx, mask=mkv, other=0.0)
        dz = tl.load(DZF + i_bk.to(tl.int64) * DK + ok, mask=mk, other=0.0)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
        dz = tl.zeros([BK], dtype=tl.float32)
    hb = DHS + i_bk.to(tl.int64) * NC * DK * DV
    zb = DZS + i_bk.to(tl.int64) * NC * DK
    rows = (NC - 1) * C + tt
    mt = (rows < n) & mj
    r64 = rows.to(tl.int64)
    qn = tl.load(qb + r64[None, :] * sqn, mask=mk[:, None] & mt[None, :], other=0.0)
    don = tl.load(db + r64[:, None] * sdn, mask=mt[:, None] & mv[None, :], other=0.0)
    if HAS_DECAY:
        bn = tl.load(bb + rows, mask=mt, other=0.0)
    if NORM:
        rn = tl.load(RDEN + rb + rows, mask=mt, other=0.0)
        ddn = tl.load(DDEN + rb + rows, mask=mt, other=0.0)
    for ci in range(NC):
        c = NC - 1 - ci
        qtt = qn
        dot_ = don
        if HAS_DECAY:
            bcum = bn
            bend = tl.load(bb + c * C + C - 1)
        if NORM:
            r = rn
            dd = ddn
        rows = (c - 1) * C + tt  # prefetch the previous chunk (all masked before the start)
        mt = (rows >= 0) & (rows < n) & mj
        r64 = rows.to(tl.int64)
        qn = tl.load(qb + r64[None, :] * sqn, mask=mk[:, None] & mt[None, :], other=0.0)
        don = tl.load(db + r64[:, None] * sdn, mask=mt[:, None] & mv[None, :], other=0.0)
        if HAS_DECAY:
            bn = tl.load(bb + rows, mask=mt, other=0.0)
        if NORM:
            rn = tl.load(RDEN + rb + rows, mask=mt, other=0.0)
            ddn = tl.load(DDEN + rb + rows, mask=mt, other=0.0)
        tl.store(hb + c * DK * DV + sidx, dS.to(DHS.dtype.element_ty), mask=mkv)
        if i_v == 0:
            tl.store(zb + c * DK + ok, dz, mask=mk)
        if HAS_DECAY:
            w0 = tl.exp(bcum)
        else:
            w0 = tl.full([GP * C], 1.0, dtype=tl.float32)
        w = w0
        if NORM:
            w = w0 * r
            dz_t = tl.sum(qtt.to(tl.float32) * (w0 * dd)[None, :], 1)
        acc = tl.dot(qtt, (dot_.to(tl.float32) * w[:, None]).to(qtt.dtype), input_precision=PREC)
        if HAS_DECAY:
            dS = dS * tl.exp(bend)
            dz = dz * tl.exp(bend)
        dS += acc
        if NORM:
            dz += dz_t
    if STORE_DINIT:
        tl.store(DS0 + i_bk.to(tl.int64) * DK * DV + sidx, dS, mask=mkv)
        if i_v == 0:
            tl.store(DZ0 + i_bk.to(tl.int64) * DK + ok, dz, mask=mk)


@triton.jit(do_not_specialize=["n", "NC"])
def _bwd_dq_kernel(Q, K_, V_, DO, A_, HS, ZS, RDEN, DDEN, DQ, DLQ, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   sdb, sdh, sdn, n, NC, H, G, DK, DV, C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
                   HAS_DECAY: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr):
    # grid (chunks x G, b*hk): the G query heads of a KV head are adjacent programs, so the k/v tiles and state
    # snapshot they share are read from HBM once and from L2 after
    i_c = tl.program_id(0) // G
    i_bk = tl.program_id(1)
    hk = H // G
    i_b = i_bk // hk
    i_kh = i_bk % hk
    i_h = i_kh * G + tl.program_id(0) % G
    i_bh = i_b * H + i_h
    ot = tl.arange(0, C)
    rows = i_c * C + ot
    mt = rows < n
    r64 = rows[:, None].to(tl.int64)
    ok = tl.arange(0, KP)
    mk = ok < DK
    mtk = mt[:, None] & mk[None, :]
    hsb = HS + (i_bk.to(tl.int64) * NC + i_c) * DK * DV
    causal = ot[:, None] >= ot[None, :]
    if HAS_DECAY:
        at = tl.load(A_ + i_bk.to(tl.int64) * n + rows, mask=mt, other=0.0)
        bcum = tl.cumsum(at, 0)
        w0 = tl.exp(bcum)
    else:
        w0 = tl.full([C], 1.0, dtype=tl.float32)
    if NORM:
        r = tl.load(RDEN + i_bh.to(tl.int64) * n + rows, mask=mt, other=0.0)
        dd = tl.load(DDEN + i_bh.to(tl.int64) * n + rows, mask=mt, other=0.0)
        zt = tl.load(ZS + (i_bk.to(tl.int64) * NC + i_c) * DK + ok, mask=mk, other=0.0)
        wq = r * w0
        dq = (dd * w0)[:, None] * zt[None, :]
    else:
        wq = w0
        dq = tl.zeros([C, KP], dtype=tl.float32)
    dp = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < DV
        dot_ = tl.load(DO + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh + r64 * sdn + ov[None, :],
                       mask=mt[:, None] & mv[None, :], other=0.0)
        vt = tl.load(V_ + i_b.to(tl.int64) * svb + i_kh.to(tl.int64) * svh + r64 * svn + ov[None, :],
                     mask=mt[:, None] & mv[None, :], other=0.0)
        st = tl.load(hsb + ok[:, None] * DV + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        dp += tl.dot(dot_, tl.trans(vt), input_precision=PREC)
        dq += tl.dot(dot_.to(st.dtype), tl.trans(st), input_precision=PREC) * wq[:, None]
    if NORM:
        dp = dp * r[:, None] + dd[:, None]
    if HAS_DECAY:
        dp = dp * tl.exp(tl.where(causal, bcum[:, None] - bcum[None, :], 0.0))
    dp = tl.where(causal, dp, 0.0)
    kt = tl.load(K_ + i_b.to(tl.int64) * skb + i_kh.to(tl.int64) * skh + r64 * skn + ok[None, :], mask=mtk,
                 other=0.0)
    dq += tl.dot(dp.to(kt.dtype), kt, input_precision=PREC)
    qt = tl.load(Q + i_b.to(tl.int64) * sqb + i_h.to(tl.int64) * sqh + r64 * sqn + ok[None, :], mask=mtk, other=0.0)
    tl.store(DQ + i_bh.to(tl.int64) * n * DK + r64 * DK + ok[None, :], dq.to(DQ.dtype.element_ty), mask=mtk)
    tl.store(DLQ + i_bh.to(tl.int64) * n + rows, tl.sum(dq * qt.to(tl.float32), 1), mask=mt)


@triton.jit(do_not_specialize=["n", "NC"])
def _bwd_dk_kernel(Q, K_, V_, DO, A_, DHS, DZS, RDEN, DDEN, DK_, DLK, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   sdb, sdh, sdn, n, NC, HK, G, DK, DV, C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
                   HAS_DECAY: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr):
    i_c = tl.program_id(0)
    i_bk = tl.program_id(1)
    i_b = i_bk // HK
    i_kh = i_bk % HK
    H = HK * G
    ot = tl.arange(0, C)
    rows = i_c * C + ot
    mt = rows < n
    r64 = rows[:, None].to(tl.int64)
    ok = tl.arange(0, KP)
    mk = ok < DK
    mtk = mt[:, None] & mk[None, :]
    upper = ot[:, None] <= ot[None, :]  # [s, t]: key s seen by query t
    if HAS_DECAY:
        at = tl.load(A_ + i_bk.to(tl.int64) * n + rows, mask=mt, other=0.0)
        bcum = tl.cumsum(at, 0)
        bend = tl.sum(at, 0)
        dmat = tl.exp(tl.where(upper, bcum[None, :] - bcum[:, None], 0.0))
        kdec = tl.exp(bend - bcum)
    else:
        dmat = tl.full([C, C], 1.0, dtype=tl.float32)
        kdec = tl.full([C], 1.0, dtype=tl.float32)
    dk = tl.zeros([C, KP], dtype=tl.float32)
    for j in range(G):
        i_h = i_kh * G + j
        hq = i_b * H + i_h
        dpt = tl.zeros([C, C], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            ov = v0 + tl.arange(0, BV)
            mtv = mt[:, None] & (ov < DV)[None, :]
            vt = tl.load(V_ + i_b.to(tl.int64) * svb + i_kh.to(tl.int64) * svh + r64 * svn + ov[None, :], mask=mtv,
                         other=0.0)
            dot_ = tl.load(DO + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh + r64 * sdn + ov[None, :],
                           mask=mtv, other=0.0)
            dpt += tl.dot(vt, tl.trans(dot_), input_precision=PREC)
        if NORM:
            r = tl.load(RDEN + hq.to(tl.int64) * n + rows, mask=mt, other=0.0)
            dd = tl.load(DDEN + hq.to(tl.int64) * n + rows, mask=mt, other=0.0)
            dpt = dpt * r[None, :] + dd[None, :]
        dpt = tl.where(upper, dpt * dmat, 0.0)
        qt = tl.load(Q + i_b.to(tl.int64) * sqb + i_h.to(tl.int64) * sqh + r64 * sqn + ok[None, :], mask=mtk,
                     other=0.0)
        dk += tl.dot(dpt.to(qt.dtype), qt, input_precision=PREC)
    hsb = DHS + (i_bk.to(tl.int64) * NC + i_c) * DK * DV
    dzt = tl.load(DZS + (i_bk.to(tl.int64) * NC + i_c) * DK + ok, mask=mk, other=0.0)
    dk += dzt[None, :] * kdec[:, None]
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        mv = ov < DV
        vt = tl.load(V_ + i_b.to(tl.int64) * svb + i_kh.to(tl.int64) * svh + r64 * svn + ov[None, :],
                     mask=mt[:, None] & mv[None, :], other=0.0)
        dst = tl.load(hsb + ok[:, None] * DV + ov[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        dk += tl.dot(vt.to(dst.dtype), tl.trans(dst), input_precision=PREC) * kdec[:, None]
    kt = tl.load(K_ + i_b.to(tl.int64) * skb + i_kh.to(tl.int64) * skh + r64 * skn + ok[None, :], mask=mtk,
                 other=0.0)
    tl.store(DK_ + i_bk.to(tl.int64) * n * DK + r64 * DK + ok[None, :], dk.to(DK_.dtype.element_ty), mask=mtk)
    tl.store(DLK + i_bk.to(tl.int64) * n + rows, tl.sum(dk * kt.to(tl.float32), 1), mask=mt)


@triton.jit(do_not_specialize=["n", "NC"])
def _bwd_dv_kernel(Q, K_, DO, A_, DHS, RDEN, DV_, sqb, sqh, sqn, skb, skh, skn, sdb, sdh, sdn,
                   n, NC, HK, G, DK, DV, C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
                   HAS_DECAY: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_c = tl.program_id(1)
    i_bk = tl.program_id(2)
    i_b = i_bk // HK
    i_kh = i_bk % HK
    H = HK * G
    ot = tl.arange(0, C)
    rows = i_c * C + ot
    mt = rows < n
    r64 = rows[:, None].to(tl.int64)
    ok = tl.arange(0, KP)
    mk = ok < DK
    mtk = mt[:, None] & mk[None, :]
    ov = i_v * BV + tl.arange(0, BV)
    mv = ov < DV
    mtv = mt[:, None] & mv[None, :]
    kt = tl.load(K_ + i_b.to(tl.int64) * skb + i_kh.to(tl.int64) * skh + r64 * skn + ok[None, :], mask=mtk,
                 other=0.0)
    upper = ot[:, None] <= ot[None, :]
    if HAS_DECAY:
        at = tl.load(A_ + i_bk.to(tl.int64) * n + rows, mask=mt, other=0.0)
        bcum = tl.cumsum(at, 0)
        bend = tl.sum(at, 0)
        dmat = tl.exp(tl.where(upper, bcum[None, :] - bcum[:, None], 0.0))
        kdec = tl.exp(bend - bcum)
    else:
        dmat = tl.full([C, C], 1.0, dtype=tl.float32)
        kdec = tl.full([C], 1.0, dtype=tl.float32)
    dv = tl.zeros([C, BV], dtype=tl.float32)
    for j in range(G):
        i_h = i_kh * G + j
        hq = i_b * H + i_h
        qt = tl.load(Q + i_b.to(tl.int64) * sqb + i_h.to(tl.int64) * sqh + r64 * sqn + ok[None, :], mask=mtk,
                     other=0.0)
        dot_ = tl.load(DO + i_b.to(tl.int64) * sdb + i_h.to(tl.int64) * sdh + r64 * sdn + ov[None, :], mask=mtv,
                       other=0.0)
        pt = tl.dot(kt, tl.trans(qt), input_precision=PREC)  # [s, t]
        pt = tl.where(upper, pt * dmat, 0.0)
        if NORM:
            pt = pt * tl.load(RDEN + hq.to(tl.int64) * n + rows, mask=mt, other=0.0)[None, :]
        dv += tl.dot(pt.to(dot_.dtype), dot_, input_precision=PREC)
    dst = tl.load(DHS + (i_bk.to(tl.int64) * NC + i_c) * DK * DV + ok[:, None] * DV + ov[None, :],
                  mask=mk[:, None] & mv[None, :], other=0.0)
    dv += tl.dot(kt.to(dst.dtype), dst, input_precision=PREC) * kdec[:, None]
    tl.store(DV_ + i_bk.to(tl.int64) * n * DV + r64 * DV + ov[None, :], dv.to(DV_.dtype.element_ty), mask=mtv)

"""HyperAttention backward in Triton.

The forward's output is one softmax per query over a multiset of keys (its leaf's causal prefix, its sorted block
at every level where it is in a second half, and that level's samples with additive log-weights). Its exact
gradient is therefore a sparse flash-attention backward with the *final* row LSE:
  ``P = exp(S + bias - LSE)``, ``dV += P^T dO``, ``dS = P * (dO V^T - Delta)``, ``dQ += dS K``, ``dK += dS^T Q``
with ``Delta = rowsum(dO * O) - dLSE`` (the LSE's own gradient folded into the preprocessing term). The gradient
goes through the merge weights of every part; nothing is detached. Kernels:
  * ``_bwd_pre_kernel``: Delta; ``_widen_kernel``: cuDNN's leaf gradients (when the forward's leaves were
    cuDNN's) as the accumulators' starting values;
  * per level: ``_level_dq_kernel`` (query tiles, like the forward; it also writes the tile's Q, dO, LSE and
    Delta in sorted order), ``_level_dkdv_kernel`` (key tiles of each sorted block, looping over the block's
    queries of every head of the group, contiguous in those sorted copies) and ``_level_dkdv_samples_kernel``
    (sample tiles x query splits of the node's queries in original order, atomically added: samples repeat and are
    shared by all blocks of a node);
    they accumulate into fp32 buffers at original positions (one launch per level, so plain read-add-write).
    ops.py runs them per chunk of KV heads (and batch rows) whose fp32 buffers fit ``KernelConfig.acc_budget_mb``,
    so the accumulators never cover the whole problem (peak memory of training at long lengths);
  * ``_diag_dq_kernel`` / ``_diag_dkdv_kernel``: the exact leaves (Triton leaves), adding the level accumulators
    and writing the final gradients in the input dtype;
  * levers (sinks / local window): the level kernels mask the exact-set pairs (``EXCL``), ``_diag_dq_kernel`` adds
    the exact-set keys before the leaf (``EXTRA``) and ``_extra_dkdv_kernel`` their dK/dV (atomics into the
    accumulators, before the leaf kernels read them).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import _extra_cols, _in_exact_set, _perm_pos, _sample_chunk


@triton.jit
def _widen_kernel(SRC, DST, N, BLOCK: tl.constexpr):
    """``DST[:N] = SRC[:N]`` for flat buffers, in DST's dtype: seeds the fp32 accumulators with cuDNN's leaf
    gradients (torch's bf16 -> fp32 copy is an unvectorised kernel, about half the bandwidth on the H200)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tl.store(DST + offs, tl.load(SRC + offs, mask=ok).to(DST.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_pre_kernel(O, DO, DLSE, DELTA, sob, soh, son, sdb, sdh, sdn, N, H,
                    HAS_DLSE: tl.constexpr, BT: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hh = (bh % H).to(tl.int64)
    rows = pid * BT + tl.arange(0, BT)
    ok = rows < N
    dcol = tl.arange(0, D)
    o = tl.load(O + b * sob + hh * soh + rows[:, None].to(tl.int64) * son + dcol[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + hh * sdh + rows[:, None].to(tl.int64) * sdn + dcol[None, :], mask=ok[:, None],
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh.to(tl.int64) * N + rows, mask=ok, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, delta, mask=ok)


@triton.jit
def _lse2(LSE, DELTA, off, mask):
    """Row LSE in log2 units (+inf for rows that saw no key, so their P is 0) and Delta."""
    lse = tl.load(LSE + off, mask=mask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + off, mask=mask, other=0.0)
    return lse2, delta


@triton.jit
def _dq_step(dq, q, do, k, v, lse2, delta, s, PREC: tl.constexpr):
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


@triton.jit
def _dkdv_step(dk, dv, q, do, v, lse2, delta, sT, PREC: tl.constexpr):
    pT = tl.math.exp2(sT - lse2[None, :])
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _level_dq_kernel(Q, K, V, DO, LSE, DELTA, DQA, QS, DOS, LS2, DS, QPERM, KPERM, NS, TILES, NVALID, SORIG, SBLK,
                     SBIAS, SKD, SVD, sm_scale, qk_scale,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     N, NC, H, HK, G, NODES, M, SINKS, WINDOW,
                     EXCL: tl.constexpr, QPERM16: tl.constexpr, KPERM16: tl.constexpr, SAMPLE_STAGES: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    hh = bh % H
    kvh = hh // G
    bkv = b * HK + kvh
    t = TILES + tile * 8
    q_start = tl.load(t)
    q_cnt = tl.load(t + 1)
    k_start = tl.load(t + 2)
    k_cnt = tl.load(t + 3)
    blk = tl.load(t + 4)
    node = tl.load(t + 5)
    node_ks = tl.load(t + 6)
    m_cnt = tl.load(t + 7)
    r = tl.arange(0, BM)
    row_ok = r < q_cnt
    dcol = tl.arange(0, D)
    b64 = b.to(tl.int64)
    qidx = _perm_pos(QPERM, bh.to(tl.int64) * NC + q_start + r, row_ok, tl.load(NS + node), QPERM16)
    ks0 = tl.load(NS + NODES + node)
    q = tl.load(Q + b64 * sqb + hh.to(tl.int64) * sqh + qidx[:, None] * sqn + dcol[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b64 * sdb + hh.to(tl.int64) * sdh + qidx[:, None] * sdn + dcol[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2, delta = _lse2(LSE, DELTA, bh.to(tl.int64) * N + qidx, row_ok)
    col = bh.to(tl.int64) * NC + q_start + r  # the tile's sorted columns: copies for the level dK/dV pass
    tl.store(QS + col[:, None] * D + dcol[None, :], q, mask=row_ok[:, None])
    tl.store(DOS + col[:, None] * D + dcol[None, :], do, mask=row_ok[:, None])
    tl.store(LS2 + col, lse2, mask=row_ok)
    tl.store(DS + col, delta, mask=row_ok)
    nv = tl.load(NVALID + b * NODES + node)
    kb = K + b64 * skb + kvh.to(tl.int64) * skh
    vb = V + b64 * svb + kvh.to(tl.int64) * svh
    kperm = KPERM + bkv.to(tl.int64) * NC
    dq = tl.zeros([BM, D], tl.float32)
    for start in range(0, k_cnt, BN):
        c = start + tl.arange(0, BN)
        kpos = k_start + c
        kok = (c < k_cnt) & (kpos - node_ks < nv)
        kidx = _perm_pos(kperm, kpos, kok, ks0, KPERM16)
        k = tl.load(kb + kidx[:, None] * skn + dcol[None, :], mask=kok[:, None], other=0.0)
        v = tl.load(vb + kidx[:, None] * svn + dcol[None, :], mask=kok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = kok[None, :]
        if EXCL:
            ok = ok & ~_in_exact_set(qidx[:, None], kidx[None, :], SINKS, WINDOW)
        s = tl.where(ok, s, float("-inf"))
        dq = _dq_step(dq, q, do, k, v, lse2, delta, s, PREC)
    bias = tl.load(SBIAS + b * NODES + node) * 1.4426950408889634
    for start in tl.range(0, m_cnt, BN, num_stages=SAMPLE_STAGES):
        k, v, ok = _sample_chunk(SKD, SVD, SORIG, SBLK, b, kvh, bkv, node, NODES, M, start, m_cnt, blk, nv, qidx,
                                 SINKS, WINDOW, EXCL, BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale + bias
        s = tl.where(ok, s, float("-inf"))
        dq = _dq_step(dq, q, do, k, v, lse2, delta, s, PREC)
    ptr = DQA + bh.to(tl.int64) * N * D + qidx[:, None] * D + dcol[None, :]
    tl.store(ptr, tl.load(ptr, mask=row_ok[:, None], other=0.0) + dq * sm_scale, mask=row_ok[:, None])


@triton.jit
def _level_dkdv_kernel(QSD, DOSD, LS2, DS, K, V, DKA, DVA, QPERM, KPERM, NS, TILES, NVALID,
                       sm_scale, qk_scale, skb, skh, skn, svb, svh, svn,
                       N, NC, H, HK, G, NODES, SINKS, WINDOW,
                       EXCL: tl.constexpr, KPERM16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       D: tl.constexpr, PREC: tl.constexpr):
    """dK/dV of a BN-tile of one sorted block's keys over the block's queries of every head of the group. The
    queries come from the sorted copies the level's dQ pass wrote (``QSD`` / ``DOSD`` descriptors of ``[b, h, NC,
    D]``, ``LS2`` / ``DS`` the rows' log2 LSE and Delta): a block's queries are adjacent columns there, so each
    step is a contiguous tile (TMA on Hopper) instead of a gather behind an index load. ``QPERM`` (int32) is read
    only for the levers' exact-set mask."""
    tile = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // HK
    kvh = bkv % HK
    t = TILES + tile * 6
    k_start = tl.load(t)
    k_cnt = tl.load(t + 1)
    q_start = tl.load(t + 2)
    q_cnt = tl.load(t + 3)
    node = tl.load(t + 4)
    node_ks = tl.load(t + 5)
    c = tl.arange(0, BN)
    dcol = tl.arange(0, D)
    b64 = b.to(tl.int64)
    nv = tl.load(NVALID + b * NODES + node)
    kpos = k_start + c
    kok = (c < k_cnt) & (kpos - node_ks < nv)
    qs0 = tl.load(NS + node)
    kidx = _perm_pos(KPERM, bkv.to(tl.int64) * NC + kpos, kok, tl.load(NS + NODES + node), KPERM16)
    k = tl.load(K + b64 * skb + kvh.to(tl.int64) * skh + kidx[:, None] * skn + dcol[None, :], mask=kok[:, None],
                other=0.0)
    v = tl.load(V + b64 * svb + kvh.to(tl.int64) * svh + kidx[:, None] * svn + dcol[None, :], mask=kok[:, None],
                other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for gi in range(G):
        hh = kvh * G + gi
        bh = (b * H + hh).to(tl.int64)
        for qs in range(0, q_cnt, BM):
            r = qs + tl.arange(0, BM)
            rok = r < q_cnt
            q = QSD.load([b, hh, q_start + qs, 0]).reshape(BM, D)  # rows past the block are masked out below
            do = DOSD.load([b, hh, q_start + qs, 0]).reshape(BM, D)
            col = bh * NC + q_start + r
            lse2 = tl.load(LS2 + col, mask=rok, other=float("inf"))
            delta = tl.load(DS + col, mask=rok, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            ok = kok[:, None] & rok[None, :]
            if EXCL:
                qidx = _perm_pos(QPERM, col, rok, qs0, False)
                ok = ok & ~_in_exact_set(qidx[None, :], kidx[:, None], SINKS, WINDOW)
            sT = tl.where(ok, sT, float("-inf"))
            dk, dv = _dkdv_step(dk, dv, q, do, v, lse2, delta, sT, PREC)
    base = bkv.to(tl.int64) * N * D + kidx[:, None] * D + dcol[None, :]
    tl.store(DKA + base, tl.load(DKA + base, mask=kok[:, None], other=0.0) + dk * sm_scale, mask=kok[:, None])
    tl.store(DVA + base, tl.load(DVA + base, mask=kok[:, None], other=0.0) + dv, mask=kok[:, None])


@triton.jit
def _level_dkdv_samples_kernel(QD, K, V, DOD, LSE, DELTA, DKA, DVA, QBLK, NS, TILES, NVALID, SORIG, SBLK, SBIAS,
                               sm_scale, qk_scale, skb, skh, skn, svb, svh, svn,
                               N, NC, H, HK, G, NODES, M, SINKS, WINDOW,
                               EXCL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                               PREC: tl.constexpr):
    """dK/dV of a BN-tile of one node's sampled keys over a split of the node's queries. Every query of the node
    sees the same samples (less those in its own sorted block), so the queries are taken in original order:
    contiguous rows, loaded through the descriptors ``QD`` / ``DOD`` (TMA on Hopper), each with its sorted block
    from ``QBLK`` (int32 ``[b, h, ncols]``, columns in original order: ``ops._query_blocks``). Taking them in sorted
    order instead would make every step's Q / dO gathers wait on an index load."""
    tile = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // HK
    kvh = bkv % HK
    t = TILES + tile * 5
    node = tl.load(t)
    j_start = tl.load(t + 1)
    q_start = tl.load(t + 2)
    q_cnt = tl.load(t + 3)
    node_qs = tl.load(t + 4)
    j = j_start + tl.arange(0, BN)
    dcol = tl.arange(0, D)
    b64 = b.to(tl.int64)
    nv = tl.load(NVALID + b * NODES + node)
    bias = tl.load(SBIAS + b * NODES + node) * 1.4426950408889634
    sbase = (bkv.to(tl.int64) * NODES + node) * M
    jok = (j < M) & ((j * 0 + nv) > 0)
    row0 = tl.load(NS + node) + q_start - node_qs  # original position of the split's first query
    sidx = tl.load(SORIG + sbase + j, mask=jok, other=0).to(tl.int64)
    sblk = tl.load(SBLK + sbase + j, mask=jok, other=-1)
    k = tl.load(K + b64 * skb + kvh.to(tl.int64) * skh + sidx[:, None] * skn + dcol[None, :], mask=jok[:, None],
                other=0.0)
    v = tl.load(V + b64 * svb + kvh.to(tl.int64) * svh + sidx[:, None] * svn + dcol[None, :], mask=jok[:, None],
                other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for gi in range(G):
        hh = kvh * G + gi
        bh = (b * H + hh).to(tl.int64)
        for qs in range(0, q_cnt, BM):
            r = qs + tl.arange(0, BM)
            rok = r < q_cnt
            qidx = row0 + r
            q = QD.load([b, hh, row0 + qs, 0]).reshape(BM, D)  # rows past the split are masked out below
            do = DOD.load([b, hh, row0 + qs, 0]).reshape(BM, D)
            qblk = tl.load(QBLK + bh * NC + q_start + r, mask=rok, other=-1)
            lse2, delta = _lse2(LSE, DELTA, bh * N + qidx, rok)
            sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale + bias
            ok = jok[:, None] & rok[None, :] & (sblk[:, None] != qblk[None, :])
            if EXCL:
                ok = ok & ~_in_exact_set(qidx[None, :], sidx[:, None], SINKS, WINDOW)
            sT = tl.where(ok, sT, float("-inf"))
            dk, dv = _dkdv_step(dk, dv, q, do, v, lse2, delta, sT, PREC)
    base = bkv.to(tl.int64) * N * D + sidx[:, None] * D + dcol[None, :]
    tl.atomic_add(DKA + base, dk * sm_scale, mask=jok[:, None], sem="relaxed")
    tl.atomic_add(DVA + base, dv, mask=jok[:, None], sem="relaxed")


@triton.jit
def _diag_dq_kernel(QD, KD, VD, DOD, LSE, DELTA, DQA, DQ, KVALID, TILES, sm_scale, qk_scale, N, H, G, SINKS, WINDOW,
                    HAS_ACC: tl.constexpr, HAS_VALID: tl.constexpr, EXTRA: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    """Q, K, V, dO by tensor descriptor as in ``_diag_fwd_kernel`` (rows read past the leaf are masked out)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b32, h32 = bh // H, bh % H  # descriptor coordinates are 32-bit
    kvh = h32 // G
    b = b32.to(tl.int64)
    leaf_start = tl.load(TILES + tile * 3)
    leaf_len = tl.load(TILES + tile * 3 + 1)
    off = tl.load(TILES + tile * 3 + 2)
    rows = off + tl.arange(0, BM)
    row_ok = rows < leaf_len
    grow = (leaf_start + rows).to(tl.int64)
    dcol = tl.arange(0, D)
    q = QD.load([b32, h32, leaf_start + off, 0]).reshape(BM, D)
    do = DOD.load([b32, h32, leaf_start + off, 0]).reshape(BM, D)
    lse2, delta = _lse2(LSE, DELTA, bh.to(tl.int64) * N + grow, row_ok)
    dq = tl.zeros([BM, D], tl.float32)
    if EXTRA:  # exact-set keys before the leaf (sinks, then the window band), as in _diag_fwd_kernel
        hi = tl.minimum(SINKS, leaf_start)
        for start in range(0, hi, BN):
            cols, col_ok, ok = _extra_cols(start, grow, 0, hi, SINKS, WINDOW, KVALID, b, N, HAS_VALID, BN)
            k = KD.load([b32, kvh, start, 0]).reshape(BN, D)
            v = VD.load([b32, kvh, start, 0]).reshape(BN, D)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            s = tl.where(ok, s, float("-inf"))
            dq = _dq_step(dq, q, do, k, v, lse2, delta, s, PREC)
        lo = tl.maximum(SINKS, leaf_start + off - WINDOW + 1)
        for start in range(lo, leaf_start, BN):
            cols, col_ok, ok = _extra_cols(start, grow, lo, leaf_start, SINKS, WINDOW, KVALID, b, N, HAS_VALID, BN)
            k = KD.load([b32, kvh, start, 0]).reshape(BN, D)
            v = VD.load([b32, kvh, start, 0]).reshape(BN, D)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            s = tl.where(ok, s, float("-inf"))
            dq = _dq_step(dq, q, do, k, v, lse2, delta, s, PREC)
    for start in range(0, off, BN):
        cols = start + tl.arange(0, BN)
        k = KD.load([b32, kvh, leaf_start + start, 0]).reshape(BN, D)
        v = VD.load([b32, kvh, leaf_start + start, 0]).reshape(BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if HAS_VALID:
            kv = tl.load(KVALID + b * N + leaf_start + cols)
            s = tl.where(kv[None, :] != 0, s, float("-inf"))
        dq = _dq_step(dq, q, do, k, v, lse2, delta, s, PREC)
    hi = tl.minimum(off + BM, leaf_len)
    for start in range(off, hi, BN):
        cols = start + tl.arange(0, BN)
        col_ok = cols < leaf_len
        k = KD.load([b32, kvh, leaf_start + start, 0]).reshape(BN, D)  # keys past the leaf are masked out of s
        v = VD.load([b32, kvh, leaf_start + start, 0]).reshape(BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
        if HAS_VALID:
            kv = tl.load(KVALID + b * N + leaf_start + cols, mask=col_ok, other=0)
            ok = ok & (kv[None, :] != 0)
        s = tl.where(ok, s, float("-inf"))
        dq = _dq_step(dq, q, do, k, v, lse2, delta, s, PREC)
    dq = dq * sm_scale
    if HAS_ACC:
        dq += tl.load(DQA + bh.to(tl.int64) * N * D + grow[:, None] * D + dcol[None, :], mask=row_ok[:, None],
                      other=0.0)
    tl.store(DQ + bh.to(tl.int64) * N * D + grow[:, None] * D + dcol[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _diag_dkdv_kernel(QD, KD, VD, DOD, LSE, DELTA, DKA, DVA, DK, DV, KVALID, TILES, sm_scale, qk_scale, N, H, HK, G,
                      HAS_ACC: tl.constexpr, HAS_VALID: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      D: tl.constexpr, PREC: tl.constexpr):
    """Q, K, V, dO by tensor descriptor as in ``_diag_fwd_kernel``: keys and queries read past the leaf are masked
    out of the scores or get P = 0 (their lse is +inf), and their dK/dV rows are not stored."""
    tile = tl.program_id(0)
    bkv = tl.program_id(1)
    b32, kvh32 = bkv // HK, bkv % HK  # descriptor coordinates are 32-bit
    b = b32.to(tl.int64)
    leaf_start = tl.load(TILES + tile * 3)
    leaf_len = tl.load(TILES + tile * 3 + 1)
    off = tl.load(TILES + tile * 3 + 2)
    cols = off + tl.arange(0, BN)
    col_ok = cols < leaf_len
    gcol = (leaf_start + cols).to(tl.int64)
    dcol = tl.arange(0, D)
    if HAS_VALID:
        col_ok = col_ok & (tl.load(KVALID + b * N + gcol, mask=col_ok, other=0) != 0)
    k = KD.load([b32, kvh32, leaf_start + off, 0]).reshape(BN, D)
    v = VD.load([b32, kvh32, leaf_start + off, 0]).reshape(BN, D)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for gi in range(G):
        h32 = kvh32 * G + gi
        bh = b * H + h32
        # queries of the diagonal tile (causal mask), then every later query of the leaf (no mask)
        mid = tl.minimum(off + BN, leaf_len)
        for qs in range(off, mid, BM):
            r = qs + tl.arange(0, BM)
            rok = r < leaf_len
            q = QD.load([b32, h32, leaf_start + qs, 0]).reshape(BM, D)
            do = DOD.load([b32, h32, leaf_start + qs, 0]).reshape(BM, D)
            lse2, delta = _lse2(LSE, DELTA, bh * N + leaf_start + r, rok)
            sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            ok = col_ok[:, None] & rok[None, :] & (cols[:, None] <= r[None, :])
            sT = tl.where(ok, sT, float("-inf"))
            dk, dv = _dkdv_step(dk, dv, q, do, v, lse2, delta, sT, PREC)
        for qs in range(mid, leaf_len, BM):
            r = qs + tl.arange(0, BM)
            rok = r < leaf_len
            q = QD.load([b32, h32, leaf_start + qs, 0]).reshape(BM, D)  # rows past the leaf: P = 0 (lse +inf)
            do = DOD.load([b32, h32, leaf_start + qs, 0]).reshape(BM, D)
            lse2, delta = _lse2(LSE, DELTA, bh * N + leaf_start + r, rok)
            sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            if HAS_VALID:
                sT = tl.where(col_ok[:, None], sT, float("-inf"))
            dk, dv = _dkdv_step(dk, dv, q, do, v, lse2, delta, sT, PREC)
    dk = dk * sm_scale
    out_ok = (cols < leaf_len)[:, None]
    base = bkv.to(tl.int64) * N * D + gcol[:, None] * D + dcol[None, :]
    if HAS_ACC:
        dk += tl.load(DKA + base, mask=out_ok, other=0.0)
        dv += tl.load(DVA + base, mask=out_ok, other=0.0)
    tl.store(DK + base, dk.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + base, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _extra_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DKA, DVA, KVALID, TILES, sm_scale, qk_scale,
                       sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                       N, H, HK, G, SINKS, WINDOW,
                       HAS_VALID: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                       PREC: tl.constexpr):
    """dK/dV of the exact-set pairs whose key lies before the query's leaf (plan.extra_key_tiles: a key chunk
    and a query range of later leaves), added atomically into the fp32 accumulators (sink keys are shared by
    every later query, so their query range is split over programs)."""
    tile = tl.program_id(0)
    bkv = tl.program_id(1)
    b = (bkv // HK).to(tl.int64)
    kvh = (bkv % HK).to(tl.int64)
    t = TILES + tile * 4
    k_start = tl.load(t)
    k_cnt = tl.load(t + 1)
    q_start = tl.load(t + 2)
    q_cnt = tl.load(t + 3)
    c = tl.arange(0, BN)
    cols = (k_start + c).to(tl.int64)
    col_ok = c < k_cnt
    if HAS_VALID:
        col_ok = col_ok & (tl.load(KVALID + b * N + cols, mask=col_ok, other=0) != 0)
    dcol = tl.arange(0, D)
    k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skn + dcol[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svn + dcol[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for gi in range(G):
        hh = kvh * G + gi
        bh = b * H + hh
        qb = Q + b * sqb + hh * sqh
        db = DO + b * sdb + hh * sdh
        for qs in range(0, q_cnt, BM):
            r = qs + tl.arange(0, BM)
            rok = r < q_cnt
            qpos = (q_start + r).to(tl.int64)
            q = tl.load(qb + qpos[:, None] * sqn + dcol[None, :], mask=rok[:, None], other=0.0)
            do = tl.load(db + qpos[:, None] * sdn + dcol[None, :], mask=rok[:, None], other=0.0)
            lse2, delta = _lse2(LSE, DELTA, bh * N + qpos, rok)
            sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            ok = col_ok[:, None] & rok[None, :] & _in_exact_set(qpos[None, :], cols[:, None], SINKS, WINDOW)
            sT = tl.where(ok, sT, float("-inf"))
            dk, dv = _dkdv_step(dk, dv, q, do, v, lse2, delta, sT, PREC)
    base = bkv.to(tl.int64) * N * D + cols[:, None] * D + dcol[None, :]
    tl.atomic_add(DKA + base, dk * sm_scale, mask=col_ok[:, None], sem="relaxed")
    tl.atomic_add(DVA + base, dv, mask=col_ok[:, None], sem="relaxed")

"""HyperAttention forward in Triton: hashing, the exact diagonal and the per-level estimator, fused.

Same estimator as ``naive.py`` (see ``plan.py`` for how the causal recursion is flattened):
  1. ``_hash_kernel``: the Gray-code LSH rank of every query (per query head) or key (per KV head) for every level
     in one launch (one packed projection matrix), written as sort keys ``node << (r+1) | rank`` (invalid keys
     rank ``2^r``) into compact rows that hold only what each level sorts (queries of second halves, keys of first
     halves); one batched stable ``torch.sort`` over ``[levels, b, heads, ~n/2]`` gives every node's order.
  2. Exact causal attention inside every leaf: ``_diag_fwd_kernel`` (flash-attention style) or cuDNN SDPA on a
     ``[b, h * leaves, leaf, d]`` view (ops.py picks), writing the running ``(out, lse)`` straight into the outputs.
  3. ``_level_fwd_kernel`` (one launch per level): a tile of sorted queries gathers its rows, resumes the online
     softmax from their running ``(out, lse)``, runs over the keys of its own sorted block and then over the sampled
     keys (log-weight ``log(n_valid/m)`` added to the scores, samples in the own block masked; read from per-level
     buffers of the sampled rows, gathered on the host, so their loads pipeline), and scatters the merged
     ``(out, lse)`` back to the original positions. No unsort/merge passes and no partial buffers.
Quality levers: ``sink_tokens`` / ``local_window`` make every query's exact set (sinks + causal band) an exact part:
the level kernels mask those (query, key) pairs out of blocks and samples by original position (``EXCL``) and the
leaf kernel adds the exact-set keys that lie before each leaf (``EXTRA``); ``center_keys`` subtracts each node's
projected key mean inside ``_hash_kernel`` (``HAS_OFF``).
All math is in fp32 with exp2; inputs fp16 / bf16 (tensor cores) or fp32 (IEEE dots, for the CPU interpreter).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _hash_kernel(X, P, MAP, VALID, OFF, OUT, sxb, sxh, sxn, N, H, NCOL, NL, NODES,
                 R: tl.constexpr, RS: tl.constexpr, CP: tl.constexpr, HAS_VALID: tl.constexpr,
                 HAS_OFF: tl.constexpr, SPLIT: tl.constexpr, BT: tl.constexpr, D: tl.constexpr):
    """Sort keys of ``BT`` rows for every level: ``OUT[lvl, bh, MAP[lvl, t]] = node << (R+1) | gray_rank``.

    ``P`` ``[D, CP]`` packs the projections of all levels (level ``l`` in columns ``l*RS ..``), so one dot gives
    every level's signs. ``SPLIT``: x is fp16/bf16 and P holds the fp32 projections as three parts of x's dtype
    (hi + mid + lo): three tensor-core dots with fp32 accumulation give the fp32 product (the reference's
    ``x.float() @ proj`` up to summation order). Otherwise x and P are fp32 and the dot is IEEE fp32.
    ``MAP[0, lvl, t]`` is the compact slot of position t at that level (-1: not sorted there) and
    ``MAP[1, lvl, t]`` the index of its node (see plan.compact_maps). ``HAS_OFF`` (``center_keys``): the
    projection of each node's key mean, ``OFF[lvl, bh, node, :CP]``, is subtracted before the signs."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    hh = bh % H
    rows = pid * BT + tl.arange(0, BT)
    ok = rows < N
    dcol = tl.arange(0, D)
    x = tl.load(X + b.to(tl.int64) * sxb + hh.to(tl.int64) * sxh + rows[:, None].to(tl.int64) * sxn + dcol[None, :],
                mask=ok[:, None], other=0.0)
    col = tl.arange(0, CP)
    pp = P + dcol[:, None] * CP + col[None, :]
    if SPLIT:
        y = tl.dot(x, tl.load(pp))
        y = tl.dot(x, tl.load(pp + D * CP), y)
        y = tl.dot(x, tl.load(pp + 2 * D * CP), y)
    else:
        y = tl.dot(x.to(tl.float32), tl.load(pp), input_precision="ieee")
    pos = y > 0
    sub = col % RS
    wts = tl.where(sub < R, tl.full([CP], 1, tl.int32) << sub, 0)
    lvl_of = col // RS
    if HAS_VALID:
        valid = tl.load(VALID + b * N + rows, mask=ok, other=1)
    for lvl in range(NL):
        slot = tl.load(MAP + lvl * N + rows, mask=ok, other=-1)
        node = tl.load(MAP + NL * N + lvl * N + rows, mask=ok, other=0)
        if HAS_OFF:
            obase = (lvl * tl.num_programs(1) + bh).to(tl.int64) * NODES + node
            off = tl.load(OFF + obase[:, None] * CP + col[None, :], mask=ok[:, None], other=0.0)
            pos_l = (y - off) > 0
        else:
            pos_l = pos
        code = tl.sum(tl.where(pos_l & (lvl_of == lvl)[None, :], wts[None, :], 0), 1)
        rank = code
        for s in tl.static_range(1, R):
            rank = rank ^ (code >> s)
        if HAS_VALID:
            rank = tl.where(valid != 0, rank, 1 << R)
        key = (node << (R + 1)) | rank
        tl.store(OUT + (lvl * tl.num_programs(1) + bh).to(tl.int64) * NCOL + slot, key.to(OUT.dtype.element_ty),
                 mask=ok & (slot >= 0))


@triton.jit
def _perm_pos(PERM, off, mask, start, PERM16: tl.constexpr):
    """Original positions of a sort order's entries ``off``: node-local offsets (int16 read as unsigned when
    ``PERM16``, else int32) plus the node's first position ``start``."""
    p = tl.load(PERM + off, mask=mask, other=0).to(tl.int32)
    if PERM16:
        p = p & 0xFFFF
    return (p + start).to(tl.int64)


@triton.jit
def _in_exact_set(qpos, kpos, SINKS, WINDOW):
    """The estimator's exclusion (naive.exact_set_mask) for key positions before their queries: sinks or window."""
    return (kpos < SINKS) | (kpos > qpos - WINDOW)


@triton.jit
def _sample_chunk(SKD, SVD, SORIG, SBLK, b, kvh, bkv, node, NODES, M, start, m_cnt, blk, nv, qidx, SINKS, WINDOW,
                  EXCL: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    """Sampled keys ``[start, start + BN)`` of ``node`` for a query tile of sorted block ``blk``: ``(k, v, ok)``,
    ``ok`` ``[BM or 1, BN]`` the pairs that count (samples inside the tile's own block are left out, the own-block
    pass covers them; with the levers, so are exact-set pairs). K / V rows come from the gathered sample buffers."""
    j = start + tl.arange(0, BN)
    row = node * M + start
    k = SKD.load([b, kvh, row, 0]).reshape(BN, D)
    v = SVD.load([b, kvh, row, 0]).reshape(BN, D)
    sbase = (bkv.to(tl.int64) * NODES + node) * M
    jok = j < m_cnt
    sblk = tl.load(SBLK + sbase + j, mask=jok, other=-1)
    ok = (jok & (sblk != blk) & (nv > 0))[None, :]
    if EXCL:
        sidx = tl.load(SORIG + sbase + j, mask=jok, other=0)
        ok = ok & ~_in_exact_set(qidx[:, None], sidx[None, :], SINKS, WINDOW)
    return k, v, ok


@triton.jit
def _online_update(acc, m_i, l_i, s, v, PREC: tl.constexpr):
    """One online-softmax step; ``s`` in log2 units with masked entries at -inf (fully masked rows are safe)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _extra_cols(start, rows, lo, hi, SINKS, WINDOW, KVALID, b, N, HAS_VALID: tl.constexpr, BN: tl.constexpr):
    """Key positions ``start + [0, BN)`` of an exact-set chunk in ``[lo, hi)`` (before the leaf of the query
    rows ``rows``, original positions) and which (row, key) pairs are in the exact set: sinks ``j < SINKS`` or
    window ``j > i - WINDOW`` (always causal here: every key lies before every row's leaf)."""
    cols = start + tl.arange(0, BN)
    col_ok = (cols >= lo) & (cols < hi)
    if HAS_VALID:
        col_ok = col_ok & (tl.load(KVALID + b * N + cols, mask=col_ok, other=0) != 0)
    ok = col_ok[None, :] & ((cols[None, :] < SINKS) | (cols[None, :] > rows[:, None] - WINDOW))
    return cols, col_ok, ok


@triton.jit
def _diag_fwd_kernel(QD, KD, VD, O, LSE, KVALID, TILES, qk_scale, sob, soh, son, N, H, G, SINKS, WINDOW,
                     HAS_VALID: tl.constexpr, EXTRA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     D: tl.constexpr, PREC: tl.constexpr):
    """Exact causal attention inside one leaf for a BM-row query tile. ``EXTRA`` (sinks / local window): the
    tile also attends to the exact-set keys that lie *before* its leaf (sinks ``[0, min(SINKS, ls))`` and the
    band ``[max(SINKS, ls + off - WINDOW + 1), ls)``, masked per row); inside the leaf everything is exact
    anyway, and the estimator passes exclude these pairs, so the leaf pass is where the exact set lands.
    Q, K, V are tensor descriptors (one TMA copy a tile on Hopper): rows of the next leaf that a tile reads past its
    own are masked out of the scores, rows past ``N`` read as zeros."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b32, h32 = bh // H, bh % H  # descriptor coordinates are 32-bit
    kvh = h32 // G
    b, hh = b32.to(tl.int64), h32.to(tl.int64)
    leaf_start = tl.load(TILES + tile * 3)
    leaf_len = tl.load(TILES + tile * 3 + 1)
    off = tl.load(TILES + tile * 3 + 2)
    rows = off + tl.arange(0, BM)
    row_ok = rows < leaf_len
    dcol = tl.arange(0, D)
    q = QD.load([b32, h32, leaf_start + off, 0]).reshape(BM, D)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    if EXTRA:
        grows = leaf_start + rows
        hi = tl.minimum(SINKS, leaf_start)
        for start in range(0, hi, BN):  # sinks before the leaf
            cols, col_ok, ok = _extra_cols(start, grows, 0, hi, SINKS, WINDOW, KVALID, b, N, HAS_VALID, BN)
            k = KD.load([b32, kvh, start, 0]).reshape(BN, D)  # keys outside [0, hi) are masked out of s
            v = VD.load([b32, kvh, start, 0]).reshape(BN, D)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            s = tl.where(ok, s, float("-inf"))
            acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, PREC)
        lo = tl.maximum(SINKS, leaf_start + off - WINDOW + 1)
        for start in range(lo, leaf_start, BN):  # local-window band before the leaf
            cols, col_ok, ok = _extra_cols(start, grows, lo, leaf_start, SINKS, WINDOW, KVALID, b, N, HAS_VALID, BN)
            k = KD.load([b32, kvh, start, 0]).reshape(BN, D)
            v = VD.load([b32, kvh, start, 0]).reshape(BN, D)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            s = tl.where(ok, s, float("-inf"))
            acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, PREC)
    # keys strictly before the tile: no causal mask (off is a multiple of BM and BN divides BM)
    for start in range(0, off, BN):
        cols = start + tl.arange(0, BN)
        k = KD.load([b32, kvh, leaf_start + start, 0]).reshape(BN, D)
        v = VD.load([b32, kvh, leaf_start + start, 0]).reshape(BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if HAS_VALID:
            kv = tl.load(KVALID + b * N + leaf_start + cols)
            s = tl.where(kv[None, :] != 0, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, PREC)
    # the diagonal tile
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
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, PREC)
    l_ok = l_i > 0
    l_use = tl.where(l_ok, l_i, 1.0)
    o = acc / l_use[:, None]
    lse = tl.where(l_ok, (m_i + tl.math.log2(l_use)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * sob + hh * soh + (leaf_start + rows)[:, None].to(tl.int64) * son + dcol[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * N + leaf_start + rows, lse, mask=row_ok)


@triton.jit
def _level_fwd_kernel(Q, K, V, O, LSE, QPERM, KPERM, NS, TILES, NVALID, SORIG, SBLK, SBIAS, SKD, SVD, qk_scale,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                      N, NC, H, HK, G, NODES, M, SINKS, WINDOW,
                      FIRST: tl.constexpr, EXCL: tl.constexpr, QPERM16: tl.constexpr, KPERM16: tl.constexpr,
                      SAMPLE_STAGES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                      PREC: tl.constexpr):
    """One level for a BM-row tile of sorted queries (see the module docstring); ``SKD`` / ``SVD`` are the level's
    sampled keys / values gathered into ``[b, hk, nodes * M, d]`` (``ops._sample_rows``), so the sample loop reads
    contiguous tiles (TMA on Hopper) instead of gathering through the sample positions, which would make its loads
    wait on an index load every step."""
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
    qidx = _perm_pos(QPERM, bh.to(tl.int64) * NC + q_start + r, row_ok, tl.load(NS + node), QPERM16)
    ks0 = tl.load(NS + NODES + node)
    b64 = b.to(tl.int64)
    q = tl.load(Q + b64 * sqb + hh.to(tl.int64) * sqh + qidx[:, None] * sqn + dcol[None, :],
                mask=row_ok[:, None], other=0.0)
    o_ptr = O + b64 * sob + hh.to(tl.int64) * soh + qidx[:, None] * son + dcol[None, :]
    lse_ptr = LSE + bh.to(tl.int64) * N + qidx
    if FIRST:
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
    else:
        lse_prev = tl.load(lse_ptr, mask=row_ok, other=float("-inf"))
        m_i = lse_prev * 1.4426950408889634
        l_i = tl.where(lse_prev == float("-inf"), 0.0, 1.0)
        acc = tl.load(o_ptr, mask=row_ok[:, None], other=0.0).to(tl.float32)
    nv = tl.load(NVALID + b * NODES + node)
    kb = K + b64 * skb + kvh.to(tl.int64) * skh
    vb = V + b64 * svb + kvh.to(tl.int64) * svh
    kperm = KPERM + bkv.to(tl.int64) * NC
    # Keys of the query's own sorted block (invalid keys are sorted to the end of the node: pos >= n_valid),
    # then the sampled keys (own block excluded, each weighted by n_valid / m). Two plain loops: one merged loop
    # over both lists (a select per chunk) measured 24% slower on the H200 (17.1 vs 13.8 ms over 5 levels, 131k).
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
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, PREC)
    bias = tl.load(SBIAS + b * NODES + node) * 1.4426950408889634
    for start in tl.range(0, m_cnt, BN, num_stages=SAMPLE_STAGES):
        k, v, ok = _sample_chunk(SKD, SVD, SORIG, SBLK, b, kvh, bkv, node, NODES, M, start, m_cnt, blk, nv, qidx,
                                 SINKS, WINDOW, EXCL, BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale + bias
        s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, PREC)
    l_ok = l_i > 0
    l_use = tl.where(l_ok, l_i, 1.0)
    o = acc / l_use[:, None]
    lse = tl.where(l_ok, (m_i + tl.math.log2(l_use)) * 0.6931471805599453, float("-inf"))
    tl.store(o_ptr, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr, lse, mask=row_ok)

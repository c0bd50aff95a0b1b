"""Host side of the Triton HyperAttention: launches, the autograd Function and the public Triton entry point.

``hyper_attention_triton(q, k, v, scaling, settings, causal=..., key_valid=...)`` has the reference's signature
(minus softcap) and returns ``(out [b,h,n,d] in q's dtype, lse [b,h,n] fp32)``; both are differentiable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .. import alert_nondeterministic
from ..descriptors import row_tiles
from . import plan as P
from .naive import HyperSettings
from .plan import SUPPORTED_HEAD_DIMS
from .triton_bwd import (
    _bwd_pre_kernel,
    _diag_dkdv_kernel,
    _diag_dq_kernel,
    _extra_dkdv_kernel,
    _level_dkdv_kernel,
    _level_dkdv_samples_kernel,
    _level_dq_kernel,
    _widen_kernel,
)
from .triton_fwd import _diag_fwd_kernel, _hash_kernel, _level_fwd_kernel


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes (rows of queries BM / keys BN), warps and pipeline stages of every kernel."""
    fwd_bm: int = 128
    fwd_bn: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    lvl_bm: int = 128
    lvl_bn: int = 64
    lvl_warps: int = 8
    lvl_stages: int = 3
    dq_bm: int = 64
    dq_bn: int = 64
    dq_warps: int = 4
    dkdv_bm: int = 64
    dkdv_bn: int = 64
    dkdv_warps: int = 4
    bwd_stages: int = 2
    sample_split: int = 4096  # query rows (all heads of a group together) per sampled-key dK/dV program
    hash_rows: int = 128
    hash_warps: int = 8
    # Backward: the fp32 dQ/dK/dV accumulators of the level passes cover only a chunk of KV heads (and batch rows)
    # at a time, at most this many MiB together (at least one KV head of one row); the final gradients are written
    # in the input dtype. 131k, h=32, d=128: 5 KV heads per chunk, 0.94 GiB instead of 6 GiB for all heads. With
    # cuDNN leaves, its leaf gradients come a quarter of this budget at a time.
    acc_budget_mb: int = 1024
    # Sort orders as int16 node-local offsets where every node is <= 65536 long (else int32). The query orders are
    # read once per tile in the forward (the level dK/dV pass, which reads them inside its loop, gets an int32 copy
    # of each level's slice); the key orders are read inside the level loops, where an int16 load (under 4 bytes a
    # thread) is not pipelined and stalls every step. int32 key orders, for 20 MiB more at 131k (an int32 per key,
    # KV head and level), measured at d=128, h=32 on the H200: forward 22.0 vs 22.7 ms at 131k and 4.30 vs 4.44 ms
    # at 32k (results/hyper_fwd_variants.json), fwd+bwd 118.4 vs 127.0 ms at 131k (with 32-key level tiles,
    # results/hyper_level_fwd_ab.json).
    qperm16: bool = True
    kperm16: bool = False
    # Pipeline stages of the loops over the gathered sample buffers (their tiles need no index load); 2 keeps the
    # d=128 forward at two programs per SM.
    sample_stages: int = 2
    # The level passes read each level's sampled keys and values from buffers gathered per KV head (``[b, hk,
    # nodes * sample_size, d]``); the forward gathers them for at most this many MiB of KV heads at a time.
    sample_budget_mb: int = 16


def default_config(d: int) -> KernelConfig:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # CPU interpreter: few, large numpy ops are what is fast there
        return KernelConfig(64, 32, 4, 1, 64, 32, 4, 1, 32, 32, 4, 32, 32, 4, 1, 256, 64, 4)
    if d <= 64:
        return KernelConfig(128, 64, 4, 3, 64, 64, 4, 3, 64, 64, 4, 32, 64, 4, 3)
    if d <= 128:  # picked by scripts/bench_hyper.py --sweep on the H200 (n=32k), level tiles re-checked with the
        # gathered sample buffers (results/hyper_level_fwd_ab.json: key tiles of 32 lose 2 ms at 131k)
        return KernelConfig(128, 64, 8, 3, 64, 64, 4, 3, 64, 64, 4, 32, 64, 4, 3)
    return KernelConfig(64, 32, 8, 2, 64, 32, 8, 2, 32, 32, 4, 32, 32, 8, 1)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else None  # fp32 only for exactness tests: no TF32


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _rowmajor(x):
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass
class _State:
    plan: P.Plan
    settings: HyperSettings
    cfg: KernelConfig
    scaling: float
    qperm: torch.Tensor | None  # [levels, b, h, ncols] node-local offsets, int16 (qperm16) or int32
    kperm: torch.Tensor | None  # [levels, b, hk, ncols], int16 (kperm16) or int32
    levels: list  # LevelData per level
    kvalid: torch.Tensor | None  # [b, n] int8
    qperm16: bool = False
    kperm16: bool = False
    cudnn_rng: tuple | None = None  # the leaves' cuDNN forward (philox seed, offset); None: Triton leaves


def _levers(settings: HyperSettings):
    """``(sinks, window, on)``: the exact-set levers as kernel arguments."""
    s, w = int(settings.sink_tokens), int(settings.local_window)
    return s, w, bool(s or w)


def _perm16(plan, cfg, role) -> bool:
    """Whether the query (``role="q"``) or key (``"k"``) sort orders are stored as int16."""
    return bool((cfg.qperm16 if role == "q" else cfg.kperm16) and P.perm16_ok(plan))


def _head_chunks(b, hk, unit_bytes, budget_mb):
    """``(b0, b1, kv0, kv1)`` pieces whose per-KV-head buffers (``unit_bytes`` each) fit ``budget_mb``: whole batch
    rows where they fit, else KV-head ranges of one row (the kernels index ``[b, heads, ...]`` rows of a piece as
    one contiguous block, which holds for both shapes)."""
    units = max(1, int(budget_mb * 2**20) // max(1, unit_bytes))
    if units >= b * hk:
        return [(0, b, 0, hk)]
    if units >= hk:
        nb = units // hk
        return [(b0, min(b, b0 + nb), 0, hk) for b0 in range(0, b, nb)]
    c = -(-hk // -(-hk // units))  # balanced: ceil(hk / number of chunks)
    return [(bi, bi + 1, k0, min(hk, k0 + c)) for bi in range(b) for k0 in range(0, hk, c)]


def _sample_rows(k, v, sorig, bn):
    """Descriptors of a level's sampled keys and values gathered into ``[b, hk, nodes * m, d]`` (``sorig`` ``[b, hk,
    nodes, m]`` original positions), loaded as ``bn``-row tiles. Returns ``(kd, vd)``; each keeps its buffer alive."""
    b, hk, _, d = k.shape
    idx = sorig.reshape(b, hk, -1, 1).long().expand(-1, -1, -1, d)
    return row_tiles(k.gather(2, idx), bn), row_tiles(v.gather(2, idx), bn)


def _perm32(perm, perm16):
    """A sort order as int32 node-local offsets (int16 ones read as unsigned): kernels that load it inside their
    loops pipeline int32 loads, not int16 ones."""
    return perm.to(torch.int32) & 0xFFFF if perm16 else perm


def _query_blocks(qperm32, plan, li):
    """``[b, h, ncols]`` int32: the sorted block (inside its node) of each of a level's queries, the columns in
    original order (column ``cqs + offset`` holds the node's query at that offset); ``qperm32`` is the level's
    query sort order ``[b, h, ncols]`` from ``_perm32``. The sampled-key dK/dV kernel reads its queries in
    original order."""
    dev = qperm32.device
    first, bq = P.query_columns(plan, li, dev)
    cols = torch.arange(plan.ncols, device=dev)
    blocks = ((cols - first) // bq).to(torch.int32).expand(qperm32.shape)
    return torch.empty(qperm32.shape, dtype=torch.int32, device=dev).scatter_(-1, first + qperm32.long(), blocks)


def _hash_sort(x, plan, settings, valid, cfg, role, key_valid=None):
    """Every level's sorted order of the queries (``role="q"``) or keys (``"k"``) of ``x [b, heads, n, d]``:
    ``[levels, b, heads, ncols]`` node-local offsets (original position minus the node's first one), each node's
    range sorted by (stable) Gray rank; int16 (read back as unsigned) when every node is <= 65536 long, else int32.
    """
    b, hh, n, d = x.shape
    proj, stride = P.projections(plan, d, settings.lsh_num_projs, settings.seed, x.device)
    cp = proj.shape[-1]
    off = None
    if role == "k" and settings.center_keys:
        off = P.centring_offsets(plan, x, key_valid, proj)
    split = x.dtype in (torch.float16, torch.bfloat16)
    if split:
        proj = P.split_projections(proj, x.dtype)
    qmap, kmap, _, _, node_bits = P.compact_maps(plan, x.device)
    qback, kback = P.back_maps(plan, torch.int16 if _perm16(plan, cfg, role) else torch.int32, x.device)
    cmap, back = (qmap, qback) if role == "q" else (kmap, kback)
    bits = node_bits + settings.lsh_num_projs + 1
    kdt, top = (torch.int16, 2**15 - 1) if bits <= 15 else (torch.int32, 2**31 - 1)
    nl, nc = len(plan.levels), plan.ncols
    keys = torch.full((nl, b, hh, nc), top, dtype=kdt, device=x.device)  # padding sorts last, never read
    bt = cfg.hash_rows
    _hash_kernel[(triton.cdiv(n, bt), b * hh)](
        x, proj, cmap, valid if valid is not None else cmap, off if off is not None else proj, keys, *_strides(x),
        n, hh, nc, nl, off.shape[2] if off is not None else 1,
        R=settings.lsh_num_projs, RS=stride, CP=cp, HAS_VALID=valid is not None, HAS_OFF=off is not None,
        SPLIT=split, BT=bt, D=d, num_warps=cfg.hash_warps)
    del off
    order = torch.sort(keys, dim=-1, stable=True).indices
    del keys
    return torch.gather(back[:, None, None, :].expand(nl, b, hh, nc), -1, order)


def hyper_forward(q, k, v, scaling, settings: HyperSettings, causal: bool, key_valid=None, cfg=None,
                  diag_impl: str = "triton"):
    """Returns ``(out, lse, state)``; ``state`` is what the backward needs."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    g = h // hk
    cfg = cfg or default_config(d)
    assert cfg.fwd_bm % cfg.fwd_bn == 0
    plan = P.make_plan(n, settings.block_size, settings.min_seq_len, causal)
    dev = q.device
    kvalid = None if key_valid is None else key_valid.to(torch.int8).contiguous()
    prec = _prec(q.dtype)
    qk_scale = scaling * 1.4426950408889634
    sinks, window, levers = _levers(settings)
    if levers and not causal:
        raise ValueError("sink_tokens / local_window are causal-only levers")
    extra = levers and len(plan.leaves) > 1  # exact-set keys before a leaf exist only past the first leaf
    if extra:
        diag_impl = "triton"  # the leaf pass also carries the exact set (cuDNN cannot mask it)
    qperm16, kperm16 = _perm16(plan, cfg, "q"), _perm16(plan, cfg, "k")
    qperm = kperm = None
    if plan.levels:  # sorts first: their temporaries are gone before the outputs exist (lower peak memory)
        qperm = _hash_sort(q, plan, settings, None, cfg, "q")
        kperm = _hash_sort(k, plan, settings, kvalid, cfg, "k", key_valid)
    out = lse = cudnn_rng = None
    if plan.leaves and diag_impl in ("cudnn", "auto"):
        try:
            out, lse, cudnn_rng = _diag_cudnn(q, k, v, plan, scaling)
        except RuntimeError:
            if diag_impl == "cudnn":
                raise
    if out is None:
        out = torch.empty(b, h, n, d, dtype=q.dtype, device=dev)
        lse = torch.empty(b, h, n, dtype=torch.float32, device=dev)
        if plan.leaves:
            tiles = P.diag_tiles(plan, cfg.fwd_bm, True, dev)
            _diag_fwd_kernel[(tiles.shape[0], b * h)](
                row_tiles(q, cfg.fwd_bm), row_tiles(k, cfg.fwd_bn), row_tiles(v, cfg.fwd_bn), out, lse,
                kvalid if kvalid is not None else tiles, tiles, qk_scale, *_strides(out), n, h, g, sinks, window,
                HAS_VALID=kvalid is not None, EXTRA=extra, BM=cfg.fwd_bm, BN=cfg.fwd_bn, D=d, PREC=prec,
                num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
    levels = []
    for li in range(len(plan.levels)):
        ld = P.level_data(plan, li, kperm[li], settings, key_valid, hk)
        levels.append(ld)
        tiles = P.query_tiles(plan, li, cfg.lvl_bm, settings.sample_size, dev)
        nodes, m = len(plan.levels[li].nodes), ld.sorig.shape[-1]
        for b0, b1, k0, k1 in _head_chunks(b, hk, 2 * nodes * m * d * k.element_size(), cfg.sample_budget_mb):
            h0, h1 = k0 * g, k1 * g
            qc, kc, vc, oc = q[b0:b1, h0:h1], k[b0:b1, k0:k1], v[b0:b1, k0:k1], out[b0:b1, h0:h1]
            sorig = ld.sorig[b0:b1, k0:k1]
            _level_fwd_kernel[(tiles.shape[0], (b1 - b0) * (h1 - h0))](
                qc, kc, vc, oc, lse[b0:b1, h0:h1], qperm[li, b0:b1, h0:h1], kperm[li, b0:b1, k0:k1],
                P.node_starts(plan, li, dev), tiles, ld.nvalid[b0:b1], sorig, ld.sblk[b0:b1, k0:k1], ld.sbias[b0:b1],
                *_sample_rows(kc, vc, sorig, cfg.lvl_bn), qk_scale,
                *_strides(qc), *_strides(kc), *_strides(vc), *_strides(oc), n, plan.ncols, h1 - h0, k1 - k0, g, nodes,
                m, sinks, window, FIRST=(not plan.leaves and li == 0), EXCL=levers, QPERM16=qperm16,
                KPERM16=kperm16, SAMPLE_STAGES=cfg.sample_stages, BM=cfg.lvl_bm, BN=cfg.lvl_bn, D=d, PREC=prec,
                num_warps=cfg.lvl_warps, num_stages=cfg.lvl_stages)
    state = _State(plan, settings, cfg, scaling, qperm, kperm, levels, kvalid, qperm16, kperm16, cudnn_rng)
    return out, lse, state


def _leaf_view(x, plan):
    """``[b, heads, n, d]`` (contiguous) as ``[b, heads * leaves, leaf, d]``: one cuDNN head per (head, leaf)."""
    nl, m = len(plan.leaves), plan.leaves[0][1]
    return x.view(x.shape[0], x.shape[1] * nl, m, x.shape[-1])


def _diag_cudnn(q, k, v, plan, scaling):
    """Exact leaves through cuDNN SDPA (equal leaves, MHA, no padding) on the leaf views, so no copies; returns
    the running ``(out, lse)`` and the forward's philox ``(seed, offset)`` for the backward."""
    b, h, n, d = q.shape
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(*(_leaf_view(x, plan) for x in (q, k, v)), None, True,
                                                              0.0, True, False, scale=scaling)
    return res[0].reshape(b, h, n, d), res[1].reshape(b, h, n).float().contiguous(), (res[6], res[7])


def _leaf_grads_cudnn(accs, q, k, v, out, lse, dout, plan, scaling, rng, budget_mb):
    """Writes the exact leaves' share of dQ, dK, dV into the fp32 accumulators ``accs`` (their starting values)
    through cuDNN's SDPA backward, on ``[b, heads, n, d]`` chunks (contiguous, MHA). Given the *final* out and lse,
    cuDNN's probabilities exp(s - lse) and its rowsum(dO * O) are the whole estimator's, so what it returns is
    exactly the leaves' part of the gradient (the way ring attention combines blocks); a gradient through the lse
    output is not expressible there (the caller keeps Triton leaves for that). cuDNN's gradients and its fp32 dQ
    workspace cover at most ``budget_mb`` of heads at a time."""
    b, h, n, d = q.shape
    m = plan.leaves[0][1]
    for b0, b1, h0, h1 in _head_chunks(b, h, n * d * (3 * q.element_size() + 4), budget_mb):
        views = [_leaf_view(x[b0:b1, h0:h1], plan) for x in (dout, q, k, v, out)]
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            *views, lse[b0:b1, h0:h1].reshape(views[1].shape[:3] + (1,)), rng[0], rng[1], None, None, None, m, m,
            0.0, True, scale=scaling)
        for acc, grad in zip(accs, grads):
            _widen_kernel[(triton.cdiv(grad.numel(), 4096),)](grad, acc[b0:b1, h0:h1], grad.numel(), BLOCK=4096,
                                                              num_warps=8)


def hyper_backward(q, k, v, out, lse, dout, dlse, st: _State):
    b, h, n, d = q.shape
    hk = k.shape[1]
    g = h // hk
    cfg, plan = st.cfg, st.plan
    dev = q.device
    prec = _prec(q.dtype)
    sm_scale = st.scaling
    qk_scale = sm_scale * 1.4426950408889634
    has_acc = bool(plan.levels)
    if has_acc:  # the sampled keys' dK/dV is added atomically (samples are shared by every block of a node)
        alert_nondeterministic("HyperAttention's Triton backward")
    # leaves from cuDNN in the forward: their gradients from cuDNN too (measured faster than ours on the H200),
    # as the accumulators' starting values, unless a gradient flows into the lse output
    cudnn_leaves = st.cudnn_rng is not None and dlse is None and has_acc
    dout = dout.contiguous() if cudnn_leaves else _rowmajor(dout)
    delta = torch.empty(b, h, n, dtype=torch.float32, device=dev)
    bt = 64
    _bwd_pre_kernel[(triton.cdiv(n, bt), b * h)](
        out, dout, dlse if dlse is not None else delta, delta, *_strides(out), *_strides(dout), n, h,
        HAS_DLSE=dlse is not None, BT=bt, D=d, num_warps=4)
    sinks, window, levers = _levers(st.settings)
    extra = levers and len(plan.leaves) > 1
    assert has_acc or not extra
    dq = torch.empty(b, h, n, d, dtype=q.dtype, device=dev)
    dk = torch.empty(b, hk, n, d, dtype=k.dtype, device=dev)
    dv = torch.empty(b, hk, n, d, dtype=v.dtype, device=dev)
    chunks = _head_chunks(b, hk, (g + 2) * n * d * 4, cfg.acc_budget_mb) if has_acc else [(0, b, 0, hk)]
    if has_acc:  # one flat fp32 buffer for the largest chunk, reused (zeroed) by every chunk
        units = max((b1 - b0) * (k1 - k0) for b0, b1, k0, k1 in chunks)
        buf = torch.empty(units * (g + 2) * n * d, dtype=torch.float32, device=dev)
        # the dQ pass's sorted copies of each level's queries, read by the dK/dV pass; zeros to start with, so the
        # rows a tile reads past its block are finite (then always some level's data)
        qrows = units * g * plan.ncols
        sorted_q = torch.zeros(qrows * d, dtype=q.dtype, device=dev)
        sorted_do = torch.zeros(qrows * d, dtype=dout.dtype, device=dev)
        sorted_stats = torch.zeros(2 * qrows, dtype=torch.float32, device=dev)
    split = max(cfg.dkdv_bm, (cfg.sample_split // g) // cfg.dkdv_bm * cfg.dkdv_bm)
    for b0, b1, k0, k1 in chunks:
        cb, ck = b1 - b0, k1 - k0
        ch, h0, h1 = ck * g, k0 * g, k1 * g
        qc, kc, vc, doc = q[b0:b1, h0:h1], k[b0:b1, k0:k1], v[b0:b1, k0:k1], dout[b0:b1, h0:h1]
        lsec, deltac = lse[b0:b1, h0:h1], delta[b0:b1, h0:h1]
        kv = None if st.kvalid is None else st.kvalid[b0:b1]
        dqc, dkc, dvc = dq[b0:b1, h0:h1], dk[b0:b1, k0:k1], dv[b0:b1, k0:k1]
        sd = (*_strides(qc), *_strides(kc), *_strides(vc), *_strides(doc))
        if has_acc:
            m_q, m_k = cb * ch * n * d, cb * ck * n * d
            dqa = buf[:m_q].view(cb, ch, n, d)
            dka = buf[m_q: m_q + m_k].view(cb, ck, n, d)
            dva = buf[m_q + m_k: m_q + 2 * m_k].view(cb, ck, n, d)
            if cudnn_leaves:  # the levels accumulate onto the leaves' gradients
                _leaf_grads_cudnn((dqa, dka, dva), qc, kc, vc, out[b0:b1, h0:h1], lsec, doc, plan, sm_scale,
                                  st.cudnn_rng, cfg.acc_budget_mb / 4)
            else:
                buf[: m_q + 2 * m_k].zero_()
            rows = cb * ch * plan.ncols
            qs_c = sorted_q[: rows * d].view(cb, ch, plan.ncols, d)
            dos_c = sorted_do[: rows * d].view(cb, ch, plan.ncols, d)
            ls2_c, ds_c = sorted_stats[:rows], sorted_stats[rows: 2 * rows]
            qs_tiles, dos_tiles = row_tiles(qs_c, cfg.dkdv_bm), row_tiles(dos_c, cfg.dkdv_bm)
            for li, ld in enumerate(st.levels):
                nodes = len(plan.levels[li].nodes)
                m = ld.sorig.shape[-1]
                ns = P.node_starts(plan, li, dev)
                qperm, kperm = st.qperm[li, b0:b1, h0:h1], st.kperm[li, b0:b1, k0:k1]
                qperm32 = _perm32(qperm, st.qperm16)  # for the levers' mask and the sampled keys' query blocks
                nvalid, sbias = ld.nvalid[b0:b1], ld.sbias[b0:b1]
                sorig, sblk = ld.sorig[b0:b1, k0:k1], ld.sblk[b0:b1, k0:k1]
                qt = P.query_tiles(plan, li, cfg.dq_bm, st.settings.sample_size, dev)
                _level_dq_kernel[(qt.shape[0], cb * ch)](
                    qc, kc, vc, doc, lsec, deltac, dqa, qs_c, dos_c, ls2_c, ds_c, qperm, kperm, ns, qt, nvalid, sorig,
                    sblk, sbias,
                    *_sample_rows(kc, vc, sorig, cfg.dq_bn), sm_scale, qk_scale, *sd, n, plan.ncols, ch, ck, g, nodes,
                    m, sinks, window, EXCL=levers, QPERM16=st.qperm16, KPERM16=st.kperm16,
                    SAMPLE_STAGES=cfg.sample_stages, BM=cfg.dq_bm, BN=cfg.dq_bn, D=d, PREC=prec,
                    num_warps=cfg.dq_warps, num_stages=cfg.bwd_stages)
                kt = P.key_tiles(plan, li, cfg.dkdv_bn, dev)
                if kt.shape[0]:
                    _level_dkdv_kernel[(kt.shape[0], cb * ck)](
                        qs_tiles, dos_tiles, ls2_c, ds_c, kc, vc, dka, dva, qperm32, kperm, ns, kt, nvalid,
                        sm_scale, qk_scale, *_strides(kc), *_strides(vc), n,
                        plan.ncols, ch, ck, g, nodes, sinks, window,
                        EXCL=levers, KPERM16=st.kperm16, BM=cfg.dkdv_bm, BN=cfg.dkdv_bn, D=d,
                        PREC=prec, num_warps=cfg.dkdv_warps, num_stages=cfg.bwd_stages)
                stl = P.sample_tiles(plan, li, cfg.dkdv_bn, split, st.settings.sample_size, dev)
                if stl.shape[0]:
                    _level_dkdv_samples_kernel[(stl.shape[0], cb * ck)](
                        row_tiles(qc, cfg.dkdv_bm), kc, vc, row_tiles(doc, cfg.dkdv_bm), lsec, deltac, dka, dva,
                        _query_blocks(qperm32, plan, li), ns, stl, nvalid, sorig, sblk, sbias,
                        sm_scale, qk_scale, *_strides(kc), *_strides(vc), n, plan.ncols, ch, ck, g, nodes, m, sinks,
                        window, EXCL=levers, BM=cfg.dkdv_bm, BN=cfg.dkdv_bn, D=d, PREC=prec,
                        num_warps=cfg.dkdv_warps, num_stages=cfg.bwd_stages)
            if extra:
                et = P.extra_key_tiles(plan, sinks, window, cfg.dkdv_bn, split, dev)
                if et.shape[0]:
                    _extra_dkdv_kernel[(et.shape[0], cb * ck)](
                        qc, kc, vc, doc, lsec, deltac, dka, dva, kv if kv is not None else et, et,
                        sm_scale, qk_scale, *sd, n, ch, ck, g, sinks, window,
                        HAS_VALID=kv is not None, BM=cfg.dkdv_bm, BN=cfg.dkdv_bn, D=d, PREC=prec,
                        num_warps=cfg.dkdv_warps, num_stages=cfg.bwd_stages)
        if plan.leaves and not cudnn_leaves:
            assert cfg.dq_bm % cfg.dq_bn == 0
            qt = P.diag_tiles(plan, cfg.dq_bm, True, dev)
            _diag_dq_kernel[(qt.shape[0], cb * ch)](
                row_tiles(qc, cfg.dq_bm), row_tiles(kc, cfg.dq_bn), row_tiles(vc, cfg.dq_bn), row_tiles(doc, cfg.dq_bm),
                lsec, deltac, dqa if has_acc else dqc, dqc, kv if kv is not None else qt, qt,
                sm_scale, qk_scale, n, ch, g, sinks, window,
                HAS_ACC=has_acc, HAS_VALID=kv is not None, EXTRA=extra, BM=cfg.dq_bm, BN=cfg.dq_bn, D=d,
                PREC=prec, num_warps=cfg.dq_warps, num_stages=cfg.bwd_stages)
            kt = P.diag_tiles(plan, cfg.dkdv_bn, False, dev)
            _diag_dkdv_kernel[(kt.shape[0], cb * ck)](
                row_tiles(qc, cfg.dkdv_bm), row_tiles(kc, cfg.dkdv_bn), row_tiles(vc, cfg.dkdv_bn),
                row_tiles(doc, cfg.dkdv_bm), lsec, deltac, dka if has_acc else dkc, dva if has_acc else dvc, dkc, dvc,
                kv if kv is not None else kt, kt, sm_scale, qk_scale, n, ch, ck, g,
                HAS_ACC=has_acc, HAS_VALID=kv is not None, BM=cfg.dkdv_bm, BN=cfg.dkdv_bn, D=d, PREC=prec,
                num_warps=cfg.dkdv_warps, num_stages=cfg.bwd_stages)
        else:  # no leaves, or cuDNN's: the accumulated gradients in the input dtype
            dqc.copy_(dqa)
            dkc.copy_(dka)
            dvc.copy_(dva)
    return dq, dk, dv


class HyperAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scaling, settings, causal, key_valid, cfg, diag_impl):
        out, lse, st = hyper_forward(q, k, v, scaling, settings, causal, key_valid, cfg, diag_impl)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.st = st
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dlse = None if dlse is None else dlse.float().contiguous()
        dq, dk, dv = hyper_backward(q, k, v, out, lse, dout, dlse, ctx.st)
        return dq, dk, dv, None, None, None, None, None, None


def hyper_attention_triton(q, k, v, scaling=None, settings: HyperSettings = HyperSettings(), *, causal=True,
                           key_valid=None, config: KernelConfig | None = None, diag_impl: str = "auto"):
    """Triton HyperAttention. q ``[b, h, n, d]``, k/v ``[b, hk, n, d]``; returns ``(out, lse)`` like the reference.

    ``diag_impl``: who computes the exact causal leaves. ``"auto"`` (default) takes cuDNN SDPA where it applies
    (CUDA, fp16/bf16, MHA, no key padding, contiguous inputs, equal leaves) and the Triton kernel otherwise;
    measured on the H200 at d=128, cuDNN on the leaves is ~15% faster than ours (see scripts/bench_hyper.py
    --profile), and the leaf outputs become the running (out, lse) without copies; the backward then takes the
    leaves' gradients from cuDNN's SDPA backward too (unless a gradient flows into the returned lse), ~10% faster
    forward+backward at 32k-131k (benchmarks/results/hyper_cudnn_leaf_bwd.json). ``"triton"`` forces ours.
    With ``sink_tokens`` / ``local_window`` (past the first leaf) the leaves are always ours: the exact set
    (sinks + causal band) rides in that pass."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if k.shape[2] != n or v.shape[-1] != d or d not in SUPPORTED_HEAD_DIMS:
        raise ValueError("Triton HyperAttention needs nq == nk, equal q/v head dims in " + str(SUPPORTED_HEAD_DIMS))
    scaling = d**-0.5 if scaling is None else float(scaling)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    if settings.sink_tokens or settings.local_window:
        if not causal:
            raise ValueError("sink_tokens / local_window are causal-only levers")
        if len(P.make_plan(n, settings.block_size, settings.min_seq_len, causal).leaves) > 1:
            diag_impl = "triton"  # the exact set rides in the Triton leaf pass
    if diag_impl in ("cudnn", "auto"):
        leaves = P.make_plan(n, settings.block_size, settings.min_seq_len, causal).leaves
        if not (q.is_cuda and key_valid is None and hk == h and q.is_contiguous() and k.is_contiguous()
                and v.is_contiguous() and q.dtype != torch.float32 and len({m for _, m in leaves}) == 1):
            diag_impl = "triton"
    return HyperAttentionFn.apply(q, k, v, scaling, settings, causal, key_valid, config, diag_impl)


__all__ = ["hyper_attention_triton", "HyperAttentionFn", "KernelConfig", "default_config", "hyper_forward",
           "hyper_backward", "SUPPORTED_HEAD_DIMS"]

"""Host-side plan of the flattened HyperAttention recursion (shared by the Triton forward and backward).

The causal reference (``naive.hyper_attention_causal``) halves the sequence recursively. Unrolled, it is:
  * leaves: contiguous segments of length <= ``min_seq_len`` with exact causal attention inside each;
  * nodes: for every internal segment ``[s, s+n)`` at recursion level ``L`` (``h = n // 2``), the queries
    ``[s+h, s+n)`` attend the keys ``[s, s+h)`` through the non-causal estimator with level ``L``'s seeds.
Every query's output is the LSE-merge of its leaf part and one part per level where it sits in a second half. The
merge is associative, so the kernels fold all parts into one online softmax per query (diagonal first, then one
launch per level that reads the running (out, lse) of its queries, continues the softmax and writes it back).

Sorting: at level ``L`` every position gets a segment id that increases along the sequence (one id per node half
and per uncovered gap), and the sort key is ``seg << (r+1) | gray_rank``. A stable sort of the whole row then sorts
each node half by rank *inside its own position range*, exactly like the reference's per-node stable sorts.

Everything here depends only on the shapes and the settings (not on the data) and is cached.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .naive import HyperSettings, lsh_projections, sample_positions

#: head dims the Triton kernels are built for (tile shapes are powers of two)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)

# HyperSettings fields the kernels implement; any other field must be at an "off" value (0/None/False) for the
# Triton path to be taken (the reference may grow quality options the kernels do not know yet).
KERNEL_FIELDS = ("lsh_num_projs", "block_size", "sample_size", "min_seq_len", "seed", "sink_tokens", "local_window",
                 "center_keys")


def settings_supported(settings: HyperSettings) -> bool:
    for f in dataclasses.fields(settings):
        if f.name not in KERNEL_FIELDS and getattr(settings, f.name):
            return False
    return (settings.lsh_num_projs <= 16 and settings.block_size >= 1 and settings.min_seq_len >= 1
            and settings.sink_tokens >= 0 and settings.local_window >= 0)


@dataclass(frozen=True)
class Node:
    """One off-diagonal estimator: queries ``[qs, qs+nq)`` attend keys ``[ks, ks+nk)`` (original positions); in
    the level's compact sorted rows they sit at ``[cqs, cqs+nq)`` and ``[cks, cks+nk)``."""
    qs: int
    nq: int
    ks: int
    nk: int
    num_blocks: int
    bq: int
    bk: int
    cqs: int = 0
    cks: int = 0


@dataclass(frozen=True)
class Level:
    level: int  # recursion level: seeds are seed + 1_000_003 * level and sample_positions(..., level)
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class Plan:
    n: int
    causal: bool
    leaves: tuple[tuple[int, int], ...]  # (start, length) of the exact causal segments
    levels: tuple[Level, ...]
    ncols: int = 0  # length of the compact sorted rows (max over levels of the queries / keys it sorts)

    @property
    def has_samples(self) -> bool:
        return any(nd.num_blocks > 1 for lv in self.levels for nd in lv.nodes)


def _node(qs, nq, ks, nk, block_size):
    nb = max(1, -(-max(nq, nk) // block_size))
    return Node(qs, nq, ks, nk, nb, -(-nq // nb), -(-nk // nb))


@functools.lru_cache(maxsize=256)
def make_plan(n: int, block_size: int, min_seq_len: int, causal: bool) -> Plan:
    if not causal:
        return Plan(n, False, (), (Level(0, (_node(0, n, 0, n, block_size),)),), n)
    leaves: list[tuple[int, int]] = []
    by_level: dict[int, list[Node]] = {}

    def rec(s, m, level):
        if m <= min_seq_len:
            leaves.append((s, m))
            return
        h = m // 2
        rec(s, h, level + 1)
        by_level.setdefault(level, []).append(_node(s + h, m - h, s, h, block_size))
        rec(s + h, m - h, level + 1)

    rec(0, n, 0)
    levels = tuple(Level(lv, _compact(sorted(nodes, key=lambda x: x.ks))) for lv, nodes in sorted(by_level.items()))
    return Plan(n, True, tuple(leaves), levels, _ncols(levels))


def _compact(nodes):
    out, cq, ck = [], 0, 0
    for nd in nodes:
        out.append(dataclasses.replace(nd, cqs=cq, cks=ck))
        cq, ck = cq + nd.nq, ck + nd.nk
    return tuple(out)


def _ncols(levels):
    return max((max(sum(nd.nq for nd in lv.nodes), sum(nd.nk for nd in lv.nodes)) for lv in levels), default=0)


# ----------------------------------------------------------------------------------------------------------------
# Device tables (int32), cached per plan / tile sizes / device.

def _dev(rows, ncol, device):
    t = torch.tensor(rows if rows else [[0] * ncol], dtype=torch.int32)
    return t[: len(rows)].contiguous().to(device)


@functools.lru_cache(maxsize=256)
def compact_maps(plan: Plan, device):
    """Per level, where each position goes in the compact rows that get sorted, and back.

    Level ``L`` sorts only its queries (second halves of its nodes) and its keys (first halves), each node's part
    contiguous and in node order, so the sort key is ``node << (r+1) | rank`` and a stable sort of a row sorts each
    node by rank inside its own range, exactly like the reference's per-node stable sorts. Returns ``qmap, kmap``
    ``[2, levels, n]`` int32 (compact slot or -1; node index), ``q_back, k_back`` ``[levels, ncols]`` int32
    (position *inside its node*, original position minus the node's ``qs`` / ``ks``; 0 in the padding at the end
    of a row) and the bit width of the node ids. The sort orders built from these are node-local offsets, which
    fit 16 bits whenever every node is at most 65536 long (``perm16``): half the memory of int32 positions.
    """
    n, nl, nc = plan.n, len(plan.levels), plan.ncols
    qmap = torch.full((2, nl, n), -1, dtype=torch.int32)
    kmap = torch.full((2, nl, n), -1, dtype=torch.int32)
    qback = torch.zeros(nl, nc, dtype=torch.int32)
    kback = torch.zeros(nl, nc, dtype=torch.int32)
    for li, lv in enumerate(plan.levels):
        for j, nd in enumerate(lv.nodes):
            qmap[0, li, nd.qs:nd.qs + nd.nq] = torch.arange(nd.cqs, nd.cqs + nd.nq, dtype=torch.int32)
            kmap[0, li, nd.ks:nd.ks + nd.nk] = torch.arange(nd.cks, nd.cks + nd.nk, dtype=torch.int32)
            qmap[1, li, nd.qs:nd.qs + nd.nq] = j
            kmap[1, li, nd.ks:nd.ks + nd.nk] = j
            qback[li, nd.cqs:nd.cqs + nd.nq] = torch.arange(0, nd.nq, dtype=torch.int32)
            kback[li, nd.cks:nd.cks + nd.nk] = torch.arange(0, nd.nk, dtype=torch.int32)
    nodes = max((len(lv.nodes) for lv in plan.levels), default=1)
    return (qmap.contiguous().to(device), kmap.contiguous().to(device), qback.to(device), kback.to(device),
            max(1, nodes.bit_length()))


def perm16_ok(plan: Plan) -> bool:
    """Node-local sort offsets fit 16 bits (stored as int16, read back as ``& 0xFFFF``)."""
    return max((max(nd.nq, nd.nk) for lv in plan.levels for nd in lv.nodes), default=0) <= 1 << 16


@functools.lru_cache(maxsize=256)
def back_maps(plan: Plan, dtype, device):
    """``compact_maps``'s ``q_back, k_back`` in the sort orders' dtype (int16 wraps offsets >= 2^15)."""
    _, _, qback, kback, _ = compact_maps(plan, device)
    return qback.to(dtype).contiguous(), kback.to(dtype).contiguous()


@functools.lru_cache(maxsize=1024)
def node_starts(plan: Plan, li: int, device) -> torch.Tensor:
    """``[2, nodes]`` int32: the original position of each node's first query (row 0) and first key (row 1);
    the kernels add these to the node-local sort offsets."""
    nodes = plan.levels[li].nodes
    return _dev([[nd.qs for nd in nodes], [nd.ks for nd in nodes]], len(nodes), device)


@functools.lru_cache(maxsize=256)
def diag_tiles(plan: Plan, tile: int, longest_first: bool, device) -> torch.Tensor:
    """Rows ``(leaf_start, leaf_len, offset)`` of every ``tile``-row tile of every leaf."""
    rows = [(s, m, off) for s, m in plan.leaves for off in range(0, m, tile)]
    rows.sort(key=lambda r: -r[2] if longest_first else r[2])
    return _dev(rows, 3, device)


@functools.lru_cache(maxsize=256)
def extra_key_tiles(plan: Plan, sinks: int, window: int, bn: int, split: int, device) -> torch.Tensor:
    """dK/dV tiles of the exact set (sinks + local window) *outside* each query's leaf, in original positions:
    ``(k_start, k_cnt, q_start, q_cnt)``. A key ``j`` of leaf ``[ls, e)`` is in the exact set of the later-leaf
    queries ``i >= e`` when ``j < sinks`` (all of them: split into ``split``-row chunks) or ``j > i - window``
    (only ``i < j + window``); inside its own leaf the exact causal part already covers it."""
    rows = []
    n = plan.n
    for ls, m in plan.leaves:
        e = ls + m
        if e >= n:
            continue
        for k0 in range(ls, min(e, sinks), bn):  # sink keys: every later query
            for q0 in range(e, n, split):
                rows.append((k0, min(bn, min(e, sinks) - k0), q0, min(split, n - q0)))
        if window > 1:  # window keys (not sinks): the first window-1 queries after the leaf
            lo = max(sinks, ls, e - window + 1)
            qn = min(n, e + window - 1) - e
            for k0 in range(lo, e, bn):
                rows.append((k0, min(bn, e - k0), e, qn))
    return _dev(rows, 4, device)


def centring_pieces(plan: Plan, piece: int = 4096):
    """A partition of ``[0, n)`` into ranges of at most ``piece`` keys such that every node's key range is a union
    of consecutive pieces: ``(bounds [P+1] list, node_of [levels, P] int64)`` (``node_of`` = the node whose keys
    the piece holds at that level, or ``nodes``, a spare slot)."""
    cuts = {0, plan.n}
    for lv in plan.levels:
        for nd in lv.nodes:
            cuts.update((nd.ks, nd.ks + nd.nk))
    cuts = sorted(cuts)
    bounds = [0]
    for a, c in zip(cuts[:-1], cuts[1:]):
        bounds.extend(range(a + piece, c, piece))
        bounds.append(c)
    nodes = max((len(lv.nodes) for lv in plan.levels), default=1)
    node_of = torch.full((len(plan.levels), len(bounds) - 1), nodes, dtype=torch.int64)
    for li, lv in enumerate(plan.levels):
        for j, nd in enumerate(lv.nodes):
            for p, (a, c) in enumerate(zip(bounds[:-1], bounds[1:])):
                if a >= nd.ks and c <= nd.ks + nd.nk:
                    node_of[li, p] = j
    return bounds, node_of


@functools.lru_cache(maxsize=64)
def _centring_pieces_dev(plan: Plan, device):
    bounds, node_of = centring_pieces(plan)
    return bounds, node_of.to(device)


def centring_offsets(plan: Plan, k: torch.Tensor, key_valid, proj: torch.Tensor) -> torch.Tensor:
    """Hash offsets of ``center_keys``: the reference hashes ``k - mean`` (mean over the valid keys of each
    off-diagonal node); by linearity ``(k - mu) @ P = k @ P - mu @ P``, so the hash kernel subtracts ``mu @ P``.
    ``proj`` ``[d, CP]`` fp32 packed projections. Returns ``[levels, b * hk, nodes, CP]`` fp32 (each level's own
    columns are the ones it reads). The node sums are fp32 sums of key pieces of at most 4096 positions (on CUDA a
    half-precision sum accumulates in fp32 without an fp32 copy; no full-size fp32 copy of K exists)."""
    b, hk, n, d = k.shape
    nl = len(plan.levels)
    nodes = max((len(lv.nodes) for lv in plan.levels), default=1)
    bounds, node_of = _centring_pieces_dev(plan, k.device)
    npc = len(bounds) - 1
    sums = torch.empty(b, hk, npc, d, dtype=torch.float32, device=k.device)
    cnt = torch.empty(b, npc, dtype=torch.float32, device=k.device)
    w = None if key_valid is None else key_valid.to(k.dtype)  # 0/1: the masked product is exact
    for p, (a, c) in enumerate(zip(bounds[:-1], bounds[1:])):
        x = k[:, :, a:c]
        if w is None:
            cnt[:, p] = c - a
        else:
            x = x * w[:, None, a:c, None]
            cnt[:, p] = key_valid[:, a:c].sum(-1).float()
        sums[:, :, p] = x.sum(2, dtype=torch.float32)
    out = torch.empty(nl, b, hk, nodes, proj.shape[-1], dtype=torch.float32, device=k.device)
    for li in range(nl):
        s = torch.zeros(b, hk, nodes + 1, d, dtype=torch.float32, device=k.device).index_add_(2, node_of[li], sums)
        ct = torch.zeros(b, nodes + 1, dtype=torch.float32, device=k.device).index_add_(1, node_of[li], cnt)
        mu = s[:, :, :nodes] / ct[:, None, :nodes, None].clamp_min(1)
        out[li] = mu @ proj
    return out.reshape(nl, b * hk, nodes, -1).contiguous()


@functools.lru_cache(maxsize=1024)
def query_tiles(plan: Plan, li: int, bm: int, sample_size: int, device) -> torch.Tensor:
    """Forward / dQ tiles of one level: ``(q_start, q_cnt, k_start, k_cnt, block, node, node_ks, m_cnt)``."""
    rows = []
    for j, nd in enumerate(plan.levels[li].nodes):
        mc = sample_size if nd.num_blocks > 1 else 0
        for i in range(nd.num_blocks):
            q0, q1 = i * nd.bq, min((i + 1) * nd.bq, nd.nq)
            k0, k1 = i * nd.bk, min((i + 1) * nd.bk, nd.nk)
            for t in range(q0, q1, bm):
                rows.append((nd.cqs + t, min(bm, q1 - t), nd.cks + k0, max(0, k1 - k0), i, j, nd.cks, mc))
    return _dev(rows, 8, device)


@functools.lru_cache(maxsize=1024)
def key_tiles(plan: Plan, li: int, bn: int, device) -> torch.Tensor:
    """dK/dV tiles of the block part of one level: ``(k_start, k_cnt, q_start, q_cnt, node, node_ks)``."""
    rows = []
    for j, nd in enumerate(plan.levels[li].nodes):
        for i in range(nd.num_blocks):
            q0, q1 = i * nd.bq, min((i + 1) * nd.bq, nd.nq)
            k0, k1 = i * nd.bk, min((i + 1) * nd.bk, nd.nk)
            if q1 <= q0:
                continue
            for t in range(k0, k1, bn):
                rows.append((nd.cks + t, min(bn, k1 - t), nd.cqs + q0, q1 - q0, j, nd.cks))
    return _dev(rows, 6, device)


@functools.lru_cache(maxsize=1024)
def sample_tiles(plan: Plan, li: int, bn: int, split: int, sample_size: int, device) -> torch.Tensor:
    """dK/dV tiles of the sampled part of one level: ``(node, j_start, q_start, q_cnt, node_qs)``; the queries are
    the node's columns ``[q_start, q_start + q_cnt)`` in original order (see ``query_columns``)."""
    rows = []
    for j, nd in enumerate(plan.levels[li].nodes):
        if nd.num_blocks <= 1 or sample_size <= 0:
            continue
        for js in range(0, sample_size, bn):
            for t in range(0, nd.nq, split):
                rows.append((j, js, nd.cqs + t, min(split, nd.nq - t), nd.cqs))
    return _dev(rows, 5, device)


@functools.lru_cache(maxsize=1024)
def query_columns(plan: Plan, li: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, bq)``, ``[ncols]`` int64 each, for one level's compact query columns: the first column of the
    column's node (``cqs``; a padding column: its own index) and the node's query block size (1 in the padding).
    A query at node-local offset ``o`` sits at column ``first + o`` in original order; sorted to column ``c``, it
    is in block ``(c - first) // bq``."""
    first = torch.arange(plan.ncols, dtype=torch.int64)
    bq = torch.ones(plan.ncols, dtype=torch.int64)
    for nd in plan.levels[li].nodes:
        first[nd.cqs:nd.cqs + nd.nq] = nd.cqs
        bq[nd.cqs:nd.cqs + nd.nq] = nd.bq
    return first.to(device), bq.to(device)


@functools.lru_cache(maxsize=256)
def projections(plan: Plan, d: int, num_projs: int, seed: int, device) -> tuple[torch.Tensor, int]:
    """The reference's fp32 LSH projections of every level packed side by side: ``[d, cols]``, level ``l`` in
    columns ``[l * stride, l * stride + num_projs)`` (zeros elsewhere). Returns ``(packed, stride)``."""
    stride = 1 << max(0, (num_projs - 1).bit_length())
    cols = max(16, 1 << max(0, (len(plan.levels) * stride - 1).bit_length()))
    out = torch.zeros(d, cols, dtype=torch.float32)
    for li, lv in enumerate(plan.levels):
        out[:, li * stride: li * stride + num_projs] = lsh_projections(d, num_projs, seed + 1_000_003 * lv.level,
                                                                       "cpu")
    return out.contiguous().to(device), stride


@functools.lru_cache(maxsize=256)
def split_projections(proj: torch.Tensor, dtype) -> torch.Tensor:
    """fp32 ``proj`` as ``[3, *proj.shape]`` parts in ``dtype`` whose sum is ``proj`` to ~fp32 precision."""
    parts, rest = [], proj
    for _ in range(3):
        p = rest.to(dtype)
        parts.append(p)
        rest = rest - p.float()
    return torch.stack(parts).contiguous()


@dataclass
class LevelData:
    """Per-node data of one level: valid key counts, log-weights and the sampled keys (original positions)."""
    nvalid: torch.Tensor  # [b, nodes] int32
    sbias: torch.Tensor  # [b, nodes] fp32, natural log of n_valid / m
    sorig: torch.Tensor  # [b, hk, nodes, m] int32 original key position of each sample
    sblk: torch.Tensor  # [b, hk, nodes, m] int32 sorted block of each sample


@functools.lru_cache(maxsize=512)
def _unpadded_samples(plan: Plan, li: int, b: int, hk: int, sample_size: int, seed: int, device):
    lv = plan.levels[li]
    idx, blk = [], []
    for nd in lv.nodes:
        if nd.num_blocks > 1:
            i = sample_positions(torch.full((b, hk), nd.nk, dtype=torch.int64), sample_size, seed, lv.level)
        else:
            i = torch.zeros(b, hk, sample_size, dtype=torch.int64)
        idx.append(i + nd.cks)
        blk.append(i // nd.bk)
    idx = torch.stack(idx, 2).to(device)
    blk = torch.stack(blk, 2).to(torch.int32).contiguous().to(device)
    nk = torch.tensor([nd.nk for nd in lv.nodes], dtype=torch.int64)
    nv = nk.expand(b, -1).contiguous()
    sbias = torch.log(nv.clamp_min(1).float() / max(sample_size, 1))
    return idx, blk, nv.to(torch.int32).to(device), sbias.to(device)


def level_data(plan: Plan, li: int, kperm: torch.Tensor, settings: HyperSettings, key_valid, hk: int) -> LevelData:
    """``kperm`` ``[b, hk, ncols]`` (this level's compact key sort: node-local offsets, int16 read as unsigned or
    int32); ``key_valid`` ``[b, n]``."""
    lv = plan.levels[li]
    b = kperm.shape[0]
    m = settings.sample_size
    device = kperm.device
    nodes = len(lv.nodes)
    if key_valid is None:
        if m > 0:
            idx, blk, nv, sbias = _unpadded_samples(plan, li, b, hk, m, settings.seed, device)
        else:
            nv = torch.tensor([nd.nk for nd in lv.nodes], dtype=torch.int32).expand(b, -1).contiguous().to(device)
            sbias = torch.zeros(b, nodes, device=device)
    else:
        csum = torch.nn.functional.pad(key_valid.to(torch.int64).cumsum(-1), (1, 0))
        ks = torch.tensor([nd.ks for nd in lv.nodes], device=device)
        nk = torch.tensor([nd.nk for nd in lv.nodes], device=device)
        nv64 = csum[:, ks + nk] - csum[:, ks]  # [b, nodes]
        sbias = torch.log(nv64.clamp_min(1).float() / max(m, 1))
        nv = nv64.to(torch.int32).contiguous()
        if m > 0:
            idx, blk = [], []
            for j, nd in enumerate(lv.nodes):
                if nd.num_blocks > 1:
                    i = sample_positions(nv64[:, j, None].expand(b, hk), m, settings.seed, lv.level)
                else:
                    i = torch.zeros(b, hk, m, dtype=torch.int64, device=device)
                idx.append(i + nd.cks)
                blk.append(i // nd.bk)
            idx = torch.stack(idx, 2)
            blk = torch.stack(blk, 2).to(torch.int32).contiguous()
    if m > 0:
        loc = kperm.gather(-1, idx.reshape(b, hk, -1)).reshape(b, hk, nodes, m).to(torch.int32)
        if kperm.dtype == torch.int16:
            loc = loc & 0xFFFF
        sorig = (loc + node_starts(plan, li, device)[1][:, None]).contiguous()
    else:
        sorig = torch.zeros(b, hk, nodes, 1, dtype=torch.int32, device=device)
        blk = sorig
    return LevelData(nv, sbias.float().contiguous(), sorig, blk)


def rough_cost(plan: Plan, settings: HyperSettings) -> float:
    """Key visits per query (diagonal + per-level blocks and samples), for the crossover heuristics."""
    diag = sum(m * (m + 1) / 2 for _, m in plan.leaves)
    off = sum(nd.nq * (nd.bk + (settings.sample_size if nd.num_blocks > 1 else 0))
              for lv in plan.levels for nd in lv.nodes)
    return (diag + off) / max(plan.n, 1)


__all__ = ["Plan", "Node", "Level", "LevelData", "make_plan", "compact_maps", "diag_tiles", "query_tiles", "key_tiles",
           "sample_tiles", "query_columns", "extra_key_tiles", "centring_offsets", "node_starts", "back_maps",
           "perm16_ok", "projections", "level_data", "settings_supported", "rough_cost"]

"""DHSA selection at chunk granularity: the same kept set as ``naive.reference_keep_mask`` in O(n * n / chunk) time
and O(h * n/query_block * n/chunk) memory, returned as per-query-block lists of key chunks for the kernel.

Because every key of a chunk gets its chunk's score, "top ``budget`` tokens" is "top ``budget // chunk`` chunks",
so the upsampled token matrix is never built. The forced part of each query block is two contiguous chunk ranges
(sinks from 0, window up to the block's own chunks) and the picks all lie between them, so each sorted list is
those three pieces concatenated: no sort over all chunks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .naive import NEG_INF, DhsaSettings


@dataclass
class BlockSelection:
    """Kept key chunks per (batch row, query head, query block)."""
    idx: torch.Tensor  # [b, h, nqb, L] int32 chunk indices, ascending; entries past cnt are -1
    cnt: torch.Tensor  # [b, h, nqb] int32
    nfull: torch.Tensor  # [b, h, nqb] int32: leading entries whose chunk ends before the block starts
    n: int
    chunk_size: int
    query_block: int

    def chunk_mask(self) -> torch.Tensor:
        """``[b, h, nqb, nc]`` bool: is chunk c kept by query block i."""
        nc = -(-self.n // self.chunk_size)
        slots = torch.where(self.idx >= 0, self.idx, nc).long()
        hit = torch.zeros(*self.idx.shape[:3], nc + 1, dtype=torch.bool, device=self.idx.device)
        return hit.scatter_(-1, slots, True)[..., :nc]

    def keep_rows(self, r0: int, r1: int, key_valid=None, chunk_mask=None) -> torch.Tensor:
        """Kept (query, key) pairs of query rows ``[r0, r1)``: ``[b, h, r1 - r0, n]`` bool, causal, valid keys."""
        cm = self.chunk_mask() if chunk_mask is None else chunk_mask
        rows = torch.arange(r0, r1, device=cm.device)
        keys = torch.arange(self.n, device=cm.device)
        keep = cm[:, :, rows // self.query_block][..., keys // self.chunk_size]
        keep = keep & (keys[None, :] <= rows[:, None])
        if key_valid is not None:
            keep = keep & key_valid[:, None, None, :]
        return keep


@dataclass
class Structure:
    """What every query block keeps regardless of the scores (all ``[nqb]`` int64)."""
    start: torch.Tensor  # first query of the block
    end: torch.Tensor  # one past its last query
    win_lo: torch.Tensor  # first window chunk (the window runs to the block's last chunk, win_hi)
    win_hi: torch.Tensor
    sinks: torch.Tensor  # sink chunks [0, sinks) kept besides the window
    budget: torch.Tensor  # chunks to pick
    candidates: torch.Tensor  # how many chunks may be picked: those in [sink_chunks, win_lo)
    sink_chunks: int  # chunks holding a sink token: never candidates


def structure(n: int, settings: DhsaSettings, device=None) -> Structure:
    C, B = settings.chunk_size, settings.query_block
    start = torch.arange(0, n, B, device=device)
    end = (start + B).clamp_max(n)
    win_lo = (start - settings.local_window).clamp_min(0) // C
    win_hi = (end - 1) // C
    sink_chunks = -(-settings.sink_tokens // C)
    sinks = win_lo.clamp_max(sink_chunks)
    if settings.budget_fraction > 0:
        budget = (settings.budget_fraction * end.double()).floor().long() // C
    else:
        budget = torch.full_like(start, settings.budget_tokens // C)
    candidates = (win_lo - sink_chunks).clamp_min(0)
    return Structure(start, end, win_lo, win_hi, sinks, budget, candidates, sink_chunks)


def _block_sums(x: torch.Tensor, size: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 sums of (valid) rows over blocks of ``size``: ``[b, H, blocks, d]`` and the counts ``[b, blocks]``,
    without an fp32 copy of ``x`` when there is no padding."""
    b, hh, n, d = x.shape
    full = n // size
    if valid is not None:
        x = x * valid[:, None, :, None].to(x.dtype)  # 0/1 weights: exact
        counts = torch.nn.functional.pad(valid.float(), (0, -n % size)).view(b, -1, size).sum(-1)
    parts = [x[:, :, : full * size].reshape(b, hh, full, size, d).sum(3, dtype=torch.float32)]
    if n % size:
        parts.append(x[:, :, full * size:].sum(2, keepdim=True, dtype=torch.float32))
    if valid is None:
        counts = torch.full((b, full + (n % size > 0)), float(size), device=x.device)
        if n % size:
            counts[:, -1] = n % size
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0], counts


#: most chunk scores built at once by :func:`select_blocks` (1 GiB of fp32): at 1M tokens the whole [b, h, nqb, nc]
#: matrix is 3.2e9 scores (12.9 GiB, 24 heads), past the 2**31 elements PyTorch's CUDA topk indexes safely
MAX_SCORES = 1 << 28


def _representations(q, k, settings: DhsaSettings, key_valid=None):
    """Query-block and key-chunk representations (sum / sqrt(len), i.e. mean * sqrt(len)), fp32, and the key
    chunks' valid counts: ``[b, h, nqb, d]``, ``[b, hk, nc, d]``, ``[b, nc]``."""
    qs, qn = _block_sums(q, settings.query_block, key_valid)
    ks, kn = _block_sums(k, settings.chunk_size, key_valid)
    return qs / qn.clamp_min(1).sqrt()[:, None, :, None], ks / kn.clamp_min(1).sqrt()[:, None, :, None], kn


def _scores(q_rep, k_rep, kn) -> torch.Tensor:
    """``[b, h, blocks, nc]`` similarities of the query blocks in ``q_rep`` and every key chunk; chunks without a
    valid key score -inf."""
    b, h, blocks, d = q_rep.shape
    hk = k_rep.shape[1]
    scores = (q_rep.reshape(b, hk, -1, d) @ k_rep.transpose(-1, -2)).view(b, h, blocks, -1)
    return scores.masked_fill_((kn == 0)[:, None, None, :], NEG_INF)


def _score_slices(q, k, settings: DhsaSettings, key_valid, nc: int, max_scores: int):
    """``(lo, hi, scores)``: the ``[b, h, hi - lo, nc]`` chunk scores of query blocks ``lo .. hi``, slices of at
    most ``max_scores`` scores (at least one block) in order."""
    q_rep, k_rep, kn = _representations(q, k, settings, key_valid)
    b, h, nqb, _ = q_rep.shape
    step = max(1, max_scores // (b * h * nc))
    for lo in range(0, nqb, step):
        hi = min(lo + step, nqb)
        yield lo, hi, _scores(q_rep[:, :, lo:hi], k_rep, kn)


def chunk_scores(q, k, settings: DhsaSettings, key_valid=None) -> torch.Tensor:
    """``[b, h, nqb, nc]`` fp32 similarity of query-block and key-chunk representations (sum / sqrt(len), i.e.
    mean * sqrt(len)); chunks without a valid key score -inf."""
    return _scores(*_representations(q, k, settings, key_valid))


def _use_triton_pick(q, nc: int, picker: str) -> bool:
    if picker not in ("auto", "torch", "triton"):
        raise ValueError(f"picker must be 'auto', 'torch' or 'triton', got {picker!r}")
    if picker != "auto":
        return picker == "triton"
    from .. import triton_available
    from .triton_select import MAX_CHUNKS

    return q.is_cuda and nc <= MAX_CHUNKS and triton_available()


def select_blocks(q, k, settings: DhsaSettings, key_valid=None, *, max_scores: int = MAX_SCORES,
                  picker: str = "auto") -> BlockSelection:
    """The kept chunks of every query block: sinks, the best ``budget`` earlier chunks, window + own chunks. The
    scores are built for slices of query blocks of at most ``max_scores`` entries at a time. ``picker``: how each
    slice becomes chunk lists, ``"triton"`` (``triton_select.ChunkPicker``, one kernel), ``"torch"`` (topk and
    sorts) or ``"auto"`` (Triton on CUDA up to ``triton_select.MAX_CHUNKS`` chunks); both give the same lists."""
    b, h, n, _ = q.shape
    if h % k.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[1]})")
    dev = q.device
    st = structure(n, settings, dev)
    nc = -(-n // settings.chunk_size)
    if _use_triton_pick(q, nc, picker):
        return _select_triton(q, k, settings, key_valid, st, nc, max_scores)
    chunks = torch.arange(nc, device=dev)
    pieces = []
    ns = int(st.sinks.max())
    if ns:
        ar = torch.arange(ns, device=dev)
        pieces.append(torch.where(ar < st.sinks[:, None], ar, -1).expand(b, h, -1, -1))
    kmax = int(torch.minimum(st.budget, st.candidates).max())
    if kmax > 0:
        picks = []
        for lo, hi, scores in _score_slices(q, k, settings, key_valid, nc, max_scores):
            cand = (chunks >= st.sink_chunks) & (chunks[None, :] < st.win_lo[lo:hi, None])  # [blocks, nc]
            top, pick = scores.masked_fill_(~cand, NEG_INF).topk(kmax, dim=-1)
            ok = torch.isfinite(top) & (torch.arange(kmax, device=dev) < st.budget[lo:hi, None])  # best first
            picks.append(torch.where(ok, pick, -1).sort(-1).values)
        pieces.append(torch.cat(picks, 2))
    nw = int((st.win_hi - st.win_lo).max()) + 1
    win = st.win_lo[:, None] + torch.arange(nw, device=dev)
    pieces.append(torch.where(win <= st.win_hi[:, None], win, -1).expand(b, h, -1, -1))
    rows = torch.cat(pieces, -1)  # each piece ascending, pieces in ascending ranges; -1 = empty slot
    # compact: valid entries to the front, keeping their order (a stable sort on "is empty")
    order = (rows < 0).to(torch.int8).sort(dim=-1, stable=True).indices
    rows = rows.gather(-1, order)
    cnt = (rows >= 0).sum(-1)
    nfull = ((rows >= 0) & ((rows + 1) * settings.chunk_size <= st.start[:, None])).sum(-1)
    width = max(1, int(cnt.max()))
    return BlockSelection(rows[..., :width].to(torch.int32).contiguous(), cnt.to(torch.int32).contiguous(),
                          nfull.to(torch.int32).contiguous(), n, settings.chunk_size, settings.query_block)


def _select_triton(q, k, settings: DhsaSettings, key_valid, st: Structure, nc: int, max_scores: int):
    """``select_blocks`` with the per-slice pick in one Triton kernel. The lists are as wide as the most chunks any
    block may keep (the PyTorch path trims to the most any block did keep; entries past ``cnt`` are -1 in both)."""
    from .triton_select import ChunkPicker

    b, h, n, _ = q.shape
    picker = ChunkPicker(st, settings.chunk_size, (b, h))
    for lo, _, scores in _score_slices(q, k, settings, key_valid, nc, max_scores):
        picker(scores, lo)
    return BlockSelection(picker.idx, picker.cnt, picker.nfull, n, settings.chunk_size, settings.query_block)


def _prefix_pairs(x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """sum_{t=1..x} min(t, length) for x >= 0 (0 for x <= 0)."""
    x = x.clamp_min(0)
    inside = torch.minimum(x, length)
    return inside * (inside + 1) // 2 + (x - inside) * length


def block_pairs(start, end, chunk, chunk_size: int, n: int) -> torch.Tensor:
    """Causal (query, key) pairs between queries ``[start, end)`` and chunk ``chunk``'s keys (broadcasting)."""
    a = chunk * chunk_size
    length = (a + chunk_size).clamp_max(n) - a
    return _prefix_pairs(end - a, length) - _prefix_pairs(start - a, length)


def selection_density(sel: BlockSelection) -> float:
    """Kept causal (query, key) pairs over all causal pairs, averaged over batch rows and heads."""
    nqb = sel.cnt.shape[-1]
    start = torch.arange(nqb, device=sel.idx.device) * sel.query_block
    end = (start + sel.query_block).clamp_max(sel.n)
    pairs = block_pairs(start[:, None], end[:, None], sel.idx.long(), sel.chunk_size, sel.n)
    kept = torch.where(sel.idx >= 0, pairs, 0).sum((-1, -2)).double()
    return float(kept.mean()) / (sel.n * (sel.n + 1) / 2)


def expected_density(n: int, settings: DhsaSettings) -> float:
    """The density ``select_blocks`` produces on an ``n``-token prefill without padding: how many chunks each
    block keeps does not depend on the scores (picked chunks all lie fully before the block)."""
    st = structure(n, settings)
    C = settings.chunk_size
    rows = st.end - st.start
    picks = torch.minimum(st.budget, st.candidates)
    full = (st.sinks + picks) * rows * C  # sinks and picks end before the block starts
    win = torch.arange(int((st.win_hi - st.win_lo).max()) + 1)
    wc = st.win_lo[:, None] + win
    wp = torch.where(wc <= st.win_hi[:, None], block_pairs(st.start[:, None], st.end[:, None], wc, C, n), 0)
    return float((full.sum() + wp.sum()).double()) / (n * (n + 1) / 2)


__all__ = ["BlockSelection", "Structure", "structure", "chunk_scores", "select_blocks", "selection_density",
           "expected_density", "block_pairs"]

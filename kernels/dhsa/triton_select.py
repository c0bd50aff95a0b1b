"""The per-query-block pick of ``select.select_blocks`` as one Triton kernel: from a slice of chunk scores straight to
the sorted, compacted chunk lists the attention kernel reads.

The PyTorch path needs a masked copy of the scores, ``topk``, a sort of the picks, a concatenation with the forced
chunks and a stable sort to compact them: ~7 ms of the 20 ms of a 131k-token DHSA prefill on an H200. Here every
row (batch, head, query block) is one pass over its scores held in registers:
  1. candidates: chunks in ``[sink_chunks, win_lo)`` with a finite score; ``K = min(budget, #candidates)``;
  2. the K-th largest score, exactly, by a 32-step bitwise search over order-preserving integer keys (counting the
     candidates at or above a threshold; no sort);
  3. picks: the candidates above it, plus as many of those equal to it as are still needed, lowest index first
     (``topk`` leaves that tie order unspecified);
  4. the row: sinks ``[0, sinks)``, the picks ascending (a cumulative sum gives each its slot), the window
     ``[win_lo, win_hi]``; ``cnt`` and ``nfull`` follow from the three counts.
Rows with more than ``MAX_CHUNKS`` chunks (prompts past 512k tokens at 64-token chunks) stay on the PyTorch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: the widest score row the kernel holds in registers (8 warps: 32 keys a thread)
MAX_CHUNKS = 8192


@triton.jit
def _pick_kernel(SCORES, WIN_LO, WIN_HI, SINKS, BUDGET, START, IDX, CNT, NFULL,
                 n_rows, blocks, lo, nqb, nc, width, sink_chunks,
                 CHUNK: tl.constexpr, R: tl.constexpr, NCP: tl.constexpr, SP: tl.constexpr, WP: tl.constexpr):
    """``R`` rows of a ``[b*h, blocks, nc]`` score slice (query blocks ``lo .. lo + blocks``) per program."""
    rr = tl.program_id(0) * R + tl.arange(0, R)
    row_ok = rr < n_rows
    bh = rr // blocks
    blk = lo + rr % blocks
    win_lo = tl.load(WIN_LO + blk, mask=row_ok, other=0)
    win_hi = tl.load(WIN_HI + blk, mask=row_ok, other=-1)
    sinks = tl.load(SINKS + blk, mask=row_ok, other=0)
    budget = tl.load(BUDGET + blk, mask=row_ok, other=0)
    start = tl.load(START + blk, mask=row_ok, other=0)
    cols = tl.arange(0, NCP)
    x = tl.load(SCORES + rr.to(tl.int64)[:, None] * nc + cols[None, :],
                mask=row_ok[:, None] & (cols < nc)[None, :], other=float("-inf"))
    cand = (cols[None, :] >= sink_chunks) & (cols[None, :] < win_lo[:, None]) & (x > float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    # signed order == float order; the non-candidates get the least key, below every threshold tried (> INT_MIN)
    key = tl.where(cand, tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits), -2147483648)
    k = tl.minimum(budget, tl.sum(cand.to(tl.int32), 1))
    # largest T (offset binary, as int64) with at least k candidates at or above it: the k-th largest key
    t = tl.zeros([R], dtype=tl.int64)
    for bit in tl.static_range(31, -1, -1):
        c = t | (1 << bit)
        thr = (c - 2147483648).to(tl.int32)
        above = tl.sum((key >= thr[:, None]).to(tl.int32), 1)
        t = tl.where(above >= k, c, t)
    thr = (t - 2147483648).to(tl.int32)
    gt = cand & (key > thr[:, None])
    tie = cand & (key == thr[:, None])
    need = k - tl.sum(gt.to(tl.int32), 1)
    keep = (gt | (tie & (tl.cumsum(tie.to(tl.int32), 1) <= need[:, None]))) & (k > 0)[:, None]
    out = IDX + (bh.to(tl.int64) * nqb + blk) * width
    slot = sinks[:, None] + tl.cumsum(keep.to(tl.int32), 1) - 1
    tl.store(out[:, None] + slot, cols[None, :], mask=keep)
    js = tl.arange(0, SP)
    tl.store(out[:, None] + js[None, :], js[None, :], mask=row_ok[:, None] & (js[None, :] < sinks[:, None]))
    jw = tl.arange(0, WP)
    nwin = win_hi - win_lo + 1
    tl.store(out[:, None] + (sinks + k)[:, None] + jw[None, :], win_lo[:, None] + jw[None, :],
             mask=row_ok[:, None] & (jw[None, :] < nwin[:, None]))
    full_win = tl.maximum(tl.minimum(win_hi + 1, start // CHUNK) - win_lo, 0)
    flat = bh * nqb + blk
    tl.store(CNT + flat, sinks + k + nwin, mask=row_ok)
    tl.store(NFULL + flat, sinks + k + full_win, mask=row_ok)


class ChunkPicker:
    """The chunk lists of one selection, filled slice by slice of scores: ``idx [b, h, nqb, width]`` (-1 past
    ``cnt``), ``cnt`` and ``nfull [b, h, nqb]``, all int32. The lists are as wide as the most chunks any block may
    keep. What the kernel needs of the structure (int32 copies, sink and window widths) is set up once here."""

    def __init__(self, st, chunk_size: int, batch_heads: tuple[int, int], rows: int = 0, warps: int = 0):
        nqb = st.start.shape[0]
        self.rows, self.warps = rows, warps  # per program; 0: :meth:`launch_shape`'s
        self.sink_chunks, self.chunk_size = st.sink_chunks, chunk_size
        self.structure = [x.to(torch.int32).contiguous() for x in (st.win_lo, st.win_hi, st.sinks, st.budget,
                                                                     st.start)]
        picks = torch.minimum(st.budget, st.candidates)
        width = max(1, int((st.sinks + picks + st.win_hi - st.win_lo + 1).max()))
        self.sp = max(2, triton.next_power_of_2(int(st.sinks.max())))
        self.wp = max(2, triton.next_power_of_2(int((st.win_hi - st.win_lo).max()) + 1))
        device = st.start.device
        self.idx = torch.full((*batch_heads, nqb, width), -1, dtype=torch.int32, device=device)
        self.cnt = torch.empty(*batch_heads, nqb, dtype=torch.int32, device=device)
        self.nfull = torch.empty_like(self.cnt)

    def __call__(self, scores: torch.Tensor, lo: int) -> None:
        """The lists of query blocks ``lo .. lo + scores.shape[2]`` from their ``scores [b, h, blocks, nc]`` (fp32,
        -inf = empty chunk)."""
        b, h, blocks, nc = scores.shape
        if nc > MAX_CHUNKS:
            raise ValueError(f"{nc} chunks per row: the Triton pick holds at most {MAX_CHUNKS}")
        scores = scores.contiguous()
        ncp = max(16, triton.next_power_of_2(nc))
        r, warps = self.launch_shape(ncp, scores.is_cuda)
        n_rows = b * h * blocks
        _pick_kernel[(triton.cdiv(n_rows, r),)](
            scores, *self.structure, self.idx, self.cnt, self.nfull, n_rows, blocks, lo, self.idx.shape[2], nc,
            self.idx.shape[3], self.sink_chunks, CHUNK=self.chunk_size, R=r, NCP=ncp, SP=self.sp, WP=self.wp,
            num_warps=warps)

    def launch_shape(self, ncp: int, cuda: bool) -> tuple[int, int]:
        """Rows per program and warps. CUDA: one row (its reductions stay within fewer warps), 4 warps up to 1024
        chunks, then 1024 chunks a warp (H200, 32 heads, the selection of 131k tokens: 3.67 ms with 2 warps vs 3.98 with
        2048 // ncp rows and 8 warps, 32k 0.68 vs 0.71 ms). The interpreter: a few rows per program (fewer, faster
        programs)."""
        rows = self.rows or (1 if cuda else max(1, 2048 // ncp))
        return rows, self.warps or (4 if ncp <= 1024 else min(8, ncp // 1024))


__all__ = ["MAX_CHUNKS", "ChunkPicker"]

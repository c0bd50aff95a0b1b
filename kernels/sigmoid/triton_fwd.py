"""FlashSigmoid forward in Triton, with a flash softmax forward in the same kernel (``SIGMOID`` switch).

Both tile like FlashAttention-2: a program owns ``BM`` query rows of one head, keeps them in registers and walks
the key/value blocks its rows may see (GQA: query head ``h`` reads key/value head ``h // G``; K/V are never
expanded), accumulating ``P·V`` in fp32. Blocks every row sees in full go through an unmasked loop; only the blocks
that cross the causal diagonal (or the end of the keys) are masked. Q, K and V arrive as 4-D tensor descriptors
(``[b, h, n, d]``, one ``[1, 1, rows, d]`` block a load): on Hopper the tiles come by TMA, which took the d=128
forward from 538 to 570 TFLOP/s at 16k (H200, causal, b=1, h=16), and rows past the end read as zeros unmasked.

Sigmoid (``SIGMOID=True``): ``P = σ(S·scale + bias_row)`` is final the moment it is computed, so there is no running
row max, no row sum, no rescaling of the accumulator and no log-sum-exp to store (the backward does not need one
either). ``FAST`` (CUDA, fp16/bf16 inputs) computes σ(x) = ½ + ½·tanh(x/2) with the hardware ``tanh.approx.f32``,
one special-function op per score (relative error ~2^-11, below bf16/fp16 rounding of P); otherwise
σ(x) = 1 / (1 + 2^(−x·log2 e)), exact to fp32 and what the CPU interpreter runs.

Softmax (``SIGMOID=False``): the online softmax (running max and sum in exp2 units), storing the row log-sum-exp
for the backward. It exists so that the benchmark compares FlashSigmoid against a softmax kernel built the same way.

The host (ops.py) pre-multiplies the score scale and the bias into ``zscale`` / ``bias_mul``: z = S·zscale + bias·
bias_mul is x/2 for ``FAST``, x·log2 e otherwise (and S·scale·log2 e for softmax).
Causal masking is bottom-right aligned: query row ``i`` sits at position ``NK − NQ + i``. ``KSTART[b]`` (left
padding) hides the keys before it; rows that see no key produce 0 (and lse = −inf).
"""
from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _sigmoid(z, FAST: tl.constexpr):
    """σ of a pre-scaled logit: ``z = x/2`` when ``FAST`` (tanh.approx), else ``z = x·log2 e``."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return 0.5 * t + 0.5
    else:
        return 1.0 / (1.0 + tl.math.exp2(-z))


@triton.jit
def _row_bias(BIAS, b, rows, row_ok, NQ, bias_const, bias_mul, HAS_BIAS: tl.constexpr, ROWS_LAST: tl.constexpr):
    """Each row's bias in z units, shaped to add to a score tile: ``[BM, 1]`` (``[1, BM]`` for transposed tiles,
    ``ROWS_LAST``) from the ``[b, NQ]`` tensor, or the scalar ``bias_const`` (no per-element vector to carry)."""
    if HAS_BIAS:
        zb = tl.load(BIAS + b * NQ + rows, mask=row_ok, other=0.0) * bias_mul
        if ROWS_LAST:
            return zb[None, :]
        else:
            return zb[:, None]
    else:
        return bias_const


@triton.jit
def _key_range(row0, off, NK, kstart, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Key bounds of the query tile starting at row ``row0``: blocks in ``[lo, mid)`` are seen by every row
    (no causal mask), ``[mid, hi)`` cross the diagonal or the end of the keys (masked); keys before ``lo`` are
    all padding."""
    lo = (kstart // BN) * BN
    if CAUSAL:
        hi = tl.minimum(NK, row0 + BM + off)
        mid = (tl.minimum(row0 + off + 1, NK) // BN) * BN
    else:
        hi = NK
        mid = (NK // BN) * BN
    return lo, tl.maximum(mid, lo), hi


@triton.jit
def _visible(rows, cols, off, NK, kstart, CAUSAL: tl.constexpr, HAS_START: tl.constexpr):
    """``[BM, BN]`` (or ``[1, BN]``) bool: the (row, key) pairs that may attend."""
    ok = cols[None, :] < NK
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + off)
    if HAS_START:
        ok = ok & (cols[None, :] >= kstart)
    return ok


@triton.jit
def _fwd_step(acc, m_i, l_i, s, v, zb, ok, zscale, SIGMOID: tl.constexpr, FAST: tl.constexpr,
              MASKED: tl.constexpr, PREC: tl.constexpr):
    """One key block: sigmoid adds σ(z)·V; softmax does an online-softmax step (m_i, l_i in exp2 units)."""
    if SIGMOID:
        p = _sigmoid(s * zscale + zb, FAST)
        if MASKED:
            p = tl.where(ok, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    else:
        z = s * zscale
        if MASKED:
            z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at 0
        p = tl.math.exp2(z - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(QD, KD, VD, O, LSE, BIAS, KSTART, zscale, bias_const, bias_mul, sob, soh, son, NQ, NK, H, G,
                SIGMOID: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_START: tl.constexpr,
                FAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    if CAUSAL:
        pid = tl.num_programs(0) - 1 - pid  # the longest rows start first (less tail imbalance)
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
    kstart = 0
    if HAS_START:
        kstart = tl.load(KSTART + b)
    zb = _row_bias(BIAS, b, rows, row_ok, NQ, bias_const, bias_mul, HAS_BIAS, False)
    acc = tl.zeros([BM, D], tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    lo, mid, hi = _key_range(row0, off, NK, kstart, CAUSAL, BM, BN)
    for start in range(lo, mid, BN):  # every row sees these keys (except left padding)
        start = tl.multiple_of(start, BN)
        cols = start + tl.arange(0, BN)
        k = KD.load([b32, kvh, start, 0]).reshape(BN, D)
        v = VD.load([b32, kvh, start, 0]).reshape(BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        ok = cols[None, :] >= kstart
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, s, v, zb, ok, zscale, SIGMOID, FAST, HAS_START, PREC)
    for start in range(mid, hi, BN):  # blocks on the diagonal / at the end of the keys
        start = tl.multiple_of(start, BN)
        cols = start + tl.arange(0, BN)
        k = KD.load([b32, kvh, start, 0]).reshape(BN, D)  # keys past NK read as 0
        v = VD.load([b32, kvh, start, 0]).reshape(BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        ok = _visible(rows, cols, off, NK, kstart, CAUSAL, HAS_START)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, s, v, zb, ok, zscale, SIGMOID, FAST, True, PREC)
    if SIGMOID:
        o = acc
    else:
        l_ok = l_i > 0
        l_use = tl.where(l_ok, l_i, 1.0)
        o = acc / l_use[:, None]
        lse = tl.where(l_ok, (m_i + tl.math.log2(l_use)) * LN2, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * NQ + rows, lse, mask=row_ok)
    tl.store(O + b * sob + hh * soh + rows[:, None].to(tl.int64) * son + dcol[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None])

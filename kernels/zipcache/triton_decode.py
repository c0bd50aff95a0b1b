"""Split-K decode attention (flash-decoding) over one segment of a packed ZipCache block.

A *segment* is a contiguous range of a block's stored rows whose keys come from one channel-wise quantised key
tensor and whose values from one CSTQuant value tensor (a block stored salient first has two). The grid is
``(sequence × KV head, split)``: each program streams its split of the segment once for the whole GQA group (the
group's queries padded to ``BLOCK_G >= 16`` rows, so both products are ``tl.dot``\\s), unpacking the codes in
registers (load the byte holding a code, shift, mask), dequantising in float32 (the values' channel scale, a column
factor, is applied once to the accumulator) and running an online softmax. It writes a partial ``(max, sum,
accumulator)`` per query row into slot ``split0 + split`` of buffers shared by every segment of the step. Nothing is
dequantised to memory. ``_finish_kernel`` then attends the full-precision tokens (sinks + recent buffer) the same
way and folds every slot in (logsumexp merge), writing the output: one launch per segment, plus one.

Layouts (``Quantized`` in ``patchattn/variants/zipcache.py``): key codes ``[b, hk, n, d·bits/8]``, key zero/step
``[b, hk, G, 1, d]`` (row ``r`` of the key tensor uses group ``r // k_group``); value codes ``[b, n, C·bits/8]`` with
``C = hk·d`` (a token's KV heads side by side), value zero/step ``[b, n, C / v_group, 1]``, channel scale
``[b, 1, C]``. Codes are packed little end first: code ``i`` of a byte sits at bits ``[i·bits, (i+1)·bits)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from one exp (no libdevice: runs in the interpreter too), stable for large |x|."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x >= 0, y, -y)


@triton.jit
def _unpack(byte_ptrs, mask, shift, BITS: tl.constexpr):
    """The ``BITS``-bit codes at ``shift`` in the bytes at ``byte_ptrs``, as float32."""
    packed = tl.load(byte_ptrs, mask=mask, other=0).to(tl.int32)
    return ((packed >> shift) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _segment_kernel(Q, KC, KZ, KS, VC, VZ, VS, VSCALE, M, L, ACC,
                    scaling, softcap, seg_len, k_row0, v_row0, k_group, v_group, split_len, split0, n_slots, hk, g,
                    stride_qb, stride_qh, stride_kcb, stride_kch, stride_kcn, stride_kzb, stride_kzh, stride_kzg,
                    stride_vcb, stride_vcn, stride_vzb, stride_vzn, stride_vsb,
                    D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_ROWWISE: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                    PREC: tl.constexpr):
    pid = tl.program_id(0)  # = sequence * hk + KV head
    split = tl.program_id(1)
    seq = pid // hk
    kv = pid % hk
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(Q + seq * stride_qb + (kv * g + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_g < g)[:, None] & d_mask[None, :], other=0.0)
    # keys: channel j of a row is code j % per of byte j // per
    k_per: tl.constexpr = 8 // K_BITS
    k_byte = offs_d // k_per
    k_shift = (offs_d % k_per) * K_BITS
    kc_base = KC + seq * stride_kcb + kv * stride_kch
    kz_off = seq * stride_kzb + kv * stride_kzh
    # values: this head's channels are kv·D .. kv·D + D - 1 of the token's C
    v_per: tl.constexpr = 8 // V_BITS
    chan = kv * D + offs_d
    v_byte = chan // v_per
    v_shift = (chan % v_per) * V_BITS
    v_grp = chan // v_group
    vc_base = VC + seq * stride_vcb
    vz_off = seq * stride_vzb

    start = split * split_len
    end = tl.minimum(start + split_len, seg_len)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        r_mask = rows < end
        tile = r_mask[:, None] & d_mask[None, :]
        k_rows = k_row0 + rows
        k_codes = _unpack(kc_base + k_rows[:, None] * stride_kcn + k_byte[None, :], tile, k_shift[None, :], K_BITS)
        kz_ptrs = kz_off + (k_rows // k_group)[:, None] * stride_kzg + offs_d[None, :]
        k = (tl.load(KZ + kz_ptrs, mask=tile, other=0.0).to(tl.float32)
             + k_codes * tl.load(KS + kz_ptrs, mask=tile, other=0.0).to(tl.float32))
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * scaling  # [BLOCK_G, BLOCK_N]
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(r_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)

        v_rows = v_row0 + rows
        v_codes = _unpack(vc_base + v_rows[:, None] * stride_vcn + v_byte[None, :], tile, v_shift[None, :], V_BITS)
        if V_ROWWISE:  # this head's channels share one zero/step per token (the default: one for all C)
            vz_ptrs = vz_off + v_rows * stride_vzn + (kv * D) // v_group
            v = (tl.load(VZ + vz_ptrs, mask=r_mask, other=0.0).to(tl.float32)[:, None]
                 + v_codes * tl.load(VS + vz_ptrs, mask=r_mask, other=0.0).to(tl.float32)[:, None])
        else:
            vz_ptrs = vz_off + v_rows[:, None] * stride_vzn + v_grp[None, :]
            v = (tl.load(VZ + vz_ptrs, mask=tile, other=0.0).to(tl.float32)
                 + v_codes * tl.load(VS + vz_ptrs, mask=tile, other=0.0).to(tl.float32))
        # v is still channel-normalised: the channel scale is a column factor, applied once to acc at the end
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    acc = acc * tl.load(VSCALE + seq * stride_vsb + chan, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    slot = pid * n_slots + split0 + split
    tl.store(M + slot * BLOCK_G + offs_g, m_i)
    tl.store(L + slot * BLOCK_G + offs_g, l_i)
    tl.store(ACC + (slot * BLOCK_G + offs_g)[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _finish_kernel(Q, K, V, M, L, ACC, OUT, scaling, softcap, fp_len, n_slots, hk, g,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_ob, stride_oh,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   SOFTCAP: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)  # = sequence * hk + KV head
    seq = pid // hk
    kv = pid % hk
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    g_mask = (offs_g < g)[:, None] & d_mask[None, :]
    q = tl.load(Q + seq * stride_qb + (kv * g + offs_g)[:, None] * stride_qh + offs_d[None, :], mask=g_mask,
                other=0.0)
    k_base = K + seq * stride_kb + kv * stride_kh
    v_base = V + seq * stride_vb + kv * stride_vh
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for n0 in range(0, fp_len, BLOCK_N):  # the full-precision tokens
        rows = n0 + tl.arange(0, BLOCK_N)
        r_mask = rows < fp_len
        tile = r_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=tile, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scaling
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(r_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=tile, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    for slot in range(pid * n_slots, (pid + 1) * n_slots):  # the quantised segments' splits
        m_s = tl.load(M + slot * BLOCK_G + offs_g)
        m_new = tl.maximum(m_i, m_s)
        alpha, beta = tl.exp(m_i - m_new), tl.exp(m_s - m_new)
        acc_s = tl.load(ACC + (slot * BLOCK_G + offs_g)[:, None] * BLOCK_D + offs_d[None, :])
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        l_i = l_i * alpha + tl.load(L + slot * BLOCK_G + offs_g) * beta
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + seq * stride_ob + (kv * g + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=g_mask)


def _prec(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None  # fp32 inputs: exact dots, no TF32


def launch_finish(query, keys, values, partials, out, *, scaling: float, softcap: float | None, block_n: int,
                  num_warps: int) -> None:
    """``out [b, 1, h, d]`` from the full-precision ``keys``/``values`` and every slot of ``partials``."""
    m, l, acc = partials
    b, h, _, d = query.shape
    hk = keys.shape[1]
    _finish_kernel[(b * hk,)](
        query, keys, values, m, l, acc, out, scaling, 1.0 if softcap is None else softcap, keys.shape[2],
        m.shape[1], hk, h // hk, query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(2),
        D=d, BLOCK_D=acc.shape[3], BLOCK_G=m.shape[2], BLOCK_N=block_n, SOFTCAP=softcap is not None,
        PREC=_prec(query.dtype), num_warps=num_warps)


def launch_segment(query, key, value, value_scale, partials, *, seg_len: int, k_row0: int, v_row0: int,
                   split_len: int, split0: int, scaling: float, softcap: float | None, block_n: int,
                   num_warps: int) -> None:
    """Partials of the segment's ``cdiv(seg_len, split_len)`` splits into slots ``split0 ...`` of ``partials``
    (``(m, l, acc)``: ``[b·hk, slots, BLOCK_G]`` twice and ``[b·hk, slots, BLOCK_G, BLOCK_D]``, float32)."""
    m, l, acc = partials
    b, h, _, d = query.shape
    kc, kz, ks, vc, vz, vs = (t.contiguous() for t in (key.codes, key.zero, key.step, value.codes, value.zero,
                                                         value.step))  # no-ops for the cache's own tensors
    hk = kc.shape[1]
    block_g, block_d = m.shape[2], acc.shape[3]
    _segment_kernel[(b * hk, triton.cdiv(seg_len, split_len))](
        query, kc, kz, ks, vc, vz, vs, value_scale, m, l, acc,
        scaling, 1.0 if softcap is None else softcap, seg_len, k_row0, v_row0, key.group, value.group, split_len,
        split0, m.shape[1], hk, h // hk,
        query.stride(0), query.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        kz.stride(0), kz.stride(1), kz.stride(2), vc.stride(0), vc.stride(1),
        vz.stride(0), vz.stride(1), value_scale.stride(0),
        D=d, K_BITS=key.bits, V_BITS=value.bits, V_ROWWISE=value.group % d == 0, BLOCK_D=block_d,
        BLOCK_G=block_g, BLOCK_N=block_n, SOFTCAP=softcap is not None, PREC=_prec(query.dtype), num_warps=num_warps)

"""Split-K decode attention (flash-decoding) over one segment of a packed ZipCache block.

A *segment* is a contiguous range of a block's stored rows whose keys come from one channel-wise quantised key
tensor and whose values from one CSTQuant value tensor (a block stored salient first has two). The grid is
``(sequence × KV head, split)``: each program streams its split of the segment once for the whole GQA group (the
group's queries padded to ``BLOCK_G >= 16`` rows, so both products are ``tl.dot``\\s) and runs an online softmax.
A tile of codes is one contiguous load of its rows' bytes, split in registers into channel order (:func:`_codes`;
PTX on the GPU); tiles are aligned to the key tensor's rows, so each lies in one key group. Nothing is dequantised:
the quantisation parameters move to the small side of each product, ``q·k = (q∘step)·codes + q·zero`` per key
group (channel-wise keys) and ``p·v = (p∘step)·codes + p·zero`` per token (CSTQuant values), so the tile-sized work
is the unpacking and two matrix products, and the bytes read are the packed codes plus one parameter row per 128
keys or per token (the values' channel scale, a column factor, is applied once to the accumulator). It writes a
partial ``(max, sum, accumulator)`` per query row into slot ``split0 + split`` of buffers shared by every segment of
the step. ``_finish_kernel`` then attends the full-precision tokens (sinks + recent buffer) the same way and folds
every slot in (logsumexp merge, several slots at a time, one program per head and channel chunk), writing the output
(and, for probe steps, each query's logsumexp): one launch per segment, plus one.

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


def _unpack_asm(bits: int) -> str:
    """PTX unpacking one 32-bit register (two 16-bit words of packed codes) into ``16 // bits`` registers of two
    fp16 each: register ``k`` gets code ``k`` of both words, centred. Per register one shift, one ``lop3`` (mask,
    then OR in the exponent of 1024: ``0x6400 | code`` is the fp16 ``1024 + code``) and one ``sub.f16x2`` of
    ``1024 + 2**(bits-1)``: about 1.5 instructions per code instead of the ~5 of byte extracts and conversions."""
    per, mask = 16 // bits, (1 << bits) - 1
    lines = ["{", ".reg .b32 t, m;", f"mov.b32 m, {(0x6400 + (1 << (bits - 1))) * 0x10001:#x};"]
    for k in range(per):
        source = f"${per}"
        if k:
            lines.append(f"shr.b32 t, {source}, {k * bits};")
            source = "t"
        lines.append(f"lop3.b32 ${k}, {source}, {mask * 0x10001:#x}, 0x64006400, 0xEA;")
        lines.append(f"sub.rn.f16x2 ${k}, ${k}, m;")
    return "\n".join(lines + ["}"])


_UNPACK2, _UNPACK4, _UNPACK8 = (tl.constexpr(_unpack_asm(bits)) for bits in (2, 4, 8))


@triton.jit
def _codes(row_ptrs, row_mask, BITS: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, MMA: tl.constexpr,
           ASM: tl.constexpr):
    """The codes of ``BLOCK_N`` rows (``row_ptrs``: each row's first byte) as ``[BLOCK_N, BLOCK_D]`` product
    operands in channel order, centred (minus ``2**(BITS-1)``: half the magnitude, half the rounding of the products
    they enter). One contiguous load of the rows' bytes (vectorised, each byte read once); the codes of a word are
    split and put side by side with ``tl.interleave`` (in registers: code ``i`` of byte ``j`` is channel
    ``j·per + i``, the packing's order). ``ASM`` (compiled fp16 operands, rows of whole 16-bit words): the split
    and the conversion in PTX (:func:`_unpack_asm`); else Triton operations (the interpreter), where 16-bit operands
    still skip the int→float conversion: ``code | 0x6400`` read as fp16 is exactly ``1024 + code``."""
    ROW_BYTES: tl.constexpr = BLOCK_D * BITS // 8
    if ASM:
        offs = tl.arange(0, ROW_BYTES // 2)
        words = tl.load(row_ptrs.to(tl.pointer_type(tl.int16))[:, None] + offs[None, :],
                        mask=row_mask[:, None] & (offs < D * BITS // 16)[None, :], other=0)
        if BITS == 8:
            c0, c1 = tl.inline_asm_elementwise(_UNPACK8, "=r,=r,r", [words], (tl.float16,) * 2, True, 2)
            return tl.interleave(c0, c1)
        elif BITS == 4:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(_UNPACK4, "=r,=r,=r,=r,r", [words], (tl.float16,) * 4, True,
                                                       2)
            return tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))
        else:
            c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                _UNPACK2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], (tl.float16,) * 8, True, 2)
            return tl.interleave(tl.interleave(tl.interleave(c0, c4), tl.interleave(c2, c6)),
                                 tl.interleave(tl.interleave(c1, c5), tl.interleave(c3, c7)))
    offs = tl.arange(0, ROW_BYTES)
    x = tl.load(row_ptrs[:, None] + offs[None, :], mask=row_mask[:, None] & (offs < D * BITS // 8)[None, :], other=0)
    if BITS == 4:
        x = tl.interleave(x & 15, x >> 4)
    elif BITS == 2:
        x = tl.interleave(tl.interleave(x & 3, (x >> 4) & 3), tl.interleave((x >> 2) & 3, x >> 6))
    if MMA == tl.float16:
        return (x.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + (1 << (BITS - 1)))
    return x.to(MMA) - (1 << (BITS - 1))


#: row counts and offsets differ from block to block and step to step: specialising on them (``% 16 == 0``) compiles
#: another kernel (seconds) in the middle of a decode whenever one first turns (in)divisible; strides stay specialised
_ROW_ARGS = ["seg_len", "k_row0", "v_row0", "lead", "split_len", "split0", "n_slots", "fp_len"]


@triton.jit(do_not_specialize=[a for a in _ROW_ARGS if a != "fp_len"])
def _segment_kernel(Q, KC, KZ, KS, VC, VZ, VS, VSCALE, M, L, ACC,
                    scaling, softcap, seg_len, k_row0, v_row0, lead, k_group, v_group, split_len, split0,
                    n_slots, hk, g,
                    stride_qb, stride_qh, stride_kcb, stride_kch, stride_kcn, stride_kzb, stride_kzh, stride_kzg,
                    stride_vcb, stride_vcn, stride_vzb, stride_vzn, stride_vsb,
                    D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_ROWWISE: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                    MMA: tl.constexpr, PREC: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr):
    pid = tl.program_id(0)  # = sequence * hk + KV head
    split = tl.program_id(1)
    seq = (pid // hk).to(tl.int64)  # a sequence's packed codes pass 2**31 bytes from 4 sequences of 1M tokens
    kv = pid % hk
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + seq * stride_qb + (kv * g + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_g < g)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    kc_base = KC + seq * stride_kcb + kv * stride_kch
    kz_base = seq * stride_kzb + kv * stride_kzh + offs_d
    vc_base = VC + seq * stride_vcb + kv * (D * V_BITS // 8)  # this head's channels: kv·D .. kv·D + D - 1
    vz_base = seq * stride_vzb
    chan = kv * D + offs_d

    # tiles are aligned to the key tensor's rows (tile t holds key rows t·BLOCK_N ...): the host keeps BLOCK_N a
    # divisor of the key group, so a tile lies in one group. ``r`` counts rows from the segment's first tile, whose
    # first ``lead`` rows belong to the previous segment (masked).
    start = split * split_len
    end = tl.minimum(start + split_len, lead + seg_len)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    z_acc = tl.zeros((BLOCK_G,), tl.float32)  # rowwise values: sum of p · zero, added to every channel at the end
    for n0 in range(start, end, BLOCK_N):
        r = n0 + tl.arange(0, BLOCK_N)
        r_mask = (r >= lead) & (r < end)
        # keys, never dequantised: k = zero + code · step per channel of the tile's group, so q·k = (q∘step)·code +
        # q·zero (centred codes: zero + half · step)
        k_rows = k_row0 - lead + r
        codes = _codes(kc_base + k_rows * stride_kcn, r_mask, K_BITS, BLOCK_D, D, MMA, K_ASM)
        # the group's parameters loaded once per query row (L1 hits): in the query's layout, no shuffle to it
        kz_ptrs = kz_base[None, :] + ((k_row0 - lead + n0) // k_group) * stride_kzg + 0 * offs_g[:, None]
        k_step = tl.load(KS + kz_ptrs, mask=d_ok[None, :], other=0.0).to(tl.float32)
        k_zero = tl.load(KZ + kz_ptrs, mask=d_ok[None, :], other=0.0).to(tl.float32) + (1 << (K_BITS - 1)) * k_step
        s = tl.dot((q * k_step).to(MMA), tl.trans(codes), input_precision=PREC)
        s = (s + tl.sum(q * k_zero, axis=1)[:, None]) * scaling  # [BLOCK_G, BLOCK_N]
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(r_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)

        v_rows = v_row0 - lead + r
        v_codes = _codes(vc_base + v_rows * stride_vcn, r_mask, V_BITS, BLOCK_D, D, MMA, V_ASM)
        if V_ROWWISE:  # one zero/step per token: sum_r p·(zero + code·step) = (p∘step)·codes + sum_r p·zero
            vz_ptrs = vz_base + v_rows * stride_vzn + (kv * D) // v_group
            v_step = tl.load(VS + vz_ptrs, mask=r_mask, other=0.0).to(tl.float32)
            v_zero = tl.load(VZ + vz_ptrs, mask=r_mask, other=0.0).to(tl.float32) + (1 << (V_BITS - 1)) * v_step
            pv = tl.dot((p * v_step[None, :]).to(MMA), v_codes, input_precision=PREC)
            z_acc = z_acc * alpha + tl.sum(p * v_zero[None, :], axis=1)
        else:  # groups of channels within a head: dequantise the tile
            tile = r_mask[:, None] & d_ok[None, :]
            vz_ptrs = vz_base + v_rows[:, None] * stride_vzn + (chan // v_group)[None, :]
            v = (tl.load(VZ + vz_ptrs, mask=tile, other=0.0).to(tl.float32)
                 + (v_codes.to(tl.float32) + (1 << (V_BITS - 1))) * tl.load(VS + vz_ptrs, mask=tile,
                                                                            other=0.0).to(tl.float32))
            pv = tl.dot(p.to(MMA), v.to(MMA), input_precision=PREC)
        # still channel-normalised: the channel scale is a column factor, applied once at the end
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    channel_scale = tl.load(VSCALE + seq * stride_vsb + chan, mask=d_ok, other=0.0).to(tl.float32)
    acc = (acc + z_acc[:, None]) * channel_scale[None, :]
    slot = pid * n_slots + split0 + split
    tl.store(M + slot * BLOCK_G + offs_g, m_i)
    tl.store(L + slot * BLOCK_G + offs_g, l_i)
    tl.store(ACC + (slot * BLOCK_G + offs_g)[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit(do_not_specialize=["fp_len", "n_slots"])
def _finish_kernel(Q, K, V, M, L, ACC, OUT, LSE, scaling, softcap, fp_len, n_slots, hk, g,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_ob, stride_oh,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, SOFTCAP: tl.constexpr, WRITE_LSE: tl.constexpr,
                   PREC: tl.constexpr):
    """Grid ``(sequence × KV head, channel chunk)``: each program scores the full-precision tokens (all channels)
    and merges the partials of its ``BLOCK_C`` output channels, ``BLOCK_S`` slots at a time (a merge one slot at a
    time is a chain of dependent loads: ~130 slots per head at b = 1 took about as long as the segments)."""
    pid = tl.program_id(0)  # = sequence * hk + KV head
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    seq = pid // hk
    kv = pid % hk
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    c_mask = offs_c < D
    q = tl.load(Q + seq * stride_qb + (kv * g + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_g < g)[:, None] & d_mask[None, :], other=0.0)
    k_base = K + seq * stride_kb + kv * stride_kh
    v_base = V + seq * stride_vb + kv * stride_vh
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_C), tl.float32)
    for n0 in range(0, fp_len, BLOCK_N):  # the full-precision tokens
        rows = n0 + tl.arange(0, BLOCK_N)
        r_mask = rows < fp_len
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=r_mask[:, None] & d_mask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scaling
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(r_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_c[None, :], mask=r_mask[:, None] & c_mask[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    for s0 in range(0, n_slots, BLOCK_S):  # the quantised segments' splits, BLOCK_S at a time
        slot = s0 + tl.arange(0, BLOCK_S)
        row = (pid * n_slots + slot)[:, None] * BLOCK_G + offs_g[None, :]  # [BLOCK_S, BLOCK_G]
        s_mask = (slot < n_slots)[:, None]
        m_s = tl.load(M + row, mask=s_mask, other=float("-inf"))
        m_new = tl.maximum(m_i, tl.max(m_s, axis=0))
        alpha = tl.exp(m_i - m_new)
        beta = tl.exp(m_s - m_new[None, :])  # 0 for the masked slots
        acc_s = tl.load(ACC + row[:, :, None] * BLOCK_D + offs_c[None, None, :], mask=s_mask[:, :, None], other=0.0)
        acc = acc * alpha[:, None] + tl.sum(acc_s * beta[:, :, None], axis=0)
        l_i = l_i * alpha + tl.sum(tl.load(L + row, mask=s_mask, other=0.0) * beta, axis=0)
        m_i = m_new
    out = acc / l_i[:, None]
    if WRITE_LSE:  # [b, h]: the softmax's log-normaliser per query head, from the first channel chunk
        if tl.program_id(1) == 0:
            tl.store(LSE + seq * hk * g + kv * g + offs_g, m_i + tl.log(l_i), mask=offs_g < g)
    tl.store(OUT + seq * stride_ob + (kv * g + offs_g)[:, None] * stride_oh + offs_c[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_g < g)[:, None] & c_mask[None, :])


def _mma_dtype(dtype: torch.dtype):
    """The segment kernel's product operands: fp16 for 16-bit inputs (bf16 too: 3 more mantissa bits for q∘step
    and p∘step, magnitudes fp16 holds), fp32 for fp32."""
    return tl.float32 if dtype == torch.float32 else tl.float16


def _asm_unpack(query: torch.Tensor, d: int, bits: int) -> bool:
    """Whether the codes take the PTX unpacking: compiled (not the interpreter), fp16 operands, whole 16-bit words
    per row."""
    return query.is_cuda and _mma_dtype(query.dtype) == tl.float16 and d * bits % 16 == 0


def _prec(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None  # fp32 inputs: exact dots, no TF32


def launch_finish(query, keys, values, partials, out, lse, *, scaling: float, softcap: float | None, block_n: int,
                  num_warps: int, block_c: int = 32, block_s: int = 8) -> None:
    """``out [b, 1, h, d]`` from the full-precision ``keys``/``values`` and every slot of ``partials``; each query
    head's logsumexp into ``lse [b, h]`` (float32) unless it is None. ``block_c`` output channels per program,
    ``block_s`` slots merged at once."""
    m, l, acc = partials
    b, h, _, d = query.shape
    hk = keys.shape[1]
    block_d = acc.shape[3]
    block_c = min(block_c, block_d)
    _finish_kernel[(b * hk, triton.cdiv(d, block_c))](
        query, keys, values, m, l, acc, out, out if lse is None else lse, scaling,
        1.0 if softcap is None else softcap, keys.shape[2], m.shape[1], hk, h // hk, query.stride(0), query.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        out.stride(0), out.stride(2),
        D=d, BLOCK_D=block_d, BLOCK_C=block_c, BLOCK_G=m.shape[2], BLOCK_N=block_n, BLOCK_S=block_s,
        SOFTCAP=softcap is not None, WRITE_LSE=lse is not None, PREC=_prec(query.dtype), num_warps=num_warps)


def launch_segment(query, key, value, value_scale, partials, *, seg_len: int, k_row0: int, v_row0: int, lead: int,
                   split_len: int, split0: int, scaling: float, softcap: float | None, block_n: int,
                   num_warps: int, num_stages: int | None = None) -> None:
    """Partials of the segment's ``cdiv(lead + seg_len, split_len)`` splits into slots ``split0 ...`` of
    ``partials`` (``(m, l, acc)``: ``[b·hk, slots, BLOCK_G]`` twice and ``[b·hk, slots, BLOCK_G, BLOCK_D]``,
    float32). ``lead = k_row0 % block_n``: the rows of the segment's first key-aligned tile that precede it."""
    m, l, acc = partials
    b, h, _, d = query.shape
    kc, kz, ks, vc, vz, vs = (t.contiguous() for t in (key.codes, key.zero, key.step, value.codes, value.zero,
                                                         value.step))  # no-ops for the cache's own tensors
    hk = kc.shape[1]
    block_g, block_d = m.shape[2], acc.shape[3]
    stages = {} if num_stages is None else {"num_stages": num_stages}
    _segment_kernel[(b * hk, triton.cdiv(lead + seg_len, split_len))](
        query, kc, kz, ks, vc, vz, vs, value_scale, m, l, acc,
        scaling, 1.0 if softcap is None else softcap, seg_len, k_row0, v_row0, lead, key.group, value.group,
        split_len, split0, m.shape[1], hk, h // hk,
        query.stride(0), query.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        kz.stride(0), kz.stride(1), kz.stride(2), vc.stride(0), vc.stride(1),
        vz.stride(0), vz.stride(1), value_scale.stride(0),
        D=d, K_BITS=key.bits, V_BITS=value.bits, V_ROWWISE=value.group % d == 0, BLOCK_D=block_d,
        BLOCK_G=block_g, BLOCK_N=block_n, SOFTCAP=softcap is not None, MMA=_mma_dtype(query.dtype),
        PREC=_prec(query.dtype), K_ASM=_asm_unpack(query, d, key.bits), V_ASM=_asm_unpack(query, d, value.bits),
        num_warps=num_warps, **stages)

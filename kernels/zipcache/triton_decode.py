"""Split-K decode attention (flash-decoding) over one segment of a packed ZipCache block.

A *segment* is a contiguous range of a block's stored rows whose keys come from one channel-wise quantised key
tensor and whose values from one CSTQuant value tensor (a block stored salient first has two). The grid is
``(sequence × KV head, split)``: each program streams its split of the segment once for the whole GQA group (the
group's queries are the rows of both products, ``tl.dot``\\s of ``BLOCK_G >= g`` rows: the compiler pads them to
the tensor cores' 16, the softmax runs on the real ones only) and runs an online softmax. Codes travel as 16-bit
words: the compiler loads a tile's words straight into the product's operand layout and :func:`_codes` unpacks
them there, one operand per code position ``k`` of a word (channels ``k, k + PER, ...``), so each product is a sum
of ``PER`` smaller ones and queries, parameters and outputs are taken at stride ``PER``. Tiles are aligned to the
key tensor's rows, so each lies in one key group. Nothing is dequantised: the quantisation parameters move to the
small side of each product, ``q·k = (q∘step)·codes + q·zero`` per key group (channel-wise keys) and ``p·v =
(p∘step)·codes + p·zero`` per token (CSTQuant values), so the tile-sized work is the unpacking and the products, and
the bytes read are the packed codes plus one parameter row per key group or per token (the values' channel scale,
a column factor, is applied once to the accumulator). It writes a partial ``(max, sum, accumulator)`` per query
row into slot ``split0 + split`` of buffers shared by every segment of the step. ``_finish_kernel`` then attends
the full-precision tokens (sinks + recent buffer) the same way and folds every slot in (logsumexp merge, several
slots at a time, one program per head and channel chunk), writing the output (and, for probe steps, each query's
logsumexp): one launch per segment, plus one.

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


def code_scales(bits: int) -> list[int]:
    """The factor each code of a 16-bit word carries once unpacked (:func:`_codes`): code ``k`` is masked in place
    inside its byte, so it comes out multiplied by ``2**(k·bits mod 8)``; the products divide it back out on their
    small side."""
    return [1 << (k * bits % 8) for k in range(16 // bits)]


def _unpack_asm(bits: int) -> str:
    """PTX unpacking one 32-bit register (two 16-bit words of packed codes) into ``16 // bits`` registers of two
    fp16 each: register ``k`` gets code ``k`` of both words, centred and scaled, ``(code - 2**(bits-1))·scale_k``
    (:func:`code_scales`). Per register one ``lop3`` (mask the code in place, OR in the exponent of 1024: ``0x6400 |
    x`` is the fp16 ``1024 + x`` for ``x < 1024``) and one ``sub.f16x2``, plus a shift for the high byte: about one
    instruction per 4-bit code. Centred, not offset by 1024: the tensor cores' fp32 sums truncate, and an offset
    cancelled after thousands of tokens lost the values' low bits."""
    per, mask = 16 // bits, (1 << bits) - 1
    lines = ["{", ".reg .b32 t, m;"]
    for k, scale in enumerate(code_scales(bits)):
        source = f"${per}"
        if k * bits >= 8:
            if (k - 1) * bits < 8:
                lines.append(f"shr.b32 t, ${per}, 8;")
            source = "t"
        lines.append(f"lop3.b32 ${k}, {source}, {(mask << (k * bits % 8)) * 0x10001:#x}, 0x64006400, 0xEA;")
        centre = 0x6400 + (1 << (bits - 1)) * scale  # the fp16 bits of 1024 + midpoint·scale
        lines += [f"mov.b32 m, {centre * 0x10001:#x};", f"sub.rn.f16x2 ${k}, ${k}, m;"]
    return "\n".join(lines + ["}"])


_UNPACK2, _UNPACK4, _UNPACK8 = (tl.constexpr(_unpack_asm(bits)) for bits in (2, 4, 8))


@triton.jit
def _codes(words, BITS: tl.constexpr, MMA: tl.constexpr, ASM: tl.constexpr):
    """The ``16 // BITS`` codes of each 16-bit word of ``words`` (int16, any shape) as a tuple of product operands
    shaped like ``words``: element ``k`` holds code ``k`` of every word, centred and scaled, ``(code -
    2**(BITS-1))·scale_k`` (:func:`code_scales`; exact in fp16). Each operand keeps the words' layout: the compiler
    loads the words straight into the product's operand layout and unpacks them there (no shared-memory trip for the
    codes, no register shuffles). ``ASM``: the unpacking in PTX (:func:`_unpack_asm`); else Triton operations (the
    interpreter)."""
    if ASM:
        if BITS == 8:
            return tl.inline_asm_elementwise(_UNPACK8, "=r,=r,r", [words], (tl.float16,) * 2, True, 2)
        elif BITS == 4:
            return tl.inline_asm_elementwise(_UNPACK4, "=r,=r,=r,=r,r", [words], (tl.float16,) * 4, True, 2)
        else:
            return tl.inline_asm_elementwise(_UNPACK2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], (tl.float16,) * 8,
                                             True, 2)
    out = ()
    for k in tl.static_range(16 // BITS):
        code = (words >> (k * BITS // 8 * 8)) & (((1 << BITS) - 1) << (k * BITS % 8))
        out = out + ((code.to(tl.float32) - (1 << (BITS - 1)) * (1 << (k * BITS % 8))).to(MMA),)
    return out


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _zeros_tuple(SHAPE: tl.constexpr, COUNT: tl.constexpr):
    out = ()
    for _ in tl.static_range(COUNT):
        out = out + (tl.zeros(SHAPE, tl.float32),)
    return out


@triton.jit
def _params(n0, lead, end, rows, sizes, KS, KZ, kz_base, VS, VZ, vz_base, D: tl.constexpr, K_BITS: tl.constexpr,
            V_ROWWISE: tl.constexpr, BLOCK_N: tl.constexpr, K_WORDS: tl.constexpr):
    """The quantisation parameters of the tile at row ``n0``, as stored: its key group's step and zero (one
    ``[BLOCK_G, K_WORDS]`` tensor per code position, in the queries' layout) and, for rowwise values, each row's
    step and zero. The pipelined loop loads them a tile ahead: Triton streams the codes ahead (``num_stages``) but not
    these 2-byte-a-thread loads, and waiting on them each tile cost 12 % at 131k tokens, b = 1 (H200)."""
    k_words_ptr, k_row, v_words_ptr, v_row = rows
    k_group, k_row_words, stride_kzg, v_group, v_row_words, stride_vzn, kv, scaling, softcap = sizes
    K_PER: tl.constexpr = 16 // K_BITS
    offs_kw = tl.arange(0, K_WORDS)
    kz_ptrs = kz_base + ((k_row + n0) // k_group) * stride_kzg
    k_steps = ()
    k_zeros = ()
    for k in tl.static_range(K_PER):
        chan = offs_kw * K_PER + k
        mask = ((chan < D) & (chan * 0 + n0 < end))[None, :]  # past the segment's end: no such key group
        k_steps = k_steps + (tl.load(KS + kz_ptrs + chan[None, :], mask=mask, other=0.0),)
        k_zeros = k_zeros + (tl.load(KZ + kz_ptrs + chan[None, :], mask=mask, other=0.0),)
    v_steps = 0.0  # grouped values: parameters per channel group, loaded with the tile
    v_zeros = 0.0
    if V_ROWWISE:
        r = n0 + tl.arange(0, BLOCK_N)
        r_mask = (r >= lead) & (r < end)
        vz_ptrs = vz_base + (v_row + r) * stride_vzn + (kv * D) // v_group
        v_steps = tl.load(VS + vz_ptrs, mask=r_mask, other=0.0)
        v_zeros = tl.load(VZ + vz_ptrs, mask=r_mask, other=0.0)
    return k_steps, k_zeros, v_steps, v_zeros


@triton.jit
def _tile(state, params, n0, lead, end, qs, rows, sizes, VS, VZ, vz_base,
          D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_ROWWISE: tl.constexpr,
          BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, K_WORDS: tl.constexpr, SOFTCAP: tl.constexpr,
          MMA: tl.constexpr, PREC: tl.constexpr, ASM: tl.constexpr, MASKED: tl.constexpr):
    """One tile of ``BLOCK_N`` rows from row ``n0`` into the online-softmax ``state`` ``(max, sum, accumulators,
    value zero sum)``; ``params``: the tile's :func:`_params`. ``rows``: the first tile row's key words, key row,
    value words, value row; ``sizes``: key group, key words per row, key group stride, value group, value words per
    row, value parameter stride, KV head, scaling, softcap. ``MASKED``: rows outside ``[lead, end)`` are dropped (a
    segment's first and last tiles)."""
    m_i, l_i, acc, pz_sum = state
    k_steps, k_zeros, v_steps, v_zeros = params
    k_words_ptr, k_row, v_words_ptr, v_row = rows
    k_group, k_row_words, stride_kzg, v_group, v_row_words, stride_vzn, kv, scaling, softcap = sizes
    K_PER: tl.constexpr = 16 // K_BITS
    V_PER: tl.constexpr = 16 // V_BITS
    offs_kw = tl.arange(0, K_WORDS)
    offs_vw = tl.arange(0, acc[0].shape[1])
    r = n0 + tl.arange(0, BLOCK_N)
    r_mask = (r >= lead) & (r < end)
    k_mask = offs_kw < D // K_PER  # padding words (past the row)
    v_mask = offs_vw < D // V_PER
    if MASKED:
        k_mask = r_mask[:, None] & k_mask[None, :]
        v_mask = r_mask[:, None] & v_mask[None, :]
    else:
        k_mask = k_mask[None, :]
        v_mask = v_mask[None, :]
    # keys, never dequantised: k = zero + step·code per channel of the tile's group, and the operand holds
    # (code - mid)·scale, so q·k = sum_k (q∘step/scale)·operand + q·(zero + mid·step), the last once per tile
    k_words = tl.load(k_words_ptr + r[:, None] * k_row_words + offs_kw[None, :], mask=k_mask, other=0)
    k_codes = _codes(k_words, K_BITS, MMA, ASM)
    s = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
    bias = tl.zeros((BLOCK_G, K_WORDS), tl.float32)
    for k in tl.static_range(K_PER):
        k_step = k_steps[k].to(tl.float32)
        k_zero = k_zeros[k].to(tl.float32)
        q_step = (qs[k] * k_step * (1.0 / (1 << (k * K_BITS % 8)))).to(MMA)
        bias += qs[k] * (k_zero + (1 << (K_BITS - 1)) * k_step)
        s = tl.dot(q_step, tl.trans(k_codes[k]), s, input_precision=PREC)
    s = s + tl.sum(bias, axis=1)[:, None]  # [BLOCK_G, BLOCK_N], log2 units
    if SOFTCAP:
        s = (softcap * 1.4426950408889634) * _tanh(s * (scaling / (softcap * 1.4426950408889634)))
    if MASKED:
        s = tl.where(r_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)

    v_rows = v_row + r
    v_words = tl.load(v_words_ptr + r[:, None] * v_row_words + offs_vw[None, :], mask=v_mask, other=0)
    v_codes = _codes(v_words, V_BITS, MMA, ASM)
    new_acc = ()
    if V_ROWWISE:  # one zero/step per token: sum_r p·(zero + step·code) = (p∘step)·operand/scale + p·v_mid
        v_step = v_steps.to(tl.float32)
        v_mid = v_zeros.to(tl.float32) + (1 << (V_BITS - 1)) * v_step
        p_step = (p * v_step[None, :]).to(MMA)
        for k in tl.static_range(V_PER):
            new_acc = new_acc + (tl.dot(p_step, v_codes[k], acc[k] * alpha[:, None], input_precision=PREC),)
        l_tile, pz_tile = tl.reduce((p, p * v_mid[None, :]), 1, _add2)
        pz_sum = pz_sum * alpha + pz_tile
    else:  # groups of channels within a head: dequantise the tile
        for k in tl.static_range(V_PER):
            v_chan = offs_vw * V_PER + k
            tile = r_mask[:, None] & (v_chan < D)[None, :]
            vz_ptrs = vz_base + v_rows[:, None] * stride_vzn + ((kv * D + v_chan) // v_group)[None, :]
            code = v_codes[k].to(tl.float32) * (1.0 / (1 << (k * V_BITS % 8))) + (1 << (V_BITS - 1))
            v = (tl.load(VZ + vz_ptrs, mask=tile, other=0.0).to(tl.float32)
                 + code * tl.load(VS + vz_ptrs, mask=tile, other=0.0).to(tl.float32))
            new_acc = new_acc + (tl.dot(p.to(MMA), v.to(MMA), acc[k] * alpha[:, None], input_precision=PREC),)
        l_tile = tl.sum(p, axis=1)
    return m_new, l_i * alpha + l_tile, new_acc, pz_sum


#: row counts and offsets differ from block to block and step to step: specialising on them (``% 16 == 0``) compiles
#: another kernel (seconds) in the middle of a decode whenever one first turns (in)divisible; strides stay specialised
@triton.jit(do_not_specialize=["seg_len", "k_row0", "v_row0", "lead", "split_len", "split0", "n_slots"])
def _segment_kernel(Q, KC, KZ, KS, VC, VZ, VS, VSCALE, M, L, ACC,
                    scaling, softcap, seg_len, k_row0, v_row0, lead, k_group, v_group, split_len, split0,
                    n_slots, hk, g,
                    stride_qb, stride_qh, stride_kcb, stride_kch, stride_kcn, stride_kzb, stride_kzh, stride_kzg,
                    stride_vcb, stride_vcn, stride_vzb, stride_vzn, stride_vsb,
                    D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, V_ROWWISE: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, K_WORDS: tl.constexpr,
                    SOFTCAP: tl.constexpr, MMA: tl.constexpr, PREC: tl.constexpr, ASM: tl.constexpr,
                    PDL: tl.constexpr):
    """``K_WORDS``: the key words per row the score product runs over, ``BLOCK_D·K_BITS/16`` padded to the 16 a
    compiled product needs at least (masked: the padding's queries are zero). ``PDL``: programmatic dependent
    launch (Hopper on): the step's next launch may start once every program of this one runs, and this one, if
    itself launched early, completes only after the launch before it (so the finish kernel's wait covers all;
    its own slots are its own, so it streams and stores meanwhile)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)  # = sequence * hk + KV head
    split = tl.program_id(1)
    seq = (pid // hk).to(tl.int64)  # a sequence's packed codes pass 2**31 bytes from 4 sequences of 1M tokens
    kv = pid % hk
    K_PER: tl.constexpr = 16 // K_BITS
    V_PER: tl.constexpr = 16 // V_BITS
    V_WORDS: tl.constexpr = BLOCK_D // V_PER
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < g
    offs_kw = tl.arange(0, K_WORDS)
    offs_vw = tl.arange(0, V_WORDS)
    # code k of word w is channel w·PER + k: the products run per code position k over the words, so the queries,
    # the key parameters and the output channels are taken at stride PER
    q_ptrs = Q + seq * stride_qb + (kv * g + offs_g)[:, None] * stride_qh
    # scores in base 2 (exp2), the scaling folded into the queries (unless the logits are capped first)
    q_scale = 1.4426950408889634 if SOFTCAP else scaling * 1.4426950408889634
    qs = ()
    for k in tl.static_range(K_PER):
        chan = offs_kw * K_PER + k
        qs = qs + (tl.load(q_ptrs + chan[None, :], mask=g_ok[:, None] & (chan < D)[None, :], other=0.0
                           ).to(tl.float32) * q_scale,)
    kc_base = (KC + seq * stride_kcb + kv * stride_kch).to(tl.pointer_type(tl.int16))
    kz_base = seq * stride_kzb + kv * stride_kzh + 0 * offs_g[:, None]  # [BLOCK_G, 1]: parameters in q's layout
    vc_base = (VC + seq * stride_vcb + kv * (D * V_BITS // 8)).to(tl.pointer_type(tl.int16))  # this head's words
    vz_base = seq * stride_vzb

    # tiles are aligned to the key tensor's rows (tile t holds key rows t·BLOCK_N ...): the host keeps BLOCK_N a
    # divisor of the key group, so a tile lies in one group. Rows count from the segment's first tile, whose first
    # ``lead`` rows belong to the previous segment; a split's tiles are whole but the segment's first (when ``lead``)
    # and its last: those two are masked, the pipelined loop over the others is not.
    start = split * split_len
    end = tl.minimum(start + split_len, lead + seg_len)
    state = (tl.full((BLOCK_G,), float("-inf"), tl.float32),  # running max (log2 units), sum
             tl.zeros((BLOCK_G,), tl.float32),
             _zeros_tuple((BLOCK_G, V_WORDS), V_PER),  # accumulators per code position: channels k, k + PER, ...
             tl.zeros((BLOCK_G,), tl.float32))  # rowwise values: sum of p·(zero + midpoint·step), added at the end
    rows = (kc_base + (k_row0 - lead) * (stride_kcn // 2), k_row0 - lead, vc_base + (v_row0 - lead) * (stride_vcn // 2),
            v_row0 - lead)
    sizes = (k_group, stride_kcn // 2, stride_kzg, v_group, stride_vcn // 2, stride_vzn, kv, scaling, softcap)
    head = (start == 0) & (lead > 0)
    whole_end = start + (end - start) // BLOCK_N * BLOCK_N
    first = tl.where(head, start + BLOCK_N, start)
    params = _params(first, lead, end, rows, sizes, KS, KZ, kz_base, VS, VZ, vz_base, D, K_BITS, V_ROWWISE, BLOCK_N,
                     K_WORDS)
    for n0 in range(first, whole_end, BLOCK_N):
        ahead = _params(n0 + BLOCK_N, lead, end, rows, sizes, KS, KZ, kz_base, VS, VZ, vz_base, D, K_BITS, V_ROWWISE,
                        BLOCK_N, K_WORDS)
        state = _tile(state, params, n0, lead, end, qs, rows, sizes, VS, VZ, vz_base, D, K_BITS,
                      V_BITS, V_ROWWISE, BLOCK_G, BLOCK_N, K_WORDS, SOFTCAP, MMA, PREC, ASM, False)
        params = ahead
    if head:  # the masked tiles: the segment's first (rows before ``lead`` are the previous segment's) ...
        params = _params(0, lead, end, rows, sizes, KS, KZ, kz_base, VS, VZ, vz_base, D, K_BITS, V_ROWWISE, BLOCK_N,
                         K_WORDS)
        state = _tile(state, params, 0, lead, end, qs, rows, sizes, VS, VZ, vz_base, D, K_BITS,
                      V_BITS, V_ROWWISE, BLOCK_G, BLOCK_N, K_WORDS, SOFTCAP, MMA, PREC, ASM, True)
    if (whole_end < end) & (whole_end >= tl.where(head, BLOCK_N, 0)):  # ... and the split's last, part of a tile
        params = _params(whole_end, lead, end, rows, sizes, KS, KZ, kz_base, VS, VZ, vz_base, D, K_BITS, V_ROWWISE,
                         BLOCK_N, K_WORDS)
        state = _tile(state, params, whole_end, lead, end, qs, rows, sizes, VS, VZ, vz_base, D,
                      K_BITS, V_BITS, V_ROWWISE, BLOCK_G, BLOCK_N, K_WORDS, SOFTCAP, MMA, PREC, ASM, True)
    m_i, l_i, acc, pz_sum = state
    slot = pid * n_slots + split0 + split
    tl.store(M + slot * BLOCK_G + offs_g, m_i * 0.6931471805599453)  # natural log units for the merge
    tl.store(L + slot * BLOCK_G + offs_g, l_i)
    for k in tl.static_range(V_PER):
        chan = offs_vw * V_PER + k
        scale = 1.0 / (1 << (k * V_BITS % 8))
        out = acc[k]
        if V_ROWWISE:
            out = out * scale + pz_sum[:, None]
        # the values' channel scale is a column factor: applied once, here
        channel_scale = tl.load(VSCALE + seq * stride_vsb + kv * D + chan, mask=chan < D, other=0.0).to(tl.float32)
        tl.store(ACC + (slot * BLOCK_G + offs_g)[:, None] * BLOCK_D + chan[None, :], out * channel_scale[None, :],
                 mask=(chan < D)[None, :])
    if PDL:  # last: nothing of this program depends on the launch before it, only its completion does
        tl.extra.cuda.gdc_wait()


@triton.jit(do_not_specialize=["fp_len", "n_slots"])
def _finish_kernel(Q, K, V, M, L, ACC, OUT, LSE, scaling, softcap, fp_len, n_slots, hk, g,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_ob, stride_oh,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, SOFTCAP: tl.constexpr, WRITE_LSE: tl.constexpr,
                   PREC: tl.constexpr, PDL: tl.constexpr):
    """Grid ``(sequence × KV head, channel chunk)``: each program scores the full-precision tokens (all channels)
    and merges the partials of its ``BLOCK_C`` output channels, ``BLOCK_S`` slots at a time (a merge one slot at a
    time is a chain of dependent loads: ~130 slots per head at b = 1 took about as long as the segments). ``PDL``:
    launched while the segment kernels still run, it attends the full-precision tokens meanwhile and waits for
    them only before the merge."""
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
    if PDL:  # the partials are complete from here on
        tl.extra.cuda.gdc_wait()
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


def _prec(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None  # fp32 inputs: exact dots, no TF32


def launch_finish(query, keys, values, partials, out, lse, *, scaling: float, softcap: float | None, block_n: int,
                  num_warps: int, block_c: int = 16, block_s: int | None = None, pdl: bool = False) -> None:
    """``out [b, 1, h, d]`` from the full-precision ``keys``/``values`` and every slot of ``partials``; each query
    head's logsumexp into ``lse [b, h]`` (float32) unless it is None. ``block_c`` output channels per program,
    ``block_s`` slots merged at once (default: 128 on CUDA: the merge is a chain of dependent loads, and 16 rounds of
    8 slots took 24 µs of a 122 µs step at 131k, b = 1, on the H200, one round of 128 with 16 channels 7 µs; 8 in
    the interpreter, where masked slots cost time)."""
    m, l, acc = partials
    b, h, _, d = query.shape
    hk = keys.shape[1]
    block_d = acc.shape[3]
    block_c = min(block_c, block_d)
    block_s = block_s or (128 if query.is_cuda else 8)
    _finish_kernel[(b * hk, triton.cdiv(d, block_c))](
        query, keys, values, m, l, acc, out, out if lse is None else lse, scaling,
        1.0 if softcap is None else softcap, keys.shape[2], m.shape[1], hk, h // hk, query.stride(0), query.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        out.stride(0), out.stride(2),
        D=d, BLOCK_D=block_d, BLOCK_C=block_c, BLOCK_G=m.shape[2], BLOCK_N=block_n, BLOCK_S=block_s,
        SOFTCAP=softcap is not None, WRITE_LSE=lse is not None, PREC=_prec(query.dtype), PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl)


def launch_segment(query, key, value, value_scale, partials, *, seg_len: int, k_row0: int, v_row0: int, lead: int,
                   split_len: int, split0: int, scaling: float, softcap: float | None, block_n: int,
                   num_warps: int, num_stages: int | None = None, pdl: bool = False) -> None:
    """Partials of the segment's ``cdiv(lead + seg_len, split_len)`` splits into slots ``split0 ...`` of
    ``partials`` (``(m, l, acc)``: ``[b·hk, slots, BLOCK_G]`` twice and ``[b·hk, slots, BLOCK_G, BLOCK_D]``,
    float32). ``lead = k_row0 % block_n``: the rows of the segment's first key-aligned tile that precede it."""
    m, l, acc = partials
    b, h, _, d = query.shape
    kc, kz, ks, vc, vz, vs = (t.contiguous() for t in (key.codes, key.zero, key.step, value.codes, value.zero,
                                                         value.step))  # no-ops for the cache's own tensors
    hk = kc.shape[1]
    block_g, block_d = m.shape[2], acc.shape[3]
    options = {} if num_stages is None else {"num_stages": num_stages}
    if query.is_cuda and num_warps >= 4 and value.group % d == 0:
        # the parameters held a tile ahead (:func:`_params`) take registers: uncapped, Triton 3.6 gave d = 128 168 a
        # thread (3 programs of 4 warps a multiprocessor, 4 before), d = 256 169 (1 of 8 warps, 2 before); capped at
        # 128 none spill and 4 / 2 fit (H200, d = 128, 131k, b = 1: 0.0764 -> 0.0671 ms; the cap alone changed
        # nothing). Not for grouped values (they spill under it) nor narrower programs (fewer warps, more registers)
        options["maxnreg"] = 128
    _segment_kernel[(b * hk, triton.cdiv(lead + seg_len, split_len))](
        query, kc, kz, ks, vc, vz, vs, value_scale, m, l, acc,
        scaling, 1.0 if softcap is None else softcap, seg_len, k_row0, v_row0, lead, key.group, value.group,
        split_len, split0, m.shape[1], hk, h // hk,
        query.stride(0), query.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        kz.stride(0), kz.stride(1), kz.stride(2), vc.stride(0), vc.stride(1),
        vz.stride(0), vz.stride(1), value_scale.stride(0),
        D=d, K_BITS=key.bits, V_BITS=value.bits, V_ROWWISE=value.group % d == 0, BLOCK_D=block_d,
        BLOCK_G=block_g, BLOCK_N=block_n, K_WORDS=max(16, block_d * key.bits // 16), SOFTCAP=softcap is not None,
        MMA=_mma_dtype(query.dtype),
        PREC=_prec(query.dtype), ASM=query.is_cuda and _mma_dtype(query.dtype) == tl.float16,
        PDL=pdl, num_warps=num_warps, launch_pdl=pdl and split0 > 0, **options)  # a step's first launch: as usual

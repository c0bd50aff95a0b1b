"""Host side of the Triton normalised gated linear attention: launches, the autograd Function, the decode step.

``normalized_gla_triton(q, k, v, log_decay, initial_state=..., normalize=..., eps=..., output_final_state=...)``
returns ``(o, (S, z))`` like ``chunk.normalized_gla_chunked``; differentiable in q, k, v, log_decay and the initial
state. ``normalized_gla_step_triton`` is the fused decode step (no autograd). Kernels: ``triton_fwd.py`` /
``triton_bwd.py``. Per-chunk state snapshots (the only O(n/C * dk * dv) buffers) are kept in bf16 for bf16 inputs
and fp32 otherwise (fp16's range is too small for an unnormalised running sum); the carried state is fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .triton_bwd import _bwd_dk_kernel, _bwd_dq_kernel, _bwd_dstate_kernel, _bwd_dv_kernel, _bwd_pre_kernel
from .triton_fwd import _fwd_out_kernel, _fwd_state_kernel, _step_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LinearConfig:
    """Chunk length, tile widths and warps. ``state_bk/bv = 0``: picked per call (``_fwd_state_plan``,
    ``_dstate_blocks``) for the sequential state kernels (one program per (dk-block, dv-block, batch, KV head)).

    Warps: picked from ptxas register reports for sm_90 (bf16, C=64): at d=128 four warps spill 0.6-2.6 KB per
    thread in the backward kernels, eight warps spill <= 0.2 KB (dk); the state kernels spill at 64x64 tiles with
    four warps, not with eight. The output kernel is faster with four warps despite ~0.2 KB of spills (timed)."""
    chunk: int = 64
    state_bk: int = 0
    state_bv: int = 0
    out_bv: int = 128  # dv columns per output program (the q kᵀ tile is recomputed per dv block)
    bwd_bv: int = 64  # dv block of the dq/dk loops and of the dv kernel's grid
    warps: int = 8  # dq / dk / dv kernels (4 below d = 64)
    out_warps: int = 4  # output kernel: 2.15 vs 3.46 ms with 8 (H200, 131k tokens, d=128, 32 query heads)
    stages: int = 2
    snap_fp32: bool = False  # per-chunk S / dS snapshots in fp32 also for bf16 inputs (tf32 dots against them)
    state_segments: int = 0  # segments of the forward state walk (0: picked per call, ``_fwd_state_plan``)


def default_config() -> LinearConfig:
    if INTERPRET:  # CPU interpreter: few programs with big tiles are what is fast there
        return LinearConfig(chunk=32, state_bk=256, state_bv=256, out_bv=256, bwd_bv=256, stages=1)
    return LinearConfig()


CONFIG = default_config()


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else None


def _snap_dtype(dtype, cfg: LinearConfig):
    return torch.bfloat16 if dtype == torch.bfloat16 and not cfg.snap_fp32 else torch.float32


def _rowmajor(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _s3(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _sms(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


#: the forward state walk is cut into this many segments (at least this many chunks each) while one walk would run
#: fewer than this many programs a multiprocessor
_SEGMENTS = 16
_MIN_SEGMENT_CHUNKS = 16
_SEGMENT_BELOW_PROGRAMS_PER_SM = 2


def _dstate_blocks(cfg: LinearConfig, dk, dv, bhk, gp, device):
    """Tiles and warps of the backward state kernel (a reverse walk, not segmented). On the H200 (b=1, 8 KV heads,
    d=128, 131k tokens) the forward kernel's single walk took 2.4 ms at 32x32 tiles (128 programs), 3.7 at 16x16
    (512 programs) and 4.0 at 64x64 (48 programs); halved (dv first) only while the grid is under half the
    multiprocessors."""
    kp, vp = _p2(dk), _p2(dv)
    bk = min(kp, cfg.state_bk or 32)
    bv = min(vp, cfg.state_bv or 32)
    if not (cfg.state_bk or cfg.state_bv):
        while triton.cdiv(dk, bk) * triton.cdiv(dv, bv) * bhk < _sms(device) // 2 and max(bk, bv) > 16:
            if bv >= bk:
                bv //= 2
            else:
                bk //= 2
    # its rows are all ``gp`` query heads of a KV head at once: capped (ptxas, sm_90, bf16: no spills at 32x32 for
    # gp <= 4 and 16x32 for gp = 8), unless the config fixes them
    if cfg.state_bk or cfg.state_bv:
        return bk, bv, 4
    bk = min(bk, 32 if gp <= 4 else 16)
    bv = min(bv, 32)
    return bk, bv, 4 if gp <= 2 else 8


def _warps(cfg, dk, dv):
    return cfg.warps if max(dk, dv) >= 64 else min(cfg.warps, 4)


def _state_warps(bk, bv):
    return 4 if bk * bv <= 32 * 32 else 8


def _chunk_cumsum(a, nc: int, C: int):
    """Chunk-local inclusive cumulative log decays ``[b, hk, nc * C]`` fp32 (padding: 0, so flat to the chunk's end),
    or None without decays."""
    if a is None:
        return None
    b, hk, n = a.shape
    return torch.nn.functional.pad(a, (0, nc * C - n)).view(b, hk, nc, C).cumsum(-1).view(b, hk, nc * C)


def _fwd_state_plan(cfg: LinearConfig, dk, dv, bhk, nc, device) -> tuple[int, int, int]:
    """``(bk, bv, segments)`` of the forward state kernel. It streams k and v once per tile of the state, so wide
    tiles read less; a small grid of wide tiles is filled by cutting the walk into 16 segments (two passes,
    ``triton_fwd._fwd_state_kernel``; fewer than three segments do not pay for the second pass). H200, d = 128, 8 KV
    heads, 64x64 tiles, state kernel ms at 32k / 131k (``results/linear_state_segments.json``): b = 1 one walk 0.77 /
    3.12, 16 segments 0.38 / 1.45; b = 2 0.75 / 3.02 vs 0.66 / 2.51; b = 4 1.27 / 5.12 vs 1.22 / 4.71; b = 8 (2.9
    programs a multiprocessor in one walk) 1.97 vs 2.33 at 32k, so one walk from 2 programs a multiprocessor on."""
    bk = min(_p2(dk), cfg.state_bk or 64)
    bv = min(_p2(dv), cfg.state_bv or 64)
    if cfg.state_segments:
        return bk, bv, min(cfg.state_segments, nc)
    programs = triton.cdiv(dk, bk) * (triton.cdiv(dv, bv) + 1) * bhk  # + 1: the z programs
    if device.type != "cuda" or programs >= _SEGMENT_BELOW_PROGRAMS_PER_SM * _sms(device):
        return bk, bv, 1
    n_seg = min(nc // _MIN_SEGMENT_CHUNKS, _SEGMENTS)
    return bk, bv, n_seg if n_seg >= 3 else 1


def _states(k, v, bcum, s0, z0, nc, cfg, store_final, snap_dtype):
    """Run the state kernel: snapshots ``[b, hk, nc, dk, dv]`` (snap dtype) / ``[b, hk, nc, dk]`` fp32, final.
    ``bcum``: ``_chunk_cumsum`` of the log decays or None."""
    b, hk, n, dk = k.shape
    dv = v.shape[-1]
    dev = k.device
    hs = torch.empty(b, hk, nc, dk, dv, dtype=snap_dtype, device=dev)
    zs = torch.empty(b, hk, nc, dk, dtype=torch.float32, device=dev)
    sf = torch.empty(b, hk, dk, dv, dtype=torch.float32, device=dev) if store_final else None
    zf = torch.empty(b, hk, dk, dtype=torch.float32, device=dev) if store_final else None
    bk, bv, n_seg = _fwd_state_plan(cfg, dk, dv, b * hk, nc, dev)
    seg = triton.cdiv(nc, n_seg)
    n_seg = triton.cdiv(nc, seg)
    # each segment's own end state and total log decay (the first pass), folded in by the second
    ls = torch.empty(b, hk, n_seg, dk, dv, dtype=torch.float32, device=dev) if n_seg > 1 else zs
    lz = torch.empty(b, hk, n_seg, dk, dtype=torch.float32, device=dev) if n_seg > 1 else zs
    ld = torch.empty(b, hk, n_seg, dtype=torch.float32, device=dev) if n_seg > 1 else zs
    for local in (True, False) if n_seg > 1 else (False,):
        _fwd_state_kernel[(triton.cdiv(dk, bk) * (triton.cdiv(dv, bv) + 1), n_seg, b * hk)](
            k, v, bcum if bcum is not None else zs, s0 if s0 is not None else zs, z0 if z0 is not None else zs, hs,
            zs, sf if sf is not None else zs, zf if zf is not None else zs, ls, lz, ld, *_s3(k), *_s3(v), n, nc,
            seg, hk, dk, dv, C=cfg.chunk, BK=bk, BV=bv, HAS_DECAY=bcum is not None, HAS_INIT=s0 is not None,
            LOCAL=local, STORE_FINAL=store_final, PREC=_prec(k.dtype), num_warps=_state_warps(bk, bv),
            num_stages=cfg.stages)
    return hs, zs, sf, zf


def gla_forward(q, k, v, a, s0, z0, normalize, eps, cfg: LinearConfig):
    """``a``: fp32 contiguous ``[b, hk, n]`` or None; ``s0``/``z0`` fp32 contiguous or None.
    Returns ``(o, rden [b, h, n] fp32 or None, S_final, z_final)``."""
    b, h, n, dk = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    g = h // hk
    C = cfg.chunk
    nc = triton.cdiv(n, C)
    hs, zs, sf, zf = _states(k, v, _chunk_cumsum(a, nc, C), s0, z0, nc, cfg, True, _snap_dtype(q.dtype, cfg))
    o = torch.empty(b, h, n, dv, dtype=v.dtype, device=q.device)
    rden = torch.empty(b, h, n, dtype=torch.float32, device=q.device) if normalize else None
    kp = _p2(dk)
    bv = min(_p2(dv), cfg.out_bv)
    _fwd_out_kernel[(triton.cdiv(dv, bv) * g, nc, b * hk)](
        q, k, v, a if a is not None else zs, hs, zs, o, rden if rden is not None else zs,
        *_s3(q), *_s3(k), *_s3(v), *_s3(o), n, nc, h, g, dk, dv, float(eps),
        C=C, KP=kp, BV=bv, HAS_DECAY=a is not None, NORM=normalize, PREC=_prec(q.dtype),
        num_warps=min(cfg.out_warps, _warps(cfg, dk, dv)), num_stages=cfg.stages)
    return o, rden, sf, zf


def gla_backward(q, k, v, a, s0, z0, o, rden, do, dsf, dzf, normalize, cfg: LinearConfig, need_dinit: bool):
    """Returns ``(dq, dk, dv, dL [b, hk, n] fp32 (per-token d cumulative log decay, before the reverse cumsum),
    dS0, dz0)``."""
    b, h, n, dk = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    g = h // hk
    C = cfg.chunk
    nc = triton.cdiv(n, C)
    dev = q.device
    prec = _prec(q.dtype)
    sdt = _snap_dtype(q.dtype, cfg)
    kp = _p2(dk)
    do = _rowmajor(do)
    bcum = _chunk_cumsum(a, nc, C)
    hs, zs, _, _ = _states(k, v, bcum, s0, z0, nc, cfg, False, sdt)
    dden = None
    if normalize:
        dden = torch.empty(b, h, n, dtype=torch.float32, device=dev)
        bt = 32 if dv <= 128 else 16
        _bwd_pre_kernel[(triton.cdiv(n, bt), b * h)](o, do, rden, dden, *_s3(o), *_s3(do), n, h, dv,
                                                     BT=bt, VP=_p2(dv), num_warps=4)
    dhs = torch.empty(b, hk, nc, dk, dv, dtype=sdt, device=dev)
    dzs = torch.empty(b, hk, nc, dk, dtype=torch.float32, device=dev)
    ds0 = torch.empty(b, hk, dk, dv, dtype=torch.float32, device=dev) if need_dinit else None
    dz0 = torch.empty(b, hk, dk, dtype=torch.float32, device=dev) if need_dinit else None
    has_df = dsf is not None
    if has_df:
        dsf = dsf.float().contiguous()
        dzf = dzf.float().contiguous()
    gp = triton.next_power_of_2(g)
    bk, bvs, dwarps = _dstate_blocks(cfg, dk, dv, b * hk, gp, dev)
    dummy = dzs
    _bwd_dstate_kernel[(triton.cdiv(dk, bk) * triton.cdiv(dv, bvs), b * hk)](
        q, do, bcum if bcum is not None else dummy, rden if normalize else dummy, dden if normalize else dummy,
        dsf if has_df else dummy, dzf if has_df else dummy, dhs, dzs, ds0 if need_dinit else dummy,
        dz0 if need_dinit else dummy, *_s3(q), *_s3(do), n, nc, hk, g, dk, dv,
        C=C, GP=gp, BK=bk, BV=bvs, HAS_DECAY=a is not None, NORM=normalize,
        HAS_DFINAL=has_df, STORE_DINIT=need_dinit, PREC=prec, num_warps=dwarps, num_stages=cfg.stages)
    del bcum
    dq = torch.empty(b, h, n, dk, dtype=q.dtype, device=dev)
    dkk = torch.empty(b, hk, n, dk, dtype=k.dtype, device=dev)
    dvv = torch.empty(b, hk, n, dv, dtype=v.dtype, device=dev)
    dlq = torch.empty(b, h, n, dtype=torch.float32, device=dev)
    dlk = torch.empty(b, hk, n, dtype=torch.float32, device=dev)
    bv = min(_p2(dv), cfg.bwd_bv)
    nw = _warps(cfg, dk, dv)
    common = dict(HAS_DECAY=a is not None, NORM=normalize, PREC=prec, num_warps=nw, num_stages=cfg.stages)
    ap = a if a is not None else dummy
    rp = rden if normalize else dummy
    dp = dden if normalize else dummy
    _bwd_dq_kernel[(nc * g, b * hk)](
        q, k, v, do, ap, hs, zs, rp, dp, dq, dlq, *_s3(q), *_s3(k), *_s3(v), *_s3(do), n, nc, h, g, dk, dv,
        C=C, KP=kp, BV=bv, **common)
    del hs, zs
    _bwd_dk_kernel[(nc, b * hk)](
        q, k, v, do, ap, dhs, dzs, rp, dp, dkk, dlk, *_s3(q), *_s3(k), *_s3(v), *_s3(do), n, nc, hk, g, dk, dv,
        C=C, KP=kp, BV=bv, **common)
    _bwd_dv_kernel[(triton.cdiv(dv, bv), nc, b * hk)](
        q, k, do, ap, dhs, rp, dvv, *_s3(q), *_s3(k), *_s3(do), n, nc, hk, g, dk, dv,
        C=C, KP=kp, BV=bv, **common)
    dl = None
    if a is not None:
        dl = dlq.view(b, hk, g, n).sum(2) - dlk
    return dq, dkk, dvv, dl, ds0, dz0


class NormalizedGLAFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, s0, z0, normalize, eps, cfg):
        o, rden, sf, zf = gla_forward(q, k, v, a, s0, z0, normalize, eps, cfg)
        ctx.save_for_backward(q, k, v, a, s0, z0, o, rden, sf, zf)
        ctx.normalize, ctx.cfg = normalize, cfg
        ctx.set_materialize_grads(False)
        return o, sf, zf

    @staticmethod
    def backward(ctx, do, dsf, dzf):
        q, k, v, a, s0, z0, o, rden, sf, zf = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        if (dsf is None) != (dzf is None):
            dsf = torch.zeros_like(sf) if dsf is None else dsf
            dzf = torch.zeros_like(zf) if dzf is None else dzf
        need_dinit = s0 is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        dq, dk, dv, dl, ds0, dz0 = gla_backward(q, k, v, a, s0, z0, o, rden, do, dsf, dzf, ctx.normalize, ctx.cfg,
                                                need_dinit)
        da = None
        if a is not None and ctx.needs_input_grad[3]:
            if dsf is not None:  # the final state depends on the last token's cumulative decay
                dl[:, :, -1] += (dsf.float() * sf).sum((-2, -1)) + (dzf.float() * zf).sum(-1)
            da = dl.flip(-1).cumsum(-1).flip(-1)
        return dq, dk, dv, da, ds0, dz0, None, None, None


def normalized_gla_triton(q, k, v, log_decay=None, *, initial_state=None, normalize=True, eps=1e-6,
                          output_final_state=True, config: LinearConfig | None = None):
    """Triton chunked normalised GLA; returns ``(o, (S, z))`` (the final state is always computed: it is free)."""
    cfg = config or CONFIG
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    a = None if log_decay is None else log_decay.float().contiguous()
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = (t.float().contiguous() for t in initial_state)
    o, sf, zf = NormalizedGLAFn.apply(q, k, v, a, s0, z0, bool(normalize), float(eps), cfg)
    return o, (sf, zf)


@torch.no_grad()
def normalized_gla_step_triton(q, k, v, log_decay, state, *, normalize=True, eps=1e-6):
    """Fused decode step (inference: no autograd). Returns ``(o [b, h, 1, dv], (S', z'))``, new state tensors."""
    b, h, _, dk = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    g = h // hk
    dev = q.device
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    if state is None:
        S = torch.zeros(b, hk, dk, dv, dtype=torch.float32, device=dev)
        z = torch.zeros(b, hk, dk, dtype=torch.float32, device=dev)
    else:
        S, z = (t.float().contiguous() for t in state)
    a = None if log_decay is None else log_decay.float().contiguous()
    o = torch.empty(b, h, 1, dv, dtype=v.dtype, device=dev)
    sn = torch.empty_like(S)
    zn = torch.empty_like(z)
    kp = _p2(dk)
    bv = min(_p2(dv), 256 if INTERPRET else 32)
    _step_kernel[(triton.cdiv(dv, bv), b * hk)](
        q, k, v, a if a is not None else z, S, z, o, sn, zn, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), o.stride(0), o.stride(1), h, g, dk, dv, float(eps),
        KP=kp, BV=bv, HAS_DECAY=a is not None, NORM=bool(normalize), num_warps=4)
    return o, (sn, zn)


__all__ = ["normalized_gla_triton", "normalized_gla_step_triton", "NormalizedGLAFn", "LinearConfig", "CONFIG",
           "default_config", "gla_forward", "gla_backward"]

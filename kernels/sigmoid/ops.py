"""Host side of the FlashSigmoid / flash softmax kernels: tile configs, launches and the autograd Function."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from ..descriptors import row_tiles
from .limits import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from .triton_bwd import _delta_kernel, _dkdv_kernel, _dq_kernel
from .triton_fwd import _fwd_kernel

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    """Tiles (rows × keys), warps and pipeline stages of the three kernels."""

    fwd_bm: int
    fwd_bn: int
    fwd_warps: int
    fwd_stages: int
    dq_bm: int
    dq_bn: int
    dq_warps: int
    dkdv_bm: int  # query rows per step of the dK/dV kernel
    dkdv_bn: int  # keys owned by one dK/dV program
    dkdv_warps: int
    bwd_stages: int
    # dQ from the dK/dV kernel (fp32 adds of dS·K, one kernel, 5 matmuls a tile pair) instead of a second kernel
    # that recomputes S and dP (7 matmuls, no atomics); the dq_* tiles are then unused. Not bitwise reproducible
    # (the adds land in any order), so torch.use_deterministic_algorithms(True) gets the second kernel instead
    dq_atomic: bool = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_config(d: int, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """Per head dim and dtype, sized for sm_90 (228 KB shared memory, 255 registers a thread). fp16/bf16: the
    measured winners of scripts/bench_sigmoid.py's tile search. fp32 (IEEE dots without tensor cores,
    a correctness path): small tiles that fit. Forward: BM query rows × BN keys; dQ likewise; dK/dV: BN keys per
    program, BM query rows per step."""
    if interpreting():  # CPU interpreter: small tiles so tests cross several blocks; BN > BM in the dK/dV kernel
        return KernelConfig(32, 16, 4, 1, 32, 16, 4, 16, 32, 4, 1)
    if dtype == torch.float32:
        bm = 32 if d <= 128 else 16
        return KernelConfig(bm, 32, 4, 1, bm, 32, 4, 16, 32, 4, 1)
    # tile search at 16k on the H200 (scripts/bench_sigmoid.py --tune-n 16384, two runs, 2026-12-04): backward
    # pipelines of 3 stages beat 2 at every tile (d=128 fwd+bwd 7.80-8.06 vs 8.87-9.10 ms, d=64 9.28-9.35 vs 9.55-9.59)
    # and beat adding dQ from the dK/dV kernel (dq_atomic: 8.29-8.31 at d=128, 10.38 at d=64)
    if d <= 64:
        return KernelConfig(128, 64, 8, 4, 64, 64, 4, 32, 128, 8, 3)
    if d <= 128:
        return KernelConfig(128, 64, 8, 3, 128, 64, 8, 64, 128, 8, 3)
    return KernelConfig(64, 32, 8, 2, 32, 32, 8, 16, 32, 8, 1)


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else None  # fp32 inputs: exact IEEE dots (no TF32)


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _rowmajor(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def check_inputs(q, k, v, causal: bool) -> None:
    """Raise ``ValueError`` naming the problem and the fix when the kernels cannot take these tensors."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q [b, h, nq, d] and k, v [b, hk, nk, d]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, nq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must both be [b={b}, hk, nk, d={d}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if h % k.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[1]})")
    if causal and nq > k.shape[2]:
        raise ValueError(f"causal attention needs nq <= nk (the queries are the last nq positions); got nq={nq}, "
                         f"nk={k.shape[2]}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the Triton kernels (supported: {SUPPORTED_HEAD_DIMS}); "
                         "use patchattn.kernels.sigmoid.naive, or pad the head dim")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {[str(t) for t in SUPPORTED_DTYPES]}; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not (q.is_cuda or interpreting()):
        raise ValueError(f"the Triton kernels need CUDA tensors (got {q.device}); on CPU use "
                         "patchattn.kernels.sigmoid.naive, or set TRITON_INTERPRET=1 before importing triton to run "
                         "the kernels in Triton's interpreter")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def _bias_args(row_bias, b, nq, device):
    """``(bias tensor [b, nq] fp32 or None, constant)`` from a float, a tensor or None."""
    if row_bias is None:
        return None, 0.0
    if not torch.is_tensor(row_bias):
        return None, float(row_bias)
    if row_bias.requires_grad:
        raise ValueError("row_bias is a constant for the kernels (no gradient flows to it); pass row_bias.detach(), "
                         "or use patchattn.kernels.sigmoid.naive.sigmoid_attention for a learned bias")
    try:
        bias = row_bias.to(device=device, dtype=torch.float32).expand(b, nq).contiguous()
    except RuntimeError:
        raise ValueError(f"row_bias must be a float or a tensor broadcastable to [b={b}, nq={nq}]; got shape "
                         f"{tuple(row_bias.shape)}") from None
    return bias, 0.0


def _start_arg(key_start, b, nk, device):
    if key_start is None:
        return None
    if not torch.is_tensor(key_start) or key_start.shape != (b,) or key_start.is_floating_point():
        got = (f"{key_start.dtype} tensor of shape {tuple(key_start.shape)}" if torch.is_tensor(key_start)
               else type(key_start).__name__)
        raise ValueError(f"key_start must be an integer tensor [b={b}] (first visible key per sequence); got {got}")
    return key_start.to(device=device, dtype=torch.int32).clamp(0, nk).contiguous()


def _z_units(scale: float, sigmoid: bool, fast: bool) -> tuple[float, float]:
    """``(zscale, bias_mul)``: the kernels work on z = x/2 (tanh path) or z = x·log2 e (exp2 paths)."""
    mul = 0.5 if (sigmoid and fast) else LOG2E
    return scale * mul, mul


def flash_forward(q, k, v, scale, bias, bias_const, key_start, causal, sigmoid, fast, cfg):
    """Returns ``out [b, h, nq, d]`` (memory laid out ``[b, nq, h, d]``, so ``out.transpose(1, 2)`` is contiguous)
    and ``lse [b, h, nq]`` fp32 (softmax only, else None)."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    zscale, bias_mul = _z_units(scale, sigmoid, fast)
    out = torch.empty(b, nq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = None if sigmoid else torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    dummy = out
    _fwd_kernel[(triton.cdiv(nq, cfg.fwd_bm), b * h)](
        row_tiles(q, cfg.fwd_bm), row_tiles(k, cfg.fwd_bn), row_tiles(v, cfg.fwd_bn), out,
        lse if lse is not None else dummy, bias if bias is not None else dummy,
        key_start if key_start is not None else dummy, zscale, bias_const * bias_mul, bias_mul, *_strides(out),
        nq, nk, h, h // hk,
        SIGMOID=sigmoid, CAUSAL=causal, HAS_BIAS=bias is not None, HAS_START=key_start is not None, FAST=fast,
        BM=cfg.fwd_bm, BN=cfg.fwd_bn, D=d, PREC=_prec(q.dtype), num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
    return out, lse


def flash_backward(q, k, v, out, lse, dout, scale, bias, bias_const, key_start, causal, sigmoid, fast, cfg):
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    zscale, bias_mul = _z_units(scale, sigmoid, fast)
    dout = _rowmajor(dout)  # the Delta kernel reads rows of dO (and the descriptors would copy it twice)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = None
    if not sigmoid:
        delta = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
        bt = max(16, min(128, 4096 // d))  # 4096 elements of O and dO per program
        _delta_kernel[(triton.cdiv(nq, bt), b * h)](out, dout, delta, *_strides(out), *_strides(dout), nq, h,
                                                    BT=bt, D=d, num_warps=4)
    dummy = dq
    common = (lse if lse is not None else dummy, delta if delta is not None else dummy,
              bias if bias is not None else dummy, key_start if key_start is not None else dummy)
    flags = dict(SIGMOID=sigmoid, CAUSAL=causal, HAS_BIAS=bias is not None, HAS_START=key_start is not None,
                 FAST=fast, D=d, PREC=_prec(q.dtype), num_stages=cfg.bwd_stages)
    consts = (zscale, bias_const * bias_mul, bias_mul, scale)
    # float adds in arrival order vary between runs: deterministic mode gets the dQ pass
    atomic = cfg.dq_atomic and not torch.are_deterministic_algorithms_enabled()
    dqa = torch.zeros(b, h, nq, d, dtype=torch.float32, device=q.device) if atomic else None
    tma_dq = dqa is not None and not interpreting()  # the interpreter has no descriptor atomics
    _dkdv_kernel[(triton.cdiv(nk, cfg.dkdv_bn), b * hk)](
        row_tiles(q, cfg.dkdv_bm), row_tiles(k, cfg.dkdv_bn), row_tiles(v, cfg.dkdv_bn),
        row_tiles(dout, cfg.dkdv_bm), *common, dk, dv,
        row_tiles(dqa, cfg.dkdv_bm) if tma_dq else (dqa if dqa is not None else dummy),
        *consts, *_strides(dk), *_strides(dv), nq, nk, h, hk, h // hk,
        ATOMIC_DQ=dqa is not None, TMA_DQ=tma_dq, BM=cfg.dkdv_bm, BN=cfg.dkdv_bn, num_warps=cfg.dkdv_warps, **flags)
    if dqa is not None:
        return dq.copy_(dqa), dk, dv
    _dq_kernel[(triton.cdiv(nq, cfg.dq_bm), b * h)](
        row_tiles(q, cfg.dq_bm), row_tiles(k, cfg.dq_bn), row_tiles(v, cfg.dq_bn), row_tiles(dout, cfg.dq_bm),
        *common, dq, *consts, *_strides(dq), nq, nk, h, h // hk,
        BM=cfg.dq_bm, BN=cfg.dq_bn, num_warps=cfg.dq_warps, **flags)
    return dq, dk, dv


class FlashAttentionFn(torch.autograd.Function):
    """Differentiable in q, k, v; the bias and key starts are constants."""

    @staticmethod
    def forward(ctx, q, k, v, scale, bias, bias_const, key_start, causal, sigmoid, fast, cfg):
        out, lse = flash_forward(q, k, v, scale, bias, bias_const, key_start, causal, sigmoid, fast, cfg)
        ctx.save_for_backward(q, k, v, None if sigmoid else out, lse, bias, key_start)
        ctx.args = (scale, bias_const, causal, sigmoid, fast, cfg)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, bias, key_start = ctx.saved_tensors
        scale, bias_const, causal, sigmoid, fast, cfg = ctx.args
        dq, dk, dv = flash_backward(q, k, v, out, lse, dout, scale, bias, bias_const, key_start, causal, sigmoid,
                                    fast, cfg)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def flash_attention(q, k, v, *, scale, row_bias=None, causal=True, key_start=None, sigmoid=True,
                    approx_sigmoid=None, config: KernelConfig | None = None):
    """Validated entry of both kernels (see ``patchattn.kernels.sigmoid.sigmoid_attention``)."""
    check_inputs(q, k, v, causal)
    b, h, nq, d = q.shape
    if approx_sigmoid is None:
        approx_sigmoid = q.is_cuda and q.dtype != torch.float32
    elif approx_sigmoid and not q.is_cuda:
        raise ValueError("approx_sigmoid=True needs CUDA (tanh.approx.f32 is a PTX instruction the interpreter "
                         "does not run); leave it None")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")
    bias, bias_const = _bias_args(row_bias, b, nq, q.device) if sigmoid else (None, 0.0)
    key_start = _start_arg(key_start, b, k.shape[2], q.device)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    cfg = config or default_config(d, q.dtype)
    return FlashAttentionFn.apply(q, k, v, scale, bias, bias_const, key_start, causal, sigmoid,
                                  bool(approx_sigmoid) and sigmoid, cfg)

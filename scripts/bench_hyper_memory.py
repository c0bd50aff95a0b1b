#!/usr/bin/env python
"""Time and peak memory of one causal attention layer at long lengths: Triton HyperAttention vs cuDNN SDPA.

b=1, h=32, bf16, causal, d=128 by default. Per length, ``hyper`` is measured FIRST, then cuDNN, each mode
(``fwd`` under ``torch.no_grad()``, ``fwd+bwd`` with ``.backward(dout)``) timed with CUDA events around every
iteration after warm-up (median of ``--iters`` iterations; cuDNN fwd+bwd gets fewer), and its peak memory
read as ``torch.cuda.max_memory_allocated()`` minus what was allocated before the call (the inputs q, k, v and
dout), the peak stats reset before each. ``hyper[int32,unchunked]`` is the same kernels with the previous memory
layout (int32 sort orders, fp32 backward accumulators for all heads at once), for the cost of the changes.
The hyper forward at the largest length is also read with ``do_bench(rep=2000)`` (``ms_do_bench``).

  python scripts/bench_hyper_memory.py --n 131072 32768 --out benchmarks/results/hyper_attention_memory.json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import statistics

import torch
import torch.nn.functional as F
from _bench import Timer, environment, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

from patchattn.kernels.hyper import HyperSettings
from patchattn.kernels.hyper.ops import default_config, hyper_attention_triton

CUDA = torch.cuda.is_available()


def cudnn_fn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if CUDA else SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def hyper_fn(cfg=None):
    def f(q, k, v):
        return hyper_attention_triton(q, k, v, settings=HyperSettings(), config=cfg)[0]
    return f


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _step(fn, mode, q, k, v, do):
    if mode == "fwd":
        with torch.no_grad():
            return fn(q, k, v)
    out = fn(q, k, v)
    out.backward(do)
    return out


def time_ms(fn, mode, q, k, v, do, iters, warmup=2):
    """Median (and all) per-iteration times in ms, CUDA events around each iteration."""
    if mode == "fwd+bwd":
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    ts, tm = [], Timer(CUDA)
    for i in range(warmup + iters):
        if mode == "fwd+bwd":
            q.grad = k.grad = v.grad = None
        tm.start()
        _step(fn, mode, q, k, v, do)
        t = tm.stop_ms()
        if i >= warmup:
            ts.append(t)
    return statistics.median(ts), ts


def peak_mb(fn, mode, q, k, v, do):
    """Peak allocated memory of one call over what was allocated before it (the inputs), in MiB."""
    if not CUDA:
        return float("nan")
    gc.collect()
    _sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if mode == "fwd+bwd":
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = _step(fn, mode, q, k, v, do)
    _sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out, q, k, v
    return peak / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[131072, 32768])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--h", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20, help="timed iterations (cuDNN fwd+bwd: half)")
    ap.add_argument("--no-old", action="store_true", help="skip the hyper[int32,unchunked] rows")
    ap.add_argument("--out", default="benchmarks/results/hyper_attention_memory.json")
    args = ap.parse_args()
    dev = "cuda" if CUDA else "cpu"
    dt = torch.bfloat16 if CUDA else torch.float32
    meta = environment(CUDA)
    old = dataclasses.replace(default_config(args.d), qperm16=False, kperm16=False, acc_budget_mb=1 << 30,
                              sample_budget_mb=1 << 30)
    impls = [("hyper", hyper_fn())] + ([] if args.no_old else [("hyper[int32,unchunked]", hyper_fn(old))])
    impls.append(("cudnn", cudnn_fn))
    rows = []
    for n in args.n:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(1, args.h, n, args.d, device=dev, generator=g, dtype=dt) for _ in range(4))
        in_mb = 3 * q.numel() * q.element_size() / 2**20
        for name, fn in impls:
            for mode in ("fwd", "fwd+bwd"):
                row = dict(impl=name, mode=mode, n=n, d=args.d, h=args.h, b=1, dtype=str(dt).replace("torch.", ""),
                           causal=True, input_qkv_mb=in_mb)
                try:
                    iters = args.iters if (name != "cudnn" or mode == "fwd") else max(3, args.iters // 2)
                    if name == "cudnn" and n >= 65536:
                        iters = max(3, iters // 2)
                    ms, ts = time_ms(fn, mode, q, k, v, do, iters)
                    row.update(ms=round(ms, 3), iters=iters, ms_min=round(min(ts), 3), ms_max=round(max(ts), 3),
                               timing="median of per-iteration CUDA events after 2 warm-ups")
                    if name == "hyper" and mode == "fwd" and n == max(args.n) and CUDA:
                        from triton.testing import do_bench
                        with torch.no_grad():
                            row["ms_do_bench"] = round(do_bench(functools.partial(fn, q, k, v), warmup=100, rep=2000,
                                                                return_mode="median"), 3)
                    row["peak_mb_over_inputs"] = round(peak_mb(fn, mode, q, k, v, do), 1)
                except Exception as e:  # noqa: BLE001 -- keep the other rows
                    row["error"] = repr(e)[:300]
                row.update(meta)
                rows.append(row)
                print(json.dumps({x: row.get(x) for x in ("impl", "mode", "n", "ms", "ms_do_bench",
                                                          "peak_mb_over_inputs", "error") if x in row}), flush=True)
                write_json(args.out, rows)
        del q, k, v, do
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
    print(f"\n{'impl':24} {'mode':8} {'n':>7} {'ms':>9} {'peak MB':>9} {'x cudnn':>8}")
    for r in rows:
        c = next((x for x in rows if x["impl"] == "cudnn" and x["mode"] == r["mode"] and x["n"] == r["n"]), None)
        sp = c["ms"] / r["ms"] if c and r.get("ms") and c.get("ms") else float("nan")
        print(f"{r['impl']:24} {r['mode']:8} {r['n']:7d} {r.get('ms', float('nan')):9.3f} "
              f"{r.get('peak_mb_over_inputs', float('nan')):9.1f} {sp:8.2f}")


if __name__ == "__main__":
    main()

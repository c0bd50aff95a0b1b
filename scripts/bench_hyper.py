#!/usr/bin/env python
"""Single-layer causal attention benchmark: Triton HyperAttention vs torch SDPA (cuDNN and flash backends).

b=1, h=32, bf16, d in {64, 128}, n in {4k .. 131k}; forward and forward+backward; impls ``hyper`` (published
settings), ``hyper+levers`` (16 sinks + 112-key window + 128 samples; d=128 only by default), cuDNN and flash;
``triton.testing.do_bench`` medians; relative output error of each impl against cuDNN (exact); peak extra memory of
each call. Writes
``hyper_attention.json`` (rows ``{"impl", "mode", "n", "d", "ms", "rel_err", "peak_mb", "gpu", "torch", "triton",
"date", "command"}``) and ``hyper_attention_speedup.png`` into ``--out-dir`` and prints a table last.

  python scripts/bench_hyper.py            # full sweep (H200: a few minutes)
  python scripts/bench_hyper.py --quick    # d=128, n in {8k, 32k}
  python scripts/bench_hyper.py --profile 32768 --sweep   # + per-kernel profile and a tile-config sweep
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from _bench import (
    bench_attention_ms,
    environment,
    idle_gaps,
    kernel_times,
    peak_mb,
    pyplot,
    rel_err,
    save_figure,
    write_json,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm
from triton.testing import do_bench

from patchattn.kernels.hyper import HyperSettings
from patchattn.kernels.hyper.ops import KernelConfig, default_config, hyper_attention_triton


def sdpa_fn(backend):
    def f(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return f


def hyper_fn(settings, cfg=None, diag="auto"):
    def f(q, k, v):
        return hyper_attention_triton(q, k, v, settings=settings, config=cfg, diag_impl=diag)[0]
    return f


def inputs(n, d, h=32, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(1, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4))
    return q, k, v, do


def sweep_configs(d, settings, n, log):
    """Time a few tile configurations of the Triton kernels at one length; returns the best KernelConfig."""
    base = default_config(d)
    q, k, v, do = inputs(n, d)
    # level-kernel tiles (the exact leaves go to cuDNN in this MHA benchmark)
    fwd = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 3), (64, 128, 8, 2)]
    best_f, best_ms = None, float("inf")
    for bm, bn, w, s in fwd:
        cfg = KernelConfig(**{**base.__dict__, "lvl_bm": bm, "lvl_bn": bn, "lvl_warps": w, "lvl_stages": s})
        try:
            ms = bench_attention_ms(hyper_fn(settings, cfg), q, k, v, "fwd", do)
        except Exception as e:  # noqa: BLE001 -- a config that does not compile is just skipped
            log.append({"d": d, "kind": "fwd", "cfg": [bm, bn, w, s], "error": repr(e)[:200]})
            continue
        log.append({"d": d, "kind": "fwd", "cfg": [bm, bn, w, s], "ms": ms})
        print(f"  sweep d={d} fwd level tiles {bm}x{bn},{w}w,{s}s: {ms:.3f} ms", flush=True)
        if ms < best_ms:
            best_f, best_ms = cfg, ms
    best = best_f or base
    bwd = [(64, 64, 4, 32, 64, 4, 3), (64, 64, 4, 32, 64, 4, 4), (64, 32, 4, 32, 128, 8, 3)]
    if d > 128:
        bwd = [(32, 32, 4, 32, 32, 4, 1), (64, 32, 8, 32, 64, 8, 1)]
    best_b, best_ms = None, float("inf")
    for dqm, dqn, dqw, km, kn, kw, s in bwd:
        cfg = KernelConfig(**{**best.__dict__, "dq_bm": dqm, "dq_bn": dqn, "dq_warps": dqw, "dkdv_bm": km,
                              "dkdv_bn": kn, "dkdv_warps": kw, "bwd_stages": s})
        try:
            ms = bench_attention_ms(hyper_fn(settings, cfg), q, k, v, "fwd+bwd", do)
        except Exception as e:  # noqa: BLE001
            log.append({"d": d, "kind": "bwd", "cfg": [dqm, dqn, dqw, km, kn, kw, s], "error": repr(e)[:200]})
            continue
        log.append({"d": d, "kind": "fwd+bwd", "cfg": [dqm, dqn, dqw, km, kn, kw, s], "ms": ms})
        print(f"  sweep d={d} fwd+bwd dq {dqm}x{dqn} {dqw}w dkdv {km}x{kn} {kw}w {s}s: {ms:.3f} ms", flush=True)
        if ms < best_ms:
            best_b, best_ms = cfg, ms
    return best_b or best


def profile(n, d, settings, cfg, log):
    """Per-kernel CUDA time of one hyper forward (no grad) and forward+backward (torch.profiler), plus the
    cuDNN-diagonal variant."""
    q, k, v, do = inputs(n, d)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    fn = hyper_fn(settings, cfg)

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        for x in (qg, kg, vg):
            x.grad = None  # as in the timings: no accumulation into earlier steps' grads (3 adds, 2.2 ms at 131k)
        fn(qg, kg, vg).backward(do)

    for mode, call in (("fwd", forward), ("fwd+bwd", forward_backward)):
        rows = kernel_times(call, steps=3, warmup=2)
        print(f"\nprofile n={n} d={d} (ms per {mode}, kernel, calls):")
        for key, us, cnt in rows[:22]:
            ms = us / 1000.0
            print(f"  {ms:8.3f}  {key[:90]}  x{cnt}")
            log.append({"profile_n": n, "d": d, "mode": mode, "kernel": key[:120], "ms": ms, "calls": cnt})
        gaps = idle_gaps(call)
        print(f"  one call: {gaps['kernels']} kernels, {gaps['busy_ms']:.2f} ms busy in a {gaps['span_ms']:.2f} ms "
              f"span ({gaps['gaps_ms']:.2f} ms between kernels)")
        log.append({"profile_n": n, "d": d, "mode": mode, "idle_gaps": gaps})
    with torch.no_grad():
        outs = {}
        for diag in ("triton", "cudnn"):
            try:
                outs[diag] = hyper_fn(settings, cfg, diag)(q, k, v)
                ms = bench_attention_ms(hyper_fn(settings, cfg, diag), q, k, v, "fwd", do)
                print(f"  hyper fwd with diag={diag}: {ms:.3f} ms")
                log.append({"profile_n": n, "d": d, "diag_impl": diag, "fwd_ms": ms})
            except Exception as e:  # noqa: BLE001
                print(f"  diag={diag} failed: {e!r}"[:300])
        if len(outs) == 2:
            print(f"  rel diff diag=cudnn vs diag=triton: {rel_err(outs['cudnn'], outs['triton']):.2e}")
        del outs
        # the exact leaves alone, for the record: Triton vs cuDNN SDPA on [h * leaves, 4096] causal
        m = settings.min_seq_len
        if n % m == 0 and n > m:
            ql, kl, vl = (x.view(1, 32 * (n // m), m, d) for x in (q, k, v))
            ms = bench_attention_ms(sdpa_fn(SDPBackend.CUDNN_ATTENTION), ql, kl, vl, "fwd", None)
            print(f"  cuDNN on the {n // m} exact leaves alone: {ms:.3f} ms")
            log.append({"profile_n": n, "d": d, "cudnn_leaves_fwd_ms": ms})
        t0 = time.perf_counter()
        keys = torch.randint(0, 2**14, (5, 1, 32, n), device="cuda", dtype=torch.int16)
        ms = do_bench(lambda: torch.sort(keys, dim=-1, stable=True), return_mode="median")
        print(f"  torch.sort int16 [5,1,32,{n}] stable: {ms:.3f} ms")
        log.append({"profile_n": n, "d": d, "sort5_ms": ms, "wall_s": time.perf_counter() - t0})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--d", type=int, nargs="*", default=None)
    ap.add_argument("--n", type=int, nargs="*", default=None)
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    ap.add_argument("--impls", nargs="*", default=["hyper", "hyper+levers", "cudnn", "flash"])
    ap.add_argument("--levers-d", type=int, nargs="*", default=[128], help="head dims that get hyper+levers rows")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--sweep", action="store_true", help="pick the best tile config per head dim first")
    ap.add_argument("--profile", type=int, nargs="*", default=[], help="lengths to profile per kernel (d=128)")
    ap.add_argument("--sweep-d", type=int, nargs="*", default=[128])
    ap.add_argument("--crossover", type=int, nargs="*", default=[], help="extra lengths: hyper vs cudnn only")
    ap.add_argument("--skip-main", action="store_true")
    args = ap.parse_args()
    ds = args.d or ([128] if args.quick else [128, 64])
    ns = args.n or ([8192, 32768] if args.quick else [4096, 8192, 16384, 32768, 65536, 131072])
    settings = HyperSettings()  # the reference's defaults: 7 projections, block 256, 256 samples, min_seq_len 4096
    # the recommended quality levers at the same per-query budget: 16 sinks + 112-key window + 128 samples
    levers = HyperSettings(sample_size=128, sink_tokens=16, local_window=112)
    meta = environment()
    os.makedirs(args.out_dir, exist_ok=True)
    extra = {"settings": settings.__dict__, "levers": levers.__dict__, "meta": meta, "sweep": [], "profile": [],
             "configs": {}}
    cfgs = {}
    if args.sweep:
        for d in [d for d in ds if d in args.sweep_d]:
            cfgs[d] = sweep_configs(d, settings, 32768, extra["sweep"])
            print(f"best config d={d}: {cfgs[d]}", flush=True)
    for d in ds:
        extra["configs"][d] = (cfgs.get(d) or default_config(d)).__dict__
    for d in ds if args.crossover else []:
        for n in args.crossover:
            q, k, v, do = inputs(n, d)
            for mode in ("fwd", "fwd+bwd"):
                t_h = bench_attention_ms(hyper_fn(settings, cfgs.get(d)), q, k, v, mode, do)
                t_c = bench_attention_ms(sdpa_fn(SDPBackend.CUDNN_ATTENTION), q, k, v, mode, do)
                print(f"crossover d={d} n={n} {mode}: hyper {t_h:.3f} ms, cudnn {t_c:.3f} ms, x{t_c / t_h:.2f}")
                extra["profile"].append({"crossover_n": n, "d": d, "mode": mode, "hyper_ms": t_h, "cudnn_ms": t_c})
    for n in args.profile:
        try:
            profile(n, 128, settings, cfgs.get(128), extra["profile"])
        except Exception as e:  # noqa: BLE001
            print(f"profile {n} failed: {e!r}")
    write_json(os.path.join(args.out_dir, "hyper_attention_profile.json"), extra)
    if args.skip_main:
        return
    rows = []
    impls = {"hyper": lambda d: hyper_fn(settings, cfgs.get(d)),
             "hyper+levers": lambda d: hyper_fn(levers, cfgs.get(d)),
             "cudnn": lambda d: sdpa_fn(SDPBackend.CUDNN_ATTENTION),
             "flash": lambda d: sdpa_fn(SDPBackend.FLASH_ATTENTION)}
    jobs = [(d, n) for d in ds for n in ns]
    for d, n in tqdm(jobs, desc="bench", file=sys.stdout):
        names = [x for x in args.impls if x != "hyper+levers" or d in args.levers_d]
        q, k, v, do = inputs(n, d)
        with torch.no_grad():
            ref = sdpa_fn(SDPBackend.CUDNN_ATTENTION)(q, k, v)
            errs = {name: rel_err(impls[name](d)(q, k, v), ref) for name in names}
        for name in names:
            fn = impls[name](d)
            for mode in args.modes:
                try:
                    ms = bench_attention_ms(fn, q, k, v, mode, do)
                    pk = peak_mb(fn, q, k, v, mode, do)
                except Exception as e:  # noqa: BLE001
                    print(f"{name} {mode} n={n} d={d} failed: {e!r}"[:300], flush=True)
                    continue
                rows.append(dict(impl=name, mode=mode, n=n, d=d, ms=round(ms, 4), rel_err=round(errs[name], 5),
                                 peak_mb=round(pk, 1), **meta))
        del q, k, v, do, ref
        torch.cuda.empty_cache()
        write_json(os.path.join(args.out_dir, "hyper_attention.json"), rows)
    plot(rows, os.path.join(args.out_dir, "hyper_attention_speedup.png"), meta)
    print_table(rows, meta)


def plot(rows, path, meta):
    try:
        plt = pyplot()
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    get = {(r["impl"], r["mode"], r["n"], r["d"]): r["ms"] for r in rows}
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for d, marker in ((64, "o"), (128, "s")):
            for impl, base, ls in (("hyper", "cudnn", "-"), ("hyper", "flash", "--"), ("hyper+levers", "cudnn", ":")):
                ns = sorted({r["n"] for r in rows if r["d"] == d and r["mode"] == mode
                             and ((impl, mode, r["n"], d) in get) and ((base, mode, r["n"], d) in get)})
                if ns:
                    sp = [get[(base, mode, n, d)] / get[(impl, mode, n, d)] for n in ns]
                    label = f"d={d} vs {base}" if impl == "hyper" else f"d={d} levers vs {base}"
                    ax.plot(ns, sp, ls, marker=marker, label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sequence length n")
        ax.set_title(f"causal {mode}, b=1 h=32 bf16")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("HyperAttention speedup (x)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Triton HyperAttention vs SDPA on {meta['gpu']} (torch {meta['torch']}, triton {meta['triton']})",
                 fontsize=9)
    save_figure(fig, path)


def print_table(rows, meta):
    get = {(r["impl"], r["mode"], r["n"], r["d"]): r for r in rows}
    print(f"\n{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']} | {meta['command']}")
    print(f"{'d':>4} {'n':>7} {'mode':>8} | {'hyper ms':>9} {'cudnn ms':>9} {'flash ms':>9} | {'x cudnn':>7} "
          f"{'x flash':>7} | {'rel_err':>7} | {'peak MB hyper/cudnn':>19} | {'levers ms':>9} {'x cudnn':>7} "
          f"{'rel_err':>7}")
    for d in sorted({r["d"] for r in rows}):
        for mode in ("fwd", "fwd+bwd"):
            for n in sorted({r["n"] for r in rows}):
                h, c, fl = (get.get((i, mode, n, d)) for i in ("hyper", "cudnn", "flash"))
                if not h and not c:
                    continue
                f = lambda r: f"{r['ms']:9.3f}" if r else f"{'-':>9}"
                sc = f"{c['ms'] / h['ms']:7.2f}" if h and c else f"{'-':>7}"
                sf = f"{fl['ms'] / h['ms']:7.2f}" if h and fl else f"{'-':>7}"
                err = f"{h['rel_err']:7.4f}" if h else f"{'-':>7}"
                pk = f"{h['peak_mb'] if h else 0:9.0f}/{c['peak_mb'] if c else 0:<9.0f}"
                lv = get.get(("hyper+levers", mode, n, d))
                lvs = (f"{lv['ms']:9.3f} {c['ms'] / lv['ms']:7.2f} {lv['rel_err']:7.4f}" if lv and c
                       else f"{'-':>9} {'-':>7} {'-':>7}")
                print(f"{d:>4} {n:>7} {mode:>8} | {f(h)} {f(c)} {f(fl)} | {sc} {sf} | {err} | {pk:>19} | {lvs}")


if __name__ == "__main__":
    main()

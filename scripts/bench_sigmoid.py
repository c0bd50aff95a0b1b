#!/usr/bin/env python
"""FlashSigmoid on one GPU: correctness first, then speed against softmax kernels.

Impls (bf16, causal, MHA, one attention layer):
  * ``flashsigmoid``        patchattn.kernels.sigmoid, σ(x) via the hardware tanh (the default on CUDA)
  * ``flashsigmoid_exact``  same kernels, σ(x) = 1 / (1 + 2^(−x·log2 e))
  * ``flashsigmoid_dq_atomic``  ``flashsigmoid`` with dQ added from the dK/dV kernel (``KernelConfig.dq_atomic``;
                            timed forward+backward only: the forward is the same kernel)
  * ``softmax_triton``      the flash softmax built in the same kernels (like-for-like baseline)
  * ``cudnn`` / ``flash2``  torch SDPA with the cuDNN / FlashAttention-2 backend
The sigmoid bias is the paper's constant b = −log n. Shapes follow the FlashAttention-2 paper's benchmark: batch ×
length = ``--tokens`` (16k) tokens, hidden 2048 (h = 2048 / d), d in {64, 128}, n from 1k to 32k.
FLOPs: causal forward 2·b·h·n²·d (two matmuls, half the square); forward+backward 3.5× that (7 matmuls).

Steps: (1) correctness at small sizes with GQA, a per-row bias, left padding, chunked prefill and a decode step:
our kernels (bf16) against the fp32 PyTorch reference (sigmoid) and fp32 SDPA (softmax), forward and dQ/dK/dV;
(2) a tile-config search for our kernels at n = ``--tune-n`` (8k; ``--no-tune`` skips it; the winners are
recorded and used for every length); (3) the timing sweep (``triton.testing.do_bench`` medians); (4) with
``--profile N``, the per-kernel time of one forward+backward at length N, ours and cuDNN's (torch profiler).
Every case that fails (OOM, a config that does not compile) is recorded and the run goes on.

Writes ``bench_sigmoid.json`` and ``bench_sigmoid.png`` into ``--out`` and prints a table last.

  python scripts/bench_sigmoid.py --out benchmarks/results/sigmoid      # ~3 min on an H200
  python scripts/bench_sigmoid.py --out /tmp/s --quick                  # d=128, n in {4k, 16k}, no tuning
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from _bench import bench_attention_ms, environment, kernel_times, pyplot, save_figure, write_json

DEVICE = "cuda"
CHECK_DTYPE = torch.bfloat16
IMPLS = ["flashsigmoid", "flashsigmoid_exact", "flashsigmoid_dq_atomic", "softmax_triton", "cudnn", "flash2"]
BWD_ONLY = {"flashsigmoid_dq_atomic"}  # impls whose forward is another impl's
MODES = ["fwd", "fwd+bwd"]
# tried after ops.default_config's own tiles: (bm, bn, warps, stages) and
# (dq_bm, dq_bn, dq_warps, dkdv_bm, dkdv_bn, dkdv_warps, stages, dq_atomic)
FWD_CANDIDATES = [(128, 64, 8, 3), (128, 32, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2),
                  (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 4, 3)]
# backward: every dK/dV tile × stages, with dQ from a second kernel (each dQ tile) or added by the dK/dV kernel
DQ_TILES = [(128, 32, 8), (64, 64, 4), (128, 64, 8)]
DKDV_TILES = [(32, 128, 8), (64, 128, 8)]
BWD_CANDIDATES = [(*dq, *kv, s, False) for kv in DKDV_TILES for s in (2, 3, 4) for dq in DQ_TILES]
BWD_CANDIDATES += [(*DQ_TILES[0], *kv, s, True) for kv in DKDV_TILES for s in (2, 3, 4)]
# correctness cases (name, nq, nk, key_start per sequence, head dims, impls): b=2, h=8, hk=2
ALL3 = ("flashsigmoid", "flashsigmoid_exact", "flashsigmoid_dq_atomic", "softmax_triton")
CHECK_CASES = [("prefill+rowbias+leftpad", 1000, 1000, [0, 123], (64, 128), ALL3),
               ("chunk_over_cache", 300, 1000, [0, 57], (128,), ("flashsigmoid", "softmax_triton")),
               ("decode", 1, 1000, [0, 5], (128,), ("flashsigmoid",))]


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (JSON + PNG)")
    ap.add_argument("--d", type=int, nargs="*", default=None)
    ap.add_argument("--n", type=int, nargs="*", default=None)
    ap.add_argument("--impls", nargs="*", default=IMPLS, choices=IMPLS)
    ap.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    ap.add_argument("--tokens", type=int, default=16384, help="batch × length (batch = max(1, tokens // n))")
    ap.add_argument("--hidden", type=int, default=2048, help="heads × head dim")
    ap.add_argument("--no-tune", action="store_true", help="use ops.default_config instead of the tile search")
    ap.add_argument("--tune-n", type=int, default=8192, help="length at which the tile search times its candidates")
    ap.add_argument("--quick", action="store_true", help="d=128, n in {4k, 16k}, no tuning")
    ap.add_argument("--rep", type=int, default=100, help="do_bench time budget per case (ms)")
    ap.add_argument("--profile", type=int, nargs="*", default=[],
                    help="lengths at which to record the per-kernel time of one fwd+bwd (flashsigmoid and cuDNN)")
    ap.add_argument("--budget-s", type=float, default=215,
                    help="stop starting new cases after this many seconds (the rest is recorded as skipped)")
    return ap.parse_args()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


# -- implementations ------------------------------------------------------------------------------------------------
def make_fn(impl, n, cfgs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from patchattn.kernels.sigmoid import sigmoid_attention, softmax_attention

    bias = -math.log(n)
    if impl.startswith("flashsigmoid"):
        approx = impl != "flashsigmoid_exact" and DEVICE == "cuda"  # (the CPU interpreter has no hardware tanh)
        cfg = cfgs.get("sigmoid")
        if impl == "flashsigmoid_dq_atomic":
            cfg = dataclasses.replace(cfgs["sigmoid"], dq_atomic=True)
        return lambda q, k, v: sigmoid_attention(q, k, v, scale=q.shape[-1] ** -0.5, row_bias=bias,
                                                 approx_sigmoid=approx, config=cfg)
    if impl == "softmax_triton":
        cfg = cfgs.get("softmax")
        return lambda q, k, v: softmax_attention(q, k, v, scale=q.shape[-1] ** -0.5, config=cfg)
    backend = SDPBackend.CUDNN_ATTENTION if impl == "cudnn" else SDPBackend.FLASH_ATTENTION

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return sdpa


def inputs(b, h, n, d, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(b, h, n, d, device=DEVICE, dtype=torch.bfloat16, generator=g) for _ in range(4)]


def flops(b, h, n, d, mode):
    fwd = 2.0 * b * h * n * n * d  # causal: 2 matmuls × 2·n²·d × ½
    return fwd if mode == "fwd" else 3.5 * fwd


# -- step 1: correctness ------------------------------------------------------------------------------------------
def correctness(ds):
    """Our bf16 kernels vs fp32 references; returns rows with the relative errors and pass flags."""
    from patchattn.kernels.sigmoid import naive, sigmoid_attention, softmax_attention
    from patchattn.kernels.sigmoid.ops import default_config

    rows = []
    for name, nq, nk, starts, dims, impls in CHECK_CASES:
        for d in (d for d in ds if d in dims):
            b, h, hk = 2, 8, 2
            g = torch.Generator(device=DEVICE).manual_seed(11)
            q = torch.randn(b, h, nq, d, device=DEVICE, generator=g).to(CHECK_DTYPE)
            k, v = (torch.randn(b, hk, nk, d, device=DEVICE, generator=g).to(CHECK_DTYPE) for _ in range(2))
            do = torch.randn(b, h, nq, d, device=DEVICE, generator=g).to(CHECK_DTYPE)
            ks = torch.tensor(starts, device=DEVICE)
            pos = torch.arange(nq, device=DEVICE) + (nk - nq + 1)
            bias = -torch.log((pos[None] - ks[:, None]).clamp(min=1).float())
            qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
            for impl in impls:
                row = {"case": name, "impl": impl, "d": d, "nq": nq, "nk": nk, "b": b, "h": h, "hk": hk}
                try:
                    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
                    for t in (qr, kr, vr):
                        t.grad = None
                    if impl == "softmax_triton":
                        out = softmax_attention(qg, kg, vg, scale=d**-0.5, key_start=ks)
                        mask = naive.visible(nq, nk, True, ks, DEVICE)[:, None]
                        ref = F.scaled_dot_product_attention(qr, kr.repeat_interleave(h // hk, 1),
                                                             vr.repeat_interleave(h // hk, 1), attn_mask=mask,
                                                             scale=d**-0.5)
                    else:
                        atomic = impl == "flashsigmoid_dq_atomic"
                        cfg = dataclasses.replace(default_config(d, CHECK_DTYPE), dq_atomic=True) if atomic else None
                        out = sigmoid_attention(qg, kg, vg, scale=d**-0.5, row_bias=bias, key_start=ks, config=cfg,
                                                approx_sigmoid=impl != "flashsigmoid_exact" and DEVICE == "cuda")
                        ref = naive.sigmoid_attention(qr, kr, vr, scale=d**-0.5, row_bias=bias, key_start=ks)
                    out.backward(do)
                    ref.backward(do.float())
                    row.update(out=rel_err(out, ref), dq=rel_err(qg.grad, qr.grad), dk=rel_err(kg.grad, kr.grad),
                               dv=rel_err(vg.grad, vr.grad))
                    row["ok"] = bool(row["out"] <= 1e-2 and max(row["dq"], row["dk"], row["dv"]) <= 2e-2)
                except Exception as e:  # noqa: BLE001 -- record and go on
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
                rows.append(row)
                status = "ok " if row.get("ok") else "FAIL"
                errs = " ".join(f"{key}={row[key]:.1e}" for key in ("out", "dq", "dk", "dv") if key in row)
                print(f"  check {status} d={d} {name:24s} {impl:19s} {errs} {row.get('error', '')}", flush=True)
    return rows


# -- step 2: tile search -------------------------------------------------------------------------------------------
def tune(d, n, heads, tokens, rep, log):
    """Best KernelConfig per kernel (sigmoid with the tanh path, softmax) at length n: forward tiles by forward time,
    then backward tiles by forward+backward time."""
    from patchattn.kernels.sigmoid.ops import default_config

    b = max(1, tokens // n)
    q, k, v, do = inputs(b, heads, n, d)
    best = {}
    for kind, impl in (("sigmoid", "flashsigmoid"), ("softmax", "softmax_triton")):
        base = default_config(d)
        fwd = [(base.fwd_bm, base.fwd_bn, base.fwd_warps, base.fwd_stages)]
        fwd += [c for c in FWD_CANDIDATES if c not in fwd]
        winner, best_ms = base, float("inf")
        for bm, bn, w, s in fwd:
            cfg = dataclasses.replace(base, fwd_bm=bm, fwd_bn=bn, fwd_warps=w, fwd_stages=s)
            ms = _try(make_fn(impl, n, {kind: cfg}), q, k, v, do, "fwd", rep, log, d, kind, [bm, bn, w, s])
            if ms is not None and ms < best_ms:
                winner, best_ms = cfg, ms
        bwd = [(base.dq_bm, base.dq_bn, base.dq_warps, base.dkdv_bm, base.dkdv_bn, base.dkdv_warps, base.bwd_stages,
                base.dq_atomic)]
        bwd += [c for c in BWD_CANDIDATES if c not in bwd]
        fwd_winner, best_ms = winner, float("inf")
        for dqm, dqn, dqw, km, kn, kw, s, atomic in bwd:
            cfg = dataclasses.replace(fwd_winner, dq_bm=dqm, dq_bn=dqn, dq_warps=dqw, dkdv_bm=km, dkdv_bn=kn,
                                      dkdv_warps=kw, bwd_stages=s, dq_atomic=atomic)
            ms = _try(make_fn(impl, n, {kind: cfg}), q, k, v, do, "fwd+bwd", rep, log, d, kind,
                      [dqm, dqn, dqw, km, kn, kw, s, atomic])
            if ms is not None and ms < best_ms:
                winner, best_ms = cfg, ms
        best[kind] = winner
        print(f"  tuned d={d} {kind}: {winner}", flush=True)
    del q, k, v, do
    torch.cuda.empty_cache()
    return best


def _try(fn, q, k, v, do, mode, rep, log, d, kind, cfg):
    try:
        ms = bench_attention_ms(fn, q, k, v, mode, do, rep // 2)
    except Exception as e:  # noqa: BLE001 -- a config that does not compile or fit is skipped
        log.append({"d": d, "kernel": kind, "mode": mode, "cfg": cfg, "error": f"{type(e).__name__}: {e}"[:300]})
        torch.cuda.empty_cache()
        return None
    log.append({"d": d, "kernel": kind, "mode": mode, "cfg": cfg, "ms": ms})
    return ms


# -- step 3 --------------------------------------------------------------------------------------------------------
def plot(rows, path, meta):
    plt = pyplot()
    ds = sorted({r["d"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(ds), len(modes), figsize=(6 * len(modes), 4 * len(ds)), squeeze=False)
    for i, d in enumerate(ds):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for impl in IMPLS:
                pts = sorted((r["n"], r["tflops"]) for r in rows
                             if r["d"] == d and r["mode"] == mode and r["impl"] == impl and r.get("tflops"))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl,
                            linestyle="--" if impl in ("cudnn", "flash2") else "-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"d={d}, {mode}, causal, bf16")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"FlashSigmoid vs softmax kernels — {meta['gpu']} (torch {meta['torch']}, triton {meta['triton']})")
    save_figure(fig, path)


def table(rows):
    """ms / TFLOP/s per impl, and the speedup of flashsigmoid over each softmax kernel."""
    by = {(r["d"], r["n"], r["mode"], r["impl"]): r for r in rows}
    keys = sorted({(r["d"], r["mode"], r["n"]) for r in rows}, key=lambda t: (-t[0], MODES.index(t[1]), t[2]))
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    others = [i for i in ("softmax_triton", "cudnn", "flash2") if i in impls]
    lines = [f"{'d':>4} {'mode':>8} {'n':>6} " + " ".join(f"{i:>18}" for i in impls)
             + "".join(f" {'x ' + o:>16}" for o in others)]
    for d, mode, n in keys:
        cells = []
        for i in impls:
            r = by.get((d, n, mode, i))
            cells.append(f"{r['ms']:9.3f}/{r['tflops']:4.0f}TF" if r else f"{'-':>18}")
        sig = by.get((d, n, mode, "flashsigmoid"))
        xs = []
        for o in others:
            r = by.get((d, n, mode, o))
            xs.append(f"{r['ms'] / sig['ms']:>15.2f}x" if (r and sig) else f"{'-':>16}")
        lines.append(f"{d:>4} {mode:>8} {n:>6} " + " ".join(f"{c:>18}" for c in cells) + " " + " ".join(xs))
    return "\n".join(lines)


# -- step 4: where the time goes --------------------------------------------------------------------------------------
def profile(d, n, heads, tokens, cfgs, log):
    """Per-kernel CUDA time of one forward+backward (grads cleared each step, as in the timings), ours and cuDNN's."""
    b = max(1, tokens // n)
    q, k, v, do = inputs(b, heads, n, d)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    for impl in ("flashsigmoid", "cudnn"):
        fn = make_fn(impl, n, cfgs)

        def step():
            for x in (qg, kg, vg):
                x.grad = None
            fn(qg, kg, vg).backward(do)

        rows = kernel_times(step, steps=5, warmup=2)
        print(f"  profile d={d} n={n} {impl} fwd+bwd: " + ", ".join(f"{key[:40]} {us / 1e3:.3f} ms x{cnt}"
                                                                  for key, us, cnt in rows[:6]), flush=True)
        log.extend({"d": d, "n": n, "impl": impl, "mode": "fwd+bwd", "kernel": key[:120], "ms": us / 1e3,
                    "calls": cnt} for key, us, cnt in rows)


def main():
    args = parse()
    if not torch.cuda.is_available():
        sys.exit("bench_sigmoid.py needs a CUDA GPU")
    from tqdm import tqdm

    from patchattn.kernels.sigmoid.ops import default_config

    ds = args.d or ([128] if args.quick else [128, 64])
    ns = args.n or ([4096, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768])
    tune_on = not (args.no_tune or args.quick)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(**environment(packages=("torch", "triton", "cuda", "cudnn"), date="seconds"), tokens=args.tokens,
                hidden=args.hidden, dtype="bfloat16", causal=True, sigmoid_bias="-log(n)")
    result = {"meta": meta, "check": [], "tuning": [], "configs": {}, "rows": [], "profile": [], "errors": []}
    path = os.path.join(args.out, "bench_sigmoid.json")

    def save():
        write_json(path, result)

    t0 = time.perf_counter()
    print(f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  cuda {meta['cuda']}", flush=True)
    print("step 1: correctness (bf16 kernels vs fp32 references)", flush=True)
    try:
        result["check"] = correctness(ds)
    except Exception:  # noqa: BLE001
        result["errors"].append({"step": "correctness", "error": traceback.format_exc()[-2000:]})
    save()

    cfgs = {}
    for d in ds:
        heads = max(1, args.hidden // d)
        if tune_on and time.perf_counter() - t0 > args.budget_s / 2:
            result["errors"].append({"step": f"tune d={d}", "error": "skipped: half the time budget is gone"})
        elif tune_on:
            print(f"step 2: tile search d={d}", flush=True)
            try:
                cfgs[d] = tune(d, args.tune_n, heads, args.tokens, args.rep, result["tuning"])
            except Exception:  # noqa: BLE001
                result["errors"].append({"step": f"tune d={d}", "error": traceback.format_exc()[-2000:]})
        cfgs.setdefault(d, {"sigmoid": default_config(d), "softmax": default_config(d)})
        result["configs"][str(d)] = {k: dataclasses.asdict(v) for k, v in cfgs[d].items()}
    save()

    print("step 3: timing", flush=True)
    jobs = [(d, n, impl, mode) for d in ds for n in ns for mode in args.modes for impl in args.impls
            if not (mode == "fwd" and impl in BWD_ONLY)]
    current = None
    for d, n, impl, mode in tqdm(jobs, desc="bench", file=sys.stdout, mininterval=5):
        heads = max(1, args.hidden // d)
        b = max(1, args.tokens // n)
        if current != (d, n):
            tensors = None
            torch.cuda.empty_cache()
            tensors = inputs(b, heads, n, d)
            current = (d, n)
        row = {"impl": impl, "mode": mode, "d": d, "n": n, "b": b, "h": heads}
        if time.perf_counter() - t0 > args.budget_s:
            row["error"] = f"skipped: time budget ({args.budget_s:.0f} s) used up"
            result["rows"].append(row)
            continue
        try:
            ms = bench_attention_ms(make_fn(impl, n, cfgs[d]), *tensors[:3], mode, tensors[3], args.rep)
            row.update(ms=ms, tflops=flops(b, heads, n, d, mode) / (ms * 1e-3) / 1e12)
        except Exception as e:  # noqa: BLE001 -- OOM, backend not available, ...
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            torch.cuda.empty_cache()
        result["rows"].append(row)
    tensors = None  # the sweep's inputs go before the profile allocates its own
    if args.profile:
        print("step 4: per-kernel profile", flush=True)
    for d, n in ((d, n) for d in ds for n in args.profile):
        try:
            profile(d, n, max(1, args.hidden // d), args.tokens, cfgs[d], result["profile"])
        except Exception:  # noqa: BLE001
            result["errors"].append({"step": f"profile d={d} n={n}", "error": traceback.format_exc()[-2000:]})
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    save()
    try:
        if any("ms" in r for r in result["rows"]):
            plot([r for r in result["rows"] if "ms" in r], os.path.join(args.out, "bench_sigmoid.png"), meta)
    except Exception:  # noqa: BLE001
        result["errors"].append({"step": "plot", "error": traceback.format_exc()[-2000:]})
        save()

    bad = [r for r in result["check"] if not r.get("ok")]
    print(f"\ncorrectness: {len(result['check']) - len(bad)}/{len(result['check'])} cases within tolerance"
          + "".join(f"\n  FAIL {r['case']} d={r['d']} {r['impl']}: {r.get('error') or r}" for r in bad))
    failed = [r for r in result["rows"] if "error" in r]
    skipped = [r for r in failed if r["error"].startswith("skipped")]
    if skipped:
        print(f"  {len(skipped)} timing cases skipped (time budget); rerun with --d / --n to cover them")
    for r in (r for r in failed if r not in skipped):
        print(f"  failed: {r['impl']} {r['mode']} d={r['d']} n={r['n']}: {r['error'][:200]}")
    for d, c in result["configs"].items():
        print(f"configs d={d}: " + "; ".join(f"{k}: {v}" for k, v in c.items()))
    print(f"\n{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | bf16 causal, {args.tokens} tokens, "
          f"hidden {args.hidden} | ms/TFLOP/s (do_bench median); x = other ms / flashsigmoid ms | {meta['wall_s']} s")
    print(table([r for r in result["rows"] if "ms" in r]))


if __name__ == "__main__":
    main()

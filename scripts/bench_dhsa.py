#!/usr/bin/env python
"""Single-layer causal prefill: DHSA (PyTorch selection + Triton block-sparse kernel) vs cuDNN / flash SDPA.

b=1, h=32 query heads (``--hk`` KV heads, default 32), bf16, d in {64, 128}, n in {16k .. 131k}, forward only
(DHSA is a prefill method). Per (preset, d, n): total DHSA time *including* the selection, the selection and the
kernel alone, the density (kept causal pairs / all causal pairs), peak extra memory, and the relative difference
from exact attention (informational: random inputs have no structure to select). Before timing, a bf16 check of
the kernel against the masked exact reference at n=4096 per head dim. ``triton.testing.do_bench`` medians.

  python scripts/bench_dhsa.py --out DIR                  # full sweep (H200: ~2 min)
  python scripts/bench_dhsa.py --out DIR --quick          # d=128, n in {32k, 131k}, default preset
  python scripts/bench_dhsa.py --out DIR --sweep          # + kernel tile configs at 32k, d=128

Writes ``DIR/dhsa_attention.json`` and ``DIR/dhsa_attention_speedup.png``; prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from _bench import bench_ms, environment, peak_mb, pyplot, rel_err, save_figure, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from patchattn.kernels.dhsa import DhsaSettings, naive, select_blocks, selection_density
from patchattn.kernels.dhsa.ops import KernelConfig, block_sparse_attention, default_config

PRESETS = {
    "default": DhsaSettings(),  # chunk 64, query block 64, budget 2048, window 256
    "qblock128": DhsaSettings(query_block=128),
    "6.25%": DhsaSettings(budget_tokens=0, budget_fraction=0.0625),
}
SWEEP = [KernelConfig(64, 64, 4, 3), KernelConfig(64, 64, 4, 4), KernelConfig(64, 32, 4, 3),
         KernelConfig(128, 64, 8, 3), KernelConfig(128, 32, 8, 3), KernelConfig(64, 64, 8, 2)]


def inputs(n, d, h, hk, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(1, hk, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    return q, k, v


def sdpa(backend):
    def f(q, k, v):
        if k.shape[1] != q.shape[1]:  # cuDNN/flash take MHA here; expanding is what a GQA caller would pay
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return f


def dhsa(settings, cfg=None):
    def f(q, k, v):
        sel = select_blocks(q, k, settings)
        return block_sparse_attention(q, k, v, sel, q.shape[-1] ** -0.5, config=cfg)[0]
    return f


def check(d, h, hk, log):
    """bf16 kernel vs the masked exact reference over the same kept set (n=4096, key padding on one row)."""
    n = 4096
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(2, hk, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    valid = torch.ones(2, n, dtype=torch.bool, device="cuda")
    valid[1, :300] = False
    st = DhsaSettings(budget_tokens=512, local_window=128, sink_tokens=64)
    sel = select_blocks(q, k, st, valid)
    out, _ = block_sparse_attention(q, k, v, sel, d**-0.5, key_valid=valid)
    cm = sel.chunk_mask()
    ref, _ = naive.masked_attention(q, k, v, d**-0.5, lambda r0, r1: sel.keep_rows(r0, r1, valid, cm))
    err = rel_err(out[:, :, 300:], ref[:, :, 300:])
    log.append({"check": "kernel_vs_reference_bf16", "d": d, "n": n, "rel_err": err, "ok": err < 1e-2})
    print(f"check d={d}: bf16 kernel vs masked reference rel err {err:.2e} ({'ok' if err < 1e-2 else 'FAIL'})")


def sweep(name, h, hk, log):
    """Kernel time of each SWEEP tile config at n=32k, d=128 (tiles are capped by the preset's block/chunk)."""
    q, k, v = inputs(32768, 128, h, hk)
    sel = select_blocks(q, k, PRESETS[name])
    for cfg in SWEEP:
        try:
            ms = bench_ms(lambda a, b, c: block_sparse_attention(a, b, c, sel, 128**-0.5, config=cfg), q, k, v)
        except Exception as e:  # noqa: BLE001 -- a config that does not compile is skipped
            log.append({"sweep": cfg.__dict__, "preset": name, "error": repr(e)[:200]})
            continue
        log.append({"sweep": cfg.__dict__, "preset": name, "kernel_ms": ms})
        print(f"  sweep {name} {cfg}: kernel {ms:.3f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--d", type=int, nargs="*", default=None)
    ap.add_argument("--n", type=int, nargs="*", default=None)
    ap.add_argument("--hk", type=int, default=32, help="KV heads (32 = MHA; 8 = GQA as Llama-3-8B)")
    ap.add_argument("--presets", nargs="*", default=None, help=f"of: {', '.join(PRESETS)}".replace("%", "%%"))
    ap.add_argument("--flash", action="store_true", help="also time the flash SDPA backend")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    h = 32
    ds = args.d or ([128] if args.quick else [128, 64])
    ns = args.n or ([32768, 131072] if args.quick else [16384, 32768, 65536, 131072])
    presets = args.presets or (["default"] if args.quick else list(PRESETS))
    meta = dict(**environment(), h=h, hk=args.hk, dtype="bfloat16",
                presets={p: PRESETS[p].__dict__ for p in presets},
                configs={f"d={d} {p}": default_config(d, PRESETS[p].query_block).__dict__ for d in ds
                         for p in presets})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "dhsa_attention.json")
    log, rows = [], []
    for d in ds:
        try:
            check(d, h, args.hk, log)
        except Exception as e:  # noqa: BLE001
            log.append({"check": "kernel_vs_reference_bf16", "d": d, "error": repr(e)[:300]})
            print(f"check d={d} failed: {e!r}"[:300])
    if args.sweep:
        for name in ("default", "qblock128"):
            sweep(name, h, args.hk, log)
    jobs = [(d, n) for d in ds for n in ns]
    for d, n in tqdm(jobs, desc="bench", file=sys.stdout):
        try:
            q, k, v = inputs(n, d, h, args.hk)
        except torch.OutOfMemoryError as e:
            print(f"inputs n={n} d={d}: {e!r}"[:200])
            continue
        base = {"n": n, "d": d}
        with torch.no_grad():
            ref = sdpa(SDPBackend.CUDNN_ATTENTION)(q, k, v)
        for name, fn in [("cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))] + (
                [("flash", sdpa(SDPBackend.FLASH_ATTENTION))] if args.flash else []):
            try:
                rows.append({**base, "impl": name, "ms": bench_ms(fn, q, k, v), "peak_mb": peak_mb(fn, q, k, v)})
            except Exception as e:  # noqa: BLE001
                rows.append({**base, "impl": name, "error": repr(e)[:300]})
        for p in presets:
            st = PRESETS[p]
            row = {**base, "impl": "dhsa", "preset": p}
            try:
                with torch.no_grad():
                    sel = select_blocks(q, k, st)
                    row["density"] = selection_density(sel)
                    row["rel_diff_vs_exact"] = rel_err(dhsa(st)(q, k, v), ref)
                row["select_ms"] = bench_ms(lambda a, b: select_blocks(a, b, st), q, k)
                row["select_torch_ms"] = bench_ms(lambda a, b: select_blocks(a, b, st, picker="torch"), q, k)
                row["kernel_ms"] = bench_ms(lambda a, b, c: block_sparse_attention(a, b, c, sel, d**-0.5), q, k, v)
                row["ms"] = bench_ms(dhsa(st), q, k, v)
                row["peak_mb"] = peak_mb(dhsa(st), q, k, v)
            except Exception as e:  # noqa: BLE001 -- OOM or a failing case: record and go on
                row["error"] = repr(e)[:300]
                print(f"dhsa {p} n={n} d={d} failed: {row['error']}", flush=True)
            rows.append(row)
        del q, k, v, ref
        torch.cuda.empty_cache()
        write_json(path, {"meta": meta, "log": log, "rows": rows})
    plot(rows, meta, os.path.join(args.out, "dhsa_attention_speedup.png"))
    table(rows, log, meta)


def _get(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items()) and "ms" in r), None)


def plot(rows, meta, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for d, marker in zip(sorted({r["d"] for r in rows}), "so^v"):
        for p in meta["presets"]:
            pts = []
            for n in sorted({r["n"] for r in rows}):
                c, s = _get(rows, impl="cudnn", n=n, d=d), _get(rows, impl="dhsa", preset=p, n=n, d=d)
                if c and s:
                    pts.append((n, c["ms"] / s["ms"]))
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"d={d} {p}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("speedup over cuDNN SDPA (incl. selection)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"DHSA prefill vs cuDNN, b=1 h={meta['h']} hk={meta['hk']} bf16\n{meta['gpu']}, torch "
                 f"{meta['torch']}, triton {meta['triton']}", fontsize=8)
    save_figure(fig, path)


def table(rows, log, meta):
    print(f"\n{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']} | h={meta['h']} "
          f"hk={meta['hk']} bf16\n{meta['command']}")
    for c in log:
        if "check" in c:
            print(f"check d={c['d']}: " + (f"rel err {c['rel_err']:.2e}" if "rel_err" in c else c["error"][:80]))
    print(f"{'d':>4} {'n':>7} {'preset':>10} | {'cudnn ms':>9} {'dhsa ms':>8} {'select':>7} {'kernel':>7} | "
          f"{'x cudnn':>7} {'density':>7} | {'peak MB dhsa/cudnn':>18}")
    for d in sorted({r["d"] for r in rows}):
        for n in sorted({r["n"] for r in rows}):
            c = _get(rows, impl="cudnn", n=n, d=d)
            for p in meta["presets"]:
                s = next((r for r in rows if r.get("preset") == p and r["n"] == n and r["d"] == d), None)
                if s is None:
                    continue
                if "ms" not in s:
                    print(f"{d:>4} {n:>7} {p:>10} | failed: {s.get('error', '')[:70]}")
                    continue
                cm = f"{c['ms']:9.3f}" if c else f"{'-':>9}"
                x = f"{c['ms'] / s['ms']:7.2f}" if c else f"{'-':>7}"
                pk = f"{s['peak_mb']:.0f}/{c['peak_mb']:.0f}" if c else f"{s['peak_mb']:.0f}/-"
                print(f"{d:>4} {n:>7} {p:>10} | {cm} {s['ms']:8.3f} {s['select_ms']:7.3f} {s['kernel_ms']:7.3f} | "
                      f"{x} {s['density']:7.4f} | {pk:>18}")


if __name__ == "__main__":
    main()

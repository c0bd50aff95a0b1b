#!/usr/bin/env python
"""Plans of the linear attention's forward state kernel (state tile widths x segments of the walk) against fla's
``chunk_simple_gla`` forward, on one GPU: which plan is fastest for a shape, and where the GPU time goes.

A plan is ``bk/bv/segments`` (``LinearConfig.state_bk / state_bv / state_segments``; 0 = the default pick, so
``0/0/0`` is what users get). h=32 query heads, hk=8 KV heads, d=128, bf16, normalised, data-dependent decays (the
inputs of ``bench_linear.py``); fla (as installed, its own autotune; K/V expanded to 32 heads, it has no GQA) at b=1.
Rows in ``linear_plans.json``: ``{"name": "ours_<bk>x<bv>_seg<s>" | "fla", "b", "n", "ms" (best of two do_bench
medians), "ms_runs", "kernels" (torch profiler: GPU ms a call per kernel), "err_vs_first" (ours: rel. error of o, S, z
against the shape's first plan)}``; ``linear_plans.png`` plots the state kernel's ms against the segments, a line per
tile width, a panel per shape (fla's state kernel dashed).

  python scripts/bench_linear_plans.py --out DIR --shapes 1x16384,1x131072,8x32768 --plans 0/0/0,32/32/1,64/64/16
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re

import torch
from _bench import commit, environment, kernel_times, pyplot, save_figure, write_json
from bench_linear import L, fla_layout, make_inputs

ops = importlib.import_module(f"{L.__name__}.ops")  # this checkout's kernels, as bench_linear resolves them

STATE_KERNELS = ("_fwd_state_kernel", "chunk_fwd_kernel_h")


def parse_plans(text: str) -> list[tuple[int, int, int]]:
    plans = []
    for item in text.split(","):
        parts = item.split("/")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--plans: {item!r} is not bk/bv/segments (three integers, 0 = the default pick)")
        plans.append(tuple(int(p) for p in parts))
    return plans


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)", item)
        if not match:
            raise SystemExit(f"--shapes: {item!r} is not <batch>x<tokens>, e.g. 1x131072")
        shapes.append((int(match[1]), int(match[2])))
    return shapes


def timed_row(name: str, fn, b: int, n: int, **extra) -> dict:
    from triton.testing import do_bench

    try:
        runs = [round(do_bench(fn, warmup=10, rep=60), 4) for _ in range(2)]
        kernels = {key[:50]: round(us / 1000, 4) for key, us, _ in kernel_times(fn, steps=3)}
        row = dict(name=name, b=b, n=n, ms=min(runs), ms_runs=runs, kernels=kernels, **extra)
    except Exception as e:  # noqa: BLE001 - a failing plan (OOM, compile error) is a row, not a crash
        row = dict(name=name, b=b, n=n, error=f"{type(e).__name__}: {str(e)[:300]}")
    print(json.dumps(row), flush=True)
    return row


def shape_rows(b: int, n: int, plans, with_fla: bool) -> list[dict]:
    q, k, v, ld, _ = make_inputs(b, 32, 8, n, 128, torch.bfloat16)
    rows, first = [], None
    for bk, bv, segments in plans:
        cfg = dataclasses.replace(ops.CONFIG, state_bk=bk, state_bv=bv, state_segments=segments)

        def forward(cfg=cfg):
            return ops.normalized_gla_triton(q, k, v, ld, config=cfg)

        o, (S, z) = forward()
        first = first if first is not None else (o.float(), S, z)
        errs = [((x.float() - y).norm() / y.norm()).item() for x, y in zip((o, S, z), first)]
        rows.append(timed_row(f"ours_{bk}x{bv}_seg{segments}", forward, b, n, err_vs_first=errs))
    if with_fla and b == 1:
        from fla.ops.simple_gla import chunk_simple_gla

        fq, fk, fv, fg = fla_layout(q, k, v, ld)
        with torch.no_grad():
            rows.append(timed_row("fla", lambda: chunk_simple_gla(fq, fk, fv, g=fg, scale=1.0), b, n))
    return rows


def run(shapes, plans, with_fla: bool) -> list[dict]:
    rows = []
    for b, n in shapes:
        rows += shape_rows(b, n, plans, with_fla)
        torch.cuda.empty_cache()
    return rows


def _state_ms(row: dict) -> float | None:
    return next((ms for key, ms in row.get("kernels", {}).items() if key.startswith(STATE_KERNELS)), None)


def plot(rows: list[dict], path) -> None:
    """State-kernel ms against segments, a line per tile width, a panel per shape; fla's state kernel dashed."""
    points = []  # (shape, tile or None for fla, segments, state ms) of every row with a state-kernel time
    for row in rows:
        match = re.fullmatch(r"ours_(\d+x\d+)_seg(\d+)", row["name"])
        if (match or row["name"] == "fla") and (ms := _state_ms(row)) is not None:
            points.append(((row["b"], row["n"]), match and match[1], match and int(match[2]), ms))
    shapes = sorted({(row["b"], row["n"]) for row in rows})
    tiles = sorted({tile for _, tile, _, _ in points if tile})
    colors = {tile: f"C{i}" for i, tile in enumerate(tiles)}  # one colour a tile width in every panel
    plt = pyplot()
    cols = min(4, len(shapes))
    rows_of_panels = -(-len(shapes) // cols)
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(4.2 * cols, 3.4 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    for ax, (b, n) in zip(axes.flat, shapes):
        lines: dict[str, list[tuple[int, float]]] = {}
        for shape, tile, segments, ms in points:
            if shape != (b, n):
                continue
            if tile:
                lines.setdefault(tile, []).append((segments, ms))
            else:
                ax.axhline(ms, color="k", linestyle="--", label="fla chunk_fwd_kernel_h")
        for tile, line in sorted(lines.items()):
            line.sort()
            ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", color=colors[tile], label=f"{tile} tiles")
        ax.set_title(f"b={b}, n={n // 1024}k")
        ax.set_xlabel("segments of the walk (0 = default pick)")
        ax.set_ylabel("state kernel, ms")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)  # the colours are the same in every panel
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (JSON + PNG)")
    ap.add_argument("--shapes", default="1x16384,1x32768,1x131072,8x32768", help="<batch>x<tokens>, comma-separated")
    ap.add_argument("--plans", default="0/0/0,32/32/1,64/64/1,64/64/16", help="bk/bv/segments, comma-separated")
    ap.add_argument("--no-fla", action="store_true", help="skip fla's chunk_simple_gla")
    args = ap.parse_args()
    shapes, plans = parse_shapes(args.shapes), parse_plans(args.plans)
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear_plans.py times CUDA kernels: run it on a machine with a GPU")
    rows = run(shapes, plans, not args.no_fla)
    env = environment(packages=("torch", "triton", "fla-core"))
    write_json(os.path.join(args.out, "linear_plans.json"), {**env, "commit": commit(True), "rows": rows})
    plot(rows, os.path.join(args.out, "linear_plans.png"))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""A/B of the HyperAttention kernels between source trees and KernelConfig variants, interleaved in one lease.

    git archive --format=tar REV kernels patchattn | tar -x -C /tmp/base      # the tree to compare against
    python scripts/ab_hyper.py --base /tmp/base --d 128 64 --n 32768 131072 --rounds 2 --out ab.json
    python scripts/ab_hyper.py --base /tmp/main --base /tmp/wip1 --out ab.json     # several trees at once
    python scripts/ab_hyper.py --variant qperm16=False --variant lvl_bm=64,lvl_warps=4 --out ab.json

Every (tree, variant) arm runs in its own subprocess with the tree first on PYTHONPATH (so the base tree's
``patchattn`` is imported, not the installed one); the arms' order alternates between rounds so clock or thermal
drift falls on both sides. Each row: forward (no grad) and fwd+bwd medians (``do_bench``), the peak memory of one
fwd+bwd, and the relative difference of the output and of dQ/dK/dV to the first arm's (the working tree's
defaults) on the same inputs. Published settings, b=1, h=32, bf16, causal, random N(0,1) Q/K/V. Writes JSON and
prints a table. Without CUDA (the Triton interpreter, tests only) the times are one wall-clock call in fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import Timer, bench_attention_ms, environment, peak_mb, rel_err, write_json

ROOT = Path(__file__).resolve().parent.parent


def parse_variant(text: str) -> dict:
    """``"qperm16=False,lvl_bm=64"`` -> ``{"qperm16": False, "lvl_bm": 64}`` (values read as Python literals)."""
    import ast

    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: expected key=value pairs separated by commas")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise SystemExit(f"--variant {text!r}: {value!r} is not a Python literal") from None
    return out


def prepare_tree(path: Path) -> Path:
    """A source tree importable from PYTHONPATH: ``patchattn/kernels`` must reach the top-level ``kernels/``."""
    path = path.resolve()
    if not (path / "patchattn").is_dir() or not (path / "kernels").is_dir():
        raise SystemExit(f"{path}: not a source tree (needs patchattn/ and kernels/; make one with "
                         "`git archive --format=tar REV kernels patchattn | tar -x -C DIR`)")
    link = path / "patchattn" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
    return path


def measure(d, n, heads, settings, cfg, rep, tensors) -> dict:
    """Times one (d, n) on the current tree and saves its output and gradients to ``tensors``."""
    import torch
    from safetensors.torch import save_file

    from patchattn.kernels.hyper.ops import hyper_attention_triton

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, n, d, device=dev, generator=g, dtype=dtype) for _ in range(4))

    def fn(q, k, v):
        return hyper_attention_triton(q, k, v, settings=settings, config=cfg)[0]

    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(qg, kg, vg)
    out.backward(do)
    grads = {f"d{x}": t.grad.cpu() for x, t in zip("qkv", (qg, kg, vg))}  # input dtype: 4.3 GB at 131k, d=128
    save_file({"out": out.detach().cpu(), **grads}, tensors)
    row = dict(d=d, n=n)
    for mode, key in (("fwd", "fwd_ms"), ("fwd+bwd", "fwdbwd_ms")):
        if cuda:
            row[key] = bench_attention_ms(fn, q, k, v, mode, do, rep=rep)
        else:  # the interpreter: one wall-clock call, for the tests only
            timer = Timer(cuda=False)
            timer.start()
            with torch.set_grad_enabled(mode != "fwd"):
                o = fn(qg, kg, vg)
                if mode != "fwd":
                    o.backward(do)
            row[key] = timer.stop_ms()
    if cuda:
        row["fwdbwd_peak_mb"] = peak_mb(fn, q, k, v, "fwd+bwd", do)
    return row


def child(args) -> None:
    """One arm: every (d, n) on the tree first on PYTHONPATH, rows printed for the parent."""
    import dataclasses

    import torch

    from patchattn.kernels.hyper import HyperSettings
    from patchattn.kernels.hyper.ops import default_config

    settings = HyperSettings(**json.loads(args.settings))
    overrides = json.loads(args.config)
    rows = []
    for d in args.d:
        cfg = dataclasses.replace(default_config(d), **overrides)
        for n in args.n:
            rows.append(measure(d, n, args.heads, settings, cfg, args.rep, f"{args.tensors}_{d}_{n}.safetensors"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("AB_ROWS " + json.dumps(rows), flush=True)


def rel_diffs(path_a: str, path_b: str) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(path_a), load_file(path_b)
    return {key: rel_err(a[key], b[key]) for key in b}


def run_arm(tree: Path, config: dict, args, tensors: str) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--config", json.dumps(config),
           "--settings", json.dumps(args.settings_dict), "--tensors", tensors, "--heads", str(args.heads),
           "--rep", str(args.rep), "--d", *map(str, args.d), "--n", *map(str, args.n)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(Path(__file__).resolve().parent)])}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in res.stdout.splitlines() if x.startswith("AB_ROWS ")]
    if res.returncode or not lines:
        raise SystemExit(f"arm {tree} {config} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("AB_ROWS "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, action="append", default=[], help="source tree to compare against "
                    "(patchattn/ + kernels/); repeatable")
    ap.add_argument("--variant", action="append", default=[], help="KernelConfig overrides (key=value,...) to run "
                    "on the working tree; repeatable")
    ap.add_argument("--d", type=int, nargs="+", default=[128])
    ap.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rep", type=int, default=100, help="do_bench time budget per measurement (ms)")
    ap.add_argument("--hyper", default="{}", help="HyperSettings overrides as JSON (default: the published ones)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--tensors", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.settings_dict = json.loads(args.hyper)
    arms = [("working", prepare_tree(ROOT), {})]
    arms += [(f"working {v}", prepare_tree(ROOT), parse_variant(v)) for v in args.variant]
    arms += [(f"base {path}" if len(args.base) > 1 else "base", prepare_tree(path), {}) for path in args.base]
    if len(arms) < 2:
        raise SystemExit("nothing to compare: give --base and/or --variant")
    rows = []
    meta = environment(cuda=None, argv=sys.argv)
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = arms if rnd % 2 == 0 else arms[::-1]
            for name, tree, config in order:
                tensors = os.path.join(tmp, f"{rnd}_{len(rows)}")
                for r in run_arm(tree, config, args, tensors):
                    ref = os.path.join(tmp, f"ref_{r['d']}_{r['n']}.safetensors")
                    mine = f"{tensors}_{r['d']}_{r['n']}.safetensors"
                    if os.path.exists(ref):
                        diff = rel_diffs(mine, ref)
                        os.remove(mine)  # only the references stay on disk
                    else:  # the first arm measured is the reference
                        os.replace(mine, ref)
                        diff = None
                    rows.append(dict(arm=name, tree=str(tree), config=config, round=rnd, **r,
                                     rel_diff=diff))
                    print(f"round {rnd} {name:>28} d={r['d']:>3} n={r['n']:>7}  fwd {r['fwd_ms']:9.3f} ms  "
                          f"fwd+bwd {r['fwdbwd_ms']:9.3f} ms", flush=True)
                if args.out:  # after every arm: a run cut short keeps what it measured
                    write_json(args.out, {"meta": meta, "settings": args.settings_dict, "rows": rows})
    return rows


if __name__ == "__main__":
    main()

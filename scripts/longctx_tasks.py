"""Long-context task accuracy of exact attention and each variant setting on one real model, same prompts.

    python scripts/longctx_tasks.py --model qwen2.5-coder-0.5b-instruct --contexts 32768 \
        --tasks niah_single,niah_multikey,vt --samples 50 --settings exact,hyper,hyper-tail,dhsa,dhsa-tail,zipcache \
        --out DIR [--budget-s 400]

Writes ``DIR/longctx_tasks.json`` after every setting (rows of ``patchattn.tasks.run_tasks`` plus which attention
path each patched layer took, so no row credits a variant with exact attention's result) and a PNG of accuracy per
setting. ``--budget-s`` stops before a setting that would start after that many seconds (device time is scarce).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from _bench import commit, environment, pyplot, save_figure, write_json

import patchattn
from patchattn.realweights import load_model
from patchattn.tasks import run_tasks

#: name -> (variant, params); None = the unpatched model
SETTINGS = {
    "exact": None,
    "hyper": ("hyper", {}),
    "hyper-paper": ("hyper", {"preset": "paper"}),
    "hyper-tail": ("hyper", {"exact_tail": 256}),
    "hyper-tail-sinks": ("hyper", {"exact_tail": 256, "sink_tokens": 16, "sample_size": 240}),
    "dhsa": ("dhsa", {}),
    "dhsa-tail": ("dhsa", {"exact_tail": 256}),
    "zipcache": ("zipcache", {}),
    "zipcache-paper": ("zipcache", {"preset": "paper"}),
}


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    keys = list(dict.fromkeys((r["task"], r["context"]) for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(settings) * len(keys) / 2, 4))
    width = 0.8 / max(len(keys), 1)
    for j, (task, context) in enumerate(keys):
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(settings):
            row = next((r for r in rows if r["setting"] == s and (r["task"], r["context"]) == (task, context)), None)
            if row:
                xs.append(i + j * width)
                ys.append(100 * row["accuracy"])
                lo.append(100 * (row["accuracy"] - row["ci_low"]))
                hi.append(100 * (row["ci_high"] - row["accuracy"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=f"{task} @ {context}")
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(settings))], settings, rotation=20)
    ax.set_ylabel("accuracy (%) with 95% interval")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--contexts", default="32768")
    p.add_argument("--tasks", default="niah_single,niah_multikey,vt")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--settings", default="exact,hyper,hyper-tail,dhsa,dhsa-tail,zipcache")
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--out", required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        p.error(f"argument --settings: unknown {unknown}; known: {', '.join(SETTINGS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.to(device).eval()
    report = {**environment(None, cpu=platform.processor() or "cpu", packages=("torch", "triton", "transformers"),
                            date="utc", argv=["scripts/longctx_tasks.py", *argv]),
              "commit": commit(short=True), "model": args.model, "rows": []}
    for name in settings:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"budget reached: {name} and later settings not run")
            break
        spec = SETTINGS[name]
        if spec is not None:
            patchattn.patch_model(model, spec[0], **spec[1])
        try:
            rows = run_tasks(model, tokenizer, tasks=args.tasks.split(","),
                             context_lengths=[int(c) for c in args.contexts.split(",")], samples=args.samples,
                             batch_size=args.batch_size, model_name=args.model)
            paths = patchattn.attention_paths(model, reset=True) if spec is not None else {}
        finally:
            if spec is not None:
                patchattn.unpatch_model(model)
        for row in rows:
            row.update(setting=name, attention_paths=paths)
            print(f"{name:18s} {row['task']:16s} {row['context']:6d} {100 * row['accuracy']:5.1f}% "
                  f"[{100 * row['ci_low']:.0f}-{100 * row['ci_high']:.0f}] prefill {row['prefill_s']:.2f}s")
        report["rows"].extend(rows)
        write_json(out / "longctx_tasks.json", report)
    plot(report["rows"], out / "longctx_tasks.png")


if __name__ == "__main__":
    main()

"""Long-context task accuracy of exact attention and each variant setting on one real model, same prompts.

    python scripts/longctx_tasks.py --model qwen2.5-coder-0.5b-instruct --contexts 32768 \
        --tasks niah_single,niah_multikey,vt --samples 50 --settings exact,hyper,dhsa,zipcache,hyper-paper \
        --out DIR [--budget-s 400] [--setting hyper-s16=hyper:sink_tokens=16,sample_size=240@last:12]

``--setting NAME=VARIANT[:KEY=VALUE,...][@LAYERS]`` (repeatable) adds a setting beside the named ones below, so a
sweep of levers runs in the same process, on the same prompts, as exact attention. ``retrieval_heads=F`` among the
parameters of a prefill variant keeps the top share ``F`` of the KV heads exact (``patchattn.retrieval_heads``).

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
from patchattn.cache import layer_nbytes
from patchattn.fields import parse_value
from patchattn.realweights import load_model
from patchattn.tasks import PromptBuilder, run_tasks

#: name -> (variant, params[, layers]); None = the unpatched model
SETTINGS = {
    "exact": None,
    "hyper": ("hyper", {}),
    "hyper-paper": ("hyper", {"preset": "paper"}),
    "dhsa": ("dhsa", {}),
    "dhsa-paper": ("dhsa", {"preset": "paper"}),
    "zipcache": ("zipcache", {}),
    "zipcache-paper": ("zipcache", {"preset": "paper"}),
}


def parse_setting(text: str) -> tuple[str, tuple]:
    """``NAME=VARIANT[:KEY=VALUE,...][@LAYERS]`` → ``(NAME, (VARIANT, params, layers))``."""
    name, sep, rest = text.partition("=")
    rest, _, layers = rest.partition("@")
    variant, _, pairs = rest.partition(":")
    if not sep or not name or not variant:
        raise argparse.ArgumentTypeError(f"expected NAME=VARIANT[:KEY=VALUE,...][@LAYERS], got {text!r}")
    params = {}
    for pair in filter(None, pairs.split(",")):
        key, eq, value = pair.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, got {pair!r}")
        params[key] = parse_value(value)
    return name, (variant, params, layers or None)


@torch.no_grad()
def kv_bytes(model, tokenizer, context: int) -> int:
    """Bytes of the KV cache a prefill of one ``context``-token prompt leaves (the variant's own cache if it has
    one): what a cache variant saves, next to its accuracy. Run before a setting's tasks too, untimed, so its
    prefill times do not include compiling its kernels."""
    ids = torch.tensor([PromptBuilder(tokenizer).sample("niah_single", context, 0).input_ids], device=model.device)
    cache = patchattn.generation_cache(model) if patchattn.is_patched(model) else None
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return sum(layer_nbytes(layer) for layer in out.past_key_values.layers)


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
    p.add_argument("--settings", default="exact,hyper,dhsa,zipcache")
    p.add_argument("--setting", type=parse_setting, action="append", default=[],
                   help="extra setting NAME=VARIANT[:KEY=VALUE,...][@LAYERS] (repeatable)")
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--out", required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    known = {**SETTINGS, **dict(args.setting)}
    settings = args.settings.split(",") + [name for name, _ in args.setting]
    unknown = [s for s in settings if s not in known]
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
        spec = known[name]
        if spec is not None:
            layers, params = spec[2] if len(spec) > 2 else None, dict(spec[1])
            if "retrieval_heads" in params:  # a share of KV heads, found on the model, kept exact
                params["exact_kv_heads"] = patchattn.retrieval_heads(model, params.pop("retrieval_heads"),
                                                                     layers=layers)
            patchattn.patch_model(model, spec[0], layers=layers, **params)
        try:
            contexts = sorted({int(c) for c in args.contexts.split(",")})
            cache_bytes = {c: kv_bytes(model, tokenizer, c) for c in contexts}  # also the warm-up
            if spec is not None:
                patchattn.attention_paths(model, reset=True)
            rows = run_tasks(model, tokenizer, tasks=args.tasks.split(","),
                             context_lengths=[int(c) for c in args.contexts.split(",")], samples=args.samples,
                             batch_size=args.batch_size, model_name=args.model)
            paths = patchattn.attention_paths(model, reset=True) if spec is not None else {}
        finally:
            if spec is not None:
                patchattn.unpatch_model(model)
        for row in rows:
            row.update(setting=name, attention_paths=paths, kv_bytes=cache_bytes[row["context"]])
            print(f"{name:18s} {row['task']:16s} {row['context']:6d} {100 * row['accuracy']:5.1f}% "
                  f"[{100 * row['ci_low']:.0f}-{100 * row['ci_high']:.0f}] prefill {row['prefill_s']:.2f}s "
                  f"kv {row['kv_bytes'] / 2**20:.0f} MiB")
        report["rows"].extend(rows)
        write_json(out / "longctx_tasks.json", report)
    plot(report["rows"], out / "longctx_tasks.png")


if __name__ == "__main__":
    main()

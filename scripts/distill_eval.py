"""Teacher vs distilled student(s): perplexity at several context lengths and passkey retrieval accuracy.

    python scripts/distill_eval.py --teacher smollm2-135m \
        --student final=runs/smollm2-lawcat/final --student stage1=runs/smollm2-lawcat/stage1 \
        --out benchmarks/results/distill_smollm2-135m_lawcat

Perplexity (``patchattn.evaluation.perplexity``, non-overlapping windows) is measured on a shipped text the
distillation did not train on (default ``kjv_sample.txt``; the shipped recipes train on Shakespeare), the same
``--ppl-tokens`` tokens at every context length. Passkey retrieval (``patchattn.passkey``): a random 5-digit key in
filler text at each depth, ``--trials`` prompts per (length, depth), greedy decoding, exact match; every model gets
the same prompts. Writes ``OUT.json`` (all numbers, every passkey trial), ``OUT.png`` and ``OUT.md`` (the tables,
also printed). Models are loaded one at a time: the teacher is a shipped real-weights name, a local directory or a
Hub id; a student is ``[LABEL=]DIR`` of a patchattn checkpoint (``patchattn.from_pretrained``).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import sys
import time
from pathlib import Path

import torch
from _bench import environment, pyplot, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2-135m", help="shipped name, local dir or Hub id of the base model")
    p.add_argument("--student", action="append", required=True, metavar="[LABEL=]DIR",
                   help="a distilled checkpoint (repeatable), e.g. final=runs/smollm2-lawcat/final")
    p.add_argument("--text", default="kjv_sample.txt", help="perplexity text: a path or a shipped text name")
    p.add_argument("--ppl-lengths", type=_ints, default=[1024, 4096, 8192])
    p.add_argument("--ppl-tokens", type=int, default=32768, help="tokens scored at every context length")
    p.add_argument("--ppl-batch-size", type=int, default=1)
    p.add_argument("--passkey-lengths", type=_ints, default=[1024, 2048, 4096, 8000],
                   help="prompt lengths; 8000 + the answer stays inside SmolLM2's 8192 positions")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=10, help="passkey prompts per (length, depth)")
    p.add_argument("--passkey-text", default=None, help="filler text (default: the shipped Shakespeare)")
    p.add_argument("--passkey-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--out", required=True, help="output path prefix (writes .json, .png, .md)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    students = {}
    for spec in args.student:
        label, sep, path = spec.partition("=")
        label, path = (label, path) if sep else (Path(spec).name or "student", spec)
        if label in students or label == "teacher":
            p.error(f"--student label {label!r} is used twice (give LABEL=DIR)")
        students[label] = path
    args.students = students
    return args


def load(spec: str, dtype: torch.dtype, device: str):
    """``(model, tokenizer)``: a shipped real-weights name, or a directory / Hub id (patched or not)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import patchattn
    from patchattn.realweights import KNOWN_MODELS, load_model

    if spec in KNOWN_MODELS:
        model, tokenizer = load_model(spec, dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        patched = getattr(AutoConfig.from_pretrained(spec), "patchattn", None) is not None
        model = (patchattn.from_pretrained if patched else AutoModelForCausalLM.from_pretrained)(spec, dtype=dtype)
    return model.to(device).eval(), tokenizer


def evaluate_model(label: str, spec: str, args, text: str, passkey_text: str | None) -> dict:
    from patchattn.evaluation import perplexity
    from patchattn.passkey import passkey_accuracy

    model, tokenizer = load(spec, DTYPES[args.dtype], args.device)
    spec_info = getattr(model.config, "patchattn", None)  # the list of patches, in order
    names = " + ".join(s["variant"] for s in spec_info or [])
    print(f"[{label}] {spec}: {'patched with ' + names if spec_info else 'unpatched'}", flush=True)
    out = {"path": spec, "patch": spec_info, "ppl": {}, "ppl_detail": {}}
    for length in args.ppl_lengths:
        r = perplexity(model, tokenizer, text, context_length=length, max_tokens=args.ppl_tokens,
                       batch_size=args.ppl_batch_size, progress=not args.no_progress)
        out["ppl"][str(length)] = r.ppl
        out["ppl_detail"][str(length)] = dataclasses.asdict(r)
        print(f"[{label}] ppl @ {length}: {r.ppl:.3f} ({r.tokens_scored} tokens, {r.seconds:.1f} s)", flush=True)
    start = time.perf_counter()
    result = passkey_accuracy(model, tokenizer, args.passkey_lengths, args.depths, args.trials, seed=args.seed,
                              text=passkey_text, batch_size=args.passkey_batch_size,
                              max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    out["passkey"] = result.to_dict()
    out["passkey_seconds"] = time.perf_counter() - start
    print(f"[{label}] passkey accuracy by length: {result.accuracy_by_length()}", flush=True)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def tables(results: dict, args) -> str:
    """Markdown: perplexity and passkey accuracy per model (students relative to the teacher), then accuracy by
    depth x length per model."""
    teacher = results["teacher"]
    head = (["model"] + [f"ppl @ {n}" for n in args.ppl_lengths] + [f"passkey @ {n}" for n in args.passkey_lengths])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, r in results.items():
        cells = [label]
        for n in args.ppl_lengths:
            ppl = r["ppl"][str(n)]
            rel = "" if label == "teacher" else f" ({100 * (ppl / teacher['ppl'][str(n)] - 1):+.1f}%)"
            cells.append(f"{ppl:.2f}{rel}")
        cells += [f"{r['passkey']['accuracy_by_length'][str(n)]:.0%}" for n in args.passkey_lengths]
        lines.append("| " + " | ".join(cells) + " |")
    for label, r in results.items():
        acc = r["passkey"]["accuracy"]
        lines += ["", f"Passkey accuracy, {label} (rows: depth, columns: prompt length; "
                      f"{args.trials} trials each):", "",
                  "| depth | " + " | ".join(str(n) for n in args.passkey_lengths) + " |",
                  "|---:" * (len(args.passkey_lengths) + 1) + "|"]
        for d in args.depths:
            lines.append(f"| {d:g} | " + " | ".join(f"{acc[str(n)][str(d)]:.0%}" for n in args.passkey_lengths) + " |")
    return "\n".join(lines)


def plot(results: dict, args, path: Path, title: str) -> None:
    plt = pyplot()
    n = len(results)
    fig, axes = plt.subplots(1, 2 + n, figsize=(5 * (2 + n), 4), squeeze=False)
    ax_ppl, ax_pk, heat = axes[0][0], axes[0][1], axes[0][2:]
    for label, r in results.items():
        ax_ppl.plot(args.ppl_lengths, [r["ppl"][str(k)] for k in args.ppl_lengths], "o-", label=label)
        ax_pk.plot(args.passkey_lengths, [r["passkey"]["accuracy_by_length"][str(k)] for k in args.passkey_lengths],
                   "o-", label=label)
    for ax, ylabel, lengths in ((ax_ppl, f"perplexity ({Path(args.text).name})", args.ppl_lengths),
                                (ax_pk, "passkey accuracy", args.passkey_lengths)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(k) for k in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.legend()
    ax_pk.set_ylim(-0.05, 1.05)
    for ax, (label, r) in zip(heat, results.items()):
        acc = r["passkey"]["accuracy"]
        grid = [[acc[str(k)][str(d)] for k in args.passkey_lengths] for d in args.depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(args.passkey_lengths)), [str(k) for k in args.passkey_lengths])
        ax.set_yticks(range(len(args.depths)), [f"{d:g}" for d in args.depths])
        ax.set_xlabel("prompt length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"passkey: {label}")
    fig.colorbar(im, ax=list(heat))
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> dict:
    from patchattn.data import read_text

    args = parse_args(argv)
    text = read_text(args.text)
    passkey_text = read_text(args.passkey_text) if args.passkey_text else None
    models = {"teacher": args.teacher, **args.students}
    results = {label: evaluate_model(label, spec, args, text, passkey_text) for label, spec in models.items()}
    settings = {k: v for k, v in vars(args).items() if k not in ("student", "no_progress")}
    env = environment(args.device.startswith("cuda"), cpu=platform.processor() or "cpu", key="device",
                      packages=("patchattn", "transformers", "torch"), date=None, with_command=False)
    paths = {ext: Path(f"{args.out}.{ext}") for ext in ("json", "md", "png")}
    write_json(paths["json"], {"settings": settings, "env": env, "models": results})
    table = tables(results, args)
    paths["md"].write_text(table + "\n")
    variants = sorted({s["variant"] for r in results.values() for s in r["patch"] or []})
    plot(results, args, paths["png"], f"{args.teacher} vs distilled ({', '.join(variants)})")
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

"""ACT on real weights: search the heads to calibrate on a calibration cloze set, then measure the accuracy change on
held-out cloze sets built from the shipped texts (CPU is fine).

    python scripts/act_search.py --model smollm2-135m
    python scripts/act_search.py --model gemma3-270m --max-heads 24

Calibration: Shakespeare characters [0, 0.2). Held out: Shakespeare [0.2, 1) (other plays) and the KJV sample (another
text altogether). Writes ``benchmarks/results/act_<model>.json`` and ``.png`` and prints a markdown table. Each step
is saved as it finishes; ``--resume`` skips the steps already in the JSON (same settings), so a long run can be
done in pieces on a busy machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import time
from pathlib import Path

import torch
from _bench import command, pyplot, save_figure, stamp, versions

import patchattn
from patchattn.cloze import accuracy, build_cloze, choice_logprobs, choice_scores, mean_logprob
from patchattn.data import read_text
from patchattn.head_search import search_heads
from patchattn.realweights import load_model


def test_sets(tok, items: int, context: int) -> dict:
    return {
        "shakespeare held-out": build_cloze(tok, start=0.2, end=1.0, items=items, context_tokens=context, seed=1),
        "kjv": build_cloze(tok, read_text("kjv_sample.txt"), items=items, context_tokens=context, seed=2, name="kjv"),
    }


def evaluate(model, cloze) -> dict:
    start = time.perf_counter()
    lp = choice_logprobs(model, cloze)
    return {"accuracy": accuracy(lp, cloze), "mean_logprob": mean_logprob(lp, cloze),
            "correct": (lp.argmax(dim=-1) == cloze.answer).tolist(), "seconds": time.perf_counter() - start}


def plot(result: dict, n_layers: int, n_heads: int, path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    search = result["search"]
    grid = torch.full((n_layers, n_heads), float("nan"))
    for key, gain in search["gains"].items():
        layer, head = map(int, key.split("."))
        grid[layer, head] = gain
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    bound = float(grid.nan_to_num(0).abs().max()) or 1.0
    im = ax1.imshow(grid.T.numpy(), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto", origin="lower")
    for layer, heads in search["heads"].items():
        ax1.scatter([int(layer)] * len(heads), heads, marker="o", facecolors="none", edgecolors="k", s=60)
    ax1.set(xlabel="layer", ylabel="head", title="gain in calibration mean log p, each head alone\n"
            "(blank: not tried; o: kept)")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax1)
    names = list(result["evaluations"])
    configs = [c for c in ("original", "act (searched heads)", "act (all heads)")
               if all(c in result["evaluations"][n] for n in names)]
    width = 0.8 / len(configs)
    for i, config in enumerate(configs):
        values = [100 * result["evaluations"][n][config]["accuracy"] for n in names]
        bars = ax2.bar([x + i * width for x in range(len(names))], values, width, label=config)
        ax2.bar_label(bars, fmt="%.1f", fontsize=8)
    ax2.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(names))], names)
    ax2.set(ylabel="accuracy (%)", title=f"held-out 4-way cloze, {result['model']}")
    low = min(100 * result["evaluations"][n][c]["accuracy"] for n in names for c in configs)
    ax2.set_ylim(max(0, low - 15), 108)
    ax2.legend(loc="upper center", ncol=len(configs), fontsize=8)
    save_figure(fig, path)


def sign_test(fixed: int, broken: int) -> float:
    """Two-sided exact sign test on the items that changed: is "fixed" vs "broken" a fair coin?"""
    n = fixed + broken
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n if n else 1.0
    return min(1.0, 2 * tail)


def table(result: dict) -> str:
    lines = ["| held-out set | items | setting | accuracy | Δ accuracy | mean log p(true) | fixed / broken "
             "(sign test p) |", "|---|---:|---|---:|---:|---:|---:|"]
    for name, evals in result["evaluations"].items():
        base = evals["original"]
        for config, ev in evals.items():
            if config == "items":
                continue
            fixed = sum(c and not b for c, b in zip(ev["correct"], base["correct"]))
            broken = sum(b and not c for c, b in zip(ev["correct"], base["correct"]))
            delta = "" if config == "original" else f"{100 * (ev['accuracy'] - base['accuracy']):+.1f}"
            flips = "" if config == "original" else f"{fixed} / {broken} (p = {sign_test(fixed, broken):.2f})"
            lines.append(f"| {name} | {evals['items']} | {config} | {100 * ev['accuracy']:.1f}% | {delta} | "
                         f"{ev['mean_logprob']:.4f} | {flips} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calibration-items", type=int, default=40)
    p.add_argument("--test-items", type=int, default=200)
    p.add_argument("--context", type=int, default=48, help="passage length in tokens")
    p.add_argument("--beta", type=float, default=0.4)
    p.add_argument("--theta", type=float, default=0.1)
    p.add_argument("--threshold", default="absolute", choices=("absolute", "relative"))
    p.add_argument("--max-heads", type=int, default=24, help="single-head trials (heads changed most); 0 = all")
    p.add_argument("--combine", default="greedy", choices=("greedy", "union"))
    p.add_argument("--min-gain", type=float, default=0.0)
    p.add_argument("--all-heads-control", action="store_true", help="also evaluate ACT on every head (no search)")
    p.add_argument("--resume", action="store_true", help="keep the steps already in the JSON (same settings)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    settings = {k: getattr(args, k) for k in ("calibration_items", "test_items", "context", "beta", "theta",
                                              "threshold", "max_heads", "combine", "min_gain")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"act_{args.model}.json"
    result = json.loads(json_path.read_text()) if args.resume and json_path.exists() else {}
    if result and result.get("settings") != settings:
        raise SystemExit(f"{json_path} was made with other settings: {result.get('settings')}; drop --resume")
    result.update({
        "model": args.model, "settings": settings,
        **versions("torch", "transformers"), "platform": platform.platform(), "date": stamp(), "dtype": "float32",
        "device": "cpu",
    })
    result.setdefault("command", command())
    result.setdefault("evaluations", {})

    def save() -> None:
        json_path.write_text(json.dumps(result, indent=1))

    model, tok = load_model(args.model)
    act = dict(beta=args.beta, theta=args.theta, threshold=args.threshold)
    if "search" not in result:
        cal = build_cloze(tok, end=0.2, items=args.calibration_items, context_tokens=args.context)
        trials = result.setdefault("search_trials", {})  # single-head gains so far, for --resume

        def on_trial(key: str, gain: float) -> None:
            trials[key] = gain
            save()

        start = time.perf_counter()
        found = search_heads(model, cal.input_ids, lambda logits: choice_scores(logits, cal.candidates).gather(
            -1, cal.answer[:, None]).mean().item(), max_heads=args.max_heads or None, min_gain=args.min_gain,
            combine=args.combine, known=trials, on_trial=on_trial, **act)
        result["search"] = {**found.__dict__, "calibration": cal.source, "items": len(cal),
                            "seconds_last_run": time.perf_counter() - start}
        del result["search_trials"]
        save()
    heads = result["search"]["heads"]
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    configs = {"original": None, "act (searched heads)": heads}
    if args.all_heads_control:
        configs["act (all heads)"] = {layer: list(range(n_heads)) for layer in range(n_layers)}
    for name, cloze in test_sets(tok, args.test_items, args.context).items():
        evals = result["evaluations"].setdefault(name, {"items": len(cloze)})
        for config, spec in configs.items():
            if config in evals:
                continue
            patch = (contextlib.nullcontext() if spec is None
                     else patchattn.patched(model, "act", heads=spec, **act))
            with patch:
                evals[config] = evaluate(model, cloze)
            print(f"{name} / {config}: accuracy {evals[config]['accuracy']:.4f}", flush=True)
            save()
    plot(result, n_layers, n_heads, out / f"act_{args.model}.png")
    s = result["search"]
    print(f"\nsearch: {sum(map(len, heads.values()))} heads kept of {len(s['gains'])} tried "
          f"({s['without_sinks']} without hidden sinks); calibration mean log p {s['baseline']:.4f} -> "
          f"{s['score']:.4f}; heads {json.dumps(heads)}\n")
    print(table(result))


if __name__ == "__main__":
    main()

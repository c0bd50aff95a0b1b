#!/usr/bin/env python
"""DHSA quality on real weights: perplexity of the shipped Shakespeare at 4k-32k context, DHSA presets vs exact.

Every preset runs with ``min_seq_len=1024`` (so 4k windows are sparse) on every full-attention layer (all of
SmolLM2's; Gemma-3's global layers, its sliding layers stay exact). Contexts beyond a model's trained length
(SmolLM2: 8192) are skipped unless ``--beyond-max``. The density column is the fraction of causal (query, key)
pairs the kernel computes, from the settings (it does not depend on the text). Every window starts with BOS
(Gemma-3 is lost without it: perplexity in the thousands).

  python scripts/dhsa_quality.py --out DIR                                  # GPU: both models, 4k-32k, bf16
  python scripts/dhsa_quality.py --models smollm2-135m --contexts 4096 --max-tokens 4096 \\
      --presets default,no-sinks,12.5%,static-window --out DIR              # CPU quick number (fp32)

Writes ``DIR/dhsa_quality.json`` and ``DIR/dhsa_quality.png``; prints a table last.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from _bench import environment, pyplot, save_figure, write_json
from tqdm.auto import tqdm

import patchattn
from patchattn.data import read_text
from patchattn.evaluation import perplexity
from patchattn.kernels.dhsa import DhsaSettings, expected_density
from patchattn.realweights import load_model
from patchattn.variants import get_variant

BASE = {"min_seq_len": 1024, "exact_tail": 0}  # perplexity scores the last tokens: an exact tail would flatter it
PRESETS = {
    "default": {},  # chunk 64, query block 64, budget 2048 tokens, window 256, 64 sink tokens
    "no-sinks": {"sink_tokens": 0},  # the paper's selection alone
    "12.5%": {"budget_tokens": 0, "budget_fraction": 0.125},
    "6.25%": {"budget_tokens": 0, "budget_fraction": 0.0625},
    "qblock128": {"query_block": 128},
    # the same number of kept keys as "default" with no content-based choice: what the selection is worth
    "static-window": {"budget_tokens": 0, "local_window": 2048 + 256},
}


def resolved(preset: str) -> dict:
    """The preset's full parameter set (defaults filled in), validated like patch_model does."""
    return get_variant("dhsa").make_params(**BASE, **PRESETS[preset]).to_dict()


def settings_of(preset: str) -> DhsaSettings:
    cls = get_variant("dhsa")
    return cls(cls.make_params(**BASE, **PRESETS[preset]), layer_idx=0).settings()


def full_attention_layers(model) -> list[int]:
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    return [i for i, t in enumerate(types) if t == "full_attention"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--contexts", default="4096,8192,16384,32768")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens of text scored at each context")
    p.add_argument("--presets", default="default,no-sinks,12.5%,6.25%,qblock128,static-window",
                   help=f"comma-separated, of: {', '.join(PRESETS)}".replace("%", "%%"))
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    p.add_argument("--beyond-max", action="store_true", help="also contexts past max_position_embeddings")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    contexts = [int(c) for c in args.contexts.split(",")]
    presets = args.presets.split(",")
    unknown = [x for x in presets if x not in PRESETS]
    if unknown:
        p.error(f"unknown presets {unknown}; known: {list(PRESETS)}")
    text = read_text()
    meta = {**environment(device == "cuda", cpu=f"cpu ({platform.machine()})", key="device",
                          packages=("torch", "transformers", "triton")),
            "dtype": str(dtype), "corpus": "shakespeare.txt", "max_tokens": args.max_tokens,
            "presets": {x: resolved(x) for x in presets}}
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        model, tok = load_model(name, dtype=dtype)
        model.to(device).eval()
        layers = full_attention_layers(model)
        max_pos = model.config.get_text_config().max_position_embeddings
        ctxs = [c for c in contexts if args.beyond_max or c <= max_pos]
        jobs = [(c, x) for c in ctxs for x in ["exact"] + presets]
        exact = {}
        for ctx, preset in tqdm(jobs, desc=name, file=sys.stdout):
            row = {"model": name, "context": ctx, "preset": preset, "layers": len(layers)}
            try:
                if preset != "exact":
                    patchattn.patch_model(model, "dhsa", layers=layers, **resolved(preset))
                    row["density"] = expected_density(ctx, settings_of(preset))
                t0 = time.perf_counter()
                res = perplexity(model, tok, text, context_length=ctx, max_tokens=args.max_tokens, device=device,
                                 progress=False, bos_per_window=True)
                row.update(ppl=res.ppl, seconds=time.perf_counter() - t0, tokens=res.tokens_scored)
                if preset == "exact":
                    exact[ctx] = res.ppl
                elif ctx in exact:
                    row["increase_pct"] = 100 * (res.ppl / exact[ctx] - 1)
            except (RuntimeError, ValueError) as e:  # OOM or a case the setup cannot run: record, go on
                row["error"] = repr(e)[:300]
                print(f"{name} {ctx} {preset} failed: {row['error']}", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
            finally:
                if patchattn.is_patched(model):
                    patchattn.unpatch_model(model)
            rows.append(row)
            write_json(out / "dhsa_quality.json", {"meta": meta, "rows": rows})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    _plot(rows, meta, out / "dhsa_quality.png")
    _table(rows, meta)


def _plot(rows, meta, path):
    plt = pyplot()
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        for preset in meta["presets"]:
            pts = sorted((r["context"], r["increase_pct"]) for r in rows
                         if r["model"] == m and r["preset"] == preset and "increase_pct" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=preset)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("perplexity increase vs exact (%)")
        ax.set_title(m, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"DHSA perplexity, {meta['device']}, {meta['dtype']}", fontsize=9)
    save_figure(fig, path)


def _table(rows, meta):
    print(f"\n{meta['device']} | torch {meta['torch']} | transformers {meta['transformers']} | triton "
          f"{meta['triton']} | {meta['dtype']} | {meta['date']}\n{meta['command']}")
    print(f"{'model':>13} {'context':>7} {'preset':>14} | {'ppl':>8} {'vs exact':>8} {'density':>7} {'s':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:>13} {r['context']:>7} {r['preset']:>14} | failed: {r['error'][:60]}")
            continue
        inc = f"{r['increase_pct']:+7.2f}%" if "increase_pct" in r else f"{'':>8}"
        dens = f"{r['density']:7.3f}" if "density" in r else f"{'1':>7}"
        print(f"{r['model']:>13} {r['context']:>7} {r['preset']:>14} | {r['ppl']:8.3f} {inc} {dens} "
              f"{r['seconds']:6.1f}")


if __name__ == "__main__":
    main()

"""HyperAttention quality on real weights: perplexity vs number of patched layers, per quality lever.

Runs on CPU (slow but exact-reproducible) or GPU. Every setting uses the same per-query budget: a sorted block of
``block_size`` keys plus 256 extra keys (uniform samples, or samples + sinks + local window).

    python scripts/hyper_quality.py --model smollm2-135m --corpus shakespeare --counts 0,4,8,15,30
    python scripts/hyper_quality.py --model gemma3-270m --corpus kjv --global-only --counts 0,1,2,3

Writes ``benchmarks/results/hyper_quality_<model>_<corpus>.json`` and a PNG of the curve beside it.
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from _bench import environment, pyplot, save_figure, write_json

import patchattn
from patchattn.data import default_text_path
from patchattn.evaluation import perplexity
from patchattn.planner import capture, layer_errors
from patchattn.realweights import load_model

BASE = {"block_size": 256, "min_seq_len": 2048, "sink_tokens": 0, "exact_tail": 0}  # the published estimator
SETTINGS = {
    "official": {**BASE, "sample_size": 256},
    "centre keys": {**BASE, "sample_size": 256, "center_keys": True},
    "sinks only": {**BASE, "sample_size": 240, "sink_tokens": 16},
    "window only": {**BASE, "sample_size": 144, "local_window": 112},
    "sinks+window": {**BASE, "sample_size": 128, "sink_tokens": 16, "local_window": 112},
    "sinks+window+centre": {**BASE, "sample_size": 128, "sink_tokens": 16, "local_window": 112,
                            "center_keys": True},
}
CORPORA = {"shakespeare": "shakespeare.txt", "kjv": "kjv_sample.txt"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="shakespeare", choices=CORPORA)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens scored (one window at the default)")
    p.add_argument("--counts", default="0,4,8,15,30", help="numbers of patched layers (the last N candidates)")
    p.add_argument("--global-only", action="store_true", help="candidates = full-attention layers only")
    p.add_argument("--settings", default="official,sinks+window", help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--skip-layer-errors", action="store_true", help="only the perplexity curve")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dtype=torch.float32)
    model.to(device)
    text = (default_text_path().parent / CORPORA[args.corpus]).read_text()
    n_layers = model.config.num_hidden_layers
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * n_layers
    candidates = [i for i in range(n_layers) if not args.global_only or types[i] == "full_attention"]
    counts = [int(c) for c in args.counts.split(",")]
    names = args.settings.split(",")

    ids = tok(text, return_tensors="pt").input_ids[:, : args.context].to(device)
    errors = {}
    if not args.skip_layer_errors:
        store = capture(model, ids)
        errors = {name: layer_errors(store, "hyper", **SETTINGS[name]) for name in names}
        del store
    rows = []
    ppl = lambda: perplexity(model, tok, text, context_length=args.context, max_tokens=args.max_tokens,
                             device=device).ppl
    exact = ppl()
    for name in names:
        for count in counts:
            if count == 0:
                rows.append({"setting": name, "layers": 0, "ppl": exact})
                continue
            layers = candidates[-count:]
            with patchattn.patched(model, "hyper", layers=layers, **SETTINGS[name]):
                value = ppl()
            rows.append({"setting": name, "layers": count, "patched": layers, "ppl": value})
            print(f"{name:>22} last {count:>2}: ppl {value:.3f} ({100 * (value / exact - 1):+.1f}%)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"hyper_quality_{args.model}_{args.corpus}{'_' + args.tag if args.tag else ''}"
    meta = {"model": args.model, "corpus": args.corpus, "context": args.context, "tokens": args.max_tokens,
            "settings": {n: SETTINGS[n] for n in names}, "exact_ppl": exact, "rows": rows,
            "layer_errors": errors, **environment(device == "cuda", cpu=platform.machine(), key="device",
                                                  packages=("torch", "transformers"))}
    write_json(out / f"{stem}.json", meta, indent=2)
    _plot(meta, out / f"{stem}.png")
    print(f"\n{args.model} / {args.corpus}: exact ppl {exact:.3f} at context {args.context}")
    print(f"{'setting':>22} " + " ".join(f"{c:>8}" for c in counts))
    for name in names:
        vals = [r["ppl"] for r in rows if r["setting"] == name]
        print(f"{name:>22} " + " ".join(f"{v:8.2f}" for v in vals))


def _plot(meta: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in meta["settings"]:
        pts = [(r["layers"], r["ppl"]) for r in meta["rows"] if r["setting"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(meta["exact_ppl"] * 1.05, color="grey", ls="--", lw=0.8, label="exact +5%")
    ax.set_xlabel("patched layers (last N)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{meta['model']} / {meta['corpus']}, context {meta['context']}")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

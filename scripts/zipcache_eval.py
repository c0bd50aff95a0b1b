"""ZipCache on real weights: true KV bytes vs the fp16 DynamicCache, and perplexity / next-token accuracy with the
compression in effect.

Protocol (teacher-forced streaming): each window of ``--context`` tokens is fed through the cache as a prefill of
``--prefill`` tokens followed by chunks of ``--chunk`` tokens (default = ``requant_interval`` = 100, so a chunk is
exactly one streaming window: its queries see the quantised past plus their own chunk in full precision, the same as
100 decode steps). Only the continuation tokens are scored, so every scored token is predicted from a compressed
cache. The baseline runs the identical procedure with transformers' DynamicCache. Compression = fp16 bytes of the
DynamicCache (same layers, same tokens) / bytes the ZipCache really holds (``nbytes()``; layers left in full
precision count at fp16), measured at the end of each window.

    nice -n 10 python scripts/zipcache_eval.py --model smollm2-135m --windows 8
    nice -n 10 python scripts/zipcache_eval.py --model gemma3-270m --windows 8 \
        --configs paper,default,default/keep-sliding,all-4bit

With ``--prefill-variant NAME`` (e.g. ``hyper``; its parameters by ``--prefill-param k=v``) the run compares the
combination instead of ``--configs``, on the same windows: exact (DynamicCache, unpatched), NAME alone (its generation
cache), zipcache alone (the ``default`` config plus ``--param``) and NAME+zipcache (NAME patched, then zipcache
composed over it, with the retrieval heads NAME found alone). A prefill approximation only runs on a whole causal
prefill of more than its ``min_seq_len`` tokens: each row records how many layers (and KV heads) ran it in every
window (``patchattn.attention_paths``, less the retrieval heads kept exact), so a row whose approximation fell back to
exact attention shows 0.

    nice -n 10 python scripts/zipcache_eval.py --model smollm2-135m --context 8192 --prefill 7168 --windows 3 \
        --prefill-variant hyper --tag _8k

Writes ``benchmarks/results/zipcache_quality_<model>_<corpus><tag>.json`` (with ``--prefill-variant``:
``<NAME>_zipcache_quality_...``) and a PNG beside it.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import time
from pathlib import Path

import torch
from _bench import environment, pyplot, save_figure, write_json
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

import patchattn
from patchattn.data import read_text
from patchattn.patching import generation_cache
from patchattn.realweights import load_model
from patchattn.variants.zipcache import PAPER_SETTING, ZipCacheLayer

# transformers 5.24 renamed the forward's cache argument from past_key_values to cache
CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
CONFIGS = {
    "paper": PAPER_SETTING,  # 4/2 bits for keys and values, 60 % salient
    "default": {},  # the measured recommendation (4-bit keys in groups of 128, 20 % salient, 1 sink)
    "paper/random-saliency": {**PAPER_SETTING, "_random_saliency": True},
    "default/random-saliency": {"_random_saliency": True},
    "default/keep-sliding": {"quantize_sliding": False},
    "all-2bit": {**PAPER_SETTING, "high_bits": 2, "low_bits": 2},
    "all-4bit": {**PAPER_SETTING, "high_bits": 4, "low_bits": 4},
    "all-8bit": {**PAPER_SETTING, "high_bits": 8, "low_bits": 8},
}
CORPORA = {"shakespeare": "shakespeare.txt", "kjv": "kjv_sample.txt"}


def fp16_bytes(layer) -> int:
    """What a layer's full-precision keys/values would take in fp16."""
    return sum(t.numel() * 2 for t in (layer.keys, layer.values) if t is not None)


def cache_bytes(cache) -> int:
    return sum(layer.nbytes() if isinstance(layer, ZipCacheLayer) else fp16_bytes(layer) for layer in cache.layers)


@torch.inference_mode()
def score_window(model, ids: torch.Tensor, prefill: int, chunk: int, cache) -> dict:
    """Teacher-forced NLL and argmax of every token after the prefill, fed chunk by chunk through ``cache``."""
    out = model(input_ids=ids[:, :prefill], logits_to_keep=1, use_cache=True, **{CACHE_KW: cache})
    last = out.logits[:, -1].float()
    nll, preds = [], []
    for start in range(prefill, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        logits = model(input_ids=piece, use_cache=True, **{CACHE_KW: cache}).logits.float()
        predicting = torch.cat([last[:, None], logits[:, :-1]], dim=1)  # position t predicts token t + 1
        nll.append(-torch.log_softmax(predicting, -1).gather(-1, piece[..., None])[..., 0])
        preds.append(predicting.argmax(-1))
        last = logits[:, -1]
    return {"nll": torch.cat(nll, 1)[0], "pred": torch.cat(preds, 1)[0]}


def randomise_saliency() -> None:
    """Ablation: random scores instead of the probe estimate (same bit budget), to show what saliency buys. The
    caller restores ``ZipCacheLayer.quantize_recent``."""
    gen = torch.Generator().manual_seed(0)
    original = ZipCacheLayer.quantize_recent

    def quantize_recent(self):
        self.score_sums = torch.rand(self.score_sums.shape, generator=gen).to(self.score_sums)
        self.score_counts = torch.ones_like(self.score_sums)
        original(self)

    ZipCacheLayer.quantize_recent = quantize_recent


def parse_value(text: str):
    """A JSON value (numbers, true/false, lists), else the text itself (``layers=last:16``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(items: list[str]) -> dict:
    """``["k=v", ...]`` → parameters."""
    return {k: parse_value(v) for k, v in (item.split("=", 1) for item in items)}


def approximated_kv_heads(model, specs: list[dict], paths: dict) -> dict[int, int]:
    """Per layer that took the ``approximate`` path, how many KV heads it really approximated: a prefill variant's
    ``exact_kv_heads`` (retrieval heads) stay exact (a layer whose heads all are records ``exact_retrieval``, and
    is left out here too, should a path say otherwise). Layers at 0 are left out."""
    num_kv = model.config.get_text_config().num_key_value_heads
    exact = {int(i): len(heads) for spec in specs for i, heads in (spec["params"].get("exact_kv_heads") or {}).items()}
    heads = {i: num_kv - exact.get(i, 0) for i, counts in paths.items() if counts.get("approximate")}
    return {i: n for i, n in heads.items() if n > 0}


def run_setting(model, windows, prefill: int, chunk: int, patches: list[tuple[str, dict]], desc: str) -> dict:
    """Patch ``model`` with ``patches`` (``[(variant, params), ...]`` in order; none = the unpatched model with a
    DynamicCache), score every window, unpatch. Also returns each window's cache bytes, the KV heads each layer
    approximated in it, and the specs as patch_model recorded them (parameters found at patch time included)."""
    try:
        for variant, params in patches:
            patchattn.patch_model(model, variant, **params)
        specs = patchattn.patch_specs(model)
        patchattn.attention_paths(model, reset=True)
        scores, nbytes, approximated, paths = [], [], [], {}
        for w in tqdm(windows, desc=desc, unit="win"):
            cache = generation_cache(model) if patches else DynamicCache(config=model.config)
            scores.append(score_window(model, w, prefill, chunk, cache))
            nbytes.append(cache_bytes(cache))
            window_paths = patchattn.attention_paths(model, reset=True)
            approximated.append(approximated_kv_heads(model, specs, window_paths))
            for counts in window_paths.values():
                for path, n in counts.items():
                    paths[path] = paths.get(path, 0) + n
    finally:
        if patchattn.is_patched(model):
            patchattn.unpatch_model(model)
    return {"nll": [r["nll"] for r in scores], "pred": torch.cat([r["pred"] for r in scores]), "bytes": nbytes,
            "approximated": approximated, "paths": paths, "specs": specs}


def summarise(name: str, run: dict, base: dict, targets: torch.Tensor) -> dict:
    """One row: quality, bytes and approximation coverage, and the deltas vs ``base``."""
    ppl = math.exp(torch.cat(run["nll"]).mean().item())
    base_ppl = math.exp(torch.cat(base["nll"]).mean().item())
    accuracy = (run["pred"] == targets).float().mean().item()
    return {"config": name, "patches": run["specs"], "ppl": ppl, "ppl_increase_pct": 100 * (ppl / base_ppl - 1),
            "accuracy": accuracy, "accuracy_delta": accuracy - (base["pred"] == targets).float().mean().item(),
            "agreement_with_baseline": (run["pred"] == base["pred"]).float().mean().item(),
            "kv_bytes": sum(run["bytes"]) / len(run["bytes"]), "compression": sum(base["bytes"]) / sum(run["bytes"]),
            "approximated_layers": min(len(layers) for layers in run["approximated"]),
            "approximated_kv_heads": min(sum(layers.values()) for layers in run["approximated"]),
            "approximated_layers_per_window": [len(layers) for layers in run["approximated"]],
            "attention_paths": run["paths"], "window_ppl": [math.exp(n.mean().item()) for n in run["nll"]]}


def compare_combination(model, windows, args, extra: dict, targets: torch.Tensor) -> list[dict]:
    """exact, NAME alone, zipcache alone, NAME+zipcache on the same windows (see the module docstring)."""
    name = args.prefill_variant
    zipcache = {**CONFIGS["default"], **extra}
    run = functools.partial(run_setting, model, windows, args.prefill, args.chunk)
    base = run([], f"{args.model} exact")
    alone = run([(name, parse_params(args.prefill_param))], f"{args.model} {name}")
    # the composition reuses what patch_model found for NAME alone (its retrieval heads): the same NAME in both rows
    found = alone["specs"][0]
    composed = [(name, {"layers": found["layers"], **found["params"]}), ("zipcache", zipcache)]
    runs = {"exact": base, name: alone, "zipcache": run([("zipcache", zipcache)], f"{args.model} zipcache"),
            f"{name}+zipcache": run(composed, f"{args.model} {name}+zipcache")}
    return [summarise(label, r, base, targets) for label, r in runs.items()]


def compare_configs(model, windows, args, extra: dict, targets: torch.Tensor) -> list[dict]:
    """The DynamicCache baseline, then each zipcache config of ``--configs``."""
    run = functools.partial(run_setting, model, windows, args.prefill, args.chunk)
    base = run([], f"{args.model} DynamicCache")
    rows = [summarise("DynamicCache (fp16 bytes)", base, base, targets)]
    for name in args.configs.split(","):
        params = {**(CONFIGS[name] if name in CONFIGS else parse_params(name.split("+"))), **extra}
        random_saliency = params.pop("_random_saliency", False)
        original = ZipCacheLayer.quantize_recent
        try:
            if random_saliency:
                randomise_saliency()
            result = run([("zipcache", params)], f"{args.model} zipcache {name}")
        finally:
            ZipCacheLayer.quantize_recent = original
        rows.append({**summarise(name, result, base, targets), "params": params})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="shakespeare", choices=CORPORA)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--windows", type=int, default=6, help="windows, spread evenly over the text")
    p.add_argument("--configs", default="paper,default,default/random-saliency,all-4bit",
                   help=f"comma-separated: named ({', '.join(CONFIGS)}) or inline k=v+k=v")
    p.add_argument("--param", action="append", default=[], help="extra zipcache parameter for every config, k=v")
    p.add_argument("--prefill-variant", help="compare exact, this prefill variant alone, zipcache alone and both "
                                             "composed (replaces --configs)")
    p.add_argument("--prefill-param", action="append", default=[], help="--prefill-variant parameter, k=v")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype)
    model.to(device).eval()
    ids = tok(read_text(CORPORA[args.corpus]), add_special_tokens=False, verbose=False).input_ids
    starts = [round(i * (len(ids) - args.context) / max(args.windows - 1, 1)) for i in range(args.windows)]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    windows = [torch.tensor([bos + ids[s : s + args.context - len(bos)]], device=device) for s in starts]
    extra = parse_params(args.param)

    started = time.perf_counter()
    targets = torch.cat([w[0, args.prefill :] for w in windows])
    if args.prefill_variant:
        rows = compare_combination(model, windows, args, extra, targets)
        stem = f"{args.prefill_variant}_zipcache_quality_{args.model}_{args.corpus}{args.tag}"
        title = f"{args.prefill_variant} + ZipCache on {args.model} / {args.corpus}"
    else:
        rows = compare_configs(model, windows, args, extra, targets)
        stem = f"zipcache_quality_{args.model}_{args.corpus}{args.tag}"
        title = f"ZipCache on {args.model} / {args.corpus}"

    result = {
        "what": "ZipCache teacher-forced streaming evaluation (see scripts/zipcache_eval.py docstring)",
        "model": args.model, "corpus": args.corpus, "context": args.context, "prefill": args.prefill,
        "chunk": args.chunk, "windows": args.windows, "scored_tokens": int(targets.numel()), "dtype": args.dtype,
        "extra_params": extra, "prefill_variant": args.prefill_variant,
        "prefill_params": parse_params(args.prefill_param), "rows": rows, "seconds": time.perf_counter() - started,
        **environment(device == "cuda", cpu=platform.processor() or "cpu", key="device",
                      packages=("torch", "transformers"), date="seconds", with_command=True),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result, indent=2)
    plot(rows, out / f"{stem}.png", f"{title} ({targets.numel()} scored tokens, context {args.context})")

    print(f"\n{args.model}, {args.corpus}: {targets.numel()} tokens scored after a {args.prefill}-token prefill, "
          f"chunks of {args.chunk}")
    print(f"{'config':<26}{'KV MiB':>9}{'compress':>10}{'ppl':>9}{'Δppl %':>9}{'acc':>8}{'Δacc':>8}"
          f"{'approx layers/KV heads':>24}")
    for r in rows:
        print(f"{r['config']:<26}{r['kv_bytes'] / 2**20:>9.2f}{r['compression']:>9.2f}×{r['ppl']:>9.3f}"
              f"{r['ppl_increase_pct']:>+9.2f}{r['accuracy']:>8.4f}{r['accuracy_delta']:>+8.4f}"
              f"{r['approximated_layers']:>17}/{r['approximated_kv_heads']:<6}")
    return result


def plot(rows, path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        ax.scatter(r["compression"], r.get("ppl_increase_pct", 0.0), s=40)
        ax.annotate(r["config"], (r["compression"], r.get("ppl_increase_pct", 0.0)), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.axhline(2.0, color="grey", ls="--", lw=0.8)  # the target: ≤ 2 % at ≥ 4.5×
    ax.axvline(4.5, color="grey", ls="--", lw=0.8)
    ax.set_yscale("symlog", linthresh=2.0)
    top = max(r.get("ppl_increase_pct", 0) for r in rows)
    ticks = [t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200) if t <= 2.5 * top]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(bottom=min(-0.3, 1.2 * min(r.get("ppl_increase_pct", 0) for r in rows)))
    ax.set_xlim(right=1.2 * max(r["compression"] for r in rows))
    ax.set_xlabel("KV compression vs fp16 DynamicCache (×)")
    ax.set_ylabel("perplexity increase (%, symlog)")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

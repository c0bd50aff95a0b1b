"""GPU decode latency and KV memory of the ZipCache cache vs transformers' DynamicCache, on real weights.

For each model and context: prefill ``context`` tokens of real text (the shipped Shakespeare, repeated as needed),
then ``--steps`` greedy decode steps, one forward per token, timed with CUDA syncs. The ZipCache runs (the paper's
setting and ``PAPER_SETTING``) use the cache ``generate()`` would build (``generation_cache``); ``--steps`` >
``requant_interval`` (100) so one streaming re-quantisation is inside the mean. ``--decode-paths`` picks how their
decode steps attend: ``fused`` (the default ``decode_kernel=True``: the Triton kernel reads the packed blocks) and/or
``torch`` (``decode_kernel=False``: dequantise every block, then SDPA), each a row ``<setting>/<path>``. Also
records the true KV bytes (``nbytes()`` vs the DynamicCache's bf16 tensors), peak memory above the weights during
prefill + decode, and a correctness check per path (ZipCache at 8/8 bits vs DynamicCache, teacher-forced logits at a
short context).

    python scripts/bench_zipcache_decode.py --out /tmp/zipcache_gpu          # ~2-3 min on one H200
    python scripts/bench_zipcache_decode.py --out /tmp/zipcache_gpu --decode-paths fused,torch

Without the weights, ``--random-init --config-json a/config.json,b/config.json`` builds each model from its saved
config with random bf16 weights (on the device) and feeds random token ids: the latency and memory are those of the
real architecture, the correctness check still compares the caches on that model.

    python scripts/bench_zipcache_decode.py --out /tmp/zk_e2e --random-init \\
        --config-json /path/Llama-3.1-8B/config.json --contexts 4096,16384,32768 --decode-paths fused,torch

Writes ``zipcache_decode.json`` and ``zipcache_decode.png`` into ``--out``; the table is printed last.
"""
from __future__ import annotations

import argparse
import statistics
import time
import traceback
from pathlib import Path

import torch
from _bench import environment, pyplot, save_figure, write_json
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

import patchattn
from patchattn.cache import layer_nbytes
from patchattn.data import read_text
from patchattn.patching import generation_cache
from patchattn.realweights import load_model
from patchattn.variants.zipcache import PAPER_SETTING

CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
CONFIGS = {"paper": PAPER_SETTING, "default": {}}
DECODE_PATHS = {"fused": True, "torch": False}  # the zipcache parameter decode_kernel of each


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


@torch.inference_mode()
def run(model, ids: torch.Tensor, cache, steps: int, interval: int) -> dict:
    """Prefill then ``steps`` greedy decode steps; per-step wall times."""
    base = memory_allocated()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, logits_to_keep=1, use_cache=True, **{CACHE_KW: cache})
    sync()
    prefill = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **{CACHE_KW: cache})
        token = out.logits[:, -1:].argmax(-1)
        sync()
        times.append(time.perf_counter() - t)
    requant = [t for i, t in enumerate(times, 1) if i % interval == 0]
    plain = [t for i, t in enumerate(times, 1) if i % interval]
    return {
        "prefill_ms": 1e3 * prefill,
        "decode_ms_mean": 1e3 * statistics.fmean(times),
        "decode_ms_median": 1e3 * statistics.median(plain),
        "requant_step_ms": 1e3 * statistics.fmean(requant) if requant else None,
        "kv_bytes": sum(layer_nbytes(layer) for layer in cache.layers),
        "peak_mem_above_start_bytes": (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0) - base,
    }


@torch.inference_mode()
def correctness(model, ids: torch.Tensor, decode_kernel: bool) -> float:
    """Max |logit difference| / max |logit| over a prefill and 20 decode steps fed the same (DynamicCache-greedy)
    tokens: ZipCache at 8/8 bits vs DynamicCache, i.e. bf16 noise level when the plumbing is right."""
    def logits(cache, tokens=None):
        out = model(input_ids=ids, use_cache=True, **{CACHE_KW: cache})
        rows = [out.logits[:, -1].float()]
        for i in range(20):
            token = rows[-1][:, None].argmax(-1) if tokens is None else tokens[:, i : i + 1]
            rows.append(model(input_ids=token, use_cache=True, **{CACHE_KW: cache}).logits[:, -1].float())
        return torch.stack(rows, 1)

    ref = logits(DynamicCache(config=model.config))
    patchattn.patch_model(model, "zipcache", high_bits=8, low_bits=8, requant_interval=8, decode_kernel=decode_kernel)
    try:
        got = logits(generation_cache(model), tokens=ref[:, :-1].argmax(-1))
    finally:
        patchattn.unpatch_model(model)
    return (got - ref).abs().max().item() / ref.abs().max().item()


def random_model(config_json: str, device: str):
    """``(label, model, token ids)``: the architecture of ``config_json`` with random bf16 weights made on
    ``device``, and random ids long enough for any context."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_json)
    config = AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    label = (path.parent.name if path.name == "config.json" else path.stem) + "-random"
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, (1 << 17,), generator=torch.Generator().manual_seed(0)).tolist()
    return label, model, ids


def load(name: str, args):
    """``(label, model, token ids)`` of a real model (its weights, the shipped text) or a ``--random-init`` one."""
    if args.random_init:
        return random_model(name, args.device)
    model, tok = load_model(name, dtype=torch.bfloat16)
    return name, model, tok(read_text(), add_special_tokens=False, verbose=False).input_ids


def measure(model, name: str, ctx: int, kind: str, rep: int, ids: torch.Tensor, args, configs, kinds, interval) -> dict:
    """One row: ``kind`` (DynamicCache or a ``<setting>/<path>`` ZipCache) prefilled with ``ids``, then decoded."""
    row = {"model": name, "context": ctx, "cache": kind, "repeat": rep}
    try:
        cache = make_cache(model, kind, configs, kinds)
        row.update(run(model, ids, cache, args.steps, interval))
        if kind not in kinds:
            row["requant_step_ms"] = None  # nothing is re-quantised in a DynamicCache
    except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
        row["error"] = repr(exc)
        row["traceback"] = traceback.format_exc(limit=4)
    finally:
        if patchattn.is_patched(model):
            patchattn.unpatch_model(model)
        cache = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def make_cache(model, kind: str, configs, kinds):
    """A DynamicCache, or the cache generate() builds after patching ``model`` with ZipCache ``kind``."""
    if kind not in kinds:
        return DynamicCache(config=model.config)
    cfg, kernel = kinds[kind]
    patchattn.patch_model(model, "zipcache", **configs[cfg], decode_kernel=kernel)
    return generation_cache(model)


def best_of_repeats(rows: list[dict]) -> list[dict]:
    """One row per (model, context, cache): the repeat with the lowest median decode step; all medians kept."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("model"), r.get("context"), r.get("cache")), []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if "error" not in r]
        if not ok:
            out.append(group[0])
            continue
        best = dict(min(ok, key=lambda r: r["decode_ms_median"]))
        best["decode_ms_median_repeats"] = [r["decode_ms_median"] for r in ok]
        out.append(best)
    return out


@torch.inference_mode()
def profile_steps(model, ids: torch.Tensor, kind: str, configs, kinds, steps: int = 5) -> list[str]:
    """The 12 ops with the most CPU time over ``steps`` decode steps of ``kind`` (where a step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        cache = make_cache(model, kind, configs, kinds)
        out = model(input_ids=ids, logits_to_keep=1, use_cache=True, **{CACHE_KW: cache})
        token = out.logits[:, -1:].argmax(-1)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                token = model(input_ids=token, use_cache=True, **{CACHE_KW: cache}).logits[:, -1:].argmax(-1)
            sync()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)
        return table.splitlines()
    finally:
        if patchattn.is_patched(model):
            patchattn.unpatch_model(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--contexts", default="4096,8192,16384,32768")
    p.add_argument("--steps", type=int, default=110, help="decode steps (> 100: one streaming re-quantisation)")
    p.add_argument("--configs", default="paper,default", help=f"zipcache settings, of: {', '.join(CONFIGS)}")
    p.add_argument("--decode-paths", default="fused", help=f"zipcache decode paths, of: {', '.join(DECODE_PATHS)}")
    p.add_argument("--random-init", action="store_true", help="random weights from --config-json (no weights needed)")
    p.add_argument("--config-json", help="with --random-init: comma-separated config.json paths (replace --models)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--repeats", type=int, default=2, help="passes per context, the kinds' order rotated; best kept")
    p.add_argument("--profile", action="store_true", help="also profile 5 decode steps per kind (top CPU ops)")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    args = p.parse_args()
    if args.random_init != bool(args.config_json):
        raise SystemExit("--random-init and --config-json go together")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --device cpu for a smoke test)")
    dev = args.device
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    paths = {name: DECODE_PATHS[name] for name in args.decode_paths.split(",")}
    kinds = {f"{cfg}/{path}": (cfg, kernel) for cfg in configs for path, kernel in paths.items()}
    interval = 100  # requant_interval of every config here
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    meta = {**environment(dev == "cuda", packages=("torch", "transformers", "cuda", "patchattn"), date="seconds"),
            "zipcache_configs": configs, "decode_paths": list(paths), "random_init": args.random_init,
            "steps": args.steps, "batch": args.batch, "repeats": args.repeats}
    rows, checks, profiles = [], {}, {}
    started = time.perf_counter()
    for source in (args.config_json if args.random_init else args.models).split(","):
        try:
            name, model, text_ids = load(source, args)
            model.to(dev).eval()
        except Exception as exc:  # noqa: BLE001 - record and go on with the next model
            rows.append({"model": source, "error": f"load: {exc!r}"})
            continue
        checks[name] = {}
        for path, kernel in paths.items():
            try:
                checks[name][path] = correctness(model, torch.tensor([text_ids[:300]], device=dev), kernel)
            except Exception as exc:  # noqa: BLE001
                checks[name][path] = f"error: {exc!r}"
        run(model, torch.tensor([text_ids[:512]], device=dev), DynamicCache(config=model.config), 8, interval)
        for ctx in tqdm(contexts, desc=name, unit="ctx"):
            starts = [(i * 7919) % max(1, len(text_ids) - 1) for i in range(args.batch)]  # a different text per row
            ids = torch.tensor([(text_ids[s:] + text_ids * (ctx // len(text_ids) + 1))[:ctx] for s in starts],
                               device=dev)
            order = ["DynamicCache", *kinds]
            for rep in range(args.repeats):  # rotate the order: no kind always runs first after a prefill
                for kind in order[rep % len(order):] + order[:rep % len(order)]:
                    rows.append(measure(model, name, ctx, kind, rep, ids, args, configs, kinds, interval))
        if args.profile:
            ids = torch.tensor([text_ids[:contexts[0]]] * args.batch, device=dev)
            profiles[name] = {kind: profile_steps(model, ids, kind, configs, kinds)
                              for kind in ("DynamicCache", *kinds)}
        del model
    rows = best_of_repeats(rows)
    for row in rows:
        ref = next((r for r in rows if r.get("cache") == "DynamicCache" and r.get("model") == row.get("model")
                    and r.get("context") == row.get("context") and "error" not in r), None)
        if row.get("cache") in kinds and ref and "error" not in row:
            row["compression"] = ref["kv_bytes"] / row["kv_bytes"]
            row["decode_slowdown"] = row["decode_ms_median"] / ref["decode_ms_median"]
    meta["profile"] = profiles
    meta["seconds"] = time.perf_counter() - started
    write_json(out_dir / "zipcache_decode.json", {**meta, "correctness_8bit": checks, "rows": rows}, indent=2)
    plot(rows, out_dir / "zipcache_decode.png", meta)

    print(f"\n{meta['gpu']}, torch {meta['torch']}, transformers {meta['transformers']}; {args.steps} decode steps")
    print("8/8-bit ZipCache vs DynamicCache, max |Δlogit| / max |logit|:", checks)
    print(f"{'model':<14}{'ctx':>7} {'cache':<19}{'prefill ms':>11}{'median ms':>10}{'requant ms':>11}"
          f"{'KV MiB':>9}{'compr':>7}{'slower':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<14}{r.get('context', ''):>7} {r.get('cache', ''):<19} ERROR {r['error'][:80]}")
            continue
        rq = f"{r['requant_step_ms']:.1f}" if r["requant_step_ms"] is not None else "-"
        print(f"{r['model']:<14}{r['context']:>7} {r['cache']:<19}{r['prefill_ms']:>11.1f}"
              f"{r['decode_ms_median']:>10.2f}"
              f"{rq:>11}{r['kv_bytes'] / 2**20:>9.1f}{r.get('compression', 1.0):>6.2f}×"
              f"{r.get('decode_slowdown', 1.0):>7.2f}×")


def plot(rows, path: Path, meta: dict) -> None:
    plt = pyplot()
    ok = [r for r in rows if "error" not in r and "context" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in sorted({r["model"] for r in ok}):
        kinds = sorted({r["cache"] for r in ok} - {"DynamicCache"})
        for kind, style in (("DynamicCache", "--"), *((k, "-") for k in kinds)):
            pts = sorted((r["context"], r) for r in ok if r["model"] == model and r["cache"] == kind)
            if pts:
                xs = [c for c, _ in pts]
                axes[0].plot(xs, [r["decode_ms_median"] for _, r in pts], style, marker="o", label=f"{model} {kind}")
                axes[1].plot(xs, [r["kv_bytes"] / 2**20 for _, r in pts], style, marker="o", label=f"{model} {kind}")
    for ax, label in zip(axes, ("decode step, median (ms)", "KV cache (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"ZipCache vs DynamicCache, {meta['gpu']}, bf16, batch {meta['batch']}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

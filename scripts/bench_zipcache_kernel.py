"""ZipCache decode attention, one step of one layer: bf16 SDPA vs dequantise + SDPA vs the fused kernel.

    python scripts/bench_zipcache_kernel.py --out /tmp/zipcache_kernel        # H200, a few minutes
    python scripts/bench_zipcache_kernel.py --out /tmp/zk --contexts 32768 --tiles 16x256,16x1024,32x1024,64x4096
    python scripts/bench_zipcache_kernel.py --out /tmp/zk --device cpu --contexts 256,512 --heads 4 --kv-heads 2 \\
        --head-dim 64 --batches 1                                               # smoke test (reference path)

Per shape (``--batches`` × 32 query / 8 KV heads × head dim 128 by default), context and ZipCache setting (the
paper's and ``PAPER_SETTING``) it builds a realistic layer state: random bf16 keys/values of ``context``
tokens (a few outlier key channels), the first ``sink_tokens`` kept full precision, the rest quantised as one
prefill block (random salient tokens at ``salient_ratio`` where they get more bits, as the cache does), plus a
``--recent``-token full-precision buffer. Then it times one decode attention:

* ``sdpa``: the DynamicCache baseline, SDPA over the unquantised bf16 KV; the fastest of ``enable_gqa=True``, the
  GQA group packed into the query rows (transformers' decode path without enable_gqa) and KV repeated beforehand
  (not timed): the winner is recorded per row;
* ``torch``: today's ZipCache path: dequantise the block (as stored), concatenate, transformers' SDPA forward;
* ``fused``: ``patchattn.kernels.zipcache.quantized_decode_attention`` (packed codes read in place).

Times are ``triton.testing.do_bench`` medians (CPU: wall-clock medians of the reference path). ``bytes`` is what a
method must read at least: the bf16 KV; the packed block (+ the bf16 copy dequantise writes and SDPA reads back, a
lower bound for ``torch``); the packed block for ``fused``; all plus the full-precision tokens. Errors are
max |out − float32 attention over the unquantised KV| (quantisation error included) and, for ``fused``, max |out −
float32 attention over the dequantised block| (the kernel's own error). On CUDA, ``fused_kernels_us``: GPU µs per
call of each kernel of the fused path (the segments, the merge; torch profiler). Writes ``zipcache_kernel.json`` and
``zipcache_kernel.png`` into ``--out``; the table is printed last.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import environment, kernel_times, pyplot, save_figure, write_json
from tqdm.auto import tqdm
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from patchattn.kernels.zipcache import quantized_decode_attention, quantized_decode_attention_reference
from patchattn.variants.zipcache import PAPER_SETTING, QuantizedBlock, ZipCacheParams

SETTINGS = {"paper": PAPER_SETTING, "default": {}}
METHODS = ("sdpa", "torch", "fused")


def bench_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def graph_ms(fn) -> float:
    """``fn``'s GPU time without the host's launch overhead: captured once in a CUDA graph, the replay timed."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_state(b, hk, d, context, recent, p: ZipCacheParams, device, dtype, gen):
    """``(keys, values)`` of every token (the baseline's cache), the block, the full-precision part."""
    outliers = 1 + 4 * (torch.arange(d, device=device) % 16 == 0)  # a few large key channels, as in real models
    keys = (torch.randn(b, hk, context + recent, d, device=device, generator=gen) * outliers).to(dtype)
    values = torch.randn(b, hk, context + recent, d, device=device, generator=gen).to(dtype)
    sinks, n = p.sink_tokens, context - p.sink_tokens
    scores = torch.rand(b, hk, n, device=device, generator=gen)  # random saliency, stored as the cache stores it
    block = QuantizedBlock.from_scores(keys[:, :, sinks:context], values[:, :, sinks:context], scores, p,
                                       torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    fp_keys = torch.cat([keys[:, :, :sinks], keys[:, :, context:]], dim=2)
    fp_values = torch.cat([values[:, :, :sinks], values[:, :, context:]], dim=2)
    return keys, values, block, fp_keys, fp_values


def float_attention(query, keys, values, scaling):
    b, h, _, d = query.shape
    hk = keys.shape[1]
    scores = query.float().reshape(b, hk, h // hk, d) @ keys.float().transpose(-1, -2) * scaling
    return (torch.softmax(scores, -1) @ values.float()).reshape(b, 1, h, d)


def sdpa_candidates(query, keys, values, scaling):
    """The baseline's ways of running GQA decode in SDPA, each returning ``[b, 1, h, d]``."""
    b, h, _, d = query.shape
    hk = keys.shape[1]
    g = h // hk
    repeated = (keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1))
    return {
        "enable_gqa": lambda: F.scaled_dot_product_attention(query, keys, values, scale=scaling,
                                                             enable_gqa=True).transpose(1, 2),
        "packed_gqa": lambda: F.scaled_dot_product_attention(query.view(b, hk, g, d), keys, values,
                                                             scale=scaling).reshape(b, 1, h, d),
        "repeated_kv": lambda: F.scaled_dot_product_attention(query, *repeated, scale=scaling).transpose(1, 2),
    }


def run_case(b, h, hk, d, context, recent, setting, device, dtype, seed, tiles=()) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    p = ZipCacheParams(**SETTINGS[setting])
    keys, values, block, fp_keys, fp_values = layer_state(b, hk, d, context, recent, p, device, dtype, gen)
    query = torch.randn(b, h, 1, d, device=device, generator=gen).to(dtype)
    scaling = d**-0.5
    module = types.SimpleNamespace(num_key_value_groups=h // hk, is_causal=True)
    sinks = p.sink_tokens

    def torch_path():  # ZipCacheLayer.update + exact_attention as before the kernel
        k, v = block.dequantize(dtype, in_order=False)
        k = torch.cat([fp_keys[:, :, :sinks], k, fp_keys[:, :, sinks:]], dim=2)
        v = torch.cat([fp_values[:, :, :sinks], v, fp_values[:, :, sinks:]], dim=2)
        return sdpa_attention_forward(module, query, k, v, None, scaling=scaling)[0]

    def fused():
        return quantized_decode_attention(query, [block], fp_keys, fp_values, scaling=scaling)

    reference = float_attention(query, keys, values, scaling)
    row = {"batch": b, "heads": h, "kv_heads": hk, "head_dim": d, "context": context, "setting": setting}
    candidates = sdpa_candidates(query, keys, values, scaling)
    sdpa_ms = {name: bench_ms(fn, device) for name, fn in candidates.items()}
    mode = min(sdpa_ms, key=sdpa_ms.get)
    row.update(sdpa_mode=mode, sdpa_ms=sdpa_ms[mode], sdpa_modes_ms=sdpa_ms,
               sdpa_error=(candidates[mode]().float() - reference).abs().max().item())
    del candidates  # the repeated KV
    packed, fp = nbytes(t for t in block.tensors() if t is not block.bitmap), nbytes((fp_keys, fp_values))
    full = nbytes((keys[:, :, sinks:context], values[:, :, sinks:context]))
    row.update(sdpa_bytes=nbytes((keys, values)), torch_bytes=packed + 2 * full + fp, fused_bytes=packed + fp)
    for name, fn in (("torch", torch_path), ("fused", fused)):
        row[f"{name}_ms"] = bench_ms(fn, device)
        row[f"{name}_error"] = (fn().float() - reference).abs().max().item()
        row[f"{name}_speedup"] = row["sdpa_ms"] / row[f"{name}_ms"]
    if device == "cuda":  # GPU time alone (CUDA graphs): what a captured decode step pays
        row["sdpa_graph_ms"] = graph_ms(sdpa_candidates(query, keys, values, scaling)[mode])
        row["fused_graph_ms"] = graph_ms(fused)
        row["fused_graph_speedup"] = row["sdpa_graph_ms"] / row["fused_graph_ms"]
        row["fused_graph_gbs"] = row["fused_bytes"] / row["fused_graph_ms"] / 1e6
        row["fused_kernels_us"] = {name: round(us, 2) for name, us, _ in kernel_times(fused)}
    time_gpu = graph_ms if device == "cuda" else functools.partial(bench_ms, device=device)
    row["fused_tiles_ms"] = {  # the same kernel at other tile / split / warp / stage counts (--tiles), for tuning
        "x".join(map(str, tile)): time_gpu(functools.partial(
            quantized_decode_attention, query, [block], fp_keys, fp_values, scaling=scaling,
            **{name: x or None for name, x in zip(("block_n", "split_len", "num_warps", "num_stages"), tile)}))
        for tile in tiles}
    del keys, values
    expected = quantized_decode_attention_reference(query, [block], fp_keys, fp_values, scaling=scaling)
    row["fused_kernel_error"] = (fused().float() - expected.float()).abs().max().item()
    return row



def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--recent", type=int, default=50, help="full-precision recent tokens beside the block")
    p.add_argument("--settings", default="paper,default", help=f"of: {', '.join(SETTINGS)}")
    p.add_argument("--tiles", default="", help="also time the fused kernel (GPU time: CUDA graphs) at these "
                                               "BLOCK_NxSPLIT_LEN[xWARPS[xSTAGES]], e.g. 16x512,32x2048,64x0x8x2 "
                                               "(split a multiple of the block; 0 = the default)")
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test (the reference path, no kernel)")
    args = p.parse_args(argv)
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",") if t]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --device cpu for a smoke test)")
    dtype = torch.bfloat16
    argv = sys.argv[1:] if argv is None else argv
    meta = {**environment(args.device == "cuda", date="seconds", argv=["scripts/bench_zipcache_kernel.py", *argv]),
            "dtype": "bf16", "recent": args.recent,
            "settings": {name: SETTINGS[name] for name in args.settings.split(",")}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [(int(b), int(c), s) for b in args.batches.split(",") for c in args.contexts.split(",")
             for s in args.settings.split(",")]
    rows = []
    for i, (b, context, setting) in enumerate(tqdm(cases, desc="zipcache decode", unit="case")):
        try:
            rows.append(run_case(b, args.heads, args.kv_heads, args.head_dim, context, args.recent, setting,
                                 args.device, dtype, seed=i, tiles=tiles))
        except torch.cuda.OutOfMemoryError as exc:  # record it and go on with the smaller cases
            rows.append({"batch": b, "context": context, "setting": setting, "error": repr(exc)[:200]})
        if args.device == "cuda":
            torch.cuda.empty_cache()
    write_json(out_dir / "zipcache_kernel.json", {**meta, "rows": rows}, indent=2)
    plot(rows, out_dir / "zipcache_kernel.png", meta, args)

    print(f"\n{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, bf16, h={args.heads} hk={args.kv_heads} "
          f"d={args.head_dim}; ms = median of one decode attention; × = speed-up vs sdpa")
    print(f"{'b':>2}{'ctx':>8} {'setting':<12}{'sdpa ms':>9} {'(mode)':<12}{'torch ms':>9}{'×':>6}{'fused ms':>9}"
          f"{'×':>6}{'MiB sdpa/fused':>16}{'err torch':>10}{'err fused':>10}{'kernel err':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:>2}{r['context']:>8} {r['setting']:<12} ERROR {r['error'][:80]}")
            continue
        print(f"{r['batch']:>2}{r['context']:>8} {r['setting']:<12}{r['sdpa_ms']:>9.3f} {r['sdpa_mode']:<12}"
              f"{r['torch_ms']:>9.3f}{r['torch_speedup']:>6.2f}{r['fused_ms']:>9.3f}{r['fused_speedup']:>6.2f}"
              f"{r['sdpa_bytes'] / 2**20:>8.1f}/{r['fused_bytes'] / 2**20:<7.1f}{r['torch_error']:>10.2e}"
              f"{r['fused_error']:>10.2e}{r['fused_kernel_error']:>11.2e}")
        if "fused_graph_ms" in r:
            print(f"    CUDA graphs: sdpa {r['sdpa_graph_ms']:.4f} ms, fused {r['fused_graph_ms']:.4f} ms "
                  f"({r['fused_graph_speedup']:.2f}x), {r['fused_graph_gbs']:.0f} GB/s of packed + full-precision "
                  f"bytes (H200 peak 4800)")
        if r["fused_tiles_ms"]:
            print("    fused at other tiles (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in r["fused_tiles_ms"].items()))
        if r.get("fused_kernels_us"):
            print("    fused per kernel (us): " + ", ".join(f"{k} {v:.1f}" for k, v in r["fused_kernels_us"].items()))
    return rows


def plot(rows, path: Path, meta: dict, args) -> None:
    """One panel per batch size and head count; sdpa and fused at their GPU time (CUDA graphs) where measured."""
    plt = pyplot()
    ok = [r for r in rows if "error" not in r]
    panels = sorted({(r["batch"], r.get("heads", args.heads)) for r in ok})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False)
    for ax, (b, h) in zip(axes[0], panels):
        mine = [r for r in ok if r["batch"] == b and r.get("heads", args.heads) == h]
        settings = [s for s in meta["settings"] if any(r["setting"] == s for r in mine)]
        for setting, marker in zip(settings, "os^"):
            pts = sorted((r["context"], r) for r in mine if r["setting"] == setting)
            xs = [c for c, _ in pts]
            for method, style in zip(METHODS, (":", "--", "-")):
                if method == "sdpa" and setting != settings[0]:
                    continue  # one baseline line: it does not depend on the setting
                label = "sdpa (bf16 KV)" if method == "sdpa" else f"{method}, {setting}"
                ax.plot(xs, [r.get(f"{method}_graph_ms", r[f"{method}_ms"]) for _, r in pts], style, marker=marker,
                        label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("one decode attention (ms; GPU time where graphed)")
        ax.set_title(f"b={b}, h={h}, hk={args.kv_heads}, d={args.head_dim}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"ZipCache decode attention, {meta['gpu']}, bf16", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""End-to-end prefill time of a Llama-3-8B-shaped decoder stack, patched with HyperAttention vs unpatched.

A transformers ``LlamaModel`` (the base model: no lm_head) from a ``LlamaConfig`` with Llama-3-8B's shapes (hidden
4096, MLP 14336, 32 query heads / 8 KV heads, head_dim 128, vocab 128256, rope theta 500000) but only
``--layers`` decoder layers and random weights, in bf16 on one GPU; one batch-1 prefill of ``n`` random tokens with
``use_cache=False`` under ``torch.inference_mode``. Variants:
  * ``sdpa``: unpatched (transformers' SDPA attention, torch's default backend choice);
  * ``sdpa-cudnn``: unpatched, SDPA restricted to the cuDNN backend (skipped where cuDNN refuses the call);
  * ``hyper``: ``patchattn.patch_model(model, "hyper", preset="paper")`` (published settings; the Triton kernels);
  * ``hyper+levers``: the same with 16 sinks + 112-key window + 128 samples.
(``preset="paper"`` pins the published estimator: the defaults add an exact tail and sinks, see the README.)
Times are medians of ``--reps`` CUDA-event timed prefills after one warm-up; ``rel_err`` is the relative error of
the last hidden state against ``sdpa``; ``hyper_calls`` counts the layers that really ran HyperAttention.
Writes ``prefill_e2e.json`` (rows + versions, GPU, date, command) and prints a table last.

  python scripts/bench_prefill_e2e.py --lens 32768 131072 --layers 4
  python scripts/bench_prefill_e2e.py --tiny          # CPU smoke test of the script itself
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
from _bench import Timer, environment, write_json
from transformers import LlamaConfig, LlamaModel

import patchattn
import patchattn.variants.hyper as hyper_variant

LEVERS = {"sample_size": 128, "sink_tokens": 16, "local_window": 112}


def llama3_8b_config(layers: int, tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=4096,
                           attn_implementation="sdpa")
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       attn_implementation="sdpa")


class CallCounter:
    """Counts the variant's calls into HyperAttention (the layers that did not fall back to exact attention)."""

    def __init__(self):
        self.calls = 0
        self.padded = 0
        self._orig = hyper_variant.hyper_attention

    def __enter__(self):
        def wrapped(*args, **kwargs):
            self.calls += 1
            self.padded += kwargs.get("key_valid") is not None
            return self._orig(*args, **kwargs)

        hyper_variant.hyper_attention = wrapped
        return self

    def __exit__(self, *exc):
        hyper_variant.hyper_attention = self._orig


def timed_prefill(model, ids, reps, device):
    def once():
        return model(input_ids=ids, use_cache=False).last_hidden_state

    out = once()  # warm-up (Triton compiles, cuDNN plans)
    times, tm = [], Timer(device == "cuda")
    for _ in range(reps):
        tm.start()
        out = once()
        times.append(tm.stop_ms())
    return out, times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["sdpa", "sdpa-cudnn", "hyper", "hyper+levers"])
    ap.add_argument("--out", default="benchmarks/results/prefill_e2e.json")
    ap.add_argument("--tiny", action="store_true", help="small model on CPU (fp32): checks the script, not speed")
    args = ap.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens = [256] if args.tiny else args.lens
    extra = {"min_seq_len": 64} if args.tiny else {}
    meta = environment(device == "cuda", packages=("torch", "triton", "transformers", "patchattn"))
    config = llama3_8b_config(args.layers, args.tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(config)
    model.to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"LlamaModel {args.layers} layers, {params / 1e9:.2f} B params, {dtype}, {device}", flush=True)
    rows = []
    for n in lens:
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(0, config.vocab_size, (1, n), generator=g).to(device)
        ref = None
        for variant in args.variants:
            ctx = contextlib.nullcontext()
            if variant == "sdpa-cudnn":
                if device != "cuda":
                    continue
                from torch.nn.attention import SDPBackend, sdpa_kernel
                ctx = sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
            if variant.startswith("hyper"):
                levers = LEVERS if variant == "hyper+levers" else {}
                patchattn.patch_model(model, "hyper", preset="paper", **levers, **extra)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                with torch.inference_mode(), ctx, CallCounter() as counter:
                    out, times = timed_prefill(model, ids, args.reps, device)
            except RuntimeError as e:
                print(f"{variant} n={n} failed: {e!r}"[:300], flush=True)
                out, times = None, None
            finally:
                if variant.startswith("hyper"):
                    patchattn.unpatch_model(model)
            if out is None:
                continue
            if ref is None and variant == "sdpa":
                ref = out.float()
            err = ((out.float() - ref).norm() / ref.norm()).item() if ref is not None else None
            ms = statistics.median(times)
            row = dict(variant=variant, n=n, layers=args.layers, ms=round(ms, 2), ms_all=[round(t, 2) for t in times],
                       tokens_per_s=round(n / ms * 1e3), rel_err=None if err is None else float(f"{err:.3g}"),
                       hyper_calls=counter.calls // (args.reps + 1), key_padding_calls=counter.padded,
                       peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
                       settings=({**LEVERS, **extra} if variant == "hyper+levers" else extra or None)
                       if variant.startswith("hyper") else None, **meta)
            rows.append(row)
            print(f"  n={n} {variant}: {ms:.1f} ms (runs {row['ms_all']}), hyper layers {row['hyper_calls']}, "
                  f"rel_err {row['rel_err']}, peak {row['peak_gb']} GB", flush=True)
            del out
        del ref
        if args.out and not args.tiny:
            write_json(args.out, {"meta": meta, "model": {"shape": "Llama-3-8B", "layers": args.layers,
                                                          "params": params, "dtype": str(dtype), "batch": 1,
                                                          "use_cache": False}, "rows": rows})
    print(f"\n{meta['gpu']} | torch {meta['torch']} | triton {meta['triton']} | transformers "
          f"{meta['transformers']} | {meta['date']} | {meta['command']}")
    print(f"Llama-3-8B-shaped LlamaModel, {args.layers} layers, random weights, {dtype}, b=1, use_cache=False")
    print(f"{'n':>7} {'variant':>13} | {'ms':>9} {'tok/s':>9} {'x sdpa':>7} | {'rel_err':>8} {'hyper layers':>12} "
          f"{'peak GB':>8}")
    base = {r["n"]: r["ms"] for r in rows if r["variant"] == "sdpa"}
    for r in rows:
        sp = f"{base[r['n']] / r['ms']:7.2f}" if r["n"] in base else f"{'-':>7}"
        print(f"{r['n']:>7} {r['variant']:>13} | {r['ms']:9.1f} {r['tokens_per_s']:9d} {sp} | "
              f"{r['rel_err'] if r['rel_err'] is not None else '-':>8} {r['hyper_calls']:>12} {r['peak_gb']!s:>8}")


if __name__ == "__main__":
    main()

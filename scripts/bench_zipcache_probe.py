"""ZipCache's prefill saliency probes, one layer: the PyTorch path of ``probe_scores`` vs the fused probe kernel,
beside the main causal SDPA call they ride along with.

    python scripts/bench_zipcache_probe.py --out /tmp/zipcache_probe                # CUDA: Qwen2.5-0.5B at 8k-32k
    python scripts/bench_zipcache_probe.py --out /tmp/zp --tiles 32x64x4,64x64x4,64x128x8,128x64x8   # tuning
    python scripts/bench_zipcache_probe.py --out /tmp/zp --device cpu --contexts 8192 --batch 1   # PyTorch only

Per context: random ``--dtype`` query/key/value ``[batch, heads | kv heads, context, head dim]``, the probes
``pick_probes`` would draw (the last 5 % of the queries + a random 5 %), no mask (a prefill without padding).
Times (``triton.testing.do_bench`` medians on CUDA, wall-clock medians on CPU) of ``sdpa`` (causal, GQA), ``torch``
(``probe_scores``' chunked PyTorch path) and ``fused`` (``patchattn.kernels.zipcache.probe_column_scores``; CUDA
only, and at each ``--tiles`` BLOCK_MxBLOCK_NxWARPS), and the fused sums' largest error relative to the largest
PyTorch sum. Writes ``zipcache_probe.json`` into ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import bench_ms as cuda_bench_ms
from _bench import commit, environment, write_json

from patchattn.kernels.zipcache import probe_column_scores
from patchattn.variants import zipcache


def bench_ms(fn, device: str) -> float:
    """Median ms: the harness's do_bench on CUDA, wall clock of 3 calls after a warm-up on the CPU."""
    if device == "cuda":
        return cuda_bench_ms(fn, rep=50)
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def probes(q_len: int, ratio: float, seed: int) -> torch.Tensor:
    """As ``ZipCacheLayer.pick_probes``: the last ``ratio`` of the queries + a random ``ratio`` of the others."""
    recent = max(1, round(ratio * q_len))
    earlier = q_len - recent
    randoms = sorted(random.Random(seed).sample(range(earlier), min(earlier, round(ratio * q_len))))
    return torch.tensor(randoms + list(range(earlier, q_len)))


def torch_path(*args, **kwargs):
    """``probe_scores`` with the kernel turned away (its PyTorch path, also on CUDA)."""
    usable = zipcache.kernel_usable
    zipcache.kernel_usable = lambda x: False
    try:
        return zipcache.probe_scores(*args, **kwargs)
    finally:
        zipcache.kernel_usable = usable


def run_case(b, h, hk, d, context, dtype, device, tiles, seed) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, h, context, d, device=device, generator=gen).to(dtype)
    k, v = (torch.randn(b, hk, context, d, device=device, generator=gen).to(dtype) for _ in range(2))
    rows = probes(context, 0.05, seed).to(device)
    scaling = d**-0.5
    row = {"batch": b, "heads": h, "kv_heads": hk, "head_dim": d, "context": context, "probes": rows.numel()}
    row["sdpa_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                                                     enable_gqa=True), device)
    row["torch_ms"] = bench_ms(lambda: torch_path(q, k, rows, None, scaling=scaling), device)
    if device == "cuda":
        ref = torch_path(q, k, rows, None, scaling=scaling)[0]
        row["fused_ms"] = bench_ms(lambda: probe_column_scores(q, k, rows, scaling=scaling), device)
        got = probe_column_scores(q, k, rows, scaling=scaling)[0]
        row["fused_rel_error"] = ((got - ref).abs().max() / ref.abs().max()).item()
        row["fused_tiles_ms"] = {
            f"{m}x{n}x{w}": bench_ms(lambda: probe_column_scores(q, k, rows, scaling=scaling, block_m=m, block_n=n,
                                                                 num_warps=w), device) for m, n, w in tiles}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--contexts", default="8192,16384,32768")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tiles", default="", help="also time the kernel at these BLOCK_MxBLOCK_NxWARPS, e.g. 64x64x4")
    p.add_argument("--device", default="cuda", help="cpu: the PyTorch path alone (no kernel timing)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --device cpu for the PyTorch path alone)")
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",") if t]
    dtype = getattr(torch, args.dtype)
    meta = {**environment(args.device == "cuda", key="device", packages=("torch", "triton"), date="utc"),
            "commit": commit(short=True), "dtype": args.dtype}
    rows = [run_case(args.batch, args.heads, args.kv_heads, args.head_dim, int(c), dtype, args.device, tiles, i)
            for i, c in enumerate(args.contexts.split(","))]
    write_json(Path(args.out) / "zipcache_probe.json", {**meta, "rows": rows})
    print(f"\n{meta['device']}, torch {meta['torch']}, {args.dtype}, b={args.batch} h={args.heads} "
          f"hk={args.kv_heads} d={args.head_dim}; ms = median of one layer's call")
    print(f"{'context':>8}{'probes':>8}{'sdpa ms':>10}{'torch ms':>10}{'fused ms':>10}{'fused err':>11}  tiles")
    for r in rows:
        fused = f"{r['fused_ms']:>10.2f}{r['fused_rel_error']:>11.1e}" if "fused_ms" in r else f"{'-':>10}{'-':>11}"
        tile_ms = " ".join(f"{t}:{ms:.2f}" for t, ms in r.get("fused_tiles_ms", {}).items())
        print(f"{r['context']:>8}{r['probes']:>8}{r['sdpa_ms']:>10.2f}{r['torch_ms']:>10.2f}{fused}  {tile_ms}")


if __name__ == "__main__":
    main()

"""MoH decode: does skipping the dropped heads pay? One decode step of attention over a KV cache, H200, bf16.

    python scripts/bench_moh_decode.py --out DIR

Per (heads layout, context, active fraction): dense SDPA over every head (what the PyTorch path runs before
multiplying dropped heads by 0) vs patchattn's kernel reading only the active heads, and the same kernel over all
heads (to separate the kernel's own speed from the skipping). Times are CUDA-event medians over repeated steps.
Writes moh_decode.json and moh_decode.png to --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import Timer, environment, pyplot, save_figure, write_json


def median_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times, tm = [], Timer()
    for _ in range(reps):
        tm.start()
        fn()
        times.append(tm.stop_ms())
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    from tqdm.auto import tqdm

    from patchattn.kernels.moh.naive import active_head_decode_reference
    from patchattn.kernels.moh.triton_decode import active_head_decode

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev, dtype, d, b = "cuda", torch.bfloat16, 128, args.batch
    layouts = {"MHA 32/32 (Llama-2-7B)": (32, 32), "GQA 32/8 (Llama-3-8B)": (32, 8)}
    contexts = [4096, 16384, 65536, 131072]
    fractions = [0.75, 0.5]
    env = {**environment(date=None, with_command=False), "dtype": "bf16", "head_dim": d, "batch": b}
    rows = []
    # correctness first, at a small size
    q = torch.randn(2, 8, 1, d, device=dev, dtype=dtype)
    k, v = torch.randn(2, 2, 1000, d, device=dev, dtype=dtype), torch.randn(2, 2, 1000, d, device=dev, dtype=dtype)
    table = torch.tensor([[0, 3, 5], [1, 2, 7]], device=dev)
    err = (active_head_decode(q, k, v, table, d ** -0.5).float()
           - active_head_decode_reference(q, k, v, table, d ** -0.5).float()).abs().max().item()
    env["max_abs_error_vs_reference"] = err
    cases = [(name, n, f) for name in layouts for n in contexts for f in fractions]
    for name, n, frac in tqdm(cases, desc="moh decode"):
        h, hk = layouts[name]
        try:
            q = torch.randn(b, h, 1, d, device=dev, dtype=dtype)
            k = torch.randn(b, hk, n, d, device=dev, dtype=dtype)
            v = torch.randn(b, hk, n, d, device=dev, dtype=dtype)
            active = int(h * frac)
            g = torch.Generator(device="cpu").manual_seed(0)
            # shared heads 0..h/2 always on, the rest a random top-k per sequence (the MoH-LLaMA3 layout)
            table = torch.stack([torch.cat([torch.arange(h // 2), (h // 2 + torch.randperm(h - h // 2, generator=g))
                                            [: active - h // 2]]).sort().values for _ in range(b)]).to(dev)
            full = torch.arange(h, device=dev).expand(b, h).contiguous()
            dense = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hk != h))
            skip = median_ms(lambda: active_head_decode(q, k, v, table, d ** -0.5))
            every = median_ms(lambda: active_head_decode(q, k, v, full, d ** -0.5))
            kv_heads_read = len({int(x) // (h // hk) for x in table[0].tolist()})
            rows.append({"layout": name, "context": n, "active_fraction": frac, "dense_sdpa_ms": dense,
                         "kernel_active_ms": skip, "kernel_all_heads_ms": every, "speedup_vs_dense": dense / skip,
                         "kv_heads_read": kv_heads_read, "kv_heads": hk})
        except Exception as exc:  # noqa: BLE001 -- record and go on (e.g. OOM)
            rows.append({"layout": name, "context": n, "active_fraction": frac, "error": repr(exc)[:300]})
        torch.cuda.empty_cache()
    write_json(out_dir / "moh_decode.json", {"environment": env, "rows": rows})

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in layouts:
        for frac in fractions:
            pts = [(r["context"], r["speedup_vs_dense"]) for r in rows
                   if r["layout"] == name and r["active_fraction"] == frac and "error" not in r]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{name}, {int(frac * 100)}% heads active")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="context (tokens)", ylabel="speed-up vs dense SDPA decode",
           title=f"MoH decode step, {env['gpu']}, bf16, batch {b}")
    ax.legend(fontsize=8)
    save_figure(fig, out_dir / "moh_decode.png")

    print(env)
    print(f"{'layout':<24} {'ctx':>7} {'act':>5} {'dense ms':>9} {'active ms':>9} {'all ms':>8} {'speedup':>8} kv read")
    for r in rows:
        if "error" in r:
            print(f"{r['layout']:<24} {r['context']:>7} {r['active_fraction']:>5} ERROR {r['error'][:60]}")
            continue
        print(f"{r['layout']:<24} {r['context']:>7} {r['active_fraction']:>5} {r['dense_sdpa_ms']:>9.4f} "
              f"{r['kernel_active_ms']:>9.4f} {r['kernel_all_heads_ms']:>8.4f} {r['speedup_vs_dense']:>8.2f} "
              f"{r['kv_heads_read']}/{r['kv_heads']}")


if __name__ == "__main__":
    main()

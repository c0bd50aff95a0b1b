#!/usr/bin/env python
"""HyperAttention's estimator error against exact causal attention on captured real Q/K/V, per layer and head.

Input: a safetensors file from ``scripts/capture_real_qkv.py`` (``q.<layer>``, ``k.<layer>``, ``v.<layer>``,
``[1, heads, n, d]``). For each layer and each setting, the PyTorch reference (``kernels/hyper/naive.py``; the
Triton kernels match it within bf16 rounding, ``results/hyper_attention_check.json``) and exact attention (SDPA)
run in fp32 on the same tensors; the relative error ``||o - o_exact|| / ||o_exact||`` is reported over all rows
and per query head. Random Gaussian inputs make exact attention near-uniform, so only real tensors say how good
the estimate is. Runs on any device (CPU: minutes per layer at 32k). Writes ``<out>.json`` and ``<out>.png``.

  python scripts/capture_real_qkv.py --model qwen2.5-coder-0.5b-instruct --layers 3 12 23 --tokens 32768 \\
      --out .realqkv/qwen25_05b_32k.safetensors
  cd scripts && python hyper_error_real.py ../.realqkv/qwen25_05b_32k.safetensors \\
      --out ../benchmarks/results/hyper_error_real_qwen25_32k
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from _bench import environment, pyplot, save_figure, write_json
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from patchattn.kernels.hyper import HyperSettings, naive  # noqa: E402

SETTINGS = {
    "published": HyperSettings(),  # the paper: block 256, 256 samples, min_seq_len 4096
    "default": HyperSettings(sample_size=240, sink_tokens=16),  # the `hyper` variant's kernel settings
    "levers": HyperSettings(sample_size=128, sink_tokens=16, local_window=112),
}


def rel_rows(out, ref):
    """Relative error over all rows, and per query head."""
    diff, base = (out - ref).double(), ref.double()
    per_head = (diff.norm(dim=(-1, -2)) / base.norm(dim=(-1, -2)))[0]
    return (diff.norm() / base.norm()).item(), [round(x, 5) for x in per_head.tolist()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("qkv", help="safetensors file of captured Q/K/V")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .png are written)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from safetensors.torch import load_file

    tensors = load_file(args.qkv)
    layers = sorted(int(name.split(".")[1]) for name in tensors if name.startswith("q."))
    rows = []
    t0 = time.perf_counter()
    for layer in tqdm(layers, desc="layers"):
        q, k, v = (tensors[f"{x}.{layer}"].to(args.device, torch.float32) for x in "qkv")
        d = q.shape[-1]
        with torch.no_grad():
            exact = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d**-0.5, enable_gqa=True)
            for name in args.settings:
                t = time.perf_counter()
                out, _ = naive.hyper_attention(q, k, v, d**-0.5, SETTINGS[name])
                err, per_head = rel_rows(out, exact)
                rows.append(dict(layer=layer, setting=name, n=q.shape[2], h=q.shape[1], hk=k.shape[1], d=d,
                                 rel_err=round(err, 5), per_head=per_head, seconds=round(time.perf_counter() - t, 1)))
                tqdm.write(f"layer {layer} {name}: rel err {err:.4f} (heads {min(per_head):.3f}-{max(per_head):.3f})")
    meta = dict(**environment(args.device == "cuda", packages=("torch",)), source=os.path.basename(args.qkv),
                settings={name: SETTINGS[name].__dict__ for name in args.settings},
                wall_s=round(time.perf_counter() - t0, 1), device=args.device)
    write_json(args.out + ".json", {"meta": meta, "rows": rows})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(args.settings)
    for i, name in enumerate(args.settings):
        errs = [r["rel_err"] for r in rows if r["setting"] == name]
        ax.bar([j + i * width for j in range(len(layers))], errs, width, label=name)
    ax.set_xticks([j + width * (len(args.settings) - 1) / 2 for j in range(len(layers))], [f"layer {x}" for x in
                                                                                           layers])
    ax.set_ylabel("relative error vs exact")
    ax.set_title(f"HyperAttention estimate on real Q/K/V (n={rows[0]['n']})")
    ax.legend()
    save_figure(fig, args.out + ".png")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Capture real attention inputs (post-RoPE Q, K, V) of a few SmolLM2-135M layers for GPU kernel checks.

One exact CPU forward over the first ``--tokens`` tokens of the shipped Shakespeare text
(``patchattn.data.read_text()``), captured with ``patchattn.planner.capture``; the chosen layers' ``[1, heads, n, d]``
tensors are saved in bf16 as ``q.<layer>``, ``k.<layer>``, ``v.<layer>`` (about 15.7 MB per layer at 8192 tokens).
The output folder is meant to stay out of git (``.realqkv/`` is in ``.git/info/exclude``); carry it to the GPU and
run ``scripts/check_hyper_gpu.py --real <file>``.

  python scripts/capture_real_qkv.py --layers 3 18 27 --tokens 8192 --out .realqkv/smollm2_135m.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file

from patchattn.data import read_text
from patchattn.planner import capture
from patchattn.realweights import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 18, 27])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default=".realqkv/smollm2_135m.safetensors")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=torch.float32)
    model.eval()
    ids = tok(read_text(), return_tensors="pt").input_ids[:, : args.tokens]
    store = capture(model, ids)
    tensors = {}
    for layer in args.layers:
        q, k, v, mask, kw = store[layer]
        for name, x in zip("qkv", (q, k, v)):
            tensors[f"{name}.{layer}"] = x.to(torch.bfloat16).contiguous()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {"model": args.model, "tokens": str(ids.shape[1]), "layers": json.dumps(args.layers),
            "text": "patchattn.data.read_text() (shakespeare.txt)", "scaling": str(kw.get("scaling"))}
    save_file(tensors, args.out, metadata=meta)
    print(f"saved {len(tensors)} tensors ({sum(t.numel() * 2 for t in tensors.values()) / 2**20:.1f} MiB) of "
          f"layers {args.layers} at n={ids.shape[1]} to {args.out} in {time.perf_counter() - t0:.0f} s; "
          f"q {tuple(tensors[f'q.{args.layers[0]}'].shape)}, k {tuple(tensors[f'k.{args.layers[0]}'].shape)}, "
          f"scaling {kw.get('scaling')}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""bf16 correctness of the Triton HyperAttention on a GPU, printed as relative errors.

For fresh random inputs (GQA, batch 2 with key padding, n not a power of two, head dims 64/128/256), with the
published settings and with the quality levers (sinks 16 + window 112 + 128 samples; centred keys at d=64):
  * forward output / lse and backward dq, dk, dv vs the PyTorch reference (fp32, autograd) fed the same inputs;
  * output error vs exact causal attention, for the kernels and for the reference (same estimator: the two must
    be within ~10% of each other).
``--real FILE.safetensors``: Q/K/V captured from a real model (``q.<layer>``, ``k.<layer>``, ``v.<layer>``,
``[1, heads, n, d]``; see scripts/capture_real_qkv.py): the same errors per layer, for the official settings and
the levers, so "hyper vs exact" is measured on real attention, not only on random tensors.

  python scripts/check_hyper_gpu.py [--n 12000] [--real .realqkv/smollm2_135m.safetensors] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from _bench import write_json

from patchattn.kernels.hyper import HyperSettings, naive
from patchattn.kernels.hyper.ops import hyper_attention_triton


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def exact(q, k, v, key_valid):
    b, h, n, d = q.shape
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def check(q, k, v, settings, key_valid=None, tag=""):
    b, h, n, d = q.shape
    hk = k.shape[1]
    g = torch.Generator(device=q.device).manual_seed(5)
    dout = torch.randn(q.shape, device=q.device, generator=g).to(q.dtype)
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = hyper_attention_triton(qs, ks, vs, settings=settings, key_valid=key_valid)
    out.backward(dout)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ro, rl = naive.hyper_attention(qr, kr, vr, d**-0.5, settings, key_valid=key_valid)
    ro.backward(dout.float())
    fin = torch.isfinite(rl)
    qe, ke, ve = (x.detach().float().requires_grad_() for x in (q, k, v))
    eo = exact(qe, ke, ve, key_valid)
    eo.backward(dout.float())
    rows = fin.all(0).all(0)  # positions valid in every batch/head (padded query rows see nothing)
    res = dict(tag=tag, n=n, d=d, b=b, h=h, hk=hk, dtype=str(q.dtype), padded=key_valid is not None,
               levers=f"S={settings.sink_tokens},W={settings.local_window},m={settings.sample_size}"
                      f"{',centred' if settings.center_keys else ''}",
               out_vs_ref=rel(out, ro), lse_vs_ref=rel(lse[fin], rl[fin]), dq_vs_ref=rel(qs.grad, qr.grad),
               dk_vs_ref=rel(ks.grad, kr.grad), dv_vs_ref=rel(vs.grad, vr.grad),
               out_vs_exact=rel(out[:, :, rows], eo[:, :, rows]), ref_vs_exact=rel(ro[:, :, rows], eo[:, :, rows]),
               dq_vs_exact=rel(qs.grad, qe.grad), ref_dq_vs_exact=rel(qr.grad, qe.grad),
               dk_vs_exact=rel(ks.grad, ke.grad), dv_vs_exact=rel(vs.grad, ve.grad))
    print("  ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in res.items()), flush=True)
    return res


def real_qkv(path):
    """``{layer: (q, k, v)}`` from a safetensors file of captured attention inputs."""
    from safetensors.torch import load_file

    t = load_file(path, device="cuda")
    layers = sorted(int(name.split(".")[1]) for name in t if name.startswith("q."))
    return {i: tuple(t[f"{x}.{i}"].contiguous() for x in "qkv") for i in layers}


OFFICIAL = HyperSettings()
LEVERS = HyperSettings(sample_size=128, sink_tokens=16, local_window=112)
# the settings of scripts/hyper_quality.py (SmolLM2 at 8k: leaves of 2048 so that there are levels to estimate)
REAL = {"official": HyperSettings(block_size=256, sample_size=256, min_seq_len=2048),
        "levers": HyperSettings(block_size=256, sample_size=128, min_seq_len=2048, sink_tokens=16, local_window=112)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12000)
    ap.add_argument("--real", default=None, help="safetensors file of captured Q/K/V")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    n = args.n
    for d, h, hk in ((128, 8, 2), (64, 4, 4), (256, 4, 1)):
        q, k, v = (torch.randn(2, x, n, d, device="cuda", dtype=torch.bfloat16) for x in (h, hk, hk))
        valid = torch.ones(2, n, dtype=torch.bool, device="cuda")
        valid[1, :333] = False
        results.append(check(q, k, v, OFFICIAL, valid, tag="random"))
        if d <= 128:
            lev = dataclasses.replace(LEVERS, center_keys=d == 64)
            results.append(check(q, k, v, lev, valid, tag="random"))
        del q, k, v
        torch.cuda.empty_cache()
    if args.real:
        for layer, (q, k, v) in real_qkv(args.real).items():
            for name, settings in REAL.items():
                results.append(check(q, k, v, settings, None, tag=f"real-layer{layer}-{name}"))
    if args.json:
        write_json(args.json, results)
    print("\ntag                        levers                 out/ref  dq/ref  dk/ref  dv/ref | out/exact ref/exact "
          "dq/exact")
    for r in results:
        print(f"{r['tag']:<26} {r['levers']:<22} {r['out_vs_ref']:.1e} {r['dq_vs_ref']:.1e} {r['dk_vs_ref']:.1e} "
              f"{r['dv_vs_ref']:.1e} | {r['out_vs_exact']:9.4f} {r['ref_vs_exact']:9.4f} {r['dq_vs_exact']:8.4f}")


if __name__ == "__main__":
    main()

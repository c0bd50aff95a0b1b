#!/usr/bin/env python
"""bf16 correctness of the Triton HyperAttention on a GPU, printed as relative errors.

For fresh random inputs (GQA, batch 2 with key padding, n not a power of two, head dims 64/128/256):
  * forward output / lse and backward dq, dk, dv vs the PyTorch reference (fp32, autograd) fed the same inputs;
  * output error vs exact causal attention, for the kernels and for the reference (same estimator: the two must
    be within ~10% of each other).
Optionally (``--real``) Q/K/V captured from SmolLM2-135M if it is in the local Hugging Face cache.

  python scripts/check_hyper_gpu.py [--n 12000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

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
    ro, rl = naive.hyper_attention_causal(qr.reshape(b, hk, h // hk, n, d), kr, vr, d**-0.5, settings,
                                         key_valid=key_valid)
    ro, rl = ro.reshape(b, h, n, d), rl.reshape(b, h, n)
    ro.backward(dout.float())
    fin = torch.isfinite(rl)
    qe, ke, ve = (x.detach().float().requires_grad_() for x in (q, k, v))
    eo = exact(qe, ke, ve, key_valid)
    eo.backward(dout.float())
    rows = fin.all(0).all(0)  # positions valid in every batch/head (padded query rows see nothing)
    res = dict(tag=tag, n=n, d=d, b=b, h=h, hk=hk, dtype=str(q.dtype), padded=key_valid is not None,
               out_vs_ref=rel(out, ro), lse_vs_ref=rel(lse[fin], rl[fin]), dq_vs_ref=rel(qs.grad, qr.grad),
               dk_vs_ref=rel(ks.grad, kr.grad), dv_vs_ref=rel(vs.grad, vr.grad),
               out_vs_exact=rel(out[:, :, rows], eo[:, :, rows]), ref_vs_exact=rel(ro[:, :, rows], eo[:, :, rows]),
               dq_vs_exact=rel(qs.grad, qe.grad), ref_dq_vs_exact=rel(qr.grad, qe.grad))
    print("  ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in res.items()), flush=True)
    return res


def real_qkv(n):
    """Q/K/V of layer 3 of SmolLM2-135M on a text prompt, from the local HF cache (no downloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "HuggingFaceTB/SmolLM2-135M"
    tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=torch.bfloat16).cuda()
    try:
        from patchattn.data import load_text  # type: ignore
        text = load_text()
    except Exception:  # noqa: BLE001
        text = " ".join(f"token {i} of a long synthetic document about attention." for i in range(n))
    ids = tok(text, return_tensors="pt").input_ids[:, :n].cuda()
    cap = {}
    attn = model.model.layers[3].self_attn

    def hook(mod, args, kwargs):
        cap["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        cap["pos"] = kwargs.get("position_embeddings")
    attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids)
        hs = cap["hidden"]
        b, t, _ = hs.shape
        hd = attn.head_dim
        q = attn.q_proj(hs).view(b, t, -1, hd).transpose(1, 2)
        k = attn.k_proj(hs).view(b, t, -1, hd).transpose(1, 2)
        v = attn.v_proj(hs).view(b, t, -1, hd).transpose(1, 2)
        cos, sin = cap["pos"]
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q.contiguous(), k.contiguous(), v.contiguous()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12000)
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    settings = HyperSettings()
    n = args.n
    for d, h, hk in ((128, 8, 2), (64, 4, 4), (256, 4, 1)):
        q, k, v = (torch.randn(2, x, n, d, device="cuda", dtype=torch.bfloat16) for x in (h, hk, hk))
        valid = torch.ones(2, n, dtype=torch.bool, device="cuda")
        valid[1, :333] = False
        results.append(check(q, k, v, settings, valid, tag="random"))
    if args.real:
        try:
            q, k, v = real_qkv(n)
            results.append(check(q, k, v, settings, None, tag="smollm2-135m-layer3"))
        except Exception as e:  # noqa: BLE001
            print(f"real Q/K/V skipped: {e!r}"[:300])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

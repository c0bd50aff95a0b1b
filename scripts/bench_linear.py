#!/usr/bin/env python
"""Normalised gated linear attention (patchattn.kernels.linear) on one GPU: correctness, prefill, decode.

  1. correctness (bf16 / fp16 / fp32) of the Triton kernels against the float64 PyTorch references (recurrent at
     n=1000, chunked at n=16384), forward and every gradient; decode-step chain == prefill; ours vs fla's
     chunk_simple_gla on the same (unnormalised) problem;
  2. prefill, b=1, h=32 query heads, hk=8 KV heads, bf16, d in {128, 64}, n = 4k .. 131k: ours (normalised, data-
     dependent per-KV-head decays) forward and forward+backward, vs fla's chunk_simple_gla and chunk_gla (K/V
     expanded to 32 heads: no GQA there; fla's Triton autotune limited to <= 8 configs per kernel unless
     ``--fla-autotune full``), vs cuDNN SDPA causal (K/V expanded), plus ours unnormalised at d=128 (fla's exact
     problem);
  3. decode: one token per call, b=1, h=32/hk=8, d=128, context 1k .. 128k: ours (constant fp32 state) vs SDPA over
     a bf16 KV cache of that length (GQA through enable_gqa), eager and CUDA-graph replay; tokens/s for ONE layer.

Cases run in priority order under a wall-clock budget (``--budget``, default 200 s after start-up); what does not
fit is recorded as skipped. Every case catches its own failure (OOM, missing fla, compile error) and records it.
Writes ``linear_attention.json`` (rewritten after every case) and ``linear_attention.png`` into ``--out`` and
prints a short table last.

  pip install --no-deps --no-index .whl/einops-0.8.2-py3-none-any.whl .whl/fla_core-0.5.2-py3-none-any.whl
  python scripts/bench_linear.py --out "$OUT"
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback

if "--smoke" in sys.argv:  # CPU plumbing check: Triton's interpreter, set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from _bench import Timer, environment, pyplot, save_figure, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import patchattn.kernels.linear as L  # installed package ...
    if not os.path.realpath(L.__file__).startswith(os.path.realpath(os.path.join(ROOT, "kernels"))):
        raise ImportError("an installed patchattn that is not this checkout")
except ImportError:  # ... or this checkout's kernels/ (which is patchattn.kernels)
    sys.path.insert(0, ROOT)
    import kernels.linear as L

T0 = time.time()
DEV = "cuda"
H, HK = 32, 8  # prefill / decode heads (the smoke run shrinks them)
RES: dict = {"info": {}, "correctness": [], "prefill": [], "decode": [], "skipped": [], "errors": []}
OUT = "."


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    RES["info"]["elapsed_s"] = round(time.time() - T0, 1)
    write_json(os.path.join(OUT, "linear_attention.json"), RES, default=str)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def free():
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def record_error(where, e):
    tb = traceback.format_exc()
    RES["errors"].append({"case": where, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": tb[-6000:]})
    log(f"FAILED {where}: {type(e).__name__}: {str(e)[:300]}")
    free()


def bench_ms(fn, target_s=0.35, min_reps=3, max_reps=40):
    """Median ms of ``fn`` (one warm-up call, which also compiles, then as many reps as fit ``target_s``)."""
    fn()
    sync()
    tm = Timer(DEV == "cuda")
    tm.start()
    fn()
    est = tm.stop_ms() / 1e3
    reps = int(min(max_reps, max(min_reps, target_s / max(est, 1e-6))))
    ts = []
    for _ in range(reps):
        tm.start()
        fn()
        ts.append(tm.stop_ms())
    ts.sort()
    return ts[len(ts) // 2]


# --------------------------------------------------------------------------------------------------- inputs


def make_inputs(b, h, hk, n, d, dtype, seed=0, init=False):
    """Feature-mapped (non-negative) q/k as the normaliser expects, data-dependent log decays in [-~0.7, 0)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = (F.elu(torch.randn(b, h, n, d, device=DEV, generator=g)) + 1) / math.sqrt(d)
    k = (F.elu(torch.randn(b, hk, n, d, device=DEV, generator=g)) + 1) / math.sqrt(d)
    v = torch.randn(b, hk, n, d, device=DEV, generator=g)
    ld = F.logsigmoid(torch.randn(b, hk, n, device=DEV, generator=g) + 4.0)
    st = None
    if init:
        st = (torch.randn(b, hk, d, d, device=DEV, generator=g) * 0.1,
              torch.rand(b, hk, d, device=DEV, generator=g))
    return q.to(dtype), k.to(dtype), v.to(dtype), ld, st


# --------------------------------------------------------------------------------------------------- correctness


def grads_of(fn, xs, do, dS, dz):
    o, (S, z) = fn(*xs)
    loss = (o.double() * do.double()).sum() + (S.double() * dS).sum() + (z.double() * dz).sum()
    gs = torch.autograd.grad(loss, [x for x in xs if x is not None and x.requires_grad])
    return o.detach(), S.detach(), z.detach(), gs


def check_case(name, b, h, hk, n, d, dtype, ref, tol_f, tol_b, init=True, normalize=True, cfg=None):
    if cfg is not None:  # a kernel config other than the default for this check only
        ops = __import__("importlib").import_module(L.__name__ + ".ops")
        old, ops.CONFIG = ops.CONFIG, cfg
        try:
            return check_case(name, b, h, hk, n, d, dtype, ref, tol_f, tol_b, init, normalize)
        finally:
            ops.CONFIG = old
    q, k, v, ld, st = make_inputs(b, h, hk, n, d, dtype, init=init)
    g = torch.Generator(device=DEV).manual_seed(1)
    do = torch.randn(b, h, n, d, device=DEV, generator=g)
    dS = torch.randn(b, hk, d, d, device=DEV, generator=g, dtype=torch.float64) * 1e-2
    dz = torch.randn(b, hk, d, device=DEV, generator=g, dtype=torch.float64) * 1e-2

    def leaves(cast):
        xs = [q, k, v, ld] + (list(st) if st is not None else [])
        return [x.detach().to(cast if cast else x.dtype).clone().requires_grad_() for x in xs]

    def ours(q_, k_, v_, ld_, *s):
        return L.normalized_gla(q_, k_, v_, ld_, initial_state=tuple(s) if s else None, output_final_state=True,
                                normalize=normalize)

    def reference(q_, k_, v_, ld_, *s):
        s = tuple(s) if s else None
        if ref == "recurrent":
            return L.naive.normalized_gla_recurrent(q_, k_, v_, ld_, initial_state=s, normalize=normalize)
        return L.chunk.normalized_gla_chunked(q_, k_, v_, ld_, initial_state=s, normalize=normalize)

    t = time.time()
    o, S, z, gs = grads_of(ours, leaves(None), do, dS, dz)
    t_ours = time.time() - t
    ro, rS, rz, rgs = grads_of(reference, leaves(torch.float64), do, dS, dz)
    names = ["dq", "dk", "dv", "dlog_decay"] + (["dS0", "dz0"] if init else [])
    errs = {"o": rel(o, ro), "S": rel(S, rS), "z": rel(z, rz)}
    errs.update({nm: rel(a, r) for nm, a, r in zip(names, gs, rgs)})
    fwd_ok = max(errs["o"], errs["S"], errs["z"]) <= tol_f
    bwd_ok = max(errs[nm] for nm in names) <= tol_b
    row = dict(case=name, b=b, h=h, hk=hk, n=n, d=d, dtype=str(dtype).replace("torch.", ""), reference=ref,
               normalize=normalize, errs={k_: float(f"{v_:.3e}") for k_, v_ in errs.items()}, tol_fwd=tol_f,
               tol_bwd=tol_b, passed=bool(fwd_ok and bwd_ok), first_call_s=round(t_ours, 2))
    RES["correctness"].append(row)
    log(f"check {name}: {'PASS' if row['passed'] else 'FAIL'} {row['errs']}")


def check_decode_chain(d=128, dtype=torch.bfloat16):
    q, k, v, ld, st = make_inputs(2, 8, 2, 520, d, dtype, init=True)
    full, (S, z) = L.normalized_gla(q, k, v, ld, initial_state=st, output_final_state=True)
    o, state = L.normalized_gla(q[:, :, :500], k[:, :, :500], v[:, :, :500], ld[:, :, :500], initial_state=st,
                                output_final_state=True)
    outs = [o]
    for t in range(500, 520):
        sl = slice(t, t + 1)
        o, state = L.normalized_gla_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], ld[:, :, sl], state)
        outs.append(o)
    errs = {"o_steps": rel(torch.cat(outs, 2)[:, :, 500:], full[:, :, 500:]), "S": rel(state[0], S),
            "z": rel(state[1], z)}
    row = dict(case=f"decode chain == prefill ({str(dtype)[6:]}, d={d})", errs=errs, tol=2e-2,
               passed=bool(max(errs.values()) <= 2e-2))
    RES["correctness"].append(row)
    log(f"check {row['case']}: {'PASS' if row['passed'] else 'FAIL'} {errs}")


def fla_layout(q, k, v, ld):
    """q/k/v and per-head log decays in fla's layout: ``[b, n, h, ·]`` with every query head explicit (fla has no
    GQA, so the KV heads and their decays are repeated for their query heads)."""
    g = q.shape[1] // k.shape[1]
    tk, tv, tg = (x.repeat_interleave(g, 1).transpose(1, 2).contiguous() for x in (k, v, ld))
    return q.transpose(1, 2).contiguous(), tk, tv, tg


def check_vs_fla(fla, d=128, n=4096):
    """Same unnormalised problem through ours (GQA) and fla's chunk_simple_gla (K/V/decays expanded)."""
    h, hk = H, HK
    q, k, v, ld, _ = make_inputs(1, h, hk, n, d, torch.bfloat16)
    o, (S, _) = L.normalized_gla(q, k, v, ld, normalize=False, output_final_state=True)
    g = h // hk
    tq, tk, tv, tg = fla_layout(q, k, v, ld)
    fo, fS = fla["chunk_simple_gla"](tq, tk, tv, g=tg, scale=1.0, output_final_state=True)
    ref, (rS, _) = L.chunk.normalized_gla_chunked(q.double(), k.double(), v.double(), ld.double(), normalize=False)
    errs = {"ours_vs_fla": rel(o, fo.transpose(1, 2)), "ours_vs_fp64": rel(o, ref),
            "fla_vs_fp64": rel(fo.transpose(1, 2), ref), "state_ours_vs_fla": rel(S, fS[:, ::g].float())}
    row = dict(case=f"unnormalised vs fla chunk_simple_gla (bf16, d={d}, n={n})", errs=errs, tol=3e-2,
               passed=bool(errs["ours_vs_fp64"] <= 3e-2))
    RES["correctness"].append(row)
    log(f"check {row['case']}: {errs}")


# --------------------------------------------------------------------------------------------------- prefill


def prefill_fns(impl, q, k, v, ld, fla):
    """(fwd, fwd+bwd) closures over pre-built inputs in the impl's own layout (layout changes not timed)."""
    h, hk = q.shape[1], k.shape[1]
    g = h // hk
    if impl in ("ours", "ours_unnorm"):
        norm = impl == "ours"
        leaves = [x.detach().requires_grad_() for x in (q, k, v, ld)]
        do = torch.randn_like(q)

        def fwd():
            with torch.no_grad():
                return L.normalized_gla(q, k, v, ld, normalize=norm)[0]

        def fb():
            o = L.normalized_gla(*leaves, normalize=norm)[0]
            return torch.autograd.grad(o, leaves, do)
        return fwd, fb
    if impl.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION}[impl]
        ke, ve = (x.repeat_interleave(g, 1) for x in (k, v))
        leaves = [x.detach().requires_grad_() for x in (q, ke, ve)]
        do = torch.randn_like(q)

        def fwd():
            with torch.no_grad(), sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)

        def fb():
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(*leaves, is_causal=True)
            return torch.autograd.grad(o, leaves, do)
        return fwd, fb
    # fla: [b, n, h, d], all heads explicit
    tq, tk, tv, tg = fla_layout(q, k, v, ld)
    if impl == "fla_chunk_simple_gla":
        op = fla["chunk_simple_gla"]
    else:  # chunk_gla: per-channel gates (the more general op), same per-head decay on every channel
        tg = tg[..., None].expand(*tq.shape[:3], tq.shape[-1]).contiguous()
        op = fla["chunk_gla"]
    leaves = [x.detach().requires_grad_() for x in (tq, tk, tv, tg)]
    do = torch.randn_like(tq)

    def fwd():
        with torch.no_grad():
            return op(tq, tk, tv, g=tg, scale=1.0)[0]

    def fb():
        o = op(*leaves[:3], g=leaves[3], scale=1.0)[0]
        return torch.autograd.grad(o, leaves, do)
    return fwd, fb


def run_prefill(impl, d, lengths, fla, modes=("fwd", "fwd+bwd")):
    """Time ``impl`` at every length and mode. fla's backward refuses some Triton/GPU pairs (a RuntimeError from its
    own guard): after the first refusal only its forward is timed, so the budget goes to the comparable rows."""
    h, hk = H, HK
    modes = list(modes)
    for n in lengths:
        for mode in list(modes):
            key = f"prefill {impl} d={d} n={n} {mode}"
            if time.time() - T0 > BUDGET:
                RES["skipped"].append({"case": key, "why": "time budget"})
                continue
            row = dict(impl=impl, d=d, n=n, mode=mode, b=1, h=h, hk=hk, dtype="bfloat16")
            try:
                q, k, v, ld, _ = make_inputs(1, h, hk, n, d, torch.bfloat16)
                fwd, fb = prefill_fns(impl, q, k, v, ld, fla)
                if DEV == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t = time.time()
                row["ms"] = round(bench_ms(fwd if mode == "fwd" else fb), 4)
                row["wall_s"] = round(time.time() - t, 2)
                if DEV == "cuda":
                    row["peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                RES["prefill"].append(row)
                log(f"{key}: {row['ms']:.3f} ms")
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                RES["prefill"].append(row)
                record_error(key, e)
                if "fla" in impl and isinstance(e, (ImportError, KeyError)):
                    return
                if "fla" in impl and mode == "fwd+bwd" and isinstance(e, RuntimeError):
                    modes.remove(mode)
                    RES["skipped"].append({"case": f"prefill {impl} d={d} fwd+bwd beyond n={n}",
                                           "why": "fla refused its backward here (see errors)"})
            finally:
                q = k = v = ld = fwd = fb = None
                free()
            save()


# --------------------------------------------------------------------------------------------------- decode


def time_decode(fn, graph: bool, iters=200):
    """µs per call: eager (``iters`` back-to-back calls) or CUDA-graph replay of one captured call."""
    if graph and DEV != "cuda":
        raise RuntimeError("CUDA graphs need CUDA")
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn()
        call = gr.replay
    else:
        call = fn
    for _ in range(10):
        call()
    sync()
    tm = Timer(DEV == "cuda")
    best = float("inf")
    for _ in range(3):
        tm.start()
        for _ in range(iters):
            call()
        best = min(best, tm.stop_ms() * 1e3 / iters)
    return best


def run_decode(d, contexts, iters=200):
    h, hk, b = H, HK, 1
    g = h // hk
    gen = torch.Generator(device=DEV).manual_seed(0)
    q = (F.elu(torch.randn(b, h, 1, d, device=DEV, generator=gen)) + 1).bfloat16()
    k = (F.elu(torch.randn(b, hk, 1, d, device=DEV, generator=gen)) + 1).bfloat16()
    v = torch.randn(b, hk, 1, d, device=DEV, generator=gen).bfloat16()
    ld = F.logsigmoid(torch.randn(b, hk, 1, device=DEV, generator=gen) + 4)
    state = (torch.randn(b, hk, d, d, device=DEV, generator=gen), torch.rand(b, hk, d, device=DEV,
                                                                                  generator=gen) + 1)
    state_bytes = hk * d * d * 4 + hk * d * 4
    for graph in (False, True):
        key = f"decode ours d={d} graph={graph}"
        if time.time() - T0 > BUDGET:
            RES["skipped"].append({"case": key, "why": "time budget"})
            continue
        try:
            with torch.no_grad():
                us = time_decode(lambda: L.normalized_gla_step(q, k, v, ld, state), graph, iters)
            for n in contexts:  # constant in the context length by construction: one measurement
                RES["decode"].append(dict(impl="ours", d=d, context=n, graph=graph, us=round(us, 2),
                                          tok_s=round(1e6 / us, 1), state_or_cache_mb=round(state_bytes / 2**20, 3)))
            log(f"{key}: {us:.2f} us/token")
        except Exception as e:  # noqa: BLE001
            record_error(key, e)
        save()
    for n in contexts:
        for graph in (False, True):
            key = f"decode sdpa d={d} context={n} graph={graph}"
            if time.time() - T0 > BUDGET:
                RES["skipped"].append({"case": key, "why": "time budget"})
                continue
            try:
                kc = torch.randn(b, hk, n, d, device=DEV, dtype=torch.bfloat16)
                vc = torch.randn(b, hk, n, d, device=DEV, dtype=torch.bfloat16)
                try:
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
                    gqa = True
                except (TypeError, RuntimeError):
                    kc, vc = kc.repeat_interleave(g, 1), vc.repeat_interleave(g, 1)
                    gqa = False

                def call():
                    with torch.no_grad():
                        if gqa:
                            return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
                        return F.scaled_dot_product_attention(q, kc, vc)
                us = time_decode(call, graph, iters=min(iters, 100 if n >= 65536 else 200))
                RES["decode"].append(dict(impl="sdpa" + ("" if gqa else " (K/V expanded)"), d=d, context=n,
                                          graph=graph, us=round(us, 2), tok_s=round(1e6 / us, 1),
                                          state_or_cache_mb=round(2 * hk * n * d * 2 / 2**20, 1)))
                log(f"{key}: {us:.2f} us/token")
            except Exception as e:  # noqa: BLE001
                record_error(key, e)
            finally:
                kc = vc = None
                free()
            save()


# --------------------------------------------------------------------------------------------------- fla


def load_fla(full_autotune: bool):
    """fla's chunk ops, or None. Unless ``full_autotune``, ``triton.autotune`` is narrowed while fla's modules are
    imported (<= 8 configs per kernel, 4/8 warps, 2 stages): fla tunes 48 configs for its state kernels alone,
    minutes of compilation that this budget does not have."""
    import triton

    orig = triton.autotune

    def narrowed(configs, key, *a, **kw):
        keep = [c for c in configs if c.num_warps in (4, 8) and c.num_stages == 2] or list(configs)
        return orig(keep[:8], key, *a, **kw)

    if not full_autotune:
        triton.autotune = narrowed
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
        try:
            import fla
            ver = getattr(fla, "__version__", "?")
        except Exception:  # noqa: BLE001
            ver = "?"
        RES["info"]["fla"] = ver
        RES["info"]["fla_autotune"] = "full" if full_autotune else "narrowed (<= 8 configs/kernel, warps 4/8, stages 2)"
        return {"chunk_simple_gla": chunk_simple_gla, "chunk_gla": chunk_gla}
    except Exception as e:  # noqa: BLE001
        RES["info"]["fla"] = f"unavailable: {type(e).__name__}: {e}"[:500]
        log(f"fla unavailable: {type(e).__name__}: {e}")
        return None
    finally:
        triton.autotune = orig


# --------------------------------------------------------------------------------------------------- report


def plot(path):
    try:
        plt = pyplot()
    except Exception as e:  # noqa: BLE001
        RES["info"]["plot"] = f"no matplotlib: {e}"
        return
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    colors = {"ours": "C0", "ours_unnorm": "C4", "fla_chunk_simple_gla": "C1", "fla_chunk_gla": "C2",
              "sdpa_cudnn": "C3", "sdpa_flash": "C5"}
    for ax, mode in zip(axes[:2], ("fwd", "fwd+bwd")):
        for impl in colors:
            for d, ls in ((128, "-"), (64, "--")):
                pts = sorted((r["n"], r["ms"]) for r in RES["prefill"]
                             if r["impl"] == impl and r["d"] == d and r["mode"] == mode and "ms" in r)
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", color=colors[impl], label=f"{impl} d={d}")
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms (median)",
               title=f"prefill {mode}, b=1 h=32 hk=8 bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for impl, c in (("ours", "C0"), ("sdpa", "C3"), ("sdpa (K/V expanded)", "C5")):
        for graph, ls in ((False, "-"), (True, "--")):
            pts = sorted((r["context"], r["tok_s"]) for r in RES["decode"] if r["impl"] == impl and r["graph"] == graph)
            if pts:
                ax.plot(*zip(*pts), ls, marker="o", color=c, label=f"{impl} {'CUDA graph' if graph else 'eager'}")
    ax.set(xscale="log", yscale="log", xlabel="context length", ylabel="tokens/s (one layer, b=1)",
           title="decode: one token, h=32 hk=8 d=128")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"normalised gated linear attention — {RES['info'].get('gpu', '?')}")
    save_figure(fig, path, dpi=110)


def table():
    lines = []
    ok = [r for r in RES["correctness"] if "passed" in r]
    lines.append(f"correctness: {sum(r['passed'] for r in ok)}/{len(ok)} passed"
                 + "".join(f"\n  {'ok ' if r['passed'] else 'BAD'} {r['case']}: "
                           + ", ".join(f"{k}={v:.1e}" for k, v in r['errs'].items()) for r in RES["correctness"]))
    impls = ["ours", "ours_unnorm", "fla_chunk_simple_gla", "fla_chunk_gla", "sdpa_cudnn"]
    for d in (128, 64):
        for mode in ("fwd", "fwd+bwd"):
            rows = {(r["impl"], r["n"]): r.get("ms") for r in RES["prefill"] if r["d"] == d and r["mode"] == mode}
            if not rows:
                continue
            ns = sorted({n for _, n in rows})
            present = [i for i in impls if any((i, n) in rows for n in ns)]
            lines.append(f"\nprefill {mode} d={d} (ms)  " + "".join(f"{i[:20]:>21s}" for i in present)
                         + "   ours/cuDNN")
            for n in ns:
                cells = "".join(f"{(rows.get((i, n)) or float('nan')):21.3f}" for i in present)
                o, c = rows.get(("ours", n)), rows.get(("sdpa_cudnn", n))
                sp = f"{c / o:10.2f}x" if o and c else "         -"
                lines.append(f"  n={n:<7d}         " + cells + "  " + sp)
    dec = RES["decode"]
    if dec:
        lines.append("\ndecode d=128, tokens/s for one layer (eager / CUDA graph)")
        for n in sorted({r["context"] for r in dec}):
            cells = []
            for impl in ("ours", "sdpa", "sdpa (K/V expanded)"):
                e = next((r["tok_s"] for r in dec if r["impl"] == impl and r["context"] == n and not r["graph"]), None)
                gph = next((r["tok_s"] for r in dec if r["impl"] == impl and r["context"] == n and r["graph"]), None)
                if e or gph:
                    cells.append(f"{impl}: {e or float('nan'):9.0f} / {gph or float('nan'):9.0f}")
            lines.append(f"  context={n:<7d} " + "   ".join(cells))
    if RES["errors"]:
        lines.append(f"\n{len(RES['errors'])} case(s) failed: " + "; ".join(e["case"] for e in RES["errors"][:8]))
    if RES["skipped"]:
        why = {}
        for r in RES["skipped"]:
            why.setdefault(r["why"].split(" (")[0], []).append(r["case"])
        lines.append("skipped: " + "; ".join(f"{len(v)} for {w} ({v[0]}{', ...' if len(v) > 1 else ''})"
                                             for w, v in why.items()))
    return "\n".join(lines)


def main():
    global OUT, BUDGET, DEV, H, HK
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (JSON + PNG)")
    ap.add_argument("--budget", type=float, default=185.0, help="seconds after which no new case starts")
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--contexts", default="1024,4096,16384,65536,131072")
    ap.add_argument("--fla-autotune", choices=("narrowed", "full"), default="narrowed")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU plumbing check (Triton interpreter, tiny sizes): stages run, numbers are meaningless")
    args = ap.parse_args()
    OUT, BUDGET = args.out, args.budget
    os.makedirs(OUT, exist_ok=True)
    from tqdm import tqdm

    ops = __import__(L.__name__ + ".ops", fromlist=["CONFIG"])
    if args.smoke:
        DEV, H, HK = "cpu", 4, 2
        L.BACKEND = "triton"
        lengths, contexts = [64, 100], [64, 256]
        cn, cd, cbig, cbig_d = 70, 32, 130, 32  # check sizes
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or --smoke for a CPU plumbing check)")
        lengths = [int(x) for x in args.lengths.split(",")]
        contexts = [int(x) for x in args.contexts.split(",")]
        cn, cd, cbig, cbig_d = 1000, 128, 16384, 128
    env = environment(DEV == "cuda", cpu="cpu (smoke)", packages=("torch", "triton", "cuda"), date="seconds",
                      with_command=False)
    RES["info"].update(kernels=os.path.dirname(L.__file__), **env,
                       cudnn=torch.backends.cudnn.version() if DEV == "cuda" else None,
                       python=platform.python_version(), command=" ".join(sys.argv), config=str(ops.CONFIG),
                       heads=f"h={H} hk={HK}",
                       sms=torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else None,
                       budget_s=BUDGET)
    log(f"{env['gpu']} torch {env['torch']} triton {env['triton']} cuda {env['cuda']}")
    save()
    fla_box = {}

    def with_fla(fn):
        def run():
            if args.no_fla:
                RES["skipped"].append({"case": "fla", "why": "--no-fla"})
                return
            if "ops" not in fla_box:
                fla_box["ops"] = load_fla(args.fla_autotune == "full")
            if not fla_box["ops"]:
                RES["skipped"].append({"case": "fla stage", "why": RES["info"].get("fla", "fla unavailable")})
                return
            fn(fla_box["ops"])
        return run

    bf16 = torch.float16 if args.smoke else torch.bfloat16  # the interpreter's bf16 is broken
    # (name, seconds that must be left to start it, what)
    stages = [
        ("check bf16 d=128 vs recurrent fp64 (n=1000)", 0,
         lambda: check_case(f"bf16 d={cd} GQA 8/2 init n={cn}", 2, 8, 2, cn, cd, bf16, "recurrent", 2e-2, 5e-2)),
        ("check fp32 d=64 vs recurrent fp64 (n=700)", 0,
         lambda: check_case(f"fp32 d={cd // 2} GQA 4/1 init n={cn * 7 // 10}", 1, 4, 1, cn * 7 // 10, cd // 2,
                            torch.float32, "recurrent", 1e-4, 1e-4)),
        ("check bf16 d=128 vs chunked fp64 (n=16384)", 0,
         lambda: check_case(f"bf16 d={cbig_d} GQA {H}/{HK} n={cbig}", 1, H, HK, cbig, cbig_d, bf16, "chunked",
                            2e-2, 5e-2, init=False)),
        ("check decode chain", 0, lambda: check_decode_chain(cd, bf16)),
        ("prefill ours d=128", 0, lambda: run_prefill("ours", cd, lengths, None)),
        ("prefill fla simple_gla d=128", 45,  # right after ours: the goal's comparison, in the same lease
         with_fla(lambda fla: run_prefill("fla_chunk_simple_gla", cd, lengths, fla))),
        ("prefill cuDNN d=128", 10, lambda: run_prefill("sdpa_cudnn", cd, lengths, None)),
        ("decode d=128", 10, lambda: run_decode(cd, contexts, 20 if args.smoke else 200)),
        ("prefill ours unnormalised d=128", 20, lambda: run_prefill("ours_unnorm", cd, lengths, None)),
        ("prefill ours d=64", 20, lambda: run_prefill("ours", cd // 2, lengths, None)),
        ("prefill cuDNN d=64", 10, lambda: run_prefill("sdpa_cudnn", cd // 2, lengths, None)),
        ("check unnormalised vs fla", 10, with_fla(lambda fla: check_vs_fla(fla, cd, lengths[0]))),
        ("check bf16 d=64 unnormalised vs recurrent", 10,
         lambda: check_case(f"bf16 d={cd // 2} GQA 8/2 unnormalised n={cn}", 2, 8, 2, cn, cd // 2, bf16,
                            "recurrent", 2e-2, 5e-2, normalize=False)),
        ("check fp16 d=128 vs chunked fp64 (n=3000)", 10,
         lambda: check_case(f"fp16 d={cd} GQA 4/2 init n={cn * 3}", 1, 4, 2, cn * 3, cd, torch.float16, "chunked",
                            5e-3, 1e-2)),
        ("check bf16 d=128 n=16384 with fp32 snapshots", 15,
         lambda: check_case(f"bf16 d={cbig_d} GQA {H}/{HK} n={cbig}, fp32 snapshots", 1, H, HK, cbig, cbig_d, bf16,
                            "chunked", 2e-2, 5e-2, init=False,
                            cfg=__import__("dataclasses").replace(ops.CONFIG, snap_fp32=True))),
        ("prefill fla simple_gla d=64", 40,
         with_fla(lambda fla: run_prefill("fla_chunk_simple_gla", cd // 2, lengths, fla))),
        ("prefill fla chunk_gla d=128", 60, with_fla(lambda fla: run_prefill("fla_chunk_gla", cd, lengths, fla))),
    ]
    for name, need, fn in tqdm(stages, desc="bench_linear", file=sys.stdout, mininterval=0):
        left = BUDGET - (time.time() - T0)
        if left < max(need, 0.001):
            RES["skipped"].append({"case": name, "why": f"time budget ({left:.0f}s left, needs {need}s)"})
            continue
        t = time.time()
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            record_error(name, e)
        log(f"stage '{name}' took {time.time() - t:.1f}s")
        save()
    plot(os.path.join(OUT, "linear_attention.png"))
    save()
    print("\n" + table(), flush=True)


BUDGET = 185.0

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The long-context job (issue #15): prefill a 32k-1M-token prompt and decode greedily, per attention variant.

A transformers ``LlamaForCausalLM`` with Llama-3.x shapes and random weights, bf16, on one GPU:
  * ``8b``: Llama-3-8B (hidden 4096, MLP 14336, 32 layers, 32/8 heads, head_dim 128, vocab 128256);
  * ``3b``: Llama-3.2-3B (hidden 3072, MLP 8192, 28 layers, 24/8 heads, head_dim 128, tied embeddings), for the
    lengths where the 8B shape's activations do not fit.
Variants: ``exact`` (unpatched, SDPA), ``hyper``, ``dhsa``, ``zipcache`` and the compositions ``hyper+zipcache``,
``dhsa+zipcache`` (``patchattn.patch_model`` once per name, in that order, on all layers, default parameters;
``--param hyper.min_seq_len=8192`` changes one).

Per row (shape, variant, prompt length n), batch 1, under ``torch.inference_mode``:
  * prefill: one forward of the whole random prompt into the cache ``generate()`` would build
    (``patchattn.generation_cache``; a ``DynamicCache`` for ``exact``) with ``logits_to_keep=1`` (no [n, vocab]
    logits). Attention sees the whole prompt at once (a prefill approximation only runs on a whole causal prefill:
    a chunked prefill over a cache falls back to exact attention), while the position-wise layers -- each decoder
    layer's MLP and its two RMSNorms, and the final norm -- run over slices of ``--mlp-chunk`` tokens
    (``chunked_positionwise``): the [n, intermediate] MLP activations of a 1M-token prompt (3 x 28 GiB at 8B) are
    never materialised at once. Timed with CUDA events -> ``prefill_s``.
  * decode: ``--new-tokens`` (64) greedy steps, one forward of the last token through the cache each (the first
    step feeds the prefill's argmax), argmax on the GPU, timed as one CUDA-event interval over the loop ->
    ``decode_s`` and ``decode_tok_s = new_tokens / decode_s``; ``decode_host_s``: how long the host took to queue the
    steps (a hint: near ``decode_s`` when Python is the bottleneck, but also when the GPU falls so far behind that
    the launch queue fills and blocks the host).
  * ``kv_bytes``: the cache's true bytes after prefill + decode (``layer_nbytes`` per layer: zipcache's packed
    codes and scales, the DynamicCache's bf16 tensors), ``kv_bytes_prefill`` after the prefill, ``kv_bytes_full``
    those of an uncompressed cache; ``peak_gb``: ``torch.cuda.max_memory_allocated`` over the row in GiB (weights
    included; reset per row), ``weights_gb`` apart.
  * ``prefill_paths``: ``patchattn.attention_paths`` summed over layers for the prefill, ``approx_layers`` the layers
    where the variant's approximation ran (0 for exact and zipcache alone): no row credits a variant with exact
    attention's numbers.
Each row is first run untimed (same length, same decode), so Triton compiles are not timed: some kernels
compile again for longer prompts (H200, 8B, hyper+zipcache: a 16,384-token warm-up left five kernels — hyper's hash
and level kernels, zipcache's probes — to compile inside the timed 131k row, 10.1 s prefill and 23.4 tok/s in a
fresh process vs 6.3 s and 32.8 tok/s with Triton's cache warm). ``--warmup-len N`` warms up once per variant at N
tokens instead (cheaper; what earlier tables used). A ``torch.cuda.OutOfMemoryError`` makes the row
``status: "oom"`` with ``oom_phase`` (setup, prefill or decode); any other exception ``status: "error"`` with the
message; memory is freed and the run goes on. Rows without zipcache whose weights, full bf16 KV cache and four
[n, hidden] activations (residual, normed copy, queries, attention output) exceed the GPU's memory are not run:
``status: "oom"``, ``oom_phase: "predicted"``, ``measured: false``
(``--no-predict-oom`` runs them anyway: an exact 1M-token prefill of the 8B shape takes minutes before it fails).
``--budget-s`` skips rows that would start after that many seconds; ``--resume`` skips the rows the file already
has (ok or oom), so the same command can be rerun after a time limit or after a kernel fault that lost the CUDA
context (the script stops at such an error: every later row would fail). The JSON (``{"meta", "rows"}``, every row with
gpu/torch/triton/date/command/commit) is written after every row, with ``--append`` merged into an existing file
(rows of the same shape/variant/n replaced), and a PNG next to it: prefill seconds, peak/KV GiB and decode tok/s vs
prompt length, per variant.

  python scripts/bench_longctx.py --shapes 8b --lens 32768,131072 --resume --budget-s 480   # H200, 10-min calls
  python scripts/bench_longctx.py --shapes 8b --lens 1048576 --variants hyper+zipcache,dhsa+zipcache --resume
  python scripts/bench_longctx.py --tiny          # CPU smoke test of the script (writes to the temp folder)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _bench import Timer, commit, environment, pyplot, save_figure, write_json
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

import patchattn
from patchattn.cache import layer_nbytes
from patchattn.fields import parse_value

#: the keyword a model call takes its cache by (transformers renamed past_key_values -> cache after 5.17)
CACHE_KW = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
VARIANTS = ["exact", "hyper", "dhsa", "zipcache", "hyper+zipcache", "dhsa+zipcache"]
LENS = [32768, 131072, 524288, 1048576]
OUT = "benchmarks/results/longctx_e2e.json"
TINY_OUT = str(Path(tempfile.gettempdir()) / "longctx_e2e_tiny.json")
LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=1 << 21,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=128000,
              eos_token_id=128001)
SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, **LLAMA3),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, **LLAMA3),
}
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=4096,
                  tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
#: ``--tiny``: settings under which hyper and dhsa really approximate a 64-token prefill (as tests/test_composition.py)
TINY_PARAMS = {
    "hyper": dict(min_seq_len=16, block_size=8, sample_size=8, sink_tokens=0, exact_tail=0),
    "dhsa": dict(min_seq_len=16, chunk_size=16, query_block=16, budget_tokens=16, local_window=16, sink_tokens=16,
                 exact_tail=0),
    "zipcache": dict(requant_interval=4),
}


def make_config(shape: str, tiny: bool) -> LlamaConfig:
    return LlamaConfig(**(TINY_SHAPE if tiny else SHAPES[shape]), attn_implementation="sdpa")


def build_model(config: LlamaConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights made on ``device`` in ``dtype`` (no fp32 copy first; the rotary ``inv_freq`` stays fp32)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.to(device).eval()


# -- chunked position-wise layers -------------------------------------------------------------------------------------
def _sliced(forward, chunk: int):
    """``forward`` (position-wise: each token's output depends on that token alone) run over slices of ``chunk``
    tokens of its ``[batch, n, ...]`` input, the slices written into one output: the intermediate activations of
    only ``chunk`` tokens live at a time."""
    def run(x, *args, **kwargs):
        n = x.shape[1] if x.dim() >= 2 else 0
        if n <= chunk:
            return forward(x, *args, **kwargs)
        first = forward(x[:, :chunk], *args, **kwargs)
        out = first.new_empty((x.shape[0], n, *first.shape[2:]))
        out[:, :chunk] = first
        del first
        for s in range(chunk, n, chunk):
            out[:, s:s + chunk] = forward(x[:, s:s + chunk], *args, **kwargs)
        return out

    return run


def positionwise_modules(model) -> list[torch.nn.Module]:
    """The position-wise modules of a Llama stack: per decoder layer its MLP and two RMSNorms, and the final norm
    (the lm_head sees one token per prefill: ``logits_to_keep=1``)."""
    base = model.model
    mods = [base.norm]
    for layer in base.layers:
        mods += [layer.input_layernorm, layer.mlp, layer.post_attention_layernorm]
    return mods


@contextlib.contextmanager
def chunked_positionwise(model, chunk: int | None):
    """Within the block, the position-wise modules (``positionwise_modules``) process sequences longer than ``chunk``
    tokens in slices of ``chunk`` (``forward`` set on the instance, removed in ``finally``); attention is untouched
    and still sees the whole sequence. ``chunk`` None or 0: nothing changes."""
    if not chunk:
        yield model
        return
    mods = positionwise_modules(model)
    saved = [m.__dict__.get("forward") for m in mods]
    try:
        for m in mods:
            m.forward = _sliced(m.forward, chunk)
        yield model
    finally:
        for m, old in zip(mods, saved):
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old


# -- one row ----------------------------------------------------------------------------------------------------------
def parse_params(items: list[str], tiny: bool) -> dict[str, dict]:
    """``--param VARIANT.KEY=VALUE`` (repeatable; values typed as ``patchattn eval --param`` types them) over
    ``TINY_PARAMS`` where ``tiny``."""
    params = {name: dict(p) for name, p in TINY_PARAMS.items()} if tiny else {}
    for item in items:
        key, _, value = item.partition("=")
        variant, _, name = key.partition(".")
        if not name or not _:
            raise SystemExit(f"--param {item!r}: VARIANT.KEY=VALUE")
        params.setdefault(variant, {})[name] = parse_value(value)
    return params


def patch(model, variant: str, params: dict[str, dict]) -> None:
    if variant != "exact":
        for name in variant.split("+"):
            patchattn.patch_model(model, name, **params.get(name, {}))


def make_cache(model):
    return patchattn.generation_cache(model) if patchattn.is_patched(model) else DynamicCache(config=model.config)


def cache_bytes(cache) -> int:
    return sum(layer_nbytes(layer) for layer in cache.layers)


def full_kv_bytes(config: LlamaConfig, tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of an uncompressed KV cache of ``tokens`` tokens (every layer, keys and values; bf16 by default)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * tokens * config.num_key_value_heads * head_dim * dtype_bytes


def predicted_need(config: LlamaConfig, variant: str, tokens: int, weights: int) -> int | None:
    """Bytes a row without zipcache needs at least (None with zipcache): the weights, the full bf16 KV cache of
    ``tokens`` tokens, and what is live at a layer's attention besides: the residual stream, its normed copy, the
    queries and the attention output ([tokens, hidden] bf16 each)."""
    if "zipcache" in variant.split("+"):
        return None
    return weights + full_kv_bytes(config, tokens) + 4 * tokens * config.hidden_size * 2


def sum_paths(paths: dict[int, dict[str, int]]) -> tuple[dict[str, int], int]:
    total: dict[str, int] = {}
    for counts in paths.values():
        for path, k in counts.items():
            total[path] = total.get(path, 0) + k
    return total, sum(1 for counts in paths.values() if counts.get("approximate", 0) > 0)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache, chunk: int | None, logits_to_keep: int = 1):
    """The whole prompt through the model into ``cache`` (attention over all of it at once), the position-wise
    layers in slices of ``chunk`` tokens; returns the kept logits."""
    with chunked_positionwise(model, chunk):
        return model(input_ids=ids, use_cache=True, logits_to_keep=logits_to_keep, **{CACHE_KW: cache}).logits


@torch.inference_mode()
def decode(model, token: torch.Tensor, cache, steps: int) -> torch.Tensor:
    """``steps`` greedy steps from ``token`` [b, 1]; returns the tokens fed [b, steps]."""
    fed = []
    for _ in range(steps):
        fed.append(token)
        logits = model(input_ids=token, use_cache=True, **{CACHE_KW: cache}).logits
        token = logits[:, -1:].argmax(-1)
    return torch.cat(fed, 1)


def measure(model, ids: torch.Tensor, steps: int, chunk: int | None, cuda: bool, row: dict, state: dict) -> None:
    """One timed prefill + ``steps`` decode steps on the model as patched, into ``row`` as they complete (an OOM in
    the decode keeps the prefill's numbers); ``state["phase"]`` says where it is."""
    timer = Timer(cuda)
    state["phase"] = "setup"
    cache = make_cache(model)
    if patchattn.is_patched(model):
        patchattn.attention_paths(model, reset=True)
    state["phase"] = "prefill"
    timer.start()
    logits = prefill(model, ids, cache, chunk)
    prefill_ms = timer.stop_ms()
    paths, approx_layers = sum_paths(patchattn.attention_paths(model, reset=True)) if patchattn.is_patched(model) \
        else ({}, 0)
    row.update(prefill_s=round(prefill_ms / 1e3, 3), kv_bytes_prefill=cache_bytes(cache), prefill_paths=paths,
               approx_layers=approx_layers)
    token = logits[:, -1:].argmax(-1)
    del logits
    state["phase"] = "decode"
    timer.start()
    host = time.perf_counter()
    fed = decode(model, token, cache, steps)
    host_s = time.perf_counter() - host  # the host queueing the steps (see the module docstring)
    decode_ms = timer.stop_ms()
    if patchattn.is_patched(model):
        patchattn.attention_paths(model, reset=True)
    row.update(decode_s=round(decode_ms / 1e3, 4), decode_host_s=round(host_s, 4),
               decode_tok_s=round(steps / (decode_ms / 1e3), 2),
               kv_bytes=cache_bytes(cache), first_tokens=fed[0, :8].tolist())


def cuda_usable() -> bool:
    """False after a sticky CUDA error (an illegal memory access in a kernel poisons the process's context: every
    later row would fail too)."""
    try:
        torch.cuda.synchronize()
        (torch.ones(1, device="cuda") + 1).item()
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


def free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def run_row(model, config, ids, variant: str, params: dict, args, cuda: bool) -> dict:
    """The row of ``variant`` at ``ids``: measured, or an OOM / error row; the model is unpatched afterwards."""
    n = ids.shape[1]
    row: dict = {"status": "ok", "prefill_s": None, "decode_tok_s": None, "kv_bytes": None}
    state = {"phase": "patch"}
    if cuda:
        free(cuda)
        torch.cuda.reset_peak_memory_stats()
    try:
        patch(model, variant, params)
        measure(model, ids, args.new_tokens, args.mlp_chunk, cuda, row, state)
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="oom", oom_phase=state["phase"], error=str(exc).splitlines()[0][:300])
    except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
        row.update(status="error", error_phase=state["phase"], error=repr(exc)[:500],
                   traceback=traceback.format_exc(limit=6)[-3000:])
    finally:
        if patchattn.is_patched(model):
            patchattn.unpatch_model(model)
    row["peak_gb"] = None
    # a kernel fault poisons the context: asking the GPU anything more raises again (main() then stops)
    context_lost = row["status"] == "error" and cuda and not cuda_usable()
    if not context_lost:
        free(cuda)  # after the except blocks: their tracebacks held the row's tensors
        if cuda:
            row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["kv_bytes_full"] = full_kv_bytes(config, n + args.new_tokens, model.dtype.itemsize)
    return row


# -- output -----------------------------------------------------------------------------------------------------------
def key(row: dict) -> tuple:
    """A row's identity: shape, variant, length and the parameters it ran with (rows with other --param values are
    other rows)."""
    return row.get("shape"), row.get("variant"), row.get("n"), json.dumps(row.get("params") or {}, sort_keys=True)


def row_params(variant: str, params: dict[str, dict]) -> dict[str, dict]:
    """The --param values of ``variant``'s parts that were given (parts without any are left out)."""
    return {v: params[v] for v in variant.split("+") if params.get(v)}


def series_name(row: dict) -> str:
    """``variant`` plus its non-default parameters, e.g. ``hyper+zipcache (hyper.retrieval_heads=0)``."""
    extra = ", ".join(f"{v}.{k}={x}" for v, p in (row.get("params") or {}).items() for k, x in p.items())
    return f"{row['variant']} ({extra})" if extra else row["variant"]


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return list(data["rows"] if isinstance(data, dict) else data)


def save(path: Path, meta: dict, old: list[dict], rows: list[dict]) -> None:
    new = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new] + rows
    write_json(path, {"meta": meta, "rows": merged})
    try:
        plot(merged, path.with_suffix(".png"))
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not stop the benchmark
        print(f"plot failed: {exc!r}", flush=True)


def plot(rows: list[dict], path: Path) -> None:
    """Per shape: prefill seconds, peak (solid) and KV (dashed) GB, decode tok/s vs prompt length, one line per
    variant (ok rows only; log-2 x axis)."""
    shapes = sorted({r["shape"] for r in rows if r["status"] == "ok"})
    if not shapes:
        return
    plt = pyplot()
    fig, axes = plt.subplots(len(shapes), 3, figsize=(15, 4 * len(shapes)), squeeze=False)
    for ax_row, shape in zip(axes, shapes):
        names = sorted({series_name(r) for r in rows},
                       key=lambda name: (VARIANTS.index(name) if name in VARIANTS else len(VARIANTS), name))
        for i, variant in enumerate(names):
            ok = sorted((r for r in rows if r["shape"] == shape and series_name(r) == variant and r["status"] == "ok"),
                        key=lambda r: r["n"])
            if not ok:
                continue
            color = f"C{i}"
            ns = [r["n"] for r in ok]
            ax_row[0].plot(ns, [r["prefill_s"] for r in ok], "o-", color=color, label=variant)
            if ok[0].get("peak_gb") is not None:
                ax_row[1].plot(ns, [r["peak_gb"] for r in ok], "o-", color=color, label=f"{variant} peak")
            ax_row[1].plot(ns, [r["kv_bytes"] / 2**30 for r in ok], "s--", color=color, label=f"{variant} KV")
            ax_row[2].plot(ns, [r["decode_tok_s"] for r in ok], "o-", color=color, label=variant)
        for ax, title in zip(ax_row, ("prefill (s)", "GiB: peak (solid), KV cache (dashed)", "decode (tok/s)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt tokens")
            ax.set_title(f"{shape}: {title}")
            ax.grid(True, alpha=0.3)
        ax_row[0].set_yscale("log")
        ax_row[0].legend(fontsize=8)  # one legend per shape: the colours are the same in all three panels
    save_figure(fig, path)


# -- main -------------------------------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", ",").split(",") if x]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8b", help=f"comma-separated, of: {', '.join(SHAPES)}")
    p.add_argument("--lens", type=int_list, default=None, help=f"prompt lengths (default {LENS}; --tiny: 64,128)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; a+b = a then b patched")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy decode steps per row")
    p.add_argument("--mlp-chunk", type=int, default=None,
                   help="tokens per slice of the position-wise layers in the prefill (0 = unchunked; default "
                        "32768, --tiny 16)")
    p.add_argument("--param", action="append", default=[], help="VARIANT.KEY=VALUE (repeatable)")
    p.add_argument("--warmup-len", type=int, default=None, help="untimed warm-up row length, once per variant "
                                                                "(default: every row at its own length; 0 = none)")
    p.add_argument("--budget-s", type=float, default=None, help="skip rows that would start after this many seconds")
    p.add_argument("--no-predict-oom", action="store_true", help="run rows whose full KV cache cannot fit")
    p.add_argument("--append", action="store_true", help="merge into --out's rows (same shape/variant/n replaced)")
    p.add_argument("--resume", action="store_true", help="--append, and skip the rows --out already has as ok/oom "
                                                         "(rerun the same command after a time limit or a crash)")
    p.add_argument("--out", default=None, help=f"JSON path (default {OUT}; --tiny: {TINY_OUT}, never the results)")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (fp32): checks the script, not speed")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    lens = args.lens or ([64, 128] if args.tiny else LENS)
    args.mlp_chunk = (16 if args.tiny else 32768) if args.mlp_chunk is None else args.mlp_chunk
    variants = args.variants.split(",")
    params = parse_params(args.param, args.tiny)
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    bad = [s for s in shapes if s not in SHAPES and s != "tiny"]
    if bad:
        p.error(f"unknown shapes {bad}; known: {', '.join(SHAPES)}")
    unknown = [v for v in variants for name in v.split("+") if name != "exact" and name not in patchattn.VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; e.g. {', '.join(VARIANTS)}")
    env = environment(cuda, packages=("torch", "triton", "transformers", "patchattn"), date="day",
                      argv=["scripts/bench_longctx.py", *argv])
    meta = {**env, "commit": commit(), "dtype": str(dtype), "batch": 1, "new_tokens": args.new_tokens,
            "mlp_chunk": args.mlp_chunk, "params": params, "weights": "random (torch.manual_seed(0))"}
    out = Path(args.out or (TINY_OUT if args.tiny else OUT))
    old = load_rows(out) if args.append or args.resume else []
    done = {key(r) for r in old if r.get("status") in ("ok", "oom")} if args.resume else set()
    total = torch.cuda.get_device_properties(0).total_memory if cuda else None
    rows: list[dict] = []
    skipped: list[str] = []
    for shape in shapes:
        if all(key({"shape": shape, "variant": v, "n": n, "params": row_params(v, params)}) in done
               for n in lens for v in variants):
            print(f"{shape}: every row in {out} already (--resume)", flush=True)
            continue
        config = make_config(shape, args.tiny)
        model = build_model(config, device, dtype)
        weights = sum(t.numel() * t.element_size() for t in model.parameters())  # tied embeddings counted once
        print(f"{shape}: {weights / 2**30:.2f} GiB of weights, {dtype}, {device}", flush=True)
        warm = set()
        for n in lens:
            ids = torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
            for variant in variants:
                label = f"{shape} {variant} n={n}"
                base = {"shape": shape, "variant": variant, "n": n, "new_tokens": args.new_tokens,
                        "mlp_chunk": args.mlp_chunk, "weights_gb": round(weights / 2**30, 2),
                        "params": row_params(variant, params)}
                if key(base) in done:
                    print(f"  {label}: in {out} already (--resume)", flush=True)
                    continue
                if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                    skipped.append(label)
                    print(f"budget reached: {label} not run", flush=True)
                    continue
                need = predicted_need(config, variant, n + args.new_tokens, weights)
                if total and need and need > total and not args.no_predict_oom:
                    row = {**base, "status": "oom", "oom_phase": "predicted", "measured": False,
                           "note": f"weights + full bf16 KV cache + 4 x [n, hidden] activations = {need / 2**30:.1f} "
                                   f"GiB > {total / 2**30:.1f} GiB of GPU memory: not run",
                           "prefill_s": None, "decode_tok_s": None, "kv_bytes": None, "peak_gb": None,
                           "kv_bytes_full": full_kv_bytes(config, n + args.new_tokens)}
                else:
                    warmup_len = n if args.warmup_len is None else args.warmup_len
                    if (variant, warmup_len) not in warm and warmup_len:
                        wids = torch.randint(0, config.vocab_size, (1, warmup_len),
                                             generator=torch.Generator().manual_seed(1)).to(device)
                        w = run_row(model, config, wids, variant, params, args, cuda)
                        warm.add((variant, warmup_len))
                        print(f"  warm-up {shape} {variant} n={warmup_len}: {w['status']}", flush=True)
                        del wids
                    row = {**base, **run_row(model, config, ids, variant, params, args, cuda), "measured": True}
                row.update(env)
                row["commit"] = meta["commit"]
                rows.append(row)
                print(f"  {label}: {row['status']}{' (' + row['oom_phase'] + ')' if row['status'] == 'oom' else ''} "
                      f"prefill {row.get('prefill_s')} s, decode {row.get('decode_tok_s')} tok/s, "
                      f"kv {(row.get('kv_bytes') or 0) / 2**30:.3f} GiB, peak {row.get('peak_gb')} GB, "
                      f"approx layers {row.get('approx_layers')}"
                      + (f", {row['error']}" if row["status"] == "error" else ""), flush=True)
                save(out, {**meta, "skipped": skipped}, old, rows)
                if row["status"] == "error" and cuda and not cuda_usable():
                    raise SystemExit(f"{label}: the CUDA context is lost ({row['error']}); rows so far are in {out}; "
                                     "rerun the command with --resume (skip this row with --variants/--lens)")
            del ids
        del model
        free(cuda)
    save(out, {**meta, "skipped": skipped}, old, rows)
    print(f"\n{env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | {env['command']}")
    print(f"{'shape':>5} {'variant':>40} {'n':>8} | {'status':>6} {'prefill s':>9} {'tok/s':>7} {'KV GiB':>7} "
          f"{'peak GB':>7} {'approx':>6}")
    for r in rows:
        kv = f"{r['kv_bytes'] / 2**30:7.3f}" if r.get("kv_bytes") is not None else f"{'-':>7}"
        print(f"{r['shape']:>5} {series_name(r):>40} {r['n']:>8} | {r['status']:>6} {r.get('prefill_s')!s:>9} "
              f"{r.get('decode_tok_s')!s:>7} {kv} {r.get('peak_gb')!s:>7} {r.get('approx_layers')!s:>6}")
    return rows


if __name__ == "__main__":
    main()

"""`patchattn demo`: the main job — real SmolLM2-135M, shipped Shakespeare, original vs HyperAttention perplexity."""
from __future__ import annotations

import json
import platform

import torch
import transformers

from ._version import __version__
from .data import read_text
from .evaluation import perplexity
from .patching import patched
from .realweights import load_model

#: the published estimator (no sinks, 256 samples, every head approximated) and exact_tail=0: perplexity scores the
#: last tokens of each window, which an exact tail would compute exactly; the demo measures the estimator itself (the
#: effect of the tail and of exact retrieval heads on retrieval: benchmarks/results/longctx_defaults.json)
DEMO_PARAMS = {"min_seq_len": 1024, "block_size": 256, "sample_size": 256, "sink_tokens": 0, "exact_tail": 0,
               "retrieval_heads": 0.0}
#: same per-query budget (256 extra keys) with 16 of them spent on exact attention sinks: hyper's default (README)
LEVERS = {"sample_size": 240, "sink_tokens": 16}


def run_demo(model_name: str = "smollm2-135m", contexts=(2048, 4096, 8192), max_tokens: int = 8192,
             layers="last:8", params: dict | None = None, json_path: str | None = None) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)  # the table is wider than a default 80-column pipe
    params = {**DEMO_PARAMS, **(params or {})}
    model, tokenizer = load_model(model_name, dtype=torch.float32)
    text = read_text()
    rows, patched_layers = [], []
    for n in contexts:
        if n > model.config.max_position_embeddings:
            console.print(f"skipping context {n}: the model was trained to {model.config.max_position_embeddings}")
            continue
        console.print(f"context {n}: original")
        base = perplexity(model, tokenizer, text, context_length=n, max_tokens=max_tokens)
        with patched(model, "hyper", layers=layers, **params):
            patched_layers = model.config.patchattn[0]["layers"]
            console.print(f"context {n}: hyper on layers {patched_layers}")
            hyper = perplexity(model, tokenizer, text, context_length=n, max_tokens=max_tokens)
        with patched(model, "hyper", layers=layers, **{**params, **LEVERS}):
            console.print(f"context {n}: hyper + sinks on layers {patched_layers}")
            levers = perplexity(model, tokenizer, text, context_length=n, max_tokens=max_tokens)
        rows.append({"context": n, "tokens": base.tokens_scored, "ppl_original": base.ppl, "ppl_hyper": hyper.ppl,
                     "ppl_hyper_levers": levers.ppl, "tok_s_original": base.tokens_per_second,
                     "tok_s_hyper": hyper.tokens_per_second})

    table = Table(title=f"{model_name}: perplexity on shipped Shakespeare (exp mean NLL, fp32)")
    for col in ("context", "tokens", "original ppl", "hyper ppl (published)", "hyper + sinks ppl",
                "original tok/s", "hyper tok/s"):
        table.add_column(col, justify="right")
    change = lambda r, key: f"{r[key]:.2f} ({100 * (r[key] / r['ppl_original'] - 1):+.1f}%)"
    for r in rows:
        table.add_row(str(r["context"]), str(r["tokens"]), f"{r['ppl_original']:.2f}", change(r, "ppl_hyper"),
                      change(r, "ppl_hyper_levers"), f"{r['tok_s_original']:.0f}", f"{r['tok_s_hyper']:.0f}")
    console.print(table)
    console.print(f"hyper {params} on layers {patched_layers} of {model.config.num_hidden_layers} (levers: "
                  f"{LEVERS}); hyper runs where the context exceeds min_seq_len={params['min_seq_len']}; "
                  "tok/s is the PyTorch reference on this device (the Triton kernels need CUDA)")
    env = {"patchattn": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    console.print(f"environment: {env}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"model": model_name, "params": params, "levers": LEVERS, "layers": patched_layers,
                       "rows": rows, "env": env}, f, indent=2)
    return rows

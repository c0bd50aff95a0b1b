"""Retrieval heads: the KV heads a long prompt's answer is read through, found without training or data.

An approximate prefill (``hyper``, ``dhsa``) keeps single-needle retrieval but loses multi-key retrieval and variable
tracking: the heads that copy earlier tokens forward are the ones its error hurts. Those heads show themselves on a
copy task (RazorAttention, arXiv 2407.15891): on a random token sequence shown twice, a retrieval head's query in
the second copy attends to the same token in the first copy (echo) or to the one after it (induction). Each KV head
scores the largest such attention mass of its query heads; the top ``fraction`` of all KV heads of the given layers
are kept exact (``exact_kv_heads``) while the others are approximated (DuoAttention, arXiv 2410.10819, learns the
same split with training).

    patchattn.patch_model(model, "hyper")  # retrieval_heads=0.25: the search runs here, its result is saved
    heads = patchattn.retrieval_heads(model, 0.5)  # or by hand, for any share
    patchattn.patch_model(model, "hyper", exact_kv_heads=heads)

Below patching (variants call it when they are patched), so ``layers`` are layer indices here.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .capture import capture_attention_inputs


def _copy_task_ids(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    """``[1, 2 * length]``: ``length`` random tokens twice. Drawn from the middle of the vocabulary: special and
    byte tokens sit at its ends in every supported tokenizer."""
    low, high = min(1000, vocab_size // 10), max(int(vocab_size * 0.9), min(1000, vocab_size // 10) + 1)
    generator = torch.Generator().manual_seed(seed)
    block = torch.randint(low, high, (length,), generator=generator)
    return torch.cat([block, block])[None]


@torch.inference_mode()
def retrieval_head_scores(model, *, length: int = 512, seed: int = 0) -> dict[int, torch.Tensor]:
    """``{layer: [kv_heads]}`` copy scores in [0, 2]: for each KV head, the largest mean (over its query heads)
    attention mass that a query in the second copy puts on its own token and the next one in the first copy."""
    if length < 2:
        raise ValueError(f"retrieval_head_scores: length must be at least 2 tokens, got {length}")
    vocab_size = model.config.get_text_config().vocab_size
    ids = _copy_task_ids(vocab_size, length, seed).to(model.device)
    training = model.training
    model.eval()  # no dropout in the scores
    try:
        with capture_attention_inputs(model) as store:
            model(ids, use_cache=False, logits_to_keep=1)
    finally:
        model.train(training)
    rows = torch.arange(length + 1, 2 * length, device=model.device)  # second-copy queries with a next token
    echo = rows - length
    scores = {}
    for layer, (query, key, _value, _mask, kwargs) in sorted(store.items()):
        hk = key.shape[1]
        q = query[0, :, rows].float()  # [h, r, d]
        k = key[0].float().repeat_interleave(q.shape[0] // hk, dim=0)  # [h, n, d]
        s = torch.matmul(q, k.transpose(-1, -2)) * kwargs.get("scaling", q.shape[-1] ** -0.5)
        if kwargs.get("softcap") is not None:
            s = torch.tanh(s / kwargs["softcap"]) * kwargs["softcap"]
        s = s.masked_fill(torch.arange(k.shape[1], device=s.device) > rows[:, None], float("-inf"))
        p = s.softmax(dim=-1)
        r = torch.arange(len(rows), device=s.device)
        mass = (p[:, r, echo] + p[:, r, echo + 1]).mean(dim=-1)  # [h]
        scores[layer] = mass.reshape(hk, -1).max(dim=-1).values.cpu()
    return scores


def retrieval_heads(model, fraction: float = 0.25, *, layers: Iterable[int] | None = None, length: int = 512,
                    seed: int = 0) -> dict[int, list[int]]:
    """The top ``fraction`` of the KV heads of ``layers`` (indices; all by default) by :func:`retrieval_head_scores`,
    as ``{layer: [kv_head, ...]}`` for a prefill variant's ``exact_kv_heads``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"retrieval_heads: fraction is a share of the KV heads, in [0, 1]; got {fraction}")
    num_layers = model.config.get_text_config().num_hidden_layers
    chosen_layers = set(range(num_layers) if layers is None else (i % num_layers for i in layers))
    found = retrieval_head_scores(model, length=length, seed=seed)
    if chosen_layers - found.keys():
        raise RuntimeError(f"retrieval_heads: layers {sorted(chosen_layers - found.keys())} ran no exact attention on "
                           "the copy task (a variant patched there bypasses it); pass exact_kv_heads by hand")
    scores = {layer: s for layer, s in found.items() if layer in chosen_layers}
    ranked = sorted(((float(s[h]), layer, h) for layer, s in scores.items() for h in range(len(s))), reverse=True)
    keep = round(fraction * len(ranked))
    heads: dict[int, list[int]] = {}
    for _, layer, h in ranked[:keep]:
        heads.setdefault(layer, []).append(h)
    return {layer: sorted(hs) for layer, hs in sorted(heads.items())}

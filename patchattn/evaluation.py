"""Sliding-window perplexity, the yardstick for comparing attention variants on the same model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import read_text


@dataclass
class PerplexityResult:
    ppl: float  # exp(nll_mean), the standard definition
    ppl_exp2: float  # 2 ** nll_mean: the HyperAttention paper's form (natural-log NLL, base 2), kept for comparison
    nll_mean: float  # mean negative log-likelihood per scored token, in nats
    tokens_scored: int
    windows: int
    seconds: float
    tokens_per_second: float  # scored tokens per second of wall time
    context_length: int


def _windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, n_scored)`` per window, scoring each token at most once (HF's recipe).

    A window scores its last ``n_scored`` tokens: those not scored by the previous window, except
    the window's first token, which has no context inside it.
    """
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        n_scored = min(end - prev_end, end - begin - 1)
        if n_scored > 0:
            out.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _batches(windows: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Group consecutive windows of identical shape (length, n_scored): only the first and last differ."""
    batches: list[list[tuple[int, int, int]]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0], last[0][2]) == (w[1] - w[0], w[2]):
            last.append(w)
        else:
            batches.append([w])
    return batches


def _scored_nll(model, ids: torch.Tensor, n_scored: int, chunk: int) -> torch.Tensor:
    """Summed fp32 NLL of the last ``n_scored`` tokens of each row of ``ids``.

    The lm_head is applied in chunks of ``chunk`` positions to the decoder's last hidden state, so
    the full ``tokens x vocab`` logits never exist (262k vocab x 8k tokens would be 8 GiB). The
    model's own forward still produces the last position's logits (``logits_to_keep=1``); they
    cross-check this shortcut against any logit post-processing the model applies.
    """
    captured = {}
    hook = model.get_decoder().register_forward_hook(lambda mod, args, out: captured.update(h=out[0]))
    try:
        reference = model(input_ids=ids, logits_to_keep=1, use_cache=False).logits.float()
    finally:
        hook.remove()
    hidden = captured["h"]
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def logits(h: torch.Tensor) -> torch.Tensor:  # same ops, same dtype as the model's forward
        z = head(h)
        return (torch.tanh(z / cap) * cap if cap else z).float()

    if not torch.allclose(logits(hidden[:, -1:]), reference, rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"{type(model).__name__} post-processes its logits in a way perplexity() does not replicate")

    hidden = hidden[:, -n_scored - 1 : -1]  # position t predicts token t + 1
    targets = ids[:, -n_scored:]
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for s in range(0, n_scored, chunk):
        logprobs = torch.log_softmax(logits(hidden[:, s : s + chunk]), dim=-1)
        total -= logprobs.gather(-1, targets[:, s : s + chunk, None]).sum().double()
    return total


def perplexity(
    model,
    tokenizer,
    text: str | None = None,
    *,
    context_length: int = 2048,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    logits_chunk: int = 1024,
    bos_per_window: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (default: the shipped Shakespeare), ``exp(mean NLL)``.

    The text is tokenised once without special tokens; if the tokenizer has a BOS token it is
    prepended once at the very start (so the first word is scored as a document start) and never
    inside later windows. ``stride=None`` uses non-overlapping windows of ``context_length``
    tokens, scoring all but each window's first token. With ``stride < context_length`` each
    window scores only its last ``stride`` tokens, so every token is scored exactly once and with
    at least ``context_length - stride`` tokens of context. ``max_tokens`` truncates the token
    stream (BOS included). ``batch_size`` windows of equal shape run together; ``logits_chunk``
    bounds how many positions' logits exist at once. Inputs go to ``device`` (default: the
    model's). ``tokens_per_second`` counts scored tokens.

    ``bos_per_window=True`` starts every window with BOS instead (``context_length - 1`` text tokens
    each; ``max_tokens`` then counts text tokens only), for models that only ever saw sequences
    start with it: Gemma-3-270M scores 2,113 at 4k on Shakespeare windows without their BOS and
    about 40 with it (measured on the H200), while SmolLM2 barely notices.
    """
    stride = context_length if stride is None else stride
    if not 0 < stride <= context_length:
        raise ValueError(f"need 0 < stride <= context_length, got {stride=} {context_length=}")
    ids = tokenizer(read_text() if text is None else text, add_special_tokens=False, verbose=False).input_ids
    bos = tokenizer.bos_token_id
    if bos_per_window and bos is None:
        raise ValueError("bos_per_window=True needs a tokenizer with a BOS token; this one has none")
    if bos is not None and not bos_per_window:
        ids = [bos, *ids]
    ids = torch.tensor(ids[:max_tokens], dtype=torch.long)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prefix = torch.tensor([bos] if bos_per_window else [], dtype=torch.long)
    windows = _windows(len(ids), context_length - len(prefix), min(stride, context_length - len(prefix)))
    if not windows:
        raise ValueError(f"text is too short: {len(ids)} tokens")

    was_training = model.training
    model.eval()
    nll, scored = 0.0, 0
    start = time.perf_counter()
    try:
        with torch.inference_mode(), \
                tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress) as bar:
            for batch in _batches(windows, batch_size):
                x = torch.stack([torch.cat([prefix, ids[b:e]]) for b, e, _ in batch]).to(device)
                n = batch[0][2]
                nll += _scored_nll(model, x, n, logits_chunk).item()
                scored += n * len(batch)
                bar.update(len(batch))
                bar.set_postfix(ppl=f"{math.exp(nll / scored):.3f}")
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    mean = nll / scored
    return PerplexityResult(
        ppl=math.exp(mean),
        ppl_exp2=2.0**mean,
        nll_mean=mean,
        tokens_scored=scored,
        windows=len(windows),
        seconds=seconds,
        tokens_per_second=scored / seconds,
        context_length=context_length,
    )

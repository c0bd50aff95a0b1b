"""DHSA (Xiong et al., arXiv 2510.24606) in plain PyTorch, token by token: the specification the fast selection
(``select.py``) and the Triton kernel are tested against.

The method, for causal prefill:
  * the keys are cut into chunks, the queries into query blocks; each is represented by its mean times the square
    root of its length (the paper's length-normalised aggregation: a plain mean ignores how much a chunk holds, a
    sum over-weights long chunks);
  * chunk-level similarity ``S_c[i, c] = q_rep[i] . k_rep[c]`` is upsampled to tokens (every key of chunk ``c``
    gets ``S_c[i, c]``) and each query block keeps the ``budget`` best-scoring earlier keys;
  * on top of the budget every query block always keeps its own chunks (the causal diagonal), the chunks within
    ``local_window`` keys before it, and the chunks holding the first ``sink_tokens`` keys;
  * attention is exact softmax attention restricted to the kept keys.

Simplification (documented in the variant): the paper places chunk boundaries with a learned boundary predictor;
here chunks have a fixed size, so the kept set is a union of whole chunks, which is what a block-sparse kernel
runs on. With fixed chunks the upsampled top-``budget`` tokens are whole chunks when ``budget`` is a multiple of
the chunk size, so the budget is rounded down to whole chunks. Selection is per query head (GQA heads share K/V,
not their kept sets).

Shapes: q ``[b, h, n, d]``, k/v ``[b, hk, n, d]`` (``h % hk == 0``, K/V never expanded), ``key_valid`` ``[b, n]``
bool (left padding) or None.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class DhsaSettings:
    chunk_size: int = 64
    query_block: int = 64
    #: keys kept per query block beyond the forced set, rounded down to whole chunks
    budget_tokens: int = 2048
    #: if > 0: keep this fraction of each query block's causal prefix instead of ``budget_tokens``
    budget_fraction: float = 0.0
    local_window: int = 256
    #: not in the paper: measured on SmolLM2-135M at 4k, dropping the first chunk's attention sink is what costs
    #: quality (late-layer output error 0.21-0.27 without, < 0.013 with 64 sink tokens)
    sink_tokens: int = 64

    def __post_init__(self):
        if self.chunk_size < 1 or self.query_block < 1:
            raise ValueError(f"chunk_size and query_block must be positive, got {self.chunk_size}, {self.query_block}")
        if self.budget_tokens < 0 or self.local_window < 0 or self.sink_tokens < 0:
            raise ValueError("budget_tokens, local_window and sink_tokens must be >= 0")
        if not 0.0 <= self.budget_fraction <= 1.0:
            raise ValueError(f"budget_fraction must be in [0, 1], got {self.budget_fraction}")

    def budget_chunks(self, block_end: int) -> int:
        """Chunks selected for a query block whose last query sees ``block_end`` keys."""
        if self.budget_fraction > 0:
            return int(self.budget_fraction * block_end) // self.chunk_size
        return self.budget_tokens // self.chunk_size


def representations(x: torch.Tensor, size: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean times sqrt(length) of every block of ``size`` consecutive (valid) rows of ``x [b, H, n, d]``.
    Returns fp32 ``[b, H, blocks, d]`` and the valid lengths ``[b, blocks]`` (a block without valid rows is 0)."""
    b, _, n, _ = x.shape
    reps, lens = [], []
    for s in range(0, n, size):
        rows = x[:, :, s:s + size].float()
        w = torch.ones(b, rows.shape[2], device=x.device) if valid is None else valid[:, s:s + size].float()
        length = w.sum(-1)  # [b]
        mean = (rows * w[:, None, :, None]).sum(2) / length.clamp_min(1)[:, None, None]
        reps.append(mean * length.sqrt()[:, None, None])
        lens.append(length)
    return torch.stack(reps, 2), torch.stack(lens, 1)


def reference_keep_mask(q, k, settings: DhsaSettings, key_valid=None) -> torch.Tensor:
    """The kept (query, key) pairs ``[b, h, n, n]`` bool, causal and restricted to valid keys, computed as the
    paper describes: chunk scores upsampled to tokens, top-``budget`` tokens per query block, rounded out to whole
    chunks (the granularity a block-sparse kernel attends at), plus the forced chunks."""
    b, h, n, _ = q.shape
    hk = k.shape[1]
    C, B, W, S = settings.chunk_size, settings.query_block, settings.local_window, settings.sink_tokens
    q_rep, _ = representations(q, B, key_valid)
    k_rep, k_len = representations(k, C, key_valid)
    k_rep = k_rep.repeat_interleave(h // hk, dim=1)  # the query head's own KV head
    chunk_scores = q_rep @ k_rep.transpose(-1, -2)  # [b, h, nqb, nc]
    chunk_scores = chunk_scores.masked_fill((k_len == 0)[:, None, None, :], NEG_INF)
    token_scores = chunk_scores.repeat_interleave(C, dim=-1)[..., :n]  # upsampled: [b, h, nqb, n]
    chunk_of = torch.arange(n, device=q.device) // C
    nc = int(chunk_of[-1]) + 1
    keep = torch.zeros(b, h, n, n, dtype=torch.bool, device=q.device)
    for i, s in enumerate(range(0, n, B)):
        e = min(n, s + B)
        forced_tokens = torch.zeros(n, dtype=torch.bool, device=q.device)
        forced_tokens[max(0, s - W):e] = True
        forced_tokens[:min(S, e)] = True
        forced_chunks = torch.zeros(nc, dtype=torch.bool, device=q.device)
        forced_chunks[chunk_of[forced_tokens]] = True
        chunk_end = (chunk_of + 1) * C
        candidate = (chunk_end <= s) & ~forced_chunks[chunk_of]
        budget = settings.budget_chunks(e) * C
        kept_chunks = forced_chunks.expand(b, h, -1).clone()
        if budget > 0:
            scores = token_scores[:, :, i].masked_fill(~candidate, NEG_INF)
            top, pos = scores.topk(min(budget, n), dim=-1)
            picked = chunk_of[pos].masked_fill(~torch.isfinite(top), nc)  # slot nc: "nothing picked"
            hits = torch.zeros(b, h, nc + 1, dtype=torch.bool, device=q.device).scatter_(-1, picked, True)
            kept_chunks |= hits[..., :nc]
        keep[:, :, s:e] = kept_chunks[..., chunk_of][:, :, None, :]
    causal = torch.arange(n, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None]
    keep &= causal
    if key_valid is not None:
        keep &= key_valid[:, None, None, :]
    return keep


def masked_attention(q, k, v, scaling: float, keep_rows: Callable[[int, int], torch.Tensor], *, softcap=None,
                     rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over the kept keys only. ``keep_rows(r0, r1)`` gives the kept pairs of query rows
    ``[r0, r1)`` as ``[b, h, r1 - r0, n]`` bool (causality and validity included); rows are processed ``rows`` at a
    time so the scores never exist for the whole sequence. Rows with no kept key give 0 and lse -inf.
    Returns ``(out [b, h, n, d] in q's dtype, lse [b, h, n] fp32)``."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    g = h // hk
    kf, vf = k.float(), v.float()
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        qg = q[:, :, r0:r1].float().reshape(b, hk, g, r1 - r0, d)
        s = (qg @ kf.unsqueeze(2).transpose(-1, -2)) * scaling  # [b, hk, g, r, n]
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~keep_rows(r0, r1).reshape(b, hk, g, r1 - r0, n), NEG_INF)
        m = torch.logsumexp(s, dim=-1)
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - safe.unsqueeze(-1))
        out[:, :, r0:r1] = (p @ vf.unsqueeze(2)).reshape(b, h, r1 - r0, -1).to(q.dtype)
        lse[:, :, r0:r1] = m.reshape(b, h, r1 - r0)
    return out, lse


def dhsa_attention(q, k, v, scaling=None, settings: DhsaSettings = DhsaSettings(), *, key_valid=None, softcap=None):
    """Reference DHSA prefill: the paper's token-level selection, then exact attention over the kept keys.
    Materialises an ``[b, h, n, n]`` mask: for tests at small ``n``. Returns ``(out, lse)``."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    scaling = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    keep = reference_keep_mask(q, k, settings, key_valid)
    return masked_attention(q, k, v, scaling, lambda r0, r1: keep[:, :, r0:r1], softcap=softcap)


__all__ = ["DhsaSettings", "representations", "reference_keep_mask", "masked_attention", "dhsa_attention"]

"""`act`: the Attention Calibration Technique (Yu et al., "Unveiling and Harnessing Hidden Attention Sinks: Enhancing
Large Language Models without Training through Attention Calibration", ICML 2024, arXiv 2406.15765; code
github.com/GATECH-EIC/ACT). Training-free.

The method. Besides the first token, some later tokens of little meaning of their own soak up attention in some
heads ("hidden attention sinks"), and in some heads that costs accuracy. For each head chosen by a search on
calibration data (:func:`patchattn.head_search.search_heads`), and for each input, ACT marks as sinks the keys
``S`` whose mean received attention exceeds θ, damps their attention by β and hands the removed mass to the other
keys in proportion to their attention::

    A'_is = β·A_is  (s ∈ S)        A'_ij = A_ij + (1 − β)·σ_i·A_ij / Σ_{j'∉S} A_ij'  (j ∉ S),   σ_i = Σ_{s∈S} A_is

Choices (the paper plus its released code, whose scripts use β = 0.4, θ = 0.1):

* mean received attention of key j = (Σ_i A_ij) / (number of queries that can see j), over the whole current
  sequence (so ACT is not causal: a later query can change the sink set, and with it every row's output);
* ``threshold="absolute"`` compares that mean with θ, as the released code does; ``"relative"`` compares it with
  θ/N (N = tokens in the sequence), the same criterion made independent of the length;
* the first token of the sequence (the first non-padding key) is never calibrated: it is the usual, useful sink;
* a query row whose visible keys are all sinks has nowhere to send the mass and is left unchanged.

Without materialising the attention map (the fused path, :func:`act_attention`), for the calibrated heads only:

1. column statistics: one pass over blocks of ``block_size`` query rows computes each row's scores against all
   keys, its exact log-sum-exp (LSE), and adds the row's probabilities to per-key sums. That costs one extra
   ``QKᵀ`` for those heads (no ``PV``) and ``O(block_size · n)`` memory instead of ``O(n²)``. (A CUDA kernel would
   hand out the LSE with its output; CPU SDPA does not, so it comes from this pass.)
2. the few sink columns with the row LSE: ``p_is = exp(s_is − LSE_i)``, ``σ_i = Σ_s p_is``, ``o_S = Σ_s p_is v_s``.
3. ``ô``: exact fused attention (SDPA) over every key but the sinks (see :func:`_attend` for how the sinks are
   left out without a ``[q, k]`` mask), and the calibrated output ``o' = β·o_S + (1 − βσ_i)·ô``.

Since ``ô = (o − o_S)/(1 − σ_i)`` with ``o`` the exact output, this is ``o' = β·o_S + (1 − βσ)/(1 − σ)·(o − o_S)``,
the calibrated map times V (:func:`reference_act`), up to float rounding. Computing ``o − o_S`` from the exact
output instead loses precision to cancellation when a hidden sink holds nearly all of a row (measured: 2e-3 error
at σ = 0.9999 in fp32), hence the second fused call. ACT is a per-row change (as a logit bias on the sink columns
it would be ``log(β(1 − σ_i)/(1 − βσ_i))``, different in every row), not a constant bias.

Decode (one query over the KV cache) and chunked prefill: the per-key attention sums and visibility counts of
every query processed so far are kept per generation cache (the cache object is read from the attention module's
call), the new rows are added, and the sinks are found again from the updated means, which is what the reference
computes for those rows over the map of every query seen so far. Rows already in the cache are not revisited. Where
the statistics cannot be matched to the cache (a cache not built through this patched model, a cropped cache, a
sliding-window cache that has rolled over), the call uses exact attention (logged once). Beam search reorders the
cache but not these statistics: use greedy or sampling decoding with ``act``.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..attention import exact_attention
from ..logging_utils import warn_once
from .base import MODIFIER, Variant, VariantParams, check_heads_fit, handoff, normalize_heads, param, register_variant

#: :func:`handoff` key: the generation cache of this call, put there by the forward pre-hook, popped in ``attention``
CACHE_KEY = "cache"


@dataclasses.dataclass
class ActParams(VariantParams):
    heads: dict | None = param(None, help="{layer: [head, ...]} to calibrate (from head_search.search_heads); "
                                          "others run exact")
    beta: float = param(0.4, low=0.0, high=1.0, help="factor on the attention of the hidden sinks")
    theta: float = param(0.1, low=0.0, help="a key is a sink when its mean received attention exceeds this")
    threshold: str = param("absolute", choices=("absolute", "relative"),
                           help="compare the mean with theta, or with theta / (tokens in the sequence)")
    block_size: int = param(256, low=1, help="query rows per block of the column-statistics pass")

    def validate(self) -> None:
        super().validate()
        self.heads = normalize_heads(self.heads, "act", "heads")


# -- shared pieces ---------------------------------------------------------------------------------------------------
def _scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    return torch.tanh(s / softcap) * softcap if softcap is not None else s


def _causal_rows(rows: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """Causal visibility ``[len(rows), k]`` of query rows ``rows`` (the last query sees the last key)."""
    return torch.arange(k_len, device=rows.device) <= (rows + (k_len - q_len))[:, None]


def _visible(mask: torch.Tensor | None, i0: int, i1: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """Rows ``i0:i1`` of the visibility mask, ``[b|1, h|1, i1-i0, k]`` bool."""
    if mask is None:
        return _causal_rows(torch.arange(i0, i1, device=device), q_len, k_len)[None, None]
    return mask[:, :, i0:i1]


def sink_columns(colsum: torch.Tensor, count: torch.Tensor, theta: float, threshold: str) -> torch.Tensor:
    """Hidden sinks ``[b, h, k]`` from summed received attention and the number of queries that see each key:
    mean above the threshold, seen by some query, and not the first token (the first key any query sees)."""
    seen = count > 0
    mean = colsum / count.clamp(min=1)
    first = seen.int().argmax(dim=-1, keepdim=True)
    limit = theta / seen.sum(dim=-1, keepdim=True).clamp(min=1) if threshold == "relative" else theta
    not_first = torch.arange(colsum.shape[-1], device=colsum.device) != first
    return seen & (mean > limit) & not_first


def _check_mask(mask: torch.Tensor | None) -> None:
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"act expects a boolean attention mask (or None for causal), got {mask.dtype}")


# -- the literal reference -------------------------------------------------------------------------------------------
def reference_act(query, key, value, attention_mask, *, scaling: float, heads: Sequence[int], beta: float = 0.4,
                  theta: float = 0.1, threshold: str = "absolute", softcap: float | None = None):
    """ACT on the materialised map: softmax, column means, sinks, damp and redistribute, times V. The test oracle,
    and the weights of ``output_attentions``. Returns ``(out [b, q, h, d], weights [b, h, q, k])`` in fp32."""
    attn, visible = _attention_map(query, key, attention_mask, scaling=scaling, softcap=softcap)
    index = torch.as_tensor(heads, dtype=torch.long, device=query.device)
    sinks = sink_columns(attn.sum(dim=-2), visible.sum(dim=-2).float(), theta, threshold)[:, index]
    attn = _calibrate_rows(attn, visible, sinks, index, beta)
    v = value.repeat_interleave(query.shape[1] // key.shape[1], dim=1).float()
    return torch.matmul(attn, v).transpose(1, 2), attn


def _attention_map(query, key, attention_mask, *, scaling: float, softcap: float | None):
    """Softmax rows ``[b, h, q, k]`` (fp32; rows that see nothing stay 0) and the visibility they were taken over."""
    _check_mask(attention_mask)
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    k = key.repeat_interleave(h // key.shape[1], dim=1)
    visible = _visible(attention_mask, 0, q_len, q_len, k_len, query.device).expand(b, h, q_len, k_len)
    scores = _scores(query, k, scaling, softcap).masked_fill(~visible, -math.inf)
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0), visible


def _calibrate_rows(attn, visible, sinks, heads: torch.Tensor, beta: float) -> torch.Tensor:
    """Damp the sink columns ``sinks [b, len(heads), k]`` of the rows ``attn [b, h, q, k]`` by beta in ``heads`` and
    hand the removed mass to the other visible keys in proportion; rows with nowhere to send it stay unchanged."""
    a, sinks = attn[:, heads], sinks[:, :, None, :]
    mass = (a * sinks).sum(dim=-1, keepdim=True)  # σ_i
    others = a * ~sinks
    share = others / others.sum(dim=-1, keepdim=True)  # each non-sink key's share of the non-sink attention
    calibrated = torch.where(sinks, beta * a, a + (1 - beta) * mass * share)
    has_rest = (visible[:, heads] & ~sinks).any(dim=-1, keepdim=True)
    out = attn.clone()
    out[:, heads] = torch.where(has_rest, calibrated, a)
    return out


# -- the fused path --------------------------------------------------------------------------------------------------
@dataclass
class SinkStats:
    """Per-key attention summed over every query row so far (``[b, h_cal, k]``) and how many rows saw each key
    (``[b, 1|h_cal, k]``): enough to find the sinks again when new rows arrive."""

    colsum: torch.Tensor
    count: torch.Tensor

    @property
    def keys(self) -> int:
        return self.colsum.shape[-1]


def column_stats(query, key, attention_mask, *, scaling: float, softcap: float | None = None,
                 block_size: int = 256):
    """``(colsum [b, h, k], count [b, 1|h, k], lse [b, h, q])`` for same-head ``query``/``key``, one block of query
    rows at a time: each row's exact log-sum-exp, and its probabilities added to the per-key sums (fp32)."""
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    colsum = torch.zeros(b, h, k_len, dtype=torch.float32, device=query.device)
    lse = torch.empty(b, h, q_len, dtype=torch.float32, device=query.device)
    for i0 in range(0, q_len, block_size):
        i1 = min(i0 + block_size, q_len)
        visible = _visible(attention_mask, i0, i1, q_len, k_len, query.device)
        scores = _scores(query[:, :, i0:i1], key, scaling, softcap).masked_fill(~visible, -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)
        row_lse = torch.where(torch.isfinite(row_lse), row_lse, 0.0)  # rows that see nothing add nothing
        colsum += torch.exp(scores - row_lse[..., None]).sum(dim=-2)
        lse[:, :, i0:i1] = row_lse
    if attention_mask is None:
        rows = torch.arange(q_len, device=query.device)
        count = _causal_rows(rows, q_len, k_len).sum(dim=0).float()[None, None]
    else:
        count = attention_mask.sum(dim=-2).float()
    return colsum, count, lse


def act_attention(query, key, value, attention_mask, *, scaling: float, heads: torch.Tensor, beta: float,
                  theta: float, threshold: str = "absolute", softcap: float | None = None, block_size: int = 256,
                  prior: SinkStats | None = None, exact: Callable[[], torch.Tensor] | None = None):
    """ACT without the attention map. ``heads``: the calibrated query heads (long tensor). ``prior``: statistics of
    the query rows before these (the cached prefix), whose keys are the first ``prior.keys`` of ``key``. ``exact``:
    returns exact attention ``[b, q, h, d]`` for all heads (default: :func:`_attend`). Returns
    ``(out [b, q, h, d], stats)``, the statistics now including these rows."""
    _check_mask(attention_mask)
    b, h, q_len, d = query.shape
    k_len = key.shape[2]
    kv = heads // (h // key.shape[1])
    qs, ks, vs = query[:, heads], key[:, kv], value[:, kv]
    mask = attention_mask
    if mask is not None and mask.shape[1] > 1:
        mask = mask[:, heads]
    colsum, count, lse = column_stats(qs, ks, mask, scaling=scaling, softcap=softcap, block_size=block_size)
    if prior is not None:
        pad = k_len - prior.keys
        colsum = colsum + nn.functional.pad(prior.colsum, (0, pad))
        count = count + nn.functional.pad(prior.count, (0, pad))
    stats = SinkStats(colsum, count)
    if exact is None:
        out = _attend(query, key, value, attention_mask, scaling, softcap=softcap).transpose(1, 2).contiguous()
    else:
        out = exact()
    sinks = sink_columns(colsum, count, theta, threshold)  # [b, hs, k]
    width = int(sinks.sum(dim=-1).max())
    if width == 0:
        return out, stats
    # the few sink columns: indices [b, hs, m], padded with non-sinks where a (batch row, head) has fewer
    idx = sinks.float().topk(width, dim=-1).indices
    real = sinks.gather(-1, idx)
    rows = torch.arange(q_len, device=query.device)
    if mask is None:
        visible = idx[:, :, None, :] <= (rows + (k_len - q_len))[None, None, :, None]
        n_visible = (rows + (k_len - q_len) + 1).float()[None, None]
    else:
        visible = mask.expand(b, qs.shape[1], q_len, k_len).gather(-1, idx[:, :, None, :].expand(-1, -1, q_len, -1))
        n_visible = mask.sum(dim=-1).float()
    visible = visible & real[:, :, None, :]
    p = torch.exp(_scores(qs, ks.gather(2, idx[..., None].expand(-1, -1, -1, d)), scaling, softcap)
                  - lse[..., None]).masked_fill(~visible, 0.0)
    sigma = p.sum(dim=-1, keepdim=True)  # σ_i
    o_sinks = torch.matmul(p, vs.gather(2, idx[..., None].expand(-1, -1, -1, d)).float())  # o_S
    o_rest = _attend(qs, ks, vs, mask, scaling, softcap=softcap, exclude=sinks).float()  # (o − o_S) / (1 − σ)
    calibrated = beta * o_sinks + (1 - beta * sigma) * o_rest
    has_rest = (n_visible - visible.sum(dim=-1))[..., None] > 0
    o = out[:, :, heads].transpose(1, 2)
    out[:, :, heads] = torch.where(has_rest, calibrated.to(out.dtype), o).transpose(1, 2)
    return out, stats


def _attend(query, key, value, attention_mask, scaling, *, softcap=None, exclude=None):
    """Exact attention ``[b, h, q, d]`` (fused SDPA unless ``softcap``), causal when the mask is None (the last query
    sees the last key), over every key except those in ``exclude`` ``[b, h, k]``.

    Excluding keys without a ``[q, k]`` mask: one extra coordinate, 1 in every query and −1e30/scaling in the
    excluded keys, gives those keys a −1e30 logit for every query (weight exactly 0) and leaves the others' logits
    unchanged; the fused kernel and its causal fast path still apply. (The CPU kernel wants one head size for Q, K
    and V, so all three are padded by 8.) Softcap would bound that logit, so with softcap the scores are
    materialised, as exact attention does for softcap.
    """
    b, h, q_len, d = query.shape
    k_len = key.shape[2]
    group = h // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    if softcap is not None:
        visible = _visible(attention_mask, 0, q_len, q_len, k_len, query.device)
        if exclude is not None:
            visible = visible & ~exclude[:, :, None, :]
        scores = _scores(query, key, scaling, softcap).masked_fill(~visible, -math.inf)
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        return torch.matmul(weights, value.float()).to(query.dtype)
    if exclude is not None:
        pad = lambda t: nn.functional.pad(t, (0, 8))
        query, key, value = pad(query), pad(key), pad(value)
        query[..., d] = 1
        key[..., d] = exclude.to(key.dtype) * (-1e30 / scaling)
    causal = attention_mask is None and q_len > 1
    if causal and q_len != k_len:  # chunked prefill without a mask: SDPA's is_causal would align top-left
        attention_mask, causal = _causal_rows(torch.arange(q_len, device=query.device), q_len, k_len), False
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                     is_causal=causal, scale=scaling)
    return out[..., :d]


# -- the variant -----------------------------------------------------------------------------------------------------
@register_variant
class ActAttention(Variant):
    name = "act"
    description = ("ACT (arXiv 2406.15765): damp hidden attention sinks by beta in searched heads and redistribute "
                   "their mass; training-free, exact attention plus the sink columns.")
    Params = ActParams
    #: composes with nothing: it computes its own attention over every key (column statistics of the exact map),
    #: so a prefill approximation under it would not run, and a cache variant's partial keys would skew its sinks
    role = MODIFIER

    def __init__(self, params: ActParams, layer_idx: int):
        super().__init__(params, layer_idx)
        self.register_buffer("head_index", self._head_index(), persistent=False)
        self._stats: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # generation cache -> SinkStats
        self._hook = None

    def _head_index(self) -> torch.Tensor | None:
        heads = self.params.heads.get(self.layer_idx, [])
        return torch.tensor(heads, dtype=torch.long) if heads else None

    def reset_buffers(self, attention_module: nn.Module) -> None:
        index = self._head_index()
        self.head_index = None if index is None else index.to(next(attention_module.parameters()).device)

    def attach(self, attention_module: nn.Module) -> None:
        check_heads_fit(self.params.heads, attention_module, "act", "heads")
        if self.head_index is not None:
            self._hook = attention_module.register_forward_pre_hook(self._take_cache, with_kwargs=True)

    def detach(self, attention_module: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = None
        handoff(attention_module).pop(CACHE_KEY, None)
        self._stats = weakref.WeakKeyDictionary()

    @staticmethod
    def _take_cache(module, args, kwargs):
        handoff(module)[CACHE_KEY] = kwargs.get("cache", kwargs.get("past_key_values"))
        return None

    def attention(self, module, query, key, value, attention_mask, *, scaling, dropout=0.0, softcap=None,
                  output_attentions=False, **kwargs):
        cache = handoff(module).pop(CACHE_KEY, None)

        def exact(weights: bool = output_attentions):
            return exact_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                   softcap=softcap, output_attentions=weights, **kwargs)

        if self.head_index is None:
            return exact()
        if dropout:
            warn_once("act: attention dropout (training mode) is not calibrated; using exact attention")
            return exact()
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            warn_once(f"act: {attention_mask.dtype} attention masks are not supported; using exact attention")
            return exact()
        p = self.params
        q_len, k_len = query.shape[2], key.shape[2]
        prior = None
        if q_len != k_len:
            prior = self._stats.get(cache) if cache is not None else None
            if prior is None or prior.keys != k_len - q_len or prior.colsum.shape[0] != query.shape[0]:
                warn_once("act: no sink statistics match this cache (not built by the patched model, cropped, or a "
                          "rolled-over sliding window); those calls use exact attention")
                return exact()
        out, stats = act_attention(query, key, value, attention_mask, scaling=scaling, heads=self.head_index,
                                   beta=p.beta, theta=p.theta, threshold=p.threshold, softcap=softcap,
                                   block_size=p.block_size, prior=prior, exact=lambda: exact(False)[0])
        if cache is not None:
            self._stats[cache] = stats
        weights = None
        if output_attentions:  # these rows of the calibrated map, with the sinks of every row seen so far
            attn, visible = _attention_map(query, key, attention_mask, scaling=scaling, softcap=softcap)
            sinks = sink_columns(stats.colsum, stats.count, p.theta, p.threshold)
            weights = _calibrate_rows(attn, visible, sinks, self.head_index, p.beta).to(query.dtype)
        return out, weights


# -- per-head effect (used by patchattn.head_search) -------------------------------------------------------------
def head_changes(query, key, value, attention_mask, *, scaling: float, softcap: float | None = None,
                 **act) -> torch.Tensor:
    """``[heads]`` relative change ``‖o' − o‖ / ‖o‖`` of each head's output when that head alone is calibrated
    (0 exactly where the head has no hidden sink), from one layer's attention inputs."""
    heads = torch.arange(query.shape[1], device=query.device)
    exact = _attend(query, key, value, attention_mask, scaling, softcap=softcap).transpose(1, 2)
    out, _ = act_attention(query, key, value, attention_mask, scaling=scaling, softcap=softcap, heads=heads,
                           exact=exact.clone, **act)
    ref = exact.float()
    norm = lambda t: t.pow(2).sum(dim=(0, 1, 3)).sqrt()
    return norm(out.float() - ref) / norm(ref).clamp(min=1e-30)

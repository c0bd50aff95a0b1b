"""Exact attention on transformers' tensors, and the helpers every variant shares.

transformers hands an attention function ``query [b, h, q, d]``, ``key``/``value`` ``[b, hk, k, d]`` (GQA heads not
expanded) and a mask made by the mask interface registered under the same name: patchattn registers sdpa's, so
the mask is ``None`` (plain causal, no padding) or a boolean ``[b, 1, q, k]`` (True = may attend). Outputs go back
as ``[b, q, h, d]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def causal_bool_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """Causal mask aligned so the last query sees the last key (decode steps and chunked prefill)."""
    qi = torch.arange(q_len, device=device).unsqueeze(-1) + (k_len - q_len)
    return torch.arange(k_len, device=device) <= qi


def eager_attention(module, query, key, value, attention_mask, *, scaling, dropout=0.0, softcap=None):
    """Materialised attention (returns the weights); the only exact path that honours ``softcap``."""
    b, h, q_len, d = query.shape
    hk, k_len = key.shape[1], key.shape[2]
    qg = query.reshape(b, hk, h // hk, q_len, d)
    scores = torch.matmul(qg, key.unsqueeze(2).transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        attention_mask = causal_bool_mask(q_len, k_len, query.device)[None, None] if q_len > 1 else None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~_grouped(attention_mask), torch.finfo(scores.dtype).min)
        else:
            scores = scores + _grouped(attention_mask)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value.unsqueeze(2)).reshape(b, h, q_len, -1)
    return out.transpose(1, 2).contiguous(), weights.reshape(b, h, q_len, k_len)


def _grouped(mask: torch.Tensor) -> torch.Tensor:
    """``[b, 1|h, q, k]`` mask → broadcastable against grouped scores ``[b, hk, g, q, k]``."""
    return mask.unsqueeze(2) if mask.shape[1] == 1 else mask.reshape(mask.shape[0], -1, 1, *mask.shape[2:])


#: attribute of an attention module of a patched model: the attention implementation its exact path runs
EXACT_BACKEND_ATTR = "_patchattn_exact_backend"


def exact_backend(implementation: str) -> str:
    """The backend exact layers of a patched model run for the model's ``attn_implementation``.

    patchattn's dispatcher receives sdpa-style masks (boolean ``[b, 1, q, k]`` or None) for every layer, so exact
    layers keep the user's backend when it takes those: ``sdpa``, ``eager`` and functions registered with sdpa's
    mask maker. Others (``flash_attention_*``, ``flex_attention``, paged and Hub kernels with their own mask
    formats) run SDPA instead, logged once.
    """
    if implementation in ("sdpa", "eager"):
        return implementation
    if implementation.startswith("patchattn"):
        return "sdpa"
    if implementation in ALL_ATTENTION_FUNCTIONS and ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) is sdpa_mask:
        return implementation
    from .logging_utils import warn_once

    warn_once(f"attn_implementation={implementation!r} takes masks in another format than patchattn's dispatcher "
              "hands its layers: the layers patchattn does not approximate run exact attention with 'sdpa' instead")
    return "sdpa"


def exact_attention(module, query, key, value, attention_mask, *, scaling, dropout=0.0, softcap=None,
                    output_attentions=False, **kwargs):
    """Unmodified attention with the model's backend (:func:`exact_backend`; SDPA by default), eager where
    softcap or the weights are needed."""
    backend = module.__dict__.get(EXACT_BACKEND_ATTR, "sdpa")
    if softcap is not None or output_attentions or backend == "eager":
        return eager_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                               softcap=softcap)
    if backend != "sdpa":
        return ALL_ATTENTION_FUNCTIONS[backend](module, query, key, value, attention_mask, scaling=scaling,
                                                dropout=dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)


def key_padding_from_mask(attention_mask: torch.Tensor | None, q_len: int,
                          k_len: int) -> tuple[bool, torch.Tensor | None]:
    """Is ``attention_mask`` exactly "causal AND key padding"? Returns ``(ok, key_valid [b, k] or None)``.

    Variants that only understand causal attention with padded keys use this to decide whether they may run or
    must fall back; anything else (sliding windows, packed sequences, custom masks) answers ``ok=False``. The check
    is strict because a wrong yes is silent: a packed block-diagonal mask read as left padding would send the first
    document's queries through the approximation with the wrong keys.
    """
    if attention_mask is None:
        return True, None
    if (attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or attention_mask.shape[-2:] != (q_len, k_len)):
        return False, None
    rows = attention_mask[:, 0]
    key_valid = rows[:, -1, :]  # the last query sees every valid key under a causal mask
    if not bool(_is_batch_padding(key_valid).all()):
        return False, None
    expected = causal_bool_mask(q_len, k_len, rows.device) & key_valid[:, None, :]
    real_row = (rows == expected).all(dim=-1)
    # A padded query (its own key is padding) gets an all-False row from transformers' mask makers, or all-True
    # where the maker unmasks fully masked rows for the fused kernels; its output is never used.
    padded_query = ~key_valid[:, k_len - q_len:]
    padded_row = padded_query & (~rows.any(dim=-1) | rows.all(dim=-1))
    if not bool((real_row | padded_row).all()):
        return False, None
    return True, (None if bool(key_valid.all()) else key_valid)


def _is_batch_padding(key_valid: torch.Tensor) -> torch.Tensor:
    """``[b]``: is each row of ``key_valid [b, k]`` the pattern a padded batch has, left padding (invalid keys,
    then valid ones) or right padding (valid, then invalid)? Holes in the middle mean some other mask."""
    steps = key_valid[:, 1:].int() - key_valid[:, :-1].int()
    return (steps >= 0).all(dim=-1) | (steps <= 0).all(dim=-1)


def long_causal_prefill(name: str, query: torch.Tensor, key: torch.Tensor, attention_mask, *, min_seq_len: int,
                        sliding_window: int | None = None, dropout: float = 0.0, training: bool = False,
                        output_attentions: bool = False, layer_idx: int = 0) -> tuple[str, torch.Tensor | None]:
    """May a long-prefill approximation (``hyper``, ``dhsa``) run here? Only on causal prefill (queries == keys)
    longer than ``min_seq_len`` under a causal mask with optional key padding, without attention dropout in
    training (the approximations have no dropout) and without requested weights (they materialise none: exact
    eager attention runs instead, so ``output_attentions=True`` never silently comes back without weights on some
    layers). Returns ``(path, key_valid)`` with ``path`` one of ``"approximate"``, ``"exact_decode"`` (decode
    steps: exact by design), ``"exact_short"`` (at most ``min_seq_len`` queries) or ``"fallback"`` (the other
    cases, logged once)."""
    from .logging_utils import warn_once

    q_len, k_len = query.shape[2], key.shape[2]
    if q_len != k_len:
        if q_len > 1:
            warn_once(f"{name}: prefill over a non-empty cache (chunked prefill) uses exact attention")
            return "fallback", None
        return "exact_decode", None
    if q_len <= min_seq_len:
        return "exact_short", None
    if dropout and training:
        warn_once(f"{name}: attention dropout (training mode) is not in the approximation; using exact attention")
        return "fallback", None
    if sliding_window is not None and k_len > sliding_window:
        warn_once(f"{name}: sliding-window layers (window {sliding_window}) keep exact attention")
        return "fallback", None
    ok, key_valid = key_padding_from_mask(attention_mask, q_len, k_len)
    if not ok:
        warn_once(f"{name}: attention mask is not causal+padding (packed or custom mask); using exact attention")
        return "fallback", None
    if output_attentions:
        warn_once(f"{name}: output_attentions=True needs the attention weights; layer {layer_idx} runs exact "
                  "attention")
        return "fallback", None
    return "approximate", key_valid


def exact_tail(module, out: torch.Tensor, query, key, value, attention_mask, tail: int, *, scaling: float,
               softcap=None) -> torch.Tensor:
    """``out [b, n, h, d]`` of an approximate causal prefill with its last ``tail`` query rows recomputed exactly
    over all keys. The question of a long prompt sits at its end: exact rows there keep what the prompt asks
    about reachable (retrieval), at O(n·tail) extra work."""
    n = query.shape[2]
    tail = min(tail, n)
    if tail <= 0:
        return out
    mask = (attention_mask[:, :, -tail:] if attention_mask is not None
            else causal_bool_mask(tail, n, query.device)[None, None])
    rows, _ = exact_attention(module, query[:, :, -tail:], key, value, mask, scaling=scaling, softcap=softcap)
    out = out.clone()
    out[:, -tail:] = rows.to(out.dtype)
    return out


def split_kv_heads(query, key, value, exact_kv_heads, *, approximate, exact) -> torch.Tensor:
    """``[b, n, h, d]``: ``exact(q, k, v)`` for the query heads of the KV heads ``exact_kv_heads`` and
    ``approximate(q, k, v)`` for the others (both take ``[b, h', n, d]`` queries with their ``[b, hk', n, d]`` keys
    and values and return ``[b, n, h', d]``). Query head ``i`` reads KV head ``i // (h // hk)``, as in transformers'
    ``repeat_kv``, so each part keeps its GQA layout. Heads that retrieval depends on stay exact this way while the
    rest of the layer is approximated (DuoAttention, arXiv 2410.10819; RazorAttention, arXiv 2407.15891)."""
    hk = key.shape[1]
    chosen = sorted(set(exact_kv_heads))
    if not chosen:
        return approximate(query, key, value)
    if len(chosen) == hk:
        return exact(query, key, value)
    rest = [i for i in range(hk) if i not in chosen]
    b, h, n, d = query.shape
    grouped = query.unflatten(1, (hk, h // hk))

    def part(heads: list[int], attend) -> torch.Tensor:
        index = torch.tensor(heads, device=query.device)
        q = grouped.index_select(1, index).flatten(1, 2)
        return attend(q, key.index_select(1, index), value.index_select(1, index))

    out = query.new_empty(b, n, hk, h // hk, value.shape[-1])
    out[:, :, chosen] = part(chosen, exact).unflatten(2, (len(chosen), h // hk)).to(out.dtype)
    out[:, :, rest] = part(rest, approximate).unflatten(2, (len(rest), h // hk)).to(out.dtype)
    return out.flatten(2, 3)

"""HyperAttention (Han et al., arXiv 2310.05869) in plain PyTorch: the reference every kernel is tested against.

Shapes follow the GQA layout used everywhere in patchattn: queries ``[b, hk, g, n, d]`` (``hk`` key/value heads, ``g``
query heads per key/value head), keys and values ``[b, hk, n, d]``. Keys are hashed and sorted once per key/value
head and shared by the ``g`` query heads of their group; they are never expanded.

The estimator, per query:
  * exact attention to the keys that land in the same sorted block (angular LSH, Gray-code ranked buckets);
  * plus ``sample_size`` keys drawn uniformly (with replacement) from the valid keys, each weighted by
    ``n_valid / sample_size``, where sampled keys that already sit in the query's own block are dropped, so the
    block part and the sampled part estimate disjoint sets of keys;
  * both parts merged exactly through their log-sum-exp.
The causal case splits the sequence in halves recursively (top-left and bottom-right stay causal, the bottom-left
block is all visible and uses the estimator) down to exact causal attention at ``min_seq_len``.

Padding is exact: keys marked invalid by ``key_valid`` are sorted to the end, never enter a softmax and are never
sampled; sequences that are not a multiple of the block size are handled by masking, not by zero keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class HyperSettings:
    lsh_num_projs: int = 7
    block_size: int = 256
    sample_size: int = 256
    min_seq_len: int = 4096
    seed: int = 0
    # Quality levers (defaults reproduce the published method). Every query also attends exactly to the first
    # ``sink_tokens`` keys and to the ``local_window`` keys ending at itself; those keys are excluded from every
    # estimated part, and both parts are merged by log-sum-exp.
    sink_tokens: int = 0
    local_window: int = 0
    #: hash keys after subtracting their mean (softmax is invariant to a shift of all keys)
    center_keys: bool = False


def exact_set_mask(qpos: torch.Tensor, kpos: torch.Tensor, settings: HyperSettings) -> torch.Tensor | None:
    """True where key position ``kpos`` belongs to the exactly-attended set of query position ``qpos``
    (sinks or local window, causal), broadcasting the two position tensors; None when the set is empty."""
    if not settings.sink_tokens and not settings.local_window:
        return None
    exact = (kpos < settings.sink_tokens) | (kpos > qpos - settings.local_window)
    return exact & (kpos <= qpos)


def gray_rank(bits: torch.Tensor) -> torch.Tensor:
    """Map sign bits ``[..., r]`` (bool) to the bucket's rank in the reflected Gray-code sequence.

    Consecutive ranks differ in exactly one sign bit, so neighbouring buckets in sort order are Hamming neighbours
    (angularly close). The rank of code ``c`` is the inverse Gray transform: ``c ^ c>>1 ^ c>>2 ^ ...``.
    """
    r = bits.shape[-1]
    weights = 2 ** torch.arange(r, device=bits.device, dtype=torch.int64)
    code = (bits.to(torch.int64) * weights).sum(-1)
    rank = code.clone()
    for shift in range(1, r):
        rank ^= code >> shift
    return rank


def lsh_projections(d: int, num_projs: int, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian projections ``[d, r]``, reproducible from ``seed`` on every device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(d, num_projs, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def lsh_rank(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Gray-code bucket rank of every row of ``x [..., n, d]``."""
    return gray_rank((x.float() @ proj.float()) > 0)


def sample_positions(n_valid: torch.Tensor, sample_size: int, seed: int, level: int) -> torch.Tensor:
    """Uniform sorted-key positions ``[b, hk, m]`` in ``[0, n_valid)``, with replacement, reproducible from
    ``seed`` and the recursion ``level`` (kernels draw the same samples as the reference)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 7919 * (level + 1))
    u = torch.rand(*n_valid.shape, sample_size, generator=gen).to(n_valid.device)
    return (u * n_valid.unsqueeze(-1)).long().clamp_max((n_valid - 1).clamp_min(0).unsqueeze(-1))


def _scores(q, k, scaling, softcap):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


def _softmax_with_lse(s: torch.Tensor, v: torch.Tensor):
    """Row softmax of already masked scores times ``v``; rows with no visible key give 0 output and -inf lse."""
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe.unsqueeze(-1))
    return torch.matmul(p, v.float()), lse


def merge_lse(o1, lse1, o2, lse2):
    """Combine two partial attentions over disjoint key sets (outputs normalised, with their log-sum-exps)."""
    lse = torch.logaddexp(lse1, lse2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - safe).nan_to_num(0.0).unsqueeze(-1)
    w2 = torch.exp(lse2 - safe).nan_to_num(0.0).unsqueeze(-1)
    return o1 * w1 + o2 * w2, lse


def exact_attention_lse(q, k, v, scaling, *, causal, key_valid=None, softcap=None, exclude=None):
    """Exact attention with log-sum-exp. q ``[b,hk,g,nq,d]``, k/v ``[b,hk,nk,d]``; causal aligns the last query
    with the last key; ``exclude`` ``[nq, nk]`` drops pairs computed elsewhere.
    Returns fp32 ``(out [b,hk,g,nq,d], lse [b,hk,g,nq])``."""
    s = _scores(q, k.unsqueeze(2), scaling, softcap)
    nq, nk = q.shape[-2], k.shape[-2]
    if causal:
        qi = torch.arange(nq, device=q.device).unsqueeze(-1) + (nk - nq)
        kj = torch.arange(nk, device=q.device)
        s = s.masked_fill(kj > qi, NEG_INF)
    if exclude is not None:
        s = s.masked_fill(exclude, NEG_INF)
    if key_valid is not None:
        s = s.masked_fill(~key_valid[:, None, None, None, :], NEG_INF)
    return _softmax_with_lse(s, v.unsqueeze(2))


def sinks_and_window_lse(q, k, v, scaling, settings: HyperSettings, *, key_valid=None, softcap=None):
    """Exact attention of every query to its exact set (sinks + local window) in O(n * (sinks + window)):
    query chunks of ``C`` see the keys ``[t0 - W, t0 + C)`` plus the sinks that lie before that range."""
    n, d = q.shape[-2], q.shape[-1]
    W, S = settings.local_window, settings.sink_tokens
    nb = -(-n // max(W, 64))
    C = -(-n // nb)  # the chunk size _split_blocks will use
    t0 = torch.arange(nb, device=q.device) * C
    win = t0[:, None] - W + torch.arange(W + C, device=q.device)  # [nb, W+C] key positions
    sink = torch.arange(S, device=q.device).expand(nb, S)
    kpos = torch.cat([sink, win], dim=-1)  # [nb, S+W+C]
    in_range = torch.cat([sink < (t0[:, None] - W), (win >= 0) & (win < n)], dim=-1)
    qpos = t0[:, None] + torch.arange(C, device=q.device)  # [nb, C]
    allowed = in_range[:, None, :] & exact_set_mask(qpos[:, :, None], kpos[:, None, :], settings)
    idx = kpos.clamp(0, n - 1).reshape(-1)
    kc = k[..., idx, :].reshape(*k.shape[:2], nb, -1, d)  # [b,hk,nb,K,d]
    vc = v[..., idx, :].reshape(*v.shape[:2], nb, -1, v.shape[-1])
    qc, _ = _split_blocks(q, nb, dim=3)  # [b,hk,g,nb,C,d]
    s = _scores(qc, kc.unsqueeze(2), scaling, softcap)  # [b,hk,g,nb,C,K]
    mask = allowed[None, None, None]
    if key_valid is not None:
        mask = mask & key_valid[:, idx].reshape(-1, 1, 1, nb, 1, kpos.shape[-1])
    s = s.masked_fill(~mask, NEG_INF)
    o, lse = _softmax_with_lse(s, vc.unsqueeze(2))
    return o.flatten(3, 4)[..., :n, :], lse.flatten(3, 4)[..., :n]


def _split_blocks(x: torch.Tensor, num_blocks: int, dim: int, fill=0):
    """Pad ``x`` along ``dim`` to ``num_blocks * ceil(n / num_blocks)`` and split it into ``num_blocks`` blocks."""
    n = x.shape[dim]
    size = -(-n // num_blocks)
    pad = num_blocks * size - n
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_full(shape, fill)], dim=dim)
    shape = list(x.shape)
    shape[dim : dim + 1] = [num_blocks, size]
    return x.reshape(shape), size


def hyper_attention_noncausal(q, k, v, scaling, settings: HyperSettings, *, key_valid=None, softcap=None,
                              level: int = 0, q_offset: int = 0, k_offset: int = 0):
    """All queries see all (valid) keys except their exact set (offsets give absolute positions for it).
    Returns fp32 ``(out, lse)`` in the original query order."""
    b, hk, g, nq, d = q.shape
    nk = k.shape[-2]
    qpos = q_offset + torch.arange(nq, device=q.device)
    kpos = k_offset + torch.arange(nk, device=q.device)
    num_blocks = max(1, -(-max(nq, nk) // settings.block_size))
    if num_blocks == 1:
        return exact_attention_lse(q, k, v, scaling, causal=False, key_valid=key_valid, softcap=softcap,
                                   exclude=exact_set_mask(qpos[:, None], kpos[None, :], settings))

    proj = lsh_projections(d, settings.lsh_num_projs, settings.seed + 1_000_003 * level, q.device)
    q_rank = lsh_rank(q, proj)  # [b, hk, g, nq]
    k_rank = lsh_rank(_centred(k, key_valid) if settings.center_keys else k, proj)  # [b, hk, nk]
    if key_valid is not None:  # invalid keys sort after every real bucket
        k_rank = k_rank.masked_fill(~key_valid[:, None, :], 2**settings.lsh_num_projs)
    q_order = torch.sort(q_rank, dim=-1, stable=True).indices
    k_order = torch.sort(k_rank, dim=-1, stable=True).indices
    q_sorted = q.gather(-2, q_order.unsqueeze(-1).expand(-1, -1, -1, -1, d))
    k_sorted = k.gather(-2, k_order.unsqueeze(-1).expand(-1, -1, -1, d))
    v_sorted = v.gather(-2, k_order.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
    if key_valid is None:
        valid_sorted = torch.ones(b, hk, nk, dtype=torch.bool, device=q.device)
    else:
        valid_sorted = key_valid[:, None, :].expand(b, hk, nk).gather(-1, k_order)
    qpos_sorted, kpos_sorted = qpos[q_order], kpos[k_order]  # [b,hk,g,nq], [b,hk,nk]

    # Block-diagonal part on the sorted sequences.
    qb, _ = _split_blocks(q_sorted, num_blocks, dim=3)  # [b,hk,g,B,bq,d]
    kb, _ = _split_blocks(k_sorted, num_blocks, dim=2)  # [b,hk,B,bk,d]
    vb, _ = _split_blocks(v_sorted, num_blocks, dim=2)
    mb, bk = _split_blocks(valid_sorted, num_blocks, dim=2, fill=False)  # [b,hk,B,bk]
    s = _scores(qb, kb.unsqueeze(2), scaling, softcap)  # [b,hk,g,B,bq,bk]
    s = s.masked_fill(~mb[:, :, None, :, None, :], NEG_INF)
    qpb, _ = _split_blocks(qpos_sorted, num_blocks, dim=3)
    kpb, _ = _split_blocks(kpos_sorted, num_blocks, dim=2)
    excluded = exact_set_mask(qpb[..., :, None], kpb[:, :, None, :, None, :], settings)
    if excluded is not None:
        s = s.masked_fill(excluded, NEG_INF)
    o_blk, lse_blk = _softmax_with_lse(s, vb.unsqueeze(2))
    o_blk = o_blk.flatten(3, 4)[..., :nq, :]
    lse_blk = lse_blk.flatten(3, 4)[..., :nq]

    # Uniformly sampled residual, keys of the query's own block excluded, reweighted by n_valid / m.
    if settings.sample_size > 0:
        n_valid = valid_sorted.sum(-1)  # [b,hk]; invalid keys are at the end of the sorted order
        idx = sample_positions(n_valid, settings.sample_size, settings.seed, level)
        ks = k_sorted.gather(-2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
        vs = v_sorted.gather(-2, idx.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
        bq = -(-nq // num_blocks)
        q_block = torch.arange(nq, device=q.device) // bq  # block of each sorted query
        s_block = idx // bk  # block of each sampled key  [b,hk,m]
        same = q_block[None, None, :, None] == s_block[:, :, None, :]  # [b,hk,nq,m]
        ss = _scores(q_sorted, ks.unsqueeze(2), scaling, softcap)
        ss = ss.masked_fill(same.unsqueeze(2), NEG_INF)
        ss = ss.masked_fill((n_valid == 0)[:, :, None, None, None], NEG_INF)
        excluded = exact_set_mask(qpos_sorted[..., None], kpos_sorted.gather(-1, idx)[:, :, None, None, :], settings)
        if excluded is not None:
            ss = ss.masked_fill(excluded, NEG_INF)
        o_smp, lse_smp = _softmax_with_lse(ss, vs.unsqueeze(2))
        weight = torch.log(n_valid.clamp_min(1).float() / settings.sample_size)[:, :, None, None]
        o_blk, lse_blk = merge_lse(o_blk, lse_blk, o_smp, lse_smp + weight)

    # Back to the original query order.
    out = torch.empty_like(o_blk)
    out.scatter_(-2, q_order.unsqueeze(-1).expand_as(o_blk), o_blk)
    lse = torch.empty_like(lse_blk)
    lse.scatter_(-1, q_order, lse_blk)
    return out, lse


def _centred(k: torch.Tensor, key_valid) -> torch.Tensor:
    if key_valid is None:
        return k - k.mean(dim=-2, keepdim=True)
    w = key_valid[:, None, :, None].to(k.dtype)
    return k - (k * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1)


def hyper_attention_causal(q, k, v, scaling, settings: HyperSettings, *, key_valid=None, softcap=None,
                           level: int = 0, offset: int = 0):
    """Causal HyperAttention by recursive halving (queries and keys of equal length, starting at ``offset``)."""
    n = q.shape[-2]
    if n <= settings.min_seq_len:
        pos = offset + torch.arange(n, device=q.device)
        return exact_attention_lse(q, k, v, scaling, causal=True, key_valid=key_valid, softcap=softcap,
                                   exclude=exact_set_mask(pos[:, None], pos[None, :], settings))
    h = n // 2
    kv1 = None if key_valid is None else key_valid[:, :h]
    kv2 = None if key_valid is None else key_valid[:, h:]
    o1, l1 = hyper_attention_causal(q[..., :h, :], k[..., :h, :], v[..., :h, :], scaling, settings,
                                    key_valid=kv1, softcap=softcap, level=level + 1, offset=offset)
    o_off, l_off = hyper_attention_noncausal(q[..., h:, :], k[..., :h, :], v[..., :h, :], scaling, settings,
                                             key_valid=kv1, softcap=softcap, level=level,
                                             q_offset=offset + h, k_offset=offset)
    o_diag, l_diag = hyper_attention_causal(q[..., h:, :], k[..., h:, :], v[..., h:, :], scaling, settings,
                                            key_valid=kv2, softcap=softcap, level=level + 1, offset=offset + h)
    o2, l2 = merge_lse(o_off, l_off, o_diag, l_diag)
    return torch.cat([o1, o2], dim=-2), torch.cat([l1, l2], dim=-1)


def hyper_attention(q, k, v, scaling=None, settings: HyperSettings = HyperSettings(), *, causal=True,
                    key_valid=None, softcap=None):
    """Public reference entry point.

    q ``[b, h, n, d]``, k/v ``[b, hk, n, d]`` with ``h % hk == 0``; ``key_valid`` ``[b, n]`` bool or None.
    Returns ``(out [b, h, n, d] in q's dtype, lse [b, h, n] fp32)``.
    """
    b, h, n, d = q.shape
    hk = k.shape[1]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if not causal and (settings.sink_tokens or settings.local_window):
        raise ValueError("sink_tokens / local_window are causal-only levers")
    scaling = d**-0.5 if scaling is None else scaling
    qg = q.reshape(b, hk, h // hk, n, d)
    fn = hyper_attention_causal if causal else hyper_attention_noncausal
    out, lse = fn(qg, k, v, scaling, settings, key_valid=key_valid, softcap=softcap)
    if causal and (settings.sink_tokens or settings.local_window):
        o_exact, l_exact = sinks_and_window_lse(qg, k, v, scaling, settings, key_valid=key_valid, softcap=softcap)
        out, lse = merge_lse(out, lse, o_exact, l_exact)
    return out.reshape(b, h, n, v.shape[-1]).to(q.dtype), lse.reshape(b, h, n)

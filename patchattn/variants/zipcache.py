"""`zipcache`: ZipCache (He et al., arXiv 2405.14256), a mixed-precision quantised KV cache, training-free.

What is stored: keys are quantised channel-wise (one min/step per channel over a block's tokens, or over each
``key_group_size`` of them: outlier channels live there), values with channel-separable token-wise quantisation
(CSTQuant: each channel divided by ``sqrt(max|x|)`` over the block, then one asymmetric min/step per token over its
KV heads side by side), both as real packed uint8 codes. A block's tokens are split per KV head by *saliency*: the
``salient_ratio`` most salient get ``high_bits``, the rest ``low_bits``, each subset quantised on its own so the
regular tokens' ranges are not stretched by the outliers that salient tokens (sinks) carry.

Saliency is the normalised attention score: a token's attention probability summed over the queries that can see
it, divided by how many can (plain column sums favour early tokens under a causal mask). It is estimated from probe
queries only (the last ``probe_recent_ratio`` and a random ``probe_random_ratio`` of a block's queries; at least
the last query, so every token is seen), so the main attention stays one fused SDPA call and no ``q x k`` matrix
is ever built.

When: a forward with several queries (a prefill, or a chunk over a non-empty cache) is attended in full precision
and quantised right after. Decoded tokens stay in a full-precision recent buffer; every ``requant_interval`` decode
steps the buffer is quantised as one block (streaming). The window's probe steps (its last 5 % and a random 5 % by
default, drawn when the window opens) record their attention rows over the buffer as they run. Attention sees the
dequantised past + the full-precision recent tokens.

Decode (``decode_kernel``, on by default): on decode steps of full layers the blocks are not dequantised at all.
``update`` hands transformers only the full-precision tokens (sinks + recent buffer) and the variant's attention
runs a fused Triton kernel (``patchattn.kernels.zipcache``) that reads the packed codes in place, merged with those
tokens into the exact softmax over every key. It needs CUDA (or the kernel's ``KERNEL_ON_CPU`` switch) and no mask:
with a padding mask, ``output_attentions`` or attention dropout the step dequantises the blocks as before (logged
once). A probe step takes the kernel too and scores the buffer's tokens with the logsumexp it returns (before, an
eager step dequantised every block of the layer). Multi-query forwards and sliding layers always dequantise.

Defaults are the measured recommendation, not the paper's setting (4/2 bits for keys and values, 60 % salient,
``preset="paper"``): 2-bit *keys* are what hurts perplexity, so ``key_low_bits=4`` keeps every key at 4 bits in
groups of 128 tokens, 20 % of tokens are salient and ``sink_tokens=1`` keeps the first token in full precision; and
2-bit *values* are what loses multi-key retrieval, so ``low_bits=4`` keeps every value at 4 bits too (salient and
regular tokens still get their own ranges). On Qwen2.5-0.5B at 32k (150 task prompts, two H200 runs,
benchmarks/README.md) values at 2 bits lost 5.3 points of the task mean at 4.6x compression (20 % salient) or 4.7
at 4.4x (40 % salient); at 4 bits, 2.7 points at 3.8x. ``low_bits=2`` is the smaller cache, one parameter away.

Where: ``patch_model(model, "zipcache")`` makes ``generate()`` build a :class:`patchattn.cache.PatchattnCache` whose
patched layers are :class:`ZipCacheLayer` (``cache.nbytes()`` = true bytes: codes, quantisation parameters,
saliency bitmaps, sinks, the recent buffer and its probe statistics); :func:`patchattn.generation_cache` builds the
same for direct ``model(...)`` calls. Sliding-window layers (Mistral, Gemma 2/3 local layers) are quantised too by
default: they keep the last ``window - 1`` tokens in blocks of at most ``requant_interval`` tokens and drop a block
once all of it has slid out (so up to one block more than the window is held; a window shorter than ``requant_interval``
never quantises decode tokens); ``quantize_sliding=False`` keeps transformers' full-precision sliding layer for them.
Without a ZipCache layer (a plain ``model(...)`` call, or a cache the user passes to ``generate``) the variant is
exact attention.
"""
from __future__ import annotations

import dataclasses
import random

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..attention import eager_attention
from ..cache import TensorMapLayerMixin
from ..kernels.zipcache import causal_probe_counts, kernel_usable, probe_column_scores, quantized_decode_attention
from ..logging_utils import warn_once
from .base import KV_CACHE, PREFILL, Variant, VariantParams, handoff, param, register_variant

#: :func:`handoff` key: the layer whose ``update`` ran for this call, popped in ``ZipCache.attention``
PENDING_KEY = "zipcache_pending"
#: measured (8,192 Shakespeare tokens scored in chunks of 100 after a 1k prefill, context 2k): with 2-bit values
#: (``low_bits=2``) SmolLM2-135M 4.57× at +1.12 % perplexity, Gemma-3-270M 4.49× at +1.27 %; the paper's setting:
#: +15.1 % / +3.7 %
PAPER_SETTING = {"low_bits": 2, "key_low_bits": 0, "salient_ratio": 0.6, "key_group_size": 0, "sink_tokens": 0,
                 "max_probes": 0}


@dataclasses.dataclass
class ZipCacheParams(VariantParams):
    high_bits: int = param(4, choices=(2, 4, 8), help="bits of salient tokens")
    low_bits: int = param(4, choices=(2, 4, 8), help="bits of the other tokens (<= high_bits; 2 = a 4.6x instead "
                                                     "of 3.8x smaller cache, less retrieval)")
    key_low_bits: int = param(4, choices=(0, 2, 4, 8), help="bits of the other tokens' keys, in [low_bits, "
                                                             "high_bits] (0 = low_bits)")
    salient_ratio: float = param(0.2, low=0.0, high=1.0, help="share of each block's tokens kept at high_bits")
    probe_recent_ratio: float = param(0.05, low=0.0, high=1.0, help="last queries of a block used as probes (>= 1)")
    probe_random_ratio: float = param(0.05, low=0.0, high=1.0, help="random earlier queries used as probes")
    max_probes: int = param(4096, low=0, help="at most this many probes per forward, both kinds scaled down alike "
                                              "(0 = no cap; uncapped, 10 % of 131k queries took 35 % of causal "
                                              "SDPA's time on an H200, more at longer prompts; prompts up to 40k "
                                              "tokens are not capped)")
    requant_interval: int = param(100, low=1, help="decode steps kept in full precision, then quantised as a block")
    key_group_size: int = param(128, low=0, help="tokens sharing one key min/step per channel (0 = the whole block)")
    value_group_size: int = param(0, low=0, help="channels sharing one value min/step per token, over the token's "
                                                 "concatenated KV heads (0 = all of them, as the paper)")
    sink_tokens: int = param(1, low=0, help="first tokens of the sequence kept in full precision (full layers)")
    quantize_sliding: bool = param(True, help="quantise sliding-window layers too (False: keep them full precision)")
    decode_kernel: bool = param(True, help="decode steps of full layers attend the packed blocks in place with the "
                                           "fused kernel (CUDA) instead of dequantising them (False: dequantise)")
    probe_kernel: bool = param(True, help="score a prefill's saliency probes with the fused Triton kernel (CUDA, no "
                                          "padding mask; 6x less prefill on Qwen2.5-0.5B at 32k) instead of chunked "
                                          "PyTorch")
    seed: int = param(0, low=0, help="seed of the random probes (offset by layer index)")

    def validate(self) -> None:
        super().validate()
        if self.low_bits > self.high_bits:
            raise ValueError(f"zipcache: low_bits ({self.low_bits}) must not exceed high_bits ({self.high_bits})")
        if self.key_low_bits and not self.low_bits <= self.key_low_bits <= self.high_bits:
            raise ValueError(f"zipcache: key_low_bits ({self.key_low_bits}) must be in [low_bits, high_bits] = "
                             f"[{self.low_bits}, {self.high_bits}] (or 0)")


# --------------------------------------------------------------------------------------------------- bit packing


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below ``2**bits`` → ``8 // bits`` codes per byte along the last dim (which must divide evenly)."""
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"cannot pack {codes.shape[-1]} {bits}-bit codes into whole bytes")
    if per == 1:
        return codes.contiguous()
    grouped = codes.reshape(*codes.shape[:-1], -1, per)
    packed = grouped[..., 0].clone()
    for i in range(1, per):
        packed |= grouped[..., i] << (bits * i)
    return packed


_SHIFTS: dict[tuple, torch.Tensor] = {}


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    if bits == 8:
        return packed
    shifts = _SHIFTS.get((packed.device, bits))
    if shifts is None:  # made once per device: decode steps unpack every block of every layer
        shifts = _SHIFTS[packed.device, bits] = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(*packed.shape[:-1], -1)


# --------------------------------------------------------------------------------------------------- quantisation


@dataclasses.dataclass
class Quantized:
    """Packed codes and what dequantises them; everything here is real storage.

    Keys (``heads == 0``): codes ``[b, hk, n, d·bits/8]``, ``zero``/``step`` ``[b, hk, G, 1, d]``: one per channel
    and group of ``group`` tokens. Values (``heads == hk``): a token's KV heads side by side, codes
    ``[b, n, C·bits/8]`` with ``C = hk·d``, ``zero``/``step`` ``[b, n, C / group, 1]``: one per token and group of
    ``group`` channels, on the channel-normalised tensor; ``channel_scale`` ``[b, 1, C]`` (when this tensor owns it,
    else its block does) scales it back.
    """

    codes: torch.Tensor
    zero: torch.Tensor
    step: torch.Tensor
    bits: int
    group: int
    heads: int = 0
    channel_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype, channel_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, hk, n, d]`` in ``dtype``."""
        codes = unpack_codes(self.codes, self.bits).to(dtype)
        if not self.heads:
            b, hk, n, d = codes.shape
            groups = self.zero.shape[2]
            pad = groups * self.group - n
            if pad:
                codes = torch.nn.functional.pad(codes, (0, 0, 0, pad))
            x = torch.addcmul(self.zero.to(dtype), codes.view(b, hk, groups, self.group, d), self.step.to(dtype))
            return x.view(b, hk, groups * self.group, d)[:, :, :n]
        b, n, c = codes.shape
        scale = self.channel_scale if channel_scale is None else channel_scale
        x = torch.addcmul(self.zero.to(dtype), codes.view(b, n, c // self.group, self.group), self.step.to(dtype))
        x = x.view(b, n, c) * scale.to(dtype)
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.zero, self.step, self.channel_scale) if t is not None]

    def map(self, fn) -> None:
        self.codes, self.zero, self.step = fn(self.codes), fn(self.zero), fn(self.step)
        if self.channel_scale is not None:
            self.channel_scale = fn(self.channel_scale)


def _uniform(x, lo, hi, bits: int, param_dtype: torch.dtype):
    """Asymmetric uniform codes of ``x`` in ``[0, 2**bits - 1]``, computed with the parameters as stored."""
    levels = 2**bits - 1
    zero, step = lo.to(param_dtype), ((hi - lo) / levels).to(param_dtype)
    z, s = zero.float(), step.float()
    codes = ((x - z) / torch.where(s > 0, s, 1.0)).round_().clamp_(0, levels).to(torch.uint8)
    return codes, zero, step


def quantize_keys(x: torch.Tensor, bits: int, group: int = 0, param_dtype=torch.float16) -> Quantized:
    """Channel-wise: per channel, one min/step over each ``group`` consecutive tokens (0 = all of them)."""
    b, hk, n, d = x.shape
    group = n if group == 0 else min(group, n)
    groups = -(-n // group)
    xf = x.float()
    if groups * group > n:  # repeat the last token: it changes no group's min/max
        xf = torch.cat([xf, xf[:, :, -1:].expand(b, hk, groups * group - n, d)], dim=2)
    xg = xf.view(b, hk, groups, group, d)
    codes, zero, step = _uniform(xg, xg.amin(3, keepdim=True), xg.amax(3, keepdim=True), bits, param_dtype)
    codes = codes.view(b, hk, groups * group, d)[:, :, :n]
    return Quantized(pack_codes(codes, bits), zero, step, bits, group)


def value_channel_scale(x: torch.Tensor, param_dtype=torch.float16) -> torch.Tensor:
    """CSTQuant's per-channel ``sqrt(max|x|)`` over the tokens of ``[b, hk, n, d]``, as ``[b, 1, hk·d]``."""
    b, hk, n, d = x.shape
    return x.abs().amax(2).reshape(b, 1, hk * d).float().clamp_min(1e-6).sqrt().to(param_dtype)


def quantize_values(x: torch.Tensor, bits: int, group: int = 0, param_dtype=torch.float16,
                    channel_scale: torch.Tensor | None = None) -> Quantized:
    """Channel-separable token-wise (CSTQuant): lay a token's KV heads side by side (``C = hk·d`` channels), divide
    each channel by ``sqrt(max|x|)`` over the tokens, then one asymmetric min/step per token and group of ``group``
    channels (0 = all ``C``: the normalisation evens out outlier channels, so one pair per token suffices). A given
    ``channel_scale`` (shared by a block's subsets) is used and not stored here."""
    b, hk, n, d = x.shape
    c = hk * d
    group = c if group == 0 else group
    if c % group:
        raise ValueError(f"zipcache: value_group_size {group} does not divide the {c} value channels of a token")
    own = channel_scale is None
    scale = value_channel_scale(x, param_dtype) if own else channel_scale
    xn = (x.float().transpose(1, 2).reshape(b, n, c) / scale.float()).view(b, n, c // group, group)
    codes, zero, step = _uniform(xn, xn.amin(-1, keepdim=True), xn.amax(-1, keepdim=True), bits, param_dtype)
    return Quantized(pack_codes(codes.view(b, n, c), bits), zero, step, bits, group, hk, scale if own else None)


class QuantizedBlock:
    """``n`` consecutive tokens of one layer: per KV head the ``n_high`` salient ones at ``high_bits`` and the rest
    at ``low_bits`` (keys: ``key_low_bits``), each subset with its own ranges, stored salient first; a
    1-bit-per-token bitmap gives the positions back. Keys are quantised as one tensor (one range, half the
    parameters) when both subsets would get the same key bits; the values' channel scale is shared by the block."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, salient: torch.Tensor | None, n_high: int,
                 params: ZipCacheParams, param_dtype: torch.dtype):
        b, hk, n, d = keys.shape
        self.n, self.n_high = n, n_high
        key_low = params.key_low_bits or params.low_bits
        self.value_scale = value_channel_scale(values, param_dtype)
        quantize_v = lambda v, bits: quantize_values(v, bits, params.value_group_size, param_dtype,
                                                     self.value_scale)
        quantize_k = lambda k, bits: quantize_keys(k, bits, params.key_group_size, param_dtype)
        self.bitmap = None
        if salient is None:  # one precision for the whole block
            high = n_high == n
            self.keys = [quantize_k(keys, params.high_bits if high else key_low)]
            self.values = [quantize_v(values, params.high_bits if high else params.low_bits)]
            return
        order = torch.argsort((~salient).to(torch.int8), dim=-1, stable=True)  # salient first, in order
        index = order.unsqueeze(-1).expand(b, hk, n, d)
        values = values.gather(2, index)
        self.values = [quantize_v(values[:, :, :n_high], params.high_bits),
                       quantize_v(values[:, :, n_high:], params.low_bits)]
        keys = keys.gather(2, index)
        if key_low == params.high_bits:
            self.keys = [quantize_k(keys, key_low)]
        else:
            self.keys = [quantize_k(keys[:, :, :n_high], params.high_bits), quantize_k(keys[:, :, n_high:], key_low)]
        self.bitmap = pack_codes(torch.nn.functional.pad(salient, (0, -n % 8)).to(torch.uint8), 1)

    @classmethod
    def from_scores(cls, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, params: ZipCacheParams,
                    param_dtype: torch.dtype) -> QuantizedBlock:
        """The block the cache stores for these tokens: the top ``salient_ratio`` by saliency ``scores [b, hk, n]``
        salient, first, where they get more bits than the rest; else token order at one precision."""
        n = keys.shape[2]
        n_high = 0 if params.high_bits == params.low_bits else round(params.salient_ratio * n)
        salient = None
        if 0 < n_high < n:
            top = scores.topk(n_high, dim=-1).indices
            salient = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return cls(keys, values, salient, n_high, params, param_dtype)

    def dequantize(self, dtype: torch.dtype, in_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[b, hk, n, d]``, in token order or (``in_order=False``, cheaper) as stored."""
        keys = [k.dequantize(dtype) for k in self.keys]
        values = [v.dequantize(dtype, self.value_scale) for v in self.values]
        keys = keys[0] if len(keys) == 1 else torch.cat(keys, dim=2)
        values = values[0] if len(values) == 1 else torch.cat(values, dim=2)
        if self.bitmap is None or not in_order:
            return keys, values
        salient = unpack_codes(self.bitmap, 1)[..., : self.n].bool()
        source = torch.where(salient, salient.cumsum(-1) - 1, self.n_high + (~salient).cumsum(-1) - 1)
        index = source.unsqueeze(-1).expand(*source.shape, keys.shape[-1])
        return keys.gather(2, index), values.gather(2, index)

    def stored_positions(self) -> torch.Tensor | None:
        """Token position of each stored row, ``[b, hk, n]`` (None: stored in order)."""
        if self.bitmap is None:
            return None
        salient = unpack_codes(self.bitmap, 1)[..., : self.n].bool()
        return torch.argsort((~salient).to(torch.int8), dim=-1, stable=True)

    def tensors(self) -> list[torch.Tensor]:
        own = [t for t in (self.bitmap, self.value_scale) if t is not None]
        return own + [t for part in (*self.keys, *self.values) for t in part.tensors()]

    def map(self, fn) -> None:
        self.value_scale = fn(self.value_scale)
        if self.bitmap is not None:
            self.bitmap = fn(self.bitmap)
        for part in (*self.keys, *self.values):
            part.map(fn)


# --------------------------------------------------------------------------------------------------- saliency


def visible_rows(attention_mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, k_len: int,
                 device) -> torch.Tensor:
    """Which keys the query ``rows`` may see: bool ``[b|1, 1|h, p, k]`` (mask ``None`` = causal, last query last)."""
    if attention_mask is None:  # only the probe rows: a full q x k mask would be 1 GiB at 32k
        return (torch.arange(k_len, device=device) <= (rows + (k_len - q_len))[:, None])[None, None]
    selected = attention_mask[:, :, rows]
    return selected if selected.dtype == torch.bool else selected > torch.finfo(selected.dtype).min / 2


def _grouped(x: torch.Tensor, hk: int) -> torch.Tensor:
    """``[b, h|1, p, k]`` → ``[b, hk|1, g|1, p, k]``."""
    return x.unsqueeze(2) if x.shape[1] == 1 else x.reshape(x.shape[0], hk, -1, *x.shape[2:])


def column_scores(probs: torch.Tensor, visible: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over heads of a group and probes of ``probs`` ``[b, hk, g, p, k]`` on the last ``columns`` keys, and how
    many (head, probe) pairs could see each: ``(sums, counts)``, both ``[b, hk, columns]`` float32."""
    b, hk, g, p, _ = probs.shape
    seen = visible[..., -columns:].expand(b, hk, g, p, columns)
    sums = (probs[..., -columns:].float() * seen).sum((2, 3))
    return sums, seen.sum((2, 3), dtype=torch.float32)


def probe_scores(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, attention_mask: torch.Tensor | None,
                 *, scaling: float, softcap: float | None = None, columns: int | None = None,
                 max_elements: int = 1 << 27, use_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the probe query ``rows`` over all keys (exact softmax over what each may see), reduced as
    :func:`column_scores` does to the last ``columns`` keys. ``sums / counts`` is the normalised attention score
    estimate.

    With ``use_kernel`` and without a mask (causal), where the fused kernel runs (CUDA, or its ``KERNEL_ON_CPU``
    switch), it is
    :func:`~patchattn.kernels.zipcache.probe_column_scores`: no probe × key matrix at all. Otherwise the matrix is
    built in chunks of probes so at most ``max_elements`` scores exist at once (0.5 GiB of float32: 73 probes a
    chunk at 32k keys, batch 4, 14 heads; 2**25 meant ~180 small chunks per layer there, and a 32k prefill 11x
    slower than exact's on an H200), scaled by the GEMM, capped and masked in place; masked probabilities are
    exactly 0 after the softmax (the rows a padding mask hides entirely, NaN, are zeroed), so they are summed as they
    are, and the causal counts are analytic."""
    b, h, q_len, d = query.shape
    hk, k_len = key.shape[1], key.shape[2]
    g = h // hk
    columns = k_len if columns is None else columns
    if use_kernel and attention_mask is None and kernel_usable(query):
        return probe_column_scores(query, key, rows, scaling=scaling, softcap=softcap, columns=columns)
    sums = query.new_zeros(b, hk, columns, dtype=torch.float32)
    counts = torch.zeros_like(sums)
    chunk = max(1, max_elements // (b * h * k_len))
    key_t = key.reshape(b * hk, k_len, d).transpose(1, 2)
    for start in range(0, rows.numel(), chunk):
        r = rows[start : start + chunk]
        n = r.numel()
        q = query[:, :, r].reshape(b * hk, g * n, d)
        scores = torch.baddbmm(q.new_empty(b * hk, g * n, k_len), q, key_t, beta=0, alpha=scaling)  # scaled there
        scores = scores.float().view(b, hk, g, n, k_len)
        if softcap is not None:
            scores.div_(softcap).tanh_().mul_(softcap)
        visible = _grouped(visible_rows(attention_mask, r, q_len, k_len, query.device), hk)
        probs = torch.softmax(scores.masked_fill_(~visible, float("-inf")), dim=-1)[..., k_len - columns:]
        sums += (probs if attention_mask is None else probs.nan_to_num_(0.0)).sum((2, 3))
        if attention_mask is not None:  # [b|1, hk|1, g|1, columns]: the pairs that see each key
            seen = visible[..., k_len - columns:].sum(3, dtype=torch.float32)
            counts += seen.sum(2) * (g // seen.shape[2])
    if attention_mask is None:
        counts += causal_probe_counts(rows, q_len, k_len, columns, g).to(counts.device)
    return sums, counts


def decode_probe_scores(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, columns: int, *, scaling: float,
                        softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode probe's :func:`column_scores` on the last ``columns`` of the full-precision ``key [b, hk, m, d]``
    without the rest of its row: each probability is ``exp(score - lse)``, with ``lse [b, h]`` the logsumexp over
    every key the query saw (the fused kernel's, blocks included)."""
    b, h, _, d = query.shape
    hk = key.shape[1]
    recent = key[:, :, key.shape[2] - columns:].float()
    scores = query.float().view(b, hk, h // hk, d) @ recent.transpose(-1, -2) * scaling  # [b, hk, g, columns]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.exp(scores - lse.view(b, hk, h // hk, 1)).unsqueeze(3)  # one probe row: [b, hk, g, 1, columns]
    return column_scores(probs, torch.ones(1, 1, 1, 1, columns, dtype=torch.bool, device=query.device), columns)


def probe_counts(params: ZipCacheParams, n: int) -> tuple[int, int]:
    """``(recent, random)`` probes among ``n`` queries: the two ratios of ``n`` (at least one recent), scaled down
    together to ``max_probes`` in all."""
    recent = max(1, min(n, round(params.probe_recent_ratio * n + 1e-9)))
    randoms = min(n - recent, round(params.probe_random_ratio * n + 1e-9))
    if params.max_probes and recent + randoms > params.max_probes:
        keep = params.max_probes / (recent + randoms)
        recent, randoms = max(1, int(recent * keep)), int(randoms * keep)
    return recent, randoms


# --------------------------------------------------------------------------------------------------- cache layer


class ZipCacheLayer(TensorMapLayerMixin, CacheLayerMixin):
    """One layer's ZipCache: quantised blocks + a full-precision recent buffer with its probe statistics.

    ``update`` appends the new tokens to the buffer, returns dequantised past + buffer (so any attention function
    sees correct keys/values) and hands itself to its variant, whose ``attention`` records probe rows and calls
    :meth:`after_attention`, which quantises the buffer when due. On a ``deferred`` decode step it returns only the
    full-precision tokens and the variant reads the blocks itself (see the module docstring). Mask sizes and
    sequence lengths follow ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` exactly (counting every token), so
    transformers' masks line up.
    """

    is_compileable = False
    is_croppable = False
    #: decode steps of full layers read blocks as stored, salient first (False: always in token order)
    decode_in_stored_order = True

    def __init__(self, variant: ZipCache, sliding_window: int | None = None):
        super().__init__()
        self.variant = variant
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self._clear()

    def _clear(self) -> None:
        self.blocks: list[QuantizedBlock] = []
        self.sink_keys = self.sink_values = None  # [b, hk, s, d], the first tokens, full precision
        self.recent_keys = self.recent_values = None  # [b, hk, m, d], model dtype
        self.score_sums = self.score_counts = None  # [b, hk, m] float32, probe statistics of the buffer
        self.seen = 0  # tokens appended so far (the sequence length)
        self.window_steps = 0  # decode steps in the current streaming window
        self.window_probes: set[int] = set()
        self.blocks_made = 0
        self.pending_key = None
        self.shuffled = False  # the keys update() returned have blocks in stored (salient-first) order
        self.deferred = False  # update() returned only the full-precision tokens: the blocks are read in attention

    # -- transformers' layer interface -------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        d = key_states.shape[-1]
        if d % (8 // self.variant.params.low_bits):
            raise ValueError(f"zipcache: head_dim {d} cannot be packed at {self.variant.params.low_bits} bits")
        b, hk = key_states.shape[:2]
        group = self.variant.params.value_group_size
        if group and (hk * d) % group:
            raise ValueError(f"zipcache: value_group_size {group} does not divide the {hk * d} value channels of a "
                             f"token ({hk} KV heads x head_dim {d})")
        self.device, self.dtype = key_states.device, key_states.dtype
        self.sink_keys = self.recent_keys = key_states.new_zeros(b, hk, 0, d)
        self.sink_values = self.recent_values = value_states.new_zeros(b, hk, 0, value_states.shape[-1])
        self.score_sums = key_states.new_zeros(b, hk, 0, dtype=torch.float32)
        self.score_counts = torch.zeros_like(self.score_sums)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len = key_states.shape[2]
        needed = self._visible_past()
        if self.sliding_window is not None:
            self._drop_before(needed)
        self.recent_keys = torch.cat([self.recent_keys, key_states], dim=2)
        self.recent_values = torch.cat([self.recent_values, value_states], dim=2)
        zeros = self.score_sums.new_zeros(*self.score_sums.shape[:2], q_len)
        self.score_sums = torch.cat([self.score_sums, zeros], dim=2)
        self.score_counts = torch.cat([self.score_counts, zeros], dim=2)
        if q_len == 1:
            if self.window_steps == 0:
                self._draw_window_probes()
            self.window_steps += 1
        # Decode steps of full layers leave the blocks packed where the fused kernel can read them: only the
        # full-precision tokens go back (the variant attends the blocks, or dequantises them after all when a mask
        # or the weights are needed; a probe step scores its own tokens with the kernel's logsumexp). The mask sizes
        # still count every token.
        self.deferred = (q_len == 1 and self.sliding_window is None and bool(self.blocks)
                         and self.variant.params.decode_kernel and kernel_usable(key_states))
        # Other decode steps of full layers take blocks as stored (salient first): attention does not care about the
        # order of keys that are all visible (the variant restores token order where a mask exists). Saves a gather
        # and the bitmap decoding per block and step.
        self.shuffled = (not self.deferred and self.decode_in_stored_order and q_len == 1
                         and self.sliding_window is None and any(block.bitmap is not None for block in self.blocks))
        keys, values = self.keys_values(blocks=not self.deferred, in_order=not self.shuffled)
        if keys.shape[2] > needed + q_len:  # a sliding layer holding a partly expired block
            keys, values = keys[:, :, -(needed + q_len):], values[:, :, -(needed + q_len):]
        self.seen += q_len
        self.pending_key = keys
        handoff(self.variant.host)[PENDING_KEY] = self
        return keys, values

    def keys_values(self, blocks: bool = True, in_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks, the blocks dequantised to the model dtype (``blocks``; in token order or as stored), recent
        buffer."""
        past = [(self.sink_keys, self.sink_values)] if self.sink_keys.shape[2] else []
        if blocks:
            past += [block.dequantize(self.dtype, in_order=in_order) for block in self.blocks]
        keys = torch.cat([k for k, _ in past] + [self.recent_keys], dim=2) if past else self.recent_keys
        values = torch.cat([v for _, v in past] + [self.recent_values], dim=2) if past else self.recent_values
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is None:
            return self.seen + query_length, 0
        return self._visible_past() + query_length, max(self.seen - self.sliding_window + 1, 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        self._clear()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a ZipCache layer cannot be cropped: its quantised tokens cannot be restored exactly")

    # -- storage ------------------------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """True bytes held: packed codes, quantisation parameters, bitmaps, sinks, recent buffer and statistics."""
        tensors = [t for block in self.blocks for t in block.tensors()]
        tensors += [t for t in self._buffers() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def recent_length(self) -> int:
        return 0 if self.recent_keys is None else self.recent_keys.shape[2]

    @property
    def quantized_length(self) -> int:
        return sum(block.n for block in self.blocks)

    def _buffers(self) -> tuple:
        return (self.sink_keys, self.sink_values, self.recent_keys, self.recent_values, self.score_sums,
                self.score_counts)

    def _map(self, fn) -> None:
        if not self.is_initialized:
            return
        for block in self.blocks:
            block.map(fn)
        (self.sink_keys, self.sink_values, self.recent_keys, self.recent_values, self.score_sums,
         self.score_counts) = (fn(t) for t in self._buffers())

    def key_positions(self, k_len: int) -> torch.Tensor:
        """Token position of every key row ``update`` returned, ``[b, hk, k_len]`` (blocks as stored)."""
        b, hk = self.recent_keys.shape[:2]
        parts, start = [], self.sink_keys.shape[2]
        span = lambda lo, hi: torch.arange(lo, hi, device=self.device).expand(b, hk, hi - lo)
        parts.append(span(0, start))
        for block in self.blocks:
            stored = block.stored_positions()
            parts.append(span(start, start + block.n) if stored is None else stored + start)
            start += block.n
        parts.append(span(start, k_len))
        return torch.cat(parts, dim=-1)

    def _visible_past(self) -> int:
        """Past tokens the next forward attends to (all, or the last ``window - 1`` of a sliding layer)."""
        return self.seen if self.sliding_window is None else min(self.seen, self.sliding_window - 1)

    def _drop_before(self, keep: int) -> None:
        """Forget everything but the last ``keep`` tokens, at block granularity (a sliding layer)."""
        stored = self.quantized_length + self.recent_length
        while self.blocks and stored - self.blocks[0].n >= keep:
            stored -= self.blocks.pop(0).n
        if not self.blocks and stored > keep:
            start = stored - keep
            self.recent_keys, self.recent_values = self.recent_keys[:, :, start:], self.recent_values[:, :, start:]
            self.score_sums, self.score_counts = self.score_sums[:, :, start:], self.score_counts[:, :, start:]

    # -- the variant's side ---------------------------------------------------------------------------------------

    def _rng(self) -> random.Random:
        p = self.variant.params
        return random.Random(p.seed * 1_000_003 + self.variant.layer_idx * 10_007 + self.seen)

    def _draw_window_probes(self) -> None:
        n = self.variant.params.requant_interval
        recent, count = probe_counts(self.variant.params, n)
        earlier = n - recent
        randoms = self._rng().sample(range(1, earlier + 1), count)
        self.window_probes = set(randoms) | set(range(earlier + 1, n + 1))

    def decode_step_is_probe(self) -> bool:
        return self.window_steps in self.window_probes

    def pick_probes(self, q_len: int) -> torch.Tensor:
        """Probe query rows of a multi-query forward: the last ``probe_recent_ratio`` (>= 1) + random earlier ones."""
        recent, count = probe_counts(self.variant.params, q_len)
        earlier = q_len - recent
        randoms = sorted(self._rng().sample(range(earlier), count))
        return torch.tensor(randoms + list(range(earlier, q_len)), device=self.device)

    def record_probes(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.score_sums += sums
        self.score_counts += counts

    def after_attention(self, q_len: int) -> None:
        if q_len > 1 or self.window_steps >= self.variant.params.requant_interval:
            self.quantize_recent()
        if self.sliding_window is not None:  # the next forward sees only the last window - 1 tokens
            self._drop_before(self.sliding_window - 1)

    def quantize_recent(self) -> None:
        """Quantise the recent buffer: per block, the top ``salient_ratio`` tokens by estimated normalised score at
        ``high_bits``, the rest at ``low_bits``. Full layers first move the sequence's first ``sink_tokens`` to the
        full-precision sinks; sliding layers drop what will never be seen again and cut the rest into blocks of at
        most ``requant_interval`` tokens, so tokens expire from the window at that granularity."""
        p = self.variant.params
        buffers = [self.recent_keys, self.recent_values, self.score_sums, self.score_counts]
        if self.sliding_window is None:
            sinks = min(p.sink_tokens - self.sink_keys.shape[2], buffers[0].shape[2])
            if sinks > 0 and not self.blocks:
                self.sink_keys = torch.cat([self.sink_keys, buffers[0][:, :, :sinks]], dim=2)
                self.sink_values = torch.cat([self.sink_values, buffers[1][:, :, :sinks]], dim=2)
                buffers = [t[:, :, sinks:] for t in buffers]
            pieces = [buffers[0].shape[2]] if buffers[0].shape[2] else []  # all sinks so far: no block
        else:
            n = min(buffers[0].shape[2], self.sliding_window - 1)
            buffers = [t[:, :, t.shape[2] - n:] for t in buffers]
            pieces = [n % p.requant_interval] * (n % p.requant_interval > 0) + [p.requant_interval] * (
                n // p.requant_interval)
        param_dtype = torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float16
        start = 0
        for n in pieces:
            keys, values, sums, counts = (t[:, :, start : start + n] for t in buffers)
            start += n
            self.blocks.append(QuantizedBlock.from_scores(keys, values, sums / counts.clamp_min(1.0), p, param_dtype))
            self.blocks_made += 1
        # fresh empty tensors: a zero-length view would keep the whole full-precision buffer alive
        self.recent_keys, self.recent_values, self.score_sums, self.score_counts = (
            t[:, :, :0].clone() for t in buffers)
        self.window_steps = 0


# --------------------------------------------------------------------------------------------------- the variant


@register_variant
class ZipCache(Variant):
    name = "zipcache"
    description = ("ZipCache: packed mixed-precision KV cache (salient tokens with their own ranges and bits) with "
                   "probe-estimated normalised attention saliency and streaming re-quantisation.")
    Params = ZipCacheParams
    presets = {"paper": PAPER_SETTING}
    legacy_defaults = {"max_probes": 0}  # specs saved before the cap probed 10 % of every prompt
    role = KV_CACHE
    #: a prefill approximation under it computes multi-query forwards (its prefill); decode steps, which
    #: prefill approximations run exactly, take the fused kernel (probe steps too) or dequantise the blocks
    stacks_over = (PREFILL,)

    def detach(self, attention_module) -> None:
        handoff(attention_module).pop(PENDING_KEY, None)  # a layer whose update ran without an attention call

    def make_cache_layer(self, default_layer):
        if isinstance(default_layer, DynamicSlidingWindowLayer):
            return ZipCacheLayer(self, default_layer.sliding_window) if self.params.quantize_sliding else None
        if type(default_layer) is DynamicLayer:
            return ZipCacheLayer(self)
        warn_once(f"zipcache: {type(default_layer).__name__} cache layers are kept as they are (not quantised)")
        return None

    def attention(self, module, query, key, value, attention_mask, *, scaling, dropout=0.0, softcap=None, **kwargs):
        """Attention over what the layer's ``update`` returned, plus its side work (probe rows, re-quantisation).

        A deferred decode step (``key``/``value`` hold only the full-precision tokens) runs the fused kernel over
        the packed blocks when ``attention_mask`` is None: what sdpa's mask maker, registered for patchattn, gives
        a decode step without padding (it checks the 2D padding mask once per forward, for every layer), so no
        per-layer check is needed here. A mask (left padding), requested weights or attention dropout fall back to
        dequantising the blocks in token order and the path below."""
        layer: ZipCacheLayer | None = handoff(module).pop(PENDING_KEY, None)
        if layer is None or layer.pending_key is not key:  # not our cache (plain forward, user's DynamicCache)
            return self.inner_attention(module, query, key, value, attention_mask, scaling=scaling,
                                        dropout=dropout, softcap=softcap, **kwargs)
        layer.pending_key = None
        if layer.deferred:
            if attention_mask is None and not kwargs.get("output_attentions") and not (dropout and module.training):
                probe = layer.decode_step_is_probe()
                out = quantized_decode_attention(query, layer.blocks, key, value, scaling=scaling, softcap=softcap,
                                                 return_lse=probe)
                if probe:  # the probe's row over the buffer: exp(score - logsumexp over every key)
                    out, lse = out
                    layer.record_probes(*decode_probe_scores(query, key, lse, layer.recent_length, scaling=scaling,
                                                             softcap=softcap))
                layer.after_attention(1)
                return out, None
            warn_once("zipcache: a decode step with a padding mask, returned attention weights or attention dropout "
                      "dequantises the blocks (the fused decode kernel takes none of them)")
            key, value = layer.keys_values()  # in token order, as the mask expects
        hk, q_len, k_len = key.shape[1], query.shape[2], key.shape[2]
        columns = layer.recent_length
        if layer.shuffled and (attention_mask is not None or kwargs.get("output_attentions")):
            # a mask (padding) or returned weights need token order: put the stored-order blocks back
            positions = layer.key_positions(k_len).unsqueeze(-1)
            key = torch.empty_like(key).scatter_(2, positions.expand_as(key), key)
            value = torch.empty_like(value).scatter_(2, positions.expand_as(value), value)
        if q_len == 1 and layer.decode_step_is_probe():  # one eager step gives this probe's row for free
            out, weights = eager_attention(module, query, key, value, attention_mask, scaling=scaling,
                                           dropout=dropout, softcap=softcap)
            rows = torch.zeros(1, dtype=torch.long, device=query.device)
            visible = _grouped(visible_rows(attention_mask, rows, 1, k_len, query.device), hk)
            layer.record_probes(*column_scores(_grouped(weights, hk), visible, columns))
            result = (out, weights if kwargs.get("output_attentions") else None)
        else:
            result = self.inner_attention(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, softcap=softcap, **kwargs)
        if q_len > 1:
            layer.record_probes(*probe_scores(query, key, layer.pick_probes(q_len), attention_mask, scaling=scaling,
                                              softcap=softcap, columns=columns,
                                              use_kernel=self.params.probe_kernel))
        layer.after_attention(q_len)
        return result

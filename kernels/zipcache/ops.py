"""Host side of the ZipCache kernels: for the decode kernel segments, split sizes and the launches (one per
segment, one to attend the full-precision tokens and merge); for the prefill probes the sorted probe rows, the
analytic counts and the two launches.

:func:`quantized_decode_attention` and :func:`probe_column_scores` are the entries: the fused kernel on CUDA (or
on CPU with ``KERNEL_ON_CPU``, which only works under Triton's interpreter, ``TRITON_INTERPRET=1`` set before triton
is imported: how the tests compare both paths without a GPU), the reference in ``naive.py`` elsewhere.
"""
from __future__ import annotations

import functools
import logging

import torch

from .. import triton_can_take
from .naive import causal_probe_counts, probe_scores_reference, quantized_decode_attention_reference

#: send CPU tensors to the Triton kernel too (only under TRITON_INTERPRET=1; see the module docstring)
KERNEL_ON_CPU = False
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: segment-kernel programs resident on one multiprocessor at once (d <= 128: 128 registers x 128 threads, capped at
#: launch: 4 of 16 warp slots)
_PROGRAMS_PER_SM = 4
#: rows per program on CUDA: splits for about one wave of programs, within these bounds (H200, d = 128, one segment,
#: --tiles at 850014b: 512 rows at 32k b = 1, 2,048 at 131k b = 1 and b = 8, the best of 512 / 1,024 / 2,048)
_SPLIT_ROWS = (512, 2048)


def kernel_usable(x: torch.Tensor) -> bool:
    """Whether the fused kernel runs for tensors like ``x`` (CUDA, or CPU under the switch and the interpreter)."""
    return (x.is_cuda or KERNEL_ON_CPU) and x.dtype in SUPPORTED_DTYPES and triton_can_take(x)


def block_segments(block) -> list[tuple]:
    """``(key part, key row, value part, value row, rows)`` per segment of a ``QuantizedBlock``: its stored rows cut
    wherever a key or value tensor ends (salient-first blocks: at ``n_high``; keys may span both segments)."""
    def starts(parts, row_dim):
        out, row = [], 0
        for part in parts:
            out.append(row)
            row += part.codes.shape[row_dim]
        if row != block.n:
            raise ValueError(f"block parts cover {row} rows, the block has {block.n}")
        return out

    key_starts, value_starts = starts(block.keys, 2), starts(block.values, 1)
    cuts = sorted(set(key_starts) | set(value_starts) | {block.n})
    segments = []
    for lo, hi in zip(cuts, cuts[1:]):
        ki = max(i for i, s in enumerate(key_starts) if s <= lo)
        vi = max(i for i, s in enumerate(value_starts) if s <= lo)
        segments.append((block.keys[ki], lo - key_starts[ki], block.values[vi], lo - value_starts[vi], hi - lo))
    return segments


def _check(query, keys, values) -> None:
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"expected one decode query per sequence, query [b, h, 1, d]; got {tuple(query.shape)}")
    b, h, _, d = query.shape
    if keys.dim() != 4 or keys.shape != values.shape or keys.shape[0] != b or keys.shape[3] != d:
        raise ValueError(f"keys and values must both be [b={b}, hk, m, d={d}]; got {tuple(keys.shape)} and "
                         f"{tuple(values.shape)}")
    if keys.dtype != query.dtype or values.dtype != query.dtype:
        raise ValueError(f"query, keys and values must share one dtype; got {query.dtype}, {keys.dtype}, "
                         f"{values.dtype}")
    if h % keys.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({keys.shape[1]})")
    if keys.shape[2] == 0:
        raise ValueError("the full-precision keys must hold at least the current token")


def _widest_tile(segments) -> int:
    """The most rows a tile may take so that it lies in one key group (tiles are aligned to the key rows): the
    largest power of two dividing the group of every key tensor holding more than one (no limit: 1 << 30)."""
    groups = [key.group for _, key, *_ in segments if key.codes.shape[2] > key.group]
    return min(group & -group for group in groups) if groups else 1 << 30


def quantized_decode_attention(query, blocks, keys, values, *, scaling: float, softcap: float | None = None,
                               block_n: int | None = None, split_len: int | None = None,
                               num_warps: int | None = None, num_stages: int | None = None,
                               return_lse: bool = False):
    """Exact softmax attention of one decode query per sequence over a ZipCache layer: its packed ``blocks`` read
    in place by the kernel, plus the full-precision ``keys``/``values [b, hk, m, d]`` (sinks + recent buffer,
    ``m >= 1``). ``query [b, h, 1, d]``; returns ``[b, 1, h, d]`` in its dtype (float32 accumulation); every key is
    visible (no mask). ``softcap``: Gemma 2's ``tanh`` logit capping. ``return_lse``: also each query head's
    logsumexp ``[b, h]`` float32 (the softmax's normaliser: a probe step scores its own tokens with it).
    ``block_n`` (rows per tile, a power of two >= 16 dividing the key group size), ``split_len`` (rows per program,
    a multiple of ``block_n``), ``num_warps`` and ``num_stages`` default to sizes for the device. Key groups that
    are not a multiple of 16 tokens (``key_group_size``) and head dims whose codes do not fill whole 16-bit words
    take the reference path (logged once)."""
    _check(query, keys, values)
    reference = functools.partial(quantized_decode_attention_reference, query, blocks, keys, values, scaling=scaling,
                                  softcap=softcap, return_lse=return_lse)
    if not kernel_usable(query):
        return reference()
    b, h, _, d = query.shape
    hk, g = keys.shape[1], h // keys.shape[1]
    segments = [(block.value_scale.contiguous(), *seg) for block in blocks for seg in block_segments(block)]
    if any(d * part.bits % 16 for _, key, _, value, *_ in segments for part in (key, value)):
        _log_fallback_once(f"head_dim {d} does not fill whole 16-bit words of packed codes at "
                           f"{sorted({part.bits for _, key, _, value, *_ in segments for part in (key, value)})} bits")
        return reference()
    widest = _widest_tile(segments)
    if block_n is None:
        # H200, d = 128, 131k: 128-row tiles 4-10 % faster than 64 (bench_zipcache_kernel --tiles); the
        # interpreter: small tiles, so tests cross several
        block_n = min(widest, (128 if d <= 128 else 64) if query.is_cuda else 16)
        if block_n < 16:
            _log_fallback_once(f"key groups are multiples of {widest} tokens only, the kernel's tiles need 16 rows "
                               "inside one group (a key_group_size that is a multiple of 16, or 0, keeps it)")
            return reference()
    elif block_n < 16 or block_n & (block_n - 1) or block_n > widest:
        raise ValueError(f"block_n ({block_n}) must be a power of two in [16, {widest}] (a tile must lie in "
                         f"one key group)")
    # (scale, key, k_row0, value, v_row0, rows, lead): tiles are aligned to key rows, a segment's first one starts
    # ``lead`` rows before it
    segments = [(*seg, seg[2] % block_n) for seg in segments]
    if split_len is None:
        split_lens = [_wave_split(lead + seg_len, b * hk, block_n, query.device) for *_, seg_len, lead in segments]
    elif split_len % block_n:
        raise ValueError(f"split_len ({split_len}) must be a multiple of block_n ({block_n})")
    else:
        split_lens = [split_len] * len(segments)
    from .triton_decode import launch_finish, launch_segment

    query, keys, values = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, keys, values))
    slots = sum(-(-(seg[-2] + seg[-1]) // split) for seg, split in zip(segments, split_lens))
    block_g = 1 << (g - 1).bit_length()  # the products' rows: padded to the tensor cores' 16 by the compiler
    block_d = max(16, 1 << (d - 1).bit_length())
    partials = (torch.empty(b * hk, slots, block_g, device=query.device, dtype=torch.float32),
                torch.empty(b * hk, slots, block_g, device=query.device, dtype=torch.float32),
                torch.empty(b * hk, slots, block_g, block_d, device=query.device, dtype=torch.float32))
    num_warps = num_warps or (4 if d <= 128 else 8)  # stages: Triton's 3 (H200: 1-3 % faster than 4 at 850014b)
    pdl = _programmatic_launch(query.device)
    split0 = 0
    for (scale, key, k_row0, value, v_row0, seg_len, lead), split in zip(segments, split_lens):
        launch_segment(query, key, value, scale, partials, seg_len=seg_len, k_row0=k_row0, v_row0=v_row0, lead=lead,
                       split_len=split, split0=split0, scaling=scaling, softcap=softcap, block_n=block_n,
                       num_warps=num_warps, num_stages=num_stages, pdl=pdl)
        split0 += -(-(lead + seg_len) // split)
    out = torch.empty(b, 1, h, d, device=query.device, dtype=query.dtype)
    lse = torch.empty(b, h, device=query.device, dtype=torch.float32) if return_lse else None
    launch_finish(query, keys, values, partials, out, lse, scaling=scaling, softcap=softcap, block_n=min(block_n, 64),
                  num_warps=num_warps, pdl=pdl and split0 > 0)  # early only behind a segment launch
    return (out, lse) if return_lse else out


def _wave_split(rows: int, heads: int, block_n: int, device: torch.device) -> int:
    """Rows per program for one segment launch of ``rows`` rows over ``heads`` sequence x KV-head pairs: about one
    wave of programs, per launch. A step's launches run one after another (a two-segment block's second launch
    does not overlap the first on the H200, with or without programmatic launch), so splits sized over all
    segments ran each launch in a part of a wave (H200, 131k tokens, b = 1, ``paper`` with its 60 % salient
    tokens: 312 and 208 programs of 2,048 rows, 0.110 ms; 1,024 rows for both 0.095)."""
    per_split = -(-rows // max(1, _resident_programs(device) // heads))
    if device.type == "cuda":
        per_split = min(max(per_split, _SPLIT_ROWS[0]), _SPLIT_ROWS[1])
    return max(1, -(-per_split // block_n)) * block_n


@functools.cache
def _resident_programs(device: torch.device) -> int:
    """Segment-kernel programs the device runs at once (CPU, the interpreter: an H200's 132 multiprocessors)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return _PROGRAMS_PER_SM * sms


@functools.cache
def _programmatic_launch(device: torch.device) -> bool:
    """Whether a step's launches overlap (programmatic dependent launch, Hopper on): each segment launch streams
    while the one before finishes, and the finish kernel attends the full-precision tokens meanwhile. H200, 131k
    tokens, b = 1: a one-segment block 0.0785 -> 0.0768 ms; a two-segment block's launches do not overlap yet
    (0.109 -> 0.108 ms; benchmarks/README.md, ZipCache decode)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def _log_fallback_once(why: str) -> None:
    logging.getLogger("patchattn").warning("zipcache decode: %s; decoding with the reference (dequantise every "
                                           "block) instead of the fused kernel.", why)


def probe_column_scores(query, key, rows, *, scaling: float, softcap: float | None = None,
                        columns: int | None = None, block_m: int | None = None, block_n: int | None = None,
                        num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ZipCache's prefill saliency probes under a causal mask (no padding): the probe query ``rows``' exact
    softmax over the keys each sees (row ``r`` sees keys ``j <= r + k_len - q_len``), summed over the GQA group's
    heads and the probes on the last ``columns`` keys, and how many (head, probe) pairs see each key: ``(sums,
    counts)``, both ``[b, hk, columns]`` float32. ``query [b, h, q_len, d]``, ``key [b, hk, k_len, d]`` (one
    dtype), ``k_len >= q_len``. The fused kernel (``triton_probe.py``: never builds the probe × key matrix) where
    usable, else the reference; the counts are analytic either way. ``block_m`` (query rows per tile, a power of
    two >= 16), ``block_n`` (keys per tile, likewise) and ``num_warps`` default to sizes for the device."""
    if query.dim() != 4 or key.dim() != 4 or key.shape[0] != query.shape[0] or key.shape[3] != query.shape[3]:
        raise ValueError(f"expected query [b, h, q, d] and key [b, hk, k, d]; got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    b, h, q_len, d = query.shape
    hk, k_len = key.shape[1], key.shape[2]
    columns = k_len if columns is None else columns
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if k_len < q_len:
        raise ValueError(f"causal probes need every query's own key: {k_len} keys for {q_len} queries")
    if not 0 <= columns <= k_len:
        raise ValueError(f"columns ({columns}) must be within 0 .. {k_len} keys")
    if key.dtype != query.dtype or not kernel_usable(query) or rows.numel() == 0 or columns == 0:
        return probe_scores_reference(query, key, rows, scaling=scaling, softcap=softcap, columns=columns)
    from .triton_probe import block_sizes, launch_probe_sums

    rows = rows.sort().values.to(device=query.device, dtype=torch.int32)
    query, key = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key))
    sums = torch.empty(b, hk, columns, device=query.device, dtype=torch.float32)
    default_m, default_n, default_warps = block_sizes(query)
    block_m, block_n, num_warps = block_m or default_m, block_n or default_n, num_warps or default_warps
    if any(x < 16 or x & (x - 1) for x in (block_m, block_n)):
        raise ValueError(f"block_m ({block_m}) and block_n ({block_n}) must be powers of two >= 16")
    launch_probe_sums(query, key, rows, sums, scaling=scaling, softcap=softcap, columns=columns, block_m=block_m,
                      block_n=block_n, num_warps=num_warps)
    counts = causal_probe_counts(rows, q_len, k_len, columns, h // hk).expand(b, hk, columns).contiguous()
    return sums, counts

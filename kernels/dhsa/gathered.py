"""Block-sparse DHSA attention in PyTorch: each query block gathers only the key chunks it kept, so the work is
the density times that of dense attention. Runs where the Triton kernel does not (CPU, softcap, other head dims,
gradients: it is plain autograd); memory is bounded by processing query blocks in groups.
"""
from __future__ import annotations

import torch

from .naive import NEG_INF
from .select import BlockSelection


def gathered_attention(q, k, v, sel: BlockSelection, scaling: float, *, key_valid=None, softcap=None,
                       step_bytes: int = 256 * 2**20) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[b, h, n, d]``, k/v ``[b, hk, n, d]``; returns ``(out in q's dtype, lse fp32)`` like the kernel."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    C, B = sel.chunk_size, sel.query_block
    nqb, width = sel.idx.shape[2], sel.idx.shape[3]
    dev = q.device
    nc = -(-n // C)
    # chunk-major views: gathering whole chunks copies C*d contiguous values at a time
    kc, vc = (torch.nn.functional.pad(x, (0, 0, 0, nc * C - n)).view(b, hk, nc, C, x.shape[-1]) for x in (k, v))
    out = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=dev)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=dev)
    per_block = b * h * width * C * (2 * d + 2 * B) * 4  # gathered K, V, scores and mask
    group = max(1, step_bytes // per_block)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    kvh = (torch.arange(h, device=dev) // (h // hk))[None, :, None, None]
    ar = torch.arange(C, device=dev)
    for i0 in range(0, nqb, group):
        i1 = min(nqb, i0 + group)
        r0, r1 = i0 * B, min(n, i1 * B)
        idx = sel.idx[:, :, i0:i1].long()  # [b, h, G, L]
        kk = kc[bi, kvh, idx.clamp_min(0)].flatten(3, 4).float()  # [b, h, G, L*C, d]
        vv = vc[bi, kvh, idx.clamp_min(0)].flatten(3, 4).float()
        keys = (idx[..., None] * C + ar).flatten(-2)  # [b, h, G, L*C]; negative for empty slots
        qq = torch.nn.functional.pad(q[:, :, r0:r1], (0, 0, 0, (i1 - i0) * B - (r1 - r0))).float()
        s = qq.view(b, h, i1 - i0, B, d) @ kk.transpose(-1, -2)  # [b, h, G, B, L*C]
        s.mul_(scaling)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        qpos = r0 + torch.arange((i1 - i0) * B, device=dev).view(i1 - i0, B)
        allowed = (keys >= 0)[:, :, :, None, :] & (keys[:, :, :, None, :] <= qpos[:, :, None])
        if key_valid is not None:
            allowed &= key_valid[bi, keys.clamp(0, n - 1)][:, :, :, None, :]  # keys >= n: masked causally
        s.masked_fill_(~allowed, NEG_INF)
        m = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))  # not in place: autograd keeps s
        out[:, :, r0:r1] = (p @ vv).flatten(2, 3)[:, :, : r1 - r0].to(q.dtype)
        lse[:, :, r0:r1] = m.flatten(2, 3)[:, :, : r1 - r0]
    return out, lse


__all__ = ["gathered_attention"]

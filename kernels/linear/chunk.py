"""Chunked PyTorch normalised gated linear attention: the CPU path, and the readable form of the Triton kernels.

Same contract as ``naive.normalized_gla_recurrent`` (shapes, fp32 state ``(S, z)``, output in v's dtype) and
differentiable through autograd, including the log decays and the initial state. Per chunk of ``C`` tokens with
in-chunk inclusive cumulative log decay ``B_t`` (``B_C`` at the chunk's end) and the state ``(S, z)`` at its start:

    intra:  A_ts = exp(B_t - B_s) (q_t · k_s)  for s <= t (same chunk), else 0
    num_t = Σ_s A_ts v_s + exp(B_t) q_t S          den_t = Σ_s A_ts + exp(B_t) q_t · z    (ones column of v)
    o_t   = num_t / (den_t + eps)  if normalize, else num_t
    next state:  S' = exp(B_C) S + Σ_s exp(B_C - B_s) k_sᵀ v_s        z' = exp(B_C) z + Σ_s exp(B_C - B_s) k_s

Every exponent is ``<= 0`` (later minus earlier cumulative log decay), so nothing overflows however strong the
decays are. Everything runs in float32.
"""
from __future__ import annotations

import torch

CHUNK = 64


def normalized_gla_chunked(q, k, v, log_decay=None, *, initial_state=None, normalize=True, eps=1e-6,
                           chunk_size: int = CHUNK):
    """Returns ``(o [b, h, n, dv] in v's dtype, (S [b, hk, dk, dv], z [b, hk, dk]) in float32)``."""
    b, h, n, dk = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    g = h // hk
    C = int(chunk_size)
    nc = max(1, -(-n // C))
    pad = nc * C - n
    qf, kf, vf = q.float(), k.float(), v.float()
    a = None if log_decay is None else log_decay.float()
    if pad:
        qf, kf, vf = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf))
        if a is not None:
            a = torch.nn.functional.pad(a, (0, pad))  # log γ = 0 on padding: the state passes through unchanged
    qc = qf.reshape(b, hk, g, nc, C, dk)
    kc = kf.reshape(b, hk, nc, C, dk)
    vc = vf.reshape(b, hk, nc, C, dv)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if a is None:
        dmat = causal.float().expand(b, hk, nc, C, C)
        qdec = torch.ones(b, hk, nc, C, device=q.device)  # exp(B_t)
        kdec = qdec  # exp(B_C - B_s)
        cdec = torch.ones(b, hk, nc, device=q.device)  # exp(B_C)
    else:
        B = a.reshape(b, hk, nc, C).cumsum(-1)
        diff = (B[..., :, None] - B[..., None, :]).masked_fill(~causal, float("-inf"))
        dmat = diff.exp()
        qdec = B.exp()
        kdec = (B[..., -1:] - B).exp()
        cdec = B[..., -1].exp()

    # intra-chunk: all chunks at once
    A = torch.einsum("bkgctd,bkcsd->bkgcts", qc, kc) * dmat[:, :, None]
    num = torch.einsum("bkgcts,bkcse->bkgcte", A, vc)
    den = A.sum(-1) if normalize else None

    # inter-chunk: per-chunk contributions in parallel, then a scan over chunks (the only sequential part)
    kd = kc * kdec[..., None]
    U = torch.einsum("bkcsd,bkcse->bkcde", kd, vc)  # [b, hk, nc, dk, dv]
    u = kd.sum(-2)  # [b, hk, nc, dk]
    if initial_state is None:
        S = q.new_zeros(b, hk, dk, dv, dtype=torch.float32)
        z = q.new_zeros(b, hk, dk, dtype=torch.float32)
    else:
        S, z = (t.float() for t in initial_state)
    starts_S, starts_z = [], []
    for c in range(nc):
        starts_S.append(S)
        starts_z.append(z)
        S = cdec[:, :, c, None, None] * S + U[:, :, c]
        z = cdec[:, :, c, None] * z + u[:, :, c]
    Ss = torch.stack(starts_S, 2)  # [b, hk, nc, dk, dv]
    zs = torch.stack(starts_z, 2)
    qd = qc * qdec[:, :, None, :, :, None]
    num = num + torch.einsum("bkgctd,bkcde->bkgcte", qd, Ss)
    if normalize:
        den = den + torch.einsum("bkgctd,bkcd->bkgct", qd, zs)
        num = num / (den[..., None] + eps)
    o = num.reshape(b, h, nc * C, dv)[:, :, :n]
    return o.to(v.dtype), (S, z)


def normalized_gla_step_torch(q, k, v, log_decay, state, *, normalize=True, eps=1e-6):
    """One decode token: ``q [b, h, 1, dk]``, ``k [b, hk, 1, dk]``, ``v [b, hk, 1, dv]``, ``log_decay [b, hk, 1]``
    or None, ``state = (S, z)`` fp32 or None (zeros). Returns ``(o [b, h, 1, dv], (S', z'))``; differentiable."""
    b, h, _, dk = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    g = h // hk
    if state is None:
        S = q.new_zeros(b, hk, dk, dv, dtype=torch.float32)
        z = q.new_zeros(b, hk, dk, dtype=torch.float32)
    else:
        S, z = (t.float() for t in state)
    kf, vf = k[:, :, 0].float(), v[:, :, 0].float()
    if log_decay is not None:
        gamma = log_decay[:, :, 0].float().exp()
        S = S * gamma[..., None, None]
        z = z * gamma[..., None]
    S = S + kf[..., :, None] * vf[..., None, :]
    z = z + kf
    qf = q[:, :, 0].float().reshape(b, hk, g, dk)
    num = torch.einsum("bkgd,bkde->bkge", qf, S)
    if normalize:
        num = num / (torch.einsum("bkgd,bkd->bkg", qf, z)[..., None] + eps)
    return num.reshape(b, h, 1, dv).to(v.dtype), (S, z)

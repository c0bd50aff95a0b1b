"""The shared machinery of the linear-attention variants: masks, causal conv, recurrence, hybrid window, cache.

A variant supplies its feature maps (``feature_maps``), optionally a decay (``log_decay``) and how the recurrence
becomes an output (``mix``; default: normalised ``φ(q)S / (φ(q)·z + ε)``). :meth:`LinearAttentionVariant.run`
processes a chunk of new tokens from a state (a dict of tensors, ``None`` at the start) and returns the next state,
so a full forward, a prefill and every decode step are the same computation: the full sequence from ``None`` when
transformers handed the layer every key (no cache, or a plain ``DynamicLayer`` on a single call), the new tokens
from the cache layer's state otherwise (:class:`~.cache.LinearStateLayer`, constant size in the context length).

Conventions (all variants):

* q/k are the attention module's inputs to the attention function: **post-RoPE** (and post QK-norm where the
  family has one), as LoLCATs and LAWCAT linearise them. GQA is native: key features and the state are per KV head,
  the query heads of a group read their KV head's state; K/V are never expanded.
* Padding (from the mask: the diagonal of the new tokens' block) contributes nothing: padded q/k/v are zeroed
  before the conv, padded key features are zero and padded tokens do not decay the state, so a left-padded row
  computes exactly what the unpadded sequence does.
* Sliding-window layers (Mistral, Gemma 2/3 local layers) become linear attention over the whole prefix: the
  state is constant-size anyway. The original window is only used to read padding from its mask. Logit softcap
  (Gemma 2) applies to the exact window branch; the linear terms have no logits to cap.
* Packed sequences and custom masks are refused (the state would mix what the mask separates).
* ``window=W`` (normalised variants): the LoLCATs-style hybrid. Each query sees its last ``W`` keys (itself
  included) through exact softmax terms ``exp(q·k·scaling + β_h)`` and every older key through the linear kernel
  (decayed where the variant decays), one shared normaliser. ``β_h`` (learnable, per head) puts both on one scale.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.linear import normalized_gla, normalized_gla_step
from ..base import REPLACEMENT, VariantParams, handoff, module_dims, param
from ..gated import HiddenStatesVariant
from .cache import STATE_KEY, LinearStateLayer

State = dict[str, torch.Tensor]


def scan(q, k, v, log_decay, state, *, normalize: bool):
    """The recurrence ``S_t = γ_t S_{t-1} + k_tᵀv_t``, ``z_t = γ_t z_{t-1} + k_t`` from ``state = (S, z)`` (None =
    zeros): returns ``(φ(q)S / (φ(q)·z + ε) or φ(q)S, (S, z))``. The one call into ``patchattn.kernels.linear``."""
    if q.shape[2] == 1:
        return normalized_gla_step(q, k, v, log_decay, state, normalize=normalize)
    return normalized_gla(q, k, v, log_decay, initial_state=state, output_final_state=True, normalize=normalize)


def window_param():
    """The ``window`` parameter of the variants that offer the hybrid (normalised, non-negative kernels)."""
    return param(0, low=0, high=1 << 20,
                 help="exact softmax over each query's last W keys, linear attention for older ones (one "
                      "normaliser, LoLCATs-style hybrid); 0 = linear only")


def new_token_validity(attention_mask, q_len: int, sliding_window=None) -> torch.Tensor | None:
    """``[b, q]`` bool: which new tokens are real (None: all). The mask's last ``q`` columns are the new tokens
    (with the variant's cache the keys are only those; the mask still spans the layer's usual key range). Raises
    unless the mask is causal (or the layer's sliding window) AND key padding."""
    if attention_mask is None:
        return None
    m = attention_mask[:, 0]
    if m.dtype != torch.bool:
        m = m > torch.finfo(m.dtype).min / 2
    block = m.expand(m.shape[0], q_len, m.shape[-1])[:, :, m.shape[-1] - q_len:]  # the new tokens' own columns
    valid = block.diagonal(dim1=1, dim2=2)  # every real token sees itself, padding sees nothing
    expected = valid.clone()
    if sliding_window is not None and q_len > sliding_window:
        expected[:, : q_len - sliding_window] = False
    if not bool(((block[:, -1] == expected) | ~valid[:, -1:]).all()):
        raise ValueError("linear-attention variants support causal masks with padding only; this mask hides keys "
                         "the last query should see (packed sequences or a custom mask), which a recurrent state "
                         "cannot do")
    return None if bool(valid.all()) else valid


def causal_conv(x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None):
    """Depthwise causal conv over time. ``x [b, H, n, d]``, ``weight [H, d, K]`` (tap ``K-1`` = the current
    token), ``tail [b, H, K-1, d]``: the inputs just before ``x`` (None = zeros, the sequence start).
    Returns ``(y [b, H, n, d], next tail)``."""
    size = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(x.shape[0], x.shape[1], size - 1, x.shape[3])
    padded = torch.cat([tail, x], dim=2)
    y = (padded.unfold(2, size, 1) * weight.float()[None, :, None]).sum(-1)
    return y, padded[:, :, padded.shape[2] - (size - 1):]


@torch.no_grad()
def random_feature_weights(kv_heads: int, head_dim: int, feature_dim: int, scaling: float, seed: int):
    """``[hk, d, f]`` Gaussian projections ``√scaling · N(0, 1)``: with them the feature map
    ``[softmax(xW), softmax(−xW)]`` is a positive random-feature estimate of ``exp(scaling · q·k)`` up to the
    constant ``2/f`` (softmax over f features ≈ ``exp(x·w − ‖x‖²/2)/f``, Performer's estimator with antithetic
    pairs), so the linear attention starts near softmax attention. Close for moderate logits only: the estimate's
    variance grows like ``exp(scaling·‖q‖²)``, and attention transfer does the rest."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(kv_heads, head_dim, feature_dim, generator=g) * math.sqrt(scaling)


def softmax_features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hedgehog's map ``[softmax(xW), softmax(−xW)]`` per head: ``x [b, H, n, d]``, ``weight [Hw, d, f]`` with
    ``H`` a multiple of ``Hw`` (the query heads of a GQA group use their KV head's map)."""
    b, heads = x.shape[:2]
    grouped = x.reshape(b, weight.shape[0], heads // weight.shape[0], *x.shape[2:])
    z = torch.einsum("bwgnd,wdf->bwgnf", grouped, weight.float()).reshape(b, heads, x.shape[2], -1)
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


class HedgehogFeatureMap:
    """Hedgehog's learnable feature map ``φ(x) = [softmax(xW), softmax(−xW)]`` (``softmax_features``), for the
    variants built on it: ``hedgehog`` (untied query and key maps) and ``lawcat`` (one map shared by q and k).
    Mixed into a ``LinearAttentionVariant`` whose params have ``feature_dim``; the variant keeps its maps as its own
    parameters (their names are its state-dict keys)."""

    def window_log_scale_init(self) -> float:
        """The map's kernel is ≈ ``(2/f)·exp(score)`` at init (see ``random_feature_weights``)."""
        return math.log(2.0 / self.params.feature_dim)

    def initial_feature_map(self) -> torch.Tensor:
        """``W [hk, d, f]`` for this layer: the random-feature draw that starts the map close to softmax."""
        return random_feature_weights(self.kv_heads, self.head_dim, self.params.feature_dim, self.scaling,
                                      seed=self.layer_idx)


class LinearAttentionVariant(HiddenStatesVariant):
    """Base of ``lawcat``, ``hedgehog``, ``mala``, ``nala``, ``lightning`` (see the module docstring)."""

    trainable = True
    role = REPLACEMENT

    def __init__(self, params: VariantParams, layer_idx: int):
        super().__init__(params, layer_idx)
        self.window = int(getattr(params, "window", 0))
        self.conv_size = int(getattr(params, "conv_size", 1))

    # -- what a variant defines -------------------------------------------------------------------------------
    def window_log_scale_init(self) -> float:
        """``β_h`` at init for the hybrid window: log of the kernel's scale relative to ``exp(score)``."""
        return 0.0

    def build_variant(self, attention_module: nn.Module) -> None:
        """Create the variant's own parameters (``self.heads``, ``kv_heads``, ``head_dim``, ``scaling`` are set)."""

    def feature_maps(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q [b, h, n, d]``, ``k [b, hk, n, d]`` (float32, after the conv) → ``φ(q) [b, h, n, f]``,
        ``φ(k) [b, hk, n, f]``."""
        raise NotImplementedError

    def log_decay(self, x: torch.Tensor, n: int) -> torch.Tensor | None:
        """``log γ [b, hk, n]`` (≤ 0) from the hidden states ``x [b, n, hidden]``; None = no decay."""
        return None

    def mix(self, fq, fk, v, log_decay, valid, state: State | None, new: State) -> torch.Tensor:
        """The linear-only output ``[b, h, n, dv]`` (float32); writes its recurrent state into ``new``."""
        out, (new["S"], new["z"]) = scan(fq, fk, v, log_decay, _pair(state), normalize=True)
        return out

    # -- patching ---------------------------------------------------------------------------------------------
    def build(self, attention_module: nn.Module) -> None:
        self.heads, self.head_dim, self.hidden_size = module_dims(attention_module)
        self.kv_heads = self.heads // int(attention_module.num_key_value_groups)
        self.scaling = float(attention_module.scaling)
        if self.conv_size > 1:
            identity = torch.zeros(self.conv_size)
            identity[-1] = 1.0  # the identity tap: the conv starts as a no-op
            self.q_conv = nn.Parameter(identity.repeat(self.heads, self.head_dim, 1))
            self.k_conv = nn.Parameter(identity.repeat(self.kv_heads, self.head_dim, 1))
        if self.window:
            self.window_log_scale = nn.Parameter(torch.full((self.heads,), self.window_log_scale_init()))
        self.build_variant(attention_module)

    def make_cache_layer(self, default_layer):
        return LinearStateLayer(self, default_layer)

    # -- the attention function -------------------------------------------------------------------------------
    def attention(self, module, query, key, value, attention_mask, *, scaling, softcap=None, sliding_window=None,
                  output_attentions=False, **kwargs):
        if output_attentions:
            raise ValueError(f"{self.name}: linear attention keeps a recurrent state and has no [query, key] attention "
                             f"weights to return (layer {self.layer_idx}); call the model with "
                             "output_attentions=False, or patch only the layers whose weights you do not need")
        n, k_len = query.shape[2], key.shape[2]
        x = self.take_hidden_states(module, n)
        layer: LinearStateLayer | None = handoff(module).pop(STATE_KEY, None)
        if layer is None and k_len != n:
            raise RuntimeError(f"{self.name}: layer {self.layer_idx} got {k_len} cached keys for {n} queries but no "
                               "recurrent state; decode with model.generate() (which installs the variant's cache "
                               "layers) or a cache from patchattn.cache.build_cache, not a plain transformers cache")
        valid = new_token_validity(attention_mask, n, sliding_window)
        out, state = self.run(query, key, value, x, valid, None if layer is None else layer.state, scaling, softcap)
        if layer is not None:
            layer.state = {name: t.detach() for name, t in state.items()}
        return out.transpose(1, 2).to(query.dtype).contiguous(), None

    def run(self, q, k, v, x, valid, state: State | None, scaling: float, softcap=None):
        """New tokens ``q [b, h, n, d]``, ``k``/``v [b, hk, n, d]``, hidden states ``x [b, n, hidden]``,
        ``valid [b, n]`` or None, from ``state`` → ``(out [b, h, n, dv] float32, next state)``."""
        q, k, v = q.float(), k.float(), v.float()
        if valid is not None:
            keep = valid[:, None, :, None].float()
            q, k, v = q * keep, k * keep, v * keep
        new: State = {}
        cq, ck = q, k
        if self.conv_size > 1:
            cq, new["q_tail"] = causal_conv(q, self.q_conv, None if state is None else state["q_tail"])
            ck, new["k_tail"] = causal_conv(k, self.k_conv, None if state is None else state["k_tail"])
        fq, fk = self.feature_maps(cq, ck)
        log_decay = self.log_decay(x, q.shape[2])
        if valid is not None:
            fk = fk * keep
            if log_decay is not None:
                log_decay = log_decay * valid[:, None, :]  # padding leaves the state untouched
        if self.window:
            out = self.hybrid(q, k, fq, fk, v, log_decay, valid, state, new, scaling, softcap)
        else:
            out = self.mix(fq, fk, v, log_decay, valid, state, new)
        return out, new

    def hybrid(self, q, k, fq, fk, v, log_decay, valid, state: State | None, new: State, scaling, softcap):
        """Exact softmax over each query's last ``W`` keys + the linear kernel over older ones, one normaliser."""
        b, h, n, d = q.shape
        hk, dv, W = k.shape[1], v.shape[-1], self.window
        g = h // hk
        previous = _pair(state)
        if state is None:  # an empty window: zeros, marked invalid
            state = {"win_k": k.new_zeros(b, hk, W, d), "win_fk": fk.new_zeros(b, hk, W, fk.shape[-1]),
                     "win_v": v.new_zeros(b, hk, W, dv), "win_valid": torch.zeros(b, W, dtype=torch.bool,
                                                                                  device=q.device)}
            if log_decay is not None:
                state["win_log_decay"] = log_decay.new_zeros(b, hk, W)
        ok = torch.ones(b, n, dtype=torch.bool, device=q.device) if valid is None else valid
        keys, feats = torch.cat([state["win_k"], k], 2), torch.cat([state["win_fk"], fk], 2)
        vals, seen = torch.cat([state["win_v"], v], 2), torch.cat([state["win_valid"], ok], 1)
        new.update(win_k=keys[:, :, n:], win_fk=feats[:, :, n:], win_v=vals[:, :, n:], win_valid=seen[:, n:])

        # older keys: key t-W joins the linear state at query t, decayed over the W steps it spent in the window
        k_in = feats[:, :, :n]
        if log_decay is not None:
            decays = torch.cat([state["win_log_decay"], log_decay], 2)
            new["win_log_decay"] = decays[:, :, n:]
            total = decays.cumsum(-1)
            k_in = k_in * (total[:, :, W:] - total[:, :, :n]).exp()[..., None]
        v_in = torch.cat([vals[:, :, :n], vals.new_ones(b, hk, n, 1)], -1)  # a ones column carries φ(q)·z
        lin, (new["S"], new["z"]) = scan(fq, k_in, v_in, log_decay, previous, normalize=False)
        num_lin, den_lin = lin[..., :dv].reshape(b, hk, g, n, dv), lin[..., dv].reshape(b, hk, g, n)

        # window keys of query i: positions i+1 .. i+W of [window buffer, new tokens], in blocks of B queries
        B = min(W, n)
        blocks = -(-n // B)
        span = B + W - 1
        length = (blocks - 1) * B + span
        pad = length - (W + n - 1)
        kb = F.pad(keys[:, :, 1:], (0, 0, 0, pad)).unfold(2, span, B)  # [b, hk, blocks, d, span]
        vb = F.pad(vals[:, :, 1:], (0, 0, 0, pad)).unfold(2, span, B)
        seen_b = F.pad(seen[:, 1:], (0, pad)).unfold(1, span, B)  # [b, blocks, span]
        qb = F.pad(q, (0, 0, 0, blocks * B - n)).reshape(b, hk, g, blocks, B, d)
        s = torch.einsum("bkgnad,bkndc->bkgnac", qb, kb) * scaling
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s + self.window_log_scale.float().reshape(1, hk, g, 1, 1, 1)
        a, c = torch.arange(B, device=q.device)[:, None], torch.arange(span, device=q.device)[None, :]
        allowed = (c >= a) & (c < a + W) & seen_b[:, None, None, :, None, :]
        s = s.masked_fill(~allowed, float("-inf"))

        # one normaliser; c = max(window scores, log linear mass) keeps every exponent <= 0
        top = s.amax(-1).reshape(b, hk, g, blocks * B)[..., :n]
        shift = torch.maximum(top, den_lin.clamp_min(1e-30).log()).detach()
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        p = (s - F.pad(shift, (0, blocks * B - n)).reshape(b, hk, g, blocks, B, 1)).exp()
        num_win = torch.einsum("bkgnac,bkndc->bkgnad", p, vb).reshape(b, hk, g, blocks * B, dv)[..., :n, :]
        den_win = p.sum(-1).reshape(b, hk, g, blocks * B)[..., :n]
        scale = (-shift).exp()
        num = num_win + scale[..., None] * num_lin
        den = den_win + scale * den_lin
        out = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], torch.zeros_like(num))
        return out.reshape(b, h, n, dv)


def _pair(state: State | None):
    return None if state is None else (state["S"], state["z"])

"""FlashSigmoid (kernels/sigmoid) against its PyTorch reference, the flash softmax against torch SDPA, and the
`sigmoid` variant's kernel path against its PyTorch path.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``; fp32/fp16 only, the interpreter's
bf16 is broken) at small sizes with small tiles (``ops.default_config``), so every case crosses several key and query
blocks and ends on a partial one. With CUDA the same cases run compiled, plus the ``gpu`` cases (bf16, the hardware
tanh path, d = 64/128).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from kernel_helpers import DEV, gpu, needs_cuda, rel_err  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402

import patchattn  # noqa: E402
from patchattn import logging_utils  # noqa: E402
from patchattn.kernels.sigmoid import naive, sigmoid_attention, softmax_attention  # noqa: E402
from patchattn.kernels.sigmoid.ops import KernelConfig, default_config  # noqa: E402
from patchattn.variants import sigmoid as sigmoid_variant  # noqa: E402


def make(b, h, hk, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g)
    k, v = (torch.randn(b, hk, nk, d, generator=g) for _ in range(2))
    return [x.to(DEV, dtype).requires_grad_() for x in (q, k, v)]


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


# (b, h, hk, nq, nk, d, causal, key_start, bias): every length odd or off the tile grid
CASES = {
    "causal_gqa_row_bias": (2, 4, 2, 77, 77, 16, True, None, "rows"),
    "chunk_over_cache_padding": (2, 6, 2, 29, 83, 32, True, [0, 40], -2.5),
    "decode_padding": (2, 4, 1, 1, 50, 16, True, [7, 0], "rows"),
    "noncausal_all_padded_row": (2, 2, 2, 45, 61, 16, False, [3, 61], None),
}


def _case(name, dtype):
    b, h, hk, nq, nk, d, causal, starts, bias = CASES[name]
    q, k, v = make(b, h, hk, nq, nk, d, dtype)
    key_start = None if starts is None else torch.tensor(starts, device=DEV)
    if bias == "rows":  # −log(visible keys), the variant's bias
        pos = torch.arange(nq, device=DEV) + (nk - nq + 1)
        bias = -torch.log((pos[None] - (0 if key_start is None else key_start[:, None])).clamp(min=1).float())
    return q, k, v, dict(scale=d**-0.5, row_bias=bias, causal=causal, key_start=key_start)


@pytest.mark.parametrize("dtype, fwd_tol, bwd_tol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 5e-3)])
@pytest.mark.parametrize("name", list(CASES))
def test_sigmoid_kernel_matches_reference(name, dtype, fwd_tol, bwd_tol):
    """Forward and dQ/dK/dV against autograd through the fp32 reference, fed the same (rounded) inputs."""
    q, k, v, kw = _case(name, dtype)
    out = sigmoid_attention(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous()  # stored [b, q, h, d]: what the variant hands back
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    got = grads(out, (q, k, v), dout)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = naive.sigmoid_attention(qr, kr, vr, **kw)
    want = grads(ref, (qr, kr, vr), dout.float())
    errs = {"out": rel_err(out, ref), **{n: rel_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), got, want)}}
    assert errs["out"] <= fwd_tol, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) <= bwd_tol, errs
    if kw["key_start"] is not None:  # keys hidden by padding get exactly zero gradient
        for i, s in enumerate(kw["key_start"].tolist()):
            assert not got[1][i, :, :s].any() and not got[2][i, :, :s].any()


def test_tile_shapes_do_not_change_the_result():
    """Other tiles (dK/dV blocks narrower than the query step, forward blocks wider) give the same numbers."""
    q, k, v, kw = _case("chunk_over_cache_padding", torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    base = sigmoid_attention(q, k, v, **kw)
    cfg = KernelConfig(16, 32, 4, 1, 16, 32, 4, 32, 16, 4, 1)
    other = sigmoid_attention(q, k, v, config=cfg, **kw)
    torch.testing.assert_close(other, base, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(other, (q, k, v), dout), grads(base, (q, k, v), dout)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("name", ["causal_gqa_row_bias", "chunk_over_cache_padding", "noncausal_all_padded_row"])
def test_dq_added_from_the_dkdv_kernel_matches_the_dq_pass(name, softmax):
    """``dq_atomic``: dQ added from the dK/dV kernel (one kernel) gives the two-kernel gradients, GQA and padding
    included (keys hidden by padding must add nothing to dQ)."""
    q, k, v, kw = _case(name, torch.float32)
    if softmax:
        kw = {key: val for key, val in kw.items() if key != "row_bias"}
        kw["key_start"] = None if kw["key_start"] is None else kw["key_start"].clamp(max=q.shape[2] - 1)
    fn = softmax_attention if softmax else sigmoid_attention
    cfg = dataclasses.replace(default_config(q.shape[-1], q.dtype), dq_atomic=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEV)
    base = grads(fn(q, k, v, **kw), (q, k, v), dout)
    fused = grads(fn(q, k, v, config=cfg, **kw), (q, k, v), dout)
    for a, b in zip(fused, base):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_deterministic_mode_takes_the_dq_pass(monkeypatch):
    """Atomic dQ adds land in any order; under torch.use_deterministic_algorithms the dQ kernel runs instead, so the
    gradients are bitwise those of the two-kernel path."""
    q, k, v, kw = _case("causal_gqa_row_bias", torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(DEV)
    cfg = dataclasses.replace(default_config(q.shape[-1], q.dtype), dq_atomic=True)
    two_kernel = grads(sigmoid_attention(q, k, v, **kw), (q, k, v), dout)
    fused = grads(sigmoid_attention(q, k, v, config=cfg, **kw), (q, k, v), dout)
    assert not torch.equal(fused[0], two_kernel[0])  # the fused sums differ in the last bits
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    deterministic = grads(sigmoid_attention(q, k, v, config=cfg, **kw), (q, k, v), dout)
    for a, b in zip(deterministic, two_kernel):
        assert torch.equal(a, b)


def test_views_the_descriptors_cannot_take_directly():
    """The forward loads by tensor descriptor: a [b, n, h, d] layout seen as [b, h, n, d] goes as is, and a view at
    an odd element offset (a base TMA cannot take) is copied; both give the contiguous inputs' numbers."""
    q, k, v, kw = _case("causal_gqa_row_bias", torch.float32)
    q, k, v = (x.detach() for x in (q, k, v))
    base = sigmoid_attention(q, k, v, **kw)
    q_bnhd = q.transpose(1, 2).contiguous().transpose(1, 2)
    odd = torch.empty(q.numel() + 1, device=DEV)
    q_odd = odd[1:].view_as(q).copy_(q)
    assert q_odd.data_ptr() % 16
    for qq in (q_bnhd, q_odd):
        torch.testing.assert_close(sigmoid_attention(qq, k, v, **kw), base, atol=0, rtol=0)


@pytest.mark.parametrize("dtype, fwd_tol, bwd_tol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 5e-3)])
def test_softmax_kernel_matches_sdpa(dtype, fwd_tol, bwd_tol):
    """The like-for-like softmax baseline: chunked prefill over a cache (bottom-right causal), GQA, left padding."""
    b, h, hk, nq, nk, d = 2, 4, 2, 37, 90, 32
    q, k, v = make(b, h, hk, nq, nk, d, dtype, seed=3)
    key_start = torch.tensor([0, 21], device=DEV)  # every query still sees a key
    out = softmax_attention(q, k, v, scale=0.2, causal=True, key_start=key_start)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEV, dtype)
    got = grads(out, (q, k, v), dout)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    mask = naive.visible(nq, nk, True, key_start, DEV)[:, None]
    ref = F.scaled_dot_product_attention(qr, kr.repeat_interleave(h // hk, 1), vr.repeat_interleave(h // hk, 1),
                                         attn_mask=mask, scale=0.2)
    want = grads(ref, (qr, kr, vr), dout.float())
    errs = {"out": rel_err(out, ref), **{n: rel_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), got, want)}}
    assert errs["out"] <= fwd_tol, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) <= bwd_tol, errs


@pytest.mark.parametrize("kernel", [sigmoid_attention, softmax_attention])
def test_gradient_of_any_layout(kernel):
    """dO whose last dimension is not contiguous (the gradient of a transposed view) gives the same gradients."""
    q, k, v = make(1, 2, 1, 40, 40, 16, torch.float32, seed=6)
    out = kernel(q, k, v, scale=0.25, causal=True)
    dout = torch.randn(1, 2, 16, 40, generator=torch.Generator().manual_seed(7)).to(DEV).transpose(-1, -2)
    assert dout.stride(-1) != 1
    for a, b in zip(grads(out, (q, k, v), dout), grads(kernel(q, k, v, scale=0.25, causal=True), (q, k, v),
                                                       dout.contiguous())):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_softmax_rows_without_keys_are_zero():
    q, k, v = make(2, 2, 1, 20, 20, 16, torch.float32, seed=5)
    out = softmax_attention(q, k, v, scale=0.25, causal=True, key_start=torch.tensor([0, 12], device=DEV))
    assert torch.isfinite(out).all() and not out[1, :, :12].any() and out[1, :, 12:].abs().sum() > 0
    dq, dk, dv = grads(out, (q, k, v), torch.ones_like(out))
    assert not dq[1, :, :12].any() and not dk[1, :, :12].any() and not dv[1, :, :12].any()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v: (q[..., :8], k[..., :8], v[..., :8]), r"head dim 8 is not supported .* \(16, 32, 64, 128, 256\)"),
    (lambda q, k, v: (q, k.double(), v), r"q, k, v must share one dtype"),
    (lambda q, k, v: (q[:, :3], k, v), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    (lambda q, k, v: (q, k[:, :, :10], v[:, :, :10]), r"causal attention needs nq <= nk"),
])
def test_clear_errors(change, match):
    q, k, v = (x.detach() for x in make(1, 4, 2, 16, 16, 16, torch.float32))
    with pytest.raises(ValueError, match=match):
        sigmoid_attention(*change(q, k, v), scale=0.25)


def test_bias_and_padding_argument_errors():
    q, k, v = make(2, 2, 2, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="row_bias is a constant for the kernels"):
        sigmoid_attention(q, k, v, scale=0.25, row_bias=torch.zeros(2, 16, device=DEV, requires_grad=True))
    with pytest.raises(ValueError, match=r"broadcastable to \[b=2, nq=16\]"):
        sigmoid_attention(q, k, v, scale=0.25, row_bias=torch.zeros(3, 16, device=DEV))
    with pytest.raises(ValueError, match=r"key_start must be an integer tensor \[b=2\]"):
        sigmoid_attention(q, k, v, scale=0.25, key_start=torch.tensor([1.0, 2.0]))


# -- the variant: kernel path vs PyTorch path ----------------------------------------------------------------------
def _patched(family="llama", **params):
    model = tiny_model(family).to(DEV)
    patchattn.patch_model(model, "sigmoid", **params)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, sigmoid_variant.SigmoidAttention) and hasattr(layer, "gain"):
                layer.gain.copy_(0.5 + torch.rand(layer.gain.shape, generator=torch.Generator().manual_seed(0)))
    return model


@pytest.fixture
def kernel_calls(monkeypatch):
    """The FlashSigmoid calls the variant makes (a list that grows by one per call)."""
    calls = []
    real = sigmoid_variant.sigmoid_attention
    monkeypatch.setattr(sigmoid_variant, "sigmoid_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _both_paths(monkeypatch, fn):
    """``fn()`` through the PyTorch path, then through the kernel path (on CPU: the interpreter, ``KERNEL_ON_CPU``)."""
    with monkeypatch.context() as m:
        m.setattr(sigmoid_variant.SigmoidAttention, "_kernel_attention", lambda self, *args: None)
        torch_result = fn()
    monkeypatch.setattr(sigmoid_variant, "KERNEL_ON_CPU", True)
    return torch_result, fn()


@pytest.mark.parametrize("params", [{}, {"bias": "context", "context_length": 64, "norm": "output"}])
def test_variant_kernel_path_matches_torch_path(monkeypatch, kernel_calls, params):
    """Logits (plain and left-padded batches) and the gradients of the variant's gains and of q_proj."""
    model = _patched(**params)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    valid = mask.bool()

    def run():
        model.zero_grad()
        with torch.no_grad():
            plain = model(input_ids=ids).logits  # mask None: plain causal
        padded = model(input_ids=ids, attention_mask=mask).logits
        padded[valid].float().square().mean().backward()
        layer = model.model.layers[1].self_attn
        return (plain, padded.detach()[valid], layer.patchattn_layer.gain.grad.clone(),
                layer.q_proj.weight.grad.clone())

    want, got = _both_paths(monkeypatch, run)
    assert len(kernel_calls) == 2 * len(model.model.layers)  # every layer, both batches, through the kernel
    for a, b, name in zip(got, want, ("logits", "padded logits", "gain grad", "q_proj grad")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_variant_kernel_path_generates_like_torch_path(monkeypatch, kernel_calls):
    """Greedy generation with the KV cache: prefill, then decode steps (one query over the cache) in the kernel."""
    model = _patched()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2)).to(DEV)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                  pad_token_id=0, output_scores=True, return_dict_in_generate=True)

    want, got = _both_paths(monkeypatch, run)
    assert len(kernel_calls) == 5 * len(model.model.layers)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_variant_falls_back_where_the_kernel_does_not_apply(monkeypatch, kernel_calls, caplog):
    """Gemma 2 (softcap): logged once, PyTorch path, same logits as without the switch."""
    monkeypatch.setattr(logging_utils, "_seen", set())  # warn_once may have fired earlier in this process
    model = _patched("gemma2")
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3)).to(DEV)
    with caplog.at_level("WARNING", logger="patchattn"):
        want, got = _both_paths(monkeypatch, lambda: model(input_ids=ids).logits.detach())
    assert not kernel_calls
    assert "sigmoid: attention logit softcapping is not in the kernels; using the PyTorch path" in caplog.text
    torch.testing.assert_close(got, want)


# -- GPU only: bf16 and the hardware tanh -----------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("approx", [True, False])
@pytest.mark.parametrize("dq_atomic", [False, True])
def test_bf16_gpu_matches_reference(d, approx, dq_atomic):
    b, h, hk, n = 2, 8, 2, 1000
    q, k, v = make(b, h, hk, n, n, d, torch.bfloat16, seed=7)
    key_start = torch.tensor([0, 123], device=DEV)
    pos = torch.arange(n, device=DEV) + 1
    bias = -torch.log((pos[None] - key_start[:, None]).clamp(min=1).float())
    kw = dict(scale=d**-0.5, row_bias=bias, causal=True, key_start=key_start)
    cfg = dataclasses.replace(default_config(d, q.dtype), dq_atomic=dq_atomic)
    out = sigmoid_attention(q, k, v, approx_sigmoid=approx, config=cfg, **kw)
    dout = torch.randn_like(out)
    got = grads(out, (q, k, v), dout)
    qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = naive.sigmoid_attention(qr, kr, vr, **kw)
    want = grads(ref, (qr, kr, vr), dout.float())
    assert rel_err(out, ref) <= 1e-2
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 2e-2

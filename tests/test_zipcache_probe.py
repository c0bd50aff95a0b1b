"""ZipCache's fused prefill-probe kernel (column sums of the probes' causal softmax, no probe × key matrix) vs the
PyTorch path of ``probe_scores`` and the reference, and inside generate() / a chunked prefill.

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``; fp32/fp16 only, the interpreter's
bf16 arithmetic is broken) with ``ops.KERNEL_ON_CPU`` opened; shapes are tiny because the interpreter is slow. With
CUDA the same cases run compiled, plus bf16.
"""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import CUDA, DEV
from tiny_models import VOCAB, gqa_mistral, tiny_model
from tiny_models import ZIPCACHE_MODELS as MODELS

import patchattn
from patchattn.kernels.zipcache import causal_probe_counts, ops, probe_scores_reference
from patchattn.variants import zipcache as zipcache_variant
from patchattn.variants.zipcache import probe_scores

triton = pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bf16 is broken in Triton's interpreter: the GPU suite runs it"))]
#: kernel vs reference (both float32 arithmetic on the same inputs) / vs the PyTorch path (which multiplies in the
#: input dtype), relative to the largest sum
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 5e-3), torch.bfloat16: (1e-3, 4e-2)}

# b, KV heads, group, q_len, k_len, head dim, probes, columns (None: all keys)
SHAPES = {
    "prefill-g1": (2, 2, 1, 37, 37, 16, 9, None),
    "chunk-g7-d64-columns": (1, 1, 7, 20, 53, 64, 6, 30),
    "prefill-g2-d64-columns": (2, 2, 2, 45, 45, 64, 12, 40),
    "chunk-g2-every-row": (1, 3, 2, 17, 70, 16, 17, 70),
}


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    monkeypatch.setattr(ops, "KERNEL_ON_CPU", True)


def inputs(shape, dtype, seed, *, transposed=False):
    """Random query/key (queries sharp enough for peaked rows) and sorted probe rows: the last one always, the
    rest random, as ``pick_probes`` draws them."""
    b, hk, g, q_len, k_len, d, n_probes, _ = shape
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # transformers' layout: [b, q, h, d] transposed to [b, h, q, d]
        query = (torch.randn(b, q_len, hk * g, d, generator=gen) * 2).transpose(1, 2)
    else:
        query = torch.randn(b, hk * g, q_len, d, generator=gen) * 2
    key = torch.randn(b, hk, k_len, d, generator=gen)
    rows = torch.cat([torch.randperm(q_len - 1, generator=gen)[: n_probes - 1].sort().values,
                      torch.tensor([q_len - 1])])
    return query.to(DEV, dtype), key.to(DEV, dtype), rows.to(DEV)


def assert_sums_close(got, ref, tol):
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_kernel_matches_reference_and_the_pytorch_path(kernel_on_cpu, monkeypatch, name, dtype, softcap):
    shape = SHAPES[name]
    columns = shape[-1]
    query, key, rows = inputs(shape, dtype, seed=len(name), transposed=name.startswith("chunk"))
    d = shape[5]
    got_s, got_c = ops.probe_column_scores(query, key, rows, scaling=d**-0.5, softcap=softcap, columns=columns)
    ref_s, ref_c = probe_scores_reference(query, key, rows, scaling=d**-0.5, softcap=softcap, columns=columns)
    n_cols = shape[4] if columns is None else columns
    assert got_s.shape == got_c.shape == (shape[0], shape[1], n_cols)
    assert got_s.dtype == got_c.dtype == torch.float32
    assert_sums_close(got_s, ref_s, TOL[dtype][0])
    assert torch.equal(got_c, ref_c)
    monkeypatch.setattr(ops, "KERNEL_ON_CPU", False)  # probe_scores' PyTorch path (where CUDA is absent)
    if CUDA:
        monkeypatch.setattr(zipcache_variant, "kernel_usable", lambda x: False)
    torch_s, torch_c = probe_scores(query, key, rows, None, scaling=d**-0.5, softcap=softcap, columns=columns)
    assert_sums_close(got_s, torch_s, TOL[dtype][1])
    assert torch.equal(got_c, torch_c)


def test_unsorted_rows_and_a_single_probe(kernel_on_cpu):
    """Rows in any order give the same sums; one probe (the last query) sees every key exactly once."""
    shape = (1, 2, 3, 30, 41, 16, 7, None)
    query, key, rows = inputs(shape, torch.float32, seed=3)
    s1, c1 = ops.probe_column_scores(query, key, rows, scaling=0.25)
    s2, c2 = ops.probe_column_scores(query, key, rows.flip(0), scaling=0.25)
    torch.testing.assert_close(s2, s1)
    assert torch.equal(c2, c1)
    s, c = ops.probe_column_scores(query, key, rows[-1:], scaling=0.25)
    torch.testing.assert_close(s.sum(-1), torch.full((1, 2), 3.0, device=DEV))  # 3 heads, each row sums to 1
    assert torch.equal(c, torch.full((1, 2, 41), 3.0, device=DEV))


@pytest.mark.parametrize("k_len", [24, 31])
def test_analytic_counts_and_the_mask_free_path_equal_an_explicit_causal_mask(k_len):
    """The PyTorch path: no mask (analytic counts, unmasked sums) = the same causal mask passed explicitly (its
    visibility counted, its NaN-free rows summed), in one chunk or many."""
    q_len, b, h, hk, d = 24, 2, 4, 2, 8
    gen = torch.Generator().manual_seed(k_len)
    q, k = torch.randn(b, h, q_len, d, generator=gen), torch.randn(b, hk, k_len, d, generator=gen)
    rows = torch.tensor([2, 5, 11, 20, 21, 22, 23])
    mask = (torch.arange(k_len) <= torch.arange(q_len)[:, None] + (k_len - q_len))[None, None]
    for columns in (k_len, 10):
        s0, c0 = probe_scores(q, k, rows, None, scaling=0.3, softcap=4.0, columns=columns)
        s1, c1 = probe_scores(q, k, rows, mask.expand(b, 1, q_len, k_len), scaling=0.3, softcap=4.0,
                              columns=columns, max_elements=100)
        torch.testing.assert_close(s0, s1, atol=1e-6, rtol=1e-6)
        assert torch.equal(c0, c1)
        assert torch.equal(c0[0, 0], causal_probe_counts(rows, q_len, k_len, columns, h // hk))


def test_probe_scores_takes_the_kernel_only_without_a_mask(kernel_on_cpu, monkeypatch):
    calls = []
    kernel = zipcache_variant.probe_column_scores
    monkeypatch.setattr(zipcache_variant, "probe_column_scores", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    query, key, rows = inputs((1, 1, 2, 20, 20, 16, 4, None), torch.float32, seed=5)
    probe_scores(query, key, rows, None, scaling=0.25)
    assert calls == [1]
    mask = torch.ones(20, 20, dtype=torch.bool, device=DEV).tril()[None, None]
    probe_scores(query, key, rows, mask, scaling=0.25)
    probe_scores(query, key, rows, None, scaling=0.25, use_kernel=False)  # zipcache's probe_kernel=False
    assert calls == [1]


def test_other_tile_sizes_give_the_same_sums(kernel_on_cpu):
    shape = (1, 2, 3, 70, 90, 16, 20, 75)
    query, key, rows = inputs(shape, torch.float32, seed=6)
    s1, c1 = ops.probe_column_scores(query, key, rows, scaling=0.25, columns=75)
    s2, c2 = ops.probe_column_scores(query, key, rows, scaling=0.25, columns=75, block_m=32, block_n=64, num_warps=2)
    torch.testing.assert_close(s2, s1, atol=1e-6, rtol=1e-5)
    assert torch.equal(c2, c1)


def test_clear_errors(kernel_on_cpu):
    q = torch.zeros(1, 4, 8, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ops.probe_column_scores(q, torch.zeros(1, 3, 8, 16), torch.tensor([7]), scaling=1.0)
    with pytest.raises(ValueError, match="every query's own key"):
        ops.probe_column_scores(q, torch.zeros(1, 2, 5, 16), torch.tensor([7]), scaling=1.0)
    with pytest.raises(ValueError, match="columns"):
        ops.probe_column_scores(q, torch.zeros(1, 2, 8, 16), torch.tensor([7]), scaling=1.0, columns=9)
    with pytest.raises(ValueError, match="powers of two"):
        ops.probe_column_scores(q.to(DEV), torch.zeros(1, 2, 8, 16, device=DEV), torch.tensor([7]), scaling=1.0,
                                block_m=24)


# ------------------------------------------------------------------------------------------------ end to end




def block_tensors(cache):
    return [[t.clone() for block in layer.blocks for t in block.tensors()] for layer in cache.layers
            if hasattr(layer, "blocks")]


def run_both(monkeypatch, model, fn):
    """``fn()`` with the PyTorch probes, then with the probe kernel forced on CPU (kernel calls counted). The decode
    kernel stays off in both (``decode_kernel=False``), so the probes are the only difference."""
    patchattn.patch_model(model, "zipcache", decode_kernel=False, requant_interval=8, probe_kernel=False)
    torch_path = fn()
    patchattn.unpatch_model(model)
    calls = []
    kernel = zipcache_variant.probe_column_scores
    monkeypatch.setattr(ops, "KERNEL_ON_CPU", True)
    monkeypatch.setattr(zipcache_variant, "probe_column_scores", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    patchattn.patch_model(model, "zipcache", decode_kernel=False, requant_interval=8, probe_kernel=True)
    fused = fn()
    patchattn.unpatch_model(model)
    return torch_path, fused, len(calls)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_generate_with_the_probe_kernel_equals_the_pytorch_probes(monkeypatch, family):
    """Same greedy tokens, logits, true bytes and quantised blocks (codes, parameters, saliency bitmaps): the
    prefill's probes went through the kernel in every full ZipCache layer (sliding layers get a mask: PyTorch)."""
    model = MODELS[family]().to(DEV)
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEV)
    kwargs = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_logits=True)
    torch_path, fused, calls = run_both(monkeypatch, model, lambda: model.generate(ids, **kwargs))
    full = [layer for layer in fused.past_key_values.layers if hasattr(layer, "blocks") and not layer.is_sliding]
    assert calls == len(full) > 0
    assert torch.equal(fused.sequences, torch_path.sequences)
    for a, b in zip(fused.logits, torch_path.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [layer.nbytes() for layer in fused.past_key_values.layers] == [
        layer.nbytes() for layer in torch_path.past_key_values.layers]
    for mine, theirs in zip(block_tensors(fused.past_key_values), block_tensors(torch_path.past_key_values)):
        assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_chunked_prefill_with_the_probe_kernel_equals_the_pytorch_probes(monkeypatch):
    """A prefill in two chunks: same logits and blocks. transformers hands the second chunk (q_len < k_len) an
    explicit causal mask, so only the first chunk's probes take the kernel; the second's take the PyTorch path."""
    model = gqa_mistral().to(DEV)
    ids = torch.randint(3, VOCAB, (1, 45), generator=torch.Generator().manual_seed(4)).to(DEV)

    def chunked():
        cache = patchattn.generation_cache(model)
        with torch.no_grad():
            model(ids[:, :27], past_key_values=cache, use_cache=True)
            logits = model(ids[:, 27:], past_key_values=cache, use_cache=True).logits
        return logits, cache

    (torch_logits, torch_cache), (logits, cache), calls = run_both(monkeypatch, model, chunked)
    assert calls == len(cache.layers)
    torch.testing.assert_close(logits, torch_logits, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(block_tensors(cache), block_tensors(torch_cache)):
        assert len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("probe_kernel", [True, False])
def test_probe_kernel_switches_the_probe_path(monkeypatch, probe_kernel):
    """The default scores the probes with the kernel where it can run; ``probe_kernel=False`` keeps PyTorch."""
    calls = []
    kernel = zipcache_variant.probe_column_scores
    monkeypatch.setattr(ops, "KERNEL_ON_CPU", True)
    monkeypatch.setattr(zipcache_variant, "probe_column_scores", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    params = {} if probe_kernel else {"probe_kernel": False}
    model = patchattn.patch_model(tiny_model("llama").to(DEV), "zipcache", decode_kernel=False, requant_interval=8,
                                  **params)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2)).to(DEV)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert len(calls) == (4 if probe_kernel else 0)  # the prefill's probes, once per full layer

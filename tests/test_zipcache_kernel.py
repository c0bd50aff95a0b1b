"""ZipCache's fused decode kernel (reads the packed blocks in place) vs its reference, and inside generate().

Without CUDA the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``; fp32/fp16 only, the interpreter's
bf16 arithmetic is broken) with ``ops.KERNEL_ON_CPU`` opened; shapes are tiny because the interpreter is slow. With
CUDA the same cases run compiled, plus bf16.
"""
from __future__ import annotations

import pytest
import torch
from kernel_helpers import CUDA, DEV
from tiny_models import VOCAB, tiny_model
from tiny_models import ZIPCACHE_MODELS as MODELS

import patchattn
from patchattn.kernels.zipcache import ops, quantized_decode_attention_reference
from patchattn.variants import zipcache as zipcache_variant
from patchattn.variants.zipcache import PAPER_SETTING, QuantizedBlock, ZipCacheLayer, ZipCacheParams

triton = pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16] + [torch.bfloat16] * CUDA


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    monkeypatch.setattr(ops, "KERNEL_ON_CPU", True)


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen).to(DEV)


def make_block(gen, b, hk, n, d, dtype, *, salient=True, **params):
    """A block of ``n`` random tokens (a few outlier channels) with random salient tokens per KV head."""
    p = ZipCacheParams(**{**PAPER_SETTING, **params})
    k = randn(b, hk, n, d, gen=gen) * (1 + 4 * (torch.arange(d, device=DEV) % 7 == 0))
    v = randn(b, hk, n, d, gen=gen)
    if not salient:
        return QuantizedBlock(k.to(dtype), v.to(dtype), None, n, p, torch.float16)
    n_high = max(1, round(p.salient_ratio * n))
    top = torch.rand(b, hk, n, generator=gen).topk(n_high, -1).indices.to(DEV)
    mask = torch.zeros(b, hk, n, dtype=torch.bool, device=DEV).scatter_(-1, top, True)
    return QuantizedBlock(k.to(dtype), v.to(dtype), mask, n_high, p, torch.float16)


def check(query, blocks, keys, values, *, scaling, softcap, dtype, **sizes):
    got = ops.quantized_decode_attention(query, blocks, keys, values, scaling=scaling, softcap=softcap, **sizes)
    ref = quantized_decode_attention_reference(query, blocks, keys, values, scaling=scaling, softcap=softcap)
    assert got.shape == ref.shape == (query.shape[0], 1, query.shape[1], query.shape[3]) and got.dtype == dtype
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk, g", [(1, 4), (2, 3)])
@pytest.mark.parametrize("key_group, value_group", [(0, 0), (16, 32)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernel_matches_reference(kernel_on_cpu, bits, key_group, value_group, hk, g, dtype, softcap):
    """Three blocks (n not a multiple of the 16-row tile): keys in two tensors split at n_high, keys in one tensor
    spanning both segments, a uniform block; 32-row splits so programs loop over tiles and segments over splits.
    Value groups: one zero/step per token (all of its KV heads), or two per head."""
    gen = torch.Generator().manual_seed(bits * 100 + key_group + hk)
    b, d = 2, 64
    common = dict(high_bits=bits, low_bits=2, key_group_size=key_group, value_group_size=value_group,
                  salient_ratio=0.3)
    blocks = [make_block(gen, b, hk, 45, d, dtype, **common),
              make_block(gen, b, hk, 37, d, dtype, key_low_bits=bits, **common),
              make_block(gen, b, hk, 23, d, dtype, salient=False, **common)]
    assert [len(block.keys) for block in blocks] == [1 + (bits > 2), 1, 1]
    assert [len(block.values) for block in blocks] == [2, 2, 1]
    query = randn(b, hk * g, 1, d, gen=gen).to(dtype)
    keys, values = randn(b, hk, 3, d, gen=gen).to(dtype), randn(b, hk, 3, d, gen=gen).to(dtype)
    check(query, blocks, keys, values, scaling=d**-0.5, softcap=softcap, dtype=dtype, block_n=16, split_len=32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 8])
def test_kernel_matches_reference_at_head_dim_256_with_softcap(kernel_on_cpu, bits, dtype):
    """Gemma-like: head dim 256, one KV head for four query heads, logit softcapping; default tile/split sizes."""
    gen = torch.Generator().manual_seed(bits)
    d = 256
    blocks = [make_block(gen, 1, 1, 50, d, dtype, high_bits=8, low_bits=bits, key_group_size=16)]
    query = randn(1, 4, 1, d, gen=gen).to(dtype) * 3  # sharp enough for the cap to matter
    keys, values = randn(1, 1, 2, d, gen=gen).to(dtype), randn(1, 1, 2, d, gen=gen).to(dtype)
    check(query, blocks, keys, values, scaling=d**-0.5, softcap=10.0, dtype=dtype)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernel_matches_reference_at_a_head_dim_that_is_not_a_power_of_two(kernel_on_cpu, bits):
    """d = 48 in 64-wide tiles: the codes past each row's bytes are masked, none lands on a channel."""
    gen = torch.Generator().manual_seed(48 + bits)
    d, hk = 48, 2
    blocks = [make_block(gen, 1, hk, 40, d, torch.float32, high_bits=8, low_bits=bits, key_group_size=16,
                         value_group_size=16)]
    blocks.append(make_block(gen, 1, hk, 30, d, torch.float32, high_bits=bits, low_bits=bits, salient=False))
    query = randn(1, hk * 3, 1, d, gen=gen)
    keys, values = randn(1, hk, 2, d, gen=gen), randn(1, hk, 2, d, gen=gen)
    check(query, blocks, keys, values, scaling=d**-0.5, softcap=None, dtype=torch.float32, block_n=16,
          split_len=16)


def test_head_dims_whose_codes_do_not_fill_whole_words_take_the_reference(kernel_on_cpu, caplog):
    """The kernel reads codes as 16-bit words: a head dim of 36 at 2 bits (72 bits a row) decodes with the
    reference, said once; at 4 bits (144 bits) it takes the kernel."""
    gen = torch.Generator().manual_seed(36)
    d, hk = 36, 2
    query = randn(1, hk * 2, 1, d, gen=gen)
    keys, values = randn(1, hk, 2, d, gen=gen), randn(1, hk, 2, d, gen=gen)
    ops._log_fallback_once.cache_clear()
    with caplog.at_level("WARNING", logger="patchattn"):
        for _ in range(2):
            block = make_block(gen, 1, hk, 32, d, torch.float32, high_bits=2, low_bits=2, salient=False)
            got = ops.quantized_decode_attention(query, [block], keys, values, scaling=0.2)
            want = quantized_decode_attention_reference(query, [block], keys, values, scaling=0.2)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert sum("whole 16-bit words" in r.message for r in caplog.records) == 1
    block = make_block(gen, 1, hk, 32, d, torch.float32, high_bits=4, low_bits=4, salient=False)
    check(query, [block], keys, values, scaling=0.2, softcap=None, dtype=torch.float32)
    assert sum("whole 16-bit words" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_the_logsumexp_a_probe_step_needs_matches_the_reference(kernel_on_cpu, softcap):
    gen = torch.Generator().manual_seed(11)
    blocks = [make_block(gen, 2, 2, 45, 32, torch.float32, key_group_size=16)]
    query = randn(2, 6, 1, 32, gen=gen) * 2
    keys, values = randn(2, 2, 4, 32, gen=gen), randn(2, 2, 4, 32, gen=gen)
    out, lse = ops.quantized_decode_attention(query, blocks, keys, values, scaling=0.2, softcap=softcap,
                                              return_lse=True, block_n=16, split_len=16)
    want_out, want_lse = quantized_decode_attention_reference(query, blocks, keys, values, scaling=0.2,
                                                              softcap=softcap, return_lse=True)
    assert lse.shape == (2, 6) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)


def test_without_blocks_it_is_attention_over_the_full_precision_tokens(kernel_on_cpu):
    gen = torch.Generator().manual_seed(0)
    query, keys, values = randn(1, 4, 1, 16, gen=gen), randn(1, 2, 5, 16, gen=gen), randn(1, 2, 5, 16, gen=gen)
    ref = torch.nn.functional.scaled_dot_product_attention(query, keys, values, scale=0.3, enable_gqa=True)
    got = ops.quantized_decode_attention(query, [], keys, values, scaling=0.3)
    torch.testing.assert_close(got, ref.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_clear_errors():
    query = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match="one decode query per sequence"):
        ops.quantized_decode_attention(query, [], torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), scaling=1.0)
    with pytest.raises(ValueError, match="must share one dtype"):
        ops.quantized_decode_attention(query[:, :, :1], [], torch.zeros(1, 2, 3, 16, dtype=torch.float16),
                                       torch.zeros(1, 2, 3, 16, dtype=torch.float16), scaling=1.0)
    with pytest.raises(ValueError, match="at least the current token"):
        ops.quantized_decode_attention(query[:, :, :1], [], torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16),
                                       scaling=1.0)


def test_tiles_lie_in_one_key_group(kernel_on_cpu, caplog):
    """Tiles are aligned to key rows and must divide the key group: 48-token groups take 16-row tiles; a wider
    tile is refused; groups that are not a multiple of 16 tokens take the reference path, said once."""
    gen = torch.Generator().manual_seed(5)
    query = randn(1, 4, 1, 32, gen=gen)
    keys, values = randn(1, 2, 2, 32, gen=gen), randn(1, 2, 2, 32, gen=gen)
    block = make_block(gen, 1, 2, 100, 32, torch.float32, key_group_size=48, salient=True, salient_ratio=0.3)
    check(query, [block], keys, values, scaling=0.2, softcap=None, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"block_n \(32\) must be a power of two in \[16, 16\]"):
        ops.quantized_decode_attention(query, [block], keys, values, scaling=0.2, block_n=32)
    ops._log_fallback_once.cache_clear()
    with caplog.at_level("WARNING", logger="patchattn"):
        for group in (8, 24):
            narrow = make_block(gen, 1, 2, 40, 32, torch.float32, key_group_size=group, salient=False)
            got = ops.quantized_decode_attention(query, [narrow], keys, values, scaling=0.2)
            want = quantized_decode_attention_reference(query, [narrow], keys, values, scaling=0.2)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert sum("tiles need 16 rows inside one group" in r.message for r in caplog.records) == 1


def test_each_segment_launch_is_sized_for_one_wave_of_its_own(kernel_on_cpu, monkeypatch):
    """A salient-first block streams as two launches one after the other: each gets splits for about one wave of
    programs by itself (a small salient segment split as finely as the large one would leave most of the machine
    idle), and the result is still the reference's."""
    import patchattn.kernels.zipcache.triton_decode as decode

    monkeypatch.setattr(ops, "_resident_programs", lambda device: 16)  # 8 programs a (sequence, KV head) pair
    monkeypatch.setattr(ops, "_SPLIT_ROWS", (16, 1 << 20))  # CUDA's bounds on rows per program: none here
    launches = []
    launch = decode.launch_segment

    def recorded(*args, seg_len, lead, split_len, **kw):
        launches.append((lead + seg_len, -(-(lead + seg_len) // split_len)))
        return launch(*args, seg_len=seg_len, lead=lead, split_len=split_len, **kw)

    monkeypatch.setattr(decode, "launch_segment", recorded)
    gen = torch.Generator().manual_seed(6)
    query = randn(1, 4, 1, 32, gen=gen)
    keys, values = randn(1, 2, 3, 32, gen=gen), randn(1, 2, 3, 32, gen=gen)
    block = make_block(gen, 1, 2, 640, 32, torch.float32, salient_ratio=0.2)
    check(query, [block], keys, values, scaling=0.2, softcap=None, dtype=torch.float32, block_n=16)
    assert len(launches) == 2 and launches[0][0] < launches[1][0] / 3  # salient first, then the rest
    assert [programs for _, programs in launches] == [8, 8]


# ------------------------------------------------------------------------------------------------ inside generate()


def generate_both(monkeypatch, model, ids, attention_mask=None, **params):
    """generate() with ``decode_kernel=False`` and with the kernel forced on CPU; kernel calls are counted."""
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True,
                  attention_mask=attention_mask)
    patchattn.patch_model(model, "zipcache", preset="paper", decode_kernel=False, **params)
    torch_path = model.generate(ids, **kwargs)
    patchattn.unpatch_model(model)
    calls = []

    def counted(*args, **kw):
        calls.append(1)
        return ops.quantized_decode_attention(*args, **kw)

    monkeypatch.setattr(ops, "KERNEL_ON_CPU", True)
    monkeypatch.setattr(zipcache_variant, "quantized_decode_attention", counted)
    patchattn.patch_model(model, "zipcache", preset="paper", **params)
    fused = model.generate(ids, **kwargs)
    return torch_path, fused, len(calls)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_generate_with_the_kernel_equals_dequantising(monkeypatch, family):
    """Same greedy tokens, logits and true bytes; every decode step of every full layer took the kernel, probe
    steps too (the mask transformers hands a decode step without padding is None)."""
    model = MODELS[family]().to(DEV)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1)).to(DEV)
    torch_path, fused, calls = generate_both(monkeypatch, model, ids, requant_interval=5, sink_tokens=1)
    assert torch.equal(fused.sequences, torch_path.sequences)
    for a, b in zip(fused.logits, torch_path.logits):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=0)
    full = [layer for layer in fused.past_key_values.layers if not layer.is_sliding]
    assert full and [layer.nbytes() for layer in fused.past_key_values.layers] == [
        layer.nbytes() for layer in torch_path.past_key_values.layers]
    assert calls == 11 * len(full)  # 11 decode steps (each window's last one a probe)
    assert all(isinstance(layer, ZipCacheLayer) for layer in full)


def test_probe_steps_on_the_kernel_pick_the_salient_tokens_the_eager_steps_pick(monkeypatch):
    """Decode probes scored from the kernel's logsumexp: the same statistics as the eager row, so every block of
    decoded tokens marks the same tokens salient (60 % random probes per window: most steps are probes)."""
    model = tiny_model("llama").to(DEV)
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3)).to(DEV)
    torch_path, fused, calls = generate_both(monkeypatch, model, ids, requant_interval=5, probe_random_ratio=0.6)
    assert torch.equal(fused.sequences, torch_path.sequences) and calls
    decoded = 0
    for a, b in zip(fused.past_key_values.layers, torch_path.past_key_values.layers):
        assert len(a.blocks) == len(b.blocks) > 1
        for x, y in zip(a.blocks[1:], b.blocks[1:]):  # the blocks after the prefill's
            assert x.bitmap is not None and torch.equal(x.bitmap, y.bitmap)
            decoded += 1
    assert decoded
    last = fused.past_key_values.layers[0]
    torch.testing.assert_close(last.score_sums, torch_path.past_key_values.layers[0].score_sums, atol=1e-5, rtol=1e-4)


def test_left_padding_falls_back_to_dequantising(monkeypatch):
    """A padding mask reaches the decode steps: the deferred layers dequantise after all (same result, no kernel)."""
    model = tiny_model("llama").to(DEV)
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    torch_path, fused, calls = generate_both(monkeypatch, model, ids, attention_mask=mask, requant_interval=5)
    assert calls == 0 and all(layer.deferred for layer in fused.past_key_values.layers)
    assert torch.equal(fused.sequences, torch_path.sequences)
    for a, b in zip(fused.logits, torch_path.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

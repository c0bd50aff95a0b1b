"""zipcache: bit packing, quantiser error bounds, probe saliency vs the exact normalised score, the cache layer inside
generate() on every family (true byte count, compression), 8-bit ≈ exact, streaming re-quantisation at the interval,
sliding-window bookkeeping identical to transformers', exact attention without a ZipCache layer."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import BUILDERS, VOCAB, random_ids, tiny_model
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

import patchattn
from patchattn.cache import PatchattnCache
from patchattn.patching import generation_cache
from patchattn.variants.base import handoff
from patchattn.variants.zipcache import (
    PAPER_SETTING,
    PENDING_KEY,
    QuantizedBlock,
    ZipCache,
    ZipCacheLayer,
    ZipCacheParams,
    pack_codes,
    probe_scores,
    quantize_keys,
    quantize_values,
    unpack_codes,
)

FAMILIES = sorted(BUILDERS)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def prompt(n, batch=1, seed=1):
    return random_ids(batch, n, seed)


def zip_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, ZipCacheLayer)]


# ------------------------------------------------------------------------------------------------ packing, quantisers


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip_is_exact_and_really_packs(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 7, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 7, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_refuses_a_partial_byte():
    with pytest.raises(ValueError, match="cannot pack 6 2-bit codes"):
        pack_codes(torch.zeros(6, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [0, 16])
def test_key_quantisation_error_is_within_half_a_step_per_channel(bits, group):
    x = randn(2, 3, 50, 32) * torch.linspace(0.1, 8.0, 32)  # channels of very different ranges (outliers)
    q = quantize_keys(x, bits, group)
    err = (q.dequantize(torch.float32) - x).abs()
    g = 50 if group == 0 else group
    for start in range(0, 50, g):
        part = x[:, :, start : start + g]
        step = (part.amax(2) - part.amin(2)) / (2**bits - 1)  # [b, hk, d]
        bound = step / 2 * 1.01 + 2e-3 * part.abs().amax(2)  # + fp16 rounding of the stored parameters
        assert (err[:, :, start : start + g] <= bound[:, :, None]).all()
    assert q.codes.shape == (2, 3, 50, 32 * bits // 8)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [0, 32])
def test_value_quantisation_error_is_within_half_a_step_per_token_after_channel_scaling(bits, group):
    x = randn(2, 3, 40, 32, seed=3) * torch.linspace(0.1, 8.0, 32)
    q = quantize_values(x, bits, group)
    rows = x.transpose(1, 2).reshape(2, 40, 96)  # a token's KV heads side by side
    c = rows.abs().amax(1, keepdim=True).sqrt()  # CSTQuant's channel scale
    xn = (rows / c).view(2, 40, -1, group or 96)
    step = (xn.amax(-1, keepdim=True) - xn.amin(-1, keepdim=True)) / (2**bits - 1)  # per token (and group)
    bound = ((step / 2 * 1.01 + 2e-3 * xn.abs().amax(-1, keepdim=True)).expand_as(xn).reshape(2, 40, 96) * c)
    err = (q.dequantize(torch.float32) - x).abs().transpose(1, 2).reshape(2, 40, 96)
    assert (err <= bound).all()
    assert q.codes.shape == (2, 40, 96 * bits // 8) and q.channel_scale.shape == (2, 1, 96)
    assert q.zero.shape == (2, 40, 96 // (group or 96), 1)


def test_more_bits_less_error_and_channel_scaling_beats_plain_tokenwise_on_outlier_channels():
    x = randn(1, 2, 64, 32, seed=4) * torch.cat([torch.full((4,), 20.0), torch.ones(28)])  # 4 outlier channels
    errors = [(quantize_values(x, b).dequantize(torch.float32) - x).norm().item() for b in (2, 4, 8)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2]
    plain = x.clone()
    lo, hi = plain.amin(-1, keepdim=True), plain.amax(-1, keepdim=True)
    step = (hi - lo) / 3
    plain_err = (((plain - lo) / step).round() * step + lo - x).norm().item()  # 2-bit, no channel scaling
    assert errors[0] < 0.8 * plain_err


def test_block_keeps_salient_tokens_at_high_bits_and_restores_order():
    params = ZipCacheParams(**{**PAPER_SETTING, "high_bits": 8, "low_bits": 2})
    k, v = randn(1, 2, 40, 16, seed=5), randn(1, 2, 40, 16, seed=6)
    salient = torch.zeros(1, 2, 40, dtype=torch.bool)
    salient[0, 0, ::4] = True
    salient[0, 1, 1::4] = True  # different tokens per head
    block = QuantizedBlock(k, v, salient, 10, params, torch.float16)
    kd, vd = block.dequantize(torch.float32)
    err = (kd - k).abs().amax(-1) + (vd - v).abs().amax(-1)
    assert err[salient].max() < 0.05 < err[~salient].mean()  # 8-bit where salient, 2-bit elsewhere, in place
    assert block.bitmap.shape == (1, 2, 5)


# ------------------------------------------------------------------------------------------------ saliency


def normalised_score_reference(q, k, scaling, mask=None):
    """Full attention matrix → column sums over the queries that see each key / their number, mean over a group."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    kk = k.repeat_interleave(h // hk, dim=1)
    visible = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    if mask is not None:
        visible = visible & mask
    a = torch.softmax((q @ kk.transpose(-1, -2) * scaling).masked_fill(~visible, float("-inf")), -1).nan_to_num(0)
    col = a.sum(2).reshape(b, hk, h // hk, n).sum(2)
    count = visible.expand(b, h, n, n).sum(2).reshape(b, hk, h // hk, n).sum(2)
    return col / count.clamp_min(1)


@pytest.mark.parametrize("padded", [False, True])
def test_probe_saliency_with_every_query_a_probe_equals_the_exact_normalised_score(padded):
    q, k = randn(2, 4, 24, 8, seed=7), randn(2, 2, 24, 8, seed=8)
    mask = None
    if padded:  # row 1 left-padded by 5: its first keys are invisible, its first queries see nothing
        valid = torch.ones(2, 24, dtype=torch.bool)
        valid[1, :5] = False
        mask = torch.ones(24, 24, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    sums, counts = probe_scores(q, k, torch.arange(24), mask, scaling=0.35)
    ref = normalised_score_reference(q, k, 0.35, mask)
    torch.testing.assert_close(sums / counts.clamp_min(1), ref, atol=1e-6, rtol=1e-5)
    # chunked over probes (tiny max_elements) gives the same
    s2, c2 = probe_scores(q, k, torch.arange(24), mask, scaling=0.35, max_elements=100)
    torch.testing.assert_close(s2, sums)
    torch.testing.assert_close(c2, counts)


def test_layer_picks_all_queries_as_probes_at_ratio_one_and_the_last_ones_plus_random_by_default():
    model = tiny_model("llama")
    patchattn.patch_model(model, "zipcache", preset="paper", probe_recent_ratio=1.0)
    layer = generation_cache(model).layers[0]
    layer.lazy_initialization(torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16))
    assert layer.pick_probes(30).tolist() == list(range(30))
    layer.variant.params = ZipCacheParams(**PAPER_SETTING)  # 5 % + 5 %
    rows = layer.pick_probes(200).tolist()
    assert len(rows) == 20 and rows[-10:] == list(range(190, 200)) and all(r < 190 for r in rows[:10])
    layer.variant.params = ZipCacheParams(max_probes=40)  # 10 % of 1,000 capped to 40, both kinds alike
    rows = layer.pick_probes(1000).tolist()
    assert rows == sorted(set(rows)) and len(rows) == 40 and rows[-20:] == list(range(980, 1000))
    assert len(layer.pick_probes(400)) == 40 and len(layer.pick_probes(300)) == 30  # the cap, then the ratios


def test_a_checkpoint_saved_before_the_probe_cap_loads_uncapped(tmp_path):
    """A spec without ``max_probes`` probed 10 % of every prompt when saved: it loads as ``max_probes=0``."""
    model = tiny_model("llama")
    patchattn.patch_model(model, "zipcache")
    assert patchattn.patch_specs(model)[0]["params"]["max_probes"] == 4096
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["patchattn"][0]["params"]["max_probes"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert patchattn.patch_specs(patchattn.from_pretrained(tmp_path))[0]["params"]["max_probes"] == 0


def test_estimated_saliency_marks_the_tokens_that_get_attention():
    """Keys aligned with every query (attention magnets) must come out salient from ~10 % probes."""
    d, n = 16, 200
    q = randn(1, 2, n, d, seed=9).abs() + 1.0
    k = randn(1, 1, n, d, seed=10)
    magnets = torch.tensor([3, 50, 120, 170])
    k[0, 0, magnets] = 3.0
    model = tiny_model("gemma")
    patchattn.patch_model(model, "zipcache", preset="paper", salient_ratio=0.05)
    layer = generation_cache(model).layers[0]
    layer.lazy_initialization(k[:, :, :0], k[:, :, :0])
    layer.recent_keys, layer.recent_values = k, k
    layer.score_sums, layer.score_counts = torch.zeros(1, 1, n), torch.zeros(1, 1, n)
    layer.record_probes(*probe_scores(q, k, layer.pick_probes(n), None, scaling=0.25))
    sal = layer.score_sums / layer.score_counts.clamp_min(1)
    assert set(sal[0, 0].topk(10).indices.tolist()) >= set(magnets.tolist())


# ------------------------------------------------------------------------------------------------ the cache


def expected_block_bytes(block, hk, d, params):
    """The layout, derived independently: packed codes + fp16 parameters + 1-bit saliency bitmap."""
    high, low, key_low = params.high_bits, params.low_bits, params.key_low_bits or params.low_bits
    split = block.bitmap is not None
    if split:
        subsets = [(block.n_high, high, high), (block.n - block.n_high, key_low, low)]
    else:
        subsets = [(block.n, high, high)] if block.n_high == block.n else [(block.n, key_low, low)]
    keys_whole = split and key_low == high  # one key range for the block
    vgroups = 1 if params.value_group_size == 0 else hk * d // params.value_group_size

    def key_bytes(n, bits):
        groups = 1 if params.key_group_size == 0 else math.ceil(n / min(params.key_group_size, n))
        return hk * n * d * bits // 8 + hk * groups * d * 2 * 2  # packed codes + zero/step per channel (group)

    total = hk * d * 2  # value channel scale, shared by the block
    for n, kbits, vbits in subsets:
        total += hk * n * d * vbits // 8 + n * vgroups * 2 * 2  # packed codes + zero/step per token (group)
        total += 0 if keys_whole else key_bytes(n, kbits)
    total += key_bytes(block.n, high) if keys_whole else 0
    return total + (hk * math.ceil(block.n / 8) if split else 0)


# (parameters, fp16 / nbytes bounds for full layers: above, from the parameter overhead at head_dim 16 with 10-token
# streaming blocks; below, the codes alone: 16 / 3 bits at 4/2 bits and 50 % salient, 16 / 3.2 for keys at 4 bits and
# 2-bit values, 16 / 4 at 4 bits for everything, the default)
SETTINGS = {"4/2, 50 %": ({**PAPER_SETTING, "salient_ratio": 0.5}, 3.3, 16 / 3),
            "values at 2 bits": ({"low_bits": 2}, 3.2, 16 / 3.2), "default": ({}, 2.6, 16 / 4)}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_uses_the_cache_on_every_family_with_honest_bytes_and_compression(family, setting):
    params, low, high = SETTINGS[setting]
    model = tiny_model(family)
    x = prompt(200)
    patchattn.patch_model(model, "zipcache", requant_interval=10, **params)
    out = model.generate(x, max_new_tokens=21, min_new_tokens=21, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, PatchattnCache) and len(zip_layers(cache)) == len(cache.layers)
    assert out.sequences.shape == (1, 221)
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        patchattn.unpatch_model(model)
        model(input_ids=out.sequences[:, :-1], past_key_values=ref, use_cache=True)
    for layer, plain in zip(cache.layers, ref.layers):
        hk, d = plain.keys.shape[1], plain.keys.shape[3]
        assert layer.recent_length == 0  # 200-token prefill + 2 windows of 10 decode steps, all quantised
        sinks = 0 if layer.is_sliding else layer.variant.params.sink_tokens
        assert layer.sink_keys.shape[2] == sinks
        assert torch.equal(layer.sink_keys, plain.keys[:, :, :sinks])  # kept exactly
        assert layer.nbytes() == sum(expected_block_bytes(b, hk, d, layer.variant.params) for b in layer.blocks) + (
            2 * sinks * hk * d * 4)  # fp32 sinks
        fp16 = (plain.keys.numel() + plain.values.numel()) * 2
        if not layer.is_sliding:
            assert layer.quantized_length + sinks == 220
            assert low < fp16 / layer.nbytes() < high
        else:  # keeps the window (23 tokens) at the granularity of its 10-token blocks
            assert 23 <= layer.quantized_length <= 23 + 9 and layer.nbytes() < fp16


@torch.no_grad()
def stepwise_logits(model, ids, prefill, cache):
    """Prefill ``ids[:, :prefill]``, then feed the rest one token at a time (teacher forced): logits of each step."""
    out = [model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits[:, -1]]
    for t in range(prefill, ids.shape[1]):
        out.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "mistral"])
def test_eight_bits_everywhere_gives_logits_close_to_exact(family):
    model = tiny_model(family)
    ids = prompt(65, batch=2)
    ref = stepwise_logits(model, ids, 40, DynamicCache(config=model.config))
    patchattn.patch_model(model, "zipcache", preset="paper", high_bits=8, low_bits=8, requant_interval=8)
    eight = stepwise_logits(model, ids, 40, generation_cache(model))
    torch.testing.assert_close(eight, ref, atol=1e-2 * ref.abs().max().item(), rtol=0)
    patchattn.unpatch_model(model)
    patchattn.patch_model(model, "zipcache", preset="paper", requant_interval=8)  # default 4/2 bits: visibly further away
    low = stepwise_logits(model, ids, 40, generation_cache(model))
    assert (low - ref).abs().max() > 10 * (eight - ref).abs().max()


def test_without_a_zipcache_layer_it_is_exact_attention():
    model = tiny_model("gemma3")
    x = prompt(50, batch=2)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        patchattn.patch_model(model, "zipcache", preset="paper")
        assert torch.equal(model(input_ids=x).logits, ref)  # model(...) builds a plain DynamicCache
        user = DynamicCache(config=model.config)
        ref_gen = model.generate(x, max_new_tokens=5, do_sample=False, past_key_values=user)
        assert all(type(layer).__name__.startswith("Dynamic") for layer in user.layers)
        patchattn.unpatch_model(model)
        assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=False), ref_gen)


def test_streaming_requantisation_happens_every_interval_with_its_probe_steps():
    model = tiny_model("llama")
    patchattn.patch_model(model, "zipcache", preset="paper", requant_interval=20)
    cache = generation_cache(model)
    probes = []
    original = ZipCacheLayer.record_probes

    def spy(self, sums, counts):
        if self is cache.layers[0]:
            probes.append((self.blocks_made, self.window_steps))  # (window, step in it); prefill: (0, 0)
        original(self, sums, counts)

    ZipCacheLayer.record_probes = spy
    try:
        with torch.no_grad():
            x = prompt(30)
            model(input_ids=x, past_key_values=cache, use_cache=True)
            layer = cache.layers[0]
            assert (layer.blocks_made, layer.recent_length, layer.quantized_length) == (1, 0, 30)
            token = x[:, -1:]
            for step in range(1, 46):
                model(input_ids=token, past_key_values=cache, use_cache=True)
                assert layer.recent_length == step % 20 and layer.blocks_made == 1 + step // 20
                assert layer.get_seq_length() == 30 + step
    finally:
        ZipCacheLayer.record_probes = original
    # the prefill's probes, then per 20-step window its last step (5 %) and one random earlier step (5 %)
    assert probes[0] == (0, 0)
    for window in (1, 2):
        steps = [step for w, step in probes if w == window]
        assert len(steps) == 2 and steps[1] == 20 and 1 <= steps[0] < 20
    assert all(step < 20 for w, step in probes if w == 3)  # the open window has not reached its last step


def test_sliding_layer_bookkeeping_matches_transformers():
    model = tiny_model("mistral")  # window 24 on every layer
    patchattn.patch_model(model, "zipcache", preset="paper", requant_interval=7)
    ours = generation_cache(model).layers[0]
    theirs = DynamicSlidingWindowLayer(sliding_window=24)
    for n in [30, 1, 1, 5, *[1] * 20, 40, 1]:
        k = randn(1, 2, n, 16, seed=n)
        assert ours.get_mask_sizes(n) == theirs.get_mask_sizes(n)
        mine, _ = ours.update(k, k)
        ref, _ = theirs.update(k, k)
        assert mine.shape == ref.shape and ours.get_seq_length() == theirs.get_seq_length()
        torch.testing.assert_close(mine[:, :, -n:], ref[:, :, -n:])  # the new tokens, unquantised
        handoff(ours.variant.host).pop(PENDING_KEY)
        ours.after_attention(n)
        assert 23 <= ours.quantized_length + ours.recent_length <= 23 + 6 or ours.get_seq_length() < 23


def test_sliding_layers_can_stay_full_precision():
    model = tiny_model("gemma3")
    patchattn.patch_model(model, "zipcache", preset="paper", quantize_sliding=False)
    cache = generation_cache(model)
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicSlidingWindowLayer", "ZipCacheLayer"] * 2


def test_beam_search_reorders_the_quantised_cache():
    model = tiny_model("qwen2")
    patchattn.patch_model(model, "zipcache", preset="paper", requant_interval=4)
    out = model.generate(prompt(20, batch=2), max_new_tokens=10, num_beams=3, do_sample=False)
    assert out.shape == (2, 30)


@pytest.mark.parametrize("kwargs, match", [
    (dict(low_bits=4, high_bits=2), r"low_bits \(4\) must not exceed high_bits \(2\)"),
    (dict(high_bits=3), r"'high_bits' must be one of \[2, 4, 8\]"),
    (dict(salient_ratio=1.5), r"'salient_ratio' must be in \[0.0, 1.0\]"),
    (dict(requant_interval=0), r"'requant_interval' must be in \[1,"),
    (dict(key_low_bits=8), r"key_low_bits \(8\) must be in \[low_bits, high_bits\] = \[2, 4\]"),
])
def test_parameters_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        patchattn.patch_model(tiny_model("llama"), "zipcache", preset="paper", **kwargs)


def test_value_group_size_must_divide_a_tokens_value_channels():
    model = tiny_model("llama")  # head_dim 16
    patchattn.patch_model(model, "zipcache", preset="paper", value_group_size=6)
    with pytest.raises(ValueError, match="value_group_size 6 does not divide the 32 value channels"):
        model.generate(prompt(8), max_new_tokens=2)


def test_chatglm2_port_generates_with_the_cache():
    from patchattn.models.chatglm2 import ChatGLM2Config, ChatGLM2ForCausalLM

    torch.manual_seed(0)
    config = ChatGLM2Config(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=32,
                            padded_vocab_size=VOCAB, multi_query_attention=True, multi_query_group_num=2)
    model = ChatGLM2ForCausalLM(config).eval()
    x = prompt(30)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    ref = model.generate(x, **kwargs)
    patchattn.patch_model(model, "zipcache", preset="paper", high_bits=8, low_bits=8, requant_interval=5)
    out = model.generate(x, **kwargs)
    assert [type(layer) for layer in out.past_key_values.layers] == [ZipCacheLayer] * 2
    assert out.past_key_values.layers[0].blocks_made == 3  # prefill + 2 streaming windows of 5
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-2 * b.abs().max().item(), rtol=0)


def test_save_and_load_keep_the_cache(tmp_path):
    model = tiny_model("gemma3")
    patchattn.patch_model(model, "zipcache")
    x = prompt(30)
    ref = model.generate(x, max_new_tokens=12, do_sample=False)
    model.save_pretrained(tmp_path)
    loaded = patchattn.from_pretrained(tmp_path)
    out = loaded.generate(x, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref) and isinstance(out.past_key_values, PatchattnCache)
    assert loaded.config.patchattn[0]["params"]["key_low_bits"] == 4


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: softcap, so every step is eager
def test_decode_in_stored_order_equals_token_order(family, padded):
    """Decode steps read blocks salient-first (token order restored where a padding mask or returned weights need
    it): same logits and weights as reading every block in token order."""
    model = tiny_model(family)
    ids = prompt(40, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0 if padded else 1  # left padding
    patchattn.patch_model(model, "zipcache", preset="paper", requant_interval=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=15, do_sample=False, return_dict_in_generate=True,
                  output_logits=True, output_attentions=padded)
    stored = model.generate(ids, **kwargs)
    full = [layer for layer in stored.past_key_values.layers if not layer.is_sliding]
    assert full and all(layer.shuffled for layer in full)  # the last decode step read them as stored
    ZipCacheLayer.decode_in_stored_order = False
    try:
        ordered = model.generate(ids, **kwargs)
    finally:
        ZipCacheLayer.decode_in_stored_order = True
    assert not any(layer.shuffled for layer in ordered.past_key_values.layers)
    assert torch.equal(stored.sequences, ordered.sequences)
    for a, b in zip(stored.logits, ordered.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for step_a, step_b in zip(stored.attentions or (), ordered.attentions or ()):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_defaults_are_the_recommendation_and_the_paper_is_a_preset():
    default, paper = ZipCache.make_params(), ZipCache.make_params(preset="paper")
    assert (default.key_low_bits, default.salient_ratio, default.key_group_size, default.sink_tokens) == (4, 0.2, 128, 1)
    assert (paper.key_low_bits, paper.salient_ratio, paper.key_group_size, paper.sink_tokens) == (0, 0.6, 0, 0)
    assert ZipCache.make_params(preset="paper", sink_tokens=4).sink_tokens == 4  # arguments go on top
    with pytest.raises(ValueError, match="unknown preset 'fast'; presets: \\['paper'\\]"):
        ZipCache.make_params(preset="fast")

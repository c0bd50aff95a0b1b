"""The linear-attention variants (lawcat, hedgehog, mala, nala, lightning): decoding from the constant-size state
== the full forward on several families, generate() with the variant's cache, padding, the math against O(n²)
references, attention transfer, save/load, layer choice and parameter validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CACHE_KW, random_ids, tiny_model
from transformers import DynamicCache

import patchattn
from patchattn.cache import PatchattnCache, build_cache
from patchattn.distill import attention_transfer, attention_transfer_loss
from patchattn.patching import LAYER_ATTR, resolve_family
from patchattn.variants.linear import LinearAttentionVariant, LinearStateLayer
from patchattn.variants.linear.base import random_feature_weights, softmax_features
from patchattn.variants.linear.lawcat import gate_bias

# every variant, and the hybrid window where a variant has one; lawcat decays fast enough to matter in 20 tokens
CASES = {
    "lawcat": {"decay_halflife": 6.0},
    "lawcat+window": {"decay_halflife": 6.0, "window": 5},
    "hedgehog": {},
    "hedgehog+window": {"window": 4},
    "mala": {},
    "nala": {},
    "nala+window": {"window": 3},
    "lightning": {},
}
ONE_PER_VARIANT = ["lawcat+window", "hedgehog", "mala", "nala+window", "lightning"]
FAMILIES = ["llama", "mistral", "qwen3", "gemma2"]  # RoPE scaling, sliding window + GQA, QK-norm, softcap


pytestmark = pytest.mark.usefixtures("one_thread")


def variant_of(case: str) -> str:
    return case.split("+")[0]


def tokens(batch=2, n=20, seed=1):
    return random_ids(batch, n, seed)


def variant_layers(model) -> dict[int, LinearAttentionVariant]:
    modules = resolve_family(model).attention_modules(model)
    return {i: m._modules[LAYER_ATTR] for i, m in enumerate(modules) if LAYER_ATTR in m._modules}


def linear_cache(model) -> PatchattnCache:
    """What generate() builds: the default cache with the patched layers' entries replaced."""
    return build_cache(variant_layers(model), DynamicCache(config=model.config))


@torch.no_grad()
def perturb(model, seed=0):
    """Move every variant parameter off its init (conv taps, gates, maps, scales)."""
    g = torch.Generator().manual_seed(seed)
    for layer in variant_layers(model).values():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def patched(family, case, layers=None, seed=0):
    model = tiny_model(family)
    patchattn.patch_model(model, variant_of(case), layers=layers, **CASES[case])
    perturb(model, seed)
    return model


# -- the recurrent state: prefill + one-token steps == one full forward, with left padding, constant size ------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_decoding_from_the_state_equals_the_full_forward(family, case):
    model = patched(family, case)
    ids = tokens(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    original = tiny_model(family)(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (full - original)[valid].abs().max() > 1e-3, "the variant changed nothing"

    cache = linear_cache(model)
    pieces = [model(input_ids=ids[:, :9], attention_mask=mask[:, :9], **{CACHE_KW: cache}).logits]
    sizes = []
    for t in range(9, 20):
        pieces.append(model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], **{CACHE_KW: cache}).logits)
        sizes.append(cache.nbytes())
    torch.testing.assert_close(torch.cat(pieces, 1)[valid], full[valid], atol=2e-5, rtol=0)
    assert all(isinstance(layer, LinearStateLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 20
    assert len(set(sizes)) == 1 and sizes[0] > 0  # constant in the context length


@pytest.mark.parametrize("case", ONE_PER_VARIANT)
@torch.no_grad()
def test_left_padding_changes_nothing(case):
    """A left-padded row computes exactly what the sequence alone does (same positions)."""
    model = patched("llama", case)
    ids = tokens(2, 16, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    batch = model(input_ids=ids, attention_mask=mask).logits[0, 5:]
    alone = model(input_ids=ids[:1, 5:], position_ids=torch.arange(5, 16)[None]).logits[0]
    torch.testing.assert_close(batch, alone, atol=2e-5, rtol=0)


# -- generate(): the variant's cache, same tokens as recomputing, memory independent of the length ------------------
@pytest.mark.parametrize("case", ONE_PER_VARIANT)
@torch.no_grad()
def test_generate_with_the_state_equals_recompute(case):
    model = patched("gemma2", case)  # sliding + global layers, softcap
    ids = tokens(2, 12, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(ids, max_new_tokens=6, **kw)
    recomputed = model.generate(ids, max_new_tokens=6, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=2e-5, rtol=0)
    short = cached.past_key_values
    longer = model.generate(tokens(2, 30, seed=5), max_new_tokens=15, **{**kw, "attention_mask": None})
    assert isinstance(short, PatchattnCache) and all(isinstance(layer, LinearStateLayer) for layer in short.layers)
    assert longer.past_key_values.get_seq_length() == 44
    assert longer.past_key_values.nbytes() == short.nbytes() > 0


@torch.no_grad()
def test_beam_search_reorders_the_state():
    model = patched("mistral", "lawcat+window")
    ids = tokens(2, 10, seed=4)
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(beams, model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False))


@torch.no_grad()
def test_unpatched_layers_keep_softmax_and_their_cache():
    """layers=... chooses what is linearised; the rest keep exact attention and their usual cache layers (gemma3:
    a patched sliding layer and a patched global one next to unpatched ones share the masks correctly)."""
    model = tiny_model("gemma3")  # layer types: sliding, full, sliding, full
    ids = tokens(1, 10, seed=6)
    reference = model(input_ids=ids).logits
    patchattn.patch_model(model, "lawcat", layers=[2, 3])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    recomputed = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, return_dict_in_generate=True,
                                output_logits=True)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(recomputed.logits), atol=2e-5, rtol=0)
    kinds = [type(layer).__name__ for layer in out.past_key_values.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "DynamicLayer", "LinearStateLayer", "LinearStateLayer"]
    assert [layer.is_sliding for layer in out.past_key_values.layers] == [True, False, True, False]
    patchattn.unpatch_model(model)
    torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=0, rtol=0)


@torch.no_grad()
def test_incremental_decoding_needs_the_variants_state():
    model = patched("llama", "hedgehog")
    cache = DynamicCache(config=model.config)  # a plain transformers cache: the state is not kept
    model(input_ids=tokens(1, 6), **{CACHE_KW: cache})
    with pytest.raises(RuntimeError, match="no recurrent state"):
        model(input_ids=tokens(1, 1), **{CACHE_KW: cache})


@torch.no_grad()
def test_packed_sequences_are_refused():
    model = patched("llama", "lawcat")
    position_ids = torch.cat([torch.arange(6), torch.arange(6)])[None]  # two documents in one row
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids=tokens(1, 12), position_ids=position_ids, use_cache=False)


# -- the math ----------------------------------------------------------------------------------------------------
def quadratic_reference(layer, q, k, v, x, valid, scaling, softcap):
    """Materialised weights: exact exp(score + β) for the last W keys, φ(q)·φ(k)·decay for older ones."""
    b, h, n, _ = q.shape
    keep = valid[:, None, :, None].float()
    q, k, v = q * keep, k * keep, v * keep
    cq, ck = q, k
    if layer.conv_size > 1:
        def conv(t, w):
            taps = [F.pad(t, (0, 0, shift, 0))[:, :, :n] for shift in range(layer.conv_size - 1, -1, -1)]
            return sum(tap * w[None, :, None, :, r] for r, tap in enumerate(taps))
        cq, ck = conv(q, layer.q_conv), conv(k, layer.k_conv)
    fq, fk = layer.feature_maps(cq, ck)
    ld = layer.log_decay(x, n)
    cum = (torch.zeros(b, k.shape[1], n) if ld is None else ld * valid[:, None, :]).cumsum(-1)
    group = h // k.shape[1]
    fk = fk.repeat_interleave(group, 1) * keep
    k, v, cum = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), cum.repeat_interleave(group, 1)
    ii, jj = torch.arange(n)[:, None], torch.arange(n)[None, :]
    linear = (fq @ fk.transpose(-1, -2)) * (cum[..., :, None] - cum[..., None, :]).exp()
    weights = linear
    if layer.window:
        s = (q @ k.transpose(-1, -2)) * scaling
        s = torch.tanh(s / softcap) * softcap
        weights = torch.where(ii - jj < layer.window, (s + layer.window_log_scale[:, None, None]).exp(), linear)
    weights = weights * ((jj <= ii) & valid[:, None, None, :])
    return (weights @ v) / (weights.sum(-1, keepdim=True) + (0.0 if layer.window else 1e-6))


@pytest.mark.parametrize("case", ["lawcat", "lawcat+window", "hedgehog+window", "nala+window"])
@torch.no_grad()
def test_recurrence_and_hybrid_window_match_the_quadratic_form(case):
    layer = patched("llama", case).model.layers[1].self_attn.patchattn_layer
    g = torch.Generator().manual_seed(7)
    b, n = 2, 13
    q, k, v = (torch.randn(b, heads, n, 16, generator=g) for heads in (4, 2, 2))
    x = torch.randn(b, n, 64, generator=g)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :3] = False
    ref = quadratic_reference(layer, q, k, v, x, valid, 0.25, 5.0)
    full, _ = layer.run(q, k, v, x, valid, None, 0.25, 5.0)
    first, state = layer.run(q[:, :, :6], k[:, :, :6], v[:, :, :6], x[:, :6], valid[:, :6], None, 0.25, 5.0)
    second, _ = layer.run(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], x[:, 6:], valid[:, 6:], state, 0.25, 5.0)
    rows = valid[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(full[rows], ref[rows], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([first, second], 2)[rows], ref[rows], atol=2e-6, rtol=1e-5)


@torch.no_grad()
def test_mala_and_lightning_match_their_formulas():
    g = torch.Generator().manual_seed(8)
    n = 9
    q, k, v = (torch.randn(1, heads, n, 16, generator=g) for heads in (4, 2, 2))
    causal = torch.ones(n, n).tril().bool()
    mala = patched("llama", "mala").model.layers[0].self_attn.patchattn_layer
    a = ((F.elu(q) + 1) @ (F.elu(k) + 1).repeat_interleave(2, 1).transpose(-1, -2)).masked_fill(~causal, 0)
    count = torch.arange(1, n + 1.0)[:, None]
    tau = mala.log_tau.exp()[:, None, None]
    weights = a / a.sum(-1, keepdim=True) + tau / count * (a - a.sum(-1, keepdim=True) / count) * causal
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, n))  # MALA's weights still sum to one
    out, _ = mala.run(q, k, v, None, None, None, 0.25)
    torch.testing.assert_close(out, weights @ v.repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)

    lightning = patched("llama", "lightning").model.layers[2].self_attn.patchattn_layer
    slopes = torch.tensor([2.0 ** -4, 2.0 ** -8]) * (1 - 2 / 3 + 1e-5)  # ALiBi slopes of 2 KV heads, layer 2 of 4
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp_min(0)
    decay = (-slopes.repeat_interleave(2)[:, None, None] * dist).exp() * causal
    raw = ((F.silu(q) @ F.silu(k).repeat_interleave(2, 1).transpose(-1, -2)) * decay) @ v.repeat_interleave(2, 1)
    expected = raw * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + 1e-6) * lightning.norm_gain[None, :, None]
    out, _ = lightning.run(q, k, v, torch.zeros(1, n, 64), None, None, 0.25)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
@torch.no_grad()
def test_a_window_covering_the_sequence_is_the_original_softmax(family):
    """With W >= the sequence, the hybrid has no linear terms: exact softmax (scaling, softcap, GQA, padding)."""
    model = tiny_model(family)
    ids = tokens(2, 16, seed=9)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    reference = model(input_ids=ids, attention_mask=mask).logits
    patchattn.patch_model(model, "lawcat", window=16)
    perturb(model)
    valid = mask.bool()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[valid], reference[valid], atol=2e-5,
                               rtol=0)


def test_hedgehog_starts_near_softmax():
    """The random-feature init: closer to softmax attention than elu+1 linear attention or uniform averaging
    (small logits, where the estimator's variance is low)."""
    g = torch.Generator().manual_seed(0)
    n, d, scaling = 64, 16, 0.25
    q, k, v = (0.5 * torch.randn(1, 1, n, d, generator=g) for _ in range(3))
    causal = torch.ones(n, n).tril().bool()
    softmax = torch.softmax((q @ k.transpose(-1, -2) * scaling).masked_fill(~causal, -torch.inf), -1) @ v

    def linear(fq, fk):
        a = (fq @ fk.transpose(-1, -2)).masked_fill(~causal, 0)
        return a / a.sum(-1, keepdim=True) @ v

    w = random_feature_weights(1, d, 64, scaling, seed=0)
    err = {"hedgehog": linear(softmax_features(q, w), softmax_features(k, w)),
           "elu": linear(F.elu(q) + 1, F.elu(k) + 1), "uniform": linear(torch.ones_like(q), torch.ones_like(k))}
    err = {name: (out - softmax).pow(2).mean().item() for name, out in err.items()}
    assert err["hedgehog"] < 0.6 * err["elu"] and err["hedgehog"] < 0.5 * err["uniform"], err


# -- training, saving, parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["lawcat", "hedgehog+window", "mala", "nala", "lightning"])
def test_attention_transfer_trains_the_new_parameters(case):
    model = tiny_model("llama")
    with torch.no_grad():  # sharper attention than a random init gives: something to match
        for decoder_layer in model.model.layers:
            decoder_layer.self_attn.q_proj.weight.mul_(4.0)
    patchattn.patch_model(model, variant_of(case), **CASES[case])
    model.requires_grad_(False)
    trainable = [p for layer in variant_layers(model).values() for p in layer.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=3e-2)
    ids = tokens(2, 24, seed=10)
    losses = []
    with attention_transfer(model):
        for _ in range(10):
            model(input_ids=ids, use_cache=False)
            loss = attention_transfer_loss(model)
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert losses[-1] < 0.8 * losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses


@pytest.mark.parametrize("case", ONE_PER_VARIANT)
def test_save_and_from_pretrained_give_identical_logits(case, tmp_path):
    model = patched("qwen3", case, layers="last:3", seed=11)
    ref = model(input_ids=tokens()).logits
    model.save_pretrained(tmp_path)
    loaded = patchattn.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.patchattn[0]["params"] == model.config.patchattn[0]["params"]
    assert sorted(variant_layers(loaded)) == [1, 2, 3]
    torch.testing.assert_close(loaded(input_ids=tokens()).logits, ref, atol=0, rtol=0)


@pytest.mark.parametrize("variant, params, message", [
    ("lawcat", {"window": -1}, "'window' must be in"),
    ("lawcat", {"conv_size": 0}, "'conv_size' must be in"),
    ("lawcat", {"feature_dim": 2.5}, "'feature_dim' must be an integer"),
    ("lawcat", {"decay_halflife": 0.5}, "'decay_halflife' must be in"),
    ("hedgehog", {"conv_size": 4}, "unknown parameter"),
    ("mala", {"window": 8}, "unknown parameter"),
    ("lightning", {"feature_dim": 8}, "unknown parameter"),
    ("nala", {"window": "64"}, "'window' must be an integer"),
])
def test_parameters_are_validated(variant, params, message):
    with pytest.raises(ValueError, match=message):
        patchattn.patch_model(tiny_model("llama"), variant, **params)


def test_lawcat_init():
    """Identity conv taps, zero gate weights and the bias that gives the requested half-life."""
    fresh = tiny_model("llama")
    patchattn.patch_model(fresh, "lawcat", decay_halflife=100.0)
    layer = fresh.model.layers[0].self_attn.patchattn_layer
    assert torch.equal(layer.q_conv[..., -1], torch.ones(4, 16)) and not layer.q_conv[..., :-1].any()
    assert not layer.gate.weight.any()
    gamma = torch.exp(F.logsigmoid(torch.tensor(gate_bias(100.0))) / 16)
    assert math.isclose(gamma.item() ** 100, 0.5, rel_tol=1e-4)

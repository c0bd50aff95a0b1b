"""The trainable variants (gated, affine, moh, sigmoid): identity at init on every family, generate with the KV
cache == recomputation, save/load after training, a few AdamW steps lower the loss, PEFT LoRA composition, the
reference math, and parameter validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import BUILDERS, left_padded, logits, random_ids, tiny_model

import patchattn
from patchattn.attention import causal_bool_mask
from patchattn.patching import LAYER_ATTR
from patchattn.variants.affine import visible_value_mean
from patchattn.variants.base import handoff
from patchattn.variants.moh import MoHAttention, load_balance_loss
from patchattn.variants.sigmoid import calibrate_output_norm

FAMILIES = sorted(BUILDERS)
IDENTITY = ["gated", "affine", "moh"]  # sigmoid changes the normalisation: it cannot start at the original
ALL = IDENTITY + ["sigmoid"]
# settings that make every variant differ from exact attention (after perturb()), for the cache/save/train tests
ACTIVE = {"gated": {}, "affine": {}, "moh": {"active_heads": 0.75}, "sigmoid": {}}


def tokens(batch=2, n=32, seed=1):
    return random_ids(batch, n, seed)


def variant_layers(model):
    return [m for m in model.modules() if isinstance(m, patchattn.variants.Variant)]


@torch.no_grad()
def perturb(model, seed=0):
    """Move every variant parameter (and the affine running mean) away from its identity init."""
    g = torch.Generator().manual_seed(seed)
    for layer in variant_layers(model):
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if name.endswith("gain") or name == "alpha_ma":
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                t.copy_(0.3 * torch.randn(t.shape, generator=g))


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


# -- identity at init -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(family):
    """Patched at init == unpatched, with and without left padding (sliding windows, softcap, GQA included)."""
    model = tiny_model(family)
    ids, mask = left_padded(32, (0, 5, 13))
    ref, ref_pad = logits(model, tokens()), logits(model, ids, mask)
    valid = mask.bool()
    for variant in IDENTITY:
        patchattn.patch_model(model, variant)
        torch.testing.assert_close(logits(model, tokens()), ref, atol=1e-5, rtol=0, msg=variant)
        torch.testing.assert_close(logits(model, ids, mask)[valid], ref_pad[valid], atol=1e-5, rtol=0, msg=variant)
        patchattn.unpatch_model(model)


@pytest.mark.parametrize("variant, params", [
    ("gated", {"granularity": "channel", "bias": True}),
    ("affine", {"activation": "sigmoid", "bias": True}),
    ("moh", {"shared_heads": 0.25}),
    ("moh", {"shared_heads": 0.0}),
    ("moh", {"shared_heads": 1.0}),
    ("moh", {"router": "query_norm", "active_heads": 1.0}),
])
def test_identity_at_init_other_settings(variant, params):
    model = tiny_model("qwen3")
    ref = logits(model, tokens())
    patchattn.patch_model(model, variant, **params)
    model.train()  # training mode too: dropout is 0, the affine running mean stays at 1
    torch.testing.assert_close(logits(model, tokens()), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_unchanged_at_init(family):
    model = tiny_model(family)
    ids, mask = left_padded(32, (0, 5, 13))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for variant in IDENTITY:
        patchattn.patch_model(model, variant)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), ref), variant
        patchattn.unpatch_model(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # detach removed the hooks
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), ref)


# -- KV cache: a decode step (q_len = 1, the new token's x) == recomputing the whole sequence ------------------------
@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("family", ["mistral", "gemma2"])  # GQA, sliding window 24 < 34 tokens; softcap
def test_generate_with_cache_equals_recompute(family, variant):
    model = tiny_model(family)
    patchattn.patch_model(model, variant, **ACTIVE[variant])
    perturb(model)
    ids = tokens(2, 28, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    cached, recomputed = model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ALL)
def test_gradient_checkpointing_gives_the_same_gradients(variant):
    """The pre-hook fires again in the recomputation, so the recomputed layer sees the same x."""
    params = {**ACTIVE[variant], **({"momentum": 1.0} if variant == "affine" else {})}  # EMA would update twice
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("qwen3")
        patchattn.patch_model(model, variant, **params)
        perturb(model)
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()  # 5.17 name
        model.train()
        lm_loss(model, tokens()).backward()
        grads.append(torch.cat([p.grad.flatten() for layer in variant_layers(model) for p in layer.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# -- save / load through the patch spec -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ALL)
def test_save_and_load_after_training(variant, tmp_path):
    model = tiny_model("gemma3")
    patchattn.patch_model(model, variant, layers="last:3", **ACTIVE[variant])
    perturb(model, seed=5)
    ref = logits(model, tokens())
    assert (ref - logits(tiny_model("gemma3"), tokens())).abs().max() > 1e-3, "the variant changed nothing"
    model.save_pretrained(tmp_path)
    loaded = patchattn.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.patchattn[0]["variant"] == variant
    assert loaded.config.patchattn[0]["params"] == model.config.patchattn[0]["params"]
    torch.testing.assert_close(logits(loaded, tokens()), ref, atol=0, rtol=0)


# -- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ALL)
def test_variant_parameters_train(variant):
    """Only the variant's parameters train. The random tiny model's attention is sharpened (larger queries and
    values) so it is not near-uniform: affine reweights softmax against the uniform mean of the values and has
    nothing to learn on uniform attention."""
    model = tiny_model("llama")
    with torch.no_grad():
        for decoder_layer in model.model.layers:
            decoder_layer.self_attn.q_proj.weight.mul_(16.0)
            decoder_layer.self_attn.v_proj.weight.mul_(4.0)
    patchattn.patch_model(model, variant, **ACTIVE[variant])
    model.requires_grad_(False)
    trainable = [p for layer in variant_layers(model) for p in layer.parameters()]
    assert trainable, "no trainable parameters"
    for p in trainable:
        p.requires_grad_(True)
    model.train()
    ids = tokens(2, 32, seed=7)
    opt = torch.optim.AdamW(trainable, lr=3e-2, weight_decay=0.0)
    losses = []
    for _ in range(8):
        loss = lm_loss(model, ids)
        losses.append(loss.item())
        (loss + load_balance_loss(model)).backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 5e-3 and sum(losses[-3:]) < sum(losses[:3]), losses  # moh's top-k is not smooth


def test_moh_load_balance_loss():
    model = tiny_model("llama")
    patchattn.patch_model(model, "moh", active_heads=0.75)  # 4 heads: 2 shared, top-1 of 2 routed
    perturb(model)
    model.train()
    lm_loss(model, tokens()).backward()
    layers = [m for m in model.modules() if isinstance(m, MoHAttention)]
    assert all(m.aux_loss is not None and m.aux_loss.requires_grad for m in layers)
    total = load_balance_loss(model, weighted=False)
    torch.testing.assert_close(load_balance_loss(model), 0.01 * total)
    assert 0.0 < total.item() / len(layers) <= 2.0 + 1e-5  # R² mean_e(me·ce) with R=2 routed heads, top-1: <= R
    model.eval()
    logits(model, tokens())
    assert load_balance_loss(model).item() == 0.0


def test_moh_query_norm_router_keeps_the_largest_queries():
    model = tiny_model("llama")
    patchattn.patch_model(model, "moh", router="query_norm", active_heads=0.75)
    layer = model.model.layers[0].self_attn.patchattn_layer
    assert (layer.shared, layer.routed, layer.top_k) == (2, 2, 1) and not list(layer.parameters())
    query = torch.randn(2, 4, 5, 16)
    weights = layer.head_weights(torch.zeros(2, 5, 64), query, torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(weights[..., :2], torch.ones(2, 5, 2))
    larger = query[:, 2:].norm(dim=-1).argmax(dim=1)  # [b, q]: which routed head has the larger query
    assert torch.equal(weights[..., 2:].argmax(dim=-1), larger) and torch.equal(weights[..., 2:].sum(-1),
                                                                               torch.ones(2, 5))
    out = logits(model, tokens())
    assert torch.isfinite(out).all()


# -- PEFT LoRA on top of a patched model ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ALL)
def test_peft_lora_composes(variant):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    patchattn.patch_model(model, variant, **ACTIVE[variant])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    names = [n for n, _ in peft_model.named_parameters() if f".{LAYER_ATTR}." in n]
    assert names
    for n, p in peft_model.named_parameters():
        if f".{LAYER_ATTR}." in n:
            p.requires_grad_(True)  # train the variant next to the adapters
    peft_model.train()
    loss = peft_model(input_ids=tokens(), labels=tokens()).loss + load_balance_loss(peft_model)
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in names)


# -- the math against direct references -------------------------------------------------------------------------------
def _reference_masks(b, q, k):
    causal = causal_bool_mask(q, k, "cpu")
    pad = torch.ones(b, k, dtype=torch.bool)
    pad[1, :3] = False
    window = causal & (torch.arange(k)[None, :] > torch.arange(q)[:, None] - 5)
    docs = torch.tensor([0] * 5 + [1] * (k - 5))
    holes = causal.clone()
    holes[8, 3] = False
    return {"causal": causal[None].expand(b, q, k), "padding": causal[None] & pad[:, None],
            "window+padding": window[None] & pad[:, None], "packed": (causal & (docs[:, None] == docs))[None].expand(b, q, k),
            "custom": holes[None].expand(b, q, k)}


def test_visible_value_mean_matches_masked_mean():
    torch.manual_seed(0)
    b, hk, k, d = 2, 2, 12, 4
    v = torch.randn(b, hk, k, d)
    for name, m in _reference_masks(b, k, k).items():
        want = torch.einsum("bqk,bhkd->bhqd", m.float(), v) / m.sum(-1).clamp(min=1)[:, None, :, None]
        torch.testing.assert_close(visible_value_mean(v, m[:, None], k), want, atol=1e-6, rtol=0, msg=name)
    causal = causal_bool_mask(k, k, "cpu").float()
    torch.testing.assert_close(visible_value_mean(v, None, k), torch.einsum("qk,bhkd->bhqd", causal, v) / causal.sum(-1)[:, None])
    torch.testing.assert_close(visible_value_mean(v, None, 1), v.mean(-2, keepdim=True))


def _attention_inputs(seed=0, b=2, h=4, hk=2, n=12, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, hh, n, d, generator=g) for hh in (h, hk, hk))
    return q, k, v


def test_affine_matches_the_paper_formula():
    model = tiny_model("llama")
    patchattn.patch_model(model, "affine")
    perturb(model)
    module = model.model.layers[0].self_attn
    layer = module.patchattn_layer
    q, k, v = _attention_inputs()
    x = torch.randn(2, 12, 64)
    for name, m in _reference_masks(2, 12, 12).items():
        handoff(module)["hidden_states"] = x  # what the pre-hook hands over inside a real forward
        out, weights = layer.attention(module, q, k, v, m[:, None], scaling=0.35, output_attentions=True)
        alpha = layer.alpha(x).transpose(1, 2)[..., None]  # [b, h, q, 1]
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = (q @ kk.transpose(-1, -2) * 0.35).masked_fill(~m[:, None], float("-inf"))
        p = torch.nan_to_num(scores.softmax(-1))
        n = m.sum(-1).clamp(min=1)[:, None, :, None]
        beta = (layer.alpha_ma[None, :, None, None] - alpha) / n  # Eq. 8, N = visible keys
        effective = alpha * p + beta * m[:, None].float()
        want = effective @ vv  # Eq. 6
        rows = m.any(-1)  # queries that see no key are padding
        torch.testing.assert_close(out[rows], want.transpose(1, 2)[rows], atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(weights.transpose(1, 2)[rows], effective.transpose(1, 2)[rows], atol=1e-5, rtol=0)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_sigmoid_matches_reference(softcap):
    model = tiny_model("llama")
    patchattn.patch_model(model, "sigmoid", norm="none")
    module = model.model.layers[0].self_attn
    layer = module.patchattn_layer
    q, k, v = _attention_inputs(seed=1)
    for name, m in _reference_masks(2, 12, 12).items():
        out, weights = layer.attention(module, q, k, v, m[:, None], scaling=0.35, softcap=softcap,
                                       output_attentions=True)
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = q @ kk.transpose(-1, -2) * 0.35
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        n = m.sum(-1).clamp(min=1)[:, None, :, None]
        want_w = torch.sigmoid(scores - n.log()) * m[:, None]
        torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(out, (want_w @ vv).transpose(1, 2), atol=1e-5, rtol=0, msg=name)
    out_none, _ = layer.attention(module, q, k, v, None, scaling=0.35)  # None = plain causal
    out_causal, _ = layer.attention(module, q, k, v, _reference_masks(2, 12, 12)["causal"][:, None], scaling=0.35)
    torch.testing.assert_close(out_none, out_causal)


@pytest.mark.parametrize("norm", ["head", "output"])
def test_sigmoid_calibration_brings_the_scale_back(norm):
    """An uncalibrated output norm forces unit RMS; calibrated on a batch, the zero-step model is much closer to
    the original softmax model."""
    model = tiny_model("qwen2")
    ref = F.log_softmax(logits(model, tokens()), -1)
    patchattn.patch_model(model, "sigmoid", norm=norm)
    kl = lambda: F.kl_div(F.log_softmax(logits(model, tokens()), -1), ref, log_target=True,
                          reduction="batchmean").item()
    before = kl()
    ids, mask = left_padded(32, (0, 5, 13), seed=9)
    assert calibrate_output_norm(model, ids, mask) == 4
    after = kl()
    assert after < 0.5 * before, (before, after)


# -- validation -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, params, match", [
    ("gated", {"granularity": "layer"}, r"gated: parameter 'granularity' must be one of \['head', 'channel'\]"),
    ("gated", {"bias": 1}, r"gated: parameter 'bias' must be True or False"),
    ("affine", {"momentum": 1.5}, r"affine: parameter 'momentum' must be in \[0.0, 1.0\]"),
    ("affine", {"activation": "tanh"}, r"affine: parameter 'activation' must be one of"),
    ("moh", {"active_heads": 0.25}, r"moh: parameter 'active_heads' \(0.25\) must be >= 'shared_heads' \(0.5\)"),
    ("moh", {"shared_heads": -0.1}, r"moh: parameter 'shared_heads' must be in \[0.0, 1.0\]"),
    ("moh", {"active_heads": 0.6}, r"moh: parameter 'active_heads'=0.6 selects no routed head on a 4-head layer"),
    ("moh", {"router": "random"}, r"moh: parameter 'router' must be one of \['learned', 'query_norm'\]"),
    ("moh", {"aux_loss_weight": -1.0}, r"moh: parameter 'aux_loss_weight' must be in \[0.0, inf\]"),
    ("sigmoid", {"context_length": 0}, r"sigmoid: parameter 'context_length' must be in \[1, inf\]"),
    ("sigmoid", {"norm": "layer"}, r"sigmoid: parameter 'norm' must be one of \['head', 'output', 'none'\]"),
])
def test_parameter_validation(variant, params, match):
    with pytest.raises(ValueError, match=match):
        patchattn.patch_model(tiny_model("llama"), variant, **params)


def test_listed_as_trainable():
    kinds = {v["name"]: v["kind"] for v in patchattn.list_variants()}
    assert all(kinds[name] == "trainable" for name in ALL)

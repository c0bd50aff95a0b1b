"""Each method against an answer computed without it, so a broken formula cannot stay green.

* HyperAttention: the sampled part is an unbiased estimate of the keys outside the query's block, so the
  estimated normaliser ``exp(lse)`` and unnormalised output ``exp(lse)·out``, averaged over seeds (hashes and
  samples), converge to the exact ones: reference and Triton kernel (interpreter on CPU), with key padding.
* ``attn_implementation="patchattn_hyper"`` above ``min_seq_len`` runs the approximation on every layer.
* ``gated`` and the MoH router against their formulas written out by hand.
* Beam search with every cache-bearing variant's own cache == beam search recomputing without a cache.
* The planner under a binding budget keeps the lowest-error layers (perplexity replaced by a known function).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny_models import VOCAB, random_ids, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import patchattn
from patchattn import planner
from patchattn.kernels.hyper import HyperSettings, naive
from patchattn.patching import LAYER_ATTR, resolve_family
from patchattn.variants import VARIANTS, Variant
from patchattn.variants.base import handoff

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(batch, n, seed=1):
    return random_ids(batch, n, seed)


# -- HyperAttention: the estimator is unbiased over seeds ---------------------------------------------------------
def _hyper_problem(n=128, h=2, hk=1, d=16, pad=40):
    """q/k random, v positive (so the unnormalised output has no cancellation), the last ``pad`` keys of row 1
    padded; returns the inputs and the exact normaliser Z ``[b, h, n]`` and numerator N ``[b, h, n, d]``, causal
    and not."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, h, n, d, generator=g)
    k = torch.randn(2, hk, n, d, generator=g)
    v = torch.rand(2, hk, n, d, generator=g) + 0.5
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, n - pad:] = False
    kk, vv = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
    w = torch.exp(q.double() @ kk.double().transpose(-1, -2) * d**-0.5) * valid[:, None, None, :]
    exact = {}
    for causal in (False, True):
        wc = w * torch.ones(n, n).tril() if causal else w
        exact[causal] = (wc.sum(-1), wc @ vv.double())
    return q, k, v, valid, exact


def _seed_average(fn, q, k, v, valid, settings, causal, seeds):
    z = num = 0
    for seed in seeds:
        out, lse = fn(q, k, v, None, HyperSettings(**settings, seed=seed), causal=causal, key_valid=valid)
        zs = lse.double().exp()
        z, num = z + zs, num + zs[..., None] * out.double()
    return z / len(seeds), num / len(seeds)


@pytest.mark.parametrize("causal", [False, True])
def test_hyper_reference_is_unbiased_over_seeds(causal):
    """One seed is far off (the sample is small); 300 seeds average to the exact normaliser and numerator, which
    only holds with the sampled keys weighted by n_valid / m (without it the mean ratio falls to ~0.35 non-causal,
    ~0.86 causal, where the exact leaves carry much of the mass)."""
    q, k, v, valid, exact = _hyper_problem()
    settings = dict(lsh_num_projs=3, block_size=32, sample_size=8, min_seq_len=32)
    z_ref, num_ref = exact[causal]
    z1, _ = _seed_average(naive.hyper_attention, q, k, v, valid, settings, causal, [0])
    assert (z1 / z_ref - 1).abs().max() > 0.3, "a single seed should be a rough estimate (sampling not reached?)"
    z, num = _seed_average(naive.hyper_attention, q, k, v, valid, settings, causal, range(300))
    ratio = z / z_ref
    assert abs(ratio.mean().item() - 1) < 0.01 and (ratio - 1).abs().max() < 0.12, ratio
    num_ratio = num / num_ref
    assert abs(num_ratio.mean().item() - 1) < 0.01 and (num_ratio - 1).abs().max() < 0.15


@pytest.mark.parametrize("pad", [40, 0])
def test_hyper_kernel_is_unbiased_over_seeds(pad):
    """The Triton kernels (interpreter on CPU), with and without key padding (two paths to the sample weights):
    the same unbiasedness over fewer seeds, so a looser bound (16 seeds land within 3%; kernels without the
    n_valid / m sample weight near 0.35)."""
    pytest.importorskip("triton")
    from kernel_helpers import DEV

    from patchattn.kernels.hyper.ops import hyper_attention_triton

    q, k, v, valid, exact = _hyper_problem(h=1, pad=pad)
    q, k, v, valid = (t.to(DEV) for t in (q, k, v, valid))
    settings = dict(lsh_num_projs=3, block_size=32, sample_size=8)
    z, num = _seed_average(hyper_attention_triton, q, k, v, valid if pad else None, settings, False, range(16))
    z, num = z.cpu(), num.cpu()
    z_ref, num_ref = exact[False]
    assert abs((z / z_ref).mean().item() - 1) < 0.1
    assert abs((num / num_ref).mean().item() - 1) < 0.1


def test_patchattn_hyper_implementation_approximates_above_min_seq_len():
    """``attn_implementation="patchattn_hyper"`` (default parameters) on a prompt longer than the default
    ``min_seq_len`` (4096): every layer's output equals ``patch_model(model, "hyper")`` with the same defaults but
    no retrieval-head search (an attention function never sees the whole model) and differs from exact attention
    (the existing test runs it only where it is exact)."""
    n = naive.HyperSettings().min_seq_len + 64
    ids = tokens(1, n, seed=7)
    model = tiny_model("llama")
    with torch.no_grad():
        exact = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        model.set_attn_implementation("patchattn_hyper")
        fixed = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
        model.set_attn_implementation("sdpa")
        patchattn.patch_model(model, "hyper", retrieval_heads=0)
        patched = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    for layer, (f, p, e) in enumerate(zip(fixed, patched, exact)):
        torch.testing.assert_close(f, p, atol=1e-6, rtol=0, msg=f"layer {layer}")
        assert (f - e).abs().max() > 1e-3, f"layer {layer} ran exact attention"


# -- gated: SDPA output × 2σ(x W_g + b_g) ---------------------------------------------------------------------------
def _softmax_attention(q, k, v, scaling):
    """Plain causal softmax attention with GQA, ``[b, q, h, d]``."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) * scaling
    s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("granularity, width", [("head", 1), ("channel", 16)])
def test_gated_output_is_attention_times_two_sigmoid(granularity, width):
    model = tiny_model("llama")  # 4 heads of 16, hidden 64
    patchattn.patch_model(model, "gated", granularity=granularity, bias=True)
    module = model.model.layers[1].self_attn
    layer = module.patchattn_layer
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.gate.weight.copy_(0.5 * torch.randn(layer.gate.weight.shape, generator=g))
        layer.gate.bias.copy_(torch.randn(layer.gate.bias.shape, generator=g))
    q, k, v = (torch.randn(2, h, 10, 16, generator=g) for h in (4, 2, 2))
    x = torch.randn(2, 10, 64, generator=g)
    handoff(module)["hidden_states"] = x  # what the pre-hook hands over inside a real forward
    with torch.no_grad():
        out, _ = layer.attention(module, q, k, v, None, scaling=0.25)
    z = x @ layer.gate.weight.T + layer.gate.bias  # [b, q, heads * width]
    gate = 2 / (1 + torch.exp(-z))
    want = _softmax_attention(q, k, v, 0.25) * gate.view(2, 10, 4, width)
    assert (gate - 1).abs().max() > 0.5  # far from the init, where 2σ(z) and 1 + z agree
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


# -- MoH: two-stage router, top-k renormalised over the selected heads, times k ------------------------------------
def test_moh_router_matches_the_paper_formula():
    """8 heads: 2 shared, top-3 of 6 routed. Per token, written out: routed weights ``k · g_i / Σ_selected g``
    for the top-k of ``g = softmax(x W_r)`` (0 elsewhere), shared ``softmax(x W_s) · 2``, both times the
    two-stage ``2 · softmax(x W_h)``; the output is exact attention per head times its weight."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    patchattn.patch_model(model, "moh", shared_heads=0.25, active_heads=0.625)
    module = model.model.layers[0].self_attn
    layer = module.patchattn_layer
    assert (layer.shared, layer.routed, layer.top_k) == (2, 6, 3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 7, 64, generator=g)
    q, k, v = (torch.randn(2, h, 7, 8, generator=g) for h in (8, 4, 4))
    handoff(module)["hidden_states"] = x
    with torch.no_grad():
        out, _ = layer.attention(module, q, k, v, None, scaling=8**-0.5)

    def softmax(z):
        e = [math.exp(t - max(z)) for t in z]
        return [t / sum(e) for t in e]

    Wr, Ws, Wh = layer.routed_router.weight, layer.shared_router.weight, layer.stage_router.weight
    want = torch.zeros(2, 7, 8)
    for b, t in itertools.product(range(2), range(7)):
        xt = x[b, t]
        gates = softmax((Wr @ xt).tolist())
        top = sorted(range(6), key=lambda i: -gates[i])[:3]
        total = sum(gates[i] for i in top)
        routed = [3 * gates[i] / total if i in top else 0.0 for i in range(6)]
        shared = [2 * s for s in softmax((Ws @ xt).tolist())]
        stage = [2 * s for s in softmax((Wh @ xt).tolist())]
        want[b, t] = torch.tensor([stage[0] * s for s in shared] + [stage[1] * r for r in routed])
    assert (want[..., 2:] > 0).sum(-1).eq(3).all()
    with torch.no_grad():
        weights = layer.head_weights(x, q, torch.ones(2, 7, dtype=torch.bool))
    torch.testing.assert_close(weights, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, _softmax_attention(q, k, v, 8**-0.5) * want[..., None], atol=1e-5, rtol=0)


# -- beam search with every variant's own cache == beam search without a cache ----------------------------------
# One entry per cache-bearing variant (a test below checks none is missing): (family, params, tolerance on the beam
# scores, sums of 16 log-probs of about -66). Mistral has GQA and a sliding window (24 < 12 + 16 tokens) on every
# layer. zipcache twice: lossless on llama's full layers (every token a full-precision sink; sliding layers quantise
# regardless), and 8 bits with blocks quantised every 3 steps (scores move by ~4e-3).
BEAM_CASES = {
    "zipcache": [("llama", dict(sink_tokens=1024, requant_interval=1024), 1e-4),
                 ("mistral", dict(preset="paper", high_bits=8, low_bits=8, requant_interval=3), 2e-2)],
    "lawcat": [("mistral", dict(decay_halflife=6.0, window=3), 1e-4)],
    "hedgehog": [("mistral", dict(window=3), 1e-4)],
    "mala": [("mistral", {}, 1e-4)],
    "nala": [("mistral", dict(window=3), 1e-4)],
    "lightning": [("mistral", {}, 1e-4)],
}


def test_every_cache_bearing_variant_has_a_beam_search_case():
    bearing = {name for name, cls in VARIANTS.items() if cls.make_cache_layer is not Variant.make_cache_layer}
    assert bearing == set(BEAM_CASES)


@pytest.mark.parametrize("variant, family, params, atol", [(v, *case) for v, cases in BEAM_CASES.items()
                                                           for case in cases],
                         ids=lambda x: ",".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else str(x))
@torch.no_grad()
def test_beam_search_with_the_variant_cache_equals_recompute(variant, family, params, atol):
    """Beams are reordered at every step: a cache layer that does not follow ``reorder_cache`` continues a beam from
    another beam's state, and its tokens and scores leave those of recomputing without a cache."""
    model = tiny_model(family)
    patchattn.patch_model(model, variant, **params)
    g = torch.Generator().manual_seed(0)
    for layer in [m for m in model.modules() if isinstance(m, Variant)]:
        for p in layer.parameters():  # off their init (identity convs, ...)
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    ids = tokens(2, 12, seed=4)
    kw = dict(max_new_tokens=16, num_beams=3, do_sample=False, return_dict_in_generate=True, output_scores=True,
              length_penalty=0.0)
    cached = model.generate(ids, **kw)
    recomputed = model.generate(ids, use_cache=False, **kw)
    assert type(cached.past_key_values).__name__ == "PatchattnCache"
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, atol=atol, rtol=0)


# -- planner: a binding budget keeps the lowest-error layers --------------------------------------------------------
def test_planner_under_a_binding_budget_keeps_the_lowest_error_layers(monkeypatch):
    """Perplexity replaced by ``1 + Σ (error of each patched layer)``: the largest affordable set is then, by brute
    force over all subsets, the cheapest k layers; a planner ordering layers any other way picks another set."""
    model = tiny_model("llama")
    approx = dict(min_seq_len=16, block_size=8, sample_size=8, exact_tail=0)
    ids = tokens(1, 64, seed=2)
    errors = planner.layer_errors(planner.capture(model, ids), "hyper", progress=False, **approx)
    assert len(set(errors.values())) == 4 and min(errors.values()) > 0

    def fake_ppl(m, *args, **kwargs):
        modules = resolve_family(m).attention_modules(m)
        cost = sum(errors[i] for i, mod in enumerate(modules) if LAYER_ATTR in mod._modules)
        return type("Result", (), {"ppl": 1.0 + cost})()

    monkeypatch.setattr(planner, "perplexity", fake_ppl)
    tokenizer = lambda text, return_tensors: type("Enc", (), {"input_ids": ids})()
    cheapest = sorted(errors.values())
    for budget in (cheapest[0] + 0.5 * cheapest[1], sum(cheapest[:2]) + 0.5 * cheapest[2],
                   sum(cheapest[:3]) + 0.5 * cheapest[3]):
        best = max((s for r in range(5) for s in itertools.combinations(range(4), r)
                    if sum(errors[i] for i in s) <= budget), key=lambda s: (len(s), -sum(errors[i] for i in s)))
        plan = planner.plan_layers(model, tokenizer, "text", "hyper", max_ppl_increase=budget, progress=False,
                                   **approx)
        assert 0 < len(best) < 4
        assert plan.layers == sorted(best), (budget, errors, plan.tried)
        assert plan.ppl == pytest.approx(1.0 + sum(errors[i] for i in best))
    assert not patchattn.is_patched(model)

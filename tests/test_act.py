"""`act` (attention calibration, arXiv 2406.15765): the fused path against the literal calibrated map (random inputs,
masks, GQA, softcap, decode), identities (beta=1, no heads), the sink rule, the patch spec round trip, decode with
the running statistics, the head search on a case built so that one head helps, the cloze builder, and errors."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from tiny_models import BUILDERS, CACHE_KW, logits, random_ids, tiny_model

import patchattn
from patchattn import logging_utils
from patchattn.cloze import build_cloze, choice_scores
from patchattn.head_search import search_heads
from patchattn.variants import act as act_module
from patchattn.variants.act import ActAttention, act_attention, reference_act, sink_columns

FAMILIES = sorted(BUILDERS)
HEADS = {1: [0, 2], 3: [1]}  # tiny models: 4 layers of 4 query heads (2 KV heads; gemma 1)


def qkv(b=2, h=4, hk=2, n=40, d=16, seed=0, plant=(5, 17)):
    """Random inputs with a few keys scaled up so that they become strong sinks in most heads."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, x, n, d, generator=g) for x in (h, hk, hk))
    k[:, :, list(plant)] *= 4
    return q, k, v


def padded_mask(b, n, pads):
    valid = torch.ones(b, n, dtype=torch.bool)
    for row, p in enumerate(pads):
        valid[row, :p] = False
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return causal[None, None] & valid[:, None, None, :] & valid[:, None, :, None]


def sliding_mask(n, window):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    return ((j <= i) & (j > i - window))[None, None]


def ids(batch=2, n=40, seed=1):
    return random_ids(batch, n, seed)


# -- the fused path is the literal calibration ------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", ["causal", "padding", "sliding"])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("threshold, theta", [("absolute", 0.05), ("relative", 2.0)])
def test_fused_equals_reference(mask_kind, softcap, threshold, theta):
    q, k, v = qkv()
    mask = {"causal": None, "padding": padded_mask(2, 40, [0, 7]), "sliding": sliding_mask(40, 12)}[mask_kind]
    kw = dict(scaling=0.25, beta=0.4, theta=theta, threshold=threshold, softcap=softcap)
    ref, weights = reference_act(q, k, v, mask, heads=[0, 3], **kw)
    out, stats = act_attention(q, k, v, mask, heads=torch.tensor([0, 3]), block_size=7, **kw)
    assert sink_columns(stats.colsum, stats.count, theta, threshold).any(), "the case must contain hidden sinks"
    assert not torch.allclose(ref[:, :, [0, 3]], reference_act(q, k, v, mask, heads=[], **kw)[0][:, :, [0, 3]])
    rows = slice(None) if mask is None else mask[:, 0].any(dim=-1).expand(2, 40)  # not the padded queries
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=0)  # fp32, blockwise vs one-shot sums (2.3e-6 seen)
    torch.testing.assert_close(weights.sum(dim=-1)[:, :, 7:], torch.ones(2, 4, 33))  # still a distribution


def test_fused_is_precise_when_a_sink_holds_almost_everything():
    """Rows with σ > 1 − 1e-4: (o − o_S)/(1 − σ) from the exact output would be off by ~1e-3 in fp32."""
    q, k, v = qkv(plant=(5,))
    k[:, :, 5] *= 3
    kw = dict(scaling=0.25, beta=0.4, theta=0.05)
    _, plain = reference_act(q, k, v, None, heads=[], **kw)
    assert plain[..., 5].max() > 1 - 1e-4
    ref, _ = reference_act(q, k, v, None, heads=[0, 1, 2, 3], **kw)
    out, _ = act_attention(q, k, v, None, heads=torch.arange(4), **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)  # the naive formula is ~1e-3 off; CPUs differ by ~7e-6


def test_decode_and_chunked_prefill_equal_reference_rows():
    """Rows after a prefix (one at a time, or a chunk of 3) == the reference's rows over every query so far."""
    q, k, v = qkv(n=36)
    kw = dict(scaling=0.25, beta=0.4, theta=0.05)
    heads = torch.tensor([1, 2])
    _, stats = act_attention(q[:, :, :24], k[:, :, :24], v[:, :, :24], None, heads=heads, **kw)
    t = 24
    for step in (1, 1, 3, 1, 6):
        out, stats = act_attention(q[:, :, t:t + step], k[:, :, :t + step], v[:, :, :t + step], None, heads=heads,
                                   prior=stats, **kw)
        ref, _ = reference_act(q[:, :, :t + step], k[:, :, :t + step], v[:, :, :t + step], None, heads=[1, 2], **kw)
        torch.testing.assert_close(out, ref[:, t:], atol=2e-6, rtol=0)
        t += step
    assert stats.keys == 36


def test_sink_rule():
    """Mean over the queries that see the key; the first visible key (first non-padding token) is never a sink."""
    colsum = torch.tensor([[[9.0, 4.0, 0.0, 2.0, 0.3]]])  # key 1 (mean 0.8) would be a sink were it not first
    count = torch.tensor([[[0.0, 5.0, 4.0, 3.0, 2.0]]])  # key 0 is padding: key 1 is the first token
    assert sink_columns(colsum, count, 0.5, "absolute").tolist() == [[[False, False, False, True, False]]]
    assert sink_columns(colsum, count, 0.1, "absolute").tolist() == [[[False, False, False, True, True]]]
    # relative: theta / N with N = 4 visible tokens -> 0.6 / 4 = 0.15
    assert sink_columns(colsum, count, 0.6, "relative").tolist() == [[[False, False, False, True, False]]]


# -- identities and real models ---------------------------------------------------------------------------------------
def literal(query, key, value, mask, *, heads, block_size, prior, exact, **kw):
    """Stand-in for ``act_attention`` that materialises the map and calibrates it literally (prefill only)."""
    assert prior is None
    out, _ = reference_act(query, key, value, mask, heads=heads.tolist(), **kw)
    return out.to(query.dtype), None


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_fused_equals_reference_and_identities(family, monkeypatch):
    model = tiny_model(family)
    x, base = ids(), logits(model, ids())
    xp, mp = ids(3, 40, seed=2), torch.ones(3, 40, dtype=torch.long)
    mp[1, :6] = mp[2, :13] = 0
    base_pad = logits(model, xp, mp)

    patchattn.patch_model(model, "act", heads=HEADS, theta=0.05)
    fused, fused_pad = logits(model, x), logits(model, xp, mp)
    assert (fused - base).abs().max() > 1e-3, "calibration must change this model"
    with monkeypatch.context() as m:  # the same model with the literal calibration in its calibrated layers
        m.setattr(act_module, "act_attention", literal)
        reference, reference_pad = logits(model, x), logits(model, xp, mp)
    torch.testing.assert_close(fused, reference, atol=2e-5, rtol=0)
    valid = mp.bool()
    torch.testing.assert_close(fused_pad[valid], reference_pad[valid], atol=2e-5, rtol=0)
    patchattn.unpatch_model(model)

    patchattn.patch_model(model, "act", heads=HEADS, beta=1.0, theta=0.05)
    torch.testing.assert_close(logits(model, x), base, atol=2e-5, rtol=0)
    torch.testing.assert_close(logits(model, xp, mp)[valid], base_pad[valid], atol=2e-5, rtol=0)
    patchattn.unpatch_model(model)

    patchattn.patch_model(model, "act")  # no heads: exact attention everywhere
    torch.testing.assert_close(logits(model, x), base, atol=0, rtol=0)
    patchattn.unpatch_model(model)


def test_output_attentions_is_the_calibrated_map():
    """Layer 1 (heads 0, 2 calibrated) against the exact map of the same layer: other heads equal, sink columns
    times beta, rows still sum to 1; the output stays the fused one."""
    model, x = tiny_model("llama"), ids()
    patchattn.patch_model(model, "exact")
    with torch.no_grad():
        exact = model(input_ids=x, output_attentions=True).attentions[1]
    patchattn.unpatch_model(model)
    patchattn.patch_model(model, "act", heads=HEADS, beta=0.3, theta=0.05)
    with torch.no_grad():
        out = model(input_ids=x, output_attentions=True)
    weights = out.attentions[1]
    torch.testing.assert_close(weights[:, [1, 3]], exact[:, [1, 3]], atol=1e-6, rtol=0)
    visible = torch.ones(40, 40, dtype=torch.bool).tril()
    sinks = sink_columns(exact.sum(dim=-2), visible.sum(dim=0).float().expand(2, 4, 40), 0.05, "absolute")
    assert sinks[:, [0, 2]].any()
    for h in (0, 2):
        s = sinks[:, h, None, :].expand(2, 40, 40)
        torch.testing.assert_close(weights[:, h][s], 0.3 * exact[:, h][s], atol=1e-6, rtol=0)
        assert (weights[:, h][~s & visible] >= exact[:, h][~s & visible] - 1e-7).all()  # the others gain
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 4, 40), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, logits(model, x), atol=1e-5, rtol=0)  # other layers: eager vs SDPA


def test_generate_keeps_running_statistics(caplog, monkeypatch):
    monkeypatch.setattr(logging_utils, "_seen", set())
    model = tiny_model("llama")
    prompt = ids(2, 24, seed=3)
    patchattn.patch_model(model, "act", heads=HEADS, theta=0.05)
    first = logits(model, prompt)[:, -1].argmax(dim=-1)
    with caplog.at_level(logging.WARNING, logger="patchattn"):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    assert not caplog.records, "decode must use the running statistics, not fall back to exact"
    assert torch.equal(out.sequences[:, 24], first)
    layer = model.model.layers[1].self_attn.patchattn_layer
    assert layer._stats[out.past_key_values].keys == 29  # prompt + 5 decode steps (the last token is not fed)


def test_decode_without_statistics_falls_back_to_exact(caplog, monkeypatch):
    """A cache filled before patching has no sink statistics: decode runs exact attention, and says so."""
    from transformers import DynamicCache

    monkeypatch.setattr(logging_utils, "_seen", set())
    model = tiny_model("llama")
    prompt, nxt = ids(1, 24, seed=4), ids(1, 1, seed=5)
    cache, fresh = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt, **{CACHE_KW: cache})
        model(input_ids=prompt, **{CACHE_KW: fresh})
        exact = model(input_ids=nxt, **{CACHE_KW: fresh}).logits
        patchattn.patch_model(model, "act", heads=HEADS, theta=0.05)
        with caplog.at_level(logging.WARNING, logger="patchattn"):
            step = model(input_ids=nxt, **{CACHE_KW: cache}).logits
    torch.testing.assert_close(step, exact, atol=1e-6, rtol=0)
    assert any("no sink statistics match this cache" in r.getMessage() for r in caplog.records)


def test_spec_round_trip(tmp_path):
    model = tiny_model("qwen2")
    patchattn.patch_model(model, "act", heads={3: [1], 1: [2, 0, 2]}, beta=0.3, theta=0.05)
    assert model.config.patchattn[0]["params"]["heads"] == HEADS  # sorted, de-duplicated
    model.save_pretrained(tmp_path)
    loaded = patchattn.from_pretrained(str(tmp_path))
    assert loaded.config.patchattn[0]["params"] == model.config.patchattn[0]["params"]
    torch.testing.assert_close(logits(loaded, ids()), logits(model, ids()), atol=0, rtol=0)


@pytest.mark.parametrize("heads, message", [
    ({1: [4]}, "head 4 of layer 1 out of range: this model has 4 layers (0..3) of 4 heads (0..3)"),
    ({7: [0]}, "layer 7 out of range"),
    ({1: [-1]}, "heads[1] contains -1, not a non-negative head index"),
    ({"x": [0]}, "layer 'x' in 'heads' is not a non-negative layer index"),
    ([0, 1], "must be a dict"),
    ({1: 2}, "heads[1] must be a list of head indices"),
])
def test_bad_heads_raise_and_leave_the_model_alone(heads, message):
    model = tiny_model("llama")
    before = logits(model, ids())
    with pytest.raises(ValueError, match=re.escape(message)):
        patchattn.patch_model(model, "act", heads=heads)
    assert not patchattn.is_patched(model)
    assert not [n for n, _ in model.named_modules() if n.endswith("patchattn_layer")]
    torch.testing.assert_close(logits(model, ids()), before, atol=0, rtol=0)
    patchattn.patch_model(model, "act", heads=HEADS)  # still patchable


def test_bad_parameters():
    with pytest.raises(ValueError, match="beta"):
        ActAttention.make_params(beta=1.5)
    with pytest.raises(ValueError, match="threshold"):
        ActAttention.make_params(threshold="per-key")


# -- head search ------------------------------------------------------------------------------------------------------
def test_search_picks_the_head_that_helps():
    """The score rewards logits close to those of the model with head 1 of layer 2 calibrated: the search must find
    exactly that head (its single-head score, from the replayed prefix, is the optimum 0)."""
    model = tiny_model("llama")
    x = ids(4, 32, seed=6)
    act = dict(beta=0.2, theta=0.05)
    patchattn.patch_model(model, "act", heads={2: [1]}, **act)
    target = logits(model, x)[:, -1]
    patchattn.unpatch_model(model)

    def score(last_logits):
        return -(last_logits - target).pow(2).mean().item()

    found = search_heads(model, x, score, progress=False, **act)
    assert found.heads == {2: [1]}
    assert found.score == pytest.approx(0.0, abs=1e-10) and found.baseline < -1e-4
    assert found.gains["2.1"] == pytest.approx(-found.baseline, rel=1e-5)
    assert max(found.gains.values()) == found.gains["2.1"]
    assert not patchattn.is_patched(model)
    union = search_heads(model, x, score, progress=False, combine="union", **act)
    assert [2, 1] in [[layer, h] for layer, hs in union.heads.items() for h in hs]
    trials = {}
    top = search_heads(model, x, score, progress=False, max_heads=3, on_trial=trials.__setitem__, **act)
    assert set(top.gains) == set(trials) == set(sorted(found.changes, key=found.changes.get)[-3:])
    again = search_heads(model, x, score, progress=False, max_heads=3, known=trials,  # resumed: no trial re-run
                         on_trial=lambda *a: pytest.fail("known trials must not run again"), **act)
    assert again.gains == top.gains and again.heads == top.heads


# -- the cloze set ----------------------------------------------------------------------------------------------------
class WordTokenizer:
    """One token per word (with its leading space) or punctuation mark; enough to exercise the builder."""

    bos_token_id = 1

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(t, len(self.vocab) + 2) for t in re.findall(r" ?[A-Za-z']+|\S|\s", text)]


def test_cloze_splits_are_disjoint_and_items_are_well_formed():
    from patchattn.data import read_text

    text, tok = read_text(), WordTokenizer()
    cal = build_cloze(tok, text, end=0.2, items=30, context_tokens=32)
    test = build_cloze(tok, text, start=0.2, items=30, context_tokens=32, seed=1)
    assert len(cal) == len(test) == 30 and cal.input_ids.shape == (30, 33)
    window = 12 * 32
    assert max(cal.offsets) < 0.2 * len(text) and min(test.offsets) - window >= int(0.2 * len(text))
    for c in (cal, test):
        for i in range(len(c)):
            words = c.words[i]
            assert len(set(words)) == 4 and text[c.offsets[i]:].startswith(words[c.answer[i]])
            assert c.candidates[i].tolist() == [tok.encode(" " + w)[0] for w in words]
            assert c.input_ids[i, -1].item() == tok.encode(text[c.offsets[i] - 20: c.offsets[i] - 1])[-1]
    again = build_cloze(tok, text, end=0.2, items=30, context_tokens=32)
    assert again.words == cal.words and torch.equal(again.input_ids, cal.input_ids)
    # the scorer: log-softmax over the candidates of the next-token logits
    logits = torch.zeros(2, 50)
    logits[0, 7], logits[1, 9] = 3.0, 1.0
    scores = choice_scores(logits, torch.tensor([[7, 8], [8, 9]]))
    assert scores.argmax(dim=-1).tolist() == [0, 1] and torch.allclose(scores.exp().sum(-1), torch.ones(2))

import math

import pytest
import torch
from tiny_models import word_tokenizer
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from patchattn.data import default_text_path, read_text
from patchattn.evaluation import _windows, perplexity

TEXT = read_text()[:6000]


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level tokenizer trained on the shipped text: offline, instant, has a BOS token."""
    return word_tokenizer(512)


@pytest.fixture(scope="module")
def llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def token_ids(tokenizer, text=TEXT):
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]


def manual_nll(model, ids, context_length, stride):
    """Sum of NLL over HF's documented sliding-window loop, via model(labels=...)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context_length, len(ids))
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, : -(end - prev_end)] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n:
            with torch.no_grad():
                total += model(x, labels=labels).loss.item() * n
            count += n
        prev_end = end
        if end == len(ids):
            break
    return total, count


def test_one_window_matches_model_loss(llama, tokenizer):
    ids = token_ids(tokenizer, TEXT[:1500])
    assert len(ids) < 400
    r = perplexity(llama, tokenizer, TEXT[:1500], context_length=400, progress=False)
    with torch.no_grad():
        loss = llama(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert r.windows == 1 and r.tokens_scored == len(ids) - 1
    assert r.ppl == pytest.approx(math.exp(loss), rel=1e-5)
    assert r.ppl_exp2 == pytest.approx(2**loss, rel=1e-5)
    assert r.nll_mean == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("context_length,stride", [(128, None), (128, 64), (100, 33), (128, 128)])
def test_sliding_window_matches_hf_recipe(llama, tokenizer, context_length, stride):
    text = TEXT[:3000]
    ids = token_ids(tokenizer, text)
    r = perplexity(llama, tokenizer, text, context_length=context_length, stride=stride, progress=False)
    total, count = manual_nll(llama, ids, context_length, stride or context_length)
    assert r.tokens_scored == count
    assert r.nll_mean == pytest.approx(total / count, rel=1e-5)
    assert r.context_length == context_length


@pytest.mark.parametrize("n,context_length,stride", [(1000, 128, 128), (1000, 128, 50), (129, 128, 1), (257, 128, 128), (50, 128, 16)])
def test_windows_score_each_token_once(n, context_length, stride):
    scored = []
    for begin, end, k in _windows(n, context_length, stride):
        assert 0 < k < end - begin <= context_length
        scored += range(end - k, end)
    assert len(scored) == len(set(scored))
    if stride < context_length:
        assert sorted(scored) == list(range(1, n))  # every token but the very first
    else:
        assert set(scored) == set(range(n)) - set(range(0, n, context_length))  # all but window starts


def test_tokens_scored_and_max_tokens(llama, tokenizer):
    r = perplexity(llama, tokenizer, TEXT, context_length=100, max_tokens=350, progress=False)
    # windows [0,100) [100,200) [200,300) [300,350): 99 + 99 + 99 + 49
    assert (r.windows, r.tokens_scored) == (4, 346)
    r = perplexity(llama, tokenizer, TEXT, context_length=100, stride=25, max_tokens=350, progress=False)
    assert r.tokens_scored == 349
    assert r.tokens_per_second > 0 and r.seconds > 0


def test_batching_and_logit_chunks_do_not_change_result(llama, tokenizer):
    kw = dict(context_length=64, stride=48, max_tokens=500, progress=False)
    base = perplexity(llama, tokenizer, TEXT, **kw)
    other = perplexity(llama, tokenizer, TEXT, batch_size=3, logits_chunk=7, **kw)
    assert (other.tokens_scored, other.windows) == (base.tokens_scored, base.windows)
    assert other.nll_mean == pytest.approx(base.nll_mean, rel=1e-5)


def test_restores_training_mode(llama, tokenizer):
    llama.train()
    perplexity(llama, tokenizer, TEXT, context_length=64, max_tokens=100, progress=False)
    assert llama.training
    llama.eval()


def test_final_logit_softcapping(tokenizer):
    """Gemma-style softcapping is replicated in the chunked lm_head path."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=32,
        final_logit_softcapping=2.0, max_position_embeddings=512,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # large logits so the cap actually bites
    ids = token_ids(tokenizer)[:200]
    r = perplexity(model, tokenizer, TEXT, context_length=200, max_tokens=200, progress=False)
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert r.nll_mean == pytest.approx(loss, rel=1e-5)


def test_unknown_logit_postprocessing_is_refused(llama, tokenizer):
    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = Scaled(llama.config).eval()
    with pytest.raises(RuntimeError, match="post-processes its logits"):
        perplexity(model, tokenizer, TEXT, context_length=64, max_tokens=100, progress=False)


def test_rejects_bad_stride(llama, tokenizer):
    with pytest.raises(ValueError, match="stride"):
        perplexity(llama, tokenizer, TEXT, context_length=64, stride=65, progress=False)


def test_shipped_texts():
    assert default_text_path().is_file()
    text = read_text()
    assert 1_000_000 < len(text) < 1_500_000 and "HAMLET" in text and "Gutenberg" not in text
    assert read_text("kjv_sample.txt").startswith("Genesis 1\n\nIn the beginning God created")
    assert read_text(default_text_path()) == text


def test_bos_per_window_starts_every_window_with_bos(llama, tokenizer):
    """Each window is BOS + ``context_length - 1`` text tokens; NLL equals model(labels=...) on those windows."""
    text_ids = tokenizer(TEXT[:3000], add_special_tokens=False).input_ids
    seen = []
    hook = llama.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    try:
        r = perplexity(llama, tokenizer, TEXT[:3000], context_length=100, bos_per_window=True, progress=False)
    finally:
        hook.remove()
    assert all((x[:, 0] == tokenizer.bos_token_id).all() and x.shape[1] <= 100 for x in seen)
    assert len(seen) == math.ceil(len(text_ids) / 99)
    total, count = 0.0, 0
    for begin in range(0, len(text_ids), 99):
        x = torch.tensor([[tokenizer.bos_token_id, *text_ids[begin : begin + 99]]])
        labels = x.clone()
        labels[:, :2] = -100  # BOS and the window's first text token are not scored (HF's recipe)
        n = int((labels[:, 1:] != -100).sum())
        if n:
            with torch.no_grad():
                total += llama(x, labels=labels).loss.item() * n
            count += n
    assert r.tokens_scored == count
    assert r.nll_mean == pytest.approx(total / count, rel=1e-4)
    with pytest.raises(ValueError, match="BOS"):
        no_bos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>")
        perplexity(llama, no_bos, TEXT[:3000], context_length=100, bos_per_window=True, progress=False)

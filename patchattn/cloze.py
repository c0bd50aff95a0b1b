"""A multiple-choice cloze set built from the shipped real text, for training-free variants that claim an accuracy
gain (ACT) rather than a perplexity one.

An item is a passage cut right before a word, and four candidate words: the true one and three distractors drawn
from the same part of the text with a similar frequency (so word frequency alone does not give the answer away).
The model reads the passage once; each candidate is scored by its log-probability as the next token, and the item
is right when the true word scores highest. Targets are lower-case words of three letters or more that are not
function words, preceded by a space, and a single token (with its leading space) for the tokenizer at hand, so
one forward per item scores all four candidates; the exact items therefore depend on the tokenizer.

Splits are fractions of the text by character: a calibration split and a held-out split never share a passage,
because every passage lies wholly inside its split.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

import torch

from .data import read_text

#: function words (modern and early-modern English) never used as targets or distractors
STOPWORDS = frozenset("""
a an the and or but nor for so yet of to in on at by with from into upon as than then that this these those there
here what which who whom whose when where why how not no all any some such each every both either neither own same
other is are was were be been being am have has had do does did shall should will would may might must can could
i me my mine we us our you your he him his she her it its they them their thou thee thy thine ye hath doth art
thus hast dost wilt shalt unto o oh let more most very too also if
""".split())
_WORD = re.compile(r"[A-Za-z']+")


@dataclass
class ClozeSet:
    input_ids: torch.Tensor  # [n, context] passages (BOS first if the tokenizer has one), all the same length
    candidates: torch.Tensor  # [n, choices] token id of each candidate word (with its leading space)
    answer: torch.Tensor  # [n] index of the true word among the candidates
    words: list[list[str]]  # the candidate words, for reading the items
    offsets: list[int]  # character offset of each true word in the text
    source: str  # text and split it came from

    def __len__(self) -> int:
        return len(self.answer)


def _eligible(word: str, tokenizer, cache: dict) -> bool:
    if word not in cache:
        cache[word] = (word.isalpha() and word.islower() and len(word) >= 3 and word not in STOPWORDS
                       and len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1)
    return cache[word]


def build_cloze(tokenizer, text: str | None = None, *, start: float = 0.0, end: float = 1.0, items: int = 200,
                context_tokens: int = 64, choices: int = 4, band: int = 40, seed: int = 0,
                name: str = "shakespeare") -> ClozeSet:
    """``items`` cloze items whose passages lie in characters ``[start, end)`` (fractions) of ``text`` (default: the
    shipped Shakespeare). Each passage is the ``context_tokens`` tokens before the target word. Distractors come
    from the ``band`` words nearest in frequency rank to the target among this split's eligible words."""
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"need 0 <= start < end <= 1, got {start=} {end=}")
    if choices < 2:
        raise ValueError(f"choices must be at least 2, got {choices}")
    text = read_text() if text is None else text
    lo, hi = int(start * len(text)), int(end * len(text))
    window = 12 * context_tokens  # characters read before a target: more than context_tokens tokens of prose
    cache: dict[str, bool] = {}
    targets = [(m.start(), m.group()) for m in _WORD.finditer(text, lo + window, hi)
               if text[m.start() - 1] == " " and _eligible(m.group(), tokenizer, cache)]
    counts = Counter(word for _, word in targets)
    vocab = [w for w, c in counts.most_common() if c >= 2]  # seen twice in the split: not a one-off spelling
    if len(vocab) < 2 * band:
        raise ValueError(f"only {len(vocab)} candidate words in this split; use a longer text or a wider split")
    rank = {w: i for i, w in enumerate(vocab)}
    targets = [t for t in targets if t[1] in rank]
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(targets)), min(items, len(targets))))

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids, cands, answers, words, offsets = [], [], [], [], []
    for i in picked:
        offset, word = targets[i]
        passage = tokenizer.encode(text[offset - window: offset - 1], add_special_tokens=False)
        if len(passage) < context_tokens:
            continue
        r = rank[word]
        first = min(max(r - band // 2, 0), len(vocab) - band - 1)
        pool = [w for w in vocab[first: first + band + 1] if w != word]
        options = rng.sample(pool, choices - 1) + [word]
        rng.shuffle(options)
        ids.append(bos + passage[-context_tokens:])
        cands.append([tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in options])
        answers.append(options.index(word))
        words.append(options)
        offsets.append(offset)
    return ClozeSet(torch.tensor(ids), torch.tensor(cands), torch.tensor(answers), words, offsets,
                    f"{name}[{start:g}:{end:g}]")


@torch.inference_mode()
def choice_logprobs(model, cloze: ClozeSet, batch_size: int = 64) -> torch.Tensor:
    """``[n, choices]`` log-probabilities of the candidates, renormalised over the candidates."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(cloze), batch_size):
        logits = model(input_ids=cloze.input_ids[s: s + batch_size].to(device), logits_to_keep=1,
                       use_cache=False).logits[:, -1].float()
        out.append(choice_scores(logits, cloze.candidates[s: s + batch_size].to(device)).cpu())
    return torch.cat(out)


def choice_scores(last_logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Candidates' next-token logits → log-softmax over the candidates ``[n, choices]``."""
    return torch.log_softmax(last_logits.gather(-1, candidates), dim=-1)


def accuracy(logprobs: torch.Tensor, cloze: ClozeSet) -> float:
    return (logprobs.argmax(dim=-1) == cloze.answer).float().mean().item()


def mean_logprob(logprobs: torch.Tensor, cloze: ClozeSet) -> float:
    """Mean log-probability of the true word among the candidates: a smoother yardstick than accuracy."""
    return logprobs.gather(-1, cloze.answer[:, None]).mean().item()

"""Passkey retrieval: can the model fetch a random 5-digit number hidden at a given depth of a long prompt?

The classic long-context probe (Mohtashami & Jaggi, "Landmark Attention", 2023), with real filler text instead of
a repeated sentence: a prompt of exactly ``length`` tokens holds an instruction, a slice of the shipped text (by
default Shakespeare) with the needle ``The pass key is 12345. Remember it. 12345 is the pass key.`` inserted at
``depth`` (0 = right after the instruction, 1 = right before the question), and ends with ``What is the pass key?
The pass key is``. Greedy decoding; a trial is correct when the first number in the completion is the key.

Prompts are assembled from token ids (instruction, filler, needle, question tokenized separately), so every prompt
of a given length has exactly that many tokens: trials of one length batch without padding, and a linear-attention
student and its softmax teacher see identical inputs.
"""
from __future__ import annotations

import dataclasses
import random
import re
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .data import read_text

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
_NUMBER = re.compile(r"\d(?:\s*\d)*")


@dataclasses.dataclass
class Prompt:
    input_ids: torch.Tensor  # [length]
    key: str
    depth: float
    needle_start: int  # token index where the needle begins
    filler_tokens: int


@dataclasses.dataclass
class Trial:
    length: int
    depth: float
    key: str
    answer: str | None  # the first number in the completion
    completion: str
    correct: bool


@dataclasses.dataclass
class PasskeyResult:
    trials: list[Trial]

    def accuracy(self) -> dict[int, dict[float, float]]:
        """``{length: {depth: exact-match accuracy}}``."""
        hits: dict[tuple[int, float], list[bool]] = defaultdict(list)
        for t in self.trials:
            hits[(t.length, t.depth)].append(t.correct)
        out: dict[int, dict[float, float]] = defaultdict(dict)
        for (length, depth), h in sorted(hits.items()):
            out[length][depth] = sum(h) / len(h)
        return dict(out)

    def accuracy_by_length(self) -> dict[int, float]:
        """``{length: accuracy over all depths}``."""
        by: dict[int, list[bool]] = defaultdict(list)
        for t in self.trials:
            by[t.length].append(t.correct)
        return {length: sum(h) / len(h) for length, h in sorted(by.items())}

    def to_dict(self) -> dict:
        return {"accuracy": {str(k): {str(d): a for d, a in v.items()} for k, v in self.accuracy().items()},
                "accuracy_by_length": {str(k): v for k, v in self.accuracy_by_length().items()},
                "trials": [dataclasses.asdict(t) for t in self.trials]}


def extract_answer(completion: str) -> str | None:
    """The first number in ``completion`` (digits separated by whitespace, as word-level decoders write them, are
    joined), or None."""
    match = _NUMBER.search(completion)
    return re.sub(r"\s", "", match.group()) if match else None


def _leading_special(tokenizer) -> list[int]:
    """The BOS token if this tokenizer puts one in front of plain text (Llama, Gemma), else nothing (SmolLM2)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return [bos] if bos is not None and ids and ids[0] == bos else []


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def build_prompt(tokenizer, filler_ids: list[int], length: int, depth: float, key: str, offset: int = 0) -> Prompt:
    """A prompt of exactly ``length`` tokens: [BOS] instruction, filler (from ``filler_ids`` at ``offset``, wrapping
    around) with the needle after ``round(depth * filler tokens)`` of it, question."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head = _leading_special(tokenizer) + _ids(tokenizer, INSTRUCTION)
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    tail = _ids(tokenizer, QUESTION)
    n_filler = length - len(head) - len(needle) - len(tail)
    if n_filler < 0:
        raise ValueError(f"length {length} is too short: the instruction, needle and question alone take "
                         f"{length - n_filler} tokens")
    if not filler_ids:
        raise ValueError("no filler tokens")
    filler = [filler_ids[(offset + i) % len(filler_ids)] for i in range(n_filler)]
    before = round(depth * n_filler)
    ids = head + filler[:before] + needle + filler[before:] + tail
    return Prompt(torch.tensor(ids, dtype=torch.long), key, depth, len(head) + before, n_filler)


def make_prompts(tokenizer, length: int, depths: list[float], trials: int, *, seed: int = 0, text: str | None = None,
                 filler_ids: list[int] | None = None) -> list[Prompt]:
    """``trials`` prompts per depth: a fresh random key and a random slice of the filler text each (reproducible
    from ``seed``; the same keys and slices for every model)."""
    if filler_ids is None:
        filler_ids = _ids(tokenizer, read_text() if text is None else text)
    rng = random.Random(f"{seed}:{length}")
    prompts = []
    for depth in depths:
        for _ in range(trials):
            key = str(rng.randint(10000, 99999))
            prompts.append(build_prompt(tokenizer, filler_ids, length, depth, key,
                                        offset=rng.randrange(len(filler_ids))))
    return prompts


@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths: list[int], depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                     trials: int = 5, *, seed: int = 0, text: str | None = None, batch_size: int = 8,
                     max_new_tokens: int = 8, progress: bool = True) -> PasskeyResult:
    """Exact-match passkey accuracy of ``model`` per (length, depth), greedy decoding with ``model.generate``."""
    filler_ids = _ids(tokenizer, read_text() if text is None else text)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    jobs = [(length, p) for length in lengths
            for p in make_prompts(tokenizer, length, list(depths), trials, seed=seed, filler_ids=filler_ids)]
    was_training = model.training
    model.eval()
    results: list[Trial] = []
    try:
        with tqdm(total=len(jobs), desc="passkey", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start:start + batch_size]
                by_length: dict[int, list[Prompt]] = defaultdict(list)
                for length, p in batch:
                    by_length[length].append(p)
                for length, prompts in by_length.items():  # equal lengths: no padding
                    ids = torch.stack([p.input_ids for p in prompts]).to(device)
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=max_new_tokens, pad_token_id=pad)
                    for p, row in zip(prompts, out[:, ids.shape[1]:]):
                        completion = tokenizer.decode(row, skip_special_tokens=True)
                        answer = extract_answer(completion)
                        results.append(Trial(length, p.depth, p.key, answer, completion, answer == p.key))
                bar.update(len(batch))
                bar.set_postfix(acc=f"{sum(t.correct for t in results) / len(results):.2f}")
    finally:
        model.train(was_training)
    return PasskeyResult(results)

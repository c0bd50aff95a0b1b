"""RULER-style long-context tasks: does the model still find what it was given, at the length it was given it?

Perplexity averages over every token, so an attention variant that loses one far-away fact barely moves it; these
tasks score exactly that failure. Every prompt is generated offline from a haystack text (the shipped Shakespeare
plays by default, or any text file) and built to a budget in tokens of the model's own tokenizer:

* ``niah_single`` (+ ``_word``, ``_uuid``): one needle ``Remember: a secret number of the amber heron is 4821379.``
  at a controlled depth; the value is a 7-digit number, a word, or a UUID-like hex string.
* ``niah_multikey``: the same, with three distractor needles that give values to other keys.
* ``niah_multivalue``: one key with four values; all four must be returned.
* ``niah_multiquery``: four keys, all asked at once; all four values must be returned.
* ``vt`` (variable tracking): a chain ``VAR QXKZP = 48213.``, ``VAR HBTLE = VAR QXKZP.``, ... (four hops) and a
  distractor chain with another value; every variable of the asked chain must be named.
* ``cwe`` (common-words extraction): a numbered list of words drawn from the haystack's vocabulary, where five
  words recur in every round of fifteen items and the rest appear about once per pass over the vocabulary; the five
  frequent words must be named.

Layout: [chat template head] instruction, haystack with the inserted statements, question [template tail] answer
prefix. The template (``tokenizer.apply_chat_template``) is used when the tokenizer has one, a plain prompt
otherwise; the answer prefix (``The secret number of the amber heron is``) sits in the assistant turn so small
models answer in the expected form. ``context`` is the budget of prompt plus answer: a prompt has exactly
``context - max_new_tokens`` tokens (``cwe`` stops at the last whole list item that fits, a few tokens short), so a
model whose window is ``context`` can write its whole answer.

Reproducibility: each sample draws from its own generator seeded with ``(seed, task, context, index)``, so the
same four give the same prompt whatever else runs (exact and patched models see identical prompts, and adding
samples or lengths never changes the others). The first needle of the asked key sits at depth
``DEPTHS[index % 5]`` (0.1, 0.3, 0.5, 0.7, 0.9 of the haystack), so five consecutive samples cover the spread;
further needles and the ``vt`` statements are placed at random depths in [0.05, 0.95] (chains in order).

Scoring (:func:`score`): a sample is correct when *every* expected answer occurs in the greedy completion as a
whole word, case-insensitively. All-or-nothing keeps each sample a Bernoulli trial, so the Wilson interval next to
the accuracy is a real 95% interval (RULER's averaged partial recall would not be).
"""
from __future__ import annotations

import contextlib
import math
import random
import re
import string
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import read_text

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
_Z95 = 1.959963984540054  # two-sided 95% normal quantile

_ADJECTIVES = ("amber", "brisk", "calm", "dusky", "eager", "faded", "gentle", "hollow", "icy", "jolly", "keen",
               "lunar", "misty", "noble", "olive", "pale", "quiet", "rusty", "silver", "tawny", "upper", "vivid",
               "wooden", "young", "zesty", "bold", "crimson", "distant", "frosty", "golden")
_KEY_NOUNS = ("heron", "anchor", "beacon", "canyon", "dragon", "ember", "falcon", "glacier", "harbor", "island",
              "jackal", "kettle", "lantern", "meadow", "nebula", "orchard", "pebble", "quarry", "raven", "saddle",
              "thicket", "urchin", "valley", "walrus", "yonder", "zephyr", "badger", "comet", "dune", "ferry")
_VALUE_WORDS = ("apricot", "blizzard", "cobalt", "dolphin", "eclipse", "fiddle", "gazebo", "hammock", "igloo",
                "jasmine", "kayak", "lemonade", "mosaic", "nutmeg", "oregano", "paprika", "quilt", "rhubarb",
                "saffron", "trombone", "umbrella", "velvet", "waffle", "xylophone", "yogurt", "zucchini", "biscuit",
                "cactus", "domino", "espresso", "flamingo", "galaxy", "harmonica", "iguana", "jigsaw", "koala",
                "lobster", "marble", "noodle", "octopus", "pretzel", "raccoon", "sapphire", "tulip", "volcano")


@dataclass(frozen=True)
class Insert:
    """A statement placed in the haystack: where it is, so tests (and curious users) can check the depth."""
    text: str
    start: int  # token index in ``Sample.input_ids`` where it begins
    depth: float  # fraction of the haystack tokens that come before it


@dataclass(frozen=True)
class Sample:
    task: str
    context: int
    index: int
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]  # every one must appear in the completion
    max_new_tokens: int
    inserts: tuple[Insert, ...]  # in the task's order: the controlled (asked) needle first; empty for cwe


@dataclass(frozen=True)
class _Text:
    """What a task asks, before it meets a tokenizer."""
    instruction: str
    statements: list[tuple[str, float]]  # (text, depth) to insert into the haystack
    question: str
    answer_prefix: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str
    max_new_tokens: int
    make: Callable[[random.Random, int], _Text] | None  # (rng, index) -> text; None: cwe, which fills by tokens


_NIAH_INSTRUCTION = ("Some secret facts are hidden in the long text below. Read it carefully and remember them: "
                     "you will be asked about them at the end.\n\n")


def _distinct(draw: Callable[[], str], taken: set[str]) -> str:
    """``draw()`` until it gives something not in ``taken`` (keys, values and names must not repeat in a sample, or
    the expected answer would be ambiguous)."""
    while (value := draw()) in taken:
        pass
    taken.add(value)
    return value


_VALUES: dict[str, Callable[[random.Random], str]] = {
    "number": lambda rng: str(rng.randint(1_000_000, 9_999_999)),
    "word": lambda rng: rng.choice(_VALUE_WORDS),
    "uuid": lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
}


def _needle(kind: str, key: str, value: str) -> str:
    return f"\nRemember: a secret {kind} of the {key} is {value}.\n"


def _niah(kind: str = "number", keys: int = 1, values: int = 1, queries: int = 1):
    """A needle-in-a-haystack task: ``keys`` keys with ``values`` values each; the first ``queries`` keys are asked.

    The first needle of the first asked key goes at the sample's controlled depth, every other needle at a random
    depth."""
    def make(rng: random.Random, index: int) -> _Text:
        taken_keys: set[str] = set()
        taken_values: set[str] = set()
        names = [_distinct(lambda: f"{rng.choice(_ADJECTIVES)} {rng.choice(_KEY_NOUNS)}", taken_keys)
                 for _ in range(keys)]
        table = {k: [_distinct(lambda: _VALUES[kind](rng), taken_values) for _ in range(values)] for k in names}
        statements = [(_needle(kind, k, v), rng.uniform(0.05, 0.95)) for k in names for v in table[k]]
        statements[0] = (statements[0][0], DEPTHS[index % len(DEPTHS)])
        asked = names[:queries]
        answers = tuple(v for k in asked for v in table[k])
        subject = ", the ".join(asked[:-1]) + " and the " + asked[-1] if queries > 1 else asked[0]
        if len(answers) == 1:
            question = f"What is the secret {kind} of the {subject}?"
            prefix = f"The secret {kind} of the {subject} is"
        elif queries > 1:
            question = f"What are the secret {kind}s of the {subject}? Give one for each."
            prefix = f"The secret {kind}s of the {subject} are"
        else:
            question = f"What are all {values} secret {kind}s of the {subject}?"
            prefix = f"The {values} secret {kind}s of the {subject} are"
        return _Text(_NIAH_INSTRUCTION, statements, question, prefix, answers)

    return make


def _vt(hops: int = 4, chains: int = 2):
    """Variable tracking: ``chains`` assignment chains of ``hops`` hops, each from its own 5-digit value; the
    first chain is asked (the others are distractors). Statements of a chain keep their order in the text."""
    def make(rng: random.Random, index: int) -> _Text:
        names: set[str] = set()
        values: set[str] = set()
        statements, asked = [], []
        for _ in range(chains):
            chain = [_distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), names)
                     for _ in range(hops + 1)]
            value = _distinct(lambda: str(rng.randint(10_000, 99_999)), values)
            depths = sorted(rng.uniform(0.05, 0.95) for _ in chain)
            texts = [f"\nVAR {chain[0]} = {value}.\n"] + [f"\nVAR {b} = VAR {a}.\n" for a, b in zip(chain, chain[1:])]
            statements += list(zip(texts, depths))
            asked = asked or [value, *chain]
        value, *answers = asked
        return _Text("The long text below hides variable assignments of the form VAR NAME = .... Keep track of "
                     "them: you will be asked about them at the end.\n\n", statements,
                     f"Which variables hold the value {value}, directly or through other variables? Name all of "
                     "them.", f"The variables that hold the value {value} are:", tuple(answers))

    return make


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("niah_single", 16, _niah("number")),
    Task("niah_single_word", 12, _niah("word")),
    Task("niah_single_uuid", 48, _niah("uuid")),
    Task("niah_multikey", 16, _niah("number", keys=4)),
    Task("niah_multivalue", 48, _niah("number", values=4)),
    Task("niah_multiquery", 48, _niah("number", keys=4, queries=4)),
    Task("vt", 48, _vt()),
    Task("cwe", 32, None),
)}

_CWE_TOP, _CWE_RARE_PER_ROUND = 5, 10


def check_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


class PromptBuilder:
    """Builds :class:`Sample` prompts for one tokenizer and haystack (tokenised once, reused for every sample)."""

    _MARK = "\x00PATCHATTN-CONTENT\x00"

    def __init__(self, tokenizer, haystack: str | Path | None = None):
        self.tokenizer = tokenizer
        text = read_text(haystack)
        self.haystack_ids = self._ids(text)
        if not self.haystack_ids:
            raise ValueError("the haystack text is empty")
        # cwe's vocabulary: lowercase words only, so names and stage directions do not crowd it
        self.words = sorted(set(re.findall(r"(?<![\w'])[a-z]{4,10}(?![\w'])", text)))
        self.head, self.tail = self._frame()

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    def _frame(self) -> tuple[list[int], list[int]]:
        """Token ids before the user's message and between it and the answer prefix: the chat template's when the
        tokenizer has one (rendered around a marker), else BOS (if the tokenizer adds one) and a blank line."""
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": self._MARK}], tokenize=False,
                                                          add_generation_prompt=True)
            head, found, tail = rendered.partition(self._MARK)
            if found:
                return self._ids(head), self._ids(tail)
        bos = self.tokenizer.bos_token_id
        leading = self.tokenizer("a", add_special_tokens=True).input_ids
        return ([bos] if bos is not None and leading and leading[0] == bos else []), self._ids("\n\n")

    def sample(self, task: str, context: int, index: int, seed: int = 0) -> Sample:
        spec = check_task(task)
        rng = random.Random(f"{seed}:{task}:{context}:{index}")
        budget = context - spec.max_new_tokens
        if spec.make is None:
            ids, answers, inserts = self._cwe(rng, budget)
        else:
            ids, answers, inserts = self._haystack_prompt(spec.make(rng, index), rng, budget)
        return Sample(task, context, index, tuple(ids), answers, spec.max_new_tokens, tuple(inserts))

    def _too_short(self, budget: int, needed: int) -> ValueError:
        return ValueError(f"context too short: the prompt may have {budget} tokens, but the instruction, question and "
                          f"inserted statements alone take {needed}")

    def _haystack_prompt(self, text: _Text, rng: random.Random, budget: int):
        head = self.head + self._ids(text.instruction)
        tail = self._ids("\n\n" + text.question) + self.tail + self._ids(text.answer_prefix)
        statements = [(self._ids(s), s, depth) for s, depth in text.statements]
        fixed = len(head) + len(tail) + sum(len(ids) for ids, _, _ in statements)
        n_filler = budget - fixed
        if n_filler < 1:
            raise self._too_short(budget, fixed)
        offset = rng.randrange(len(self.haystack_ids))
        filler = [self.haystack_ids[(offset + i) % len(self.haystack_ids)] for i in range(n_filler)]
        cuts = [round(depth * n_filler) for _, _, depth in statements]
        ids, inserts, done = list(head), {}, 0
        for k in sorted(range(len(statements)), key=lambda k: cuts[k]):  # stable: a chain's ties keep their order
            needle, s, _ = statements[k]
            ids += filler[done:cuts[k]]
            done = cuts[k]
            inserts[k] = Insert(s, len(ids), cuts[k] / n_filler)
            ids += needle
        ids += filler[done:] + tail
        return ids, text.answers, [inserts[k] for k in range(len(statements))]

    def _cwe(self, rng: random.Random, budget: int):
        """Rounds of the five frequent words plus ten others, shuffled within each round, numbered, until the
        budget is full; the others cycle through the haystack's vocabulary, so a frequent word appears once per
        round and any other about once per pass over the vocabulary."""
        if len(self.words) < 2 * (_CWE_TOP + _CWE_RARE_PER_ROUND):
            raise ValueError(f"the haystack has only {len(self.words)} distinct lowercase words; cwe needs a text "
                             "with a larger vocabulary")
        words = rng.sample(self.words, len(self.words))
        common, rare = words[:_CWE_TOP], words[_CWE_TOP:]
        head = self.head + self._ids("Below is a numbered list of words. A few of them occur far more often than "
                                     "the others.\n\n")
        question = (f"Which {_CWE_TOP} words occur most often in the list above? Answer with the {_CWE_TOP} words "
                    "only.")
        tail = self._ids("\n" + question) + self.tail + self._ids(
            f"The {_CWE_TOP} most frequent words in the list are:")
        room = budget - len(head) - len(tail)
        items: list[int] = []
        counts: dict[str, int] = {}
        for n, word in enumerate(self._cwe_stream(rng, common, rare), start=1):
            item = self._ids(f"{n}. {word}\n")
            if len(items) + len(item) > room:
                break
            items += item
            counts[word] = counts.get(word, 0) + 1
        if min(counts.get(w, 0) for w in common) < 2:
            raise ValueError(f"context too short for cwe: the prompt may have {budget} tokens, and the frequent words "
                             f"need two rounds of {_CWE_TOP + _CWE_RARE_PER_ROUND} list items after the "
                             f"{len(head) + len(tail)} tokens of instruction and question")
        if min(counts[w] for w in common) <= max((counts.get(w, 0) for w in rare), default=0):
            raise ValueError("context too long for cwe with this haystack: other words would occur as often as the "
                             "frequent ones; give a haystack with a larger vocabulary")
        return head + items + tail, tuple(common), []

    @staticmethod
    def _cwe_stream(rng: random.Random, common: list[str], rare: list[str]) -> Iterator[str]:
        position = 0
        while True:
            round_ = common + [rare[(position + i) % len(rare)] for i in range(_CWE_RARE_PER_ROUND)]
            position += _CWE_RARE_PER_ROUND
            rng.shuffle(round_)
            yield from round_


def score(completion: str, answers: Sequence[str]) -> bool:
    """True when every expected answer occurs in ``completion`` as a whole word (not inside a longer word or number),
    ignoring case: ``4821379`` counts in ``"is 4821379."`` but not in ``"48213790"``."""
    return all(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", completion, re.IGNORECASE) for a in answers)


def wilson_interval(successes: int, trials: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: unlike the normal approximation it stays inside [0, 1] and
    is not degenerate at 0/n or n/n, which small-sample accuracies hit all the time."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    p, z2 = successes / trials, z * z
    denominator = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    low = 0.0 if successes == 0 else centre - half  # exact bounds there, not rounding noise around them
    high = 1.0 if successes == trials else centre + half
    return low, high


@contextlib.contextmanager
def _prefill_timer(model) -> Iterator[list[float]]:
    """Times the first forward call inside the block (``generate``'s prefill over the whole prompt) without running
    it twice; yields a list that holds its seconds afterwards."""
    seconds: list[float] = []
    cuda = next(model.parameters()).device.type == "cuda"
    start: list[float] = []

    def before(module, args, kwargs):
        if not start:
            if cuda:
                torch.cuda.synchronize()
            start.append(time.perf_counter())

    def after(module, args, kwargs, output):
        if not seconds:
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start[0])

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield seconds
    finally:
        for h in hooks:
            h.remove()


def _left_pad(rows: list[tuple[int, ...]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every row's last prompt token sits at the same position and generation continues from it."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


@torch.inference_mode()
def generate(model, tokenizer, samples: Sequence[Sample]) -> tuple[list[str], float]:
    """Greedy completions of ``samples`` as one left-padded batch, and the seconds its prefill took."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _left_pad([s.input_ids for s in samples], pad)
    device = next(model.parameters()).device
    with _prefill_timer(model) as prefill:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max(s.max_new_tokens for s in samples), pad_token_id=pad)
    completions = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return completions, prefill[0]


def setting(model) -> dict:
    """``variant``, ``params``, ``layers`` of a patched model (its recorded spec), or of the exact original."""
    from .patching import is_patched

    if not is_patched(model):
        return {"variant": "exact", "params": {}, "layers": []}
    specs = model.config.patchattn
    if len(specs) == 1:
        spec = specs[0]
        return {"variant": spec["variant"], "params": dict(spec["params"]), "layers": list(spec["layers"])}
    # a composition: one setting named "a+b", its params and layers per variant
    return {"variant": "+".join(s["variant"] for s in specs),
            "params": {s["variant"]: dict(s["params"]) for s in specs},
            "layers": {s["variant"]: list(s["layers"]) for s in specs}}


def run_tasks(model, tokenizer, tasks: Sequence[str] = ("niah_single",), context_lengths: Sequence[int] = (4096,),
              samples: int = 10, batch_size: int = 4, haystack: str | Path | None = None, seed: int = 0, *,
              model_name: str | None = None, progress: bool = True) -> list[dict]:
    """Accuracy of ``model`` on each task at each context length: one JSON-ready row per (task, length) with a 95%
    Wilson interval, ``prefill_s``, the seconds spent in prefill (the first forward of each batch), summed, and
    ``correct``, each sample's 0/1 (paired comparisons between settings: the samples are the same).

    Samples ``0 .. samples-1`` of each (task, length) are the same for every model given the same tokenizer,
    haystack and seed, so rows of an exact and a patched run compare like for like."""
    for task in tasks:
        check_task(task)
    if samples < 1 or batch_size < 1 or any(c < 1 for c in context_lengths):
        raise ValueError(f"need samples, batch_size and context lengths >= 1, got {samples=}, {batch_size=}, "
                         f"{list(context_lengths)=}")
    builder = PromptBuilder(tokenizer, haystack)
    base = {"model": model_name or getattr(model, "name_or_path", None) or type(model).__name__, **setting(model)}
    was_training = model.training
    model.eval()
    rows = []
    try:
        with tqdm(total=len(tasks) * len(context_lengths) * samples, desc="tasks", unit="sample",
                  disable=not progress) as bar:
            for task in tasks:
                for context in context_lengths:
                    prompts = [builder.sample(task, context, i, seed) for i in range(samples)]
                    hits, prefill_s = [], 0.0
                    for start in range(0, samples, batch_size):
                        batch = prompts[start:start + batch_size]
                        completions, seconds = generate(model, tokenizer, batch)
                        hits += [int(score(c, s.answers)) for c, s in zip(completions, batch)]
                        prefill_s += seconds
                        bar.update(len(batch))
                    correct = sum(hits)
                    bar.set_postfix(task=task, context=context, acc=f"{correct / samples:.2f}")
                    low, high = wilson_interval(correct, samples)
                    rows.append({**base, "task": task, "context": context, "samples": samples,
                                 "accuracy": correct / samples, "ci_low": low, "ci_high": high,
                                 "prefill_s": prefill_s, "correct": hits})
    finally:
        model.train(was_training)
    return rows

"""Error-budget planning: which layers can take an approximate variant for a given budget on a metric.

The metric is perplexity on a calibration text (``PerplexityMetric``, budget: largest relative increase) or the
accuracy of a RULER-style task of :mod:`patchattn.tasks` (``TaskMetric``, budget: largest drop in percentage
points versus exact attention on the same prompts); the search does not care which (:func:`plan_with`):
  1. one exact forward over the metric's calibration input (the text's first window, or the task's first prompt)
     captures every layer's attention inputs; each layer's variant output is compared with exact attention on those
     real tensors (relative error, per layer);
  2. layers are added in order of increasing error while the measured metric stays in budget (bisection on the
     number of layers, a handful of evaluations).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .attention import exact_attention
from .capture import capture_attention_inputs
from .evaluation import perplexity
from .patching import patch_model, resolve_family, unpatch_model
from .tasks import PromptBuilder, check_task, run_tasks
from .variants import get_variant


class _Module:
    """Stand-in for an attention module when replaying captured tensors."""

    training = False
    is_causal = True

    def __init__(self, layer_idx: int, num_key_value_groups: int):
        self.layer_idx = layer_idx
        self.num_key_value_groups = num_key_value_groups


@torch.inference_mode()
def capture(model, input_ids: torch.Tensor) -> dict[int, tuple]:
    """One exact forward; returns each layer's attention inputs."""
    resolve_family(model)  # a clear error for an unsupported model before the forward
    with capture_attention_inputs(model) as store:
        model(input_ids=input_ids, logits_to_keep=1)
    return store


@torch.inference_mode()
def layer_errors(store: dict[int, tuple], variant: str, progress: bool = True, **params) -> dict[int, float]:
    """Relative error ``||o - o_exact|| / ||o_exact||`` of ``variant`` on each layer's captured attention inputs."""
    cls = get_variant(variant)
    vparams = cls.make_params(**params)
    errors = {}
    for idx in tqdm(sorted(store), desc=f"{variant} error per layer", disable=not progress):
        q, k, v, mask, kw = store[idx]
        module = _Module(idx, q.shape[1] // k.shape[1])
        ref, _ = exact_attention(module, q, k, v, mask, **kw)
        out, _ = cls(vparams, layer_idx=idx).attention(module, q, k, v, mask, **kw)
        errors[idx] = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return errors


class Metric:
    """What a plan is measured by. ``name`` is recorded in the plan; ``budget`` is in the metric's own unit.

    A metric gives the input the per-layer errors are calibrated on (:meth:`calibration_ids`), evaluates a model as
    it stands (exact or patched; :meth:`evaluate`), says whether a value is within budget of the exact model's
    (:meth:`within_budget`) and writes the one-line summary the command line prints (:meth:`summary`)."""

    name: str
    budget: float

    def calibration_ids(self) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model) -> float:
        raise NotImplementedError

    def within_budget(self, baseline: float, value: float) -> bool:
        raise NotImplementedError

    def summary(self, baseline: float, value: float) -> str:
        return f"{self.name} {baseline:.4g} -> {value:.4g} (budget {self.budget:g})"

    def settings(self) -> dict:
        """What else fixes the measurement (lengths, samples, ...), recorded in the plan."""
        return {}


class PerplexityMetric(Metric):
    """Perplexity of ``text`` (windows of ``context_length``, at most ``max_tokens`` scored); a plan may raise it by
    at most the fraction ``max_increase`` (0.05: 5%)."""

    name = "ppl"

    def __init__(self, tokenizer, text: str, *, max_increase: float = 0.05, context_length: int = 8192,
                 max_tokens: int | None = None, progress: bool = True):
        self.tokenizer, self.text, self.budget = tokenizer, text, max_increase
        self.context_length, self.max_tokens, self.progress = context_length, max_tokens, progress

    def calibration_ids(self) -> torch.Tensor:
        return self.tokenizer(self.text, return_tensors="pt").input_ids[:, :self.context_length]

    def evaluate(self, model) -> float:
        return perplexity(model, self.tokenizer, self.text, context_length=self.context_length,
                          max_tokens=self.max_tokens, progress=self.progress).ppl

    def within_budget(self, baseline: float, value: float) -> bool:
        return value <= baseline * (1 + self.budget)

    def summary(self, baseline: float, value: float) -> str:
        return (f"perplexity {baseline:.3f} -> {value:.3f} ({100 * (value / baseline - 1):+.2f}%, budget "
                f"{100 * self.budget:.1f}%)")

    def settings(self) -> dict:
        return {"context_length": self.context_length, "max_tokens": self.max_tokens}


class TaskMetric(Metric):
    """Accuracy (in [0, 1]) on ``samples`` prompts of one task of :mod:`patchattn.tasks` at ``context_length``
    (prompt plus answer); a plan may lose at most ``max_drop`` percentage points against the exact model on the same
    prompts (``max_drop=2``: 90% may become 88%, not 87.5%). With few samples the accuracy moves in steps of
    ``100 / samples`` points, so a budget below one step allows no loss at all."""

    _EPS = 1e-9  # 100 * (0.5 - 0.48) is 2.0000000000000018 in floating point

    def __init__(self, tokenizer, task: str, *, max_drop: float, context_length: int = 8192, samples: int = 10,
                 batch_size: int = 4, haystack: str | Path | None = None, seed: int = 0, progress: bool = True):
        check_task(task)
        if not 0 <= max_drop <= 100:
            raise ValueError(f"max_drop is in percentage points, in [0, 100]; got {max_drop}")
        self.tokenizer, self.name, self.budget = tokenizer, task, max_drop
        self.context_length, self.samples, self.batch_size = context_length, samples, batch_size
        self.haystack, self.seed, self.progress = haystack, seed, progress

    def calibration_ids(self) -> torch.Tensor:
        """The task's first prompt (sample 0, the one every evaluation also runs)."""
        sample = PromptBuilder(self.tokenizer, self.haystack).sample(self.name, self.context_length, 0, self.seed)
        return torch.tensor([sample.input_ids], dtype=torch.long)

    def evaluate(self, model) -> float:
        [row] = run_tasks(model, self.tokenizer, [self.name], [self.context_length], samples=self.samples,
                          batch_size=self.batch_size, haystack=self.haystack, seed=self.seed, progress=self.progress)
        return row["accuracy"]

    def within_budget(self, baseline: float, value: float) -> bool:
        return 100 * (baseline - value) <= self.budget + self._EPS

    def summary(self, baseline: float, value: float) -> str:
        return (f"{self.name} accuracy {100 * baseline:.1f}% -> {100 * value:.1f}% (drop "
                f"{100 * (baseline - value):.1f} points, budget {self.budget:g}; {self.samples} prompts of "
                f"{self.context_length} tokens)")

    def settings(self) -> dict:
        return {"context_length": self.context_length, "samples": self.samples, "batch_size": self.batch_size,
                "haystack": None if self.haystack is None else str(self.haystack), "seed": self.seed}


@dataclass
class Plan:
    variant: str
    params: dict
    layers: list[int]
    metric: str  # "ppl" or a task name
    baseline: float  # the metric of the exact model
    value: float  # the metric with ``layers`` patched
    budget: float  # in the metric's unit: a fraction of perplexity, or points of accuracy
    errors: dict[int, float]
    tried: list[dict] = field(default_factory=list)  # {"layers": [...], <metric>: value} per evaluation
    settings: dict = field(default_factory=dict)

    @property
    def baseline_ppl(self) -> float:
        self._need_ppl()
        return self.baseline

    @property
    def ppl(self) -> float:
        self._need_ppl()
        return self.value

    def _need_ppl(self) -> None:
        if self.metric != "ppl":
            raise AttributeError(f"this plan was measured by {self.metric!r}, not perplexity; use .baseline/.value")

    def to_json(self) -> dict:
        """JSON-ready; a perplexity plan also keeps the ``baseline_ppl``/``ppl`` keys older plan files have."""
        out = dict(self.__dict__)
        if self.metric == "ppl":
            out.update(baseline_ppl=self.baseline, ppl=self.value)
        return out


def plan_with(model, variant: str, metric: Metric, *, candidates: list[int] | None = None, progress: bool = True,
              **params) -> Plan:
    """The largest set of lowest-error layers whose ``metric`` stays within its budget of the exact model's."""
    errors = layer_errors(capture(model, metric.calibration_ids()), variant, progress=progress, **params)
    # layers where the variant falls back to exact (error 0, e.g. sliding-window layers) stay unpatched
    errors = {i: e for i, e in errors.items() if e > 0 and (candidates is None or i in candidates)}
    order = sorted(errors, key=errors.get)
    baseline = metric.evaluate(model)
    tried = []

    def value_with(count: int) -> float:
        patch_model(model, variant, layers=order[:count], **params)
        try:
            value = metric.evaluate(model)
        finally:
            unpatch_model(model)
        tried.append({"layers": sorted(order[:count]), metric.name: value})
        return value

    lo, hi, best = 0, len(order), baseline  # invariant: lo layers fit the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        value = value_with(mid)
        if metric.within_budget(baseline, value):
            lo, best = mid, value
        else:
            hi = mid - 1
    return Plan(variant, params, sorted(order[:lo]), metric.name, baseline, best, metric.budget, errors, tried,
                metric.settings())


def plan_layers(model, tokenizer, text: str, variant: str, *, max_ppl_increase: float = 0.05,
                context_length: int = 8192, max_tokens: int | None = None, candidates: list[int] | None = None,
                progress: bool = True, **params) -> Plan:
    """The largest set of lowest-error layers whose perplexity increase stays within ``max_ppl_increase``."""
    metric = PerplexityMetric(tokenizer, text, max_increase=max_ppl_increase, context_length=context_length,
                              max_tokens=max_tokens, progress=progress)
    return plan_with(model, variant, metric, candidates=candidates, progress=progress, **params)


def plan_layers_for_task(model, tokenizer, task: str, variant: str, *, max_drop: float, context_length: int = 8192,
                         samples: int = 10, batch_size: int = 4, haystack: str | Path | None = None, seed: int = 0,
                         candidates: list[int] | None = None, progress: bool = True, **params) -> Plan:
    """The largest set of lowest-error layers whose accuracy on ``task`` drops by at most ``max_drop`` percentage
    points versus the exact model, on the same ``samples`` prompts of ``context_length`` tokens."""
    metric = TaskMetric(tokenizer, task, max_drop=max_drop, context_length=context_length, samples=samples,
                        batch_size=batch_size, haystack=haystack, seed=seed, progress=progress)
    return plan_with(model, variant, metric, candidates=candidates, progress=progress, **params)

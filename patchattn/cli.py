"""The ``patchattn`` command line: list, convert, eval, plan, bench, demo, push."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .fields import parse_value

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# argparse `type=` converters: a bad value fails at parse time as "argument --opt: <message>", exit code 2, before
# any model loads (argparse also runs them on string defaults).

def _param_pair(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. block_size=128), got {text!r}")
    return key, parse_value(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [_positive_int(x.strip()) for x in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 2048,4096), got {text!r}") \
            from None


def _context_lengths(text: str) -> list[int]:
    """One length, or a comma list (several only with --tasks, see _check_eval); a bad entry gets the message a single
    bad length gets."""
    return [_positive_int(x.strip()) for x in text.split(",")]


def _task_list(text: str) -> list[str]:
    from .tasks import TASKS

    names = [x.strip() for x in text.split(",")]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
    return names


def _layers(text: str):
    """'all', 'last:N', 'first:N' (N >= 1) or comma-separated indices (negative count from the end)."""
    kind, colon, count = text.partition(":")
    if text == "all" or (colon and kind in ("last", "first") and count.isdigit() and int(count) >= 1):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'last:N', 'first:N' or comma-separated layer indices "
                                         f"(e.g. 0,1,-1), got {text!r}") from None


def _layers_option(text: str) -> tuple[str | None, object]:
    """``--layers LAYERS`` (every --variant) or ``--layers NAME=LAYERS`` (the variant NAME)."""
    name, sep, rest = text.partition("=")
    return (name, _layers(rest)) if sep else (None, _layers(text))


def _fraction(text: str) -> float:
    """A perplexity budget: ``5%`` or ``0.05``."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive percentage or fraction (e.g. 5% or 0.05), got {text!r}")
    return value


def _points(text: str) -> float:
    """An accuracy budget in percentage points: ``2`` lets 90% become 88%."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= 100):
        raise argparse.ArgumentTypeError(f"expected percentage points of accuracy in [0, 100] (e.g. 2: 90% may "
                                         f"become 88%), got {text!r}")
    return value


def _metric(text: str) -> str:
    """``ppl`` or a task name (patchattn.tasks.TASKS)."""
    from .tasks import TASKS

    if text != "ppl" and text not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown metric {text!r}; metrics: ppl, {', '.join(TASKS)}")
    return text


def _model_ref(text: str) -> str:
    from .realweights import model_source

    try:
        model_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _text_file(text: str) -> str:
    from importlib.resources import files

    if not (Path(text).is_file() or files("patchattn.data").joinpath(text).is_file()):
        raise argparse.ArgumentTypeError(f"no such file: {text!r} (give a text file, or the name of a shipped one: "
                                         "shakespeare.txt, kjv_sample.txt)")
    return text


def _params(args) -> dict:
    """The --param pairs of a single-variant command (plan, demo); ``NAME.KEY=VALUE`` may name its variant."""
    prefix = f"{args.variant}."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in args.param or []}


def _patch_specs(args) -> list[dict]:
    """The patches of a command that takes --variant (repeatable), --layers, --param or --spec, in order:
    ``[{"variant", "layers", "params"}]``. Raises ``ValueError("argument --x: ...")`` for what is wrong."""
    if args.spec:
        if args.variant or args.layers or args.param:
            raise ValueError("argument --spec: the spec file gives the variants, layers and parameters; drop "
                             "--variant/--layers/--param")
        try:
            entries = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"argument --spec: cannot read {args.spec!r} as JSON: {exc}") from None
        entries = [entries] if isinstance(entries, dict) else entries
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise ValueError("argument --spec: expected a JSON list of objects {\"variant\": NAME, \"layers\": "
                             "..., \"params\": {...}}")
        specs = []
        for entry in entries:
            unknown = sorted(set(entry) - {"variant", "layers", "params", "family", "patchattn_version"})
            if unknown or "variant" not in entry:
                raise ValueError(f"argument --spec: each entry needs 'variant' and may have 'layers' and 'params'; "
                                 f"got {entry!r}")
            specs.append({"variant": entry["variant"], "layers": entry.get("layers"),
                          "params": dict(entry.get("params") or {})})
        return specs
    names = args.variant or []
    if args.param and not names:
        raise ValueError("argument --param: variant parameters need --variant")
    if args.layers and not names:
        raise ValueError("argument --layers: layers need --variant")
    if len(set(names)) < len(names):
        raise ValueError(f"argument --variant: a variant is given twice ({names})")
    specs = {name: {"variant": name, "layers": None, "params": {}} for name in names}
    for name, layers in sorted(args.layers or [], key=lambda entry: entry[0] is not None):  # NAME= wins
        targets = names if name is None else [name]
        if name is not None and name not in specs:
            raise ValueError(f"argument --layers: {name}={layers} names no --variant (given: {', '.join(names)})")
        for target in targets:
            specs[target]["layers"] = layers
    for key, value in args.param or []:
        name, dot, param = key.rpartition(".")
        if not dot:
            if len(names) > 1:
                raise ValueError(f"argument --param: with several --variant, name the variant: NAME.{key}=VALUE")
            name, param = names[0], key
        if name not in specs:
            raise ValueError(f"argument --param: {key} names no --variant (given: {', '.join(names)})")
        specs[name]["params"][param] = value
    return list(specs.values())


def _check_patch_specs(specs: list[dict]) -> None:
    """Variants and parameters valid, and the variants composable (on the layers they share, by role), before
    any model loads: the message of a conflict names both variants."""
    from .variants import ROLE_LABELS, composition_conflict, get_variant

    seen: list[tuple[type, dict]] = []
    for spec in specs:
        try:
            cls = get_variant(spec["variant"])
        except ValueError as exc:
            raise ValueError(f"argument --variant: {exc}") from None
        try:
            cls.make_params(**spec["params"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"argument --param: {exc}") from None
        for other, other_spec in seen:
            reason = composition_conflict(other, cls)
            # certain to share layers when one of them is on all; other overlaps are refused by patch_model
            if reason is not None and (spec["layers"] in (None, "all") or other_spec["layers"] in (None, "all")):
                raise ValueError(f"argument --variant: cannot combine {cls.name!r} ({ROLE_LABELS[cls.role]}) with "
                                 f"{other.name!r} ({ROLE_LABELS[other.role]}): {reason}")
        seen.append((cls, spec))


def load(model_ref: str, dtype: torch.dtype = torch.float32):
    """A shipped real model by name (see ``patchattn list``), or a local dir / Hub repo (patched or not)."""
    from transformers import AutoTokenizer

    from . import from_pretrained
    from .realweights import load_model, model_source

    if model_source(model_ref) == "shipped":
        return load_model(model_ref, dtype=dtype)
    model_ref = os.path.expanduser(model_ref)
    model = from_pretrained(model_ref, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(model_ref)


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, type=_model_ref,
                   help=f"shipped model name, local dir or Hub repo owner/name (default: {DEFAULT_MODEL})")


def _add_patch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", action="append",
                   help="variant name (see `patchattn list`); repeat to combine variants (e.g. --variant hyper "
                        "--variant zipcache), patched in the order given")
    p.add_argument("--layers", type=_layers_option, action="append", metavar="[NAME=]LAYERS",
                   help="'all', 'last:N', 'first:N' or comma-separated indices (default: all); NAME=LAYERS sets "
                        "the layers of one of several variants (--layers hyper=last:16)")
    _add_param_arg(p, "variant parameter (repeatable); with several --variant, NAME.KEY=VALUE "
                      "(--param zipcache.high_bits=8)")
    p.add_argument("--spec", help="JSON file with the patches instead of --variant/--layers/--param: a list of "
                                  "{\"variant\": NAME, \"layers\": ..., \"params\": {...}} (config.json's "
                                  "patchattn record has this form)")


def _add_param_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--param", action="append", type=_param_pair, metavar="KEY=VALUE", help=help)


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Checks that involve several options or the variant's parameters, still before any model loads."""
    from .variants import get_variant

    variant = getattr(args, "variant", None)
    if hasattr(args, "spec"):  # a command that patches: --variant repeatable, or --spec
        try:
            args.patches = _patch_specs(args)
            _check_patch_specs(args.patches)
        except ValueError as exc:
            parser.error(str(exc))
        if args.command == "bench" and not args.patches:
            parser.error("the following arguments are required: --variant (or --spec)")
        variant = None
    elif getattr(args, "param", None) and not variant:
        parser.error("argument --param: variant parameters need --variant")
    if variant:
        try:
            cls = get_variant(variant)
        except ValueError as exc:
            parser.error(f"argument --variant: {exc}")
        try:
            cls.make_params(**_params(args))
        except (ValueError, TypeError) as exc:
            parser.error(f"argument --param: {exc}")
    if args.command == "eval":
        _check_eval(parser, args)
    if args.command == "plan":
        _check_plan(parser, args)
    stride, context = getattr(args, "stride", None), getattr(args, "context_length", None)
    if stride is not None and stride > context:
        parser.error(f"argument --stride: must be <= --context-length ({context}), got {stride}")
    if args.command == "convert":
        out = Path(args.output)
        if out.exists() and not out.is_dir():
            parser.error(f"argument output: {out} is a file; give a directory")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            parser.error(f"argument output: {out} is not empty; pass --force to replace it, or choose a new directory")


_TASK_OPTIONS = {"samples": "--samples", "batch_size": "--batch-size", "haystack": "--haystack", "out": "--out"}
_PERPLEXITY_OPTIONS = {"stride": "--stride", "max_tokens": "--max-tokens", "exp2": "--exp2", "text": "--text",
                       "json": "--json"}


def _check_eval(parser: argparse.ArgumentParser, args) -> None:
    """``eval`` is two commands in one: options of the mode not chosen are refused rather than silently ignored.
    Without --tasks, --context-length is a single window length (perplexity)."""
    if args.tasks:
        for dest, flag in _PERPLEXITY_OPTIONS.items():
            if getattr(args, dest):
                parser.error(f"argument {flag}: perplexity option, not used with --tasks")
        return
    for dest, flag in _TASK_OPTIONS.items():
        if getattr(args, dest) is not None:
            parser.error(f"argument {flag}: needs --tasks")
    if len(args.context_length) > 1:
        parser.error("argument --context-length: several lengths need --tasks (perplexity uses one window length)")
    args.context_length = args.context_length[0]


_PLAN_TASK_OPTIONS = {"max_drop": "--max-drop", "samples": "--samples", "batch_size": "--batch-size",
                      "haystack": "--haystack"}
_PLAN_PERPLEXITY_OPTIONS = {"max_ppl_increase": "--max-ppl-increase", "text": "--text", "max_tokens": "--max-tokens"}


def _check_plan(parser: argparse.ArgumentParser, args) -> None:
    """``plan`` measures either perplexity or one task's accuracy: the other metric's options are refused, a task
    metric needs its budget (--max-drop), and the defaults of the chosen one are filled in."""
    if args.metric == "ppl":
        for dest, flag in _PLAN_TASK_OPTIONS.items():
            if getattr(args, dest) is not None:
                parser.error(f"argument {flag}: needs a task metric (--metric niah_single, ...)")
        if args.max_ppl_increase is None:
            args.max_ppl_increase = 0.05
        return
    for dest, flag in _PLAN_PERPLEXITY_OPTIONS.items():
        if getattr(args, dest) is not None:
            parser.error(f"argument {flag}: perplexity option, not used with --metric {args.metric}")
    if args.max_drop is None:
        parser.error(f"argument --max-drop: required with --metric {args.metric} (the accuracy drop allowed, in "
                     "percentage points)")
    args.samples = args.samples or 10
    args.batch_size = args.batch_size or 4


def _apply_patch(model, args) -> None:
    from . import patch_model

    for spec in args.patches:
        patch_model(model, spec["variant"], layers=spec["layers"], **spec["params"])


def cmd_list(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from . import list_families, list_variants

    console = Console()
    table = Table(title="variants")
    from .variants import ROLE_LABELS

    for col in ("name", "kind", "role", "description", "parameters (default)"):
        table.add_column(col)
    for v in list_variants():
        params = ", ".join(f"{k}={p['default']}" for k, p in v["params"].items()) or "-"
        table.add_row(v["name"], v["kind"], ROLE_LABELS[v["role"]], v["description"], params)
    console.print(table)
    table = Table(title="model families")
    for col in ("name", "model_type", "description"):
        table.add_column(col)
    for f in list_families():
        table.add_row(f["name"], ", ".join(f["model_types"]), f["description"])
    console.print(table)
    from .realweights import KNOWN_MODELS

    console.print("shipped real models: " + ", ".join(f"{k} ({v})" for k, v in KNOWN_MODELS.items()))


def cmd_convert(args) -> None:
    model, tokenizer = load(args.model, DTYPES[args.dtype])
    _apply_patch(model, args)
    out = Path(args.output)
    # written beside OUT and moved into place whole: --force replaces OUT, and no stale shards of an older model stay
    work = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        model.save_pretrained(work, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(work)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    spec = getattr(model.config, "patchattn", None)
    print(f"saved {args.output}: " + (json.dumps(spec) if spec else "unpatched"))


def cmd_eval(args) -> None:
    from .data import read_text
    from .evaluation import perplexity

    if args.tasks:
        _eval_tasks(args)
        return
    model, tokenizer = load(args.model, DTYPES[args.dtype])
    _apply_patch(model, args)
    res = perplexity(model, tokenizer, read_text(args.text), context_length=args.context_length,
                     stride=args.stride, max_tokens=args.max_tokens)
    line = f"perplexity {res.ppl:.3f} over {res.tokens_scored} tokens ({res.windows} windows of " \
           f"{res.context_length}), {res.tokens_per_second:.0f} tok/s"
    if args.exp2:
        line += f"; exp2 form (HyperAttention paper): {res.ppl_exp2:.3f}"
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res.__dict__, "model": args.model, "patch": getattr(model.config, "patchattn", None)}, f,
                      indent=2)


def _eval_tasks(args) -> None:
    """Task accuracy of the model as loaded, then (with --variant) patched, on the same prompts."""
    from . import is_patched, unpatch_model
    from .tasks import run_tasks

    model, tokenizer = load(args.model, DTYPES[args.dtype])
    if args.patches and is_patched(model):  # refused now rather than after the first, unpatched-model pass
        names = [spec["variant"] for spec in model.config.patchattn]
        raise ValueError(f"{args.model} is already patched ({', '.join(names)}); drop --variant to evaluate it as "
                         "saved")

    def run() -> list[dict]:
        return run_tasks(model, tokenizer, args.tasks, args.context_length, samples=args.samples or 10,
                         batch_size=args.batch_size or 4, haystack=args.haystack, model_name=args.model)

    rows = run()
    if args.patches:
        try:
            _apply_patch(model, args)
            rows += run()
        finally:
            if is_patched(model):
                unpatch_model(model)
    _print_task_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


def _print_task_table(rows: list[dict]) -> None:
    """Tasks down, context lengths across, one column per setting (exact / patched) under each length."""
    from rich.console import Console
    from rich.table import Table

    settings = list(dict.fromkeys(r["variant"] for r in rows))
    contexts = list(dict.fromkeys(r["context"] for r in rows))
    cell = {(r["task"], r["context"], r["variant"]): r for r in rows}
    table = Table(title=f"task accuracy [95% Wilson interval], {rows[0]['samples']} samples each ({rows[0]['model']})")
    table.add_column("task")
    for context in contexts:
        for variant in settings:
            table.add_column(f"{context} {variant}", justify="right")
    for task in dict.fromkeys(r["task"] for r in rows):
        table.add_row(task, *(f"{r['accuracy']:.0%} [{r['ci_low']:.0%}-{r['ci_high']:.0%}]"
                              for c in contexts for v in settings for r in [cell[task, c, v]]))
    table.add_row("prefill s", *(f"{sum(r['prefill_s'] for r in rows if (r['context'], r['variant']) == (c, v)):.1f}"
                                 for c in contexts for v in settings))
    Console().print(table)


def _time(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def cmd_bench(args) -> None:
    """Prefill time of the model, original vs patched, at each sequence length."""
    from rich.console import Console
    from rich.table import Table

    from . import is_patched, unpatch_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load(args.model, DTYPES[args.dtype])
    if is_patched(model):
        raise ValueError(f"{args.model} is already patched; bench compares an unpatched model with its patched self")
    model.to(device)
    table = Table(title=f"prefill ms ({args.model}, {device}, {args.dtype})")
    for col in ("seq len", "original", "+".join(spec["variant"] for spec in args.patches), "speedup"):
        table.add_column(col, justify="right")
    rows = []
    for n in args.seq_lens:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        run = lambda: model(input_ids=ids, logits_to_keep=1)
        with torch.inference_mode():
            base = _time(run, device, args.repeats)
            try:
                _apply_patch(model, args)
                patched_ms = _time(run, device, args.repeats)
            finally:
                if is_patched(model):
                    unpatch_model(model)
        rows.append({"n": n, "original_ms": base, "patched_ms": patched_ms})
        table.add_row(str(n), f"{base:.1f}", f"{patched_ms:.1f}", f"{base / patched_ms:.2f}x")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=2)


def cmd_plan(args) -> None:
    from .data import read_text
    from .planner import PerplexityMetric, TaskMetric, plan_with

    model, tokenizer = load(args.model, DTYPES[args.dtype])
    if args.metric == "ppl":
        metric = PerplexityMetric(tokenizer, read_text(args.text), max_increase=args.max_ppl_increase,
                                  context_length=args.context_length, max_tokens=args.max_tokens)
    else:
        metric = TaskMetric(tokenizer, args.metric, max_drop=args.max_drop, context_length=args.context_length,
                            samples=args.samples, batch_size=args.batch_size, haystack=args.haystack)
    plan = plan_with(model, args.variant, metric, **_params(args))
    for idx, err in sorted(plan.errors.items()):
        print(f"layer {idx:>3}: relative attention error {err:.3f}" + ("  <- patch" if idx in plan.layers else ""))
    print(f"{metric.summary(plan.baseline, plan.value)} with {len(plan.layers)} layers: "
          f"--layers {','.join(map(str, plan.layers)) or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**plan.to_json(), "model": args.model}, f, indent=2)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(model_name=args.model, contexts=args.contexts, max_tokens=args.max_tokens, layers=args.layers,
             params=_params(args), json_path=args.json)


def build_parser() -> argparse.ArgumentParser:
    from .realweights import KNOWN_MODELS

    parser = argparse.ArgumentParser(prog="patchattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="variants, model families and shipped real models").set_defaults(fn=cmd_list)

    p = sub.add_parser("convert", help="load a model, patch it, save it (the patch goes into config.json)")
    p.add_argument("model", type=_model_ref, help="shipped model name, local dir or Hub repo owner/name")
    p.add_argument("output", help="output directory (new or empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    _add_patch_args(p)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--max-shard-size", default="2GB")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("eval", help="sliding-window perplexity over a text file, or (--tasks) long-context task "
                                    "accuracy, exact vs patched")
    _add_model_arg(p)
    _add_patch_args(p)
    p.add_argument("--text", type=_text_file, help="text file (default: the shipped Shakespeare plays)")
    p.add_argument("--context-length", type=_context_lengths, default="2048",
                   help="window length; with --tasks a comma list of prompt+answer lengths (default: 2048)")
    p.add_argument("--tasks", type=_task_list, help="comma list of RULER-style tasks (patchattn.tasks.TASKS): "
                   "runs the model as loaded, then patched with --variant, on the same prompts")
    p.add_argument("--samples", type=_positive_int, help="prompts per task and length, with --tasks (default: 10)")
    p.add_argument("--batch-size", type=_positive_int, help="prompts per generate() batch, with --tasks (default: 4)")
    p.add_argument("--haystack", type=_text_file, help="filler text for --tasks (default: the shipped Shakespeare)")
    p.add_argument("--out", help="with --tasks: write the result rows here (JSON list)")
    p.add_argument("--stride", type=_positive_int, help="score only the last STRIDE tokens of overlapping windows")
    p.add_argument("--max-tokens", type=_positive_int, help="truncate the tokenised text")
    p.add_argument("--exp2", action="store_true", help="also print 2**(mean natural-log NLL), as the paper does")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--json", help="write the result here")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("bench", help="prefill time, original vs patched")
    _add_model_arg(p)
    _add_patch_args(p)
    p.add_argument("--seq-lens", type=_int_list, default="2048,4096,8192")
    p.add_argument("--repeats", type=_positive_int, default=3)
    p.add_argument("--device")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--json")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("plan", help="choose the layers to patch for a perplexity budget (calibrated on text) or a "
                                    "task-accuracy budget (--metric TASK --max-drop POINTS)")
    _add_model_arg(p)
    p.add_argument("--variant", default="hyper")
    _add_param_arg(p, "variant parameter (repeatable)")
    p.add_argument("--metric", type=_metric, default="ppl",
                   help="what the budget is on: ppl (perplexity of --text, default) or a task of patchattn.tasks "
                        "(niah_single, niah_multikey, vt, ...: accuracy versus exact on the same prompts)")
    p.add_argument("--max-ppl-increase", type=_fraction,
                   help="perplexity budget, e.g. 5%% or 0.05 (default: 5%%); --metric ppl only")
    p.add_argument("--max-drop", type=_points, metavar="POINTS",
                   help="task budget: largest accuracy drop in percentage points versus exact (2: 90%% may become "
                        "88%%); required with a task --metric")
    p.add_argument("--text", type=_text_file, help="calibration text (default: the shipped Shakespeare plays)")
    p.add_argument("--context-length", type=_positive_int, default=8192,
                   help="perplexity window, or a task prompt's length with its answer (default: 8192)")
    p.add_argument("--max-tokens", type=_positive_int, help="tokens scored per perplexity check (default: all)")
    p.add_argument("--samples", type=_positive_int, help="prompts per task check, with a task --metric (default: 10)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="prompts per generate() batch, with a task --metric (default: 4)")
    p.add_argument("--haystack", type=_text_file,
                   help="filler text of the task prompts (default: the shipped Shakespeare plays)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--json")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("demo", help="SmolLM2-135M: original vs hyper perplexity at 2k/4k/8k on shipped text")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(KNOWN_MODELS), help="a shipped model")
    p.add_argument("--contexts", type=_int_list, default="2048,4096,8192")
    p.add_argument("--max-tokens", type=_positive_int, default=8192,
                   help="tokens of text scored at each context length")
    p.add_argument("--layers", type=_layers, default="last:8")
    _add_param_arg(p, "hyper parameter (default min_seq_len=1024, block_size=256, sample_size=256)")
    p.add_argument("--json", help="write the table here")
    p.set_defaults(fn=cmd_demo, variant="hyper")  # variant: what _check_args validates --param against

    from .hub import add_cli

    add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        args.fn(args)
    except (ValueError, OSError) as e:  # bad input or a Hub/file problem: the message says what to fix
        print(f"patchattn: error: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(f"  {note}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

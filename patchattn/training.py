"""What the training recipes share (``recipes/continue_train.py``, ``recipes/distill.py``), written once.

* Config: dataclasses of fields grouped by concern (model + patch, data, one optimisation stage, what trains, the
  run), each field declared with :func:`option` (types, range, choices) so one validator checks them all and every
  error names the field (nested ones as ``stage2.lr``). A recipe's config inherits the groups it needs.
* Data: documents are read, split (held-out tail), tokenized and packed identically on every process.
* Determinism: the batch of optimizer step ``s`` is a pure function of ``(seed, s)`` and the learning rate of ``s``
  alone, so the ``(stage, step)`` saved with a checkpoint *is* the data position, and a resumed run reproduces the
  uninterrupted loss curve.
* :class:`Run` owns the accelerator, ``output_dir``, ``log.jsonl`` and the checkpoints; :func:`train_steps` runs
  one optimisation stage with any loss (next-token, attention transfer, KL to a teacher).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

MIXED_PRECISION = (None, "no", "fp16", "bf16", "fp8")
KILL_ENV = "PATCHATTN_RECIPE_KILL_AT_STEP"  # tests: "[name:]N" SIGKILLs the process after step N (of stage `name`)


class ConfigError(ValueError):
    """A bad recipe config; the message names the field."""


# -- config ---------------------------------------------------------------------------------------------------------

def option(default=dataclasses.MISSING, *, types: tuple = (), low=None, high=None, low_open=False, high_open=False,
           choices=None, nullable=False, factory=None):
    """A config field with what the validator checks: ``types`` (bool never passes as int), the range
    ``low``..``high`` (inclusive unless ``*_open``), ``choices``; ``nullable`` lets ``None`` through."""
    meta = dict(types=types, low=low, high=high, low_open=low_open, high_open=high_open, choices=choices,
                nullable=nullable)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(cls):
    """A field holding a sub-config (a mapping in YAML), e.g. ``stage1:`` of the distillation recipe."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls})


def field_error(name: str, message: str, value) -> ConfigError:
    """``config field 'name' <message>, got <value>``: every config error names its field."""
    return ConfigError(f"config field {name!r} {message}, got {value!r}")


def _range_text(meta) -> str:
    low, high = meta["low"], meta["high"]
    if high is None:
        return f"must be {'>' if meta['low_open'] else '>='} {low}"
    if low is None:
        return f"must be {'<' if meta['high_open'] else '<='} {high}"
    return f"must be in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"


@dataclasses.dataclass
class ConfigBase:
    """Loading and validation for every recipe config (see :func:`option`); ``check`` adds cross-field rules."""

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config", prefix: str = ""):
        of = f" of {prefix[:-1]!r}" if prefix else ""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of config fields{of}, got {raw!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {[prefix + u for u in unknown]}; known fields{of}: "
                              f"{list(fields)}")
        values = dict(raw)
        for name, f in fields.items():
            sub = f.metadata.get("nested")
            if sub is not None and name in values:
                values[name] = sub.from_dict(values[name] if values[name] is not None else {}, source,
                                             f"{prefix}{name}.")
        config = cls(**values)
        config.validate(prefix)
        return config

    def validate(self, prefix: str = "") -> None:
        for f in dataclasses.fields(self):
            meta, value, name = f.metadata, getattr(self, f.name), prefix + f.name
            if "nested" in meta:
                continue  # validated by its own from_dict
            if not meta or (value is None and meta["nullable"]):
                continue
            types = meta["types"]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                raise field_error(name, f"must be {' or '.join(t.__name__ for t in types)}"
                                  f"{' or null' if meta['nullable'] else ''}", value)
            if meta["choices"] is not None and value not in meta["choices"]:
                raise field_error(name, f"must be one of {list(meta['choices'])}", value)
            low, high = meta["low"], meta["high"]
            if (low is not None and (value <= low if meta["low_open"] else value < low)) or \
                    (high is not None and (value >= high if meta["high_open"] else value > high)):
                raise field_error(name, _range_text(meta), value)
        self.check(prefix)

    def check(self, prefix: str) -> None:
        """Cross-field rules; groups that have some override this and call ``super().check(prefix)``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ModelFields(ConfigBase):
    model: str = option("smollm2-135m", types=(str,))  # shipped name, local dir, Hub id, patched dir or "tiny-llama"
    model_config: dict = option(types=(dict,), factory=dict)  # tiny-llama only: LlamaConfig overrides
    tokenizer_vocab: int = option(512, types=(int,), low=1)  # tiny-llama only: word-level vocabulary size
    variant: str = option(None, types=(str,))  # required (no default variant): a name in patchattn.VARIANTS
    layers: Any = None  # None/"all", "last:N", "first:N" or a list of indices (checked by patch_model)
    variant_params: dict = option(types=(dict,), factory=dict)

    def check(self, prefix):
        super().check(prefix)
        import patchattn
        from patchattn.variants import get_variant

        try:
            get_variant(self.variant).make_params(**self.variant_params)
        except ValueError as exc:
            field = "variant" if self.variant not in patchattn.VARIANTS else "variant_params"
            raise ConfigError(f"config field {prefix + field!r}: {exc}") from None
        if self.model == "tiny-llama":
            return
        from patchattn.realweights import model_source

        try:
            model_source(self.model)
        except ValueError as exc:
            raise ConfigError(f"config field {prefix + 'model'!r}: {exc} (or tiny-llama)") from None
        if self.model_config:
            raise field_error(prefix + "model_config", "is only used with model: tiny-llama", self.model_config)


@dataclasses.dataclass
class DataFields(ConfigBase):
    data: Any = None  # None (shipped Shakespeare), a path / list of .txt/.jsonl paths, or a `datasets` name
    data_config: str | None = option(None, types=(str,), nullable=True)  # `datasets` config name
    data_split: str = option("train", types=(str,))
    text_field: str = option("text", types=(str,))  # JSONL / datasets column
    eval_fraction: float = option(0.05, types=(int, float), low=0, high=1, low_open=True, high_open=True)
    eval_tokens: int = option(16384, types=(int,), low=1)  # held-out tokens scored per evaluation
    seq_len: int = option(512, types=(int,), low=2)

    def check(self, prefix):
        super().check(prefix)
        d = self.data
        if not (d is None or isinstance(d, str) or (isinstance(d, list) and d and all(isinstance(x, str) for x in d))):
            raise field_error(prefix + "data", "must be null, a path / `datasets` name, or a list of paths", d)
        for source in [d] if isinstance(d, str) else d or []:
            if _is_file_source(source):
                if not Path(source).expanduser().is_file() and not _shipped_text(source):
                    raise field_error(prefix + "data", f"names a file that does not exist (relative paths start at "
                                      f"{os.getcwd()})", source)
            elif importlib.util.find_spec("datasets") is None:
                raise field_error(prefix + "data", "is not a .txt/.jsonl file, and loading it as a `datasets` name "
                                  "needs `pip install datasets`", source)


def _is_file_source(source: str) -> bool:
    """Whether a ``data`` entry is read as a file (not as a `datasets` name): a .txt / .jsonl name, or a path."""
    return Path(source).suffix in (".txt", ".jsonl") or source.startswith(("./", "../", "/", "~"))


def _shipped_text(source: str) -> bool:
    """A bare name of a text shipped in patchattn.data (e.g. ``kjv_sample.txt``), which ``read_text`` resolves."""
    from importlib.resources import files

    return Path(source).suffix == ".txt" and files("patchattn.data").joinpath(source).is_file()


@dataclasses.dataclass
class StageFields(ConfigBase):
    """One optimisation stage: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    batch_size: int = option(8, types=(int,), low=1)  # per process, per micro-batch
    grad_accum: int = option(1, types=(int,), low=1)  # micro-batches per optimizer step
    lr: float = option(1e-3, types=(int, float), low=0, low_open=True)
    weight_decay: float = option(0.0, types=(int, float), low=0)
    warmup_steps: int = option(0, types=(int,), low=0)
    min_lr_ratio: float = option(0.1, types=(int, float), low=0, high=1)
    max_grad_norm: float = option(1.0, types=(int, float), low=0)  # 0: no clipping
    max_steps: int = option(100, types=(int,), low=1)
    gradient_checkpointing: bool = option(False, types=(bool,))
    eval_every: int = option(0, types=(int,), low=0)  # 0: only at the start and the end
    save_every: int = option(0, types=(int,), low=0)  # 0: no intermediate checkpoints


@dataclasses.dataclass
class TrainableFields(ConfigBase):
    trainable: str = option("variant", types=(str,), choices=("variant", "lora", "full"))
    lora_r: int = option(16, types=(int,), low=1)
    lora_alpha: int = option(32, types=(int,), low=1)
    lora_dropout: float = option(0.0, types=(int, float), low=0, high=1, high_open=True)
    lora_targets: list = option(types=(list,), factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def check(self, prefix):
        super().check(prefix)
        if not self.lora_targets or not all(isinstance(t, str) for t in self.lora_targets):
            raise field_error(prefix + "lora_targets", "must be a non-empty list of module names", self.lora_targets)


@dataclasses.dataclass
class RunFields(ConfigBase):
    mixed_precision: str | None = option(None, types=(str,), nullable=True, choices=MIXED_PRECISION)
    resume: Any = option(False, types=(bool, str))  # true: the last complete checkpoint in output_dir; or a path
    output_dir: str = option("runs/train", types=(str,))
    seed: int = option(0, types=(int,))
    log_every: int = option(0, types=(int,), low=0)  # print a text line every N steps (0: the progress bar only)
    push_to_hub: str | None = option(None, types=(str,), nullable=True)  # Hub repo id

    def __post_init__(self):
        if self.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
            self.mixed_precision = "no"


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; in a config it means the number."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


def _merge(cls: type, base: dict, overrides: dict) -> dict:
    """``overrides`` on top of ``base``; sub-config sections (``stage1:``) merge field by field, every other value
    (``variant_params`` included) is replaced whole."""
    out = dict(base)
    sections = {f.name: f.metadata["nested"] for f in dataclasses.fields(cls) if "nested" in f.metadata}
    for key, value in overrides.items():
        if key in sections and isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(sections[key], out[key], value)
        out[key] = value
    return out


def load_config(cls: type, path: str | None, overrides: dict | None = None):
    """``cls`` from the YAML at ``path`` with ``overrides`` on top."""
    raw: dict = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            raw = _yaml(f.read()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields")
    return cls.from_dict(_merge(cls, raw, overrides or {}), source=path or "config")


def parse_args(cls: type, description: str, argv: list[str] | None = None):
    """``--config FILE`` plus ``--field value`` overrides (values parsed as YAML; ``--stage2.lr 1e-4`` sets a
    nested field)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="recipe YAML")
    args, rest = parser.parse_known_args(argv)
    overrides: dict = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides are --field value")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"override {token} needs a value")
            key, value = token[2:], rest[i + 1]
            i += 2
        *parents, leaf = key.replace("-", "_").split(".")
        target = overrides
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = _yaml(value)
    return load_config(cls, args.config, overrides)


# -- model and tokenizer --------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]+")


def word_level_tokenizer(text: str, vocab_size: int):
    """A deterministic word-level tokenizer (most frequent words of ``text``; ties broken alphabetically)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    counts = Counter(_WORD.findall(text))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max(vocab_size - len(specials), 0)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


#: LlamaConfig of ``model: tiny-llama`` (``model_config`` overrides it)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)


def build_model(config: ModelFields, text: str):
    """``(model, tokenizer, already_patched)`` in float32 (mixed precision is autocast by accelerate)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import patchattn

    if config.model == "tiny-llama":
        tokenizer = word_level_tokenizer(text, config.tokenizer_vocab)
        kwargs = dict(TINY_LLAMA, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        kwargs.update(config.model_config)
        torch.manual_seed(getattr(config, "seed", 0))
        return LlamaForCausalLM(LlamaConfig(**kwargs)), tokenizer, False
    from patchattn.realweights import KNOWN_MODELS, load_model

    if config.model in KNOWN_MODELS:
        model, tokenizer = load_model(config.model)
        return model, tokenizer, False
    ref = os.path.expanduser(config.model)
    hf_config = AutoConfig.from_pretrained(ref)
    tokenizer = AutoTokenizer.from_pretrained(ref)
    if getattr(hf_config, "patchattn", None) is not None:
        return patchattn.from_pretrained(ref, dtype=torch.float32), tokenizer, True
    return AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32), tokenizer, False


# -- data -----------------------------------------------------------------------------------------------------------

def read_corpus(config: DataFields) -> list[str]:
    """The documents of the training corpus, in a fixed order."""
    from patchattn.data import read_text

    if config.data is None:
        return [read_text()]
    sources = [config.data] if isinstance(config.data, str) else list(config.data)
    docs: list[str] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.suffix == ".jsonl" and path.is_file():
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if config.text_field not in record:
                            raise ConfigError(f"config field 'text_field': {path}:{n} has no {config.text_field!r} "
                                              f"key (keys: {sorted(record)})")
                        docs.append(str(record[config.text_field]))
        elif path.is_file() or path.suffix == ".txt":  # or the bare name of a shipped text, e.g. kjv_sample.txt
            docs.append(read_text(path if path.is_file() else source))
        else:
            import datasets  # DataFields.check made sure it is installed

            ds = datasets.load_dataset(source, config.data_config, split=config.data_split)
            if config.text_field not in ds.column_names:
                raise ConfigError(f"config field 'text_field': {source!r} has no column {config.text_field!r} "
                                  f"(columns: {ds.column_names})")
            docs.extend(str(t) for t in ds[config.text_field])
    if not any(d.strip() for d in docs):
        raise ConfigError(f"config field 'data': {config.data!r} holds no text")
    return docs


def split_corpus(docs: list[str], eval_fraction: float) -> tuple[list[str], str]:
    """Hold out the last ``eval_fraction`` of the characters (the tail of the last documents)."""
    total = sum(len(d) for d in docs)
    keep = int(total * (1 - eval_fraction))
    train, seen = [], 0
    for i, d in enumerate(docs):
        if seen + len(d) <= keep:
            train.append(d)
            seen += len(d)
            continue
        cut = keep - seen
        train.append(d[:cut])
        held = [d[cut:], *docs[i + 1:]]
        return [t for t in train if t], "\n".join(held)
    return train, ""


def tokenize_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    """One token stream: each document tokenized without special tokens, separated by EOS (or BOS)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False).input_ids)
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = len(stream) // seq_len
    if n == 0:
        raise ConfigError(f"config field 'seq_len': the data has only {len(stream)} tokens, fewer than seq_len")
    return stream[: n * seq_len].view(n, seq_len)


def load_patched_model(config, calibration_rows: int):
    """Read and split the data, build the model, patch it (or check an already patched checkpoint's variant), pack
    the train and held-out chunks, and calibrate data-dependent variant state (``Variant.calibrate``, e.g. an output
    norm, on the first ``calibration_rows`` chunks, identically on every process).
    ``config`` has ModelFields and DataFields.
    Returns ``(model, tokenizer, train_chunks, eval_chunks)``."""
    import patchattn

    train_docs, held_out = split_corpus(read_corpus(config), config.eval_fraction)
    model, tokenizer, already_patched = build_model(config, "\n".join(train_docs))
    if already_patched:
        names = [spec["variant"] for spec in model.config.patchattn]
        if config.variant not in names:
            raise ConfigError(f"config field 'variant': {config.model} is already patched with {names}")
    else:
        try:
            patchattn.patch_model(model, config.variant, layers=config.layers, **config.variant_params)
        except ValueError as exc:  # e.g. layers out of range, or a variant this family does not support
            raise ConfigError(f"config fields 'variant' / 'layers': patching {config.model}: {exc}") from None
    train_chunks = pack(tokenize_docs(tokenizer, train_docs), config.seq_len)
    eval_stream = tokenize_docs(tokenizer, [held_out])[: config.eval_tokens]
    eval_chunks = pack(eval_stream, min(config.seq_len, len(eval_stream)))
    if not already_patched:  # a trained checkpoint keeps its calibrated state
        from patchattn.variants import get_variant

        with torch.no_grad():
            get_variant(config.variant).calibrate(model, train_chunks[:calibration_rows])
    model.config.use_cache = False
    return model, tokenizer, train_chunks, eval_chunks


def set_gradient_checkpointing(model, enable: bool) -> None:
    """Non-reentrant activation checkpointing on/off (transformers renamed the methods in 5.2x)."""
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def variant_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the patch added (they live under ``patchattn_layer``, and ``patchattn_layer_<i>`` for the
    later variants of a composition, in the attention modules)."""
    from patchattn.patching import layer_attrs

    names = layer_attrs(model)
    return [p for n, p in model.named_parameters() if any(f".{name}." in n for name in names)]


def set_trainable(model, config: TrainableFields, *, variant: str, prefix: str = ""):
    """Freeze/unfreeze per ``config.trainable`` (``lora``: PEFT LoRA on ``lora_targets`` plus the variant's
    parameters); returns the (possibly PEFT-wrapped) model."""
    if config.trainable == "full":
        model.requires_grad_(True)
        return model
    params = variant_parameters(model)
    if config.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        from patchattn.patching import layer_attrs

        # modules_to_save: PEFT trains the variant(s) beside LoRA and stores them in the adapter
        return get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                lora_dropout=config.lora_dropout,
                                                target_modules=list(config.lora_targets),
                                                modules_to_save=layer_attrs(model) if params else None))
    if not params:
        raise ConfigError(f"config field {prefix + 'trainable'!r}: variant {variant!r} adds no parameters; use "
                          "trainable: lora or full")
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return model


# -- checks before a run writes anything ----------------------------------------------------------------------------

def preflight(config) -> None:
    """What ``from_dict`` cannot check without reading the model's config or ``output_dir``: that ``layers`` fits
    the model, that an already patched checkpoint has the configured variant, that there is something to resume,
    and that the loss curve can be plotted. Recipes call it before :class:`Run` creates ``output_dir`` and before any
    weights load, so a bad config leaves nothing behind."""
    _check_model(config)
    _check_resume(config)
    try:
        pyplot()
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{exc} (the recipes write loss_curve.png)") from None


def _check_model(config: ModelFields) -> None:
    from patchattn.patching import parse_layers
    from patchattn.realweights import model_source, num_layers

    if config.model == "tiny-llama":
        n = {**TINY_LLAMA, **config.model_config}["num_hidden_layers"]
    elif model_source(config.model) == "shipped":
        n = num_layers(config.model)
    else:
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(os.path.expanduser(config.model))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config field 'model': cannot read the config of {config.model!r}: {exc}") from None
        spec = getattr(hf_config, "patchattn", None)
        if spec is not None:  # its layers are fixed; `layers` is not used
            names = [s["variant"] for s in ([spec] if isinstance(spec, dict) else spec)]
            if config.variant not in names:
                raise ConfigError(f"config field 'variant': {config.model} is already patched with "
                                  f"{names if len(names) > 1 else repr(names[0])}, got {config.variant!r}")
            return
        n = hf_config.get_text_config().num_hidden_layers
    try:
        parse_layers(config.layers, n)
    except ValueError as exc:
        raise ConfigError(f"config field 'layers' for {config.model} ({n} layers): {exc}") from None


def _check_resume(config: RunFields) -> None:
    out = Path(config.output_dir)
    if config.resume and (out / "summary.json").exists():
        raise ConfigError(f"config field 'resume': {out} holds a finished run (summary.json is written after final/), "
                          "so there is nothing to resume; to train again or for longer, use a new output_dir (with "
                          "resume: <one of this run's checkpoints> to start from it)")
    if isinstance(config.resume, str) and not (Path(config.resume) / "done").is_file():
        raise ConfigError(f"config field 'resume': {config.resume} is not a complete checkpoint (a "
                          "checkpoints/.../step_N directory holding a 'done' marker)")


def run_main(name: str, parse_args: Callable, main: Callable) -> None:
    """A recipe's command line: a ``ConfigError`` (unknown field, bad value, missing data file, ``layers`` that do not
    fit the model, ...) prints its message and exits with code 2."""
    try:
        main(parse_args())
    except ConfigError as exc:
        print(f"{name}: bad config: {exc}", file=sys.stderr)
        sys.exit(2)


# -- the run: accelerator, log, checkpoints -------------------------------------------------------------------------

class TrainState:
    """Saved with every checkpoint (accelerator.register_for_checkpointing): ``(stage, step)`` is the data
    position (``stage`` 0 for single-stage recipes); ``metrics`` holds what a resumed run cannot recompute, such as
    the held-out perplexity before training."""

    def __init__(self):
        self.stage, self.step = 0, 0
        self.metrics: dict[str, float] = {}

    def state_dict(self):
        return {"stage": self.stage, "step": self.step, "metrics": dict(self.metrics)}

    def load_state_dict(self, state):
        self.stage, self.step = int(state.get("stage", 0)), int(state["step"])
        self.metrics = dict(state.get("metrics", {}))  # checkpoints written before metrics existed have none


def checkpoint_position(path: Path) -> tuple[int, int]:
    """``(stage, step)`` of ``checkpoints/step_N`` (stage 0) or ``checkpoints/stage<k>/step_N``."""
    stage = int(path.parent.name[5:]) if path.parent.name.startswith("stage") else 0
    return stage, int(path.name.split("_")[1])


def last_checkpoint(output_dir: Path) -> Path | None:
    """The latest complete checkpoint (``done`` marker written after ``save_state`` returned) in ``output_dir``."""
    root = Path(output_dir) / "checkpoints"
    done = [p for p in [*root.glob("step_*"), *root.glob("stage*/step_*")] if (p / "done").exists()]
    return max(done, key=checkpoint_position, default=None)


def resume_checkpoint(config: RunFields) -> Path | None:
    """The checkpoint ``config.resume`` points at: the last complete one in ``output_dir`` (``true``), the given
    path, or None."""
    if not config.resume:
        return None
    return last_checkpoint(Path(config.output_dir)) if config.resume is True else Path(config.resume)


def _position(record: dict) -> tuple[int, int]:
    return record.get("stage", 0), record["step"]


class Run:
    """One recipe run: the accelerator, ``output_dir`` (``recipe.yaml``, ``log.jsonl``, checkpoints) and where to
    resume. The log is truncated to the resume checkpoint's position at start, so a resumed run continues it
    exactly where the checkpoint was taken."""

    def __init__(self, config: RunFields):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        # Without an accelerator, processes started by `accelerate launch --multi_gpu` / torchrun form a gloo CPU
        # group only when accelerate is told cpu=True (`accelerate launch --cpu` starts one process unless mpirun
        # runs it).
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
        set_seed(config.seed)
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self.log_path = self.output_dir / "log.jsonl"
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "recipe.yaml", "w", encoding="utf-8") as f:
                yaml.safe_dump(config.to_dict(), f, sort_keys=False)

        self.resume_from = resume_checkpoint(config)
        if config.resume and self.resume_from is None:
            self.print(f"resume: no checkpoint in {self.output_dir / 'checkpoints'}; starting from the beginning")
        self.records: list[dict] = []
        if self.resume_from is not None and self.log_path.exists():
            position = checkpoint_position(self.resume_from)
            with open(self.log_path, encoding="utf-8") as f:
                self.records = [r for r in map(json.loads, filter(str.strip, f)) if _position(r) <= position]
        if self.is_main:
            with open(self.log_path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def load_checkpoint(self, path: Path) -> None:
        """Restore model(s), optimizer(s), RNG states and ``(stage, step)`` from ``path``."""
        self.accelerator.load_state(str(path))
        self.print(f"resumed from {path} at {f'stage {self.state.stage} ' if self.state.stage else ''}"
                   f"step {self.state.step}")

    def save_checkpoint(self, path: Path) -> None:
        self.accelerator.save_state(str(path))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            (path / "done").touch()  # a kill during save_state leaves no "done": resume skips it

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.is_main:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# -- one optimisation stage -----------------------------------------------------------------------------------------

def batch_indices(step: int, micro: int, rank: int, world: int, stage: StageFields, seed: int, n: int) -> torch.Tensor:
    """Chunk indices of (optimizer step ``step`` (0-based), micro-batch, rank): a fixed permutation per epoch."""
    per_step = stage.batch_size * world * stage.grad_accum
    start = step * per_step + (micro * world + rank) * stage.batch_size
    out = []
    for g in range(start, start + stage.batch_size):
        epoch, pos = divmod(g, n)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=gen)[pos]))
    return torch.tensor(out)


def lr_at(step: int, stage: StageFields) -> float:
    """LR of optimizer step ``step`` (1-based): linear warmup, then cosine to ``min_lr_ratio * lr``."""
    if stage.warmup_steps and step <= stage.warmup_steps:
        return stage.lr * step / stage.warmup_steps
    span = max(stage.max_steps - stage.warmup_steps, 1)
    progress = min(max(step - stage.warmup_steps, 0) / span, 1.0)
    ratio = stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return stage.lr * ratio


@torch.no_grad()
def evaluate(model, eval_chunks: torch.Tensor, accelerator, batch_size: int) -> float:
    """Held-out perplexity ``exp(mean NLL)`` over non-overlapping ``seq_len`` windows, sharded over processes (every
    process runs the wrapped model, so this also works under FSDP)."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = eval_chunks[rank::world]
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    steps = math.ceil(math.ceil(len(eval_chunks) / world) / batch_size)  # same number of forwards on every rank
    for s in range(steps):
        x = mine[s * batch_size:(s + 1) * batch_size]
        if len(x) == 0:
            x, weight = eval_chunks[:1], 0.0  # keep collective ops in step (FSDP)
        else:
            weight = 1.0
        x = x.to(accelerator.device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += weight * loss.double()
        count += weight * x[:, 1:].numel()
    model.train()
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    return math.exp((nll / count).item())


@torch.no_grad()
def held_out_loss(model, eval_chunks: torch.Tensor, accelerator, batch_size: int, loss_fn: LossFn,
                  forward_context: Callable = nullcontext) -> float:
    """Mean of a training loss over the held-out chunks, sharded like :func:`evaluate`: the distillation losses
    (attention-transfer MSE, KL to the teacher) on a fixed set, free of the batch-to-batch noise of the train loss."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = eval_chunks[rank::world]
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    rows = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for s in range(math.ceil(math.ceil(len(eval_chunks) / world) / batch_size)):
        x = mine[s * batch_size:(s + 1) * batch_size]
        x, weight = (x, 1.0) if len(x) else (eval_chunks[:1], 0.0)
        with forward_context():
            loss, _ = loss_fn(model, x.to(accelerator.device))
        total += weight * loss.double() * len(x)
        rows += weight * len(x)
    model.train()
    total, rows = accelerator.reduce(total, "sum"), accelerator.reduce(rows, "sum")
    return (total / rows).item()


def _kill_step(name: str) -> int:
    tag, _, step = os.environ.get(KILL_ENV, "").rpartition(":")
    return int(step) if step and tag in ("", name) else 0


LossFn = Callable[[Any, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def train_steps(run: Run, model, optimizer, stage: StageFields, train_chunks: torch.Tensor, eval_chunks: torch.Tensor,
                loss_fn: LossFn, *, seed: int, name: str, checkpoints: Path, record_fields: dict | None = None,
                forward_context: Callable = nullcontext, eval_loss: bool = False) -> float | None:
    """Train from ``run.state.step`` to ``stage.max_steps``; returns the held-out perplexity of the last step.

    ``loss_fn(model, x)`` returns ``(loss to backpropagate, {metric: tensor})``; the metrics are averaged over
    micro-batches and processes into the log record ``{**record_fields, step, *metrics, lr, eval_ppl}``
    (``eval_loss`` adds the loss on the held-out chunks at evaluation steps, see :func:`held_out_loss`). Each
    micro-batch's forward *and* backward run inside ``forward_context()`` (activation checkpointing recomputes the
    forward during backward, so a mode such as attention transfer must still be on then)."""
    acc = run.accelerator
    from tqdm.auto import tqdm

    rank, world = acc.process_index, acc.num_processes
    kill_at = _kill_step(name)
    bar = tqdm(total=stage.max_steps, initial=run.state.step, desc=name, disable=not acc.is_local_main_process)
    eval_ppl = None
    while run.state.step < stage.max_steps:
        step = run.state.step + 1
        lr = lr_at(step, stage)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals: dict[str, torch.Tensor] = {}
        for micro in range(stage.grad_accum):
            x = train_chunks[batch_indices(run.state.step, micro, rank, world, stage, seed, len(train_chunks))]
            x = x.to(acc.device)
            sync = micro == stage.grad_accum - 1
            with (nullcontext() if sync else acc.no_sync(model)), forward_context():
                loss, metrics = loss_fn(model, x)
                acc.backward(loss / stage.grad_accum)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0) + value.detach().float() / stage.grad_accum
        if stage.max_grad_norm:  # the prepared model's parameters (FSDP replaces them)
            acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], stage.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.state.step = step
        means = {key: acc.reduce(value, "mean").item() for key, value in totals.items()}
        evals: dict = {"eval_ppl": None}
        if (stage.eval_every and step % stage.eval_every == 0) or step == stage.max_steps:
            evals["eval_ppl"] = evaluate(model, eval_chunks, acc, stage.batch_size)
            if eval_loss:
                evals["eval_loss"] = held_out_loss(model, eval_chunks, acc, stage.batch_size, loss_fn, forward_context)
        eval_ppl = evals["eval_ppl"]
        run.log({**(record_fields or {}), "step": step, **means, "lr": lr, **evals})
        bar.update(1)
        bar.set_postfix(**{k: f"{v:.4g}" for k, v in means.items()},
                        **{k: f"{v:.4g}" for k, v in evals.items() if v is not None})
        if run.config.log_every and (step % run.config.log_every == 0 or eval_ppl is not None):
            text = " ".join(f"{k} {v:.5g}" for k, v in {**means, **evals}.items() if v is not None)
            run.print(f"{name} step {step}/{stage.max_steps}: {text} lr {lr:.3g}")
        if stage.save_every and step % stage.save_every == 0 and step < stage.max_steps:
            run.save_checkpoint(checkpoints / f"step_{step}")
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return eval_ppl


def describe(run: Run, model, config, trainable: str, n_chunks: int) -> None:
    """One line: what is patched, what trains, how much data, how many processes."""
    import patchattn

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    layers = patchattn.patched_layers(run.accelerator.unwrap_model(model))  # PEFT forwards .config to the base
    run.print(f"model {config.model} + {config.variant} on layers {layers}; trainable {n_trainable:,} / {n_total:,} "
              f"parameters ({trainable}); {n_chunks} train chunks x {config.seq_len} tokens; "
              f"{run.accelerator.num_processes} process(es)")


# -- save -----------------------------------------------------------------------------------------------------------

def save_model(run: Run, model, tokenizer, directory: Path, *, merge_lora: bool = False):
    """``save_pretrained`` of the unwrapped patched model + tokenizer (a directory ``patchattn.from_pretrained``
    loads); returns the unwrapped model. ``merge_lora`` merges PEFT LoRA into the base weights first (the result
    needs no peft); otherwise the model is left as it was, so training can go on."""
    acc = run.accelerator
    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(model)  # gathers FSDP shards; on the main process only, under FSDP
    unwrapped = acc.unwrap_model(model)
    if merge_lora:
        unwrapped, state_dict = unwrapped.merge_and_unload(), None
    if run.is_main:
        if directory.exists():
            shutil.rmtree(directory)
        use_cache, unwrapped.config.use_cache = unwrapped.config.use_cache, True  # saved for inference
        unwrapped.save_pretrained(directory, state_dict=state_dict)
        unwrapped.config.use_cache = use_cache
        tokenizer.save_pretrained(directory)
    acc.wait_for_everyone()
    return unwrapped


def finish(model, gradient_checkpointing: bool):
    """Turn the trained model into an inference model (eval mode, KV cache on, no activation checkpointing)."""
    model.eval()
    model.config.use_cache = True
    if gradient_checkpointing:
        set_gradient_checkpointing(model, False)
    return model


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; matplotlib is the optional ``plot`` extra, so a missing one
    says how to install it (recipes call this before training, not after)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the loss-curve plot needs matplotlib: pip install 'patchattn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict], path: Path, title: str, stage_titles: dict[int, str] | None = None) -> None:
    """Training loss per step (and the held-out loss where logged) with held-out perplexity on a second axis; one
    panel per stage (``stage_titles``)."""
    plt = pyplot()

    stages = sorted({r.get("stage", 0) for r in records}) or [0]
    fig, axes = plt.subplots(1, len(stages), figsize=(7 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in records if r.get("stage", 0) == stage and r["step"] > 0]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
        held = [r for r in records if r.get("stage", 0) == stage and r.get("eval_loss") is not None]
        if held:
            ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "s--", label="held-out loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        evals = [r for r in records if r.get("stage", 0) == stage and r.get("eval_ppl") is not None]
        if evals:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], "o-", color="tab:red",
                     label="held-out ppl")
            ax2.set_ylabel("held-out perplexity")
            ax2.legend(loc="upper right")
        ax.legend(loc="upper left")
        ax.set_title((stage_titles or {}).get(stage, title))
    if stage_titles:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextmanager
def original_model(model):
    """Run ``model`` as the softmax model it was converted from, without a second copy of the weights.

    Every patched layer runs in attention-transfer mode, which returns the exact softmax attention of the same
    q/k/v (the variant's own output is computed too and discarded: a cost of the shared switch, small next to the
    rest of the forward), and PEFT adapters are disabled, so LoRA's deltas vanish: the frozen base weights plus
    exact attention *are* the original model. A base that itself trains (``trainable: full``) no longer is, so
    recipes must not use this as the teacher then."""
    from patchattn.distill import attention_transfer

    adapters = model.disable_adapter() if getattr(model, "peft_config", None) else nullcontext()
    with adapters, attention_transfer(model):
        yield model

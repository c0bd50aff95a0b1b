"""Recipe configs: the field groups (model + patch, data, one optimisation stage, what trains, the run) a recipe's
config inherits, their validation (every error names the field, nested ones as ``stage2.lr``), and loading them from
YAML and ``--field value`` overrides."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..fields import Fields, param

MIXED_PRECISION = (None, "no", "fp16", "bf16", "fp8")


class ConfigError(ValueError):
    """A bad recipe config; the message names the field."""


def field_error(name: str, message: str, value) -> ConfigError:
    """``config field 'name' <message>, got <value>``: every config error names its field."""
    return ConfigError(f"config field {name!r} {message}, got {value!r}")


#: the earlier name of :func:`patchattn.fields.param`, kept for configs written against it
option = param


@dataclasses.dataclass
class ConfigBase(Fields):
    """Loading and validation for every recipe config: fields declared with :func:`patchattn.fields.param` (the field
    system of variant parameters too), checked field by field; ``check`` adds cross-field rules."""

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
        self.check_fields(prefix)  # nested sub-configs were validated by their own from_dict
        self.check(prefix)

    def field_error(self, name: str, message: str, value) -> ConfigError:
        return field_error(name, message, value)

    def check(self, prefix: str) -> None:
        """Cross-field rules; groups that have some override this and call ``super().check(prefix)``."""


@dataclasses.dataclass
class ModelFields(ConfigBase):
    model: str = param("smollm2-135m", types=(str,))  # shipped name, local dir, Hub id, patched dir or "tiny-llama"
    model_config: dict = param(types=(dict,), factory=dict)  # tiny-llama only: LlamaConfig overrides
    tokenizer_vocab: int = param(512, low=1)  # tiny-llama only: word-level vocabulary size
    variant: str = param(None, types=(str,))  # required (no default variant): a name in patchattn.VARIANTS
    layers: Any = None  # None/"all", "last:N", "first:N" or a list of indices (checked by patch_model)
    variant_params: dict = param(types=(dict,), factory=dict)

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
    data_config: str | None = param(None, types=(str,), nullable=True)  # `datasets` config name
    data_split: str = param("train", types=(str,))
    text_field: str = param("text", types=(str,))  # JSONL / datasets column
    eval_fraction: float = param(0.05, low=0, high=1, low_open=True, high_open=True)
    eval_tokens: int = param(16384, low=1)  # held-out tokens scored per evaluation
    seq_len: int = param(512, low=2)

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

    batch_size: int = param(8, low=1)  # per process, per micro-batch
    grad_accum: int = param(1, low=1)  # micro-batches per optimizer step
    lr: float = param(1e-3, low=0, low_open=True)
    weight_decay: float = param(0.0, low=0)
    warmup_steps: int = param(0, low=0)
    min_lr_ratio: float = param(0.1, low=0, high=1)
    max_grad_norm: float = param(1.0, low=0)  # 0: no clipping
    max_steps: int = param(100, low=1)
    gradient_checkpointing: bool = param(False)
    eval_every: int = param(0, low=0)  # 0: only at the start and the end
    save_every: int = param(0, low=0)  # 0: no intermediate checkpoints


@dataclasses.dataclass
class TrainableFields(ConfigBase):
    trainable: str = param("variant", choices=("variant", "lora", "full"))
    lora_r: int = param(16, low=1)
    lora_alpha: int = param(32, low=1)
    lora_dropout: float = param(0.0, low=0, high=1, high_open=True)
    lora_targets: list = param(types=(list,), factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def check(self, prefix):
        super().check(prefix)
        if not self.lora_targets or not all(isinstance(t, str) for t in self.lora_targets):
            raise field_error(prefix + "lora_targets", "must be a non-empty list of module names", self.lora_targets)


@dataclasses.dataclass
class RunFields(ConfigBase):
    mixed_precision: str | None = param(None, types=(str,), nullable=True, choices=MIXED_PRECISION)
    resume: Any = param(False, types=(bool, str))  # true: the last complete checkpoint in output_dir; or a path
    output_dir: str = param("runs/train", types=(str,))
    seed: int = param(0)
    log_every: int = param(0, low=0)  # print a text line every N steps (0: the progress bar only)
    push_to_hub: str | None = param(None, types=(str,), nullable=True)  # Hub repo id

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


def run_main(name: str, parse_args: Callable, main: Callable) -> None:
    """A recipe's command line: a ``ConfigError`` (unknown field, bad value, missing data file, ``layers`` that do not
    fit the model, ...) prints its message and exits with code 2."""
    try:
        main(parse_args())
    except ConfigError as exc:
        print(f"{name}: bad config: {exc}", file=sys.stderr)
        sys.exit(2)

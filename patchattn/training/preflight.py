"""Checks before a run writes anything: what ``from_dict`` cannot check without reading the model's config or
``output_dir``."""
from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError, ModelFields, RunFields
from .model import TINY_LLAMA
from .plots import pyplot


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

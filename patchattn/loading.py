"""`patchattn.from_pretrained`: load a base or patched checkpoint (local dir or Hub repo) and re-apply its patch."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import cached_file

from .patching import LAYER_ATTR, patch_model
from .variants import get_variant

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")


def from_pretrained(path_or_repo: str, **kwargs):
    """Load with ``AutoModelForCausalLM`` (ChatGLM2 through patchattn's native port) and re-apply the patch spec
    recorded in config.json, including the weights of trainable variants. ``kwargs`` go to transformers."""
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path_or_repo, **hub_kwargs)
    spec = getattr(config, "patchattn", None)
    if spec is not None:
        del config.patchattn  # the base model is loaded first, then patched exactly as recorded
        kwargs.setdefault("attn_implementation", getattr(config, "_attn_implementation", None) or "sdpa")
    model = AutoModelForCausalLM.from_pretrained(path_or_repo, config=config, **kwargs)
    if spec is None:
        return model
    patch_model(model, spec["variant"], layers=spec["layers"], **spec["params"])
    if get_variant(spec["variant"]).trainable:
        _load_variant_weights(model, path_or_repo, hub_kwargs)
    return model


def _checkpoint_files(path_or_repo: str, hub_kwargs: dict) -> list[str]:
    index = cached_file(path_or_repo, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    if index is None:
        return [cached_file(path_or_repo, "model.safetensors", **hub_kwargs)]
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [cached_file(path_or_repo, shard, **hub_kwargs) for shard in shards]


def _load_variant_weights(model, path_or_repo: str, hub_kwargs: dict) -> None:
    """The base loader drops the variant's parameters as unexpected keys; load them now, strictly."""
    wanted = {k for k in model.state_dict() if f".{LAYER_ATTR}." in k}
    found: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path_or_repo, hub_kwargs):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    found[key] = f.get_tensor(key)
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"checkpoint {path_or_repo} lacks {len(missing)} variant weights (e.g. {missing[0]}); "
                         "it was saved before training the patched model or is truncated")
    model.load_state_dict(found, strict=False)

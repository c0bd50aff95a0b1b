"""`patchattn.from_pretrained`: load a base, patched or delta checkpoint (local dir or Hub repo) and re-apply its
patch."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import cached_file

from .patching import LAYER_ATTR, patch_model
from .variants import get_variant

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")
DELTA_FILE = "patchattn_delta.safetensors"


def from_pretrained(path_or_repo: str, **kwargs):
    """Load with ``AutoModelForCausalLM`` (ChatGLM2 through patchattn's native port) and re-apply the patch spec
    recorded in config.json, including the weights of trainable variants. ``kwargs`` go to transformers.

    A delta repo (``patchattn.push_to_hub(..., delta_only=True)``) records its base model and the base commit in
    the spec: the base is loaded at that commit with the delta repo's config, patched, then the delta is applied.
    """
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    revision = kwargs.get("revision")
    with hub_error_hints(path_or_repo, revision):
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path_or_repo, **hub_kwargs)
    spec = getattr(config, "patchattn", None)
    if spec is not None:
        del config.patchattn  # the base model is loaded first, then patched exactly as recorded
    delta = (spec or {}).get("delta")
    if delta is None:
        with hub_error_hints(path_or_repo, revision):
            model = AutoModelForCausalLM.from_pretrained(path_or_repo, config=config, **kwargs)
    else:
        base_kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "subfolder")}
        with hub_error_hints(delta["base_model"], delta["base_revision"], f"base model of {path_or_repo}"):
            model = AutoModelForCausalLM.from_pretrained(delta["base_model"], config=config,
                                                         revision=delta["base_revision"], **base_kwargs)
    if spec is None:
        return model
    patch_model(model, spec["variant"], layers=spec["layers"], **spec["params"])
    with hub_error_hints(path_or_repo, revision):
        if delta is not None:
            _load_delta(model, path_or_repo, delta["file"], hub_kwargs)
        elif get_variant(spec["variant"]).trainable:
            _load_variant_weights(model, path_or_repo, hub_kwargs)
    return model


_HINTS = {
    RepositoryNotFoundError: "patchattn: the {role} {repo!r} does not exist on {endpoint} or is private: check the id "
                             "(a local checkpoint must be an existing directory) and pass token= (or run `hf auth "
                             "login`) for a private repo.",
    RevisionNotFoundError: "patchattn: the {role} {repo!r} has no revision {revision!r}: pass an existing branch, tag "
                           "or commit sha (HfApi().list_repo_refs / list_repo_commits list them).",
    RemoteEntryNotFoundError: "patchattn: the {role} {repo!r} at revision {revision!r} lacks a file that loading "
                              "needs: it is not a patchattn upload, or it is incomplete; push it again with "
                              "patchattn.push_to_hub.",
}


@contextmanager
def hub_error_hints(repo: str, revision: str | None = None, role: str = "model repo"):
    """Re-raise a missing repo / revision / file as the huggingface_hub error (an ``OSError``, which transformers
    would otherwise flatten into a bare one) with a note saying what to check."""
    try:
        yield
    except OSError as e:
        error = e if isinstance(e, tuple(_HINTS)) else e.__cause__
        hint = next((h for cls, h in _HINTS.items() if isinstance(error, cls)), None)
        if hint is None:
            raise
        error.add_note(hint.format(role=role, repo=repo, revision=revision or "main", endpoint=constants.ENDPOINT))
        if error is e:
            raise
        raise error from None


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


def _load_delta(model, path_or_repo: str, filename: str, hub_kwargs: dict) -> None:
    """Put the delta on top of the patched base, refusing one that does not fit it."""
    if os.path.isdir(path_or_repo):
        file = os.path.join(path_or_repo, hub_kwargs.get("subfolder") or "", filename)
    else:
        file = hf_hub_download(path_or_repo, filename, **hub_kwargs)  # not cached_file: it hides EntryNotFound
    delta = load_file(file)
    state = model.state_dict()
    unknown = sorted(set(delta) - set(state))
    missing = sorted(k for k in state if f".{LAYER_ATTR}." in k and k not in delta)
    if unknown or missing:
        raise ValueError(f"the delta of {path_or_repo} does not fit its patched base model: {len(unknown)} unknown "
                         f"tensors {unknown[:3]}, {len(missing)} variant weights missing {missing[:3]}")
    model.load_state_dict(delta, strict=False)

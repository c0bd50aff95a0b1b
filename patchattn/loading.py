"""`patchattn.from_pretrained`: load a base, patched or delta checkpoint (local dir or Hub repo) with its patch."""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as transformers_logging

from .patching import LAYER_ATTR, patched_class, patched_config_class, read_specs, spec_delta

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")
DELTA_FILE = "patchattn_delta.safetensors"


def from_pretrained(path_or_repo: str, **kwargs):
    """Load a base, patched or delta checkpoint (local dir or Hub repo) with its patch applied; ``kwargs`` go to
    transformers' ``from_pretrained``.

    A checkpoint saved by this version loads as its patched class (``AutoModelForCausalLM`` does the same after
    ``import patchattn``), so the variant's weights load with the rest. One saved by patchattn 0.1 (a base
    ``model_type`` with a ``patchattn`` entry) is read as the patched class too. A delta repo
    (``patchattn.push_to_hub(..., delta_only=True)``) records its base model and commit: the base is loaded at that
    commit as the patched class, then the delta goes on top.
    """
    path_or_repo = os.fspath(path_or_repo)
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    revision = kwargs.get("revision")
    _check_local_path(path_or_repo)
    with hub_error_hints(path_or_repo, revision):
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path_or_repo, **hub_kwargs)
    specs = read_specs(config, source=f"{path_or_repo}/config.json")  # before any weight is read
    if specs is None:
        with hub_error_hints(path_or_repo, revision):
            return AutoModelForCausalLM.from_pretrained(path_or_repo, config=config, **kwargs)
    config = as_patched_config(config)
    model_class = patched_class(_causal_lm_class(config))
    delta = spec_delta(specs)
    if delta is None:
        with hub_error_hints(path_or_repo, revision):
            return model_class.from_pretrained(path_or_repo, config=config, **kwargs)
    # the loaded model is a whole model
    config.patchattn = [{k: v for k, v in spec.items() if k != "delta"} for spec in specs]
    base_kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "subfolder")}
    with hub_error_hints(delta["base_model"], delta["base_revision"], f"base model of {path_or_repo}"), \
            _quiet_missing_variant_weights():
        model = model_class.from_pretrained(delta["base_model"], config=config, revision=delta["base_revision"],
                                            **base_kwargs)
    with hub_error_hints(path_or_repo, revision):
        _load_delta(model, path_or_repo, delta["file"], hub_kwargs)
    return model


def as_patched_config(config):
    """``config`` as an instance of its patched config class (a patchattn 0.1 config keeps a base class)."""
    patched = patched_config_class(type(config))
    if type(config) is not patched:
        config = copy.deepcopy(config)
        config.__class__ = patched
    return config


def _causal_lm_class(config) -> type:
    base_config = next(c for c in type(config).__mro__ if c in MODEL_FOR_CAUSAL_LM_MAPPING)
    return MODEL_FOR_CAUSAL_LM_MAPPING[base_config]


def _check_local_path(path_or_repo: str) -> None:
    """A path that does not exist gets "no such directory", not the Hub's repo-id rules."""
    looks_local = path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(path_or_repo)):
        raise FileNotFoundError(f"no such directory: {path_or_repo!r} (a local checkpoint must be a directory written "
                                "by save_pretrained; a Hub model is given as 'owner/name')")


@contextmanager
def _quiet_missing_variant_weights():
    """A delta's base lacks the variant's weights by design (the delta brings them): keep transformers' report of
    missing keys out of the user's log for that one load."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


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


def _load_delta(model, path_or_repo: str, filename: str, hub_kwargs: dict) -> None:
    """Put the delta on top of the patched base, refusing one that does not fit it."""
    if os.path.isdir(path_or_repo):
        file = os.path.join(path_or_repo, hub_kwargs.get("subfolder") or "", filename)
    else:
        file = hf_hub_download(path_or_repo, filename, **hub_kwargs)  # not cached_file: it hides EntryNotFound
    delta = load_file(file)
    state = model.state_dict()
    unknown = sorted(set(delta) - set(state))
    missing = sorted(k for k in state if f".{LAYER_ATTR}" in k and k not in delta)  # patchattn_layer, _1, ...
    if unknown or missing:
        raise ValueError(f"the delta of {path_or_repo} does not fit its patched base model: {len(unknown)} unknown "
                         f"tensors {unknown[:3]}, {len(missing)} variant weights missing {missing[:3]}")
    model.load_state_dict(delta, strict=False)

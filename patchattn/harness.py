"""lm-evaluation-harness integration: the ``patchattn`` model of ``lm_eval``.

lm-eval finds models in its registry, by name; it has no plugin entry point for models from other packages, so the
name ``patchattn`` exists once this module is imported. Two ways in:

- the command line, ``python -m patchattn.harness`` (or ``patchattn-lm-eval``), which takes exactly the arguments
  of ``lm_eval``::

      python -m patchattn.harness --model patchattn --model_args pretrained=DIR_OR_REPO --tasks hellaswag

- Python::

      import lm_eval
      import patchattn.harness  # registers the model name
      lm_eval.simple_evaluate(model="patchattn", model_args="pretrained=DIR_OR_REPO", tasks=["hellaswag"])

``PatchattnLM`` is lm-eval's ``HFLM`` with the model loaded by :func:`patchattn.from_pretrained`, so checkpoints of
this version, of patchattn 0.1 and delta uploads all load with their patch (the ``hf`` model would load a 0.1
checkpoint without it and refuses a delta). Every ``hf`` model argument works as there. Three more patch an
unpatched model when it is loaded:

- ``variant``: a variant name (``patchattn list``);
- ``layers``: ``all`` (the default), ``last:N``, ``first:N``, or a list of indices (on the command line
  ``layers=[0,1,-1]``; from Python with ``model_args`` as a dict);
- ``param_<name>``: a parameter of the variant, e.g. ``param_min_seq_len=2048``.
"""
from __future__ import annotations

import sys

try:
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("patchattn.harness needs lm-evaluation-harness: pip install 'patchattn[eval]' "
                      "(or pip install lm-eval)") from e

from .loading import from_pretrained
from .patching import is_patched, patch_model, read_specs, spec_delta
from .variants import get_variant

MODEL_NAME = "patchattn"
PARAM_PREFIX = "param_"


def patch_args(variant: str | None, layers, kwargs: dict) -> dict | None:
    """Take the ``param_*`` entries out of ``kwargs`` and return ``patch_model``'s arguments (None: no patch),
    checked against the variant before any model loads."""
    params = {k[len(PARAM_PREFIX):]: kwargs.pop(k) for k in list(kwargs) if k.startswith(PARAM_PREFIX)}
    if variant is None:
        if params or layers is not None:
            given = ", ".join([*(f"{PARAM_PREFIX}{k}" for k in params), *(["layers"] if layers is not None else [])])
            raise ValueError(f"patchattn: {given} patch the model and need variant=<name> as well")
        return None
    if isinstance(layers, tuple):
        layers = list(layers)
    try:
        get_variant(variant).make_params(**params)
    except TypeError as e:  # an unknown parameter name
        raise ValueError(f"patchattn: {e}") from None
    return {"variant": variant, "layers": layers, **params}


class _Loader:
    """What HFLM calls ``AUTO_MODEL_CLASS``: ``from_pretrained`` through patchattn, then the on-the-fly patch."""

    def __init__(self, patch: dict | None):
        self.patch = patch

    def from_pretrained(self, pretrained, **kwargs):
        model = from_pretrained(pretrained, **kwargs)
        if self.patch is not None:
            _patch(model, self.patch)
        return model


def _patch(model, patch: dict) -> None:
    if is_patched(model):
        names = " + ".join(repr(spec["variant"]) for spec in model.config.patchattn)
        raise ValueError(f"patchattn: the model is already patched with {names}; "
                         f"drop variant={patch['variant']} (a patched checkpoint evaluates with its own patch)")
    patch = dict(patch)
    patch_model(model, patch.pop("variant"), layers=patch.pop("layers"), **patch)


class PatchattnLM(HFLM):
    """``HFLM`` for patchattn checkpoints (local dir or Hub repo; patched, patchattn 0.1 or delta), optionally
    patching an unpatched model on load (``variant``, ``layers``, ``param_<name>``: see the module docs)."""

    def __init__(self, pretrained, variant: str | None = None, layers=None, backend: str = "causal", **kwargs):
        if backend not in ("default", "causal"):
            raise ValueError(f"patchattn: backend={backend!r}: patchattn patches causal (decoder-only) models")
        self._patch = patch_args(variant, layers, kwargs)
        if self._patch is not None and not isinstance(pretrained, str):
            _patch(pretrained, self._patch)  # a model object is patched in place, as patch_model does
        super().__init__(pretrained, backend="causal", **kwargs)

    def _get_backend(self, config, backend="causal", trust_remote_code=False) -> None:
        # HFLM guesses the backend from transformers' name tables, which do not hold patchattn_* model types.
        self.backend = "causal"
        self.AUTO_MODEL_CLASS = _Loader(self._patch)

    def _create_tokenizer(self, pretrained, tokenizer, revision="main", subfolder="", **kwargs) -> None:
        try:
            super()._create_tokenizer(pretrained, tokenizer, revision=revision, subfolder=subfolder, **kwargs)
        except (OSError, ValueError, TypeError):
            # A delta upload made without tokenizer= has none: its base model's is the one it was trained with.
            delta = spec_delta(read_specs(self.config)) if isinstance(pretrained, str) else None
            if tokenizer or delta is None:
                raise
            super()._create_tokenizer(delta["base_model"], None, revision=delta["base_revision"], **kwargs)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        spec = getattr(self._model.config, "patchattn", None)
        if spec is not None:
            info["patchattn"] = [{k: v for k, v in s.items() if k != "delta"} for s in spec]
        return info


# A lazy "module:class" entry, the form lm-eval uses for its own models: registering it again (``python -m
# patchattn.harness`` runs this file as __main__, then lm-eval imports patchattn.harness) is a no-op, not a clash.
model_registry.register(MODEL_NAME, target="patchattn.harness:PatchattnLM")


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s own command line, with the ``patchattn`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


__all__ = ["PatchattnLM", "MODEL_NAME", "main"]

if __name__ == "__main__":
    main()

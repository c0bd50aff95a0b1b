"""The variant interface: one class per attention variant, one instance per patched layer.

A variant is an ``nn.Module`` attached to a patched attention module under ``patchattn_layer`` (so any parameters
it adds land in the model's state dict, and PEFT/FSDP see them as ordinary submodules). transformers calls
patchattn's dispatcher for every attention layer; the dispatcher hands patched layers to ``Variant.attention``.

Variants that change more than the attention function (gates, routers, new norms, their own KV cache) override
``attach``/``detach`` to modify the attention module and undo it exactly. Adding a variant is one new file in
``patchattn/variants/`` that subclasses ``Variant`` and is decorated with ``@register_variant``.

Variants compose (``patch_model`` on a patched model): ``role`` says what a variant changes and ``stacks_over``
which roles it may run over; on a layer with several, the outermost runs and reaches the next through
:meth:`Variant.inner_attention` (see :func:`composition_conflict`).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fields import Fields
from ..fields import param as param  # re-exported: variants declare their parameters with it

VARIANTS: dict[str, type[Variant]] = {}

_HANDOFF = "_patchattn_handoff"

#: submodule of a patched attention module holding the first variant patched on it (``patchattn_layer``); the
#: variants of later patches of the same model (a composition) are ``patchattn_layer_1``, ``patchattn_layer_2``, ...
LAYER_ATTR = "patchattn_layer"
#: attention module attribute: the names of its variant submodules in the order their ``attention`` runs (outermost
#: first), set by patching; each variant reaches the next one with :meth:`Variant.inner_attention`
STACK_ATTR = "_patchattn_stack"

# -- roles: what part of attention a variant changes, which decides what it can be combined with -----------------
#: changes the output or the scores of the attention under it (``gated``, ``affine``, ``act``): outermost
MODIFIER = "modifier"
#: owns the layer's KV-cache representation (``zipcache``, ``streaming``): between modifiers and prefill variants
KV_CACHE = "kv_cache"
#: approximates the long causal prefill and is exact elsewhere (``hyper``, ``dhsa``): innermost
PREFILL = "prefill"
#: replaces attention as a whole (``moh``, ``sigmoid``, the linear family, ``exact``): alone on its layers
REPLACEMENT = "replacement"
ROLE_LABELS = {MODIFIER: "output/score modifier", KV_CACHE: "KV-cache representation",
               PREFILL: "prefill approximation", REPLACEMENT: "whole-attention replacement"}
#: execution order on one layer: a variant's ``inner_attention`` is the next variant of a higher rank
ROLE_RANK = {MODIFIER: 0, KV_CACHE: 1, PREFILL: 2, REPLACEMENT: 3}


def composition_conflict(a: type[Variant], b: type[Variant]) -> str | None:
    """Why variants ``a`` and ``b`` cannot run on the same layer (None: they compose). Two variants of one role
    never do (a layer has one cache, one prefill method, ...); otherwise the outer one (lower rank) must list the
    inner one's role in its ``stacks_over``: that is its promise to compute its result from ``inner_attention``."""
    if a.role == b.role:
        return f"both are {ROLE_LABELS[a.role]}s, and a layer runs one"
    outer, inner = sorted((a, b), key=lambda v: ROLE_RANK[v.role])
    if REPLACEMENT in (a.role, b.role):
        replacement = a if a.role == REPLACEMENT else b
        return f"{replacement.name!r} replaces attention as a whole, so nothing runs with it on a layer"
    if inner.role not in outer.stacks_over:
        return (f"{outer.name!r} does not run over a {ROLE_LABELS[inner.role]} "
                f"({outer.name!r} composes over: {', '.join(ROLE_LABELS[r] for r in outer.stacks_over) or 'nothing'})")
    return None


def handoff(attention_module: nn.Module) -> dict[str, Any]:
    """Per-call values (captured hidden states, the cache layer of this step) handed to the variant of
    ``attention_module`` by hooks and cache layers.

    They live on the attention module, not on the variant instance: PEFT's ``modules_to_save`` runs a *copy* of the
    variant, and a copy must see what the hooks of the module captured for this call.
    """
    return attention_module.__dict__.setdefault(_HANDOFF, {})


def normalize_heads(heads, variant: str, name: str) -> dict[int, list[int]]:
    """A ``{layer: [head, ...]}`` parameter with int keys (JSON turns them into strings) and sorted unique
    non-negative heads; ``variant`` and ``name`` say whose parameter a bad value is in."""
    if heads is None:
        return {}
    if not isinstance(heads, dict):
        raise ValueError(f"{variant}: parameter {name!r} must be a dict {{layer: [head, ...]}}, got "
                         f"{type(heads).__name__}")
    out = {}
    for layer, indices in heads.items():
        if isinstance(layer, str) and layer.isdigit():
            layer = int(layer)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"{variant}: layer {layer!r} in {name!r} is not a non-negative layer index")
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
            raise ValueError(f"{variant}: {name}[{layer}] must be a list of head indices, got {indices!r}")
        for h in indices:
            if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                raise ValueError(f"{variant}: {name}[{layer}] contains {h!r}, not a non-negative head index")
        if indices:
            out[layer] = sorted(set(indices))
    return dict(sorted(out.items()))


def module_dims(module: nn.Module) -> tuple[int, int, int]:
    """``(num_heads, head_dim, hidden_size)`` of a transformers attention module (every supported family)."""
    config = module.config
    heads = getattr(module, "num_heads", None) or config.num_attention_heads
    return int(heads), int(module.head_dim), int(config.hidden_size)


def check_heads_fit(heads: dict[int, list[int]], attention_module: nn.Module, variant: str, name: str, *,
                    kv_heads: bool = False) -> None:
    """Raise if a normalised ``{layer: [head, ...]}`` names a layer or a (KV, with ``kv_heads``) head the model
    does not have; variants call it in ``attach``, so a failed patch leaves the model as it was."""
    config = attention_module.config
    num_layers = int(config.num_hidden_layers)
    num_heads = module_dims(attention_module)[0]
    if kv_heads:
        num_heads //= int(getattr(attention_module, "num_key_value_groups", 1))
    bad = [f"layer {layer}" for layer in heads if layer >= num_layers]
    bad += [f"head {h} of layer {layer}" for layer, hs in heads.items() for h in hs if h >= num_heads]
    if bad:
        kind = "KV heads" if kv_heads else "heads"
        raise ValueError(f"{variant}: {name} has {', '.join(bad)} out of range: this model has {num_layers} layers "
                         f"(0..{num_layers - 1}) of {num_heads} {kind} (0..{num_heads - 1})")


@dataclasses.dataclass
class VariantParams(Fields):
    """Base of every variant's parameter dataclass: fields declared with :func:`patchattn.fields.param` (the field
    system the training configs use too), checked by ``validate``; subclasses add cross-parameter rules by overriding
    ``validate`` and calling ``super().validate()``."""

    variant_name: ClassVar[str] = "variant"

    def validate(self) -> None:
        self.check_fields()

    def field_error(self, name: str, message: str, value) -> ValueError:
        return ValueError(f"{self.variant_name}: parameter {name!r} {message}, got {value!r}")


class Variant(nn.Module):
    """Base class; subclasses set the class attributes and implement ``attention``."""

    name: ClassVar[str]
    description: ClassVar[str]
    trainable: ClassVar[bool] = False
    Params: ClassVar[type[VariantParams]] = VariantParams
    #: model families this variant supports; None means every registered family
    families: ClassVar[tuple[str, ...] | None] = None
    #: the variant with default parameters needs nothing but the attention call (no parameters, cache layers or
    #: per-model setup), so it is also offered as ``attn_implementation="patchattn_<name>"``
    attention_function_only: ClassVar[bool] = False
    #: named parameter sets one argument away (``preset="paper"``); the defaults are the measured recommendation
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: what the variant changes (MODIFIER, KV_CACHE, PREFILL or REPLACEMENT): decides what it composes with
    role: ClassVar[str] = REPLACEMENT
    #: roles of the variants this one may run over on the same layer (see :func:`composition_conflict`): listing a
    #: role promises that ``attention`` computes its core attention with :meth:`inner_attention`
    stacks_over: ClassVar[tuple[str, ...]] = ()

    #: values for parameters a saved spec lacks because it predates them: what reproduces how it ran when it was saved
    #: (a new default applies to new patches only)
    legacy_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, params: VariantParams, layer_idx: int):
        super().__init__()
        self.params = params
        self.layer_idx = layer_idx
        #: set by :func:`patchattn.distill.attention_transfer`: the dispatcher then calls ``attention_transfer``
        self.transfer_mode = False
        self.transfer_loss: torch.Tensor | None = None

    @classmethod
    def make_params(cls, preset: str | None = None, **kwargs) -> VariantParams:
        """Validated parameters: the defaults (the measured recommendation), or a named ``preset`` (e.g.
        ``"paper"``: the published setting), with ``kwargs`` on top."""
        if preset is not None:
            if preset not in cls.presets:
                raise ValueError(f"{cls.name}: unknown preset {preset!r}; presets: {sorted(cls.presets) or 'none'}")
            kwargs = {**cls.presets[preset], **kwargs}
        known = {f.name for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"{cls.name}: unknown parameter(s) {unknown}; known parameters: {sorted(known)}")
        params = cls.Params(**kwargs)
        params.validate()
        return params

    def bind(self, attention_module: nn.Module) -> None:
        """Remember the attention module this layer serves (a weak reference: copies of the variant, e.g. PEFT's
        ``modules_to_save``, share it instead of copying the module)."""
        self.__dict__["_host"] = weakref.ref(attention_module)

    def __deepcopy__(self, memo):
        """A copy serves the copy of its attention module when that is copied too (``copy.deepcopy(model)``), and
        the same module otherwise (PEFT's ``modules_to_save`` copies just the variant)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name != "_host":
                new.__dict__[name] = copy.deepcopy(value, memo)
        ref = self.__dict__.get("_host")
        host = ref() if ref is not None else None
        if host is not None:
            new.__dict__["_host"] = weakref.ref(memo.get(id(host), host))
        return new

    @property
    def host(self) -> nn.Module:
        """The attention module this layer is attached to (see :meth:`bind`)."""
        ref = self.__dict__.get("_host")
        module = ref() if ref is not None else None
        if module is None:
            raise RuntimeError(f"{self.name}: layer {self.layer_idx} is not attached to an attention module")
        return module

    def attach(self, attention_module: nn.Module) -> None:
        """Modify the attention module beyond its attention function (default: nothing)."""

    def detach(self, attention_module: nn.Module) -> None:
        """Undo ``attach`` exactly."""

    def record_path(self, path: str) -> None:
        """Count which path a call took (``"approximate"``, ``"exact_short"``, ``"fallback"``, ...), so users and
        benchmarks can see whether the approximation ran (:func:`patchattn.attention_paths`)."""
        counts = self.__dict__.setdefault("path_counts", collections.Counter())
        counts[path] += 1

    def reset_buffers(self, attention_module: nn.Module) -> None:
        """Recompute the non-persistent buffers: checkpoints do not hold them, and ``from_pretrained`` builds the
        model on the meta device, so after loading they are placeholders (default: the variant has none)."""

    # -- training hooks: generic code (patchattn.training, the recipes) calls these through the registry,
    # ``get_variant(name).calibrate(...)``, and never needs to know which variant it trains

    @classmethod
    def prepare(cls, model: nn.Module, params: VariantParams, layers: list[int]) -> None:
        """Fill in parameters found on the model being patched (e.g. which heads to keep exact). ``patch_model``
        calls it before attaching and saves what it set in the spec, so loading a checkpoint never searches again.
        Default: nothing to find."""

    @classmethod
    def calibrate(cls, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Data-dependent initialisation of this variant's layers in ``model`` from one batch, run once on a freshly
        patched model before training (and before wrapping it for distributed training; the caller disables
        gradients). Default: nothing to calibrate."""

    @classmethod
    def auxiliary_loss(cls, model: nn.Module, weighted: bool = True) -> torch.Tensor | None:
        """A loss this variant's layers recorded in the last training forward of ``model``, to add to the task loss
        before ``backward`` (``weighted=False``: without the variant's own weight, for a caller that applies one).
        Default: None, the variant has none."""
        return None

    def make_cache_layer(self, default_layer):
        """This layer's entry in the generation cache (see patchattn.cache), or None to keep ``default_layer``."""
        return None

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        """Same contract as a transformers attention function: returns ``(out [b, q, h, d], weights | None)``."""
        raise NotImplementedError

    def inner_attention(self, module, query, key, value, attention_mask, **kwargs):
        """The attention this variant builds on: in a composition, the ``attention`` of the next variant patched on
        this layer (a modifier's gate multiplies what the cache variant under it returns, which runs the prefill
        approximation under it), else exact attention."""
        stack = module.__dict__.get(STACK_ATTR, ())
        for i, name in enumerate(stack[:-1]):
            layer = module._modules.get(name)
            if layer is not None and layer.name == self.name:
                return module._modules[stack[i + 1]].attention(module, query, key, value, attention_mask, **kwargs)
        from ..attention import exact_attention

        return exact_attention(module, query, key, value, attention_mask, **kwargs)

    def attention_transfer(self, module, query, key, value, attention_mask, **kwargs):
        """Attention transfer (stage 1 of distillation, as in LoLCATs): run this variant and the original softmax
        attention on the same inputs, record the MSE between their outputs in ``transfer_loss`` (summed over
        calls until :func:`patchattn.distill.attention_transfer_loss` takes it) and return the *teacher's* output,
        so every layer trains on the original model's activations."""
        from ..attention import exact_attention

        kwargs.pop("output_attentions", None)
        student, _ = self.attention(module, query, key, value, attention_mask, **kwargs)
        with torch.no_grad():
            teacher, _ = exact_attention(module, query, key, value, attention_mask, **kwargs)
        loss = F.mse_loss(student.float(), teacher.float())
        self.transfer_loss = loss if self.transfer_loss is None else self.transfer_loss + loss
        return teacher.to(student.dtype), None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.to_dict().items())


def register_variant(cls: type[Variant]) -> type[Variant]:
    if cls.name in VARIANTS:
        raise ValueError(f"variant {cls.name!r} is registered twice")
    if cls.role not in ROLE_RANK:
        raise ValueError(f"variant {cls.name!r} has role {cls.role!r}; roles: {sorted(ROLE_RANK)}")
    cls.Params.variant_name = cls.name
    VARIANTS[cls.name] = cls
    return cls


def get_variant(name: str) -> type[Variant]:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known variants: {sorted(VARIANTS)}") from None


def describe_params(cls: type[Variant]) -> dict[str, dict[str, Any]]:
    out = {}
    for f in dataclasses.fields(cls.Params):
        meta = f.metadata
        rng = meta.get("choices") or (meta.get("low"), meta.get("high"))
        out[f.name] = {"default": f.default, "range": rng, "help": meta.get("help", "")}
    return out

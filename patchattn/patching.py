"""patch_model / unpatch_model, the patched model classes, and the attention dispatcher transformers calls.

How a patch works: every attention module of a patched model calls the ``"patchattn"`` attention function (set
through ``model.set_attn_implementation``). Patched layers carry their variant as the submodule
``patchattn_layer``; the dispatcher hands those layers to the variant and runs exact attention, with the backend
the model was loaded with, for the rest.

A patched model is an instance of a patched class (``PatchattnLlamaForCausalLM`` subclasses
``LlamaForCausalLM``) with its own config of a patched config class (``model_type="patchattn_llama"``) that holds
the patch spec under ``config.patchattn``. So:

- ``save_pretrained`` writes a config.json that plain transformers refuses ("model type `patchattn_llama` ... not
  recognised") instead of silently running the original model; after ``import patchattn`` the Auto classes
  build the patched class, whose ``__init__`` attaches the variant, so its weights load like any other.
- the record belongs to the model: ``patch_model`` gives the model a copy of its config (transformers 5 shares one
  config object between models built from it), and ``unpatch_model`` another, so patching or unpatching one model
  never changes another.
- ``is_patched(model)`` is true exactly when the variant runs.

Composition: ``patch_model`` on a patched model adds a variant (``config.patchattn`` is the ordered list of the
patches, one spec each). Each variant has a role (``Variant.role``: output/score modifier, KV-cache representation,
prefill approximation, whole-attention replacement); on a layer patched by several, the dispatcher calls the
outermost (modifier, then cache, then prefill) and each reaches the one under it with ``Variant.inner_attention``.
Variants that cannot share a layer (``variants.composition_conflict``) are refused with a ``ValueError`` naming
both and their roles. The variant of the i-th patch lives under ``patchattn_layer`` (i = 0) or
``patchattn_layer_<i>``.

The same name is registered with ``AttentionMaskInterface`` (sdpa's mask maker): without it transformers hands a
custom attention function ``attention_mask=None`` and sliding windows and padding are silently lost.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch.nn as nn
from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from ._version import __version__
from .attention import EXACT_BACKEND_ATTR, exact_attention, exact_backend
from .cache import PatchattnCache, build_cache
from .capture import active_capture
from .families import Family, family_for_model_type, supported_model_types
from .variants import ROLE_LABELS, VARIANTS, Variant, composition_conflict, get_variant
from .variants.base import LAYER_ATTR, ROLE_RANK, STACK_ATTR

IMPLEMENTATION = "patchattn"
MODEL_TYPE_PREFIX = "patchattn_"
_SPEC_KEYS = ("variant", "layers", "params", "family")


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    capture = active_capture()
    if capture is not None:  # a measurement of the model's own attention inputs (patchattn.capture)
        return capture(module, query, key, value, attention_mask, **kwargs)
    stack = module.__dict__.get(STACK_ATTR)
    if not stack:
        return exact_attention(module, query, key, value, attention_mask, **kwargs)
    layer = module._modules[stack[0]]  # the outermost; it calls the next with ``inner_attention``
    if layer.transfer_mode:
        return layer.attention_transfer(module, query, key, value, attention_mask, **kwargs)
    return layer.attention(module, query, key, value, attention_mask, **kwargs)


def _fixed_variant_function(cls: type[Variant]):
    """Attention function for ``attn_implementation="patchattn_<name>"``: the variant with default parameters on
    every layer, created lazily per attention module (parameter-free variants only)."""
    params = cls.make_params()

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = module.__dict__.get("_patchattn_fixed_" + cls.name)
        if layer is None:
            layer = cls(params, layer_idx=getattr(module, "layer_idx", 0))
            layer.bind(module)
            module.__dict__["_patchattn_fixed_" + cls.name] = layer
        return layer.attention(module, query, key, value, attention_mask, **kwargs)

    return attention


def register_attention_functions() -> None:
    """Register ``patchattn`` and ``patchattn_<variant>`` with transformers: the latter for the training-free
    variants that need nothing beyond the attention call (no cache layers, no per-model setup)."""
    AttentionInterface.register(IMPLEMENTATION, _dispatch)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    for name, cls in VARIANTS.items():
        if cls.attention_function_only:
            AttentionInterface.register(f"{IMPLEMENTATION}_{name}", _fixed_variant_function(cls))
            AttentionMaskInterface.register(f"{IMPLEMENTATION}_{name}", sdpa_mask)


def resolve_family(model: nn.Module) -> Family:
    """The model's family, or an error that says what is supported and how to get there."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"patch_model expects a transformers PreTrainedModel, got {type(model).__name__}")
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise ValueError("this is a PEFT model: patch the transformers model before wrapping it — "
                         "patchattn.patch_model(model, ...) first, then get_peft_model(model, LoraConfig(..., "
                         f"modules_to_save=[{LAYER_ATTR!r}]))")
    if type(model).__module__.startswith("transformers_modules"):
        if getattr(config, "model_type", None) == "chatglm":
            raise ValueError(
                "this ChatGLM model was loaded with trust_remote_code (the original remote code, which does not run "
                "on transformers 5). Load the checkpoint with patchattn's native port instead: "
                "`patchattn.from_pretrained(path)` (or `patchattn convert` on the command line)."
            )
        raise ValueError(f"{type(model).__name__} is remote code; patchattn supports native transformers models "
                         f"of the families: {', '.join(supported_model_types())}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{config.model_type} is an encoder-decoder model; patchattn patches causal decoder-only "
                         f"language models ({', '.join(supported_model_types())})")
    family = family_for_model_type(base_model_type(getattr(config, "model_type", "")))
    if family is None:
        raise ValueError(f"unsupported model type {getattr(config, 'model_type', None)!r}; supported model types: "
                         f"{', '.join(supported_model_types())}")
    return family


def base_model_type(model_type: str) -> str:
    return model_type[len(MODEL_TYPE_PREFIX):] if model_type.startswith(MODEL_TYPE_PREFIX) else model_type


def parse_layers(layers: Any, num_layers: int) -> list[int]:
    """``None``/"all", "last:N", "first:N", or an iterable of (possibly negative) indices → sorted indices."""
    if layers is None or layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        kind, _, count = layers.partition(":")
        if kind in ("last", "first") and count.isdigit():
            n = int(count)
            if not 1 <= n <= num_layers:
                raise ValueError(f"layers={layers!r}: N must be in [1, {num_layers}] for this {num_layers}-layer model")
            return list(range(num_layers - n, num_layers)) if kind == "last" else list(range(n))
        raise ValueError(f"layers={layers!r} is not understood; use None/'all', 'last:N', 'first:N' or a list of "
                         "layer indices")
    indices = []
    for i in layers if isinstance(layers, Iterable) else [layers]:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layer index {i!r} is not an integer")
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layer index {i} is out of range for a model with {num_layers} layers "
                             f"(valid: 0..{num_layers - 1} or negative from the end)")
        indices.append(i % num_layers)
    if not indices:
        raise ValueError("layers is empty; pass None to patch every layer")
    return sorted(set(indices))


# -- the patch spec ------------------------------------------------------------------------------------------------

def read_specs(config, source: str = "config") -> list[dict] | None:
    """The patch specs recorded in ``config``, in patch order (None if there are none), checked before any weight
    is loaded: a corrupt spec gets an error naming the field and the fix instead of a ``KeyError`` after the model
    loaded, and a combination that cannot run is refused. A single spec object (what patchattn wrote before
    compositions) reads as a list of one."""
    record = getattr(config, "patchattn", None)
    if record is None:
        return None
    entries = [record] if isinstance(record, dict) else record
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: the patchattn spec must be a non-empty list of objects with {list(_SPEC_KEYS)}, "
                         f"got {record!r}; re-save the model with patchattn (patch_model + save_pretrained, or "
                         "`patchattn convert`)")
    specs = []
    for i, spec in enumerate(entries):
        spec = _read_one_spec(spec, f"{source}: the patchattn spec" + (f" #{i}" if len(entries) > 1 else ""))
        _check_composition(specs, spec)
        specs.append(spec)
    return specs


def spec_delta(specs: list[dict] | None) -> dict | None:
    """The delta record of a delta upload (kept on the first spec), or None."""
    return (specs or [{}])[0].get("delta")


def _read_one_spec(spec, where: str) -> dict:
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object with {list(_SPEC_KEYS)}, got {type(spec).__name__}; re-save the "
                         "model with patchattn (patch_model + save_pretrained, or `patchattn convert`)")
    missing = [k for k in ("variant", "layers", "params") if k not in spec]
    if missing:
        raise ValueError(f"{where} lacks {missing}; re-save the model with patchattn")
    cls = get_variant(spec["variant"])
    layers = spec["layers"]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"{where}: 'layers' must be a list of layer indices, got {layers!r}")
    if not isinstance(spec["params"], dict):
        raise ValueError(f"{where}: 'params' must be an object, got {spec['params']!r}")
    try:
        params = cls.make_params(**{**cls.legacy_defaults, **spec["params"]})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} has invalid parameters: {e}") from None
    return {**spec, "params": params.to_dict()}  # normalised as patch_model records them (JSON made keys strings)


def _check_composition(specs: list[dict], new: dict) -> None:
    """Refuse adding ``new`` to the patches ``specs``: the same variant twice, or variants that cannot share the
    layers they have in common (``composition_conflict``)."""
    cls = get_variant(new["variant"])
    for spec in specs:
        if spec["variant"] == cls.name:
            raise ValueError(f"model is already patched with {cls.name!r}; call patchattn.unpatch_model(model, "
                             f"{cls.name!r}) first to patch it again (other layers or parameters)")
        other = get_variant(spec["variant"])
        shared = sorted(set(spec["layers"]) & set(new["layers"]))
        reason = composition_conflict(other, cls) if shared else None
        if reason is not None:
            raise ValueError(f"cannot combine {cls.name!r} ({ROLE_LABELS[cls.role]}) with {other.name!r} "
                             f"({ROLE_LABELS[other.role]}), already patched on layers {shared}: {reason}. Patch them "
                             f"on different layers, or call patchattn.unpatch_model(model, {other.name!r}) first")


# -- attaching and detaching the variant layers --------------------------------------------------------------------

def layer_attr(index: int) -> str:
    """The submodule name of the variant of the ``index``-th patch of a model."""
    return LAYER_ATTR if index == 0 else f"{LAYER_ATTR}_{index}"


def layer_attrs(model: nn.Module) -> list[str]:
    """The submodule names of the variants of ``model``'s patches (``["patchattn_layer"]`` for one variant): what
    PEFT's ``modules_to_save`` needs to train them beside LoRA."""
    return [layer_attr(i) for i in range(len(patch_specs(model)))]


def _variant_stacks(model: nn.Module) -> dict[int, list[nn.Module]]:
    """Per patched layer, its variants in the order their ``attention`` runs (outermost first)."""
    family = resolve_family(model)
    return {i: [m._modules[name] for name in m.__dict__[STACK_ATTR]]
            for i, m in enumerate(family.attention_modules(model)) if m.__dict__.get(STACK_ATTR)}


def _update_stacks(model: nn.Module, family: Family, specs: list[dict]) -> None:
    """Record on every attention module which variants run there and in which order (role rank, then patch
    order); modules without one lose the record."""
    ranks = [ROLE_RANK[get_variant(spec["variant"]).role] for spec in specs]
    for i, module in enumerate(family.attention_modules(model)):
        names = [layer_attr(j) for j in sorted(range(len(specs)), key=lambda j: ranks[j])
                 if i in specs[j]["layers"] and layer_attr(j) in module._modules]
        if names:
            module.__dict__[STACK_ATTR] = tuple(names)
        else:
            module.__dict__.pop(STACK_ATTR, None)


def _attach(model: nn.Module, family: Family, spec: dict, index: int = 0) -> None:
    """Create and attach the variant on ``spec['layers']`` as the ``index``-th patch; on any failure, every layer
    attached so far is detached again, so a failed patch leaves the model as it was."""
    cls = get_variant(spec["variant"])
    params = cls.make_params(**spec["params"])
    modules = family.attention_modules(model)
    indices = parse_layers(spec["layers"], len(modules))
    attr = layer_attr(index)
    attached: list[tuple[nn.Module, Variant]] = []
    try:
        for i in indices:
            module = modules[i]
            layer = cls(params, layer_idx=i)
            ref = next(module.parameters(), None)
            if ref is not None:
                layer.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            module.add_module(attr, layer)
            attached.append((module, layer))
            layer.bind(module)
            layer.attach(module)
    except BaseException:
        for module, layer in reversed(attached):
            try:
                layer.detach(module)
            finally:
                module._modules.pop(attr, None)
        raise


def _detach(model: nn.Module, family: Family, count: int, index: int | None = None) -> None:
    """Detach the variants of all ``count`` patches (``index`` None), or of the ``index``-th one; the variants of
    later patches move up one name, so the model is the one patched with the others alone."""
    for module in family.attention_modules(model):
        for j in range(count) if index is None else [index]:
            layer = module._modules.get(layer_attr(j))
            if layer is not None:
                layer.detach(module)
                del module._modules[layer_attr(j)]
        if index is not None:
            for j in range(index + 1, count):
                layer = module._modules.pop(layer_attr(j), None)
                if layer is not None:
                    module._modules[layer_attr(j - 1)] = layer
        if index is None:
            module.__dict__.pop(STACK_ATTR, None)


_REQUESTED_ATTR = "_patchattn_requested_implementation"


def _set_exact_backend(model: nn.Module, family: Family, implementation: str | None) -> None:
    """Record the implementation the user asked for (``unpatch_model`` restores it) and the backend exact layers
    run for it (see ``attention.exact_backend``) on every attention module."""
    implementation = implementation or "sdpa"
    model.__dict__[_REQUESTED_ATTR] = implementation
    backend = exact_backend(implementation)
    for module in family.attention_modules(model):
        module.__dict__[EXACT_BACKEND_ATTR] = backend


# -- patched classes -----------------------------------------------------------------------------------------------

class PatchedModel:
    """Mixin of every patched model class (``Patchattn<Base>``, built by :func:`patched_class`).

    Constructing one (``from_pretrained``, ``from_config``, ``cls(config)``) builds the base model and then
    attaches the variant recorded in ``config.patchattn``, so a checkpoint's variant weights load like any other.
    """

    def __init__(self, config, *args, **kwargs):
        specs = read_specs(config)
        if specs is None:
            raise ValueError(f"{type(self).__name__} needs a config with a patchattn spec; use patchattn.patch_model "
                             "on an unpatched model instead")
        super().__init__(config, *args, **kwargs)
        self.config.patchattn = specs
        family = resolve_family(self)
        for index, spec in enumerate(specs):
            _attach(self, family, spec, index)
        _update_stacks(self, family, specs)
        _set_exact_backend(self, family, self.config._attn_implementation)
        _base_set_attn_implementation(self, IMPLEMENTATION)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        config = kwargs.get("config")
        if isinstance(config, PretrainedConfig) and spec_delta(read_specs(config)):
            path = str(pretrained_model_name_or_path)
            raise ValueError(f"{path} is a delta upload (only the tensors that differ from its base model): load it "
                             f"with patchattn.from_pretrained({path!r})")
        result = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        for stack in _variant_stacks(model).values():
            for layer in stack:
                layer.reset_buffers(layer.host)
        return result

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return _base_class(cls)._can_set_attn_implementation()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return _base_class(cls)._can_set_experts_implementation()

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Patched layers keep running the variant: a new implementation becomes the backend of the exact layers
        (``"sdpa"``, ``"eager"``, ...). ``unpatch_model`` first to run the original attention everywhere."""
        if not isinstance(attn_implementation, str) or attn_implementation == IMPLEMENTATION:
            return super().set_attn_implementation(attn_implementation, *args, **kwargs)
        checked = self._check_and_adjust_attn_implementation(attn_implementation, is_init_check=False)
        _set_exact_backend(self, resolve_family(self), checked)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Replace the DynamicCache generate builds by one whose patched layers are the variants' own cache layers
        (quantised KV, recurrent states); a cache the user passes is left alone."""
        before = {key: model_kwargs.get(key) for key in ("cache", "past_key_values")}
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for key, previous in before.items():
            made = model_kwargs.get(key)
            if made is not previous and type(made) is DynamicCache:
                model_kwargs[key] = build_cache(_variant_stacks(self), made)
        return result

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, then remove what a previous save into the same folder left behind
        (a stale ``model.safetensors.index.json`` next to a new single file, or a stale single file next to new
        shards): loaders would otherwise read the old weights, or a mix of old and new."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        remove_stale_weights(str(save_directory))
        return result


def remove_stale_weights(directory: str) -> None:
    """After a save: keep the weights layout it wrote (sharded with an index, or one file), remove the other."""
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if not (os.path.isfile(index) and os.path.isfile(single)):
        return
    with open(index) as f:
        shards = set(json.load(f).get("weight_map", {}).values())
    sharded_is_new = bool(shards) and all(os.path.isfile(os.path.join(directory, s)) for s in shards)
    os.remove(single if sharded_is_new else index)


def _base_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if c is not cls and not issubclass(c, PatchedModel))


def _base_set_attn_implementation(model: nn.Module, implementation: str) -> None:
    _base_class(type(model)).set_attn_implementation(model, implementation)


_PATCHED_CONFIGS: dict[type, type] = {}
_PATCHED_MODELS: dict[type, type] = {}


def patched_config_class(base: type) -> type:
    """``Patchattn<Base>Config`` with ``model_type = "patchattn_<base model_type>"`` (created once)."""
    if issubclass(base, tuple(_PATCHED_CONFIGS.values()) or ()):
        return base
    cls = _PATCHED_CONFIGS.get(base)
    if cls is None:
        name = f"Patchattn{base.__name__}"
        cls = type(name, (base,), {"model_type": MODEL_TYPE_PREFIX + base.model_type, "__module__": __name__,
                                   "__doc__": f"{base.__name__} of a model patched by patchattn (spec in .patchattn)"})
        globals()[name] = cls  # importable by name, so configs pickle
        _PATCHED_CONFIGS[base] = cls
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
    return cls


def patched_class(base: type) -> type:
    """``Patchattn<Base>``: the patched twin of the model class ``base`` (created once)."""
    if issubclass(base, PatchedModel):
        return base
    cls = _PATCHED_MODELS.get(base)
    if cls is None:
        name = f"Patchattn{base.__name__}"
        cls = type(name, (PatchedModel, base), {"__module__": __name__, "config_class": patched_config_class(
            base.config_class), "__doc__": f"{base.__name__} with patchattn attention (see patchattn.patching)"})
        globals()[name] = cls
        _PATCHED_MODELS[base] = cls
    return cls


def register_auto_classes() -> None:
    """Map every ``patchattn_<model type>`` to the patched twins of the classes the Auto classes build for the base
    type, so ``AutoModelForCausalLM.from_pretrained`` loads a patched checkpoint as the patched model."""
    for model_type in supported_model_types():
        if model_type not in CONFIG_MAPPING:  # a family newer than the installed transformers
            continue
        config_cls = CONFIG_MAPPING[model_type]  # (the lazy mappings support `in` and `[]`, not `.get`)
        patched_config = patched_config_class(config_cls)
        for auto, mapping in ((AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING), (AutoModel, MODEL_MAPPING)):
            if config_cls in mapping:
                auto.register(patched_config, patched_class(mapping[config_cls]), exist_ok=True)


def config_copy(config, config_class: type, spec: dict | None, memo: dict | None = None):
    """A deep copy of ``config`` as an instance of ``config_class`` carrying ``spec`` (None: no spec)."""
    new = copy.deepcopy(config, memo if memo is not None else {})
    new.__class__ = config_class
    if spec is None:
        new.__dict__.pop("patchattn", None)
    else:
        new.patchattn = spec
    return new


def unpatched_config(config):
    """A copy of a patched model's config as its base config class, without the spec."""
    base = next(c for c in type(config).__mro__ if c not in _PATCHED_CONFIGS.values())
    return config_copy(config, base, None)


def _replace_config(model: nn.Module, config_class: type, spec: dict | None) -> None:
    """Give ``model`` its own deep copy of its config (class ``config_class``, patch spec ``spec``), and point every
    submodule that held the old config or one of its sub-configs at the copy."""
    memo: dict[int, Any] = {}
    old = model.config
    memo[id(old)] = config_copy(old, config_class, spec, memo)
    for module in model.modules():
        held = module.__dict__.get("config")
        if held is not None and id(held) in memo:
            module.config = memo[id(held)]


# -- the public API ------------------------------------------------------------------------------------------------

def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a PEFT model wraps) runs a patchattn variant."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        model = get_base()
    return isinstance(model, PatchedModel)


def patch_model(model: nn.Module, variant: str, *, layers=None, **params) -> nn.Module:
    """Patch ``model`` in place with ``variant`` on ``layers`` and return it.

    On an already patched model the new variant composes with the others (``config.patchattn`` lists the patches in
    order): e.g. a prefill approximation on ``"last:16"``, then a KV-cache variant on all layers. A variant that
    cannot share a layer with one already there (see ``Variant.role``), or the same variant twice, raises a
    ``ValueError`` naming both; ``unpatch_model(model, name)`` removes one. Everything is checked before the model
    changes, and a failure while attaching leaves it as it was.
    """
    family = resolve_family(model)
    cls = get_variant(variant)
    if cls.families is not None and family.name not in cls.families:
        raise ValueError(f"variant {variant!r} supports the families {list(cls.families)}, not {family.name!r}")
    existing = list(model.config.patchattn) if is_patched(model) else []
    variant_params = cls.make_params(**params)
    modules = family.attention_modules(model)
    if not all(getattr(m, "is_causal", True) for m in modules):
        raise ValueError("patchattn patches causal (decoder) attention; this model has non-causal attention layers")
    spec = {
        "variant": cls.name,
        "layers": parse_layers(layers, len(modules)),
        "params": variant_params.to_dict(),
        "family": family.name,
        "patchattn_version": __version__,
    }
    _check_composition(existing, spec)
    cls.prepare(model, variant_params, spec["layers"])  # may run the model: after every check
    spec["params"] = variant_params.to_dict()
    if existing:
        _attach(model, family, spec, len(existing))
        specs = existing + [spec]
        _replace_config(model, type(model.config), specs)
        _update_stacks(model, family, specs)
        return model
    model_class = patched_class(type(model))
    _attach(model, family, spec)
    _update_stacks(model, family, [spec])
    implementation = model.config._attn_implementation
    _replace_config(model, patched_config_class(type(model.config)), [spec])
    model.__class__ = model_class
    _set_exact_backend(model, family, implementation)
    _base_set_attn_implementation(model, IMPLEMENTATION)
    return model


def unpatch_model(model: nn.Module, variant: str | None = None) -> nn.Module:
    """Remove the patch: the original modules, class, config class and attention implementation come back (the
    config as a copy owned by this model, without the spec). With ``variant``, remove just that variant of a
    composition: the model is then the one patched with the others alone."""
    if not is_patched(model):
        raise ValueError("model is not patched by patchattn")
    family = resolve_family(model)
    specs = list(model.config.patchattn)
    if variant is not None:
        names = [spec["variant"] for spec in specs]
        if variant not in names:
            raise ValueError(f"model is not patched with {variant!r}; its patches: {names}")
        if len(specs) > 1:
            index = names.index(variant)
            _detach(model, family, len(specs), index)
            specs.pop(index)
            _replace_config(model, type(model.config), specs)
            _update_stacks(model, family, specs)
            return model
    _detach(model, family, len(specs))
    for module in family.attention_modules(model):
        module.__dict__.pop(EXACT_BACKEND_ATTR, None)
    implementation = model.__dict__.pop(_REQUESTED_ATTR, "sdpa")
    _replace_config(model, type(unpatched_config(model.config)), None)
    model.__class__ = _base_class(type(model))
    model.set_attn_implementation(implementation)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, variant: str, *, layers=None, **params) -> Iterator[nn.Module]:
    """Context manager: ``patch_model`` on enter (same arguments, same refusal of an already patched model),
    ``unpatch_model`` on exit, also when the body raises; yields the patched model.

        with patchattn.patched(model, variant_name, layers="last:8") as m:
            logits = m(input_ids).logits
    """
    if is_patched(model):
        names = [spec["variant"] for spec in model.config.patchattn]
        raise ValueError(f"model is already patched with {names}; patched() patches an unpatched model (call "
                         "patchattn.patch_model to combine variants)")
    patch_model(model, variant, layers=layers, **params)
    try:
        yield model
    finally:
        unpatch_model(model)


def attention_paths(model: nn.Module, reset: bool = False) -> dict[int, dict[str, int]]:
    """Per patched layer, how many attention calls took each path since the last reset: ``approximate`` (the
    variant's method ran), ``exact_short`` / ``exact_decode`` / ``exact_crossover`` (exact by design: short input,
    decode step, below the measured speed crossover, every KV head of the layer an exact retrieval head:
    ``exact_retrieval``) or ``fallback`` (a case the method does not cover). A result
    credited to an approximation should show ``approximate`` calls."""
    paths = {}
    for i, stack in _variant_stacks(model).items():
        paths[i] = {}
        for layer in stack:  # in a composition, the paths of the variants that record them (the prefill method's)
            counts = layer.__dict__.get("path_counts")
            for path, n in (counts or {}).items():
                paths[i][path] = paths[i].get(path, 0) + n
            if reset and counts is not None:
                counts.clear()
    return paths


def generation_cache(model: nn.Module) -> PatchattnCache:
    """The cache ``generate()`` would build for a patched model, for direct ``model(..., past_key_values=cache)``
    calls (chunked prefill, teacher-forced evaluation): a ``DynamicCache`` for the model's config whose patched
    layers are replaced by the variants' own cache layers (``Variant.make_cache_layer``; a variant without one keeps
    the default layer)."""
    if not is_patched(model):
        raise ValueError("model is not patched by patchattn; call patchattn.patch_model(model, ...) first")
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        model = get_base()
    return build_cache(_variant_stacks(model), DynamicCache(config=model.config))


def patched_layers(model: nn.Module) -> list[int]:
    """The layers any variant runs on (sorted)."""
    if not is_patched(model):
        return []
    return sorted({i for spec in model.config.patchattn for i in spec["layers"]})


def patch_specs(model: nn.Module) -> list[dict]:
    """The patches of ``model`` in the order they were made (``[]`` for an unpatched model): one dict each with
    ``variant``, ``layers``, ``params``, ``family``."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        model = get_base()
    return [dict(spec) for spec in model.config.patchattn] if is_patched(model) else []

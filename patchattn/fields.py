"""The one field system of patchattn: variants' parameters (``patchattn.variants.base.VariantParams``) and the
training recipes' configs (``patchattn.training.config``) are dataclasses whose fields are declared with
:func:`param` and checked by :meth:`Fields.check_fields`; each kind of container only says how its errors read
(``hyper: parameter 'block_size' ...`` / ``config field 'stage2.lr' ...``) and adds its cross-field rules.

The type a field must have is its declared ``types``, or else follows from its default: ``bool`` (True or False),
``int`` (an integer, never a bool) or ``float`` (a finite number: NaN and inf are refused by name); other defaults
(``None``, a string with ``choices``, a dict) check only what is declared.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any


def param(default=dataclasses.MISSING, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
          choices=None, types: tuple = (), nullable: bool = False, factory=None, help: str = ""):
    """A field: default (or ``factory``), the allowed range ``low``..``high`` (inclusive unless ``*_open``) or
    ``choices``, ``types`` when the default does not say (see the module docstring), ``nullable`` to let ``None``
    through, and a one-line help."""
    meta = dict(low=low, high=high, low_open=low_open, high_open=high_open, choices=choices, types=tuple(types),
                nullable=nullable, help=help)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_value(text: str):
    """A field value written on a command line (``KEY=VALUE``): an int, else a float, else ``true``/``false`` (any
    case), else the string; the field's own check then says whether it fits."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def nested(cls):
    """A field holding a sub-container (a mapping in YAML), e.g. ``stage1:`` of the distillation recipe."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls})


def range_text(meta) -> str:
    """``[low, high]`` (``(``/``)`` for an open end, ``inf`` for no upper bound)."""
    low, high = meta.get("low"), meta.get("high")
    return (f"{'(' if meta.get('low_open') else '['}{low}, {'inf' if high is None else high}"
            f"{')' if meta.get('high_open') else ']'}")


def _types(f: dataclasses.Field) -> tuple:
    declared = f.metadata.get("types") or ()
    if declared:
        return declared
    for kind, types in ((bool, (bool,)), (int, (int,)), (float, (int, float))):
        if isinstance(f.default, kind):
            return types
    return ()


def field_problem(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for the :func:`param` field ``f`` (``"must be ..."``), or None."""
    meta = f.metadata
    if not meta or "nested" in meta or (value is None and meta.get("nullable")):
        return None
    null = " or null" if meta.get("nullable") else ""
    if meta.get("choices") is not None:
        return None if value in meta["choices"] else f"must be one of {list(meta['choices'])}"
    types = _types(f)
    if types == (bool,):
        return None if isinstance(value, bool) else f"must be True or False{null}"
    if types:
        is_number = not isinstance(value, bool) and isinstance(value, types)
        if float in types:
            # NaN passes every comparison and inf reaches math.log: both must be refused here, by name
            if not (is_number and math.isfinite(value)):
                return f"must be a finite number in {range_text(meta)}{null}"
        elif types == (int,):
            if not is_number:
                return f"must be an integer{null}"
        elif (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            return f"must be {' or '.join(t.__name__ for t in types)}{null}"
    low, high = meta.get("low"), meta.get("high")
    if (low is not None and (value <= low if meta.get("low_open") else value < low)) or \
            (high is not None and (value >= high if meta.get("high_open") else value > high)):
        return f"must be in {range_text(meta)}"
    return None


@dataclasses.dataclass
class Fields:
    """Base of a dataclass of :func:`param` fields."""

    def check_fields(self, prefix: str = "") -> None:
        """Raise :meth:`field_error` for the first field whose value :func:`field_problem` refuses (sub-containers
        of :func:`nested` fields are checked by their own)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = field_problem(f, value)
            if problem is not None:
                raise self.field_error(prefix + f.name, problem, value)

    def field_error(self, name: str, message: str, value) -> ValueError:
        """The error for field ``name`` (how the container's errors read)."""
        return ValueError(f"{name!r} {message}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

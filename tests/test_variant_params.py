"""Validation of variant parameters (patchattn.variants.base.VariantParams.validate) over every registered variant."""
from __future__ import annotations

import dataclasses
import math

import pytest

from patchattn.variants import VARIANTS


def _float_params() -> list[tuple[str, str, dict]]:
    """(variant, parameter, metadata) of every float parameter of every registered variant."""
    out = []
    for name, cls in sorted(VARIANTS.items()):
        for f in dataclasses.fields(cls.Params):
            if f.type in ("float", float):
                assert isinstance(f.default, float), f"{name}.{f.name}: float parameter with a non-float default"
                out.append((name, f.name, dict(f.metadata)))
    return out


FLOAT_PARAMS = _float_params()


def test_every_float_parameter_is_covered():
    names = {(v, p) for v, p, _ in FLOAT_PARAMS}
    assert {("lawcat", "decay_halflife"), ("zipcache", "salient_ratio"), ("moh", "aux_loss_weight")} <= names


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("variant, name, meta", FLOAT_PARAMS, ids=[f"{v}.{p}" for v, p, _ in FLOAT_PARAMS])
def test_non_finite_float_is_refused_by_name(variant, name, meta, bad):
    high = "inf" if meta["high"] is None else meta["high"]
    expected = f"{variant}: parameter {name!r} must be a finite number in [{meta['low']}, {high}], got {bad!r}"
    with pytest.raises(ValueError) as info:
        VARIANTS[variant].make_params(**{name: bad})
    assert str(info.value) == expected


@pytest.mark.parametrize("variant, name, meta", FLOAT_PARAMS, ids=[f"{v}.{p}" for v, p, _ in FLOAT_PARAMS])
def test_finite_numbers_still_pass(variant, name, meta):
    default = next(f.default for f in dataclasses.fields(VARIANTS[variant].Params) if f.name == name)
    for value in (default, int(default)) if default == int(default) else (default,):
        assert getattr(VARIANTS[variant].make_params(**{name: value}), name) == value

"""Packaging: declared dependencies match what the code needs, and matplotlib (the ``plot`` extra) is only needed
where a plot is drawn."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from recipe_helpers import ROOT

from patchattn import training

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(group: str | None = None) -> dict[str, Requirement]:
    lines = PROJECT["dependencies"] if group is None else PROJECT["optional-dependencies"][group]
    return {r.name.lower(): r for r in map(Requirement, lines)}


def test_core_dependencies():
    core = _requirements()
    assert "matplotlib" not in core
    assert "jinja2" in core  # huggingface_hub's ModelCard.from_template imports it
    assert not core["torch"].specifier.contains("2.5.1") and core["torch"].specifier.contains("2.6.0")
    assert not core["accelerate"].specifier.contains("1.5.2") and core["accelerate"].specifier.contains("1.6.0")


def test_extras():
    assert "matplotlib" in _requirements("plot") and "matplotlib" in _requirements("test")
    assert "lm-eval" in _requirements("eval") and "lm-eval" in _requirements("test")  # tests/test_harness.py
    assert "torch" not in _requirements("eval")  # lm-eval must not bring its own torch
    assert PROJECT["scripts"]["patchattn-lm-eval"] == "patchattn.harness:main"
    for group in ("triton", "test"):
        marker = _requirements(group)["triton"].marker
        assert marker.evaluate({"platform_system": "Linux"})
        assert not marker.evaluate({"platform_system": "Darwin"})
        assert not marker.evaluate({"platform_system": "Windows"})


def test_every_module_imports_without_matplotlib():
    code = """
import pkgutil, sys
sys.modules["matplotlib"] = None  # `import matplotlib` now raises ModuleNotFoundError
import patchattn
bad = []
for info in pkgutil.walk_packages(patchattn.__path__, "patchattn."):
    try:
        __import__(info.name)
    except ImportError as exc:
        if "matplotlib" in str(exc):
            bad.append(info.name)
print(bad)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_the_checkouts_kernels_do_not_shadow_the_hubs_kernels_library():
    """``python -c`` from the checkout's root puts the root first on sys.path, where ``kernels/`` (patchattn.kernels)
    would shadow the Hub's ``kernels`` library that transformers >= 5.25 imports: importing patchattn failed there."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Hub's kernels library is not installed (transformers < 5.25 does not need it)")
    code = "import patchattn, kernels, patchattn.kernels as ours; print(kernels.__file__); print(ours.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hubs, ours = proc.stdout.strip().splitlines()[-2:]
    assert not Path(hubs).resolve().is_relative_to((ROOT / "kernels").resolve())
    assert Path(ours).resolve().is_relative_to((ROOT / "kernels").resolve())


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'patchattn\[plot\]'"):
        training.plot_losses([{"step": 1, "loss": 1.0}], tmp_path / "loss.png", "title")

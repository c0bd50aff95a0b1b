"""Shared by the tests that import a file of scripts/ or recipes/ (plain files, not packages) by its path."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_script(path: Path, module_name: str):
    """The file ``path`` imported as ``module_name`` and registered in ``sys.modules`` (dataclasses look their module
    up). scripts/ goes on ``sys.path`` first, as it is for ``python scripts/x.py``: the scripts import their sibling
    ``_bench``."""
    if str(SCRIPTS) not in sys.path:
        sys.path.append(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module

"""Imported first by ``patchattn``: from a source checkout with its root first on ``sys.path`` (``python -c``, a
notebook or ``python -m pytest`` started there), the checkout's ``kernels/`` (this package's ``patchattn.kernels``)
would be a top-level ``kernels`` shadowing the Hub's kernel library, which transformers >= 5.25 imports (``cannot
import name 'CUDAProperties' from 'kernels'``). The root moves to the end of ``sys.path``: still searched, after the
installed packages. Nothing changes for an installed patchattn."""
from __future__ import annotations

import os
import sys


def move_checkout_root_last() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "kernels" in sys.modules or not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        return
    at_root = [path for path in sys.path if os.path.abspath(path or os.curdir) == root]
    sys.path[:] = [path for path in sys.path if path not in at_root] + at_root


move_checkout_root_last()

import os
import sys

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's CPU interpreter. Triton reads the switch when it is first imported
# (which transformers/peft may do while other test modules are collected), so it must be set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` from the repository root puts the root first on sys.path, where kernels/ (shipped as
# patchattn.kernels) would be a top-level `kernels` shadowing the Hub's kernel library, which transformers >= 5.25
# imports (ImportError: cannot import name 'CUDAProperties' from 'kernels'). The root goes last instead: installed
# packages first, the checkout's patchattn still found where it is not installed (PYTHONPATH=$PWD on the GPU box).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
at_root = [path for path in sys.path if os.path.abspath(path or os.curdir) == ROOT]
sys.path[:] = [path for path in sys.path if path not in at_root] + at_root
sys.path.insert(0, os.path.dirname(__file__))  # tiny_models helpers


@pytest.fixture(scope="module")
def one_thread():
    """Modules of many tiny ops run them on one thread: faster, and 10x faster on a shared, oversubscribed CPU
    (use as ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

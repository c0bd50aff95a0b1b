import os
import sys

import torch

# Without CUDA, Triton kernels run in Triton's CPU interpreter. Triton reads the switch when it is first imported
# (which transformers/peft may do while other test modules are collected), so it must be set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tiny_models helpers

"""What the FlashSigmoid kernels are built for (in its own module: ``ops`` needs it and imports Triton, the package
``__init__`` needs it without Triton)."""
import torch

#: head dims the kernels are built for (tile shapes are powers of two)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

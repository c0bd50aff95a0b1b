"""What the DHSA Triton kernel is built for (in its own module: ``ops`` needs it and imports Triton, the package
``__init__`` needs it without Triton)."""

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)

"""patchattn's compute kernels (installed as ``patchattn.kernels``): a PyTorch reference per op, Triton beside it."""

"""dhsa kernels (in progress)."""

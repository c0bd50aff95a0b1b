"""linear kernels (in progress)."""

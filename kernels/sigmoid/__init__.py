"""sigmoid kernels (in progress)."""

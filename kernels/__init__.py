"""patchattn's compute kernels (installed as ``patchattn.kernels``): a PyTorch reference per op, Triton beside it."""
import functools


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports here (it is an optional dependency: without it every op takes its PyTorch path)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

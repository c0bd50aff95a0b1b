"""patchattn's compute kernels (installed as ``patchattn.kernels``): a PyTorch reference per op, Triton beside it."""
import functools
import os


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports here (it is an optional dependency: without it every op takes its PyTorch path)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_can_take(x) -> bool:
    """Whether a Triton launch can take tensors like ``x``: CUDA tensors compiled, CPU tensors only under Triton's
    interpreter (``TRITON_INTERPRET=1``). Decided by the tensor's device, never by whether CUDA exists: a CUDA
    machine hands CPU tensors to the compiled kernels, which fail."""
    return triton_available() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")

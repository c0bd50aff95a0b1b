"""patchattn's compute kernels (installed as ``patchattn.kernels``): a PyTorch reference per op, Triton beside it."""
import functools
import os
import warnings


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


def alert_nondeterministic(op: str) -> None:
    """What ``torch.use_deterministic_algorithms(True)`` promises for an op with no deterministic path (float adds
    by atomics land in any order): raise ``RuntimeError`` naming ``op``, or warn under ``warn_only=True``."""
    import torch

    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{op} adds floats atomically, so its result can differ in the last bits between runs, and "
           "torch.use_deterministic_algorithms(True) is on. Run it anyway with "
           "torch.use_deterministic_algorithms(True, warn_only=True), or train with exact attention")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)

"""Native ports of model families whose published code does not run on transformers 5."""


def register_models() -> None:
    """Register the native ports with transformers' Auto classes (idempotent)."""
    try:
        from .chatglm2 import register
    except ImportError:  # port not present yet in this checkout
        return
    register()

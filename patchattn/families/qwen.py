from .base import Family, register_family

register_family(Family(
    name="qwen",
    model_types=("qwen2", "qwen3"),
    description="Qwen2 / Qwen3 (Llama-like; Qwen3 adds QK-norm)",
    features=("gqa", "qk_norm"),
))

from .base import Family, register_family

register_family(Family(
    name="mistral",
    model_types=("mistral",),
    description="Mistral (optional sliding window on every layer)",
    features=("gqa", "sliding_window"),
))

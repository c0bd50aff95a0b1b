from .base import Family, register_family

register_family(Family(
    name="llama",
    model_types=("llama",),
    description="Llama 1/2/3/3.1 (llama3 rope scaling), SmolLM2 and other Llama-architecture checkpoints",
    features=("gqa", "rope_scaling"),
))

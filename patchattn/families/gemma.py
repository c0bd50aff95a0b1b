from .base import Family, register_family

register_family(Family(
    name="gemma",
    model_types=("gemma",),
    description="Gemma 1 (MQA/MHA, head_dim 256)",
    features=("gqa",),
))
register_family(Family(
    name="gemma2",
    model_types=("gemma2",),
    description="Gemma 2: logit softcap, alternating sliding/global layers, query_pre_attn_scalar",
    features=("gqa", "softcap", "sliding_window", "alternating_layers"),
))
register_family(Family(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    description="Gemma 3: QK-norm, 5 local : 1 global layers (text model or the text part of the multimodal one)",
    features=("gqa", "qk_norm", "sliding_window", "alternating_layers"),
))

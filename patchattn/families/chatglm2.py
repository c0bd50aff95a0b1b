from .base import Family, register_family

register_family(Family(
    name="chatglm2",
    model_types=("chatglm",),
    description="ChatGLM2-6B / -32k through patchattn's native transformers-5 port (original checkpoint format)",
    layers_paths=("transformer.encoder.layers", "encoder.layers"),
    attention_attr="self_attention",
    features=("gqa", "multi_query", "interleaved_half_rotary"),
))

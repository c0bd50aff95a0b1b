"""Configuration of the native ChatGLM2 port.

It reads the original `config.json` of THUDM/chatglm2-6b(-32k) as is: every field of the original
`ChatGLMConfig` keeps its name and default, and the names transformers looks for
(`num_hidden_layers`, `vocab_size`, `head_dim`, ...) are aliases of them, so the file round-trips in
the original format. Unknown or retired fields (`max_length`, `original_rope`, ...) are accepted.
"""

from transformers import PretrainedConfig


class ChatGLM2Config(PretrainedConfig):
    """ChatGLM2 hyper-parameters under their original names.

    Defaults are those of the original `ChatGLMConfig`, except `eos_token_id=2` / `pad_token_id=0`, which every
    released checkpoint sets and which the generation config is derived from. `rope_ratio` (added by the 32k
    variant) multiplies the rotary base 10000.
    """

    model_type = "chatglm"
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "vocab_size": "padded_vocab_size",
        "intermediate_size": "ffn_hidden_size",
        "head_dim": "kv_channels",
        "max_position_embeddings": "seq_length",
        "rms_norm_eps": "layernorm_epsilon",
    }

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 2048
    hidden_dropout: float | int = 0.0
    classifier_dropout: float | int | None = None
    attention_dropout: float | int = 0.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    bias_dropout_fusion: bool = True
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    rope_ratio: float | int = 1
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0

    @property
    def num_key_value_heads(self) -> int:
        """KV heads as transformers counts them: the MQA groups, or every head without MQA."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads


__all__ = ["ChatGLM2Config"]

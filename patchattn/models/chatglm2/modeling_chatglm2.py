"""Native transformers-5 port of ChatGLM2 (THUDM/chatglm2-6b, chatglm2-6b-32k).

The original remote code targets transformers 4.27 and no longer runs on transformers 5. This port keeps the
original module tree, so original checkpoints load with no key renaming, and reproduces the original math, but
runs it through the transformers-5 machinery (`Cache`, `create_causal_mask`, `ALL_ATTENTION_FUNCTIONS`), so
that attention variants patched into Llama-style models apply to it unchanged.

Layout is [batch, seq, ...] instead of the original [seq, batch, ...]; this changes no arithmetic.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_chatglm2 import ChatGLM2Config

# transformers 5.24 renamed the cache kwarg and output field from `past_key_values` to `cache`. Layers are called,
# and outputs filled, under the installed version's name, so that code patched in (and gradient checkpointing) sees
# the name it expects; every forward here accepts both.
_CACHE_KEY = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class ChatGLM2RMSNorm(nn.Module):
    """RMSNorm as the original computes it: weight times the fp32-normalised input, then cast back.

    Llama's RMSNorm casts before the weight multiply, which rounds differently in half precision.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight * hidden_states).to(input_dtype)


def _norm(config: ChatGLM2Config) -> nn.Module:
    if config.rmsnorm:
        return ChatGLM2RMSNorm(config.hidden_size, config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class ChatGLM2RotaryEmbedding(nn.Module):
    """cos/sin for ChatGLM2's rotary: frequencies over `kv_channels // 2` dims, base `10000 * rope_ratio`.

    Angles are built in fp32 and cast to the activation dtype, as the original does.
    """

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.dim = config.kv_channels // 2
        self.base = 10000 * config.rope_ratio
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # rounded by `.half()`/`.to(dtype)`; the original never is
            inv_freq = self.compute_inv_freq(inv_freq.device)
        angles = position_ids[..., None].float() * inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of the first `2 * cos.shape[-1]` dims of `x` [b, h, n, d].

    The remaining dims (half the head) pass through unrotated, as in the original.
    """
    rot_dim = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x0, x1 = x_rot.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention with the softmax in fp32, matching the original's `attention_softmax_in_fp32`."""
    key = key.repeat_interleave(module.num_key_value_groups, dim=1)
    value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class ChatGLM2Attention(nn.Module):
    """Self-attention with a fused `query_key_value`, following transformers' functional attention convention.

    The original's query-key layer scaling divides scores by the layer number before an fp32 softmax and multiplies
    them back inside it (and its torch-2 path skips it altogether), so the effective scale is `head_dim ** -0.5`.
    """

    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.kv_channels
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        qkv_size = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        batch, seq_len, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states)
        if self.config.multi_query_attention:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
            query, key, value = (
                t.view(batch, seq_len, -1, self.head_dim) for t in mixed.split([q_size, kv_size, kv_size], dim=-1)
            )
        else:  # without MQA the fused output is laid out per head as [q_h | k_h | v_h]
            query, key, value = mixed.view(batch, seq_len, self.num_heads, 3 * self.head_dim).split(
                self.head_dim, dim=-1
            )
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        cos, sin = position_embeddings
        query = apply_rotary_pos_emb(query, cos, sin)
        key = apply_rotary_pos_emb(key, cos, sin)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, seq_len, -1).contiguous()
        return self.dense(attn_output), attn_weights


class ChatGLM2MLP(nn.Module):
    """SwiGLU with the gate and up projections fused in `dense_h_to_4h` (gate first)."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class ChatGLM2Block(GradientCheckpointingLayer):
    """One transformer layer (the original `GLMBlock`)."""

    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        self.apply_residual_connection_post_layernorm = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = _norm(config)
        self.self_attention = ChatGLM2Attention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        self.mlp = ChatGLM2MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        cache = cache if cache is not None else past_key_values
        normed = self.input_layernorm(hidden_states)
        attn_output, _ = self.self_attention(
            normed,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **{_CACHE_KEY: cache},
            **kwargs,
        )
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        hidden_states = residual + F.dropout(attn_output, p=self.hidden_dropout, training=self.training)

        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.apply_residual_connection_post_layernorm else hidden_states
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)


class ChatGLM2Embedding(nn.Module):
    """Holds `word_embeddings` under the original name."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)
        return embeddings.float() if self.fp32_residual_connection else embeddings


class ChatGLM2Encoder(nn.Module):
    """The layer stack plus the optional final norm (the original `GLMTransformer`)."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.layers = nn.ModuleList([ChatGLM2Block(config, i) for i in range(config.num_layers)])
        self.final_layernorm = _norm(config) if config.post_layer_norm else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None,
        **kwargs,
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                **{_CACHE_KEY: cache},
                **kwargs,
            )
        return hidden_states if self.final_layernorm is None else self.final_layernorm(hidden_states)


class ChatGLM2PreTrainedModel(PreTrainedModel):
    config: ChatGLM2Config
    config_class = ChatGLM2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLM2Block"]
    # Original checkpoints store the rotary frequencies; they are recomputed from the config instead.
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]
    _supports_attention_backend = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _can_record_outputs = {"hidden_states": ChatGLM2Block, "attentions": ChatGLM2Attention}

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        # The buffer is non-persistent, so loading from the meta device leaves it empty until this refills it.
        if isinstance(module, ChatGLM2RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))


class ChatGLM2Model(ChatGLM2PreTrainedModel):
    """The original `ChatGLMModel`: embeddings, layers and final norm. It owns `output_layer` (as the original
    does, for the checkpoint names) but returns hidden states; `ChatGLM2ForCausalLM` applies it."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        if config.quantization_bit:
            raise NotImplementedError("Quantized ChatGLM2 checkpoints (quantization_bit != 0) are not supported.")
        if config.pre_seq_len is not None:
            raise NotImplementedError("ChatGLM2 P-tuning prefixes (pre_seq_len) are not supported.")
        self.embedding = ChatGLM2Embedding(config)
        self.rotary_pos_emb = ChatGLM2RotaryEmbedding(config)
        self.encoder = ChatGLM2Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.embedding.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # The 4th argument is `cache` on transformers >= 5.24 and `past_key_values` before: pass it by position.
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
        position_embeddings = self.rotary_pos_emb(position_ids, inputs_embeds.dtype)
        hidden_states = self.encoder(
            inputs_embeds, causal_mask, position_embeddings, cache, position_ids=position_ids, **kwargs
        )
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_KEY: cache})


class ChatGLM2ForCausalLM(ChatGLM2PreTrainedModel, GenerationMixin):
    """Causal LM head over `ChatGLM2Model` (the original `ChatGLMForConditionalGeneration`)."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        self.transformer = ChatGLM2Model(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.transformer.output_layer = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.transformer.output_layer(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_KEY: getattr(outputs, _CACHE_KEY)},
        )


__all__ = ["ChatGLM2PreTrainedModel", "ChatGLM2Model", "ChatGLM2ForCausalLM"]

"""Native ChatGLM2 port: load original THUDM/chatglm2-6b(-32k) checkpoints on transformers 5.

After `register()`, `AutoModelForCausalLM.from_pretrained(path)` loads an original checkpoint with this port
and needs no `trust_remote_code`: transformers prefers a registered local class over the config's `auto_map`,
so the checkpoint's remote code is never run, even when `trust_remote_code=True` is passed.
"""

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_chatglm2 import ChatGLM2Config
from .modeling_chatglm2 import ChatGLM2ForCausalLM, ChatGLM2Model, ChatGLM2PreTrainedModel


def register() -> None:
    """Map model_type "chatglm" to the native port in the Auto classes; safe to call any number of times."""
    AutoConfig.register(ChatGLM2Config.model_type, ChatGLM2Config, exist_ok=True)
    AutoModel.register(ChatGLM2Config, ChatGLM2Model, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLM2Config, ChatGLM2ForCausalLM, exist_ok=True)


def is_remote_chatglm(model: nn.Module) -> bool:
    """Whether `model` is a ChatGLM built from the checkpoint's remote code (`trust_remote_code=True`).

    That code predates transformers 5's attention API, so patchattn cannot patch it; such a model should be
    reloaded with this port instead.
    """
    from_remote_code = type(model).__module__.split(".")[0] == "transformers_modules"
    return from_remote_code and getattr(getattr(model, "config", None), "model_type", None) == "chatglm"


__all__ = [
    "ChatGLM2Config",
    "ChatGLM2ForCausalLM",
    "ChatGLM2Model",
    "ChatGLM2PreTrainedModel",
    "is_remote_chatglm",
    "register",
]

"""What the training recipes share (``recipes/continue_train.py``, ``recipes/distill.py``), written once.

* :mod:`.config`: the config field groups a recipe's config inherits (model + patch, data, one optimisation stage,
  what trains, the run), validated field by field (:mod:`patchattn.fields`, the field system variants use too), and
  loading from YAML plus ``--field value`` overrides.
* :mod:`.data`: documents are read, split (held-out tail), tokenized and packed identically on every process.
* :mod:`.model`: build, patch, calibrate and set what trains; the original softmax model as a teacher.
* :mod:`.preflight`: the checks that need the model's config or ``output_dir``, before a run writes anything.
* :mod:`.run`: :class:`Run` owns the accelerator, ``output_dir``, ``log.jsonl``, the checkpoints and the saved model.
* :mod:`.loop`: :func:`train_steps` runs one optimisation stage with any loss (next-token, attention transfer, KL to a
  teacher); the batch of step ``s`` is a pure function of ``(seed, s)``, so a resumed run reproduces the
  uninterrupted loss curve.
* :mod:`.plots`: the loss curves.
"""
from ..fields import nested, param
from .config import (
    MIXED_PRECISION,
    ConfigBase,
    ConfigError,
    DataFields,
    ModelFields,
    RunFields,
    StageFields,
    TrainableFields,
    field_error,
    load_config,
    option,
    parse_args,
    run_main,
)
from .data import pack, read_corpus, split_corpus, tokenize_docs
from .loop import KILL_ENV, LossFn, batch_indices, describe, evaluate, held_out_loss, lr_at, train_steps
from .model import (
    TINY_LLAMA,
    build_model,
    finish,
    load_patched_model,
    original_model,
    set_gradient_checkpointing,
    set_trainable,
    variant_parameters,
    word_level_tokenizer,
)
from .plots import plot_losses, pyplot
from .preflight import preflight
from .run import Run, TrainState, checkpoint_position, last_checkpoint, resume_checkpoint, save_model

__all__ = [
    "MIXED_PRECISION", "ConfigBase", "ConfigError", "DataFields", "ModelFields", "RunFields", "StageFields",
    "TrainableFields", "field_error", "load_config", "nested", "option", "param", "parse_args", "run_main",
    "pack", "read_corpus", "split_corpus", "tokenize_docs",
    "KILL_ENV", "LossFn", "batch_indices", "describe", "evaluate", "held_out_loss", "lr_at", "train_steps",
    "TINY_LLAMA", "build_model", "finish", "load_patched_model", "original_model", "set_gradient_checkpointing",
    "set_trainable", "variant_parameters", "word_level_tokenizer",
    "plot_losses", "pyplot", "preflight",
    "Run", "TrainState", "checkpoint_position", "last_checkpoint", "resume_checkpoint", "save_model",
]

"""Continue-train a patchattn-patched causal LM with accelerate.

    accelerate launch --config_file recipes/accelerate_configs/ddp.yaml \
        recipes/continue_train.py --config recipes/smollm2/gated.yaml [--max_steps 50 --output_dir runs/x ...]

Any config field can be overridden on the command line as ``--field value`` (the value is parsed as YAML).

What it does: loads the base model (a shipped real-weights name such as ``smollm2-135m``, a local directory, a Hub
id, an already patched checkpoint via ``patchattn.from_pretrained``, or ``tiny-llama``: a tiny random Llama with a
word-level tokenizer built from the shipped text, for tests), patches it, chooses what trains (``variant``: the
variant's new parameters only; ``lora``: PEFT LoRA + the variant's parameters; ``full``), packs the text into
``seq_len`` chunks, trains with AdamW (linear warmup, cosine decay to ``min_lr_ratio``), adds the MoH load-balance
loss, evaluates held-out perplexity every ``eval_every`` steps, checkpoints with ``accelerator.save_state`` every
``save_every`` steps (model, optimizer, RNG states and the step counter, which *is* the data position: the batch of
step ``s`` is a pure function of ``(seed, s)``), resumes from the last checkpoint, and at the end saves the patched
model (LoRA merged into the base weights, so the result loads with ``patchattn.from_pretrained`` and no peft),
the tokenizer, ``log.jsonl`` and ``loss_curve.png``, and optionally pushes to the Hub with the recipe in the card.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml

TRAINABLE = ("variant", "lora", "full")
MIXED_PRECISION = (None, "no", "fp16", "bf16", "fp8")


class ConfigError(ValueError):
    """A bad recipe config; the message names the field."""


@dataclasses.dataclass
class RecipeConfig:
    # model and patch
    model: str = "smollm2-135m"  # shipped name (patchattn.realweights), local dir, Hub id, or "tiny-llama"
    model_config: dict = dataclasses.field(default_factory=dict)  # tiny-llama only: LlamaConfig overrides
    tokenizer_vocab: int = 512  # tiny-llama only: word-level vocabulary size
    variant: str = "gated"
    layers: Any = None  # None/"all", "last:N", "first:N" or a list of indices
    variant_params: dict = dataclasses.field(default_factory=dict)
    # what trains
    trainable: str = "variant"  # variant | lora | full
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # data
    data: Any = None  # None (shipped Shakespeare), a path / list of .txt/.jsonl paths, or a `datasets` name
    data_config: str | None = None  # `datasets` config name
    data_split: str = "train"
    text_field: str = "text"  # JSONL / datasets column
    eval_fraction: float = 0.05  # tail of the text held out for evaluation
    eval_tokens: int = 16384  # held-out tokens scored per evaluation
    seq_len: int = 512
    # optimisation
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_steps: int = 100
    mixed_precision: str | None = None  # None: whatever `accelerate launch` says
    gradient_checkpointing: bool = False
    aux_loss_weight: float | None = None  # None: each MoH layer's own aux_loss_weight; a number overrides it
    # bookkeeping
    eval_every: int = 0  # 0: only at the start and the end
    save_every: int = 0  # 0: no intermediate checkpoints
    resume: Any = False  # False | True (last checkpoint in output_dir) | a checkpoint directory
    output_dir: str = "runs/continue_train"
    seed: int = 0
    log_every: int = 1
    push_to_hub: str | None = None  # Hub repo id

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "RecipeConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of config fields, got {type(raw).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}; known fields: {known}")
        config = cls(**raw)
        config.validate()
        return config

    def validate(self) -> None:
        def fail(name: str, msg: str):
            raise ConfigError(f"config field {name!r} {msg}, got {getattr(self, name)!r}")

        def check_type(name: str, types, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) and bool not in types:
                fail(name, f"must be {' or '.join(t.__name__ for t in types)}")
            if not isinstance(value, types):
                fail(name, f"must be {' or '.join(t.__name__ for t in types)}")

        for name in ("model", "variant", "trainable", "data_split", "text_field", "output_dir"):
            check_type(name, (str,))
        for name in ("model_config", "variant_params"):
            check_type(name, (dict,))
        for name in ("lora_r", "lora_alpha", "tokenizer_vocab", "eval_tokens", "seq_len", "batch_size", "grad_accum",
                     "warmup_steps", "max_steps", "eval_every", "save_every", "seed", "log_every"):
            check_type(name, (int,))
        for name in ("lr", "weight_decay", "min_lr_ratio", "max_grad_norm", "eval_fraction", "lora_dropout"):
            check_type(name, (int, float))
        check_type("aux_loss_weight", (int, float), optional=True)
        check_type("gradient_checkpointing", (bool,))
        check_type("push_to_hub", (str,), optional=True)
        check_type("data_config", (str,), optional=True)
        for name in ("lora_r", "lora_alpha", "tokenizer_vocab", "eval_tokens", "batch_size", "grad_accum", "max_steps",
                     "log_every"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        if self.seq_len < 2:
            fail("seq_len", "must be >= 2")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if not self.lr > 0:
            fail("lr", "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "must be in [0, 1]")
        if not 0 < self.eval_fraction < 1:
            fail("eval_fraction", "must be in (0, 1)")
        if not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", "must be in [0, 1)")
        if self.aux_loss_weight is not None and self.aux_loss_weight < 0:
            fail("aux_loss_weight", "must be >= 0 (or null for the variant's own weight)")
        if self.trainable not in TRAINABLE:
            fail("trainable", f"must be one of {list(TRAINABLE)}")
        if self.mixed_precision not in MIXED_PRECISION:
            fail("mixed_precision", f"must be one of {list(MIXED_PRECISION)}")
        if not isinstance(self.lora_targets, list) or not self.lora_targets or \
                not all(isinstance(t, str) for t in self.lora_targets):
            fail("lora_targets", "must be a non-empty list of module names")
        if not (self.data is None or isinstance(self.data, str) or
                (isinstance(self.data, list) and self.data and all(isinstance(d, str) for d in self.data))):
            fail("data", "must be null, a path / `datasets` name, or a list of paths")
        if not isinstance(self.resume, (bool, str)):
            fail("resume", "must be true, false or a checkpoint directory")
        import patchattn
        from patchattn.variants import get_variant

        try:
            get_variant(self.variant).make_params(**self.variant_params)
        except ValueError as exc:
            field = "variant" if self.variant not in patchattn.VARIANTS else "variant_params"
            raise ConfigError(f"config field {field!r}: {exc}") from None
        if self.model != "tiny-llama" and self.model_config:
            fail("model_config", "is only used with model: tiny-llama")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | None, overrides: dict | None = None) -> RecipeConfig:
    raw: dict = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields")
    raw = {**raw, **(overrides or {})}
    return RecipeConfig.from_dict(raw, source=path or "config")


def parse_args(argv: list[str] | None = None) -> RecipeConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="recipe YAML (e.g. recipes/smollm2/gated.yaml)")
    args, rest = parser.parse_known_args(argv)
    overrides, i = {}, 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides are --field value")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"override {token} needs a value")
            key, value = token[2:], rest[i + 1]
            i += 2
        overrides[key.replace("-", "_")] = yaml.safe_load(value)
    return load_config(args.config, overrides)


# -- model and tokenizer ------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]+")


def word_level_tokenizer(text: str, vocab_size: int):
    """A deterministic word-level tokenizer (most frequent words of ``text``; ties broken alphabetically)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    counts = Counter(_WORD.findall(text))
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max(vocab_size - len(specials), 0)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def build_model(config: RecipeConfig, text: str):
    """``(model, tokenizer, already_patched)`` in float32 (mixed precision is autocast by accelerate)."""
    import patchattn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if config.model == "tiny-llama":
        tokenizer = word_level_tokenizer(text, config.tokenizer_vocab)
        kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        kwargs.update(config.model_config)
        torch.manual_seed(config.seed)
        return LlamaForCausalLM(LlamaConfig(**kwargs)), tokenizer, False
    from patchattn.realweights import KNOWN_MODELS, load_model

    if config.model in KNOWN_MODELS:
        model, tokenizer = load_model(config.model)
        return model, tokenizer, False
    hf_config = AutoConfig.from_pretrained(config.model)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if getattr(hf_config, "patchattn", None) is not None:
        return patchattn.from_pretrained(config.model, dtype=torch.float32), tokenizer, True
    return AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32), tokenizer, False


# -- data -------------------------------------------------------------------------------------------------------

def read_corpus(config: RecipeConfig) -> list[str]:
    """The documents of the training corpus, in a fixed order."""
    from patchattn.data import read_text

    if config.data is None:
        return [read_text()]
    sources = [config.data] if isinstance(config.data, str) else list(config.data)
    docs: list[str] = []
    for source in sources:
        path = Path(source)
        if path.suffix == ".jsonl" and path.is_file():
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if config.text_field not in record:
                            raise ConfigError(f"config field 'text_field': {path}:{n} has no {config.text_field!r} "
                                              f"key (keys: {sorted(record)})")
                        docs.append(str(record[config.text_field]))
        elif path.is_file() or path.suffix == ".txt":
            docs.append(read_text(source))  # also a bare name of a shipped text, e.g. kjv_sample.txt
        else:
            try:
                import datasets
            except ModuleNotFoundError:
                raise ConfigError(f"config field 'data': {source!r} is not a file, and loading it as a `datasets` "
                                  "name needs `pip install datasets`") from None
            ds = datasets.load_dataset(source, config.data_config, split=config.data_split)
            if config.text_field not in ds.column_names:
                raise ConfigError(f"config field 'text_field': {source!r} has no column {config.text_field!r} "
                                  f"(columns: {ds.column_names})")
            docs.extend(str(t) for t in ds[config.text_field])
    if not any(d.strip() for d in docs):
        raise ConfigError(f"config field 'data': {config.data!r} holds no text")
    return docs


def split_corpus(docs: list[str], eval_fraction: float) -> tuple[list[str], str]:
    """Hold out the last ``eval_fraction`` of the characters (the tail of the last documents)."""
    total = sum(len(d) for d in docs)
    keep = int(total * (1 - eval_fraction))
    train, seen = [], 0
    for i, d in enumerate(docs):
        if seen + len(d) <= keep:
            train.append(d)
            seen += len(d)
            continue
        cut = keep - seen
        train.append(d[:cut])
        held = [d[cut:], *docs[i + 1:]]
        return [t for t in train if t], "\n".join(held)
    return train, ""


def tokenize_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    """One token stream: each document tokenized without special tokens, separated by EOS (or BOS)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False).input_ids)
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = len(stream) // seq_len
    if n == 0:
        raise ConfigError(f"config field 'seq_len': the data has only {len(stream)} tokens, fewer than seq_len")
    return stream[: n * seq_len].view(n, seq_len)


class TrainState:
    """Saved with every checkpoint (accelerator.register_for_checkpointing): the step is the data position."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def batch_indices(step: int, micro: int, rank: int, world: int, config: RecipeConfig, n: int) -> torch.Tensor:
    """Chunk indices of (optimizer step ``step`` (0-based), micro-batch, rank): a fixed permutation per epoch."""
    per_step = config.batch_size * world * config.grad_accum
    start = step * per_step + (micro * world + rank) * config.batch_size
    out = []
    for g in range(start, start + config.batch_size):
        epoch, pos = divmod(g, n)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=gen)[pos]))
    return torch.tensor(out)


def lr_at(step: int, config: RecipeConfig) -> float:
    """LR of optimizer step ``step`` (1-based): linear warmup, then cosine to ``min_lr_ratio * lr``."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    span = max(config.max_steps - config.warmup_steps, 1)
    progress = min(max(step - config.warmup_steps, 0) / span, 1.0)
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * ratio


@torch.no_grad()
def evaluate(model, eval_chunks: torch.Tensor, accelerator, batch_size: int) -> float:
    """Held-out perplexity ``exp(mean NLL)`` over non-overlapping ``seq_len`` windows, sharded over processes (every
    process runs the wrapped model, so this also works under FSDP)."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = eval_chunks[rank::world]
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    steps = math.ceil(math.ceil(len(eval_chunks) / world) / batch_size)  # same number of forwards on every rank
    for s in range(steps):
        x = mine[s * batch_size:(s + 1) * batch_size]
        if len(x) == 0:
            x, weight = eval_chunks[:1], 0.0  # keep collective ops in step (FSDP)
        else:
            weight = 1.0
        x = x.to(accelerator.device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += weight * loss.double()
        count += weight * x[:, 1:].numel()
    model.train()
    nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    return math.exp((nll / count).item())


def set_trainable(model, config: RecipeConfig):
    """Freeze/unfreeze per ``config.trainable``; returns the (possibly PEFT-wrapped) model."""
    from patchattn.patching import LAYER_ATTR

    if config.trainable == "full":
        model.requires_grad_(True)
        return model
    if config.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                 lora_dropout=config.lora_dropout,
                                                 target_modules=list(config.lora_targets)))
    else:
        model.requires_grad_(False)
    variant_params = [p for n, p in model.named_parameters() if f".{LAYER_ATTR}." in n]
    for p in variant_params:
        p.requires_grad_(True)
    if config.trainable == "variant" and not variant_params:
        raise ConfigError(f"config field 'trainable': variant {config.variant!r} (params {config.variant_params}) adds "
                          "no parameters; use trainable: lora or full")
    return model


def last_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((p for p in (output_dir / "checkpoints").glob("step_*") if (p / "done").exists()),
                   key=lambda p: int(p.name.split("_")[1]))
    return ckpts[-1] if ckpts else None


def plot_losses(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    evals = [r for r in records if r.get("eval_ppl") is not None]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], "o-", color="tab:red",
                 label="held-out ppl")
        ax2.set_ylabel("held-out perplexity")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- training -----------------------------------------------------------------------------------------------------

def main(config: RecipeConfig) -> dict:
    """Run the recipe; returns ``{"model", "tokenizer", "records", "output_dir", "eval_ppl_start", "eval_ppl_end"}``
    (``model``: the unwrapped, LoRA-merged final model)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    import patchattn
    from patchattn.variants.moh import load_balance_loss

    # Without an accelerator, processes started by `accelerate launch --multi_gpu` / torchrun form a gloo CPU group
    # only when accelerate is told cpu=True (`accelerate launch --cpu` itself starts one process unless mpirun runs it).
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "recipe.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(config.to_dict(), f, sort_keys=False)

    docs = read_corpus(config)
    train_docs, held_out = split_corpus(docs, config.eval_fraction)
    model, tokenizer, already_patched = build_model(config, "\n".join(train_docs))
    if already_patched:
        spec = model.config.patchattn
        if spec["variant"] != config.variant:
            raise ConfigError(f"config field 'variant': {config.model} is already patched with {spec['variant']!r}")
    else:
        patchattn.patch_model(model, config.variant, layers=config.layers, **config.variant_params)
    train_chunks = pack(tokenize_docs(tokenizer, train_docs), config.seq_len)
    eval_stream = tokenize_docs(tokenizer, [held_out])[: config.eval_tokens]
    eval_chunks = pack(eval_stream, min(config.seq_len, len(eval_stream)))

    if config.variant == "sigmoid":  # data-dependent init of the output norm, identical on every rank
        from patchattn.variants.sigmoid import calibrate_output_norm

        with torch.no_grad():
            calibrate_output_norm(model, train_chunks[: config.batch_size])
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = set_trainable(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    log_path = output_dir / "log.jsonl"
    records: list[dict] = []
    resume_from = None
    if config.resume:
        resume_from = last_checkpoint(output_dir) if config.resume is True else Path(config.resume)
        if resume_from is None:
            accelerator.print(f"resume: no checkpoint in {output_dir / 'checkpoints'}; starting from step 0")
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
        if log_path.exists():
            with open(log_path, encoding="utf-8") as f:
                records = [r for r in map(json.loads, filter(str.strip, f)) if r["step"] <= state.step]
    if accelerator.is_main_process:  # rewrite the log so a resumed run continues exactly where the checkpoint was
        with open(log_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    layers = patchattn.patched_layers(accelerator.unwrap_model(model))  # PEFT forwards .config to the base model
    accelerator.print(f"model {config.model} + {config.variant} on layers {layers}; "
                      f"trainable {n_trainable:,} / {n_total:,} parameters ({config.trainable}); "
                      f"{len(train_chunks)} train chunks x {config.seq_len} tokens; {accelerator.num_processes} "
                      f"process(es)")

    eval_ppl_start = None
    if state.step == 0:
        eval_ppl_start = evaluate(model, eval_chunks, accelerator, config.batch_size)
        accelerator.print(f"step 0: held-out ppl {eval_ppl_start:.3f}")
    rank, world = accelerator.process_index, accelerator.num_processes
    crash_at = int(os.environ.get("PATCHATTN_RECIPE_KILL_AT_STEP", "0"))  # tests: SIGKILL self after this step
    bar = tqdm(total=config.max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process)
    eval_ppl = None
    while state.step < config.max_steps:
        step = state.step + 1
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total_loss = torch.zeros((), device=accelerator.device)
        total_aux = torch.zeros((), device=accelerator.device)
        for micro in range(config.grad_accum):
            idx = batch_indices(state.step, micro, rank, world, config, len(train_chunks))
            x = train_chunks[idx].to(accelerator.device)
            sync = micro == config.grad_accum - 1
            ctx = accelerator.no_sync(model) if not sync else _nullcontext()
            with ctx:
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                aux = load_balance_loss(accelerator.unwrap_model(model), weighted=config.aux_loss_weight is None)
                if config.aux_loss_weight is not None:
                    aux = aux * config.aux_loss_weight
                accelerator.backward((loss + aux.to(loss.dtype)) / config.grad_accum)
            total_loss += loss.detach().float() / config.grad_accum
            total_aux += aux.detach().float() / config.grad_accum
        if config.max_grad_norm:  # the prepared model's parameters (FSDP replaces them)
            accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step
        mean_loss = accelerator.reduce(total_loss, "mean").item()
        mean_aux = accelerator.reduce(total_aux, "mean").item()
        eval_ppl = None
        if (config.eval_every and step % config.eval_every == 0) or step == config.max_steps:
            eval_ppl = evaluate(model, eval_chunks, accelerator, config.batch_size)
        record = {"step": step, "loss": mean_loss, "aux_loss": mean_aux, "lr": lr, "eval_ppl": eval_ppl}
        records.append(record)
        if accelerator.is_main_process:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", **({"ppl": f"{eval_ppl:.2f}"} if eval_ppl is not None else {}))
        if config.save_every and step % config.save_every == 0 and step < config.max_steps:
            ckpt = output_dir / "checkpoints" / f"step_{step}"
            accelerator.save_state(str(ckpt))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (ckpt / "done").touch()  # a kill during save_state leaves no "done": resume skips it
        if crash_at and step == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    # -- save ------------------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards; on the main process only, under FSDP
    final = accelerator.unwrap_model(model)
    if config.trainable == "lora":
        final = final.merge_and_unload()  # the saved model is plain transformers + patch: no peft needed to load
        state_dict = None
    final.eval()
    final.config.use_cache = True
    if config.gradient_checkpointing:
        (getattr(final, "activation_checkpointing_disable", None) or final.gradient_checkpointing_disable)()
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        if final_dir.exists():
            shutil.rmtree(final_dir)
        final.save_pretrained(final_dir, state_dict=state_dict)
        tokenizer.save_pretrained(final_dir)
        plot_losses(records, output_dir / "loss_curve.png",
                    f"{config.model} + {config.variant} ({config.trainable}), {world} proc")
        summary = {"eval_ppl_start": eval_ppl_start, "eval_ppl_end": eval_ppl, "steps": state.step,
                   "final_loss": records[-1]["loss"] if records else None}
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.push_to_hub:
            eval_rows = [{"metric": "held-out perplexity", "before": eval_ppl_start, "after": eval_ppl}]
            patchattn.push_to_hub(final, config.push_to_hub, tokenizer=tokenizer, eval_results=eval_rows,
                                  recipe_config=yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
    accelerator.print(f"done: {state.step} steps; held-out ppl {eval_ppl_start} -> {eval_ppl}; saved to {final_dir}")
    accelerator.end_training()
    return {"model": final, "tokenizer": tokenizer, "records": records, "output_dir": output_dir,
            "eval_ppl_start": eval_ppl_start, "eval_ppl_end": eval_ppl}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    try:
        cfg = parse_args()
    except ConfigError as exc:
        print(f"continue_train: bad config: {exc}", file=sys.stderr)
        sys.exit(2)
    main(cfg)

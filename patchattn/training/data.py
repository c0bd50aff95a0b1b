"""The training corpus: documents are read, split (held-out tail), tokenized and packed identically on every
process."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, DataFields


def read_corpus(config: DataFields) -> list[str]:
    """The documents of the training corpus, in a fixed order."""
    from patchattn.data import read_text

    if config.data is None:
        return [read_text()]
    sources = [config.data] if isinstance(config.data, str) else list(config.data)
    docs: list[str] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.suffix == ".jsonl" and path.is_file():
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if config.text_field not in record:
                            raise ConfigError(f"config field 'text_field': {path}:{n} has no {config.text_field!r} "
                                              f"key (keys: {sorted(record)})")
                        docs.append(str(record[config.text_field]))
        elif path.is_file() or path.suffix == ".txt":  # or the bare name of a shipped text, e.g. kjv_sample.txt
            docs.append(read_text(path if path.is_file() else source))
        else:
            import datasets  # DataFields.check made sure it is installed

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

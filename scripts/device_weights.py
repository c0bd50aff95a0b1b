"""Get a shipped real model onto the GPU machine, whose `run` calls carry at most 64 MiB (working tree included).

The machine starts bare (no pip access, no patchattn cache) and a call carries at most 64 MiB, so weights travel in
parts of at most 60 MB (60,000,000 bytes; the tracked tree adds ~5 MB), one call each, and are joined there. Ignored
files carried earlier stay on the machine only while it is held (it goes back ~30 s after a call, or after 30
minutes): send the parts back to back, then join and convert in the next call. If the machine went back in between,
`assemble` names the missing parts; send those again.

Two ways, for Qwen2.5-Coder-0.5B-Instruct (measured here):

* ``gguf`` (smaller, the default for Qwen): the 491 MB GGUF as is, in 9 parts, plus the converted tokenizer and the
  ``gguf`` wheel (the machine has transformers 5.17 but no gguf). There, transformers 5.17 dequantises it into
  ``$PATCHATTN_CACHE/models/<name>`` (fp32, as here) using the tokenizer converted here by transformers 5.24, so
  ``load_model(name)`` works there as it does here.
* ``export`` + ``split``: the converted model as safetensors in bf16 (1,260,367,448 bytes for Qwen 0.5B, 22 calls;
  its output head is not tied to the embedding, so 630M parameters) or any dtype; for models without a GGUF path,
  or to skip converting there. ``load_model(name)`` upcasts to fp32 by default: bf16-rounded weights, not the fp32
  copy the GGUF path gives.

Here (in the checkout that the `run` tool sends; ``.devw/`` is git-ignored)::

    python scripts/device_weights.py gguf qwen2.5-coder-0.5b-instruct .devw     # parts + tokenizer + gguf wheel
    # or: python scripts/device_weights.py export qwen2.5-coder-0.5b-instruct /tmp/q --dtype bfloat16
    #     python scripts/device_weights.py split /tmp/q .devw/q       # model.safetensors in parts, the rest copied
    # both print the plan below with the exact file names

Then one `run` call per line of the printed plan, back to back, each with ``carry`` = that line's files and a
command such as ``ls -l .devw``; the last call joins and converts::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .devw/gguf-*.whl && export PYTHONPATH=/tmp/site
    python3 scripts/device_weights.py assemble .devw          # joins NAME.partNN -> NAME, checks sha256, drops parts
    python3 scripts/device_weights.py convert .devw/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        qwen2.5-coder-0.5b-instruct --tokenizer .devw/tokenizer      # -> $PATCHATTN_CACHE/models/<name>
    # export path instead: python3 scripts/device_weights.py assemble .devw/q && mkdir -p ~/.cache/patchattn/models
    #                      && mv .devw/q ~/.cache/patchattn/models/qwen2.5-coder-0.5b-instruct

Shell equivalent of ``split``/``assemble`` (same names)::

    split -b 60000000 -d -a 2 FILE FILE.part       # here
    cat FILE.part?? > FILE && sha256sum -c FILE.sha256   # there (FILE.sha256 lists the whole file's hash)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PART_BYTES = 60_000_000  # one call carries 64 MiB = 67.1 MB, tree included
_PART = re.compile(r"(.+)\.part(\d{2})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def split(path: Path, outdir: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """``path`` -> ``outdir/NAME.part00``, ``.part01``, ... of at most ``part_bytes`` bytes, plus ``NAME.sha256``
    (``sha256sum`` format, for the whole file) and ``NAME.parts.json`` (count, sizes and hashes of the parts)."""
    outdir.mkdir(parents=True, exist_ok=True)
    parts, meta, whole = [], [], hashlib.sha256()
    with open(path, "rb") as src:
        while True:
            part = outdir / f"{path.name}.part{len(parts):02d}"
            h, n = hashlib.sha256(), 0
            with open(part, "wb") as dst:
                while n < part_bytes and (chunk := src.read(min(1 << 22, part_bytes - n))):
                    h.update(chunk)
                    whole.update(chunk)
                    dst.write(chunk)
                    n += len(chunk)
            if n == 0:
                part.unlink()
                break
            parts.append(part)
            meta.append({"name": part.name, "bytes": n, "sha256": h.hexdigest()})
    if len(parts) > 100:
        raise ValueError(f"{len(parts)} parts: more than the two-digit names allow")
    (outdir / f"{path.name}.sha256").write_text(f"{whole.hexdigest()}  {path.name}\n")
    (outdir / f"{path.name}.parts.json").write_text(json.dumps({"file": path.name, "parts": meta}, indent=1))
    return parts


def assemble(directory: Path, keep_parts: bool = False) -> list[Path]:
    """Join every ``NAME.partNN`` set in ``directory`` that has its ``NAME.parts.json``, checking each part and the
    whole file; names the missing or damaged parts instead of joining a short file."""
    done = []
    for manifest in sorted(directory.glob("*.parts.json")):
        info = json.loads(manifest.read_text())
        bad = [p["name"] for p in info["parts"] if not (directory / p["name"]).is_file()
               or (directory / p["name"]).stat().st_size != p["bytes"]]
        target = directory / info["file"]
        if bad:
            if target.is_file() and _sha256(target) == (directory / f"{info['file']}.sha256").read_text().split()[0]:
                done.append(target)  # joined by an earlier call
                continue
            raise SystemExit(f"{info['file']}: missing or short parts, send them again: {' '.join(bad)}")
        tmp = target.with_name(target.name + ".joining")
        whole = hashlib.sha256()
        with open(tmp, "wb") as dst:
            for p in info["parts"]:
                h = hashlib.sha256()
                with open(directory / p["name"], "rb") as src:
                    while chunk := src.read(1 << 22):
                        h.update(chunk)
                        whole.update(chunk)
                        dst.write(chunk)
                if h.hexdigest() != p["sha256"]:
                    tmp.unlink()
                    raise SystemExit(f"{p['name']}: sha256 differs from the manifest; send it again")
        expected = (directory / f"{info['file']}.sha256").read_text().split()[0]
        if whole.hexdigest() != expected:
            tmp.unlink()
            raise SystemExit(f"{info['file']}: joined sha256 {whole.hexdigest()} != {expected}")
        tmp.replace(target)
        if not keep_parts:
            for p in info["parts"]:
                (directory / p["name"]).unlink()
        print(f"{target}: {target.stat().st_size} bytes, sha256 ok")
        done.append(target)
    if not done:
        raise SystemExit(f"no *.parts.json in {directory}")
    return done


def export(name: str, outdir: Path, dtype: str) -> Path:
    """The converted model ``name`` (from the local cache, converting it if needed) saved at ``dtype``."""
    import torch

    from patchattn.realweights import load_model

    model, tokenizer = load_model(name, dtype=getattr(torch, dtype))
    model.save_pretrained(outdir)
    tokenizer.save_pretrained(outdir)
    return outdir


def _gguf_wheel(outdir: Path) -> None:
    import importlib.metadata

    version = importlib.metadata.version("gguf")  # the one that converts here
    if not list(outdir.glob(f"gguf-{version}-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(outdir), f"gguf=={version}"], check=True)


def pack_gguf(name: str, outdir: Path, part_bytes: int) -> list[Path]:
    """The GGUF of ``name`` in parts, the tokenizer converted here (small files) and the ``gguf`` wheel."""
    from patchattn import realweights

    converted = realweights.local_model_path(name)  # the tokenizer as this transformers converts it
    tok = outdir / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (converted / f).is_file():
            shutil.copy2(converted / f, tok / f)
    _gguf_wheel(outdir)
    work = outdir / "join.tmp"
    work.mkdir(exist_ok=True)
    try:
        gguf = realweights.gguf_path(name, work)
        parts = split(gguf, outdir, part_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return parts


def plan(outdir: Path, part_bytes: int) -> None:
    """Group ``outdir``'s files into `run` calls of at most ``part_bytes`` each (small files ride with the last)."""
    root = outdir.resolve()
    try:
        rel = root.relative_to(ROOT)
    except ValueError:
        rel = None
        print(f"note: {outdir} is outside this checkout; the `run` tool carries only paths inside it")
    entries = sorted(p for p in root.iterdir() if not p.name.endswith(".joining"))
    sizes = {p: (sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size)
             for p in entries}
    calls: list[list[Path]] = []
    for p in sorted(entries, key=lambda p: -sizes[p]):
        for call in calls:
            if sum(sizes[q] for q in call) + sizes[p] <= part_bytes and len(call) < 8:
                call.append(p)
                break
        else:
            calls.append([p])
    print(f"{len(calls)} run calls, back to back (total {sum(sizes.values()) / 1e6:.1f} MB):")
    for i, call in enumerate(calls, 1):
        names = [str((rel / p.name) if rel is not None else p) for p in sorted(call)]
        print(f"  {i:2d}. carry={json.dumps(names)}  ({sum(sizes[q] for q in call) / 1e6:.1f} MB)")


def convert(gguf: Path, name: str, tokenizer: Path | None, dtype: str) -> Path:
    """On the device: dequantise ``gguf`` into ``$PATCHATTN_CACHE/models/name`` (what ``load_model(name)`` reads)."""
    import torch

    from patchattn.realweights import cache_dir, convert_gguf

    target = cache_dir() / "models" / name
    if target.is_dir():
        print(f"{target} exists; delete it to convert again")
        return target
    work = target.with_name(f"{name}.tmp-device")
    shutil.rmtree(work, ignore_errors=True)
    convert_gguf(gguf, work, name, dtype=getattr(torch, dtype), tokenizer_dir=tokenizer)
    work.replace(target)
    print(f"{target} ready")
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("gguf", help="here: GGUF parts + tokenizer + gguf wheel into OUTDIR, and the run plan")
    p.add_argument("name")
    p.add_argument("outdir", type=Path)
    p.add_argument("--part-bytes", type=int, default=PART_BYTES)
    p = sub.add_parser("export", help="here: the converted model saved at --dtype into OUTDIR")
    p.add_argument("name")
    p.add_argument("outdir", type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p = sub.add_parser("split", help="here: FILE(s) into OUTDIR/NAME.partNN (a directory: its big files split, the "
                                     "rest copied), and the run plan")
    p.add_argument("files", type=Path, nargs="+")
    p.add_argument("outdir", type=Path)
    p.add_argument("--part-bytes", type=int, default=PART_BYTES)
    p = sub.add_parser("plan", help="here: which files each run call carries")
    p.add_argument("outdir", type=Path)
    p.add_argument("--part-bytes", type=int, default=PART_BYTES)
    p = sub.add_parser("assemble", help="there: join the parts in DIR, checking sha256")
    p.add_argument("dir", type=Path)
    p.add_argument("--keep-parts", action="store_true")
    p = sub.add_parser("convert", help="there: GGUF -> $PATCHATTN_CACHE/models/NAME")
    p.add_argument("gguf", type=Path)
    p.add_argument("name")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory converted here (default: the GGUF's own)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    a = ap.parse_args(argv)
    if a.cmd == "gguf":
        pack_gguf(a.name, a.outdir, a.part_bytes)
        plan(a.outdir, a.part_bytes)
    elif a.cmd == "export":
        out = export(a.name, a.outdir, a.dtype)
        for f in sorted(out.iterdir()):
            print(f"{f}: {f.stat().st_size} bytes")
    elif a.cmd == "split":
        for f in a.files:
            if f.is_dir():  # a model directory: big files in parts, the small ones (config, tokenizer) as they are
                a.outdir.mkdir(parents=True, exist_ok=True)
                for g in sorted(f.iterdir()):
                    if g.is_file() and g.stat().st_size > a.part_bytes:
                        split(g, a.outdir, a.part_bytes)
                    elif g.is_file():
                        shutil.copy2(g, a.outdir / g.name)
            else:
                split(f, a.outdir, a.part_bytes)
        plan(a.outdir, a.part_bytes)
    elif a.cmd == "plan":
        plan(a.outdir, a.part_bytes)
    elif a.cmd == "assemble":
        assemble(a.dir, a.keep_parts)
    else:
        convert(a.gguf, a.name, a.tokenizer, a.dtype)


if __name__ == "__main__":
    main()

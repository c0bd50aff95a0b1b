"""scripts/device_weights.py: files split into parts small enough for one device call, joined and checked there."""
from __future__ import annotations

import os

import pytest
from script_helpers import SCRIPTS, load_script

SCRIPT = SCRIPTS / "device_weights.py"


def test_split_assemble_round_trip_and_missing_parts(tmp_path, capsys):
    dw = load_script(SCRIPT, "device_weights")
    data = os.urandom(2500)
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    out = tmp_path / "out"
    parts = dw.split(src, out, part_bytes=1000)
    assert [p.name for p in parts] == ["w.bin.part00", "w.bin.part01", "w.bin.part02"]
    assert [p.stat().st_size for p in parts] == [1000, 1000, 500]
    dw.plan(out, 1000)
    printed = capsys.readouterr().out
    for name in ("w.bin.part00", "w.bin.part01", "w.bin.part02", "w.bin.parts.json", "w.bin.sha256"):
        assert printed.count(f'/{name}"') == 1, printed  # every file in exactly one call

    parts[1].unlink()
    with pytest.raises(SystemExit, match=r"send them again: w\.bin\.part01"):
        dw.assemble(out)
    dw.split(src, out, part_bytes=1000)
    parts[2].write_bytes(b"x" * 500)  # right size, wrong bytes
    with pytest.raises(SystemExit, match=r"w\.bin\.part02: sha256 differs"):
        dw.assemble(out)
    assert not (out / "w.bin").exists() and not (out / "w.bin.joining").exists()

    dw.split(src, out, part_bytes=1000)
    assert dw.assemble(out) == [out / "w.bin"]
    assert (out / "w.bin").read_bytes() == data
    assert not list(out.glob("w.bin.part[0-9]*"))  # parts dropped once joined
    assert dw.assemble(out) == [out / "w.bin"]  # a second call finds it joined

"""scripts/ab_hyper.py: arms run in their own processes, rows and the output/gradient comparison come back."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("safetensors")

from script_helpers import SCRIPTS, load_script  # noqa: E402

ab = load_script(SCRIPTS / "ab_hyper.py", "ab_hyper_script")


def test_parse_variant():
    assert ab.parse_variant("qperm16=False,lvl_bm=64") == {"qperm16": False, "lvl_bm": 64}
    with pytest.raises(SystemExit, match="key=value"):
        ab.parse_variant("qperm16")
    with pytest.raises(SystemExit, match="not a Python literal"):
        ab.parse_variant("qperm16=maybe")


def test_base_must_be_a_source_tree(tmp_path):
    with pytest.raises(SystemExit, match="git archive"):
        ab.prepare_tree(tmp_path)


def test_variant_arm_matches_the_defaults(tmp_path, monkeypatch):
    """int32 query orders change no arithmetic: the variant's output and gradients equal the defaults' exactly, in
    both rounds (the second round runs the arms in the other order)."""
    out = tmp_path / "ab.json"
    monkeypatch.setattr(sys, "argv", [
        "ab_hyper.py", "--variant", "qperm16=False", "--d", "16", "--n", "200", "--heads", "2", "--rounds", "2",
        "--hyper", '{"lsh_num_projs": 4, "block_size": 32, "sample_size": 16, "min_seq_len": 64}',
        "--out", str(out)])
    rows = ab.main()
    assert [(r["arm"], r["round"]) for r in rows] == [("working", 0), ("working qperm16=False", 0),
                                                        ("working qperm16=False", 1), ("working", 1)]
    assert rows[0]["rel_diff"] is None  # the reference itself
    for r in rows[1:]:
        assert r["rel_diff"] == {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
    assert out.exists()


def test_several_base_trees(tmp_path, monkeypatch):
    """Each --base is an arm of its own, named by its path; the same tree as a base computes the same numbers."""
    monkeypatch.setattr(sys, "argv", [
        "ab_hyper.py", "--base", str(ab.ROOT), "--base", str(ab.ROOT), "--d", "16", "--n", "200", "--heads", "2",
        "--rounds", "1", "--hyper", '{"lsh_num_projs": 4, "block_size": 32, "sample_size": 16, "min_seq_len": 64}'])
    rows = ab.main()
    assert [r["arm"] for r in rows] == ["working", f"base {ab.ROOT}", f"base {ab.ROOT}"]
    for r in rows[1:]:
        assert r["rel_diff"] == {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}

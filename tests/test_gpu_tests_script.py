"""scripts/gpu_tests.py: runs pytest with its plugin and writes the summary the GPU runs are recorded with."""
from __future__ import annotations

import json

from script_helpers import SCRIPTS, load_script

SCRIPT = SCRIPTS / "gpu_tests.py"
SAMPLE = '''
import pytest

def test_pass(): pass
def test_fail(): assert False
def test_skip(): pytest.skip("no")
@pytest.fixture
def broken(): raise RuntimeError("setup")
def test_error(broken): pass
@pytest.mark.parametrize("x", [1, 2])
def test_param(x): assert x == 1
'''


def test_summary_counts_ids_and_metadata(tmp_path, monkeypatch):
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE)
    out = tmp_path / "results" / "gpu_tests.json"
    monkeypatch.setenv("PATCHATTN_COMMIT", "abc123")
    status = load_script(SCRIPT, "gpu_tests").main(["--output", str(out), "--", str(sample), "-p", "no:cacheprovider"])
    result = json.loads(out.read_text())
    assert status == 1
    assert set(result) == {"commit", "complete", "passed", "failed", "skipped", "errors", "failures", "gpu", "torch", "triton",
                           "transformers", "date", "command"}
    assert (result["passed"], result["failed"], result["skipped"], result["errors"]) == (2, 2, 1, 1)
    assert [f.split("::")[-1] for f in result["failures"]] == ["test_error", "test_fail", "test_param[2]"]
    assert all(f.split("::")[0].endswith("test_sample.py") for f in result["failures"])
    assert result["complete"] and result["commit"] == "abc123" and result["command"].startswith("python -m pytest -q ")

"""scripts/render_results.py: the tables of benchmarks/README.md between markers are what their results file renders."""
from __future__ import annotations

import subprocess
import sys

from script_helpers import ROOT, SCRIPTS, load_script

render = load_script(SCRIPTS / "render_results.py", "render_results")


def test_committed_readme_is_current():
    out = subprocess.run([sys.executable, str(SCRIPTS / "render_results.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_check_fails_on_a_stale_table_and_the_rewrite_fixes_it(tmp_path):
    readme = tmp_path / "README.md"
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert "| exact (SDPA) | 98% |" in text
    readme.write_text(text.replace("| exact (SDPA) | 98% |", "| exact (SDPA) | 99% |"))
    assert render.main(["--check", "--readme", str(readme)]) == 1
    assert render.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == text
    assert render.main(["--check", "--readme", str(readme)]) == 0


def _row(setting, task, correct, prefill=1.0, kv=2**20):
    return {"setting": setting, "task": task, "correct": correct, "accuracy": sum(correct) / len(correct),
            "prefill_s": prefill, "kv_bytes": kv}


def test_longctx_table_mean_delta_paired_and_labels():
    rows = [_row("exact", "a", [1, 0, 1, 1]), _row("exact", "b", [0, 0, 1, 1]),
            _row("new", "a", [0, 1, 1, 1], prefill=2.5, kv=3 * 2**20), _row("new", "b", [0, 0, 0, 1], prefill=0.25)]
    lines = render.render_longctx_tasks({"rows": rows}).splitlines()
    assert lines[0] == "| setting | a | b | mean | Δ vs exact | paired | prefill | KV |"
    assert lines[2] == "| exact (SDPA) | 75% | 50% | 62.5 | – | – | 2.0 s | 1 MiB |"
    # new vs exact: a gains sample 1, loses sample 0; b loses sample 2
    assert lines[3] == "| new | 75% | 25% | 50.0 | −12.5 | +1 / −2 | 2.8 s | 1 MiB / 3 MiB |"


def test_hyper_kernels_table_speedups_levers_and_order():
    def row(impl, d, mode, n, ms):
        return {"impl": impl, "d": d, "mode": mode, "n": n, "ms": ms}

    rows = [row("cudnn", 64, "fwd", 8192, 3.0), row("hyper", 64, "fwd", 8192, 1.5), row("flash", 64, "fwd", 8192, 6.0),
            row("hyper", 128, "fwd", 8192, 2.0), row("cudnn", 128, "fwd", 8192, 5.0), row("flash", 128, "fwd", 8192, 8.0),
            row("hyper+levers", 128, "fwd", 8192, 2.5)]
    lines = render.render_hyper_kernels(rows).splitlines()
    assert lines[0].startswith("| d | mode | n | hyper | cuDNN | flash |")
    assert lines[2] == "| 128 | fwd | 8192 | 2.000 | 5.000 | 8.000 | 2.50 | 4.00 | 2.500 | 2.00 | +25% |"
    assert lines[3] == "| 64 | fwd | 8192 | 1.500 | 3.000 | 6.000 | 2.00 | 4.00 |  |  |  |"
    assert len(lines) == 4

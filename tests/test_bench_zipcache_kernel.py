"""scripts/bench_zipcache_kernel.py as a CPU smoke test (the reference path): a row per context and setting, the
packed cache smaller than the bf16 one, the quantised paths' errors alike and the JSON, plot and command written."""
from __future__ import annotations

import json

import pytest
from script_helpers import SCRIPTS, load_script

pytestmark = pytest.mark.usefixtures("one_thread")

bench = load_script(SCRIPTS / "bench_zipcache_kernel.py", "bench_zipcache_kernel")


def test_cpu_run_writes_a_row_per_case(tmp_path):
    argv = ["--out", str(tmp_path), "--device", "cpu", "--contexts", "1024,2048", "--recent", "16", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "64", "--batches", "1"]
    rows = bench.main(argv)
    data = json.loads((tmp_path / "zipcache_kernel.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert data["command"] == "python scripts/bench_zipcache_kernel.py " + " ".join(argv)
    assert (tmp_path / "zipcache_kernel.png").stat().st_size > 0
    assert [(r["context"], r["setting"]) for r in rows] == [(c, s) for c in (1024, 2048) for s in ("paper", "default")]
    for r in rows:
        assert r["fused_bytes"] < r["sdpa_bytes"] / 3 < r["torch_bytes"], r  # 2-4-bit codes vs bf16
        assert r["fused_kernel_error"] < 1e-2  # the reference on CPU: the same dequantised attention
        assert abs(r["fused_error"] - r["torch_error"]) < 0.1 * r["torch_error"] + 1e-2
        assert r["sdpa_error"] < 0.05 < r["torch_error"] * 20  # bf16 rounding vs quantisation error
        assert "fused_kernels_us" not in r  # CUDA only

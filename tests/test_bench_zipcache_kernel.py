"""scripts/bench_zipcache_kernel.py as a CPU smoke test (the reference path): a row per context and setting, the
packed cache smaller than the bf16 one, the quantised paths' errors alike and the JSON, plot and command written."""
from __future__ import annotations

import json

import pytest
import torch
from script_helpers import SCRIPTS, load_script

from patchattn.variants.zipcache import ZipCacheParams

pytestmark = pytest.mark.usefixtures("one_thread")

bench = load_script(SCRIPTS / "bench_zipcache_kernel.py", "bench_zipcache_kernel")


def test_cpu_run_writes_a_row_per_case(tmp_path):
    argv = ["--out", str(tmp_path), "--device", "cpu", "--contexts", "1024,2048", "--recent", "16", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "64", "--batches", "1"]
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


@pytest.mark.parametrize("setting, parts", [("default", 1), ("paper", 2)])
def test_layer_state_stores_blocks_as_the_cache_does(setting, parts):
    """Salient tokens first only where they get more bits (the paper's 4/2): at the default's equal bits the cache
    keeps token order, one value tensor, so the kernel streams one segment, not two."""
    params = ZipCacheParams(**bench.SETTINGS[setting])
    gen = torch.Generator().manual_seed(0)
    *_, block, fp_keys, _ = bench.layer_state(1, 2, 64, 300, 8, params, "cpu", torch.float32, gen)
    assert len(block.values) == parts and (block.bitmap is None) == (parts == 1)
    assert block.n == 300 - params.sink_tokens and fp_keys.shape[2] == params.sink_tokens + 8

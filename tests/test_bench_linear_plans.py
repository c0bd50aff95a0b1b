"""scripts/bench_linear_plans.py on CPU: its arguments fail clearly, and its plot reads the rows it writes (the
timing itself needs CUDA and runs on the GPU)."""
from __future__ import annotations

import pytest
from script_helpers import SCRIPTS, load_script

plans = load_script(SCRIPTS / "bench_linear_plans.py", "bench_linear_plans")


def test_plans_and_shapes_parse_or_name_the_bad_item():
    assert plans.parse_plans("0/0/0,64/64/16") == [(0, 0, 0), (64, 64, 16)]
    assert plans.parse_shapes("1x16384,8x32768") == [(1, 16384), (8, 32768)]
    with pytest.raises(SystemExit, match="'64/64' is not bk/bv/segments"):
        plans.parse_plans("0/0/0,64/64")
    with pytest.raises(SystemExit, match="'131072' is not <batch>x<tokens>"):
        plans.parse_shapes("131072")


def test_plot_draws_a_line_per_tile_and_fla_from_the_rows(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn, hlines = [], []
    original_plot, original_axhline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axhline

    def plot(ax, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(args[1])))
        return original_plot(ax, *args, **kwargs)

    def axhline(ax, y, *args, **kwargs):
        hlines.append(y)
        return original_axhline(ax, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", axhline)
    rows = [{"name": f"ours_64x64_seg{s}", "b": 1, "n": 16384, "kernels": {"_fwd_state_kernel": ms}}
            for s, ms in ((16, 0.2), (1, 0.4))]
    rows += [{"name": "ours_32x32_seg1", "b": 1, "n": 16384, "kernels": {"_fwd_state_kernel": 0.25}},
             {"name": "fla", "b": 1, "n": 16384, "kernels": {"chunk_fwd_kernel_h": 0.18}},
             {"name": "ours_32x32_seg4", "b": 1, "n": 16384, "error": "OutOfMemoryError"},
             {"name": "ours_32x32_seg1", "b": 8, "n": 32768, "kernels": {"_fwd_state_kernel": 2.0}}]
    plans.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    # a line per tile width and shape, ordered by segments; the failed row left out; fla as its reference line
    assert sorted(drawn) == [("32x32 tiles", [0.25]), ("32x32 tiles", [2.0]), ("64x64 tiles", [0.4, 0.2])]
    assert hlines == [0.18]

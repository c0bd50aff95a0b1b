"""scripts/_bench.py, the module the benchmark and evaluation scripts share: the environment block their JSON
records, and the JSON / figure writers (the GPU timing helpers need CUDA and run with the benchmarks)."""
from __future__ import annotations

import datetime
import json
import re

from script_helpers import SCRIPTS, load_script

bench = load_script(SCRIPTS / "_bench.py", "_bench")


def test_environment_block_keys_and_formats(monkeypatch):
    monkeypatch.setattr("sys.argv", ["scripts/x.py", "--out", "a b"])
    env = bench.environment(False, packages=("torch", "surely_not_installed_pkg"))
    assert list(env) == ["gpu", "torch", "surely_not_installed_pkg", "date", "command"]
    assert env["gpu"] == "cpu" and env["surely_not_installed_pkg"] is None
    assert env["date"] == datetime.date.today().isoformat()
    assert env["command"] == "python scripts/x.py --out 'a b'"  # re-runnable as printed
    env = bench.environment(False, cpu=None, key="device", packages=(), date="utc", with_command=False)
    assert list(env) == ["device", "date"] and env["device"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["date"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", bench.stamp("seconds"))
    monkeypatch.setenv("PATCHATTN_COMMIT", "abc123")
    assert bench.commit(short=True) == "abc123"


def test_write_json_makes_the_folder_and_save_figure_closes(tmp_path):
    path = bench.write_json(tmp_path / "a" / "b.json", {"x": [1, 2]}, indent=2)
    assert path.read_text() == json.dumps({"x": [1, 2]}, indent=2)
    plt = bench.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    bench.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0 and not plt.fignum_exists(fig.number)


def test_timer_without_cuda_counts_milliseconds():
    timer = bench.Timer(cuda=False)
    timer.start()
    assert 0 <= timer.stop_ms() < 1e4


def test_idle_gaps_from_a_profiler_timeline(monkeypatch):
    """busy = kernel time, span = first start to last end, gaps = the rest, largest first (a fake timeline: the
    profiler needs CUDA)."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA

    class Event:
        def __init__(self, start, end, name, device=cuda):
            self.time_range = type("Range", (), {"start": start, "end": end})()
            self.name, self.device_type, self.device_time_total = name, device, end - start

    class FakeProfile:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):  # out of order, plus a CPU op that must not count
            return [Event(260, 300, "c"), Event(0, 100, "a"), Event(110, 200, "b"),
                    Event(0, 500, "cpu op", torch.autograd.DeviceType.CPU)]

    monkeypatch.setattr("torch.profiler.profile", FakeProfile)
    monkeypatch.setattr("torch.cuda.synchronize", lambda: None)
    calls = []
    gaps = bench.idle_gaps(lambda: calls.append(1), top=1)
    assert len(calls) == 2  # a warm-up call, then the profiled one
    assert gaps["kernels"] == 3 and gaps["top_gaps"] == [{"gap_us": 60, "after": "b", "before": "c"}]
    assert (gaps["busy_ms"], gaps["span_ms"]) == (0.23, 0.3) and abs(gaps["gaps_ms"] - 0.07) < 1e-12

"""What the scripts here share: the environment a result was made in, JSON and PNG writing, GPU timing.

Scripts run as ``python scripts/x.py``, so this file's folder is on ``sys.path`` and ``from _bench import ...``
works; tests that load a script by path put scripts/ on ``sys.path`` first (tests/script_helpers.py). Importing
this module imports nothing heavy: torch, triton and matplotlib are imported where a function needs them
(scripts/gpu_tests.py is also a pytest plugin, and triton must not be imported before tests/conftest.py runs).
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# -- environment -----------------------------------------------------------------------------------------------------
def version(package: str) -> str | None:
    """``package.__version__``, or None where it is not installed. Two names are not packages: ``cuda`` (the CUDA
    torch was built with, ``torch.version.cuda``) and ``cudnn`` (``torch.backends.cudnn.version()``)."""
    if package in ("cuda", "cudnn"):
        import torch

        return torch.version.cuda if package == "cuda" else torch.backends.cudnn.version()
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


def versions(*packages: str) -> dict[str, str | None]:
    """``{package: version(package)}`` in the order given."""
    return {p: version(p) for p in packages}


def device_name(cuda: bool | None = True, cpu: str | None = "cpu") -> str | None:
    """The GPU's name where ``cuda`` (None: where torch sees one), else ``cpu`` (what the script records for a run
    without one)."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    return torch.cuda.get_device_name() if cuda else cpu


def command(argv: list[str] | None = None) -> str:
    """The command line that made the result, re-runnable: ``python`` and ``argv`` (default ``sys.argv``),
    shell-quoted."""
    return "python " + shlex.join(sys.argv if argv is None else argv)


def stamp(kind: str = "day") -> str:
    """When: ``day`` (2026-12-02), ``seconds`` (local time, 2026-12-02T10:11:12) or ``utc`` (with +00:00)."""
    if kind == "day":
        return datetime.date.today().isoformat()
    if kind == "seconds":
        return datetime.datetime.now().isoformat(timespec="seconds")
    if kind == "utc":
        return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    raise ValueError(f"stamp kind {kind!r}: day, seconds or utc")


def commit(short: bool = False) -> str | None:
    """The commit: ``PATCHATTN_COMMIT`` if set (a copied checkout's .git can be stale), else ``git rev-parse HEAD``
    in the repository; None where neither answers."""
    if os.environ.get("PATCHATTN_COMMIT"):
        return os.environ["PATCHATTN_COMMIT"]
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(cuda: bool | None = True, *, cpu: str | None = "cpu", key: str = "gpu",
                packages: tuple[str, ...] = ("torch", "triton"), date: str | None = "day",
                argv: list[str] | None = None, with_command: bool = True) -> dict:
    """``{key: device_name(cuda, cpu), <package>: version, ..., "date": stamp(date), "command": command(argv)}``
    (no date where ``date`` is None, no command without ``with_command``): where and with what a result was made."""
    env = {key: device_name(cuda, cpu), **versions(*packages)}
    if date is not None:
        env["date"] = stamp(date)
    if with_command:
        env["command"] = command(argv)
    return env


# -- files -----------------------------------------------------------------------------------------------------------
def write_json(path, data, indent: int = 1, **kwargs) -> Path:
    """``json.dumps(data, indent=indent, **kwargs)`` to ``path``, its folder made first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, **kwargs))
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 120) -> None:
    """Lay ``fig`` out tightly, write it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# -- GPU timing ------------------------------------------------------------------------------------------------------
class Timer:
    """Milliseconds from ``start()`` to ``stop_ms()``: CUDA events where ``cuda`` (``start`` waits for work queued
    before it, ``stop_ms`` for the GPU to get there), ``time.perf_counter`` elsewhere (CPU smoke runs)."""

    def __init__(self, cuda: bool = True):
        self.cuda = cuda
        if cuda:
            import torch

            self.sync = torch.cuda.synchronize
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.sync()
            self.s.record()
        else:
            self.t = time.perf_counter()

    def stop_ms(self) -> float:
        if self.cuda:
            self.e.record()
            self.e.synchronize()
            return self.s.elapsed_time(self.e)
        return (time.perf_counter() - self.t) * 1e3


def bench_ms(fn, *args, rep: int = 100) -> float:
    """Median ms of ``fn(*args)`` under no_grad: ``triton.testing.do_bench`` (25 ms warm-up, ``rep`` ms)."""
    import torch
    from triton.testing import do_bench

    with torch.no_grad():
        return do_bench(lambda: fn(*args), warmup=25, rep=rep, return_mode="median")


def bench_attention_ms(fn, q, k, v, mode: str, dout=None, rep: int = 100) -> float:
    """Median ms of attention ``fn(q, k, v)``: ``fwd`` under no_grad, or ``fwd+bwd`` (``.backward(dout)`` on copies
    that require grad, their grads cleared between repetitions)."""
    if mode == "fwd":
        return bench_ms(fn, q, k, v, rep=rep)
    from triton.testing import do_bench

    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    return do_bench(lambda: fn(qg, kg, vg).backward(dout), warmup=25, rep=rep, grad_to_none=[qg, kg, vg],
                    return_mode="median")


def kernel_times(fn, steps: int = 20, warmup: int = 1) -> list[tuple[str, float, int]]:
    """``(kernel, µs per call, launches per call)`` of every CUDA kernel ``fn()`` runs, most time first (torch
    profiler over ``steps`` calls after ``warmup`` untimed ones): where a call's GPU time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / steps, e.count // steps) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda row: -row[1])


def idle_gaps(fn, top: int = 8) -> dict:
    """How much of one ``fn()`` call the GPU spends between kernels (torch profiler timeline, after a warm-up call):
    ``kernels``, ``busy_ms`` (kernel time), ``span_ms`` (first kernel start to last kernel end), ``gaps_ms`` and
    the ``top`` largest gaps with the kernels on either side. A timed loop that enqueues ahead hides host gaps
    that a single call shows at its start; the gaps between back-to-back kernels are what launches cost."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0)
    if not spans:
        return {"kernels": 0, "busy_ms": 0.0, "span_ms": 0.0, "gaps_ms": 0.0, "top_gaps": []}
    busy = sum(end - start for start, end, _ in spans)
    span = spans[-1][1] - spans[0][0]
    gaps = sorted(((b[0] - a[1], a[2][:60], b[2][:60]) for a, b in zip(spans, spans[1:])), reverse=True)
    return {"kernels": len(spans), "busy_ms": busy / 1e3, "span_ms": span / 1e3, "gaps_ms": (span - busy) / 1e3,
            "top_gaps": [{"gap_us": round(g, 1), "after": a, "before": b} for g, a, b in gaps[:top]]}


def rel_err(a, b) -> float:
    """``|a - b| / |b|`` (Frobenius norms, in float32)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def peak_mb(fn, q, k, v, mode: str = "fwd", dout=None) -> float:
    """Peak CUDA memory (MiB) that attention ``fn(q, k, v)`` allocates beyond what is allocated before it: ``fwd``
    under no_grad, or ``fwd+bwd`` with ``.backward(dout)``."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if mode == "fwd":
        with torch.no_grad():
            out = fn(q, k, v)
    else:
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        out = fn(qg, kg, vg)
        out.backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20

"""Run the test suite and write a JSON summary (counts, failing test ids, versions, commit), for the GPU machine.

    python scripts/gpu_tests.py [--output benchmarks/results/gpu_tests.json] [-- extra pytest arguments]

pytest runs in a child process (``python -m pytest -q``, as the README runs it) with this file loaded as a plugin
(``-p gpu_tests``) that records every test's outcome by its exact node id. On a CUDA machine a stray
``TRITON_INTERPRET`` is removed from the child's environment so the kernels run compiled (tests/conftest.py only
sets it where CUDA is absent). The commit is ``PATCHATTN_COMMIT`` if set (a copied checkout's .git can be stale),
else ``git rev-parse HEAD``. The exit status is pytest's.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import ROOT, commit, environment, stamp

TALLY_ENV = "PATCHATTN_GPU_TESTS_TALLY"

# -- the plugin (runs inside pytest) ---------------------------------------------------------------------------------
_outcomes: dict[str, str] = {}
_writes_tally = True  # false in pytest-xdist workers: their reports reach the controller, which writes


def pytest_configure(config) -> None:
    global _writes_tally
    _writes_tally = not hasattr(config, "workerinput")


def _record(nodeid: str, outcome: str) -> None:
    """Keep the worst outcome per test (a teardown error after a pass still makes the test an error), and write the
    tally as tests finish, so a run stopped at a time limit still says what ran."""
    rank = ("passed", "skipped", "failed", "error")
    if rank.index(outcome) >= rank.index(_outcomes.get(nodeid, "passed")):
        _outcomes[nodeid] = outcome
    path = os.environ.get(TALLY_ENV)
    if path and _writes_tally:
        Path(path).write_text(json.dumps(_outcomes))


def pytest_runtest_logreport(report) -> None:
    if report.failed:
        _record(report.nodeid, "failed" if report.when == "call" else "error")
    elif report.skipped:
        _record(report.nodeid, "skipped")
    elif report.when == "call":
        _record(report.nodeid, "passed")


def pytest_collectreport(report) -> None:
    if report.failed:  # a test file that does not import: every test in it is missing
        _record(report.nodeid, "error")
    elif report.skipped:  # a module-level skip (e.g. an optional package missing) counts as one, as pytest does
        _record(report.nodeid, "skipped")


# -- the driver ------------------------------------------------------------------------------------------------------
def summarize(outcomes: dict[str, str]) -> dict:
    """Counts per outcome and the sorted ids of the tests that failed or errored."""
    counts = {key: sum(v == key for v in outcomes.values()) for key in ("passed", "failed", "skipped")}
    counts["errors"] = sum(v == "error" for v in outcomes.values())
    counts["failures"] = sorted(k for k, v in outcomes.items() if v in ("failed", "error"))
    return counts


def _workers(pytest_args: list[str]) -> int:
    """pytest-xdist's ``-n N`` (1 without it)."""
    for i, arg in enumerate(pytest_args):
        if arg == "-n" and i + 1 < len(pytest_args) and pytest_args[i + 1].isdigit():
            return int(pytest_args[i + 1])
        if arg.startswith("-n") and arg[2:].isdigit():
            return int(arg[2:])
    return 1


def run_pytest(pytest_args: list[str], cuda: bool, timeout_s: float | None) -> tuple[int | None, dict[str, str]]:
    """``python -m pytest -q`` in the repository root with this plugin; returns (exit status, or None when stopped
    at ``timeout_s``; outcomes so far)."""
    env = dict(os.environ)
    if cuda:
        env.pop("TRITON_INTERPRET", None)  # the kernels must run compiled where CUDA exists
    # N xdist workers each running torch with every core's threads oversubscribe the CPU many times over
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers(pytest_args))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        env[TALLY_ENV] = tally = os.path.join(tmp, "tally.json")
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "gpu_tests", *pytest_args], cwd=ROOT,
                                env=env, start_new_session=True)
        try:
            status = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = None
        outcomes = json.loads(Path(tally).read_text()) if os.path.exists(tally) else {}
    return status, outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/results/gpu_tests.json",
                        help="where the JSON summary goes (relative to the repository root)")
    parser.add_argument("--timeout-s", type=float, help="stop pytest after this many seconds; the JSON then says "
                                                           "'complete': false and counts what ran")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after '--'")
    args = parser.parse_args(argv)
    # GPU and library versions, read in this process (never in pytest's: importing triton there before conftest.py
    # would fix the interpreter switch too early)
    env = environment(None, cpu=None, packages=("torch", "triton", "transformers"), date=None, with_command=False)
    status, outcomes = run_pytest(args.pytest_args, cuda=env["gpu"] is not None, timeout_s=args.timeout_s)
    result = {"commit": commit(), "complete": status is not None, **summarize(outcomes), **env,
              "date": stamp("utc"),
              "command": " ".join(["python", "-m", "pytest", "-q", *args.pytest_args])}
    if status is None:
        status = 124
    elif not outcomes and status not in (0, 5):  # 5: no test selected
        result["errors"] = max(result["errors"], 1)  # pytest died before reporting anything
        result["failures"] = [f"pytest exited with status {status} before reporting"]
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped, "
          f"{result['errors']} errors -> {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Continue-train SmolLM2-135M (real weights) with the trainable variants on one GPU, then one FSDP run.

    python scripts/gpu_continue_train.py --out DIR [--steps 300] [--variants gated affine moh sigmoid]

Runs ``accelerate launch recipes/continue_train.py --config recipes/smollm2/<variant>.yaml`` for each variant (the
recipe's own held-out perplexity at step 0 and every ``eval_every`` steps), then the gated recipe under the FSDP
accelerate config for a few steps, and writes one JSON (configs, loss curves, perplexities, environment) and one PNG
(train loss and held-out perplexity per variant) to ``--out``. Checkpoints and models stay in ``--runs``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _bench import ROOT, environment, pyplot, save_figure, write_json


def launch(accelerate_config: str, recipe_config: str, output_dir: Path, overrides: dict, log_file: Path,
           num_processes: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += [str(ROOT / "recipes" / "continue_train.py"), "--config", recipe_config, "--output_dir", str(output_dir)]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value)]
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    result = {"command": " ".join(cmd), "returncode": proc.returncode, "seconds": round(seconds, 1)}
    if proc.returncode != 0:
        result["log_tail"] = log_file.read_text()[-3000:]
        return result
    with open(output_dir / "log.jsonl") as f:
        result["records"] = [json.loads(line) for line in f if line.strip()]
    result["summary"] = json.loads((output_dir / "summary.json").read_text())
    return result


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    runs = {k: v for k, v in results.items() if v.get("records")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, run in runs.items():
        records = run["records"]
        axes[0].plot([r["step"] for r in records], [r["loss"] for r in records], label=name, lw=1)
        evals = [(0, run["summary"]["eval_ppl_start"])] + [(r["step"], r["eval_ppl"]) for r in records
                                                            if r.get("eval_ppl") is not None]
        axes[1].plot(*zip(*evals), "o-", label=name)
    axes[0].set(xlabel="optimizer step", ylabel="train loss (nats/token)", title="SmolLM2-135M continue-training")
    axes[1].set(xlabel="optimizer step", ylabel="held-out perplexity (log scale)", yscale="log",
                title="held-out Shakespeare perplexity")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="/tmp/patchattn_runs")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fsdp-steps", type=int, default=30)
    parser.add_argument("--variants", nargs="+", default=["gated", "affine", "moh", "sigmoid"])
    parser.add_argument("--config-dir", default=str(ROOT / "recipes" / "smollm2"), help="<variant>.yaml live here")
    args = parser.parse_args()
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    import torch

    env = environment(None, packages=("torch", "transformers", "accelerate", "peft"), date=None, with_command=False)
    report = {"environment": {**env, "gpus": torch.cuda.device_count(), "python": platform.python_version()},
              "steps": args.steps, "runs": {}}
    from tqdm.auto import tqdm

    single = str(ROOT / "recipes" / "accelerate_configs" / "single_gpu.yaml")
    for variant in tqdm(args.variants, desc="variants"):
        config = str(Path(args.config_dir) / f"{variant}.yaml")
        report["runs"][variant] = launch(single, config, runs / variant, {"max_steps": args.steps, "resume": False},
                                         runs / f"{variant}.log")
        report["runs"][variant]["config"] = Path(config).read_text()
        write_json(out / "continue_train_smollm2.json", report)
    if args.fsdp_steps:
        # FSDP2 with every visible GPU (one on a single-GPU machine: the wrapping and the sharded state dict still run)
        report["runs"]["gated_fsdp"] = launch(
            str(ROOT / "recipes" / "accelerate_configs" / "fsdp.yaml"), str(Path(args.config_dir) / "gated.yaml"),
            runs / "gated_fsdp", {"max_steps": args.fsdp_steps, "resume": False, "eval_every": 10,
                                  "save_every": 15}, runs / "gated_fsdp.log",
            num_processes=max(torch.cuda.device_count(), 1))
    write_json(out / "continue_train_smollm2.json", report)
    plot(report["runs"], out / "continue_train_smollm2.png")

    print(f"\n{report['environment']}")
    print(f"{'run':<12} {'rc':>3} {'sec':>7} {'ppl@0':>9} {'ppl@end':>9} {'loss@1':>8} {'loss@end':>8}")
    for name, run in report["runs"].items():
        s, r = run.get("summary", {}), run.get("records") or [{}]
        fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"
        print(f"{name:<12} {run['returncode']:>3} {run['seconds']:>7} {fmt(s.get('eval_ppl_start'), '9.3f')} "
              f"{fmt(s.get('eval_ppl_end'), '9.3f')} {fmt(r[0].get('loss'), '8.4f')} {fmt(r[-1].get('loss'), '8.4f')}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

"""Render measurement tables of benchmarks/README.md from their results file, so the README cannot drift from the data.

    python scripts/render_results.py            # rewrite every table between its markers in benchmarks/README.md
    python scripts/render_results.py --check    # exit 1 (and show a diff) where a table differs from its rendering
    python scripts/render_results.py --print longctx_tasks    # print one table

A table lives between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in the README and is rendered from one JSON
file of one run. Tables so far:

``longctx_tasks``: ``benchmarks/results/longctx_tasks.json`` (``scripts/longctx_tasks.py``): one row per setting,
accuracy per task, the mean over tasks, its difference to the setting named ``exact``, the paired counts (samples
the setting got right and exact wrong / wrong and exact right, from the per-sample ``correct`` lists), the summed
prefill seconds and the KV cache after one prompt.

``longctx_retrieval_heads``: ``benchmarks/results/longctx_retrieval_heads.json``, the same table for the run that
measured exact retrieval heads; ``longctx_defaults``: ``benchmarks/results/longctx_defaults.json``, the run of the
new defaults.

``longctx_e2e``: ``benchmarks/results/longctx_e2e.json`` (``scripts/bench_longctx.py``), the long-context job;
``zipcache_kernel``: ``benchmarks/results/zipcache_kernel_h200.json`` (``scripts/bench_zipcache_kernel.py``), one
ZipCache decode attention vs bf16 SDPA.

``hyper_kernels``: ``benchmarks/results/hyper_attention.json`` (``scripts/bench_hyper.py``), one HyperAttention layer
vs cuDNN / flash SDPA.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "benchmarks" / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
MINUS, DASH = "\u2212", "\u2013"

#: setting name in longctx_tasks.json -> the README's description, in the README's row order. A setting missing here
#: is rendered under its own name after these.
LONGCTX_LABELS = {
    "exact": "exact (SDPA)",
    "hyper-tail-s16 (default)": "`hyper` **default**: `exact_tail=256`, 16 sinks + 240 samples",
    "hyper-tail": "`hyper`, `exact_tail=256` only (the previous default)",
    "hyper-tail-s16 min_seq_len=8192": "`hyper` default, `min_seq_len=8192`",
    "hyper-tail-s16 @last:22": '`hyper` default, `layers="last:22"`',
    "dhsa-tail (default)": "`dhsa` **default**: `exact_tail=256`",
    "dhsa-notail": "`dhsa`, `exact_tail=0` (the previous default)",
    "dhsa-notail budget_tokens=4096": "`dhsa`, `exact_tail=0`, `budget_tokens=4096`",
    "dhsa-notail @last:22": '`dhsa`, `exact_tail=0`, `layers="last:22"`',
    "zipcache (default)": "`zipcache` **default** (the measured recommendation)",
}


def _signed(x: float) -> str:
    """``x`` to one decimal with its sign (a typographic minus), ``0.0`` unsigned."""
    r = round(x, 1)
    return f"{0:.1f}" if r == 0 else ("+" if r > 0 else MINUS) + f"{abs(r):.1f}"


#: the same for ``longctx_retrieval_heads.json`` (the run that measured exact retrieval heads, commit 2a7f555)
RETRIEVAL_HEADS_LABELS = {
    "exact": "exact (SDPA)",
    "hyper-rh25": "`hyper`, `retrieval_heads=0.25` (**the default since**)",
    "hyper-rh50": "`hyper`, `retrieval_heads=0.5`",
    "hyper-rh25-ms8k": "`hyper`, `retrieval_heads=0.25`, `min_seq_len=8192`",
    "dhsa-rh25": "`dhsa`, `retrieval_heads=0.25` (**the default since**)",
    "dhsa-rh50": "`dhsa`, `retrieval_heads=0.5`",
    "zipcache-pk": "`zipcache`, `probe_kernel=True` (the default since; 2-bit values then)",
}


def render_longctx_tasks(data: dict, labels: dict[str, str] = LONGCTX_LABELS) -> str:
    """The markdown table of a ``scripts/longctx_tasks.py`` results file (``{"rows": [...]}``)."""
    rows = data["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    settings.sort(key=lambda s: list(labels).index(s) if s in labels else len(labels))
    cell = {}
    for r in rows:
        key = (r["setting"], r["task"])
        if key in cell:
            raise ValueError(f"two rows for setting {key[0]!r}, task {key[1]!r}")
        cell[key] = r
    if "exact" not in settings:
        raise ValueError("no setting named 'exact' to compare against")
    exact_mean = sum(cell["exact", t]["accuracy"] for t in tasks) / len(tasks) * 100

    lines = ["| setting | " + " | ".join(tasks) + " | mean | Δ vs exact | paired | prefill | KV |",
             "|---|" + "---:|" * (len(tasks) + 5)]
    for s in settings:
        missing = [t for t in tasks if (s, t) not in cell]
        if missing:
            raise ValueError(f"setting {s!r} has no row for {missing}")
        accs = [cell[s, t]["accuracy"] * 100 for t in tasks]
        mean = sum(accs) / len(accs)
        if s == "exact":
            delta = paired = DASH
        else:
            gained = lost = 0
            for t in tasks:
                mine, ref = cell[s, t]["correct"], cell["exact", t]["correct"]
                if len(mine) != len(ref):
                    raise ValueError(f"setting {s!r}, task {t!r}: {len(mine)} samples, exact has {len(ref)}")
                gained += sum(1 for a, b in zip(mine, ref) if a and not b)
                lost += sum(1 for a, b in zip(mine, ref) if b and not a)
            delta = _signed(mean - exact_mean)
            paired = f"+{gained} / {MINUS}{lost}"
        prefill = sum(cell[s, t]["prefill_s"] for t in tasks)
        kv = {cell[s, t]["kv_bytes"] for t in tasks}
        kv_text = " / ".join(f"{b / 2**20:.0f} MiB" for b in sorted(kv))
        lines.append(f"| {labels.get(s, s)} | " + " | ".join(f"{a:.0f}%" for a in accs)
                     + f" | {mean:.1f} | {delta} | {paired} | {prefill:.1f} s | {kv_text} |")
    return "\n".join(lines) + "\n"


#: the same for ``longctx_defaults.json`` (the defaults of commit a6fe097 and two ZipCache levers, one run)
DEFAULTS_LABELS = {
    "exact": "exact (SDPA)",
    "hyper-default": "`hyper` **default** (`retrieval_heads=0.25`)",
    "dhsa-default": "`dhsa` **default** (`retrieval_heads=0.25`)",
    "zc-lb4": "`zipcache`, `low_bits=4` (**the default since**)",
    "zc-sr40": "`zipcache`, `salient_ratio=0.4` (2-bit values)",
}

#: bench_longctx.py's variants in the README's row order
E2E_ORDER = ["exact", "hyper", "dhsa", "zipcache", "hyper+zipcache", "dhsa+zipcache"]


def render_longctx_e2e(data: dict) -> str:
    """``benchmarks/results/longctx_e2e.json`` (``scripts/bench_longctx.py``): one row per shape, prompt length and
    variant (with the parameters it ran with), in that order."""
    def order(r):
        v = r["variant"]
        return r["shape"], r["n"], E2E_ORDER.index(v) if v in E2E_ORDER else len(E2E_ORDER), v
    lines = ["| shape | prompt | variant | status | prefill | decode | KV cache (bf16 would be) | peak | approximated "
             "layers | commit |", "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(data["rows"], key=order):
        params = ", ".join(f"{v}.{k}={x}" for v, p in (r.get("params") or {}).items() for k, x in p.items())
        variant = f"`{r['variant']}`" + (f" ({params})" if params else "")
        status = r["status"] + (f" ({r['oom_phase']})" if r.get("oom_phase") else "")
        ok = r["status"] == "ok"
        kv = (f"{r['kv_bytes'] / 2**30:.2f} GiB" if ok else DASH) + f" ({r['kv_bytes_full'] / 2**30:.1f} GiB)"
        speed = f"{r['prefill_s']:.1f} s | {r['decode_tok_s']:.1f} tok/s" if ok else f"{DASH} | {DASH}"
        memory = f"{r['peak_gb']:.1f} GB | {r['approx_layers']}" if ok else f"{DASH} | {DASH}"
        lines.append(f"| {r['shape'].upper()} | {r['n']:,} | {variant} | {status} | {speed} | {kv} | {memory} | "
                     f"{r.get('commit', DASH)} |")
    return "\n".join(lines) + "\n"


def render_zipcache_kernel(data: dict) -> str:
    """``benchmarks/results/zipcache_kernel_h200.json`` (``scripts/bench_zipcache_kernel.py``): per case the CUDA-graph
    times (GPU alone) of bf16 SDPA and the fused kernel, the speed-up, the bytes read per second, and the eager
    time (host launch overhead included)."""
    lines = ["| batch | context | setting | bf16 SDPA (KV) | fused kernel (KV) | fused vs SDPA | fused GB/s | fused, "
             "eager | kernel error |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['context']:,} | {r['setting']} | {r['error'][:60]} |"
                         + " |" * 5)
            continue
        heads = f" (h={r['heads']})" if r.get("heads", 32) != 32 else ""  # the 3B shape at 1M
        sdpa = f"{r['sdpa_graph_ms']:.3f} ms ({r['sdpa_bytes'] / 2**20:.0f} MiB)"
        fused = f"{r['fused_graph_ms']:.3f} ms ({r['fused_bytes'] / 2**20:.0f} MiB)"
        lines.append(f"| {r['batch']} | {r['context']:,}{heads} | {r['setting']} | {sdpa} | {fused} | "
                     f"**{r['fused_graph_speedup']:.2f}×** | {r['fused_graph_gbs']:.0f} | {r['fused_ms']:.3f} ms | "
                     f"{r['fused_kernel_error']:.1e} |")
    return "\n".join(lines) + "\n"


def render_hyper_kernels(rows: list) -> str:
    """``benchmarks/results/hyper_attention.json`` (``scripts/bench_hyper.py``): per head dim, mode and length the
    hyper, cuDNN and flash SDPA medians, the speed-ups, and hyper with the quality levers where the run has them
    (their speed-up and their cost relative to plain hyper)."""
    ms = {(r["impl"], r["d"], r["mode"], r["n"]): r["ms"] for r in rows}
    lines = ["| d | mode | n | hyper | cuDNN | flash | x cuDNN | x flash | hyper+levers | levers x cuDNN | levers "
             "cost |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    shapes = sorted({(d, mode, n) for impl, d, mode, n in ms if impl == "hyper"}, key=lambda s: (-s[0], s[1], s[2]))
    for d, mode, n in shapes:
        hyper, cudnn, flash = (ms.get((impl, d, mode, n)) for impl in ("hyper", "cudnn", "flash"))
        cells = [f"{hyper:.3f}", f"{cudnn:.3f}", f"{flash:.3f}", f"{cudnn / hyper:.2f}", f"{flash / hyper:.2f}"]
        levers = ms.get(("hyper+levers", d, mode, n))
        cells += ([f"{levers:.3f}", f"{cudnn / levers:.2f}", f"{(levers / hyper - 1) * 100:+.0f}%"] if levers
                  else ["", "", ""])
        lines.append(f"| {d} | {mode} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TABLES = {
    "hyper_kernels": (RESULTS / "hyper_attention.json", render_hyper_kernels),
    "longctx_e2e": (RESULTS / "longctx_e2e.json", render_longctx_e2e),
    "zipcache_kernel": (RESULTS / "zipcache_kernel_h200.json", render_zipcache_kernel),
    "longctx_tasks": (RESULTS / "longctx_tasks.json", render_longctx_tasks),
    "longctx_defaults": (RESULTS / "longctx_defaults.json", lambda data: render_longctx_tasks(data, DEFAULTS_LABELS)),
    "longctx_retrieval_heads": (RESULTS / "longctx_retrieval_heads.json",
                                lambda data: render_longctx_tasks(data, RETRIEVAL_HEADS_LABELS)),
}


def render(name: str) -> str:
    path, fn = TABLES[name]
    return fn(json.loads(path.read_text()))


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"


def splice(text: str, name: str, table: str) -> str:
    """``text`` with the part between ``name``'s markers replaced by ``table``."""
    begin, end = _markers(name)
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"no {begin.strip()} ... {end} markers in the README")
    return text[:i + len(begin)] + table + text[j:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--check", action="store_true", help="exit 1 where the README differs from the rendering")
    ap.add_argument("--print", dest="show", metavar="NAME", choices=sorted(TABLES), help="print one table")
    args = ap.parse_args(argv)
    if args.show:
        sys.stdout.write(render(args.show))
        return 0
    old = args.readme.read_text()
    new = old
    for name in TABLES:
        new = splice(new, name, render(name))
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       str(args.readme), "rendered"))
            print(f"{args.readme} is stale: run python scripts/render_results.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.readme.write_text(new)
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

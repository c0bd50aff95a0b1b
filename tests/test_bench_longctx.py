"""scripts/bench_longctx.py (the long-context job, issue #15) in ``--tiny`` mode on CPU: every variant's row is
there and ok, zipcache compresses, hyper/dhsa really approximate, the chunked position-wise layers give the
unchunked logits, ``--append`` merges, ``--param`` parses, the OOM prediction spares zipcache rows."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from script_helpers import SCRIPTS, load_script

import patchattn

pytestmark = pytest.mark.usefixtures("one_thread")

bench = load_script(SCRIPTS / "bench_longctx.py", "bench_longctx")

FIELDS = {"shape", "variant", "n", "status", "prefill_s", "decode_tok_s", "kv_bytes", "peak_gb", "gpu", "torch",
          "triton", "date", "command"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("longctx") / "longctx_e2e.json"
    rows = bench.main(["--tiny", "--lens", "64,128", "--new-tokens", "4", "--out", str(out)])
    return out, rows


def test_rows_of_every_variant_and_length(run):
    out, rows = run
    data = json.loads(out.read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert out.with_suffix(".png").stat().st_size > 0
    assert [(r["variant"], r["n"]) for r in rows] == [(v, n) for n in (64, 128) for v in bench.VARIANTS]
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["status"] == "ok", r
        assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0 and r["kv_bytes"] > 0
        assert r["new_tokens"] == 4 and r["measured"] is True
        assert r["command"].startswith("python scripts/bench_longctx.py --tiny")
    assert data["meta"]["mlp_chunk"] == 16


def test_zipcache_compresses_and_prefill_methods_approximate(run):
    _, rows = run
    by = {(r["variant"], r["n"]): r for r in rows}
    layers = bench.make_config("tiny", True).num_hidden_layers
    for n in (64, 128):
        exact = by["exact", n]
        assert exact["kv_bytes"] == exact["kv_bytes_full"]  # a DynamicCache of n + 4 tokens, fp32 on CPU
        assert exact["approx_layers"] == 0 and exact["prefill_paths"] == {}
        for variant in ("zipcache", "hyper+zipcache", "dhsa+zipcache"):
            assert by[variant, n]["kv_bytes"] < exact["kv_bytes"] / 2, variant
        for variant in ("hyper", "dhsa"):
            assert by[variant, n]["kv_bytes"] == exact["kv_bytes"]
        for variant in ("hyper", "dhsa", "hyper+zipcache", "dhsa+zipcache"):
            row = by[variant, n]
            assert row["approx_layers"] == layers, row["prefill_paths"]
            assert row["prefill_paths"] == {"approximate": layers}
        assert by["zipcache", n]["approx_layers"] == 0


@torch.inference_mode()
def test_chunked_positionwise_layers_match_unchunked():
    config = bench.make_config("tiny", True)
    model = bench.build_model(config, "cpu", torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(0))
    calls = []
    mlp = model.model.layers[0].mlp
    orig = mlp.forward
    mlp.forward = lambda x: (calls.append(x.shape[1]), orig(x))[1]  # sees the slices inside the chunking
    ref = bench.prefill(model, ids, bench.make_cache(model), None, logits_to_keep=0)
    assert calls == [100]
    calls.clear()
    got = bench.prefill(model, ids, bench.make_cache(model), 16, logits_to_keep=0)
    assert calls == [16] * 6 + [4]
    del mlp.forward
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for m in bench.positionwise_modules(model):  # restored: the class's forward again
        assert "forward" not in m.__dict__
    # patched (hyper approximating over the whole prompt) and restored after an exception too
    patchattn.patch_model(model, "hyper", **bench.TINY_PARAMS["hyper"])
    try:
        ref = bench.prefill(model, ids, bench.make_cache(model), None)
        got = bench.prefill(model, ids, bench.make_cache(model), 16)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert all(p == {"approximate": 2} for p in patchattn.attention_paths(model, reset=True).values())
    finally:
        patchattn.unpatch_model(model)
    with pytest.raises(RuntimeError), bench.chunked_positionwise(model, 16):
        raise RuntimeError
    assert all("forward" not in m.__dict__ for m in bench.positionwise_modules(model))


def test_append_params_and_oom_prediction(tmp_path):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"meta": {}, "rows": [{"shape": "tiny", "variant": "exact", "n": 64, "status": "x"},
                                                     {"shape": "8b", "variant": "exact", "n": 64, "status": "x"}]}))
    rows = bench.main(["--tiny", "--lens", "40", "--new-tokens", "2", "--variants", "exact,hyper", "--append",
                       "--param", "hyper.sample_size=4", "--param", "zipcache.decode_kernel=false",
                       "--out", str(out)])
    kept = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["variant"], r["n"]) for r in kept] == [("tiny", "exact", 64), ("8b", "exact", 64),
                                                                   ("tiny", "exact", 40), ("tiny", "hyper", 40)]
    assert rows[1]["params"] == {"hyper": {**bench.TINY_PARAMS["hyper"], "sample_size": 4}}
    # --resume: the ok/oom rows the file has are not run again, the others are (the "x" row at n=64 is)
    same = ["--param", "hyper.sample_size=4", "--out", str(out)]
    rows = bench.main(["--tiny", "--lens", "40,64", "--new-tokens", "2", "--variants", "exact,hyper", "--resume",
                       *same])
    assert [(r["variant"], r["n"]) for r in rows] == [("exact", 64), ("hyper", 64)]
    assert len(json.loads(out.read_text())["rows"]) == 5
    assert bench.main(["--tiny", "--lens", "40,64", "--variants", "exact,hyper", "--resume", *same]) == []
    # other parameters are another row, kept beside the first (the table and the plot name them)
    rows = bench.main(["--tiny", "--lens", "40", "--new-tokens", "2", "--variants", "hyper", "--resume",
                       "--param", "hyper.sample_size=8", "--out", str(out)])
    assert [bench.series_name(r) for r in rows] == ["hyper (hyper.min_seq_len=16, hyper.block_size=8, "
                                                    "hyper.sample_size=8, hyper.sink_tokens=0, hyper.exact_tail=0)"]
    assert len(json.loads(out.read_text())["rows"]) == 6
    assert bench.parse_params(["zipcache.decode_kernel=false", "x.y=abc"], False) == {
        "zipcache": {"decode_kernel": False}, "x": {"y": "abc"}}
    config = bench.make_config("8b", False)
    weights = 15 * 2**30
    assert bench.predicted_need(config, "hyper+zipcache", 1 << 20, weights) is None
    need = bench.predicted_need(config, "hyper", (1 << 20) + 64, weights)
    assert need > 140 * 2**30 > bench.predicted_need(config, "exact", (1 << 19) + 64, weights)
    assert bench.full_kv_bytes(config, 1 << 20) == 128 * 2**30  # 32 layers x K,V x 8 heads x 128 x bf16
    # budget: nothing starts after 0 s
    assert bench.main(["--tiny", "--lens", "40", "--variants", "exact", "--budget-s", "0", "--out",
                       str(tmp_path / "b.json")]) == []


def test_oom_is_a_row_with_its_phase_and_the_run_goes_on(tmp_path, monkeypatch):
    """A ``torch.cuda.OutOfMemoryError`` in the decode (simulated on CPU) makes an ``oom`` row that keeps the
    prefill's numbers; the model comes back unpatched and the next row runs; other errors are ``error`` rows."""
    real = bench.decode

    def decode(model, token, cache, steps):
        if patchattn.is_patched(model) and "hyper" in {s["variant"] for s in patchattn.patch_specs(model)}:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return real(model, token, cache, steps)

    def prefill(model, ids, cache, chunk, logits_to_keep=1):
        if patchattn.is_patched(model) and "dhsa" in {s["variant"] for s in patchattn.patch_specs(model)}:
            raise ValueError("boom")
        return real_prefill(model, ids, cache, chunk, logits_to_keep)

    real_prefill = bench.prefill
    monkeypatch.setattr(bench, "decode", decode)
    monkeypatch.setattr(bench, "prefill", prefill)
    out = tmp_path / "oom.json"
    rows = bench.main(["--tiny", "--lens", "48", "--new-tokens", "2", "--variants", "hyper+zipcache,dhsa,exact",
                       "--warmup-len", "0", "--out", str(out)])
    oom, err, ok = rows
    assert oom["status"] == "oom" and oom["oom_phase"] == "decode" and "out of memory" in oom["error"]
    assert oom["prefill_s"] > 0 and oom["approx_layers"] == 2 and oom["decode_tok_s"] is None
    assert err["status"] == "error" and err["error_phase"] == "prefill" and "boom" in err["error"]
    assert err["prefill_s"] is None and err["kv_bytes"] is None
    assert ok["status"] == "ok" and ok["decode_tok_s"] > 0
    assert [r["status"] for r in json.loads(out.read_text())["rows"]] == ["oom", "error", "ok"]
    assert all(FIELDS <= set(r) for r in rows)


def test_a_kernel_fault_is_an_error_row_even_though_the_gpu_answers_nothing_more(monkeypatch):
    """An illegal memory access poisons the CUDA context: every later call raises, the cleanup's too. The row is
    still an ``error`` row (simulated on CPU: the row runs as on a GPU, with a context that is gone)."""
    config = bench.make_config("8b", tiny=True)
    model = bench.build_model(config, "cpu", torch.float32)
    faulted = []

    def measure(*args, **kwargs):  # the row's GPU work: prefill and decode
        faulted.append(True)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def free(cuda):
        if faulted:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "free", free)
    monkeypatch.setattr(bench, "cuda_usable", lambda: False)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    ids = torch.randint(0, config.vocab_size, (1, 32))
    row = bench.run_row(model, config, ids, "hyper", bench.parse_params([], True), argparse.Namespace(
        new_tokens=2, mlp_chunk=16), cuda=True)
    assert row["status"] == "error" and "illegal memory access" in row["error"] and row["peak_gb"] is None
    assert not patchattn.is_patched(model)


@pytest.mark.parametrize("warmup, lengths", [([], [48, 48, 64, 64]), (["--warmup-len", "32"], [32, 48, 64])])
def test_each_row_is_warmed_up_at_its_own_length_unless_told(monkeypatch, tmp_path, warmup, lengths):
    """Triton compiles again for longer prompts (on the H200 five kernels compiled inside a 131k row warmed up at
    16k): by default each row runs once untimed at its own length, decode included; ``--warmup-len`` warms up once
    per variant at that length."""
    seen, real = [], bench.run_row

    def run_row(model, config, ids, variant, params, args, cuda):
        seen.append((ids.shape[1], args.new_tokens))
        return real(model, config, ids, variant, params, args, cuda)

    monkeypatch.setattr(bench, "run_row", run_row)
    bench.main(["--tiny", "--lens", "48,64", "--new-tokens", "3", "--variants", "exact", *warmup,
                "--out", str(tmp_path / "w.json")])
    assert seen == [(n, 3) for n in lengths]

"""scripts/zipcache_eval.py on a tiny random model (no downloads): ``--prefill-variant hyper`` gives the four rows
(exact, hyper, zipcache, hyper+zipcache) on the same windows, hyper really approximates its prefill alone and under
zipcache, zipcache really compresses, and the plain ``--configs`` mode still runs."""
from __future__ import annotations

import json
import types

import pytest
import tiny_models
from script_helpers import SCRIPTS, load_script

from patchattn.variants import hyper as hyper_variant

pytestmark = pytest.mark.usefixtures("one_thread")

zipcache_eval = load_script(SCRIPTS / "zipcache_eval.py", "zipcache_eval")

HYPER = ["min_seq_len=16", "block_size=8", "sample_size=8", "sink_tokens=0", "exact_tail=0", "layers=last:2"]
WINDOWS = ["--context", "96", "--prefill", "64", "--chunk", "8", "--windows", "2", "--param", "requant_interval=8"]


class CharTokenizer:
    """Characters to ids in [3, VOCAB) (the tiny model's vocabulary), BOS = 1."""

    bos_token_id = 1

    def __call__(self, text, **kwargs):
        return types.SimpleNamespace(input_ids=[3 + ord(c) % (tiny_models.VOCAB - 3) for c in text[:20_000]])


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    monkeypatch.setattr(zipcache_eval, "load_model", lambda name, dtype: (tiny_models.tiny_model("llama"),
                                                                        CharTokenizer()))


def test_prefill_variant_gives_four_rows_with_hyper_really_approximating(tmp_path, monkeypatch):
    # on CUDA, hyper sends prompts below its measured crossover (thousands of tokens) to SDPA: not these 64
    monkeypatch.setattr(hyper_variant, "exact_is_faster", lambda *args, **kwargs: False)
    argv = ["--model", "tiny", "--prefill-variant", "hyper", *(f"--prefill-param={p}" for p in HYPER), *WINDOWS,
            "--out", str(tmp_path)]
    result = zipcache_eval.main(argv)
    assert json.loads((tmp_path / "hyper_zipcache_quality_tiny_shakespeare.json").read_text()) == json.loads(
        json.dumps(result))
    assert (tmp_path / "hyper_zipcache_quality_tiny_shakespeare.png").stat().st_size > 0
    assert result["scored_tokens"] == 2 * (96 - 64) and result["prefill_params"]["layers"] == "last:2"
    exact, hyper, zipcache, both = rows = result["rows"]
    assert [r["config"] for r in rows] == ["exact", "hyper", "zipcache", "hyper+zipcache"]
    assert [[p["variant"] for p in r["patches"]] for r in rows] == [[], ["hyper"], ["zipcache"], ["hyper", "zipcache"]]

    # hyper ran its approximation on both patched layers in every window's prefill, alone and composed, and the
    # 4 chunks over the cache took exact attention (hyper's "fallback": queries != keys); the composition runs the
    # heads hyper found alone
    found = hyper["patches"][0]["params"]["exact_kv_heads"]
    assert sum(map(len, found.values())) == 1  # the retrieval-head search: 0.25 of 2 layers x 2 KV heads
    for row in (hyper, both):
        assert row["approximated_layers_per_window"] == [2, 2] and row["approximated_kv_heads"] == 2 * 2 - 1
        assert row["attention_paths"] == {"approximate": 2 * 2, "fallback": 2 * 2 * 4}
        assert row["patches"][0]["layers"] == [2, 3] and row["patches"][0]["params"]["min_seq_len"] == 16
        assert row["patches"][0]["params"]["exact_kv_heads"] == found
    assert exact["approximated_layers"] == zipcache["approximated_layers"] == zipcache["approximated_kv_heads"] == 0

    # the numbers: exact is the reference, hyper changes them, zipcache compresses (alone and composed)
    assert exact["ppl_increase_pct"] == 0 and exact["compression"] == 1 and exact["agreement_with_baseline"] == 1
    assert hyper["compression"] == 1 and hyper["ppl"] != exact["ppl"]
    assert zipcache["compression"] > 1 and both["compression"] > 1
    assert both["ppl"] not in (hyper["ppl"], zipcache["ppl"])
    for row in rows:
        assert row["ppl"] > 1 and 0 <= row["accuracy"] <= 1 and len(row["window_ppl"]) == 2


def test_configs_mode_still_compares_zipcache_configs(tmp_path):
    result = zipcache_eval.main(["--model", "tiny", "--configs", "default,all-8bit", *WINDOWS, "--out", str(tmp_path)])
    assert [r["config"] for r in result["rows"]] == ["DynamicCache (fp16 bytes)", "default", "all-8bit"]
    assert all(r["compression"] > 1 and r["approximated_layers"] == 0 for r in result["rows"][1:])
    assert result["rows"][1]["params"] == {"requant_interval": 8}
    assert (tmp_path / "zipcache_quality_tiny_shakespeare.json").exists()


def test_a_layer_whose_kv_heads_all_stay_exact_approximates_nothing():
    """A path that says ``approximate`` for such a layer does not make the row credit it."""
    model = tiny_models.tiny_model("llama")  # 2 KV heads
    specs = [{"variant": "hyper", "params": {"exact_kv_heads": {"2": [0], "3": [0, 1]}}}, {"variant": "zipcache",
                                                                                         "params": {}}]
    paths = {0: {}, 1: {"exact_short": 1}, 2: {"approximate": 1}, 3: {"approximate": 1, "fallback": 4}}
    assert zipcache_eval.approximated_kv_heads(model, specs, paths) == {2: 1}

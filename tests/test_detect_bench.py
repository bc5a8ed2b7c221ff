"""diffmem.detect.bench and ``diffmem bench detect``: scenarios as JSON presets, the benchmark
run end to end on a tiny scenario (data synthesized and model trained into a cache)."""

from __future__ import annotations

import json

import pytest

from diffmem.cli import main
from diffmem.detect.bench import list_scenarios, load_scenario
from diffmem.errors import ConfigError, OutputError


def test_shipped_scenarios():
    assert {"demo", "tiny"} <= set(list_scenarios())
    demo = load_scenario("demo")
    assert demo.data == {"preset": "demo", "seed": 0}
    assert demo.model == {"preset": "demo", "lr": 0.0002, "batch_size": 32, "steps": 1200,
                          "seed": 0}
    assert demo.detect["generations"] == 1 and demo.detect["steps"] == 1
    assert demo.reference["generations"] == 4 and demo.reference["steps"] == 50


def test_unknown_or_bad_scenarios(tmp_path):
    with pytest.raises(ConfigError, match="unknown benchmark scenario preset 'nope'; known presets: .*demo"):
        load_scenario("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {"preset": "tiny", "seed": 0}}))
    with pytest.raises(ConfigError, match=r"lacks the section\(s\) \['model', 'detect'\]"):
        load_scenario(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read benchmark scenario preset file"):
        load_scenario(bad)


def test_bench_detect_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    scenario = tmp_path / "quick.json"
    scenario.write_text(json.dumps({
        "description": "test scenario",
        "data": {"preset": "tiny", "seed": 0},
        "model": {"preset": "tiny", "lr": 0.001, "batch_size": 4, "steps": 2, "seed": 0},
        "detect": {"methods": ["noise", "attention", "nn"], "nn_generations": 1,
                   "sample_steps": 2, "unconditional": 1, "unrelated": 1},
        "reference": {"generations": 2, "steps": 2, "num_inference_steps": 2,
                      "max_prompts": 4}}))
    code = main(["-q", "bench", "detect", "--scenario", str(scenario), "--out",
                 str(tmp_path / "run1")])
    assert code == 0
    text = capsys.readouterr().out
    for needle in ("scenario quick", "machine:", "seeds: data 0, model 0, detect 0",
                   "39 training images, 16 held-out, 27 prompts (4 planted)",
                   "noise_magnitude", "attention_entropy", "nn_similarity", "TPR@1%FPR",
                   "prompts/s", "reference protocol (each prompt alone, 2 generations x 2 of 2",
                   "on 4 of the prompts (2 planted)", "speed ratio", "wall time: train"):
        assert needle in text, needle
    doc = json.loads((tmp_path / "run1" / "bench.json").read_text())
    rows = {r["score"]: r for r in doc["scores"]}
    assert set(rows) == {"noise_magnitude", "attention_entropy", "nn_similarity"}
    for row in rows.values():
        assert 0 <= row["auc"] <= 1 and 0 <= row["tpr_at_1pct_fpr"] <= 1
        assert row["prompts_per_second"] > 0 and row["prompts"] == 28 + (
            row["score"] == "nn_similarity")
    assert doc["reference"]["prompts"] == 4 and doc["speed_ratio"] > 0
    assert doc["wall_seconds"]["train"] > 0
    assert (tmp_path / "run1" / "detect" / "scores.csv").is_file()
    # the data and the trained model are cached: a second run trains nothing
    code = main(["-q", "bench", "detect", "--scenario", str(scenario), "--out",
                 str(tmp_path / "run2"), "--reference-prompts", "0"])
    assert code == 0
    doc2 = json.loads((tmp_path / "run2" / "bench.json").read_text())
    assert doc2["wall_seconds"]["train"] == 0 and doc2["reference"] is None
    assert doc2["paths"]["model"] == doc["paths"]["model"]
    assert [r["auc"] for r in doc2["scores"]] == [r["auc"] for r in doc["scores"]]
    # a folder that already holds a scan is refused (the benchmark times a fresh scan)
    from diffmem.detect.bench import bench_detect

    with pytest.raises(OutputError, match="already holds a scan"):
        bench_detect(scenario, out=tmp_path / "run2")


def test_bench_list(capsys):
    assert main(["bench", "detect", "--list"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "tiny" in out
    assert main(["bench"]) == 2

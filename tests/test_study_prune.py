"""Pruning / NeMo study: settings applied through the mitigation registry for a whole
measurement (ratio 0 = the unmodified model's numbers, a pruned or deactivated model measures
differently), NeMo's union of neurons, the study end to end on the tiny model with tiny
detector settings (resumable), its CLI errors and its table in the report."""

from __future__ import annotations

import csv
import json
import re

import pytest

from diffmem.cli import main
from diffmem.errors import ConfigError
from diffmem.study.measure import MeasureConfig, measure_model
from diffmem.study.prune import parse_strengths

TINY_MEASURE = MeasureConfig(controls=2, nn_generations=1, sample_steps=2, unconditional=2,
                             unrelated=1, fid_images=6, batch_size=8)
#: Measurement fields that are timings, not results.
TIMINGS = {"detect_seconds", "fid_seconds"}


def test_parse_strengths_uses_the_registry_ranges():
    assert parse_strengths("0.5,0,0.99", method="magnitude_pruning", option="--ratios") == \
        [0.0, 0.5, 0.99]
    assert parse_strengths([1, 0.5], method="nemo_deactivation", option="--nemo") == [0.5, 1.0]
    for bad, method, word in (("1.0", "magnitude_pruning", r"'1.0' is not in \[0, 0.99\]"),
                              ("-0.1", "magnitude_pruning", "'-0.1'"),
                              ("1.5", "nemo_deactivation", r"'1.5' is not in \[0, 1\]"),
                              ("x", "nemo_deactivation", "'x'"),
                              ("0.1,0.1", "magnitude_pruning", "repeats")):
        with pytest.raises(ConfigError, match=word):
            parse_strengths(bad, method=method, option="--opt")


def test_model_hooks_refuse_a_per_generation_method(model):
    from diffmem.models import load_model
    from diffmem.study.measure import model_hooks

    adapter = load_model(model)
    assert model_hooks(adapter, None) is None
    assert model_hooks(adapter, {"method": "magnitude_pruning", "strength": 0}).plain
    with pytest.raises(ConfigError, match="cannot be applied to the model as a whole"):
        model_hooks(adapter, {"method": "gaussian_noise_embedding", "strength": 0.1})


def test_localize_all_is_the_union_of_each_prompts_neurons(model, dataset):
    from diffmem.mitigate.nemo import localize_all, localize_neurons, reference_statistics
    from diffmem.models import load_model

    adapter = load_model(model)
    prompts = sorted({s.prompt for s in dataset})
    memorized, reference = prompts[:2], prompts[2:6]
    opts = dict(n_seeds=2, steps=2, seed=0, max_k=3)
    union, facts = localize_all(adapter, memorized, reference, **opts)
    stats = reference_statistics(adapter, reference, n_seeds=2, steps=2, seed=0)
    assert facts["tau"] == pytest.approx(stats.tau) and facts["reference_prompts"] == 4
    expected: dict[str, set] = {}
    for p in memorized:
        found, info = localize_neurons(adapter, p, stats, **opts)
        assert facts["prompts"][p]["strength"] == pytest.approx(info["strength"])
        for k, v in found.items():
            expected.setdefault(k, set()).update(v)
    assert union == {k: sorted(v) for k, v in expected.items()}


@pytest.fixture(scope="module")
def prune_study(data, model, encoder, tmp_path_factory):
    from diffmem.study.prune import run_prune_study

    out = tmp_path_factory.mktemp("prune") / "study"
    kw = dict(ratios=[0, 0.5], nemo=[0, 1], seeds="0,1", measure=TINY_MEASURE, encoder=encoder,
              threads=1)
    return out, kw, run_prune_study(model, data, out, **kw)


def test_ratio_zero_is_the_unmodified_model_pooled_over_seeds(prune_study, data, model,
                                                               encoder, tmp_path):
    """The plain row (ratio 0 = strength 0, through the registry) pools the model measured
    without any mitigation once per measurement seed: each run equals that measurement and the
    row's mean and half width equal mean_ci over them; pruning half the k/v weights changes
    what the model generates."""
    from dataclasses import replace

    from diffmem.study.prune import PRUNE_METRICS
    from diffmem.study.results import mean_ci

    out, _, res = prune_study
    rows = {r["setting"]: r for r in res.records}
    plain = [measure_model(model, data, tmp_path / f"plain{s}", config=replace(TINY_MEASURE,
                                                                              seed=s),
                           encoder=encoder, threads=1).to_dict() for s in (0, 1)]
    assert rows["plain"]["seeds"] == 2 and [r["seed"] for r in rows["plain"]["runs"]] == [0, 1]
    for run, m in zip(rows["plain"]["runs"], plain):
        for k, v in m.items():
            if k not in TIMINGS:
                assert run[k] == (pytest.approx(v) if isinstance(v, float) else v), k
    for name, key in PRUNE_METRICS.items():
        mean, half = mean_ci([m[key] for m in plain])
        for got, want in ((rows["plain"][f"{name}_mean"], mean),
                          (rows["plain"][f"{name}_ci95"], half)):
            assert got == (None if want is None else pytest.approx(want)), name
    assert rows["plain"]["fid_ci95"] is not None  # two seeds: an interval
    assert rows["prune-0.5"]["fid_mean"] != pytest.approx(rows["plain"]["fid_mean"])
    assert rows["prune-0.5"]["pruned_weights"] > 0 and rows["plain"]["pruned_weights"] == 0


def test_prune_study_writes_the_study_contract_and_reuses_measurements(prune_study, data,
                                                                       model):
    from diffmem.study.prune import run_prune_study

    out, kw, res = prune_study
    doc = json.loads((out / "study.json").read_text())
    assert doc["study"] == "prune" and doc["figures"] == ["prune.png"]
    assert (out / "prune.png").stat().st_size > 0 and (out / "summary.json").is_file()
    names = [r["setting"] for r in doc["records"]]
    assert names == ["plain", "prune-0.5", "nemo-1"]
    assert list(doc["records"][0])[:4] == ["setting", "method", "strength", "own_copies_mean"]
    # the front, on the means: the settings no other one beats on both copies and FID
    pts = [(r["setting"], r["any_copies_mean"], r["fid_mean"]) for r in doc["records"]]
    for name, x, y in pts:
        beaten = any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for _, x2, y2 in pts)
        assert doc["records"][names.index(name)]["pareto"] is (not beaten)
    neurons = json.loads((out / "nemo_neurons.json").read_text())["neurons"]
    nemo = doc["records"][2]
    assert nemo["neurons_off"] == sum(map(len, neurons.values()))
    if not neurons:  # nothing to deactivate: the plain model's measurement
        assert nemo["fid_mean"] == doc["records"][0]["fid_mean"]
    with open(out / "prune.csv", newline="") as f:
        assert [r["setting"] for r in csv.DictReader(f)] == names
    stamps = {p: p.stat().st_mtime_ns for p in (out / "measure").glob("*/measure.json")}
    measured = ["plain", "prune-0.5"] + (["nemo-1"] if neurons else [])
    assert {p.parent.name for p in stamps} == {f"{n}-s{s}" for n in measured for s in (0, 1)}
    again = run_prune_study(model, data, out, **kw)
    assert [r["fid_mean"] for r in again.records] == [r["fid_mean"] for r in res.records]
    assert stamps and {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused


def test_nemo_with_neurons_changes_the_model(data, model, encoder, tmp_path):
    """A fixed neuron set through the registry, kept on the model for a whole measurement."""
    from diffmem.models import load_model
    from diffmem.mitigate.nemo import value_layers

    layers = value_layers(load_model(model))
    mitigation = {"method": "nemo_deactivation", "strength": 1.0,
                  "params": {"neurons": {layers[0]: [0, 1, 2, 3]}}}
    cfg = MeasureConfig(**{**TINY_MEASURE.to_dict(), "reid": False})
    a = measure_model(model, data, tmp_path / "a", config=cfg, encoder=encoder, threads=1)
    b = measure_model(model, data, tmp_path / "b", config=cfg, encoder=encoder, threads=1,
                      mitigation=mitigation)
    assert b.fid_in_domain != pytest.approx(a.fid_in_domain)


def test_report_shows_the_prune_table(prune_study, model, tmp_path):
    from diffmem.report import build_report

    out, _, _ = prune_study
    result = build_report(tmp_path / "r", model=model, studies=[out])
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "Pruning and NeMo neuron deactivation" in html and "prune-0.5" in html
    assert "<th>any_copies_mean</th>" in html and "<th>pareto</th>" in html
    assert result.sections["study"] == "included"


@pytest.mark.parametrize("args, word", [(["--ratios", "0,1.2"], "--ratios: '1.2' is not in"),
                                        (["--ratios", "0,x"], "--ratios: 'x'"),
                                        (["--nemo", "1.5"], "--nemo: '1.5' is not in"),
                                        (["--projections", "to_out"], "projections="),
                                        (["--seeds", "0,-1"], "seeds: '-1'"),
                                        (["--seeds", "1,1"], "seeds: .*repeat")])
def test_cli_rejects_bad_settings(data, model, tmp_path, capsys, args, word):
    out = tmp_path / "o"
    code = main(["-q", "study", "prune", "--model", str(model), "--data", str(data),
                 "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and re.search(word, err) and len(err.strip().splitlines()) == 1, err
    assert not out.exists()

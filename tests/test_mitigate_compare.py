"""The mitigation comparison end to end on tiny parts: files and columns, resume, --detect reuse,
the Pareto front, and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.cli.mitigate import parse_strengths
from diffmem.errors import ConfigError, DataError, ModelError
from diffmem.mitigate.compare import CSV_COLUMNS, ComparisonConfig, compare_mitigations, pareto_front

FAST = {"n_prompts": 2, "generations": 2, "steps": 2, "batch_size": 8, "candidates": 3,
        "detect_generations": 1}


@pytest.fixture(scope="module")
def run(model, data, encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cmp"
    result = compare_mitigations(model, data, out, encoder=encoder,
                                 methods=["guidance_delay", "gaussian_noise_embedding"],
                                 strengths={"guidance_delay": [0.5, 1.0]}, **FAST)
    return result, out


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_writes_table_summary_and_plot(run):
    result, out = run
    rows = _csv(out / "mitigations.csv")
    assert list(rows[0]) == list(CSV_COLUMNS)
    sets = sorted({r["prompt_set"] for r in rows})
    keys = [(r["method"], float(r["strength"])) for r in rows]
    per_set = len(sets)
    assert keys[:per_set] == [("none", 0.0)] * per_set  # the baseline first
    assert sorted(set(keys)) == [("gaussian_noise_embedding", 0.1), ("guidance_delay", 0.5),
                                 ("guidance_delay", 1.0), ("none", 0.0)]
    for r in rows:
        assert r["pareto"] in ("true", "false")
        assert 0 <= float(r["memorization_rate"]) <= 1
        assert float(r["fid_in_domain"]) >= 0 and -1 <= float(r["alignment"]) <= 1
        assert int(r["n_generations"]) == 2 * int(r["n_prompts"])
        assert float(r["seconds_per_image"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("baseline", "rows", "pareto_front", "recommended", "recommendation_reason",
                "notes", "config", "encoder", "threshold", "seconds"):
        assert key in summary, key
    assert summary["pareto_front"] == result.pareto_front
    assert {r["method"] for r in rows if r["pareto"] == "true"} <= \
        {name.split("@")[0] for name in summary["pareto_front"]}
    assert all(name.startswith("guidance_delay@") or "@" not in name
               for name in summary["pareto_front"])  # several strengths: labelled
    assert summary["encoder"]["fingerprint"] and summary["threshold"]["value"] is not None
    assert any("not Inception" in n for n in summary["notes"])
    assert (out / "pareto.png").stat().st_size > 5000


def test_untrained_model_has_no_memorized_prompts_and_says_so(run):
    result, _ = run
    assert result.prompts["memorized"] == []
    assert any(n.startswith("no memorized prompts found") and "control set only" in n
               for n in result.notes)
    assert {r["prompt_set"] for r in result.rows} == {"control"}


def test_guidance_delay_to_t0_is_unconditional_and_keeps_noise_magnitude(run):
    """Strength 1 = no guidance at any step; the first-step noise magnitude (the model's
    conditional pull at x_T) is not changed by a guidance schedule."""
    result, _ = run
    rows = {(r["method"], r["strength"]): r for r in result.rows}
    base, delay = rows[("none", 0.0)], rows[("guidance_delay", 1.0)]
    assert delay["noise_magnitude"] == pytest.approx(base["noise_magnitude"], rel=1e-5)
    gni = rows[("gaussian_noise_embedding", 0.1)]
    assert gni["noise_magnitude"] != base["noise_magnitude"]


def test_rerun_resumes_from_the_store(run, model, data, encoder, monkeypatch):
    result, out = run
    from diffmem.mitigate import compare

    def fail(*a, **k):
        raise AssertionError("recomputed a stored configuration")

    monkeypatch.setattr(compare, "generate", fail)
    again = compare_mitigations(model, data, out, encoder=encoder,
                                methods=["guidance_delay", "gaussian_noise_embedding"],
                                strengths={"guidance_delay": [0.5, 1.0]}, **FAST)
    assert [r["memorization_rate"] for r in again.rows] == \
        [r["memorization_rate"] for r in result.rows]
    assert [r["fid_in_domain"] for r in again.rows] == [r["fid_in_domain"] for r in result.rows]


def test_detect_dir_verdicts_and_threshold_are_reused(model, data, encoder, tmp_path):
    """A detect run's memorized prompts form the memorized set; its threshold is used as is."""
    from diffmem.data import load
    from diffmem.detect.detector import training_prompts
    from diffmem.models import load_model

    prompts = list(training_prompts(load(data)))
    det = tmp_path / "detect"
    det.mkdir()
    with open(det / "scores.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["kind", "prompt", "memorized", "nn_similarity"])
        w.writeheader()
        w.writerow({"kind": "train", "prompt": prompts[0], "memorized": 1, "nn_similarity": 0.9})
        for p in prompts[1:5]:
            w.writerow({"kind": "train", "prompt": p, "memorized": 0, "nn_similarity": 0.5})
    fp = load_model(model).fingerprint()
    (det / "summary.json").write_text(json.dumps({
        "model_fingerprint": fp, "config": {"methods": ["nn"], "backend": "pixel",
                                            "backend_options": {}, "seed": 7},
        "threshold": {"value": -1.0, "fpr": 0.01, "n": 10, "method": "heldout-quantile"}}))
    result = compare_mitigations(model, data, tmp_path / "out", encoder=encoder,
                                 methods="guidance_delay", detect_dir=det, **FAST)
    assert result.prompts["memorized"] == [prompts[0]]
    assert result.threshold["value"] == -1.0
    mem = [r for r in result.rows if r["prompt_set"] == "memorized"]
    assert [r["memorization_rate"] for r in mem] == [1.0, 1.0]  # every similarity > -1
    assert set(result.prompts["control"]) <= set(prompts[1:5])
    (det / "summary.json").write_text(json.dumps({
        "model_fingerprint": "0" * 16, "config": {"methods": ["nn"]},
        "threshold": {"value": 0.9}}))
    with pytest.raises(ConfigError, match="scanned model 0000000000000000, not this one"):
        compare_mitigations(model, data, tmp_path / "out2", encoder=encoder,
                            methods="guidance_delay", detect_dir=det, **FAST)


def test_bad_input(model, data, encoder, tmp_path):
    with pytest.raises(ConfigError, match="unknown mitigation 'nope'; registered: "):
        compare_mitigations(model, data, tmp_path / "a", encoder=encoder, methods="nope")
    with pytest.raises(ConfigError, match=r"outside the range of guidance_delay: use a number "
                                          r"in \[0, 1\]"):
        compare_mitigations(model, data, tmp_path / "a", encoder=encoder,
                            methods="guidance_delay", strengths=[2.0])
    with pytest.raises(ConfigError, match="strengths given for opposite_guidance"):
        compare_mitigations(model, data, tmp_path / "a", encoder=encoder,
                            methods="guidance_delay", strengths={"opposite_guidance": [0.3]})
    with pytest.raises(ConfigError, match="unknown option"):
        compare_mitigations(model, data, tmp_path / "a", encoder=encoder, prompts_per_set=3)
    with pytest.raises(ConfigError, match="embed train --data DATA --out ENC"):
        compare_mitigations(model, data, tmp_path / "a", methods="guidance_delay")
    with pytest.raises(DataError, match="scores.csv is missing"):
        compare_mitigations(model, data, tmp_path / "a", encoder=encoder,
                            methods="guidance_delay", detect_dir=tmp_path)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(ModelError, match="has no model_index.json"):
        compare_mitigations(not_a_model, data, tmp_path / "a", encoder=encoder,
                            methods="guidance_delay")
    assert not (data / "cache").exists()
    # a run that fails its checks of model, encoder or data leaves no (empty) output folder
    assert not (tmp_path / "a").exists()


def test_pareto_front_against_a_hand_computed_case():
    """Memorization on the memorized prompts, utility on the control prompts."""
    table = (("none", 1.0, 9.0, 1.0, 0.9), ("a", 0.5, 9.0, 2.0, 0.8), ("b", 0.5, 1.0, 3.0, 0.85),
             ("c", 0.0, 9.0, 5.0, 0.1), ("d", 1.0, 1.0, 1.5, 0.2))
    rows = [dict(method=m, strength=1.0, prompt_set="memorized", memorization_rate=x,
                 fid_in_domain=fm, alignment=0.0) for m, x, fm, _, _ in table]
    rows += [dict(method=m, strength=1.0, prompt_set="control", memorization_rate=0.0,
                  fid_in_domain=fc, alignment=a) for m, _, _, fc, a in table]
    assert pareto_front(rows) == [("c", 1.0), ("a", 1.0), ("none", 1.0)]
    assert pareto_front(rows, utility="alignment") == [("c", 1.0), ("b", 1.0), ("none", 1.0)]
    assert pareto_front(rows, utility_set="memorized") == [("c", 1.0), ("b", 1.0)]  # b beats d


def test_parse_strengths_and_config_checks():
    assert parse_strengths(None) is None and parse_strengths(["default"]) is None
    assert parse_strengths(["0.1,0.5"]) == [0.1, 0.5]
    with pytest.raises(ConfigError, match="mixes NAME=VALUES"):
        parse_strengths(["0.1", "guidance_delay=0.2"])
    with pytest.raises(ConfigError, match="not a comma-separated list"):
        parse_strengths(["guidance_delay=a"])
    cfg = ComparisonConfig(methods="guidance_delay,opposite_guidance",
                           strengths={"guidance_delay": [0, 0.3]}).validated()
    assert cfg.strengths == {"guidance_delay": (0.3,), "opposite_guidance": (0.35,)}
    with pytest.raises(ConfigError, match="only strength 0 given"):
        ComparisonConfig(methods="guidance_delay", strengths=[0]).validated()


def test_cli_list_and_run(model, data, encoder, tmp_path, capsys):
    assert main(["mitigate", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "attention_rescaling" in listed and "[0, 9]" in listed
    assert main(["mitigate", "--data", str(data)]) == 2
    assert "required: --model, --out (or pass --list)" in capsys.readouterr().err
    out = tmp_path / "cli"
    code = main(["-q", "--threads", "1", "mitigate", "--model", str(model), "--data", str(data),
                 "--out", str(out), "--encoder", str(encoder), "--methods",
                 "deid_marker_removal", "--n-prompts", "2", "--generations", "1", "--steps", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "recommended:" in printed
    rows = _csv(out / "mitigations.csv")
    assert {r["method"] for r in rows} == {"none", "deid_marker_removal"}
    assert np.isfinite([float(r["fid_in_domain"]) for r in rows]).all()


def test_nemo_and_pruning_ratios_in_the_comparison(model, data, encoder, tmp_path):
    """NeMo localizes against the control prompts (passed as its reference prompts); pruning
    runs at several ratios; both land in the table and the Pareto front's candidates."""
    result = compare_mitigations(model, data, tmp_path / "nemo", encoder=encoder,
                                 methods=["nemo_deactivation", "magnitude_pruning"],
                                 strengths={"magnitude_pruning": [0.2, 0.5]}, **FAST)
    rows = _csv(tmp_path / "nemo" / "mitigations.csv")
    keys = sorted({(r["method"], float(r["strength"])) for r in rows})
    assert keys == [("magnitude_pruning", 0.2), ("magnitude_pruning", 0.5),
                    ("nemo_deactivation", 1.0), ("none", 0.0)]
    assert any("nemo_deactivation localizes" in n for n in result.notes)
    assert all(0 <= float(r["memorization_rate"]) <= 1 for r in rows)


def test_recommendation_keeps_every_measured_utility_within_the_tolerance():
    """A setting on the front that keeps the Fréchet distance but whose images stop following
    the prompts (control alignment collapses, like pruning 99% of the cross-attention) is not
    recommended; the next one that keeps both utilities is."""
    from diffmem.mitigate.compare import _recommend

    def rows(method, strength, mem, fid, align):
        return [{"method": method, "strength": strength, "prompt_set": "memorized",
                 "memorization_rate": mem, "fid_in_domain": fid + 0.2, "alignment": 0.6},
                {"method": method, "strength": strength, "prompt_set": "control",
                 "memorization_rate": 0.0, "fid_in_domain": fid, "alignment": align}]

    table = (rows("none", 0.0, 1.0, 1.0, 0.08) + rows("prune", 0.99, 0.3, 0.86, -0.07)
             + rows("nemo", 1.0, 0.6, 0.88, 0.09))
    config = ComparisonConfig(utility="fid_in_domain")
    front = pareto_front(table)
    assert front == [("prune", 0.99)]  # nemo is dominated in (copies, Fréchet distance)
    label, why = _recommend(table, front, config, set(), ("memorized", "control"))
    assert label == "nemo" and "alignment within 25% too" in why
    assert why.startswith("off the Pareto front")
    # with alignment unmeasured, the Fréchet distance alone decides
    for r in table:
        r["alignment"] = None
    assert _recommend(table, front, config, set(), ("memorized", "control"))[0] == "prune"

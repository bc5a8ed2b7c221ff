"""``diffmem mitigate --reid``: a re-identification rate beside the copy rate, judged at a re-ID
threshold calibrated on held-out patients (the embedded re-ID model), on tiny parts."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.detect.verdicts import Threshold
from diffmem.errors import ConfigError
from diffmem.mitigate.compare import CSV_COLUMNS, ComparisonConfig
from diffmem.store import ResultsStore


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_reid_rate_beside_the_copy_rate(model, data, dataset, encoder, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["-q", "--threads", "1", "mitigate", "--model", str(model), "--data", str(data),
                 "--out", str(out), "--encoder", str(encoder), "--methods", "guidance_delay",
                 "--n-prompts", "2", "--generations", "2", "--steps", "2", "--reid"]) == 0
    printed = capsys.readouterr().out
    assert "reid.rate" in printed and "own.reid" in printed
    rows = _csv(out / "mitigations.csv")
    assert list(rows[0]) == list(CSV_COLUMNS)
    summary = json.loads((out / "summary.json").read_text())
    t = summary["reid_threshold"]
    assert t["method"] == "heldout-quantile" and t["n"] == 16
    threshold = Threshold(value=t["value"], fpr=t["fpr"], n=t["n"], method=t["method"])
    # every rate is the stored re-ID scores judged at the threshold
    owners: dict[str, set[str]] = {}  # each training prompt's patients, from the data
    for study in dataset:
        if study.split == "train":
            owners.setdefault(study.prompt, set()).add(study.patient_id)
    with ResultsStore(out / "results.sqlite") as store:
        units = {r["prompt"]: r["value"] for r in store.to_rows(method="mitigate")}
    assert len(units) == len(rows)
    for r in rows:
        unit = units[f"{r['prompt_set']}:{r['method']}:{float(r['strength']):g}"]
        scores = np.asarray(unit["reid_score"])
        assert len(scores) == int(r["n_generations"]) == len(unit["reid_patient_id"])
        assert float(r["reid_rate"]) == pytest.approx(float(np.mean(scores > threshold.value)))
        index = np.asarray(unit["prompt_index"])
        per_prompt = [(scores[index == p] > threshold.value).any()
                      for p in range(int(r["n_prompts"]))]
        assert float(r["prompt_reid_rate"]) == pytest.approx(float(np.mean(per_prompt)))
        # own-patient rates: the own-patient scores (each prompt's training patients, the
        # score diffmem detect computes) judged at the same threshold
        prompts = summary["prompts"][r["prompt_set"]]
        own = np.array([np.nan if x is None else x for x in unit["reid_own_score"]])
        assert len(own) == len(scores) and not np.isnan(own).any()  # all training prompts
        assert (own <= scores).all()
        for g, p in enumerate(index):  # best match among the prompt's own patients: equal
            if unit["reid_patient_id"][g] in owners[prompts[p]]:
                assert own[g] == scores[g]
        assert float(r["reid_rate_own"]) == pytest.approx(float(np.mean(own > threshold.value)))
        per_prompt = [(own[index == p] > threshold.value).any()
                      for p in range(int(r["n_prompts"]))]
        assert float(r["prompt_reid_rate_own"]) == pytest.approx(float(np.mean(per_prompt)))
        assert float(r["reid_rate_own"]) <= float(r["reid_rate"])


def test_bad_reid_threshold_is_refused():
    with pytest.raises(ConfigError, match="reid_threshold=1.5"):
        ComparisonConfig(reid=True, reid_threshold=1.5).validated()

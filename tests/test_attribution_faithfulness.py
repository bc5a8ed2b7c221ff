"""Faithfulness curves (deletion/insertion, RISE), copy-prone enrichment groups, function words
ranked apart, and the trigger benchmark helpers, on tiny parts."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffmem.attribution import (
    attribute,
    copy_prone_records,
    faithfulness_curves,
    occlusion,
    scan_prompts,
)
from diffmem.attribution.faithfulness import _steps
from diffmem.attribution.repeats import near_duplicate_groups
from diffmem.attribution.triggers import remove_span, top_unit_rate
from diffmem.cli import main
from diffmem.errors import ConfigError
from diffmem.models import load_model
from diffmem.models.tiny import tiny_stable_diffusion

FAST = {"generations": 1, "num_inference_steps": 10}
PROMPT = "Dr. Abernathy was notified of the pneumonia."


@pytest.fixture(scope="module")
def sd():
    return load_model(tiny_stable_diffusion(seed=0))


# ---------------------------------------------------------------------------- curves
def test_curve_points_always_hold_the_first_step():
    assert _steps(20, 11).tolist() == [0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert _steps(3, 11).tolist() == [0, 1, 2, 3]


def test_curves_match_occlusion_and_are_anchored(sd):
    curves = faithfulness_curves(sd, [PROMPT, "___ ___"], methods=["occlusion", "gradient"],
                                 points=5, random_orders=2, **FAST)
    assert curves.prompts == [PROMPT] and curves.skipped[0][0] == "___ ___"
    assert curves.orders == ["occlusion", "gradient", "random"]
    for name in curves.orders:
        # deletion starts at the whole prompt's score, insertion ends there
        assert curves.deletion[name][0, 0] == pytest.approx(1.0)
        assert curves.insertion[name][0, -1] == pytest.approx(1.0)
        # both curves share the all-units-replaced end point
        assert curves.deletion[name][0, -1] == pytest.approx(curves.blank[0])
        assert curves.insertion[name][0, 0] == pytest.approx(curves.blank[0])
    # a hand check: the first deletion step of occlusion's order is occlusion's own top drop
    occ = occlusion(sd, PROMPT, mode="pad", **FAST)
    assert curves.memorization[0] == pytest.approx(occ.memorization)
    assert curves.top_drop["occlusion"][0] == pytest.approx(occ.scores.max() / occ.memorization)
    assert curves.top_units["occlusion"] == [occ.top().text]
    table = {row["order"]: row for row in curves.table()}
    assert table["random"]["deletion_beats_random"] == 0.0
    assert table["gradient"]["deletion_auc_random"] == pytest.approx(
        float(curves.deletion_auc["random"][0]))
    json.dumps(curves.to_dict())
    with pytest.raises(ConfigError, match="points"):
        faithfulness_curves(sd, [PROMPT], points=1)
    with pytest.raises(ConfigError, match="known methods"):
        faithfulness_curves(sd, [PROMPT], methods=["lime"])
    with pytest.raises(ConfigError, match="no prompts"):
        faithfulness_curves(sd, [])


def test_cli_attribute_faithfulness(sd_folder, capsys):
    code = main(["-q", "attribute", "--model", str(sd_folder), PROMPT, "--generations", "1",
                 "--num-inference-steps", "10", "--faithfulness"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "faithfulness on 1 prompt(s)" in printed
    assert all(name in printed for name in ("gradient", "occlusion", "attention", "random"))


def test_integrated_gradients_are_complete():
    """Sundararajan et al.'s completeness axiom: the scores add up to M(prompt) - M(baseline)."""
    import torch

    sd64 = load_model(tiny_stable_diffusion(seed=0), dtype=torch.float64)
    r = attribute(sd64, PROMPT, method="integrated_gradients", ig_steps=16, **FAST)
    gap = r.memorization - r.details["baseline"]
    assert abs(gap) > 0.1
    assert r.scores.sum() == pytest.approx(gap, rel=0.02)
    assert r.params["ig_steps"] == 16 and r.token_scores[0] == 0
    with pytest.raises(ConfigError, match="ig_steps"):
        attribute(sd64, PROMPT, method="integrated_gradients", ig_steps=0)


# ---------------------------------------------------------------------------- enrichment groups
def test_near_duplicate_groups_are_connected_components():
    x = np.array([[1.0, 0.0], [0.999, 0.0447], [0.995, 0.0998], [0.0, 1.0]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # 0~1 and 1~2 are above 0.998, 0~2 is not: still one group through 1
    assert near_duplicate_groups(x, 0.998, batch_size=1).tolist() == [0, 0, 0, -1]


def test_copy_prone_records_find_planted_copies(dataset):
    train = dataset.subset(split="train")
    found = copy_prone_records(train, patient_min=5)
    truth = {r: s for r, s in zip(range(len(train)), train)}
    from diffmem.data.synth import read_ground_truth

    gt = read_ground_truth(dataset.root)
    planted = np.array([gt[s.image_id]["planted"] == 1 for s in truth.values()])
    # every planted record (exact copies and near-duplicate series of 5) is flagged
    assert found.flags[planted].all()
    assert found.repeated_image[[gt[s.image_id]["plant_kind"] == "exact" for s in train]].all()
    assert found.summary()["copy_prone_records"] == int(found.flags.sum())
    with pytest.raises(ConfigError, match="patient_min"):
        copy_prone_records(train, patient_min=1)


def test_scan_contrasts_copy_prone_prompts_and_ranks_function_words_apart():
    # "kowalczyk" never appears in a duplicated prompt; only the copy-prone flags reveal it
    prompts = ([f"Dr. Kowalczyk was notified of finding {w}." for w in "abcdef"]
               + ["No acute process is seen."] * 4
               + [f"Mild edema {w} is seen." for w in "ghijklmnop"])
    flags = [True] * 6 + [False] * 14
    plain = scan_prompts(prompts, min_count=2)
    grouped = scan_prompts(prompts, min_count=2, copy_prone=flags)
    row = {r["token"]: r for r in grouped.tokens}
    assert row["<phi:name>"]["enrichment"] > 0
    assert {r["token"]: r for r in plain.tokens}["<phi:name>"]["enrichment"] <= 0
    assert grouped.summary["enrichment"]["copy_prone_prompts"] == 6
    # punctuation and stop-words never head the ranking, whatever their evidence
    for result in (plain, grouped):
        content = [r for r in result.tokens if r["count"] >= 2 and not r["function_word"]]
        assert not result.tokens[0]["function_word"]
        assert result.tokens[0]["rank"] == 1 and content[0] is result.tokens[0]
    assert row["."]["function_word"] and row["is"]["function_word"]
    assert not row["<phi:name>"]["function_word"]
    with pytest.raises(ConfigError, match="one flag per prompt"):
        scan_prompts(prompts, copy_prone=flags[:-1])


def test_scan_writes_faithfulness_table(data, sd_folder, tmp_path):
    out = tmp_path / "scan"
    code = main(["-q", "scan", str(data), "--out", str(out), "--model", str(sd_folder),
                 "--max-prompts", "2", "--generations", "1", "--faithfulness", "1"])
    assert code == 0
    with open(out / "faithfulness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["order"] for r in rows] == ["integrated_gradients", "gradient", "occlusion",
                                          "attention", "random"]
    assert all(0.0 <= float(r["deletion_beats_random"]) <= 1.0 for r in rows)
    summary = json.loads((out / "scan.json").read_text())
    assert summary["copy_prone"]["copy_prone_records"] > 0
    assert summary["faithfulness"]["table"][0]["order"] == "integrated_gradients"


# ---------------------------------------------------------------------------- trigger helpers
def test_trigger_helpers():
    assert remove_span("Dr. Kowalczyk was notified.", 4, 13) == "Dr. was notified."

    class _A:
        def __init__(self, text):
            self.text = text

        def top(self):
            return self

    assert top_unit_rate([_A("Kowalczyk"), _A(".")], ["Kowalczyk", "Moriarty"]) == 0.5
    with pytest.raises(ConfigError, match="one trigger per attribution"):
        top_unit_rate([_A("x")], [])

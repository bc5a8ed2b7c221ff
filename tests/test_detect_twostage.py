"""Two-stage detection (diffmem.detect.twostage) and detection without a dataset: the screen's
rule, the seeded audit, the Clopper-Pearson bound against a hand computation, widening when the
audit finds a copy, resume; ``detect --prompts`` without ``--data`` and ``--reference``."""

from __future__ import annotations

import csv
import json
import math
import sqlite3

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.detect.detector import DetectionConfig, detect
from diffmem.detect.twostage import (
    audit_sample,
    audit_size_for,
    clopper_pearson_upper,
    plan_stage2,
    robust_z,
)
from diffmem.errors import ConfigError

TINY = ["--nn-generations", "1", "--sample-steps", "2", "--unconditional", "2",
        "--unrelated", "2", "--batch-size", "16"]


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _rows(store):
    with sqlite3.connect(store) as db:
        return sorted(db.execute("SELECT method, params_hash, prompt_hash FROM results"))


# ---------------------------------------------------------------------------- the statistics
def _binomial_upper_by_hand(x: int, n: int, alpha: float = 0.05) -> float:
    """The p with P(X <= x | n, p) = alpha, by bisection on the binomial sum."""
    def cdf(p):
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(x + 1))

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > alpha else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("x,n", [(0, 19), (0, 29), (1, 10), (3, 40)])
def test_clopper_pearson_upper_matches_the_binomial_by_hand(x, n):
    assert clopper_pearson_upper(x, n) == pytest.approx(_binomial_upper_by_hand(x, n), abs=1e-9)
    if x == 0:
        assert clopper_pearson_upper(x, n) == pytest.approx(1 - 0.05 ** (1 / n))
    assert clopper_pearson_upper(n, n) == 1.0 and clopper_pearson_upper(0, 0) == 1.0


def test_audit_size_is_the_smallest_that_reaches_the_bound():
    for bound in (0.05, 0.1, 0.15, 0.3):
        n = audit_size_for(bound)
        assert clopper_pearson_upper(0, n) <= bound < clopper_pearson_upper(0, n - 1)
    assert audit_size_for(0.15) == 19 and audit_size_for(0.1) == 29
    with pytest.raises(ConfigError, match="audit bound 1.5"):
        audit_size_for(1.5)


def test_screen_flags_outliers_and_audit_is_seeded():
    rng = np.random.default_rng(0)
    noise = rng.normal(1.0, 0.05, 200)
    noise[[3, 50, 120]] = [2.0, 2.5, 3.0]
    prompts = [f"prompt {i}" for i in range(200)]
    plan = plan_stage2(prompts, noise, audit=19, seed=0)
    assert plan.flagged == ["prompt 3", "prompt 50", "prompt 120"]
    assert len(plan.audit) == 19 and not set(plan.audit) & set(plan.flagged)
    # deterministic per seed, independent of the prompts' order, different for another seed
    again = plan_stage2(prompts[::-1], noise[::-1], audit=19, seed=0)
    assert sorted(again.audit) == sorted(plan.audit)
    assert set(plan_stage2(prompts, noise, audit=19, seed=1).audit) != set(plan.audit)
    # fewer unflagged than the audit: all of them, and then the bound is 0 (nothing unseen)
    assert set(audit_sample(["a", "b"], 5, seed=0)) == {"a", "b"}
    # the modified z-score: 0.6745 (x - median) / MAD
    np.testing.assert_allclose(robust_z([1, 2, 3, 4, 100]), 0.6745 * (np.array(
        [1, 2, 3, 4, 100]) - 3) / 1, rtol=1e-4)


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def screened(model, data, tmp_path_factory):
    """A two-stage run whose threshold nothing reaches: the audit finds no copy."""
    out = tmp_path_factory.mktemp("ts") / "screen"
    assert main(["-q", "detect", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--methods", "noise,nn", "--threshold", "2", "--audit", "5", *TINY]) == 0
    return out


def test_two_stage_confirms_flagged_audit_and_unbound_prompts(screened):
    summary = json.loads((screened / "summary.json").read_text())
    s = summary["screen"]
    assert s["policy"] == "two-stage" and s["audit_size"] == 5 and s["audit_copies"] == 0
    assert not s["widened"] and s["screened"] == 27
    assert s["missed_copy_rate_bound"] == pytest.approx(1 - 0.05 ** (1 / 5))
    assert "<= 45.1% at 95% confidence" in s["statement"]
    rows = _csv(screened / "scores.csv")
    train = [r for r in rows if r["kind"] == "train"]
    roles = [r["screen"] for r in train]
    assert roles.count("audit") == 5 and roles.count("flagged") == s["flagged"]
    for r in train:  # confirmed prompts have verdicts, the others do not
        assert (r["memorized"] != "") == (r["screen"] in ("flagged", "audit"))
        assert r["noise_magnitude"] != ""
    # unrelated and empty prompts are always confirmed
    assert all(r["memorized"] == "0" for r in rows if r["kind"] in ("unrelated",
                                                                   "unconditional"))
    assert summary["counts"]["train"] == 27


def test_two_stage_resumes_and_confirm_all_reuses_its_work(screened, model, data, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(screened, out)
    before = _rows(out / "results.sqlite")
    config = DetectionConfig(methods=("noise", "nn"), threshold=2.0, audit=5, nn_generations=1,
                             sample_steps=2, unconditional=2, unrelated=2, batch_size=16)
    again = detect(model, data, out, config=config)
    assert all(t["prompts"] == 0 for t in again.timings.values())  # nothing recomputed
    assert _rows(out / "results.sqlite") == before
    assert (out / "scores.csv").read_text() == (screened / "scores.csv").read_text()
    # --confirm all on the same folder computes only the prompts stage 2 skipped
    confirmed = sum(p.memorized is not None for p in again.of_kind("train"))
    full = detect(model, data, out, config=DetectionConfig(**{**config.__dict__,
                                                               "confirm": "all"}))
    assert full.timings["nn"]["prompts"] == 27 - confirmed
    assert all(p.memorized is not None for p in full.of_kind("train"))
    assert full.screen.policy == "all" and full.screen.bound == 0.0


def test_audit_finding_a_copy_widens_to_every_prompt(model, data, tmp_path, capsys):
    # a threshold below every similarity makes every generation a copy: the audited unflagged
    # prompts then "copy", the screen cannot be trusted and stage 2 must confirm every prompt
    out = tmp_path / "widen"
    assert main(["detect", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--methods", "noise,nn", "--threshold", "-1", "--audit", "3", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "stage 2 widened to every prompt" in printed and "the audit found copies" in printed
    s = json.loads((out / "summary.json").read_text())["screen"]
    assert s["widened"] and s["audit_copies"] == 3 and s["missed_copy_rate_bound"] == 0.0
    rows = [r for r in _csv(out / "scores.csv") if r["kind"] == "train"]
    assert all(r["memorized"] == "1" for r in rows)  # never fewer than the audit supports
    assert {r["screen"] for r in rows} <= {"flagged", "audit", "widened"}


# ---------------------------------------------------------------------------- without a dataset
def test_prompts_only_detection_needs_no_data(sd_folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Small left pleural effusion.\nNo acute cardiopulmonary process.\n",
                       encoding="utf-8")
    out = tmp_path / "o"
    assert main(["-q", "detect", "--model", str(sd_folder), "--prompts", str(prompts),
                 "--methods", "noise", "--out", str(out), "--batch-size", "2"]) == 0
    rows = _csv(out / "scores.csv")
    assert [r["kind"] for r in rows] == ["prompt", "prompt"]
    assert all(float(r["noise_magnitude"]) > 0 and r["memorized"] == "" for r in rows)
    assert json.loads((out / "summary.json").read_text())["screen"] is None


def test_nn_without_reference_names_the_flag(model, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("No change.\n", encoding="utf-8")
    code = main(["detect", "--model", str(model), "--prompts", str(prompts), "--methods", "nn",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--reference DATA|IMAGE_DIR" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    # no prompts and no data: nothing to scan
    assert main(["detect", "--model", str(model), "--methods", "noise", "--out",
                 str(tmp_path / "o")]) == 2
    assert "pass --prompts FILE" in capsys.readouterr().err


def test_reference_folder_of_images(model, dataset, tmp_path, capsys):
    from PIL import Image

    ref = tmp_path / "ref"
    ref.mkdir()
    for i, s in enumerate(dataset.subset(split="train")):
        img = dataset.load_image(s, size=32)
        Image.fromarray((img * 255).astype(np.uint8)).save(ref / f"{s.study_id}-{i}.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(sorted({s.prompt for s in dataset
                                         if s.split == "train"})[:4]) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    assert main(["-q", "detect", "--model", str(model), "--prompts", str(prompts), "--reference",
                 str(ref), "--threshold", "0.99", "--out", str(out), *TINY]) == 0
    rows = _csv(out / "scores.csv")
    assert all(r["nn_study_id"].endswith(".png") for r in rows if r["memorized"] != "")
    # a reference folder without images, and a missing one: exit 2 naming the folder
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        code = main(["detect", "--model", str(model), "--prompts", str(prompts), "--reference",
                     str(folder), "--threshold", "0.9", "--out", str(tmp_path / "x")])
        assert code == 2
        err = capsys.readouterr().err
        assert str(folder) in err and "Traceback" not in err
    # an image folder cannot calibrate itself: --calibration or --threshold is asked for
    assert main(["detect", "--model", str(model), "--prompts", str(prompts), "--reference",
                 str(ref), "--out", str(tmp_path / "y")]) == 2
    assert "pass --calibration DIR" in capsys.readouterr().err

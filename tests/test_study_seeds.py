"""Studies over seeds (pooling, the seeds option, run folder names) and the choice of the
matched-loss checkpoint on a hand-built training log."""

from __future__ import annotations

import json

import pytest

from diffmem.errors import ConfigError
from diffmem.study.checkpoints import (loss_at, matched_checkpoint, run_losses,
                                       smoothed_losses)
from diffmem.study.results import mean_ci
from diffmem.study.seeds import (SEED_METRICS, intervals_apart, parse_seeds, pool_seeds,
                                 seed_run_name)


def test_pool_seeds_is_mean_ci_of_the_runs_per_metric():
    runs = [{"memorization_rate_own": 0.25, "fid_in_domain": 40.0, "final_loss": 0.3},
            {"memorization_rate_own": 0.5, "fid_in_domain": 44.0, "final_loss": None},
            {"memorization_rate_own": 0.0, "fid_in_domain": 39.0, "final_loss": 0.5}]
    row = pool_seeds(runs, {"name": "lr_0.001", "lr": 1e-3})
    assert list(row)[:3] == ["name", "lr", "seeds"] and row["seeds"] == 3
    assert row["own_copies_mean"] == pytest.approx(0.25)
    # by hand: s = 0.25, t(0.975, 2) = 4.302653, half width = t s / sqrt(3)
    assert row["own_copies_ci95"] == pytest.approx(4.302653 * 0.25 / 3 ** 0.5, rel=1e-6)
    for name, field in SEED_METRICS.items():
        assert (row[f"{name}_mean"], row[f"{name}_ci95"]) == mean_ci([r.get(field)
                                                                      for r in runs])
    assert row["final_loss_mean"] == pytest.approx(0.4)  # the missing value is left out
    assert row["reid_leaks_mean"] is None and row["reid_leaks_ci95"] is None  # not measured
    assert row["runs"] == runs and row["runs"][0] is not runs[0]  # copies, input untouched
    only = pool_seeds(runs, {"name": "a"}, columns=("name", "fid_mean"))
    assert list(only) == ["name", "fid_mean", "runs"]


def test_intervals_apart_needs_two_intervals():
    a = {"x_mean": 0.1, "x_ci95": 0.1}
    assert not intervals_apart(a, {"x_mean": 0.25, "x_ci95": 0.1}, "x")
    assert intervals_apart(a, {"x_mean": 0.35, "x_ci95": 0.1}, "x")
    assert not intervals_apart(a, {"x_mean": 0.9, "x_ci95": None}, "x")


def test_parse_seeds_names_the_option():
    assert parse_seeds("2, 0") == [2, 0] and parse_seeds((5,)) == [5]
    for bad, word in (("0,x", "'x'"), ("-1", "'-1'"), ("1.5", "'1.5'"), ("", "none given"),
                      ("1,1", "repeats")):
        with pytest.raises(ConfigError, match=f"seeds: .*{word}"):
            parse_seeds(bad)


def test_seed_run_name_reads_a_finished_single_seed_folder(tmp_path):
    runs = tmp_path / "runs"
    assert seed_run_name(runs, "none", 0) == "none-s0"  # nothing there yet
    old = runs / "none"
    old.mkdir(parents=True)
    assert seed_run_name(runs, "none", 0) == "none-s0"  # killed old run: not picked up
    (old / "model_card.json").write_text(json.dumps({"training": {"seed": 0}}))
    assert seed_run_name(runs, "none", 0) == "none"  # finished, trained with seed 0
    assert seed_run_name(runs, "none", 1) == "none-s1"  # another seed
    (runs / "none-s0").mkdir()
    assert seed_run_name(runs, "none", 0) == "none-s0"  # the new name wins once it exists


def test_matched_checkpoint_on_a_hand_built_loss_log(tmp_path):
    """Two runs' logs written as the trainer writes them (every 10 steps): the slow run ends at
    a smoothed loss of 0.75 (window 2: the target, the highest end); the fast one is at 0.8 at
    step 30 and 0.55 at step 40, so its matched checkpoint is 40; a checkpoint reads the newest
    log at or before it, and one before any log is not a candidate."""
    fast = {10: 1.2, 20: 1.0, 30: 0.6, 40: 0.5, 50: 0.4}
    slow = {10: 1.0, 20: 0.9, 30: 0.7, 40: 0.8, 50: 0.7}
    for name, losses in (("fast", fast), ("slow", slow)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_log.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": v, "lr": 1e-3, "elapsed_s": s / 10}) + "\n"
            for s, v in losses.items()))
    sm = {name: smoothed_losses(run_losses(tmp_path / name), window=2)
          for name in ("fast", "slow")}
    assert sm["fast"] == pytest.approx({10: 1.2, 20: 1.1, 30: 0.8, 40: 0.55, 50: 0.45})
    target = max(s[max(s)] for s in sm.values())
    assert target == pytest.approx(0.75)  # slow: (0.8 + 0.7) / 2
    assert matched_checkpoint(sm["fast"], [20, 30, 40, 50], target) == 40  # 0.8 > 0.75
    assert matched_checkpoint(sm["fast"], [20, 35, 50], target) == 50  # 35 reads step 30
    assert matched_checkpoint(sm["slow"], [20, 50], target) == 50  # its own end
    assert matched_checkpoint(sm["fast"], [5], target) is None and loss_at(sm["fast"], 5) is None
    assert loss_at(sm["fast"], 35) == pytest.approx(0.8)
    # the default window (10 logs) on this short log is the running mean
    assert smoothed_losses(fast)[50] == pytest.approx(sum(fast.values()) / 5)
    with pytest.raises(ConfigError, match="window=0"):
        smoothed_losses(fast, window=0)


def test_report_shows_pooled_rows_and_old_single_seed_studies(tmp_path):
    """The report's training-study table reads study.json generically: a pooled lr study shows
    the means and intervals first; a study written before seeds were pooled still renders."""
    from diffmem.report.inputs import read_study
    from diffmem.report.sections import study_facts
    from diffmem.study.cxr import LR_COLUMNS, LR_METRICS, _pool
    from diffmem.study.results import StudyResult, write_study

    runs = [{"name": f"lr_0.001-s{i}", "seed": i, "status": "trained", "steps": 4,
             "memorization_rate_own": v, "fid_in_domain": 3.0 + i} for i, v in
            enumerate((0.5, 0.25, 0.0))]
    row = _pool(runs, {"name": "lr_0.001", "lr": 1e-3}, LR_METRICS, LR_COLUMNS)
    (tmp_path / "new").mkdir()
    write_study(StudyResult("lr", "sweep", [row], config={"seeds": [0, 1, 2]}), tmp_path / "new",
                csv_name="lr.csv", columns=LR_COLUMNS)
    facts = study_facts(read_study(tmp_path / "new"))
    assert facts["columns"] == list(LR_COLUMNS[:12])
    assert facts["records"][0]["own_copies_mean"] == pytest.approx(0.25)
    assert len(facts["records"][0]["runs"]) == 3
    old = tmp_path / "old"
    old.mkdir()
    (old / "study.json").write_text(json.dumps({
        "study": "lr", "title": "old", "records": [{"name": "lr_0.001", "lr": 1e-3,
                                                    "memorization_rate_own": 0.5}],
        "config": {"seed": 0}}))
    assert study_facts(read_study(old))["columns"] == ["name", "lr", "memorization_rate_own"]

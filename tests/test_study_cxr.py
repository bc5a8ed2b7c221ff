"""Training-time mitigations (hooks, dedup), copy-kind accounting, and the lr / mitigation
studies end to end on the tiny preset (a few training steps, tiny detector settings)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from diffmem.cli import main
from diffmem.errors import ConfigError, TrainingError
from diffmem.study.measure import MeasureConfig, copy_rates
from diffmem.study.results import mean_ci
from diffmem.study.training import (
    caption_randomization,
    deduplicate,
    deid_randomization,
    get_training_mitigation,
    noise_gap_filter,
    vocabulary,
)

TINY_MEASURE = MeasureConfig(controls=2, nn_generations=1, sample_steps=2, unconditional=2,
                             unrelated=1, fid_images=6, batch_size=8)


# ---------------------------------------------------------------------------- hooks
def test_caption_randomization_is_seeded_and_respects_p():
    f = caption_randomization(["alpha", "beta", "gamma"], p=0.5)
    prompts = [f"Prompt number {i}." for i in range(200)]
    a = [f(p, None, torch.Generator().manual_seed(i)) for i, p in enumerate(prompts)]
    b = [f(p, None, torch.Generator().manual_seed(i)) for i, p in enumerate(prompts)]
    assert a == b
    changed = [x for x, p in zip(a, prompts) if x != p]
    assert 60 < len(changed) < 140
    assert all(set(x.split()) <= {"alpha", "beta", "gamma"} and len(x.split()) == 3
               for x in changed)
    add = caption_randomization(["zz"], p=1.0, mode="add", n_words=2)
    out = add("No acute process.", None, torch.Generator().manual_seed(0))
    assert out.split().count("zz") == 2 and len(out.split()) == 5
    assert f.__name__ == "caption_randomization(p=0.5,mode=replace)"
    with pytest.raises(ConfigError, match="mode='swap'"):
        caption_randomization(["a"], mode="swap")
    with pytest.raises(ConfigError, match="p=1.5"):
        caption_randomization(["a"], p=1.5)


def test_deid_randomization_replaces_markers_only():
    f = deid_randomization(["left"], p=1.0)
    text = "Compared to ___, no change. Dr. ___ was notified at ___."
    out = f(text, None, torch.Generator().manual_seed(0))
    assert out == "Compared to left, no change. Dr. left was notified at left."
    keep = deid_randomization(["left"], p=0.0)
    assert keep(text, None, torch.Generator()) == text


def test_noise_gap_filter_thresholds_the_l2_gap():
    class Batch:
        eps_pred = torch.zeros(3, 1, 4, 4)

        @staticmethod
        def eps_uncond():
            # per-sample L2 norms 0, 1.9999 and 2 (16 values each)
            scale = torch.tensor([0.0, 1.9999, 2.0]) / 4
            return scale.view(3, 1, 1, 1).expand(3, 1, 4, 4)

    assert noise_gap_filter(tau=2.0)(Batch).tolist() == [True, True, False]
    with pytest.raises(ConfigError, match="tau=0"):
        noise_gap_filter(tau=0)


def test_dedup_collapses_the_planted_clusters(dataset):
    from diffmem.data.synth import read_ground_truth

    train = dataset.subset(split="train")
    kept, info = deduplicate(train, threshold=0.95)
    truth = read_ground_truth(dataset.root)
    clusters = [truth[s.image_id]["cluster_id"] for s in kept if truth[s.image_id]["planted"]]
    exact = [c for c in clusters if c.startswith("exact")]
    assert len(exact) == len(set(exact)) == 2  # one copy of each exact-duplicate cluster left
    assert info["records_before"] == len(train) > info["records_after"] == len(kept)
    assert len(train) == info["records_before"]  # the input is not modified


def test_unknown_mitigation_lists_the_known_ones(dataset):
    with pytest.raises(ConfigError, match="known: none, caption_randomization"):
        get_training_mitigation("dropout", dataset)
    with pytest.raises(ConfigError, match="no option"):
        get_training_mitigation("loss_filter", dataset, p=0.1)


def test_vocabulary_is_lowercase_words():
    assert vocabulary(["Dr. ___ at 3 PM", "PICC line"]) == ["at", "dr", "line", "picc", "pm"]


# ---------------------------------------------------------------------------- copy kinds
def _prompt(label, ids, gens, kind="prompt"):
    from diffmem.detect.results import GenerationMatch, PromptResult

    return PromptResult(prompt=f"p{ids}{label}{kind}", kind=kind, study_ids=ids, label=label,
                        generations=[GenerationMatch(index=j, seed=j, similarity=0.9,
                                                     study_id=sid, similarity2=0.1,
                                                     study_id2="z", d1_d2=0.1, copy=c)
                                     for j, (sid, c) in enumerate(gens)])


def test_copy_rates_separate_own_image_and_any_image_copies():
    from diffmem.detect.detector import DetectionConfig
    from diffmem.detect.results import DetectionResult

    prompts = [
        _prompt(1, ["s1"], [("s1", True)]),              # own copy
        _prompt(1, ["s2"], [("s9", True)]),              # copies another planted image
        _prompt(1, ["s3"], [("s4", True)]),              # s4 is in s3's planted cluster: own
        _prompt(1, ["s5"], [("s5", False)]),             # no copy
        _prompt(0, ["s6"], [("s7", True)]),              # control prompt copying
        _prompt(None, [], [("s1", True), ("s2", False)], kind="unconditional"),
    ]
    res = DetectionResult(prompts=prompts, config=DetectionConfig())
    r = copy_rates(res, {"s3": "exact-01", "s4": "exact-01"})
    assert r["memorization_rate_own"] == 0.5
    assert r["memorization_rate_any"] == 0.75
    assert r["control_copy_rate"] == 1.0
    assert r["copy_rate_unconditional"] == 0.5 and r["copy_rate_unrelated"] is None
    assert r["copied_studies_without_prompt"] == ["s1"]


# ---------------------------------------------------------------------------- studies
REQUIRED = ("own_copies_mean", "own_copies_ci95", "any_copies_mean", "fid_mean",
            "final_loss_mean", "train_seconds_mean", "seeds", "runs")
RUN_REQUIRED = ("memorization_rate_own", "memorization_rate_any", "noise_magnitude_auc",
                "fid_in_domain", "final_loss", "train_seconds", "seed")


def _check_contract(folder, study):
    doc = json.loads((folder / "study.json").read_text())
    assert doc["study"] == study
    assert set(doc) >= {"title", "records", "figures", "findings", "config", "machine",
                        "seconds", "command"}
    for rec in doc["records"]:
        for key in REQUIRED:
            assert key in rec
        assert rec["seeds"] == len(rec["runs"]) == len(doc["config"]["seeds"])
        for run in rec["runs"]:
            for key in RUN_REQUIRED:
                assert key in run
    for name in doc["figures"]:
        assert (folder / name).stat().st_size > 1000
    return doc


def _assert_pooled(record, metrics):
    """Every pooled mean and interval is mean_ci of the record's per-seed runs."""
    for name, field in metrics.items():
        mean, half = mean_ci([r.get(field) for r in record["runs"]])
        assert record[f"{name}_mean"] == (None if mean is None else pytest.approx(mean)), name
        assert record[f"{name}_ci95"] == (None if half is None else pytest.approx(half)), name


def test_mitigation_study_pools_seeds_and_skips_finished_runs(data, encoder, tmp_path):
    from diffmem.study.cxr import MITIGATION_METRICS, run_train_mitigation_study

    out = tmp_path / "mit"
    kw = dict(methods=["none", "loss_filter"], preset="tiny", steps=2, seeds="0,1",
              encoder=encoder, measure=TINY_MEASURE)
    res = run_train_mitigation_study(data, out, **kw)
    doc = _check_contract(out, "train-mitigations")
    assert [r["name"] for r in doc["records"]] == ["none", "loss_filter"]
    assert doc["config"]["seeds"] == [0, 1]
    for rec in doc["records"]:
        assert [r["seed"] for r in rec["runs"]] == [0, 1]
        assert [r["name"] for r in rec["runs"]] == [f"{rec['name']}-s0", f"{rec['name']}-s1"]
        assert all(r["status"] == "trained" and r["steps"] == 2 for r in rec["runs"])
        assert all(r["fid_in_domain"] is not None and r["fid_in_domain"] > 0
                   for r in rec["runs"])
        _assert_pooled(rec, MITIGATION_METRICS)
        # two seeds of a real model: the FIDs differ, so the interval is a positive number
        assert rec["fid_ci95"] > 0
        # skewed memorization columns (None when the tiny model copies nothing)
        assert all({"copy_gini", "copy_top1_share", "copy_top10_share"} <= set(r)
                   for r in rec["runs"])
        # re-identification beside the copies (the embedded re-ID model, held-out patients)
        assert all(0 <= r["reid_rate_not_copies"] <= r["reid_rate"] <= 1 for r in rec["runs"])
        assert all(0 <= r["reid_rate_own"] <= r["reid_rate"] for r in rec["runs"])  # a part
    assert (out / "runs" / "none-s1" / "model_index.json").is_file()
    assert (out / "train_mitigations.csv").read_text().startswith("name,seeds,own_copies_mean")
    assert len((out / "train_mitigations_runs.csv").read_text().splitlines()) == 5
    assert any("2 seeds per method" in f for f in doc["findings"])
    again = run_train_mitigation_study(data, out, **kw)
    for a, b in zip(res.records, again.records):
        assert [r["status"] for r in b["runs"]] == ["skipped", "skipped"]
        assert a["any_copies_mean"] == b["any_copies_mean"] and a["fid_mean"] == b["fid_mean"]
    with pytest.raises(TrainingError, match="holds a finished run of 2 steps"):
        run_train_mitigation_study(data, out, **{**kw, "steps": 3})
    with pytest.raises(TrainingError, match="loss_filter: run 'noise_gap_filter.tau=2.'"):
        run_train_mitigation_study(data, out, **{**kw, "methods": ["loss_filter"],
                                                 "options": {"loss_filter": {"tau": 3.0}}})


def test_lr_study_resumes_a_killed_run_and_applies_the_inverse_rule(data, encoder, tmp_path):
    from diffmem.study.checkpoints import matched_checkpoint, run_losses, smoothed_losses
    from diffmem.study.cxr import LR_METRICS, run_lr_study
    from diffmem.train import TrainConfig, train

    out = tmp_path / "lr"
    # a run killed after 2 of its 4 steps (lr 1e-3 is the tiny preset's lr: 4 steps)
    train(data, out / "runs" / "lr_0.001-s0", resume=False, stop_after=2,
          config=TrainConfig(preset="tiny", lr=1e-3, steps=4, checkpoint_every=100))
    res = run_lr_study(data, out, lrs=[1e-3, 4e-3], preset="tiny", steps=4, seeds=[0],
                       schedule="inverse-lr", encoder=encoder, measure=TINY_MEASURE)
    by = {r["lr"]: r for r in res.records}
    assert by[1e-3]["status"] == "resumed" and by[1e-3]["steps"] == 4
    assert by[4e-3]["steps"] == 1 and by[4e-3]["samples_seen"] == by[4e-3]["steps"] * 4
    doc = _check_contract(out, "lr")
    assert doc["config"]["schedule"] == "inverse-lr" and doc["findings"]
    for rec in doc["records"]:
        _assert_pooled(rec, LR_METRICS)
        assert rec["fid_ci95"] is None  # one seed: no interval
    # matched loss: the target is the higher final smoothed loss of the two runs; the killed
    # and resumed run logged and kept checkpoints at steps 2 and 4, so it may match at step 2,
    # which is then measured on its own; a match at the last step reuses the final measurement
    matched = doc["config"]["matched_loss"]
    runs = {rec["runs"][0]["name"]: rec["runs"][0] for rec in doc["records"]}
    smooth = {n: smoothed_losses(run_losses(r["model"])) for n, r in runs.items()}
    target = max(s[max(s)] for s in smooth.values())
    assert matched["target_loss"] == pytest.approx(target)
    assert runs["lr_0.001-s0"]["matched_loss_step"] == \
        matched_checkpoint(smooth["lr_0.001-s0"], [2, 4], target)
    for name, r in runs.items():
        step = r["matched_loss_step"]
        if step == r["steps"]:
            assert r["fid_at_matched_loss"] == r["fid_in_domain"]
            assert r["own_copies_at_matched_loss"] == r["memorization_rate_own"]
        else:
            assert (out / "measure" / f"{name}-step{step}" / "measure.json").is_file()
            assert r["fid_at_matched_loss"] > 0
    assert any(f.startswith("At matched training loss") for f in doc["findings"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == doc["records"]


def test_lr_study_rejects_bad_settings(data, tmp_path):
    from diffmem.study.cxr import run_lr_study

    with pytest.raises(ConfigError, match="schedule='fast'"):
        run_lr_study(data, tmp_path / "x", lrs=[1e-3], schedule="fast")
    with pytest.raises(ConfigError, match="positive learning rates"):
        run_lr_study(data, tmp_path / "x", lrs=[0.0])
    with pytest.raises(ConfigError, match="not an encoder folder"):
        run_lr_study(data, tmp_path / "x", lrs=[1e-3], encoder=tmp_path)


def test_embedded_baseline_only_stands_in_for_its_own_run(dataset):
    from diffmem.study.cxr import embedded_baseline
    from diffmem.train import TrainConfig

    cfg = TrainConfig(preset="demo").resolved({"lr": 2e-4, "steps": 1200, "batch_size": 32,
                                               "caption_dropout": 0.1})
    # the tiny data is not the data the embedded model was trained on
    assert embedded_baseline(dataset.subset(split="train"), cfg, 1200) is None


def test_cli_train_mitigations_in_process(data, encoder, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["-q", "study", "train-mitigations", "--data", str(data), "--out", str(out),
                 "--methods", "caption_randomization", "--preset", "tiny", "--steps", "1",
                 "--seed", "3", "--encoder", str(encoder), "--controls", "1",
                 "--nn-generations", "1", "--sample-steps", "2", "--fid-images", "4",
                 "--options", '{"caption_randomization": {"p": 0.5}}'])
    assert code == 0
    assert "caption_randomization" in capsys.readouterr().out
    doc = json.loads((out / "study.json").read_text())
    assert doc["records"][0]["options"]["p"] == 0.5 and doc["config"]["seeds"] == [3]
    assert (out / "runs" / "caption_randomization-s3" / "model_index.json").is_file()
    code = main(["-q", "study", "train-mitigations", "--data", str(data), "--out", str(out),
                 "--methods", "dropout"])
    assert code == 2 and "unknown training mitigation" in capsys.readouterr().err
    assert np.isfinite(doc["seconds"])


@pytest.mark.parametrize("study", ["lr", "train-mitigations"])
@pytest.mark.parametrize("args, words", [
    (["--seeds", "0,x"], "seeds.*'x'.*--seeds 0,1,2"),
    (["--seeds", "-1"], "seeds.*'-1'"),
    (["--seeds", "1,1"], "seeds.*repeats"),
    (["--seeds", "0,1", "--seed", "2"], "both --seeds 0,1 and --seed 2"),
])
def test_cli_bad_seeds_exit_2_naming_the_option(study, args, words, data, tmp_path, capsys):
    extra = ["--lrs", "1e-3"] if study == "lr" else []
    code = main(["-q", "study", study, "--data", str(data), "--out", str(tmp_path / "x"),
                 "--preset", "tiny", *extra, *args])
    err = capsys.readouterr().err
    assert code == 2 and re.search(words, err), err
    assert "Traceback" not in err and not (tmp_path / "x" / "runs").exists()


# ---------------------------------------------------------------------------- over training
def test_recommend_stop_is_the_checkpoint_before_copying_begins():
    from diffmem.study.checkpoints import recommend_stop

    def rec(step, anyc, unc=0.0):
        return {"step": step, "memorization_rate_any": anyc, "copy_rate_unconditional": unc}

    assert recommend_stop([rec(3, 0.5), rec(1, 0.0), rec(2, 0.0)])["step"] == 2  # by step
    assert recommend_stop([rec(1, 0.0), rec(2, 0.0, unc=0.25)])["copying_begins"] == 2
    first = recommend_stop([rec(1, 0.25), rec(2, 0.5)])
    assert first["step"] is None and "first checkpoint already copies" in first["reason"]
    never = recommend_stop([rec(1, 0.0), rec(2, None)])
    assert never["step"] == 2 and never["copying_begins"] is None
    assert recommend_stop([rec(1, 0.1), rec(2, 0.3)], tolerance=0.2)["step"] == 1


def test_checkpoint_study_measures_every_checkpoint(data, encoder, tmp_path, capsys):
    """One tiny run per seed, every checkpoint measured per seed and pooled per step (the
    row's mean and half width are mean_ci over the seeds' measurements), the stopping step
    from the pooled means, reused on a rerun; bad seeds exit 2."""
    from safetensors.torch import load_file

    from diffmem.study.checkpoints import (CHECKPOINT_METRICS, recommend_stop,
                                           run_checkpoint_study)
    from diffmem.study.results import mean_ci

    out = tmp_path / "ckpt"
    kw = dict(preset="tiny", steps=4, checkpoint_every=2, seeds="0,1", encoder=encoder,
              measure=TINY_MEASURE)
    res = run_checkpoint_study(data, out, **kw)
    doc = json.loads((out / "study.json").read_text())
    assert doc["study"] == "checkpoints" and [r["step"] for r in doc["records"]] == [2, 4]
    for r in doc["records"]:
        assert r["seeds"] == 2 and [x["seed"] for x in r["runs"]] == [0, 1]
        assert r["fid_mean"] > 0 and r["fid_ci95"] is not None and "copy_gini_mean" in r
        assert r["noise_auc_mean"] is not None
        for name, key in CHECKPOINT_METRICS.items():
            mean, half = mean_ci([x[key] for x in r["runs"]])
            assert r[f"{name}_mean"] == (None if mean is None else pytest.approx(mean)), name
            assert r[f"{name}_ci95"] == (None if half is None else pytest.approx(half)), name
    assert doc["records"][-1]["train_loss_mean"] > 0  # logged at the last step
    # two seeds train differently: their final checkpoints measure differently
    last = doc["records"][-1]["runs"]
    assert last[0]["fid_in_domain"] != pytest.approx(last[1]["fid_in_domain"])
    stop = doc["config"]["recommended_stop"]
    pooled = [{"step": r["step"], "memorization_rate_any": r["any_copies_mean"],
               "copy_rate_unconditional": r["empty_prompt_copies_mean"]}
              for r in doc["records"]]
    assert stop == recommend_stop(pooled) == res.config["recommended_stop"]
    assert (out / "checkpoints.png").stat().st_size > 1000 and (out / "checkpoints.csv").is_file()
    # each seed's last checkpoint model is its run's final model, weight for weight
    for seed in (0, 1):
        final = load_file(str(out / "runs" / f"main-s{seed}" / "unet" /
                              "diffusion_pytorch_model.safetensors"))
        for name, same in (("step-0000004", True), ("step-0000002", False)):
            w = load_file(str(out / "models" / f"s{seed}" / name / "unet" /
                              "diffusion_pytorch_model.safetensors"))
            assert all(torch.equal(w[k], final[k]) for k in final) == same, (seed, name)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "measure").glob("*/*/measure.json")}
    assert len(stamps) == 4
    again = run_checkpoint_study(data, out, **kw)
    assert [r["fid_mean"] for r in again.records] == [r["fid_mean"] for r in res.records]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused
    # the CLI refuses a folder that is not a finished run, bad seeds, and one run for two
    # seeds (exit 2, the fix named)
    (tmp_path / "unfinished").mkdir()
    for args, word in (([], "not a finished training run"), (["--seeds", "0,x"], "seeds: 'x'"),
                       (["--seeds", "0,1"], "is one run but --seeds")):
        code = main(["-q", "study", "checkpoints", "--data", str(data), "--out",
                     str(tmp_path / "cli"), "--model-run", str(tmp_path / "unfinished"), *args])
        assert code == 2 and word in capsys.readouterr().err, args
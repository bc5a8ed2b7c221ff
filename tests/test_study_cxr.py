"""Training-time mitigations (hooks, dedup), copy-kind accounting, and the lr / mitigation
studies end to end on the tiny preset (a few training steps, tiny detector settings)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.cli import main
from diffmem.errors import ConfigError, TrainingError
from diffmem.study.measure import MeasureConfig, copy_rates
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
REQUIRED = ("memorization_rate_own", "memorization_rate_any", "noise_magnitude_auc",
            "fid_in_domain", "final_loss", "train_seconds")


def _check_contract(folder, study):
    doc = json.loads((folder / "study.json").read_text())
    assert doc["study"] == study
    assert set(doc) >= {"title", "records", "figures", "findings", "config", "machine",
                        "seconds", "command"}
    for rec in doc["records"]:
        for key in REQUIRED:
            assert key in rec
    for name in doc["figures"]:
        assert (folder / name).stat().st_size > 1000
    return doc


def test_mitigation_study_trains_measures_and_skips_finished_runs(data, encoder, tmp_path):
    from diffmem.study.cxr import run_train_mitigation_study

    out = tmp_path / "mit"
    kw = dict(methods=["none", "loss_filter"], preset="tiny", steps=2, encoder=encoder,
              measure=TINY_MEASURE)
    res = run_train_mitigation_study(data, out, **kw)
    doc = _check_contract(out, "train-mitigations")
    assert [r["name"] for r in doc["records"]] == ["none", "loss_filter"]
    assert all(r["status"] == "trained" and r["steps"] == 2 for r in res.records)
    assert all(r["fid_in_domain"] is not None and r["fid_in_domain"] > 0 for r in res.records)
    # skewed memorization columns (None when the tiny model copies nothing)
    assert all({"copy_gini", "copy_top1_share", "copy_top10_share"} <= set(r)
               for r in doc["records"])
    # patient re-identification beside the copies (the embedded re-ID model, held-out patients)
    assert all(0 <= r["reid_rate_not_copies"] <= r["reid_rate"] <= 1 for r in res.records)
    assert all(0 <= r["reid_rate_own"] <= r["reid_rate"] for r in res.records)  # own: a part
    assert (out / "runs" / "none" / "model_index.json").is_file()
    assert (out / "train_mitigations.csv").read_text().startswith("name,options,lr")
    again = run_train_mitigation_study(data, out, **kw)
    assert [r["status"] for r in again.records] == ["skipped", "skipped"]
    for a, b in zip(res.records, again.records):
        assert a["memorization_rate_any"] == b["memorization_rate_any"]
        assert a["fid_in_domain"] == b["fid_in_domain"]
    with pytest.raises(TrainingError, match="holds a finished run of 2 steps"):
        run_train_mitigation_study(data, out, **{**kw, "steps": 3})
    with pytest.raises(TrainingError, match="loss_filter: run 'noise_gap_filter.tau=2.'"):
        run_train_mitigation_study(data, out, **{**kw, "methods": ["loss_filter"],
                                                 "options": {"loss_filter": {"tau": 3.0}}})


def test_lr_study_resumes_a_killed_run_and_applies_the_inverse_rule(data, encoder, tmp_path):
    from diffmem.study.cxr import run_lr_study
    from diffmem.train import TrainConfig, train

    out = tmp_path / "lr"
    # a run killed after 2 of its 4 steps (lr 1e-3 is the tiny preset's lr: 4 steps)
    train(data, out / "runs" / "lr_0.001", resume=False, stop_after=2,
          config=TrainConfig(preset="tiny", lr=1e-3, steps=4, checkpoint_every=100))
    res = run_lr_study(data, out, lrs=[1e-3, 4e-3], preset="tiny", steps=4,
                       schedule="inverse-lr", encoder=encoder, measure=TINY_MEASURE)
    by = {r["lr"]: r for r in res.records}
    assert by[1e-3]["status"] == "resumed" and by[1e-3]["steps"] == 4
    assert by[4e-3]["steps"] == 1 and by[4e-3]["samples_seen"] == by[4e-3]["steps"] * 4
    doc = _check_contract(out, "lr")
    assert doc["config"]["schedule"] == "inverse-lr" and doc["findings"]
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
                 "--encoder", str(encoder), "--controls", "1", "--nn-generations", "1",
                 "--sample-steps", "2", "--fid-images", "4",
                 "--options", '{"caption_randomization": {"p": 0.5}}'])
    assert code == 0
    assert "caption_randomization" in capsys.readouterr().out
    doc = json.loads((out / "study.json").read_text())
    assert doc["records"][0]["options"]["p"] == 0.5
    code = main(["-q", "study", "train-mitigations", "--data", str(data), "--out", str(out),
                 "--methods", "dropout"])
    assert code == 2 and "unknown training mitigation" in capsys.readouterr().err
    assert np.isfinite(doc["seconds"])


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
    from safetensors.torch import load_file

    from diffmem.study.checkpoints import run_checkpoint_study

    out = tmp_path / "ckpt"
    res = run_checkpoint_study(data, out, preset="tiny", steps=4, checkpoint_every=2,
                               encoder=encoder, measure=TINY_MEASURE)
    doc = json.loads((out / "study.json").read_text())
    assert doc["study"] == "checkpoints" and [r["step"] for r in doc["records"]] == [2, 4]
    for r in doc["records"]:
        assert r["fid_in_domain"] > 0 and "copy_gini" in r
        assert r["noise_magnitude_auc"] is not None
    assert doc["records"][-1]["train_loss"] > 0  # logged at the last step (and every log_every)
    stop = doc["config"]["recommended_stop"]
    assert stop == {**stop, "step": res.config["recommended_stop"]["step"]}
    assert (out / "checkpoints.png").stat().st_size > 1000 and (out / "checkpoints.csv").is_file()
    # the last checkpoint's model is the run's final model, weight for weight; the first differs
    final = load_file(str(out / "runs" / "main" / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, same in (("step-0000004", True), ("step-0000002", False)):
        w = load_file(str(out / "models" / name / "unet" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(w[k], final[k]) for k in final) == same, name
    # the CLI refuses a folder that is not a finished run (exit 2, the fix named)
    (tmp_path / "unfinished").mkdir()
    code = main(["-q", "study", "checkpoints", "--data", str(data), "--out",
                 str(tmp_path / "cli"), "--model-run", str(tmp_path / "unfinished")])
    assert code == 2 and "not a finished training run" in capsys.readouterr().err

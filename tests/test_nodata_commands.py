"""``mitigate`` and ``report`` for a user with a model folder and a prompts file but no training
data (issue 12, item 1).

Without ``--data`` the comparison measures memorization as Wen et al.'s first-step noise
magnitude, or as copy rates against ``--reference`` images (with ``--calibration`` or
``--threshold``, as ``detect`` takes them); ``summary.json`` and the report list what could not
be measured. The model is the tiny latent Stable Diffusion folder (untrained): the tests check
which metrics are measured and that they match an independent computation, not their size.
"""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.detect.scores import noise_magnitude
from diffmem.models import load_model

QUICK = ["-q", "--threads", "1"]
FAST = ["--n-prompts", "2", "--generations", "1", "--steps", "2", "--batch-size", "8"]
PROMPTS = ["Small left pleural effusion.", "No acute cardiopulmonary process.",
           "Left lower lobe opacity, ___ notified.", "Stable cardiomegaly.",
           "Right upper lobe nodule.", "No change from prior."]


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def noise_only(sd_folder, prompts_file, tmp_path_factory):
    """`diffmem mitigate --model SD --prompts FILE` (no data, no reference, no encoder)."""
    out = tmp_path_factory.mktemp("nodata") / "mit"
    code = main([*QUICK, "mitigate", "--model", str(sd_folder), "--prompts", str(prompts_file),
                 "--out", str(out), "--methods", "gaussian_noise_embedding,guidance_delay",
                 *FAST])
    return code, out


def _png_folder(dataset, splits, folder):
    from PIL import Image

    folder.mkdir()
    for i, s in enumerate(s for s in dataset if s.split in splits):
        img = dataset.load_image(s, size=16)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{s.study_id}-{i}.png")
    return folder


def test_mitigate_without_data_measures_noise_magnitude(noise_only, sd_folder, capsys):
    code, out = noise_only
    assert code == 0, capsys.readouterr().err
    rows = _csv(out / "mitigations.csv")
    assert {r["method"] for r in rows} == {"none", "gaussian_noise_embedding", "guidance_delay"}
    for r in rows:  # no copies, no utility without images and an encoder: empty, not 0
        assert r["memorization_rate"] == r["mean_nn_similarity"] == ""
        assert r["fid_in_domain"] == r["alignment"] == "" and r["pareto"] == "false"
        assert float(r["noise_magnitude"]) > 0
    noise = {(r["method"], r["prompt_set"]): float(r["noise_magnitude"]) for r in rows}
    for s in ("memorized", "control"):  # an embedding edit moves it, a guidance schedule not
        assert noise[("gaussian_noise_embedding", s)] != noise[("none", s)]
        assert noise[("guidance_delay", s)] == pytest.approx(noise[("none", s)], rel=1e-5)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["memorization_metric"] == "noise_magnitude"
    assert summary["threshold"] is None and summary["recommended"] is None
    missing = " ".join(summary["not_measured"])
    assert "--reference DATA|IMAGE_DIR" in missing and "--encoder ENC" in missing
    assert not (out / "pareto.png").exists()
    # the memorized set is the top of the detector's own noise-magnitude ranking
    scores = noise_magnitude(load_model(sd_folder, device="cpu"), PROMPTS, num_inference_steps=2,
                             seed=0, batch_size=32)
    top = [PROMPTS[i] for i in np.argsort(-scores, kind="stable")[:2]]
    assert summary["prompts"]["memorized"] == top
    assert not set(summary["prompts"]["control"]) & set(top)


def test_mitigate_with_a_reference_folder_computes_copy_rates(sd_folder, dataset, encoder,
                                                             prompts_file, tmp_path, capsys):
    ref = _png_folder(dataset, ("train",), tmp_path / "ref")
    held = _png_folder(dataset, ("validate", "test"), tmp_path / "held")
    out = tmp_path / "cal"
    code = main([*QUICK, "mitigate", "--model", str(sd_folder), "--prompts", str(prompts_file),
                 "--reference", str(ref), "--calibration", str(held), "--encoder",
                 str(encoder), "--out", str(out), "--methods", "gaussian_noise_embedding",
                 *FAST])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["memorization_metric"] == "memorization_rate"
    assert summary["threshold"]["fpr"] == 0.01 and summary["threshold"]["n"] > 0
    assert summary["config"]["utility"] == "fid_in_domain"  # the calibration images are real
    for r in _csv(out / "mitigations.csv"):
        assert 0 <= float(r["memorization_rate"]) <= 1
        assert -1 <= float(r["mean_nn_similarity"]) <= 1
        assert float(r["fid_in_domain"]) >= 0 and -1 <= float(r["alignment"]) <= 1
    assert (out / "pareto.png").is_file()
    assert not any(x.startswith("copy verdicts") for x in summary["not_measured"])
    # a fixed threshold below every similarity makes every generation a copy
    out = tmp_path / "fixed"
    assert main([*QUICK, "mitigate", "--model", str(sd_folder), "--prompts", str(prompts_file),
                 "--reference", str(ref), "--threshold", "-1", "--out", str(out), "--methods",
                 "guidance_delay", *FAST]) == 0
    rows = _csv(out / "mitigations.csv")
    assert [float(r["memorization_rate"]) for r in rows] == [1.0] * len(rows)
    assert all(r["fid_in_domain"] == "" for r in rows)  # no encoder: utility not measured


def test_report_without_data_says_what_is_missing(noise_only, sd_folder, prompts_file, tmp_path,
                                                  capsys):
    _, mit = noise_only
    det = tmp_path / "det"
    assert main([*QUICK, "detect", "--model", str(sd_folder), "--prompts", str(prompts_file),
                 "--methods", "noise", "--out", str(det), "--batch-size", "8"]) == 0
    # a noise-only detect run also gives mitigate its memorized set: the top noise magnitudes
    mit2 = tmp_path / "mit2"
    assert main([*QUICK, "mitigate", "--model", str(sd_folder), "--detect", str(det), "--out",
                 str(mit2), "--methods", "guidance_delay", *FAST]) == 0
    scored = sorted(_csv(det / "scores.csv"), key=lambda r: -float(r["noise_magnitude"]))
    summary = json.loads((mit2 / "summary.json").read_text(encoding="utf-8"))
    assert summary["prompts"]["memorized"] == [r["prompt"] for r in scored[:2]]
    capsys.readouterr()
    rep = tmp_path / "rep"
    code = main([*QUICK, "report", "--model", str(sd_folder), "--out", str(rep), "--detect",
                 str(det), "--mitigate", str(mit)])
    assert code == 0, capsys.readouterr().err
    assert "not measured:" in capsys.readouterr().out
    facts = json.loads((rep / "report.json").read_text(encoding="utf-8"))
    assert facts["dataset"] is None and "--data DATA" in facts["sections"]["dataset"]
    missing = facts["not_measured"]
    assert any("build the report with --data DATA" in x for x in missing)
    assert any("--reference DATA|IMAGE_DIR" in x and "detection" in x for x in missing)
    assert any(x.startswith("mitigation: ") and "--encoder ENC" in x for x in missing)
    assert facts["reproducibility"]["data"] is None
    assert facts["mitigation"]["memorization_metric"] == "noise_magnitude"
    html = (rep / "report.html").read_text(encoding="utf-8")
    assert 'id="not-measured"' in html and 'id="no-dataset"' in html
    assert 'id="mitigation-metric"' in html and "--prompts PROMPTS.txt" not in html


def test_bad_combinations_name_the_flag_to_add(sd_folder, dataset, prompts_file, tmp_path,
                                               capsys):
    ref = _png_folder(dataset, ("train",), tmp_path / "ref")
    base = [*QUICK, "mitigate", "--model", str(sd_folder), "--out", str(tmp_path / "o"), *FAST]
    given = ["--prompts", str(prompts_file)]
    cases = [
        ([], "pass --prompts FILE"),
        ([*given, "--calibration", str(ref)],
         r"--calibration sets the threshold of copy verdicts.*pass --reference DATA\|IMAGE_DIR"),
        ([*given, "--threshold", "0.9"], r"--threshold .*pass --reference DATA\|IMAGE_DIR"),
        ([*given, "--reference", str(ref)], "pass --calibration DIR"),
        ([*given, "--utility", "fid_in_domain"], "add --calibration DIR"),
        ([*given, "--utility", "alignment"], "add --encoder ENC"),
    ]
    for extra, words in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert re.search(words, err), (extra, err)
        assert not (tmp_path / "o").exists()

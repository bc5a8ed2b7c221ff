"""Re-ID verdicts in ``diffmem detect`` (``--methods ...,reid``): the most similar training
patient of each generation, the calibrated re-ID threshold, ``reidentified.csv`` and the summary
counts, two-stage runs, and data without patient ids.

The embedded default re-ID model is used (trained on the demo data, a different synthetic
draw than the tiny fixture's patients); a 4-step tiny model scores every pair ~0.999 and
could not tell patients apart.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import save_jpeg, write_table, xray
from scipy import ndimage

from diffmem.cli import main
from diffmem.cli.detect import format_summary
from diffmem.data import CXRDataset, Study
from diffmem.detect.detector import SCORE_COLUMNS, DetectionConfig, detect
from diffmem.errors import ConfigError, DataError
from diffmem.reid.pairs import patients_from_column


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class _ReplayModel:
    """A stand-in adapter whose generations for chosen prompts are given images (training
    images, or altered ones) and noise otherwise: re-ID must name the patient they show."""

    source = None
    pipeline = None
    max_length = 64

    def __init__(self, images: dict[str, np.ndarray]):
        self.images = images

    def tokenizer(self, texts, **kwargs):
        return {"input_ids": [[1] * len(t.split()) for t in texts]}

    def fingerprint(self):
        return "replay-model"

    def sample(self, prompts, *, n_per_prompt, steps, guidance, seed, batch_size):
        from diffmem.models import SampleResult, generation_seed

        images, index, gen, seeds = [], [], [], []
        for p, prompt in enumerate(prompts):
            for j in range(n_per_prompt):
                s = generation_seed(seed, prompt, j)
                rng = np.random.default_rng(s % 2**32)
                given = self.images.get(prompt)
                images.append(given if given is not None
                              else rng.random((64, 64), dtype=np.float32))
                index.append(p)
                gen.append(j)
                seeds.append(s)
        return SampleResult(images=np.stack(images), prompt_index=np.array(index),
                            generation_index=np.array(gen), seeds=np.array(seeds),
                            prompts=list(prompts))


def _own_patients(dataset) -> dict[str, set[str]]:
    """Each training prompt's own patients: those of the training records with that prompt."""
    own: dict[str, set[str]] = {}
    for s in dataset:
        if s.split == "train":
            own.setdefault(s.prompt, set()).add(s.patient_id)
    return own


def _leaky(dataset) -> tuple[dict[str, np.ndarray], dict[str, str], str, str]:
    """Generations for four training prompts: exact training images of two patients (pixel
    copies), a third patient's training image rotated by 8 degrees, shifted by 3 px and
    with less contrast (the same anatomy repositioned: not a pixel copy), and for a fourth
    prompt an exact training image of ANOTHER patient than its own (its best match is not its
    own patient). Returns the images by prompt, the patient each shows, the repositioned
    prompt and the swapped one."""
    train = [i for i, s in enumerate(dataset) if s.split == "train"]
    prompts: dict[str, int] = {}
    for i in train:
        prompts.setdefault(dataset[i].prompt, i)
    chosen = list(prompts.items())[:3]
    images, patients = {}, {}
    for k, (prompt, i) in enumerate(chosen):
        image = dataset.load_image(i, size=64)
        if k == 2:
            image = ndimage.rotate(image, 8, reshape=False, mode="nearest")
            image = np.clip(ndimage.shift(image, (3, -3), mode="nearest") * 0.85 + 0.05, 0, 1)
        images[prompt] = image.astype(np.float32)
        patients[prompt] = dataset[i].patient_id
    own = _own_patients(dataset)
    swapped, shown = next((p, i) for p in list(prompts)[3:] for i in train
                          if dataset[i].patient_id not in own[p])
    images[swapped] = dataset.load_image(shown, size=64).astype(np.float32)
    patients[swapped] = dataset[shown].patient_id
    return images, patients, chosen[2][0], swapped


def _own_score_by_hand(dataset, image: np.ndarray, patients: set[str]) -> float:
    """Max cosine similarity of the image's re-ID embedding to the training studies of
    ``patients``, embedded one by one (independent of the detector's batched search)."""
    from diffmem.reid import default_reid_dir
    from diffmem.reid.network import load_reid_model

    model = load_reid_model(default_reid_dir())
    query = model.embed_images(image[None])[0].astype(np.float64)
    rows = [i for i, s in enumerate(dataset) if s.split == "train" and s.patient_id in patients]
    refs = model.embed_images(np.stack([dataset.load_image(i, size=model.image_size)
                                        for i in rows]).astype(np.float32))
    return float((refs.astype(np.float64) @ query).max())


def test_reid_names_the_training_patient_and_counts_agree(dataset, tmp_path):
    images, patients, moved, swapped = _leaky(dataset)
    out = tmp_path / "out"
    result = detect(_ReplayModel(images), dataset, out, config=DetectionConfig(
        methods=("nn", "reid"), nn_generations=2, unconditional=2, unrelated=2, confirm="all"))
    threshold = result.reid["threshold"]
    assert threshold.method == "heldout-quantile" and threshold.n == 16
    by_prompt = {p.prompt: p for p in result.prompts}
    for prompt, patient in patients.items():
        best = by_prompt[prompt].reid_best
        assert best.reid_patient_id == patient and best.reid_match
        assert by_prompt[prompt].patient_leaking and (out / best.reid_image).is_file()
        if prompt != moved:  # an exact training image: score 1, also a pixel copy
            assert best.reid_score == pytest.approx(1.0, abs=1e-5) and best.copy
        else:  # the repositioned patient: re-identified, but no pixel copy
            assert not by_prompt[prompt].memorized and best.reid_score < 0.999
    # every generation was judged; each verdict is the calibrated rule
    gens = [g for p in result.prompts for g in p.generations]
    assert all(g.reid_score is not None for g in gens)
    assert all(g.reid_match == (g.reid_score > threshold.value) for g in gens)

    # own-patient re-ID: the swapped prompt's best match is another patient, its own-patient
    # score is the max over its own patient's studies; for the others own == any
    own = _own_patients(dataset)
    bad = by_prompt[swapped]
    assert bad.reid_best.reid_patient_id == patients[swapped] and bad.reid_best.reid_match
    assert patients[swapped] not in own[swapped]
    expected = _own_score_by_hand(dataset, images[swapped], own[swapped])
    assert bad.reid_own_score == pytest.approx(expected, abs=1e-4)
    assert bad.reid_own_score < bad.reid_score - 0.01
    for prompt in set(patients) - {swapped}:
        assert by_prompt[prompt].reid_own_score == by_prompt[prompt].reid_score
        assert by_prompt[prompt].reid_own_match
    for p in result.prompts:
        for g in p.generations:
            assert (g.reid_own_score is None) == (p.kind != "train")
            if g.reid_own_score is not None:
                assert g.reid_own_score <= g.reid_score
                assert g.reid_own_match == (g.reid_own_score > threshold.value)

    rows = _csv(out / "scores.csv")
    assert list(rows[0]) == list(SCORE_COLUMNS)
    assert {"reid_score", "reid_patient_id", "reid_match"} <= set(rows[0])
    row = {r["prompt"]: r for r in rows if r["kind"] == "train"}
    for prompt, patient in patients.items():
        assert row[prompt]["reid_patient_id"] == patient
    assert all(r["reid_match"] in ("0", "1") and r["reid_score"] for r in row.values())
    assert all(r["reid_own_match"] in ("0", "1") and r["reid_own_score"] for r in row.values())
    assert float(row[swapped]["reid_own_score"]) == pytest.approx(expected, abs=1e-4)
    others = [r for r in rows if r["kind"] != "train"]
    assert {r["kind"] for r in others} == {"unrelated", "unconditional"}
    assert all(r["reid_own_score"] == r["reid_own_match"] == "" and r["reid_score"]
               for r in others)

    # reidentified.csv holds exactly the leaking generations; the summary counts them
    leaks = _csv(out / "reidentified.csv")
    assert len(leaks) == sum(bool(g.reid_match) for g in gens) >= 2
    # ... and says whether the patient re-identified is the prompt's own (the swapped prompt's
    # is another patient)
    for r in leaks:
        assert r["reid_own_patient"] == ("" if r["kind"] != "train" else
                                         str(int(r["reid_patient_id"] in own[r["prompt"]])))
    assert {r["reid_own_patient"] for r in leaks if r["prompt"] == swapped} == {"0"}
    assert {r["reid_own_patient"] for r in leaks if r["prompt"] in set(patients) - {swapped}
            } == {"1"}
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["reid"]["counts"]
    assert counts["leaks"] == len(leaks)
    assert counts["leaks_not_copies"] == sum(r["copy"] == "0" for r in leaks) >= 2
    assert counts["leaking_prompts_not_memorized"]["train"] >= 1
    assert counts["copies"] == sum(g.copy for g in gens)
    assert counts["leaking_prompts"]["train"] == sum(r["reid_match"] == "1"
                                                     for r in row.values())
    assert sorted(counts["patients"]) == sorted({r["reid_patient_id"] for r in leaks})
    assert counts["own_patient_prompts"] == {
        "train": sum(r["reid_own_match"] == "1" for r in row.values()), "unrelated": 0,
        "unconditional": 0}
    assert counts["own_patient_judged"] == {"train": len(row), "unrelated": 0,
                                            "unconditional": 0}
    assert counts["own_patient_leaks"] == sum(bool(g.reid_own_match) for g in gens) >= 3
    assert summary["reid"]["threshold"]["value"] == pytest.approx(threshold.value)
    assert summary["reid"]["model_fingerprint"]
    for r in leaks:
        assert (out / r["image"]).is_file()
    text = format_summary(result)
    assert f"{counts['leaks']} of {counts['generations']} generation(s) re-identify" in text
    assert f"({counts['leaks_not_copies']} of them not pixel copies" in text
    assert (f"re-ID of the prompt's own patient: train {counts['own_patient_prompts']['train']}"
            f" of {len(row)} prompt(s)") in text


def test_two_stage_runs_reid_on_the_generations_that_exist(model, data, tmp_path):
    from diffmem.reid import default_reid_dir

    result = detect(model, data, tmp_path / "out", config=DetectionConfig(
        methods=("reid", "nn"), nn_generations=1, sample_steps=2, unconditional=1,
        unrelated=1, batch_size=16, audit=3, reid_model=str(default_reid_dir()),
        reid_threshold=0.5))
    assert result.config.methods == ("noise", "nn", "reid")
    rows = _csv(tmp_path / "out" / "scores.csv")
    confirmed = [r for r in rows if r["nn_similarity"]]
    assert 0 < len(confirmed) < len(rows)  # screened prompts were not generated from
    for r in rows:
        assert bool(r["reid_score"]) == bool(r["nn_similarity"])
        assert r["reid_match"] == ("" if not r["reid_score"] else
                                   str(int(float(r["reid_score"]) > 0.5)))
    assert result.reid["threshold"].method == "fixed"


def _manifest(root: Path, with_mrn: bool) -> Path:
    """Train and validate records of a manifest without a patient_id column."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(6):
        save_jpeg(root / f"s{n}.jpg", xray(n))
        rows.append([f"s{n}.jpg", "No acute process." if n % 2 else "Small effusion.",
                     f"s{n}", "train" if n < 4 else "validate"] + ([f"m{n // 2}"] * with_mrn))
    write_table(root / "manifest.csv", ["image", "prompt", "study_id", "split"]
                + ["mrn"] * with_mrn, rows)
    return root


def test_data_without_patient_ids_exits_2_naming_the_fix(model, tmp_path, capsys):
    data = _manifest(tmp_path / "m", with_mrn=False)
    argv = ["detect", "--model", str(model), "--data", str(data), "--methods", "nn,reid"]
    assert main([*argv, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "no patient ids" in err and "--patient-from COLUMN" in err
    assert "Traceback" not in err
    assert main([*argv, "--out", str(tmp_path / "o2"), "--patient-from", "mrn"]) == 2
    err = capsys.readouterr().err
    assert "--patient-from 'mrn': no record has that column" in err
    assert not (data / "o1").exists() and sorted(p.name for p in data.iterdir())[-1] == "s5.jpg"


def test_cli_patient_from_a_column_runs_reid(model, tmp_path, capsys):
    data = _manifest(tmp_path / "m", with_mrn=True)
    out = tmp_path / "out"
    assert main(["-q", "detect", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--methods", "nn,reid", "--patient-from", "mrn", "--confirm", "all",
                 "--nn-generations", "1", "--sample-steps", "2", "--unconditional", "0",
                 "--unrelated", "0"]) == 0
    printed = capsys.readouterr().out
    assert "re-ID threshold:" in printed and "calibrated on 2 held-out patient image(s)" in printed
    rows = _csv(out / "scores.csv")
    assert len(rows) == 2 and {r["reid_patient_id"] for r in rows} <= {"m0", "m1"}
    assert (out / "reidentified.csv").is_file()


def test_patient_from_a_column(tmp_path):
    from diffmem.data import load

    dataset = load(_manifest(tmp_path / "m", with_mrn=True))
    named = patients_from_column(dataset, "mrn")
    assert [s.patient_id for s in named] == ["m0", "m0", "m1", "m1", "m2", "m2"]
    assert [s.patient_id for s in dataset] == [f"s{n}" for n in range(6)]  # not modified
    with pytest.raises(DataError, match="columns there are: mrn"):
        patients_from_column(dataset, "subject")
    recs = [Study(study_id="a", patient_id="a", image="", report="", prompt="x",
                  metadata={"mrn": ""}), Study(study_id="b", patient_id="b", image="",
                                               report="", prompt="x", metadata={"mrn": "7"})]
    with pytest.raises(DataError, match="1 record.* have it empty .*study a"):
        patients_from_column(CXRDataset(recs, root=".", format="manifest"), "mrn")


def test_reid_needs_nn():
    with pytest.raises(ConfigError, match="reid judges the images the nn method generates"):
        DetectionConfig(methods=("noise", "reid"), confirm="all").validated()
    with pytest.raises(ConfigError, match="reid_threshold=2"):
        DetectionConfig(methods=("nn", "reid"), reid_threshold=2).validated()

"""A user's own labels for ``diffmem detect`` (issue 18, item 13): ``--ground-truth FILE`` keyed
by study, image or prompt; the data folder's ``ground_truth.csv`` of another shape is skipped
with a warning; a bad explicit file is one message naming it, exit 2."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from diffmem.cli import main
from diffmem.data.synth import read_ground_truth
from diffmem.detect.detector import DetectionConfig
from diffmem.detect.inputs import check_inputs
from diffmem.detect.labels import read_labels, resolve_labels
from diffmem.errors import DataError

NOISE = DetectionConfig(methods=("noise",))


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _study_labels(dataset):
    """study_id -> 0/1 from synth's ground truth (1 when any image of the study is planted)."""
    truth = read_ground_truth(dataset.root)
    out = {}
    for s in dataset:
        out[s.study_id] = max(out.get(s.study_id, 0), int(truth[s.image_id]["planted"]))
    return out


def _expected_by_prompt(dataset, study_labels):
    """The hand join: a training prompt is 1 when any of its training studies is."""
    out = {}
    for s in dataset:
        if s.split == "train" and s.prompt.strip():
            out[s.prompt] = max(out.get(s.prompt, 0), study_labels.get(s.study_id, 0))
    return out


@pytest.fixture
def manifest_data(data, dataset, tmp_path):
    """The tiny dataset as a manifest (``DIR/manifest.csv``) whose folder holds a user's
    ``ground_truth.csv`` (``study_id`` and a 0/1 ``memorized`` column) instead of synth's."""
    root = tmp_path / "user-data"
    shutil.copytree(data / "files", root / "files")
    rows = [[str(Path(s.image).resolve().relative_to(Path(data).resolve())), s.prompt, s.patient_id, s.study_id, s.split,
             s.image_id] for s in dataset]
    manifest = _write(root / "manifest.csv",
                      ["image", "prompt", "patient_id", "study_id", "split", "image_id"], rows)
    labels = _study_labels(dataset)
    _write(root / "ground_truth.csv", ["study_id", "memorized"], sorted(labels.items()))
    return manifest, labels


def test_read_labels_by_prompt_and_by_study(tmp_path):
    by_prompt = _write(tmp_path / "p.csv", ["prompt", "label", "note"],
                       [["A.", "yes", "x"], ["B.", "0", ""], ["A.", "0", ""], ["C.", "TRUE", ""]])
    table = read_labels(by_prompt)
    assert (table.key, table.column) == ("prompt", "label")
    assert table.values == {"A.": 1, "B.": 0, "C.": 1}  # a repeated key is 1 when any row is
    by_study = _write(tmp_path / "s.csv", ["study_id", "prompt", "planted"],
                      [["s1", "A.", "1.0"], ["s2", "B.", "0"]])
    table = read_labels(by_study)  # study_id comes before prompt as the key
    assert (table.key, table.column, table.values) == ("study_id", "planted",
                                                      {"s1": 1, "s2": 0})


@pytest.mark.parametrize("content, match", [
    ("study_id,score\ns1,0.3\n", r"not a labels file: its columns are \['study_id', 'score'\]; "
                                 r"give a CSV .* \(memorized, label, planted\)"),
    ("study_id,label\ns1,0.5\n", r"line 2: label is '0.5'; labels must be 1/0"),
    ("study_id,label\n,1\n", r"line 2: empty study_id"),
    ("study_id,label\n", r"has a header but no rows"),
    (b"study_id,label\ns\xff1,1\n", r"is not UTF-8 text"),
    (None, r"labels file does not exist"),
])
def test_bad_labels_file_names_the_file_and_the_fix(tmp_path, content, match):
    path = tmp_path / "labels.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match) as e:
        read_labels(path)
    assert str(e.value).startswith(str(path))


def test_study_keyed_labels_join_to_the_training_prompts(dataset, tmp_path):
    study = _study_labels(dataset)
    path = _write(tmp_path / "labels.csv", ["study_id", "memorized"], sorted(study.items()))
    labels = resolve_labels(dataset, path)
    assert labels.by_prompt == _expected_by_prompt(dataset, study)
    assert sum(labels.by_prompt.values()) == 4  # the tiny preset's planted prompts
    assert labels.source == {"file": str(path), "key": "study_id", "column": "memorized",
                             "rows": len(study), "explicit": True}


def test_prompt_keyed_labels_without_data(tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("No acute process.\nSmall left effusion.\nCardiomegaly.\n")
    path = _write(tmp_path / "labels.csv", ["prompt", "memorized"],
                  [["No acute process.", 1], ["Small left effusion.", 0]])
    found = check_inputs(None, None, prompts, None, path, NOISE)
    assert [(it.prompt, it.label) for it in found.items] == [
        ("No acute process.", 1), ("Small left effusion.", 0), ("Cardiomegaly.", 0)]
    assert "1 of 3 scanned prompt(s) have no row" in caplog.text


def test_study_keyed_labels_without_data_are_refused(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("No acute process.\n")
    path = _write(tmp_path / "labels.csv", ["study_id", "label"], [["s1", 1]])
    with pytest.raises(DataError, match=r"keyed by study_id, .* pass --data DATA"):
        check_inputs(None, None, prompts, None, path, NOISE)


def test_labels_of_another_dataset_are_refused(dataset, tmp_path):
    path = _write(tmp_path / "labels.csv", ["study_id", "label"], [["s1", 1], ["s2", 0]])
    with pytest.raises(DataError, match=r"none of its 2 study_id value\(s\) \(e.g. 's1'\) is a "
                                        r"training record"):
        resolve_labels(dataset, path)


def test_an_unfit_ground_truth_in_the_data_folder_is_skipped_with_a_warning(manifest_data,
                                                                          caplog):
    manifest, _ = manifest_data
    _write(manifest.parent / "ground_truth.csv", ["id", "score"], [["a", "0.3"]])
    found = check_inputs(manifest, None, None, None, None, NOISE)
    assert found.labels is None and all(it.label is None for it in found.items)
    assert "is not a labels file" in caplog.text and "goes on without labels" in caplog.text
    assert found.label_source.warnings  # they reach summary.json's warnings


def test_a_bad_ground_truth_flag_stops_detect(model, manifest_data, tmp_path, capsys):
    manifest, _ = manifest_data
    bad = _write(tmp_path / "mine.csv", ["study_id", "label"], [["s1", "maybe"]])
    out = tmp_path / "out"
    assert main(["detect", "--model", str(model), "--data", str(manifest), "--out", str(out),
                 "--ground-truth", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 2: label is 'maybe'" in err and "Traceback" not in err
    assert not out.exists()


def test_detect_on_a_manifest_is_scored_against_the_users_labels(model, dataset, manifest_data,
                                                                 tmp_path, capsys):
    """The issue's case: ``--data DIR/manifest.csv`` with the user's ``DIR/ground_truth.csv``
    (study_id, memorized); the AUC matches scikit-learn on the written scores."""
    manifest, study = manifest_data
    out = tmp_path / "out"
    assert main(["-q", "detect", "--model", str(model), "--data", str(manifest), "--out",
                 str(out), "--methods", "noise", "--unrelated", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"scored against {manifest.parent / 'ground_truth.csv'} (study_id -> memorized)" \
        in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"]["key"] == "study_id"
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "train"]
    expected_labels = _expected_by_prompt(dataset, study)  # the join by hand
    y = [expected_labels[r["prompt"]] for r in rows]
    assert [int(r["label"]) for r in rows] == y and 0 < sum(y) < len(y)
    expected = roc_auc_score(y, np.array([float(r["noise_magnitude"]) for r in rows]))
    assert summary["evaluations"]["noise_magnitude"]["auc"] == pytest.approx(expected)

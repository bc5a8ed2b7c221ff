"""Patient re-identification: pair sampling, the NT-Xent loss against a hand computation, training
a tiny model (files, card, determinism, round trip), evaluation outputs, bad input, the CLI."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import save_jpeg, write_table, xray

from diffmem.cli import main
from diffmem.data import load
from diffmem.errors import ConfigError, DataError, ModelError, OutputError
from diffmem.reid import (NO_TWO_STUDIES, evaluate_reid, list_presets, load_preset,
                          load_reid_model, patients_with_two_studies, run_reid_eval,
                          sample_pairs, train_reid)
from diffmem.reid.training import nt_xent


@pytest.fixture(scope="module")
def reid_model(data, tmp_path_factory) -> Path:
    """A ``tiny`` re-ID model trained for 4 steps on the tiny synthetic dataset."""
    out = tmp_path_factory.mktemp("reid") / "model"
    train_reid(data, out, preset="tiny", steps=4, seed=0)
    return out


def _manifest(root: Path, rows: list[tuple[str, str | None]]) -> Path:
    """A manifest of (study_id, patient_id or None) rows, one distinct image each."""
    root.mkdir(parents=True, exist_ok=True)
    table = []
    for n, (study, patient) in enumerate(rows):
        save_jpeg(root / f"{study}.jpg", xray(n))
        table.append([f"{study}.jpg", "No acute process.", study] + ([patient] if patient else []))
    header = ["image", "prompt", "study_id"] + (["patient_id"] if rows[0][1] else [])
    write_table(root / "manifest.csv", header, table)
    return root / "manifest.csv"


# ------------------------------------------------------------------------------------ pairs
def test_sample_pairs_are_labelled_seeded_bounded_and_spread(dataset):
    sample = sample_pairs(dataset, n_positive=10, n_negative=50, seed=3)
    pid = [s.patient_id for s in dataset]
    sid = [s.study_id for s in dataset]
    assert sample.labels.sum() == 10 and (sample.labels == 0).sum() == 50
    for (i, j), y in zip(sample.pairs, sample.labels):
        assert i < j
        if y:
            assert pid[i] == pid[j] and sid[i] != sid[j]
        else:
            assert pid[i] != pid[j]
    assert len({tuple(p) for p in sample.pairs}) == len(sample.pairs)
    again = sample_pairs(dataset, n_positive=10, n_negative=50, seed=3)
    np.testing.assert_array_equal(sample.pairs, again.pairs)
    assert not np.array_equal(sample_pairs(dataset, n_positive=10, n_negative=50, seed=4).pairs,
                              sample.pairs)
    # round robin: with fewer pairs than patients, no patient gives two positives
    eligible = patients_with_two_studies(dataset)
    few = sample_pairs(dataset, n_positive=len(eligible) - 1, n_negative=5, seed=0)
    owners = [pid[i] for i, _ in few.pairs[few.labels == 1]]
    assert len(owners) == len(set(owners)) == few.patients == len(eligible) - 1


def test_nt_xent_matches_a_hand_computation():
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    z = np.concatenate([a, b])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    t, losses = 0.5, []
    for i in range(6):
        partner = (i + 3) % 6
        logits = [z[i] @ z[k] / t for k in range(6) if k != i]
        pos = z[i] @ z[partner] / t
        losses.append(-(pos - math.log(sum(math.exp(v) for v in logits))))
    got = float(nt_xent(torch.tensor(a), torch.tensor(b), t))
    assert got == pytest.approx(float(np.mean(losses)), rel=1e-6)


# --------------------------------------------------------------------------------- training
def test_tiny_training_writes_model_card_and_round_trips(reid_model, dataset):
    config = json.loads((reid_model / "reid_config.json").read_text())
    fingerprint = dataset.subset(split="train").fingerprint()
    assert config["data"]["fingerprint"] == fingerprint
    assert fingerprint in (reid_model / "README.md").read_text()
    assert config["validation"]["source"] == "validate split"
    assert 0.0 <= config["validation"]["auc"] <= 1.0
    assert sorted(p.name for p in reid_model.iterdir()) == ["README.md", "reid.safetensors",
                                                           "reid_config.json"]
    model = load_reid_model(reid_model)
    images = np.stack([dataset.load_image(i, size=32) for i in range(4)]).astype(np.float32)
    emb = model.embed_images(images)
    assert emb.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(load_reid_model(reid_model)(images), emb)


def test_training_is_seeded(data, tmp_path):
    a = train_reid(data, tmp_path / "a", preset="tiny", steps=2, seed=1)
    b = train_reid(data, tmp_path / "b", preset="tiny", steps=2, seed=1)
    c = train_reid(data, tmp_path / "c", preset="tiny", steps=2, seed=2)
    assert a.losses == b.losses and a.model.fingerprint() == b.model.fingerprint()
    assert c.model.fingerprint() != a.model.fingerprint()


def test_presets_are_data():
    assert list_presets() == ["demo", "resnet18", "tiny"]
    with pytest.raises(ConfigError, match="unknown re-ID preset 'huge'; known presets: demo"):
        load_preset("huge")


def test_torchvision_backbone_builds_from_config():
    import torch

    from diffmem.reid import build_network

    net = build_network({"arch": "torchvision", "name": "resnet18"}, embed_dim=8).eval()
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 8)
    with pytest.raises(ConfigError, match="backbone.arch='vgg'; known: small_resnet, torchvision"):
        build_network({"arch": "vgg"}, embed_dim=8)


# ------------------------------------------------------------------------------- evaluation
def test_eval_writes_json_and_roc_with_near_duplicate_subset(reid_model, data, tmp_path):
    result = run_reid_eval(reid_model, data, tmp_path / "ev", split="all", n_positive=40,
                           n_negative=200, seed=0)
    saved = json.loads((tmp_path / "ev" / "reid_eval.json").read_text())
    assert (tmp_path / "ev" / "reid_roc.png").stat().st_size > 1000
    for key in ("auc", "tpr_at_1pct_fpr", "pairs", "patients"):
        assert saved[key] == getattr(result, key)
    assert saved["pairs"] == 240 and saved["positive_pairs"] == 40
    near = saved["near_duplicate"]
    assert near["positive_pairs"] + near["positive_pairs_not_near_duplicate"] == 40
    assert near["positive_pairs"] > 0 and near["positive_pairs_not_near_duplicate"] > 0
    assert 0.0 <= near["auc_not_near_duplicate"] <= 1.0
    assert saved["data"]["includes_training_patients"] is True  # split=all holds train patients
    assert any("training-set number" in n for n in saved["notes"])


def test_pixel_baseline_matches_scikit_learn(reid_model, dataset):
    """The baseline AUC is scikit-learn's AUC of the pixel backend's similarity on the pairs."""
    from sklearn.metrics import roc_auc_score

    from diffmem.detect.similarity import PixelBackend

    result = evaluate_reid(reid_model, dataset, split="all", n_positive=30, n_negative=60, seed=5)
    sample = sample_pairs(dataset, n_positive=30, n_negative=60, seed=5)
    backend = PixelBackend(size=32)
    feats = backend.features(np.stack([dataset.load_image(i, size=32)
                                       for i in range(len(dataset))]))
    sims = np.einsum("ij,ij->i", feats[sample.pairs[:, 0]], feats[sample.pairs[:, 1]])
    assert result.baseline_pixel["auc"] == pytest.approx(roc_auc_score(sample.labels, sims),
                                                         abs=1e-6)


def test_model_at_other_size_logs_conversion(reid_model, caplog):
    model = load_reid_model(reid_model)
    with caplog.at_level(logging.INFO, logger="diffmem.reid"):
        model.embed_images(np.full((2, 48, 48), 0.5, dtype=np.float32))
    assert "expects 32 x 32 px images; converting 2 image(s) of 48 x 48 px" in caplog.text


# -------------------------------------------------------------------------------- bad input
def test_dataset_without_patient_ids(tmp_path, reid_model):
    manifest = _manifest(tmp_path / "m", [("s1", None), ("s2", None), ("s3", None)])
    with pytest.raises(DataError, match="no patient ids .* add a patient_id column"):
        train_reid(manifest, tmp_path / "out", preset="tiny", steps=1)
    with pytest.raises(DataError, match="no patient ids"):
        evaluate_reid(reid_model, manifest, split="all")


def test_no_patient_with_two_studies(tmp_path, reid_model):
    manifest = _manifest(tmp_path / "m", [("s1", "a"), ("s2", "b"), ("s3", "c")])
    with pytest.raises(DataError, match=NO_TWO_STUDIES):
        train_reid(manifest, tmp_path / "out", preset="tiny", steps=1)
    with pytest.raises(DataError, match=NO_TWO_STUDIES):
        evaluate_reid(reid_model, manifest, split="all")
    assert not (tmp_path / "m" / "out").exists()


def test_bad_model_folder_and_out_inside_data(tmp_path, data):
    with pytest.raises(ModelError, match="not a re-ID model folder"):
        load_reid_model(tmp_path)
    with pytest.raises(OutputError, match="never writes into a dataset folder"):
        train_reid(data, data / "reid", preset="tiny", steps=1)


# -------------------------------------------------------------------------------------- CLI
def test_cli_train_and_eval(data, tmp_path, capsys):
    assert main(["reid", "train", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--preset", "tiny", "--steps", "2"]) == 0
    assert "validation AUC" in capsys.readouterr().out
    assert main(["reid", "eval", "--model", str(tmp_path / "r"), "--data", str(data),
                 "--out", str(tmp_path / "o"), "--positive-pairs", "20",
                 "--negative-pairs", "40"]) == 0
    assert "re-ID verification on" in capsys.readouterr().out
    saved = json.loads((tmp_path / "o" / "reid_eval.json").read_text())
    assert saved["split"] == "heldout" and not saved["data"]["includes_training_patients"]
    assert main(["reid", "train", "--list-presets"]) == 0
    assert "resnet18" in capsys.readouterr().out


def test_cli_bad_input_exits_2(tmp_path, capsys):
    manifest = _manifest(tmp_path / "m", [("s1", "a"), ("s2", "b")])
    assert main(["reid", "train", "--data", str(manifest), "--out", str(tmp_path / "r"),
                 "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "diffmem reid: error:" in err and NO_TWO_STUDIES in err and "Traceback" not in err
    assert len(load(manifest)) == 2


# --------------------------------------------------------------------------------- verdicts
def test_most_similar_patient_is_the_max_over_that_patients_studies():
    from diffmem.reid.verdicts import PatientIndex, most_similar_patient

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 8))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    patients = [f"p{i // 5}" for i in range(50)]
    index = PatientIndex(embeddings=ref.astype(np.float32), patient_ids=patients,
                         study_ids=[f"s{i}" for i in range(50)], records=list(range(50)))
    queries = rng.normal(size=(7, 8))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, rows = most_similar_patient(queries, index, block=6)  # blocks cut across patients
    for q, s, r in zip(queries, scores, rows):
        per_patient = {p: max(float(q @ ref[i]) for i in range(50) if patients[i] == p)
                       for p in set(patients)}
        best = max(per_patient, key=per_patient.get)
        assert patients[r] == best and s == pytest.approx(per_patient[best])


def test_own_patient_score_is_that_patients_max_even_when_another_patient_is_closer():
    from diffmem.reid.verdicts import PatientIndex, search_patients

    # hand-built: patient a has studies along e0 and e1, patient b along e2, c along e3
    ref = np.eye(4, dtype=np.float32)
    index = PatientIndex(embeddings=ref, patient_ids=["a", "a", "b", "c"],
                         study_ids=["s1", "s2", "s3", "s4"], records=[0, 1, 2, 3])
    q = np.array([[0.1, 0.5, np.sqrt(1 - 0.26 - 0.04), 0.2],  # closest to b, own patient a
                  [0.0, 0.0, 0.6, 0.8],                        # own a: never near a
                  [0.6, 0.0, 0.0, 0.8],                        # no own patient
                  [0.6, 0.0, 0.0, 0.8]])                       # unknown patient only
    own = [{"a"}, {"a", "b"}, set(), {"zz"}]
    scores, rows, own_scores = search_patients(q, index, own=own, block=3)
    assert [index.patient_ids[r] for r in rows] == ["b", "c", "c", "c"]
    assert scores == pytest.approx([np.sqrt(0.7), 0.8, 0.8, 0.8])
    assert own_scores[0] == pytest.approx(0.5)  # a's best study (s2), not b's 0.84
    assert own_scores[1] == pytest.approx(0.6)  # two own patients: the max over both (b)
    assert np.isnan(own_scores[2]) and np.isnan(own_scores[3])
    # without own patients: NaN throughout, same search as most_similar_patient
    _, _, none = search_patients(q, index)
    assert np.isnan(none).all()
    with pytest.raises(DataError, match="own patients given for 2 queries, but there are 4"):
        search_patients(q, index, own=[{"a"}, {"b"}])


def test_own_patient_score_never_exceeds_the_reid_score():
    from diffmem.reid.verdicts import PatientIndex, most_similar_patient, search_patients

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(60, 16))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    patients = [f"p{i % 7}" for i in range(60)]  # studies of a patient spread over blocks
    index = PatientIndex(embeddings=ref.astype(np.float32), patient_ids=patients,
                         study_ids=[f"s{i}" for i in range(60)], records=list(range(60)))
    q = rng.normal(size=(40, 16))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    own = [index.patients_of([f"s{i}", f"s{(3 * i) % 60}"]) for i in range(40)]
    scores, rows, own_scores = search_patients(q, index, own=own, block=8)
    np.testing.assert_array_equal((scores, rows), most_similar_patient(q, index, block=8))
    assert (own_scores <= scores).all()
    ref64 = index.embeddings.astype(np.float64)
    for i, mine in enumerate(own):
        expected = max(float(q[i] @ ref64[r]) for r in range(60) if patients[r] in mine)
        assert own_scores[i] == pytest.approx(expected, abs=1e-12)
        assert (own_scores[i] == scores[i]) == (patients[rows[i]] in mine)


def test_reid_verdicts_find_the_training_patient_at_a_calibrated_threshold(reid_model, dataset):
    from diffmem.reid.verdicts import calibrate_reid_threshold, index_patients, reid_verdicts

    model = load_reid_model(reid_model)
    index = index_patients(model, dataset)
    assert len(index) == len(dataset.subset(split="train"))
    heldout = dataset.subset(split=("validate", "test"))
    threshold = calibrate_reid_threshold(model, index, heldout, fpr=0.25)
    assert threshold.method == "heldout-quantile" and threshold.empirical_fpr <= 0.25
    # a training image, resized to 48 px: its own patient, score ~1, a match
    i = index.records[3]
    image = dataset.load_image(i, size=48)[None]
    v = reid_verdicts(model, image, index, threshold)
    assert v.patient_id == [dataset[i].patient_id] and v.score[0] > 0.99 and v.match[0]
    assert v.rows()[0]["reid_patient_id"] == dataset[i].patient_id
    with pytest.raises(DataError, match="held-out patient"):
        calibrate_reid_threshold(model, index, dataset.subset(split="train"))

"""Calibrated copy threshold (conservative empirical quantile of held-out similarities), copy
verdicts, Gu et al.'s ratio criterion, and the verdict setup shared by detect and mitigate."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import xray
from diffmem.data import load
from diffmem.detect.neighbors import ReferenceFeatures, nearest_neighbors
from diffmem.detect.verdicts import (
    Threshold,
    build_backend,
    calibrate_on_heldout,
    calibrate_threshold,
    copy_verdicts,
    fixed_threshold,
    is_copy,
    is_ratio_copy,
    prepare_verdicts,
    ratio_criterion,
    reference_features,
)
from diffmem.errors import ConfigError, DataError


def test_threshold_is_the_ceil_order_statistic_on_a_hand_case():
    null = np.random.default_rng(0).permutation(np.arange(1, 11) / 10)  # 0.1 ... 1.0
    # fpr 0.1 of 10: one image may be flagged -> the 9th smallest, 0.9
    t = calibrate_threshold(null, fpr=0.1)
    assert t.value == pytest.approx(0.9) and t.empirical_fpr == pytest.approx(0.1)
    assert (t.n, t.method, t.resolvable) == (10, "heldout-quantile", True)
    assert calibrate_threshold(null, fpr=0.2).value == pytest.approx(0.8)
    assert calibrate_threshold(null, fpr=0.15).value == pytest.approx(0.9)  # floor(1.5) = 1
    assert calibrate_threshold(null, fpr=0.5).value == pytest.approx(0.5)
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 allowed
    t = calibrate_threshold(np.arange(100.0), fpr=0.29)
    assert t.value == 70.0 and t.empirical_fpr == pytest.approx(0.29)
    json.dumps(t.to_dict())


def test_threshold_is_the_smallest_with_fpr_at_most_the_target():
    rng = np.random.default_rng(1)
    null = np.round(rng.normal(size=997), 2)  # with ties
    values = np.unique(null)
    for fpr in (0.001, 0.01, 0.05, 0.3):
        t = calibrate_threshold(null, fpr=fpr)
        assert np.mean(null > t.value) <= fpr
        lower = values[values < t.value]
        if len(lower):  # any smaller threshold flags too many held-out images
            assert np.mean(null > lower[-1]) > fpr


def test_too_few_heldout_images_warn_and_use_the_maximum(caplog):
    null = np.linspace(0.2, 0.7, 50)
    with caplog.at_level(logging.WARNING, logger="diffmem"):
        t = calibrate_threshold(null, fpr=0.01)
    assert t.value == pytest.approx(0.7) and t.empirical_fpr == 0.0 and not t.resolvable
    assert any("only 50 held-out" in r.message and "at least 100" in r.message
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffmem"):
        calibrate_threshold(np.linspace(0, 1, 100), fpr=0.01)
    assert not caplog.records


def test_calibration_input_errors():
    with pytest.raises(DataError, match=r"no held-out images.*--calibration DIR.*--threshold"):
        calibrate_threshold([], fpr=0.01)
    with pytest.raises(DataError, match="NaN"):
        calibrate_threshold([0.1, np.nan], fpr=0.01)
    for bad in (0, 1, -0.1, 1.5, True):
        with pytest.raises(ConfigError, match="fpr="):
            calibrate_threshold([0.1, 0.2], fpr=bad)
    with pytest.raises(DataError, match=r"--calibration DIR"):
        calibrate_on_heldout(None, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"--calibration DIR"):
        calibrate_on_heldout(np.zeros((0, 8, 8), np.float32), np.zeros((2, 8, 8), np.float32))


def test_copy_verdicts_are_strictly_above_the_threshold():
    t = calibrate_threshold([0.2, 0.4, 0.6, 0.8], fpr=0.25)
    assert t.value == 0.6
    assert copy_verdicts([0.6, 0.61, 0.1], t).tolist() == [False, True, False]
    assert copy_verdicts(np.array([0.5, 0.9]), 0.7).tolist() == [False, True]
    fixed = fixed_threshold(0.7)
    assert (fixed.method, fixed.fpr, fixed.n) == ("fixed", None, 0)
    with pytest.raises(ConfigError, match="threshold=nan"):
        fixed_threshold(float("nan"))
    with pytest.raises(DataError, match="NaN"):
        copy_verdicts([np.nan], t)


def test_ratio_criterion_on_hand_cases():
    d1 = np.array([0.1, 0.1, 0.0, 0.2, 0.0])
    d2 = np.array([0.31, 0.3, 0.5, 0.2, 0.0])
    # 0.1 < 0.1033 yes; 0.1 < 0.1 no; exact copy yes; equidistant no; two identical
    # training images at distance 0 -> not "much closer to one"
    assert ratio_criterion(d1, d2).tolist() == [True, False, True, False, False]
    assert ratio_criterion(d1, d2, ratio=0.5).tolist() == [True, True, True, False, False]
    with pytest.raises(DataError, match=">= 0"):
        ratio_criterion([-0.1], [0.2])
    with pytest.raises(DataError, match="d1 is larger than d2"):
        ratio_criterion([0.5], [0.2])
    with pytest.raises(DataError, match="d1 has 2 values but d2 has 1"):
        ratio_criterion([0.1, 0.2], [0.3])
    with pytest.raises(ConfigError, match="ratio=0"):
        ratio_criterion([0.1], [0.3], ratio=0)


def test_calibrated_pipeline_flags_copies_and_not_new_images():
    """Train on one set of X-ray-like images; copies (with slight noise) of training images
    are above the threshold calibrated on 100 held-out images, new images are not, and the
    ratio criterion agrees."""
    rng = np.random.default_rng(5)
    train = np.stack([xray(s, (32, 32)) for s in range(60)]).astype(np.float32)
    heldout = np.stack([xray(s, (32, 32)) for s in range(100, 200)]).astype(np.float32)
    copies = np.clip(train[:5] + rng.normal(0, 0.01, (5, 32, 32)), 0, 1).astype(np.float32)
    new = np.stack([xray(s, (32, 32)) for s in range(300, 305)]).astype(np.float32)
    gens = np.concatenate([copies, new])
    for backend in ("pixel", "tiled_l2", "ssim"):
        t = calibrate_on_heldout(heldout, train, backend=backend, size=32, fpr=0.01)
        assert isinstance(t, Threshold) and t.n == 100 and t.resolvable
        nn = nearest_neighbors(gens, train, backend=backend, size=32, k=2)
        verdict = copy_verdicts(nn.similarities[:, 0], t)
        assert verdict.tolist() == [True] * 5 + [False] * 5, backend
        assert nn.indices[:5, 0].tolist() == [0, 1, 2, 3, 4]
        ratio = ratio_criterion(nn.distances[:, 0], nn.distances[:, 1])
        assert ratio[:5].all() and not ratio[5:].any(), backend


def test_heldout_split_of_a_dataset(mimic_jpg, caplog):
    ds = load(mimic_jpg)
    heldout = ds.subset(split=["validate", "test"])
    with caplog.at_level(logging.WARNING, logger="diffmem"):
        t = calibrate_on_heldout(heldout, ds, backend="pixel", size=16, fpr=0.05)
    assert t.n == 2 and not t.resolvable and "at least 20" in caplog.text
    # the held-out value is the larger of the two held-out images' nearest-training similarity
    query = np.stack([heldout.load_image(i, size=16) for i in range(len(heldout))])
    sims = nearest_neighbors(query, ds, backend="pixel", size=16, k=1).similarities[:, 0]
    assert t.value == pytest.approx(sims.max(), abs=1e-9)
    with pytest.raises(DataError, match=r"share study ids with the training records"):
        calibrate_on_heldout(ds.subset(split="train"), ds, backend="pixel", size=16)


# ---------------------------------------------------------------------------- one rule, one setup
def test_checked_verdicts_and_production_rule_agree():
    t = fixed_threshold(0.6)
    assert not is_copy(0.6, t) and is_copy(0.6 + 1e-9, t) and not is_copy(np.nan, 0.6)
    sims = np.random.default_rng(0).random(200)
    assert (copy_verdicts(sims, t) == is_copy(sims, t)).all()
    d2 = np.random.default_rng(1).random(200)
    d1 = d2 * np.random.default_rng(2).random(200)
    assert (ratio_criterion(d1, d2) == is_ratio_copy(d1, d2)).all()
    assert (ratio_criterion(d1, d2, ratio=0.5) == is_ratio_copy(d1, d2, ratio=0.5)).all()


def test_prepare_verdicts_calibrates_as_calibrate_on_heldout(dataset, tmp_path):
    """The setup detect and mitigate share gives the threshold of the public calibration
    function on the same held-out split, and caches the training features."""
    train, heldout = dataset.subset(split="train"), dataset.subset(split=["validate", "test"])
    v = prepare_verdicts(train, backend="pixel", backend_options={"size": 16}, heldout=heldout,
                         fpr=0.05, cache_dir=tmp_path / "cache")
    t = calibrate_on_heldout(heldout, dataset, backend="pixel", size=16, fpr=0.05)
    assert v.threshold.value == pytest.approx(t.value, abs=1e-12)
    assert (v.threshold.n, v.threshold.method) == (len(heldout), "heldout-quantile")
    assert v.null_similarities.shape == (len(heldout),)
    assert len(v.reference) == len(train) and any((tmp_path / "cache").iterdir())
    assert v.judge([t.value, t.value + 1e-6]).tolist() == [False, True]
    given = prepare_verdicts(train, backend="pixel", backend_options={"size": 16}, threshold=0.5)
    assert given.threshold.method == "fixed" and given.null_similarities is None
    with pytest.raises(DataError, match="share study ids with the training records"):
        prepare_verdicts(train, backend="pixel", backend_options={"size": 16}, heldout=train)
    with pytest.raises(DataError, match="--calibration DIR"):
        prepare_verdicts(train, backend="pixel", backend_options={"size": 16}, heldout=None)


def test_prepare_verdicts_reads_held_out_image_files(dataset, tmp_path):
    """A ``--calibration`` folder of image files gives the threshold of the same images as an
    array."""
    from PIL import Image

    heldout = dataset.subset(split=["validate", "test"])
    images = np.stack([heldout.load_image(i, size=16) for i in range(len(heldout))])
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"h{i}.png")
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(files[-1])
    train = dataset.subset(split="train")
    from_files = prepare_verdicts(train, backend="pixel", backend_options={"size": 16},
                                  heldout=files)
    from_array = prepare_verdicts(train, backend="pixel", backend_options={"size": 16},
                                  heldout=np.round(images * 255) / 255)
    assert from_files.threshold.value == pytest.approx(from_array.threshold.value, abs=1e-6)


class _Process:
    """One process of accelerate's ``PartialState`` interface, recording its steps."""

    def __init__(self, main: bool, steps: list[str]):
        self.is_main_process, self.steps = main, steps

    def wait_for_everyone(self):
        self.steps.append("wait")


def test_reference_features_main_process_first_then_the_cache(dataset, tmp_path, monkeypatch):
    steps: list[str] = []
    compute = ReferenceFeatures.from_dataset.__func__

    def spy(cls, *args, **kwargs):
        steps.append("features")
        return compute(cls, *args, **kwargs)

    monkeypatch.setattr(ReferenceFeatures, "from_dataset", classmethod(spy))
    backend = build_backend("pixel", {"size": 16})
    main = reference_features(dataset, backend, cache_dir=tmp_path, state=_Process(True, steps))
    assert steps == ["features", "wait"]
    cached = sorted(tmp_path.iterdir())
    steps.clear()
    other = reference_features(dataset, backend, cache_dir=tmp_path,
                               state=_Process(False, steps))
    assert steps == ["wait", "features"] and sorted(tmp_path.iterdir()) == cached
    assert np.array_equal(main.features, other.features)
    train = [i for i, s in enumerate(dataset) if s.split == "train"]
    with pytest.raises(DataError, match="fewer than 2 images"):
        reference_features(dataset.subset(indices=train[:1]), backend)


def test_embedding_backend_from_an_encoder_folder(encoder):
    from diffmem.embed import load_encoder

    backend = build_backend("embedding", {"encoder": str(encoder)})
    assert backend.name == "embedding"
    assert backend.params() == build_backend("embedding",
                                             {"encoder": load_encoder(encoder)}).params()

"""``Measurement`` (``diffmem.study.measure``): the own-patient re-ID rate field, saved and read
back with and without it (measure.json files cached before the field existed stay readable)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from diffmem.study.measure import (MeasureConfig, Measurement, measure_model, reid_fields,
                                   resolve_encoder, weights_stamp)
from diffmem.utils import write_json

FIELDS = dict(memorization_rate_own=0.5, memorization_rate_any=0.75,
              copy_rate_unconditional=0.0, copy_rate_unrelated=0.0, control_copy_rate=0.0,
              noise_magnitude_auc=0.9, nn_similarity_auc=0.95, fid_in_domain=12.5,
              planted_prompts=4, control_prompts=2, copy_threshold=0.8, detect_seconds=1.0,
              fid_seconds=0.5, reid_rate=0.25, reid_rate_not_copies=0.125)


def test_measurement_round_trips_with_and_without_the_own_patient_rate(tmp_path):
    new = Measurement(**FIELDS, reid_rate_own=0.125)
    write_json(tmp_path / "m.json", new.to_dict())
    back = Measurement(**json.loads((tmp_path / "m.json").read_text()))
    assert back == new and back.reid_rate_own == 0.125
    old = {k: v for k, v in new.to_dict().items() if k != "reid_rate_own"}  # an older file
    assert Measurement(**old).reid_rate_own is None
    assert Measurement(**old).to_dict() == {**old, "reid_rate_own": None}


def test_own_patient_rate_is_the_detections_own_patient_leaks():
    counts = {"generations": 10, "leaks": 4, "leaks_not_copies": 3, "own_patient_leaks": 2}
    assert reid_fields(counts) == {"reid_rate": 0.4, "reid_rate_not_copies": 0.3,
                                   "reid_rate_own": 0.2}
    older = {k: v for k, v in counts.items() if k != "own_patient_leaks"}  # before own re-ID
    assert reid_fields(older)["reid_rate_own"] is None
    assert reid_fields(older)["reid_rate"] == 0.4


def test_cached_measurement_without_the_field_is_reused(data, tmp_path):
    """A measure.json written before ``reid_rate_own`` existed is read by measure_model (the
    key matches, so nothing is measured again) with the field None."""
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    cfg = MeasureConfig(controls=2)
    key = {"config": cfg.to_dict(), "model": str(model), "weights": weights_stamp(model),
           "encoder": str(resolve_encoder(None))}
    out = tmp_path / "measure"
    out.mkdir()
    write_json(out / "measure.json", {"key": key, "measurement": FIELDS})
    m = measure_model(model, data, out, config=cfg)
    assert m.reid_rate_own is None and m.reid_rate == pytest.approx(0.25)
    assert asdict(m) == {**FIELDS, "copied_studies_without_prompt": [], "copy_gini": None,
                         "copy_top1_share": None, "copy_top10_share": None,
                         "reid_rate_own": None}

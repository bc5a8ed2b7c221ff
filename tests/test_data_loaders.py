"""Loaders: MIMIC-CXR-JPG and DICOM trees, CSV/JSONL manifests, format detection, bad input."""

from __future__ import annotations

import gzip
import json
import logging
import shutil

import numpy as np
import pytest

from conftest import LAYOUT, REPORTS, save_jpeg, write_table, xray
from diffmem.data import CXRDataset, detect_format, load, verify_images
from diffmem.errors import ConfigError, DataError

DICOM_IDS = [row[3] for row in LAYOUT]


def test_mimic_jpg_tree(mimic_jpg):
    ds = load(mimic_jpg)
    assert isinstance(ds, CXRDataset) and ds.format == "mimic-cxr-jpg"
    assert len(ds) == 6 and [s.image_id for s in ds] == DICOM_IDS
    first = ds[0]
    assert first.study_id == "s50414267" and first.patient_id == "p10000032"
    assert first.image == str(mimic_jpg / "files/p10/p10000032/s50414267" / f"{DICOM_IDS[0]}.jpg")
    assert first.report == REPORTS["s50414267"]
    assert first.prompt == "No acute cardiopulmonary process."
    assert first.view == "PA" and ds[1].view == "LATERAL"
    assert first.metadata["StudyDate"] == "21800506"
    assert dict(ds.split_counts()) == {"train": 4, "validate": 1, "test": 1}
    assert ds[3].prompt.startswith("Moderate cardiomegaly")  # no IMPRESSION -> FINDINGS
    assert ds.info["split_source"] == "mimic-cxr-2.0.0-split.csv"
    img = ds.load_image(0, size=16)
    assert img.shape == (16, 16) and img.dtype == np.float32
    assert np.abs(ds.load_image(0) - xray(0)).max() < 0.05  # JPEG of the fixture image


def test_views_filter_sections_and_reports_package(make_mimic_tree):
    root = make_mimic_tree(reports="package", name="pkg")
    assert not list((root / "files").rglob("*.txt"))
    ds = load(root, views="PA,AP", prompt_section="findings")
    assert [s.view for s in ds] == ["PA", "PA", "AP", "PA", "AP"]
    assert ds.info["excluded_by_view"] == 1
    assert ds[1].prompt == "Left-sided PICC terminates in the mid SVC. Lungs are clear."
    assert ds[0].metadata["report_path"].startswith(str(root / "mimic-cxr-reports"))
    assert len(load(root, views=["lateral"])) == 1


def test_without_tables_everything_is_train(make_mimic_tree, caplog):
    root = make_mimic_tree(metadata=False, split=False, name="bare")
    (root / "ground_truth.csv").write_text("a,b\n1,2\n")  # synthetic-set extras are ignored
    (root / "dataset_card.json").write_text("{}")
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text("subject_id,study_id\n")
    with caplog.at_level(logging.INFO, logger="diffmem"):
        ds = load(root)
    assert len(ds) == 6 and set(ds.split_counts()) == {"train"}
    assert ds.info["split_source"].startswith("none") and "'train'" in ds.info["split_source"]
    assert any("train" in r.message for r in caplog.records)
    assert all(s.view is None for s in ds)
    with pytest.raises(DataError, match="needs the view position.*metadata"):
        load(root, views="PA")


def test_gzipped_tables_are_read(make_mimic_tree):
    root = make_mimic_tree(name="gz")
    for stem in ("mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-split"):
        plain = root / f"{stem}.csv"
        with gzip.open(root / f"{stem}.csv.gz", "wb") as f:
            f.write(plain.read_bytes())
        plain.unlink()
    ds = load(root, views="PA")
    assert len(ds) == 3 and ds.info["split_source"] == "mimic-cxr-2.0.0-split.csv.gz"


def test_split_table_problems(make_mimic_tree):
    root = make_mimic_tree(name="badsplit")
    rows = [[d, "1", "2", "train"] for d in DICOM_IDS[:-1]]
    write_table(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id",
                                                     "split"], rows)
    with pytest.raises(DataError, match=f"{DICOM_IDS[-1]}.*not listed in the split table"):
        load(root)
    assert len(load(root, on_error="skip")) == 5
    rows.append([DICOM_IDS[-1], "1", "2", "val"])
    write_table(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id",
                                                     "split"], rows)
    with pytest.raises(DataError, match=r"split 'val' .* not one of"):
        load(root, on_error="skip")  # a malformed table is never skipped


def test_metadata_not_matching_folders(make_mimic_tree):
    root = make_mimic_tree(name="badmeta")
    text = (root / "mimic-cxr-2.0.0-metadata.csv").read_text()
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(text.replace("10000764", "10000765"))
    with pytest.raises(DataError, match="metadata table does not match the folders"):
        load(root)


def test_dicom_tree(make_mimic_tree):
    root = make_mimic_tree(kind="dicom", metadata=False, split=True, name="dcm")
    assert detect_format(root) == ("dicom", root)
    ds = load(root, views=("PA", "AP"))
    assert ds.format == "dicom" and len(ds) == 5
    assert [s.view for s in ds] == ["PA", "PA", "AP", "PA", "AP"]  # from the headers
    assert dict(ds.split_counts()) == {"train": 3, "validate": 1, "test": 1}
    for i, s in enumerate(ds):
        n = DICOM_IDS.index(s.image_id)
        np.testing.assert_allclose(ds.load_image(i), xray(n), atol=1e-3)
    # without the metadata table, views come from the headers, so a corrupt file shows here
    bad = root / "files/p10/p10000764/s57375967" / f"{DICOM_IDS[4]}.dcm"
    bad.write_bytes(b"not dicom" * 30)
    with pytest.raises(DataError, match=f"{DICOM_IDS[4]}.dcm: not a DICOM file"):
        load(root)
    assert len(load(root, on_error="skip")) == 5


def test_manifest_csv_and_jsonl_with_dicom_images(tmp_path):
    from diffmem.data import write_dicom

    root = tmp_path / "man"
    save_jpeg(root / "img" / "a.jpg", xray(0))
    write_dicom(root / "img" / "b.dcm", xray(1), photometric="MONOCHROME1")
    write_table(root / "manifest.csv",
                ["image", "prompt", "patient_id", "study_id", "split", "view", "site"],
                [["img/a.jpg", "Lungs  clear.\n", "p1", "s1", "train", "PA", "x"],
                 ["img/b.dcm", "Small effusion at ___.", "p2", "s2", "test", "AP", "y"]])
    ds = load(root)
    assert ds.format == "manifest" and ds.root == root and len(ds) == 2
    assert ds[0].prompt == "Lungs clear." and ds[0].metadata["site"] == "x"
    assert ds[1].split == "test" and ds[1].image == str(root / "img" / "b.dcm")
    np.testing.assert_allclose(ds.load_image(1), xray(1), atol=1e-3)

    lines = [{"image": "img/a.jpg", "report": REPORTS["s57375967"]},
             {"image": "img/b.dcm", "prompt": "Edema.", "split": "validate"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    shutil.move(str(tmp_path / "m.jsonl"), root / "other.jsonl")
    dj = load(root / "other.jsonl", views=None)
    assert dj[0].prompt.startswith("1. No pneumonia.")  # taken from the report
    assert dj[0].study_id == dj[0].patient_id == dj[0].image_id == "a"  # defaults
    assert [s.split for s in dj] == ["train", "validate"]
    assert len(load(root / "manifest.csv", views="ap")) == 1


def test_manifest_paths_must_stay_inside(tmp_path):
    root = tmp_path / "m"
    save_jpeg(root / "a.jpg", xray(0))
    save_jpeg(tmp_path / "outside.jpg", xray(1))
    for bad in ("../outside.jpg", str(tmp_path / "outside.jpg"), "sub/../../outside.jpg"):
        write_table(root / "manifest.csv", ["image", "prompt"],
                    [["a.jpg", "ok"], [bad, "leak"]])
        with pytest.raises(DataError, match=r"manifest\.csv: row 2: image path .* lies outside "
                                            "the manifest folder"):
            load(root)
        ds = load(root, on_error="skip")
        assert len(ds) == 1 and "outside the manifest" in ds.skipped[0][1]
    write_table(root / "manifest.csv", ["image", "prompt"], [[str(root / "a.jpg"), "ok"]])
    assert len(load(root)) == 1  # an absolute path inside the folder is fine


def test_manifest_errors(tmp_path):
    root = tmp_path / "m"
    save_jpeg(root / "a.jpg", xray(0))
    write_table(root / "manifest.csv", ["path", "prompt"], [["a.jpg", "x"]])
    with pytest.raises(DataError, match=r"needs an 'image' column.*found \['path', 'prompt'\]"):
        load(root)
    write_table(root / "manifest.csv", ["image", "prompt"], [["a.jpg", "x"], ["b.jpg", "y"],
                                                             ["a.jpg", "  "]])
    with pytest.raises(DataError, match=r"b\.jpg: image file not found .*row 2"):
        load(root)
    _drop_row(root, 2)  # the b.jpg row
    with pytest.raises(DataError, match="row 2: empty prompt"):
        load(root)
    assert len(load(root, on_error="skip")) == 1
    (root / "manifest.csv").unlink()
    (root / "manifest.jsonl").write_text('{"image": "a.jpg", "prompt": "x"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load(root)
    (root / "manifest.csv").write_text("image,prompt\n")
    with pytest.raises(DataError, match="both manifest.csv and manifest.jsonl"):
        load(root)


def _drop_row(root, n):
    lines = (root / "manifest.csv").read_text().splitlines()
    del lines[n]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


def test_bad_records_raise_or_skip_with_counts(mimic_jpg, copy_tree, caplog):
    root = copy_tree(mimic_jpg, "damaged")
    (root / "files/p10/p10000764/s57375967.txt").unlink()  # missing report
    (root / "files/p11/p11000011/s51029426.txt").write_bytes(b"IMPRESSION: Caf\xe9.")
    (root / "files/p10/p10000032/s53911762.txt").write_text("INDICATION: cough\n")  # no prompt
    with pytest.raises(DataError, match=r"s53911762\.txt: empty prompt"):
        load(root)
    with caplog.at_level(logging.WARNING, logger="diffmem"):
        ds = load(root, on_error="skip")
    assert len(ds) == 3 and {s.study_id for s in ds} == {"s50414267", "s53189527"}
    assert len(ds.skipped) == 3
    warning = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "skipped 3 record(s)" in warning[0]
    for kind in ("1 missing report", "1 non-UTF-8 text", "1 empty prompt"):
        assert kind in warning[0]
    # the summary of a run that skipped does not advise to skip
    assert "--on-error skip" not in warning[0]
    assert not any("--on-error" in reason for _, reason in ds.skipped)


def test_verify_images_finds_truncated_files(mimic_jpg, copy_tree):
    root = copy_tree(mimic_jpg, "trunc")
    bad = root / "files/p10/p10000764/s57375967" / f"{DICOM_IDS[4]}.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    ds = load(root)
    assert len(ds) == 6  # lazy: the loader does not decode
    with pytest.raises(DataError, match=f"{DICOM_IDS[4]}.jpg: cannot decode image"):
        verify_images(ds)
    ok = verify_images(ds, on_error="skip")
    assert len(ok) == 5 and ok.skipped[0][0] == str(bad) and len(ds) == 6
    assert ok.info["verified_images"] == 6


def test_detect_format_errors(tmp_path, mimic_jpg):
    assert detect_format(mimic_jpg) == ("mimic-cxr-jpg", mimic_jpg)
    with pytest.raises(DataError, match="no such file or folder.*manifest"):
        load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"found no manifest and no 'files' folder; expected .*"
                                        r"files/pXX/pXXXXXXXX/sXXXXXXXX/<id>\.jpg"):
        load(tmp_path / "empty")
    (tmp_path / "empty" / "files").mkdir()
    with pytest.raises(DataError, match="holds no .jpg, .png or .dcm"):
        load(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a dataset"):
        load(tmp_path / "x.txt")
    with pytest.raises(ConfigError, match="on_error must be one of"):
        load(mimic_jpg, on_error="ignore")
    with pytest.raises(ConfigError, match="unknown prompt section"):
        load(mimic_jpg, prompt_section="summary")
    with pytest.raises(DataError, match=r"no usable records \(6 excluded by views"):
        load(mimic_jpg, views="LL")

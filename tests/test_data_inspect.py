"""summarize / render_grid / ``diffmem inspect``: numbers, duplicates, errors, no writes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import LAYOUT, listing, save_jpeg, write_table, xray
from diffmem.cli import main
from diffmem.data import load
from diffmem.data.inspect import near_duplicate_clusters, render_grid, summarize
from diffmem.errors import OutputError

DICOM_IDS = [row[3] for row in LAYOUT]


def _jpg(root, n):
    group, patient, study, dicom_id = LAYOUT[n][:4]
    return root / "files" / group / patient / study / f"{dicom_id}.jpg"


def test_summary_numbers(mimic_jpg, copy_tree):
    root = copy_tree(mimic_jpg, "dups")
    # plant an identical copy across patients (n=5 gets n=0's bytes) and a near copy within
    # patient p10000032 (n=3 becomes n=2 plus faint noise)
    shutil.copyfile(_jpg(root, 0), _jpg(root, 5))
    noisy = xray(2) + np.random.default_rng(0).normal(0, 0.004, (40, 48))
    save_jpeg(_jpg(root, 3), np.clip(noisy, 0, 1))
    s = summarize(load(root))
    assert (s["images"], s["studies"], s["patients"]) == (6, 5, 3)
    assert s["studies_per_patient"] == {"max": 3, "mean": 5 / 3, "patients_with_2_or_more": 1}
    assert s["splits"] == {"test": 1, "train": 4, "validate": 1}
    assert s["patients_in_several_splits"]["count"] == 0
    assert s["views"] == {"PA": 3, "AP": 2, "LATERAL": 1}
    words = s["prompt_words"]
    assert (words["min"], words["max"]) == (4, 15)
    assert sum(words["histogram"].values()) == 6 and words["histogram"]["4-7"] == 3
    deid = s["deid_markers"]
    # prompts with ___: s53189527 (2 markers), s53911762 (1 marker)
    assert deid["prompts_with_marker"] == 2 and deid["rate"] == pytest.approx(2 / 6)
    assert deid["markers_per_prompt"] == pytest.approx(3 / 6)
    assert deid["by_marker"] == {"___": 3, "XXXX": 0, "[** **]": 0}
    dup = s["duplicate_prompts"]  # s50414267 (2 images) + s51029426 share their impression
    assert dup["clusters"] == 1 and dup["largest"] == [3]
    assert dup["examples"][0]["prompt"] == "No acute cardiopulmonary process."
    exact = s["duplicate_images"]
    assert exact["clusters"] == 1 and exact["cross_patient_clusters"] == 1
    assert exact["examples"][0]["patients"] == ["p10000032", "p11000011"]
    near = s["near_duplicate_images"]
    assert near["clusters"] == 2 and near["images_in_clusters"] == 4
    assert near["cross_patient_clusters"] == 1 and near["threshold"] == 0.1
    assert s["skipped"]["count"] == 0
    json.dumps(s)  # JSON-ready


def test_near_duplicate_threshold_and_chaining():
    base = xray(7, (16, 16))
    thumbs = np.stack([base, base * 0.5 + 0.2, xray(8, (16, 16)), base + 1e-3 * np.eye(16),
                       np.full((16, 16), 0.3)])
    # brightness/contrast changes vanish after normalisation; the flat image stands alone
    assert near_duplicate_clusters(thumbs, threshold=0.1) == [[0, 1, 3]]
    assert near_duplicate_clusters(thumbs, threshold=0.0) == [[0, 1]]
    assert near_duplicate_clusters(thumbs, threshold=2.0) == [[0, 1, 2, 3, 4]]
    assert near_duplicate_clusters(thumbs, threshold=0.1, block=2) == [[0, 1, 3]]


def test_render_grid(mimic_jpg, tmp_path):
    ds = load(mimic_jpg)
    out = render_grid(ds, tmp_path / "out" / "grid.png", n_patients=2, per_patient=4, size=32)
    with Image.open(out) as im:
        w, h = im.size
    assert w > h > 0  # two rows of up to three studies
    with pytest.raises(OutputError, match="lies inside the input"):
        render_grid(ds, mimic_jpg / "grid.png")


def test_cli_json_and_no_writes(mimic_jpg, tmp_path, capsys):
    before = listing(mimic_jpg)
    grid = tmp_path / "grid.png"
    code = main(["inspect", str(mimic_jpg), "--json", "--grid", str(grid), "--views", "PA,AP"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["images"] == 5 and summary["views"] == {"PA": 3, "AP": 2}
    assert summary["grid"] == str(grid) and grid.is_file()
    assert summary["info"]["verified_images"] == 5
    assert listing(mimic_jpg) == before
    # text output, and a grid inside the dataset is refused before anything is read
    assert main(["inspect", str(mimic_jpg)]) == 0
    text = capsys.readouterr().out
    assert "6 images, 5 studies, 3 patients" in text and "de-id marks" in text
    assert main(["inspect", str(mimic_jpg), "--grid", str(mimic_jpg / "g.png")]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert listing(mimic_jpg) == before


def test_cli_grid_to_an_unwritable_path(mimic_jpg, tmp_path, capsys):
    """A grid path that cannot be written (its folder is a file; a directory in the way) is one
    clear error naming the path, exit 2, no traceback and no temporary file left."""
    place = tmp_path / "place"
    place.mkdir()
    blocker = place / "not-a-folder"
    blocker.write_text("x", encoding="utf-8")
    (place / "a-folder.png").mkdir()
    for grid in (blocker / "grid.png", place / "a-folder.png"):
        assert main(["inspect", str(mimic_jpg), "--grid", str(grid)]) == 2
        err = capsys.readouterr().err
        assert f"cannot write the grid {str(grid)!r}" in err and "Traceback" not in err
    assert sorted(p.name for p in place.iterdir()) == ["a-folder.png", "not-a-folder"]


def _damage(kind, root, tmp_path):
    """Break the fixture tree one way; return a pattern the error must contain."""
    from diffmem.data import write_dicom

    if kind == "truncated jpeg":
        p = _jpg(root, 4)
        p.write_bytes(p.read_bytes()[:300])
        return p.name + ": cannot decode image"
    if kind == "missing report":
        (root / "files/p10/p10000764/s57375967.txt").unlink()
        return "s57375967.txt: report file not found"
    if kind == "empty prompt":
        (root / "files/p10/p10000764/s57375967.txt").write_text("INDICATION: cough\n")
        return "s57375967.txt: empty prompt"
    if kind == "non-utf8 report":
        (root / "files/p10/p10000764/s57375967.txt").write_bytes(b"IMPRESSION: Caf\xe9.")
        return "s57375967.txt: report is not valid UTF-8"
    if kind in ("corrupt dicom", "non-image dicom"):
        # a manifest over a folder of DICOM files, one of them bad
        write_dicom(root / "dcm" / "ok.dcm", xray(0))
        bad = root / "dcm" / "bad.dcm"
        if kind == "corrupt dicom":
            bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 40)
        else:
            write_dicom(bad, xray(1))
            import pydicom

            ds = pydicom.dcmread(bad)
            del ds.PixelData
            ds.save_as(bad, enforce_file_format=True)
        write_table(root / "manifest.csv", ["image", "prompt"],
                    [["dcm/ok.dcm", "Clear."], ["dcm/bad.dcm", "Effusion."]])
        return "bad.dcm: " + ("corrupt DICOM" if kind == "corrupt dicom" else "DICOM file has "
                                                                            "no pixel data")
    if kind == "escaping manifest":
        save_jpeg(tmp_path / "secret.jpg", xray(9))
        write_table(root / "manifest.csv", ["image", "prompt"],
                    [[str(_jpg(root, 0).relative_to(root)), "ok"], ["../secret.jpg", "x"]])
        return "manifest.csv: row 2: image path '../secret.jpg' lies outside"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated jpeg", "missing report", "empty prompt",
                                  "non-utf8 report", "corrupt dicom", "non-image dicom",
                                  "escaping manifest"])
def test_cli_bad_input_raises_or_skips(kind, mimic_jpg, copy_tree, tmp_path, capsys):
    root = copy_tree(mimic_jpg, "bad")
    pattern = _damage(kind, root, tmp_path)
    assert main(["inspect", str(root)]) == 2
    err = capsys.readouterr().err
    assert "diffmem inspect: error:" in err and pattern in err, err
    assert main(["inspect", str(root), "--on-error", "skip", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["skipped"]["count"] == 1, summary["skipped"]
    assert pattern in summary["skipped"]["examples"][0]["reason"]
    assert "skipped 1 record(s)" in captured.err  # the logged, counted warning


def test_inspect_reports_dicom_header_phi(tmp_path, capsys):
    """`diffmem inspect` on a DICOM dataset counts the identifying header elements it holds."""
    from diffmem.data import write_dicom

    root = tmp_path / "dcm"
    study = root / "files" / "p10" / "p10000032" / "s50414267"
    write_dicom(study / "a.dcm", xray(0), phi={"PatientName": "Doe^Jane", "PatientID": "123"},
                private={0x10: "site code 7"})
    write_dicom(study / "b.dcm", xray(1))
    (root / "files" / "p10" / "p10000032" / "s50414267.txt").write_text(
        "FINDINGS: Clear lungs.\n IMPRESSION: No acute process.\n")
    summary = summarize(load(root))
    phi = summary["dicom_phi"]
    assert phi["files"] == 2 and phi["files_with_phi"] == 1
    assert phi["by_keyword"]["PatientName"] == 1 and phi["by_keyword"]["private"] == 1
    assert main(["inspect", str(root)]) == 0
    assert "1 of 2 files carry identifying header elements" in capsys.readouterr().out

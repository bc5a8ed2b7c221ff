"""Shared fixtures: tiny MIMIC-CXR-style trees (JPEG and DICOM) with realistic report text.

The tree built by ``make_mimic_tree`` (3 patients, 5 studies, 6 images)::

    files/p10/p10000032/s50414267/{pa, lateral}  train     FINAL REPORT, FINDINGS, IMPRESSION
    files/p10/p10000032/s53189527/pa             train     WET READ + FINAL REPORT
    files/p10/p10000032/s53911762/ap             train     no IMPRESSION (findings fallback)
    files/p10/p10000764/s57375967/pa             validate  multi-line IMPRESSION
    files/p11/p11000011/s51029426/ap             test      "No acute cardiopulmonary process."
"""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPORTS = {
    "s50414267": """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
""",
    "s53189527": """ WET READ: ___ ___ ___ 3:59 PM
  Left PICC terminates in the mid SVC.
 ______________________________________________________________________________
                                 FINAL REPORT
 EXAMINATION:  Chest radiograph

 INDICATION:  History: ___ with PICC placement  // PICC position

 COMPARISON:  Chest radiograph from ___.

 FINDINGS:
 Left-sided PICC terminates in the mid SVC.  Lungs are clear.

 IMPRESSION:
 Left PICC terminates in the mid SVC.  Dr. ___ was notified by telephone at ___.
""",
    "s53911762": """                                 FINAL REPORT
 HISTORY:  Shortness of breath.

 TECHNIQUE:  Portable AP chest.

 FINDINGS:  Moderate cardiomegaly is stable compared to ___.  Small bilateral
 pleural effusions with adjacent atelectasis.
""",
    "s57375967": """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___-year-old man with cough.

 FINDINGS:  Lungs are well expanded and clear.

 IMPRESSION:  1.  No pneumonia.
 2.  Unchanged calcified granuloma in the
     right upper lobe.
""",
    "s51029426": """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)

 INDICATION:  ___ year old woman with fever  // ?pna

 IMPRESSION:  No acute cardiopulmonary process.
""",
}

# (group, patient, study, dicom_id, view, split, StudyDate)
LAYOUT = [
    ("p10", "p10000032", "s50414267", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "PA",
     "train", "21800506"),
    ("p10", "p10000032", "s50414267", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962",
     "LATERAL", "train", "21800506"),
    ("p10", "p10000032", "s53189527", "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "PA",
     "train", "21800626"),
    ("p10", "p10000032", "s53911762", "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "AP",
     "train", "21800717"),
    ("p10", "p10000764", "s57375967", "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "PA",
     "validate", "21321014"),
    ("p11", "p11000011", "s51029426", "3b7b5a8f-ec0e5c0f-ba7a1cd3-a9a4fab5-b4d3d7b5", "AP",
     "test", "21501231"),
]


def xray(seed: int, shape: tuple[int, int] = (40, 48)) -> np.ndarray:
    """A small chest-X-ray-like image in [0, 1]: bright body, two dark lungs, random blobs.

    Different seeds give thumbnails far apart (correlation well below 0.99).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.75 - 0.2 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    for cx in (0.3, 0.7):
        img -= 0.35 * np.exp(-(((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.28) ** 2))
    for _ in range(6):
        cx, cy, r, a = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.15), \
            rng.uniform(-0.4, 0.4)
        img += a * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / r**2))
    return np.clip(img, 0.0, 1.0)


def save_jpeg(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(arr * 255).astype(np.uint8)).save(path, quality=95)
    return path


def write_table(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def listing(root: Path) -> list[tuple[str, int, int]]:
    """Every path below ``root`` with its size and modification time (to detect writes)."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


@pytest.fixture
def make_mimic_tree(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_mimic_tree(kind="jpg"|"dicom", metadata=True, split=True,
    reports="beside"|"package")`` builds the tree above under ``tmp_path/<name>`` and returns
    its root."""

    def make(*, kind: str = "jpg", metadata: bool = True, split: bool = True,
             reports: str = "beside", name: str | None = None) -> Path:
        root = tmp_path / (name or f"mimic-{kind}")
        meta_rows, split_rows = [], []
        for n, (group, patient, study, dicom_id, view, sp, date) in enumerate(LAYOUT):
            folder = root / "files" / group / patient / study
            if kind == "jpg":
                save_jpeg(folder / f"{dicom_id}.jpg", xray(n))
            else:
                from diffmem.data.dicom import write_dicom

                write_dicom(folder / f"{dicom_id}.dcm", xray(n),
                            photometric="MONOCHROME1" if n % 2 else "MONOCHROME2",
                            window=(2048, 4000) if n % 3 == 0 else None, bits=12,
                            attributes={"ViewPosition": view})
            report_dir = (root / "files" / group / patient if reports == "beside"
                          else root / "mimic-cxr-reports" / "files" / group / patient)
            report_dir.mkdir(parents=True, exist_ok=True)
            (report_dir / f"{study}.txt").write_text(REPORTS[study], encoding="utf-8")
            meta_rows.append([dicom_id, patient[1:], study[1:], "CHEST (PA AND LAT)", view,
                              40, 48, date, "101010.000"])
            split_rows.append([dicom_id, study[1:], patient[1:], sp])
        if metadata:
            write_table(root / "mimic-cxr-2.0.0-metadata.csv",
                        ["dicom_id", "subject_id", "study_id",
                         "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
                         "StudyDate", "StudyTime"], meta_rows)
        if split:
            write_table(root / "mimic-cxr-2.0.0-split.csv",
                        ["dicom_id", "study_id", "subject_id", "split"], split_rows)
        return root

    return make


@pytest.fixture
def mimic_jpg(make_mimic_tree) -> Path:
    """The JPEG tree with metadata and split tables, reports beside the study folders."""
    return make_mimic_tree()


@pytest.fixture
def copy_tree(tmp_path: Path) -> Callable[[Path, str], Path]:
    """``copy_tree(src, name)`` copies a fixture tree so a test can damage it."""

    def copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(autouse=True)
def _quiet_and_clean_logging(monkeypatch):
    """No progress bars in tests, and undo the CLI's logging set-up after each test (``main``
    binds a handler to the stream that was stderr at the time)."""
    monkeypatch.setenv("DIFFMEM_NO_PROGRESS", "1")
    yield
    logger = logging.getLogger("diffmem")
    logger.handlers[:] = []
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline saved as a diffusers folder (safetensors)."""
    from diffmem.models.tiny import tiny_stable_diffusion

    folder = tmp_path_factory.mktemp("sd") / "model"
    tiny_stable_diffusion(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The ``tiny`` synthetic dataset (seed 0), made once per test session. Read-only: diffmem
    never writes into a dataset, and tests that damage one copy it first."""
    from diffmem.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def dataset(data: Path):
    """:func:`diffmem.data.load` of :func:`data`."""
    from diffmem.data import load

    return load(data)


@pytest.fixture(scope="session")
def model(dataset, tmp_path_factory) -> Path:
    """An untrained ``tiny`` CXR pipeline folder whose tokenizer is trained on :func:`data`'s
    prompts (seed 0)."""
    from diffmem.pipelines import build_pipeline, train_tokenizer

    tokenizer = train_tokenizer([s.prompt for s in dataset], vocab_size=200,
                                model_max_length=32)
    folder = tmp_path_factory.mktemp("model") / "tiny-cxr"
    build_pipeline("tiny", tokenizer=tokenizer, seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def encoder(data, tmp_path_factory) -> Path:
    """A ``tiny`` in-domain encoder folder trained for 2 steps on :func:`data` (its numbers mean
    nothing; it exercises the utility metrics)."""
    from diffmem.embed import train_encoder

    out = tmp_path_factory.mktemp("enc") / "enc"
    train_encoder(data, out, preset="tiny", steps=2)
    return out

"""MIMIC-CXR folder layouts: MIMIC-CXR-JPG (and the DICOM tree, which shares the layout).

The layout, as PhysioNet distributes it::

    ROOT/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
    ROOT/files/p10/p10000032/s50414267.txt                 (report beside the study folder)
    ROOT/mimic-cxr-reports/files/p10/p10000032/s50414267.txt   (or the reports package)
    ROOT/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ViewPosition, ...
    ROOT/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split

Both tables are optional. Other files at ROOT (``mimic-cxr-2.0.0-chexpert.csv``, a synthetic
set's ``ground_truth.csv`` and ``dataset_card.json``...) are ignored. The loader never opens an
image: images are read lazily, so use :func:`diffmem.data.verify_images` to find unreadable ones.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffmem.data._reading import (check_on_error, find_table, handle, normalize_views,
                                   read_csv_rows, warn_skipped)
from diffmem.data.reports import PROMPT_SECTIONS, extract_prompt, read_report
from diffmem.data.dataset import SPLITS, CXRDataset, Study
from diffmem.data.dicom import dicom_view_position
from diffmem.errors import ConfigError, DataError
from diffmem.utils import progress

log = logging.getLogger(__name__)

METADATA_STEM = "mimic-cxr-2.0.0-metadata"
SPLIT_STEM = "mimic-cxr-2.0.0-split"
REPORTS_DIR = "mimic-cxr-reports"
JPG_SUFFIXES = (".jpg", ".jpeg", ".png")

_GROUP_RE = re.compile(r"^p\d+$")
_PATIENT_RE = re.compile(r"^p\d+$")
_STUDY_RE = re.compile(r"^s\d+$")


def iter_tree(root: Path, suffixes: Sequence[str]) -> tuple[list[tuple[str, str, Path]], int]:
    """Walk ``root/files/pXX/pXXXXXXXX/sXXXXXXXX/`` in sorted order.

    Returns
    -------
    images : list of (patient_id, study_id, path)
        Every file whose suffix (lower case) is in ``suffixes``.
    ignored : int
        Entries that do not fit the layout (other files, oddly named folders).
    """
    images: list[tuple[str, str, Path]] = []
    ignored = 0

    def entries(folder: Path) -> list[os.DirEntry]:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)

    for group in entries(root / "files"):
        if not (group.is_dir() and _GROUP_RE.match(group.name)):
            ignored += 1
            continue
        for patient in entries(Path(group.path)):
            if not patient.is_dir():
                ignored += not patient.name.endswith(".txt")
                continue
            if not _PATIENT_RE.match(patient.name):
                ignored += 1
                continue
            for study in entries(Path(patient.path)):
                if study.is_file() and study.name.endswith(".txt"):
                    continue  # a report beside its study folder
                if not (study.is_dir() and _STUDY_RE.match(study.name)):
                    ignored += 1
                    continue
                for f in entries(Path(study.path)):
                    if f.is_file() and os.path.splitext(f.name)[1].lower() in suffixes:
                        images.append((patient.name, study.name, Path(f.path)))
                    else:
                        ignored += 1
    return images, ignored


def report_path(root: Path, patient_id: str, study_id: str, group: str) -> Path:
    """Where a study's report is: the reports package first, then beside the study folder.

    When neither exists, the path beside the study folder is returned (for the error message).
    """
    package = root / REPORTS_DIR / "files" / group / patient_id / f"{study_id}.txt"
    if package.is_file():
        return package
    return root / "files" / group / patient_id / f"{study_id}.txt"


def _read_metadata(root: Path) -> tuple[dict[str, dict[str, str]] | None, Path | None]:
    path = find_table(root, METADATA_STEM)
    if path is None:
        return None, None
    rows = {row["dicom_id"]: row for row in
            read_csv_rows(path, required=("dicom_id", "subject_id", "study_id", "ViewPosition"))}
    return rows, path


def _read_splits(root: Path) -> tuple[dict[str, str] | None, Path | None]:
    path = find_table(root, SPLIT_STEM)
    if path is None:
        return None, None
    out = {}
    for row in read_csv_rows(path, required=("dicom_id", "split")):
        split = row["split"].strip()
        if split not in SPLITS:
            raise DataError(f"split {split!r} of dicom_id {row['dicom_id']!r} is not one of "
                            f"{list(SPLITS)}; fix the split table", path=path)
        out[row["dicom_id"]] = split
    return out, path


def load_mimic_tree(root: str | os.PathLike, *, suffixes: Sequence[str], format: str,
                    prompt_section: str = "impression",
                    views: str | Sequence[str] | None = None, on_error: str = "raise",
                    header_view: Callable[[Path], str | None] | None = None) -> CXRDataset:
    """Load a MIMIC-CXR style tree whose images have one of ``suffixes``.

    Shared by :func:`load_mimic_jpg` and :func:`load_dicom_tree`; see
    :func:`load_mimic_jpg` for the parameters. ``header_view(path)``, when given, reads an
    image's view position from its own header where the metadata table is absent.
    """
    root = Path(root).absolute()
    check_on_error(on_error)
    if prompt_section not in PROMPT_SECTIONS:
        raise ConfigError(f"unknown prompt section {prompt_section!r}; choose one of "
                          f"{list(PROMPT_SECTIONS)}")
    views = normalize_views(views)
    if not (root / "files").is_dir():
        raise DataError(f"no 'files' folder; a MIMIC-CXR tree looks like "
                        f"files/p10/p10000032/s50414267/<dicom_id>{suffixes[0]}", path=root)

    images, ignored = iter_tree(root, suffixes)
    metadata, metadata_path = _read_metadata(root)
    splits, split_path = _read_splits(root)
    if views is not None and metadata is None and header_view is None:
        raise DataError(f"views={list(views)} needs the view position of every image, but "
                        f"there is no {METADATA_STEM}.csv at the root; add it or drop --views",
                        path=root)

    skipped: list[tuple[str, str]] = []
    studies: list[Study] = []
    reports: dict[str, str | DataError] = {}
    excluded_by_view = 0
    without_metadata = 0
    for patient_id, study_id, path in progress(images, desc="reading reports", unit="image"):
        dicom_id = path.stem
        meta: dict[str, Any] = {}
        view: str | None = None
        try:
            if metadata is not None:
                row = metadata.get(dicom_id)
                if row is None:
                    without_metadata += 1
                else:
                    if (row["subject_id"].strip() != patient_id[1:]
                            or row["study_id"].strip() != study_id[1:]):
                        raise DataError(
                            f"metadata row of dicom_id {dicom_id!r} says subject "
                            f"{row['subject_id']!r}, study {row['study_id']!r}, but the file is "
                            f"in {patient_id}/{study_id}; the metadata table does not match "
                            "the folders", path=path)
                    meta.update({k: v for k, v in row.items()
                                 if k not in ("dicom_id", "subject_id", "study_id")})
                    view = row["ViewPosition"].strip() or None
            elif header_view is not None:
                view = header_view(path)
                if view:
                    meta["ViewPosition"] = view
            if views is not None and (view or "").upper() not in views:
                excluded_by_view += 1
                continue
            if splits is not None:
                if dicom_id not in splits:
                    raise DataError(f"dicom_id {dicom_id!r} is not listed in the split table "
                                    f"{split_path.name}; add it or use --on-error skip",
                                    path=path)
                split = splits[dicom_id]
            else:
                split = "train"
            rpath = report_path(root, patient_id, study_id, path.parent.parent.parent.name)
            key = str(rpath)
            if key not in reports:
                try:
                    text = read_report(rpath)
                    reports[key] = text
                except DataError as e:
                    reports[key] = e
            text = reports[key]
            if isinstance(text, DataError):
                raise text
            prompt = extract_prompt(text, prompt_section, source=rpath)
        except DataError as e:
            handle(e, on_error=on_error, skipped=skipped, record=path)
            continue
        meta["report_path"] = str(rpath)
        studies.append(Study(study_id=study_id, patient_id=patient_id, image=str(path),
                             report=text, prompt=prompt, split=split, view=view,
                             image_id=dicom_id, metadata=meta))

    warn_skipped(skipped, where=root)
    info = {
        "prompt_section": prompt_section,
        "views": list(views) if views else None,
        "excluded_by_view": excluded_by_view,
        "metadata": metadata_path.name if metadata_path else None,
        "images_without_metadata": without_metadata if metadata is not None else None,
        "split_source": (split_path.name if split_path else
                         f"none: no {SPLIT_STEM}.csv, so every record is 'train'"),
        "ignored_entries": ignored,
    }
    if split_path is None:
        log.info("%s: no %s.csv; every record is in the 'train' split", root, SPLIT_STEM)
    return CXRDataset(studies, root=root, format=format, skipped=skipped, info=info)


def load_mimic_jpg(root: str | os.PathLike, *, prompt_section: str = "impression",
                   views: str | Sequence[str] | None = None,
                   on_error: str = "raise") -> CXRDataset:
    """Load a MIMIC-CXR-JPG folder (Johnson et al., MIMIC-CXR-JPG, PhysioNet 2019).

    Parameters
    ----------
    root : path
        The folder holding ``files/`` (and optionally the metadata and split tables and
        ``mimic-cxr-reports/``).
    prompt_section : {"impression", "findings", "both", "full"}
        Which report text becomes the prompt (see :func:`diffmem.data.extract_prompt`).
    views : str or sequence of str, optional
        Keep only these view positions (``("PA", "AP")`` or ``"PA,AP"``), read from the
        metadata table's ``ViewPosition``, which is then required.
    on_error : {"raise", "skip"}
        ``"raise"`` stops at the first record that cannot be used (missing or non-UTF-8
        report, empty prompt, metadata or split mismatch); ``"skip"`` leaves it out and lists
        it in ``dataset.skipped``.

    Returns
    -------
    CXRDataset
        One :class:`Study` per image (``image_id`` = dicom_id), sorted by patient, study and
        file name; ``format="mimic-cxr-jpg"``. Without the split table every record is
        ``"train"`` (noted in ``dataset.info["split_source"]``).
    """
    return load_mimic_tree(root, suffixes=JPG_SUFFIXES, format="mimic-cxr-jpg",
                           prompt_section=prompt_section, views=views, on_error=on_error)


def load_dicom_tree(root: str | os.PathLike, *, prompt_section: str = "impression",
                    views: str | Sequence[str] | None = None,
                    on_error: str = "raise") -> CXRDataset:
    """Load a MIMIC-CXR (DICOM) folder: ``files/pXX/pXXXXXXXX/sXXXXXXXX/<id>.dcm``.

    Reports are paired by study folder exactly as for MIMIC-CXR-JPG
    (``files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` or ``mimic-cxr-reports/files/...``); the split and
    metadata tables at the root are used when present. Without the metadata table, each
    file's view is read from its header's ViewPosition (header only), so a corrupt file is
    reported here already. Parameters are those of :func:`diffmem.data.mimic.load_mimic_jpg`;
    the result has ``format="dicom"``. For any other folder of DICOM files, write a manifest
    whose ``image`` column points at the ``.dcm`` files.
    """
    return load_mimic_tree(root, suffixes=(".dcm", ".dicom"), format="dicom",
                           prompt_section=prompt_section, views=views, on_error=on_error,
                           header_view=dicom_view_position)

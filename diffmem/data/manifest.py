"""Manifests: a CSV or JSON Lines table listing images and their prompts, for any folder layout.

Columns (CSV header or JSON keys):

==============  =========  ===============================================================
``image``       required   path of a JPEG/PNG/DICOM file, relative to the manifest's folder
``prompt``      see note   the conditioning text
``report``      optional   the full report text (the prompt is taken from it when ``prompt``
                           is absent or blank)
``patient_id``  optional   default: the ``study_id``
``study_id``    optional   default: the image file name without suffix
``split``       optional   ``train``/``validate``/``test``; default ``train``
``view``        optional   view position (``PA``, ``AP``...)
``image_id``    optional   default: the image file name without suffix
==============  =========  ===============================================================

Each record needs a ``prompt`` or a ``report``. Other columns land in ``Study.metadata``. Every
image must lie inside the manifest's folder (``..`` or an absolute path elsewhere is refused;
symbolic links inside the folder are followed).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from diffmem.data._reading import check_on_error, handle, normalize_views, warn_skipped
from diffmem.data.reports import PROMPT_SECTIONS, extract_prompt, normalize_whitespace
from diffmem.data.dataset import SPLITS, CXRDataset, Study
from diffmem.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".jsonl")
_KNOWN = ("image", "prompt", "report", "patient_id", "study_id", "split", "view", "image_id")


def _rows_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8-sig", errors="strict", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            _check_header(path, header)
            for i, row in enumerate(reader, start=1):
                if None in row:
                    raise DataError(f"row {i} has more fields than the header "
                                    f"{list(header)}; quote fields that contain commas",
                                    path=path)
                yield f"row {i}", row
    except UnicodeDecodeError as e:
        raise DataError(f"manifest is not valid UTF-8 (byte offset {e.start}); re-encode it "
                        "as UTF-8", path=path) from None
    except csv.Error as e:
        raise DataError(f"cannot parse manifest CSV: {e}", path=path) from None


def _rows_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            seen_header = False
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"line {n} is not valid JSON ({e.msg}); each line must be "
                                    "one JSON object", path=path) from None
                if not isinstance(row, dict):
                    raise DataError(f"line {n} is a JSON {type(row).__name__}, not an object "
                                    "with keys 'image' and 'prompt'", path=path)
                if not seen_header:
                    _check_header(path, list(row))
                    seen_header = True
                yield f"line {n}", row
    except UnicodeDecodeError as e:
        raise DataError(f"manifest is not valid UTF-8 (byte offset {e.start}); re-encode it "
                        "as UTF-8", path=path) from None


def _check_header(path: Path, header: Sequence[str]) -> None:
    if "image" not in header or not ({"prompt", "report"} & set(header)):
        raise DataError(f"manifest needs an 'image' column and a 'prompt' (or 'report') "
                        f"column; found {list(header)}", path=path)


def resolve_inside(root: Path, value: str, *, where: str, manifest: Path) -> Path:
    """``root / value`` as an absolute path, refusing anything outside ``root``.

    The check is on the normalised path (``..`` collapsed), so symbolic links inside the root
    are allowed to point elsewhere.
    """
    if not value:
        raise DataError(f"{where}: empty 'image' value", path=manifest)
    candidate = Path(os.path.normpath(root / value))  # absolute value replaces root
    if not (candidate == root or root in candidate.parents):
        raise DataError(f"{where}: image path {value!r} lies outside the manifest folder "
                        f"{str(root)!r}; manifest paths must be relative and stay inside it",
                        path=manifest)
    return candidate


def load_manifest(path: str | os.PathLike, *, prompt_section: str = "impression",
                  views: str | Sequence[str] | None = None,
                  on_error: str = "raise") -> CXRDataset:
    """Load a CSV or JSON Lines manifest (see the module docstring for the columns).

    Parameters
    ----------
    path : path
        The ``.csv`` or ``.jsonl`` manifest; image paths are relative to its folder.
    prompt_section : {"impression", "findings", "both", "full"}
        Used only for records whose ``prompt`` is blank and whose ``report`` is given.
    views : str or sequence of str, optional
        Keep only these view positions; needs a ``view`` column.
    on_error : {"raise", "skip"}
        What to do with a record whose image is missing or outside the folder, or whose
        prompt is empty: stop with a DataError, or skip it (listed in ``dataset.skipped``).
        A malformed manifest (missing columns, bad JSON, bad split value) always raises.

    Returns
    -------
    CXRDataset
        ``format="manifest"``, ``root`` = the manifest's folder, records in manifest order.
    """
    path = Path(os.path.abspath(path))
    check_on_error(on_error)
    if prompt_section not in PROMPT_SECTIONS:
        raise ConfigError(f"unknown prompt section {prompt_section!r}; choose one of "
                          f"{list(PROMPT_SECTIONS)}")
    views = normalize_views(views)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise DataError(f"a manifest is a .csv or .jsonl file, got {path.suffix!r}", path=path)
    if not path.is_file():
        raise DataError("manifest file not found", path=path)
    root = path.parent
    rows = _rows_csv(path) if suffix == ".csv" else _rows_jsonl(path)

    studies: list[Study] = []
    skipped: list[tuple[str, str]] = []
    excluded_by_view = 0
    for where, row in rows:
        row = {k: ("" if v is None else str(v) if not isinstance(v, str) else v)
               for k, v in row.items()}
        if views is not None:
            if "view" not in row:
                raise DataError(f"views={list(views)} needs a 'view' column; add one or drop "
                                "--views", path=path)
            if row["view"].strip().upper() not in views:
                excluded_by_view += 1
                continue
        split = row.get("split", "").strip() or "train"
        if split not in SPLITS:
            raise DataError(f"{where}: split {split!r} is not one of {list(SPLITS)}", path=path)
        image_value = row.get("image", "").strip()
        try:
            image = resolve_inside(root, image_value, where=where, manifest=path)
            if not image.is_file():
                raise DataError(f"image file not found (listed on {where} of {path.name}); "
                                "fix the path or use --on-error skip", path=image)
            report = row.get("report", "")
            prompt = normalize_whitespace(row.get("prompt", ""))
            if not prompt and report.strip():
                prompt = extract_prompt(report, prompt_section, source=f"{path} ({where})")
            if not prompt:
                raise DataError(f"{where}: empty prompt (no 'prompt' text and no 'report' "
                                "to take it from); fill it in or use --on-error skip",
                                path=path)
        except DataError as e:
            handle(e, on_error=on_error, skipped=skipped, record=f"{path} ({where})")
            continue
        study_id = row.get("study_id", "").strip() or image.stem
        patient_id = row.get("patient_id", "").strip() or study_id
        metadata = {k: v for k, v in row.items() if k not in _KNOWN}
        metadata["manifest_row"] = where
        studies.append(Study(
            study_id=study_id, patient_id=patient_id, image=str(image), report=report,
            prompt=prompt, split=split, view=row.get("view", "").strip() or None,
            image_id=row.get("image_id", "").strip() or image.stem, metadata=metadata))

    warn_skipped(skipped, where=path)
    info = {
        "manifest": path.name,
        "prompt_section": prompt_section,
        "views": list(views) if views else None,
        "excluded_by_view": excluded_by_view,
    }
    return CXRDataset(studies, root=root, format="manifest", skipped=skipped, info=info)

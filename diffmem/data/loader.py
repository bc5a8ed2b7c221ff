"""One entry point for every dataset format: :func:`load` detects the layout and reads it;
:func:`verify_images` decodes every image once to catch truncated or corrupt files early."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from diffmem.data._reading import check_on_error, handle, warn_skipped
from diffmem.data.images import DICOM_SUFFIXES, RASTER_SUFFIXES, read_image
from diffmem.data.manifest import MANIFEST_SUFFIXES, load_manifest
from diffmem.data.mimic import load_dicom_tree, load_mimic_jpg
from diffmem.data.dataset import CXRDataset
from diffmem.errors import DataError
from diffmem.utils import progress

log = logging.getLogger(__name__)

FORMATS = ("manifest", "mimic-cxr-jpg", "dicom")
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")

_LOOKED_FOR = ("a .csv or .jsonl manifest file; a folder holding manifest.csv or "
               "manifest.jsonl; or a MIMIC-CXR folder with "
               "files/pXX/pXXXXXXXX/sXXXXXXXX/<id>.jpg (MIMIC-CXR-JPG) or <id>.dcm (DICOM)")


def dataset_root(path: str | os.PathLike) -> Path:
    """The folder a dataset path stands for: the folder itself, or a manifest file's folder
    (a manifest's images lie inside it). The folder nothing may be written into.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "manifest.csv").write_text("image,report\\n", encoding="utf-8")
    13
    >>> dataset_root(folder / "manifest.csv") == dataset_root(folder) == folder
    True
    """
    path = Path(path)
    return path.parent if path.is_file() else path


def detect_format(path: str | os.PathLike) -> tuple[str, Path]:
    """Which loader reads ``path``, and the file or folder to give it.

    Parameters
    ----------
    path : path
        A manifest file or a dataset folder.

    Returns
    -------
    format : str
        ``"manifest"``, ``"mimic-cxr-jpg"`` or ``"dicom"``.
    target : pathlib.Path
        The manifest file, or the dataset folder.

    Raises
    ------
    DataError
        When ``path`` does not exist or matches no format (the message lists what was looked
        for), or a folder holds both manifest.csv and manifest.jsonl.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file or folder; expected {_LOOKED_FOR}", path=path)
    if path.is_file():
        if path.suffix.lower() in MANIFEST_SUFFIXES:
            return "manifest", path
        raise DataError(f"not a dataset: expected {_LOOKED_FOR}", path=path)
    manifests = [path / n for n in MANIFEST_NAMES if (path / n).is_file()]
    if len(manifests) > 1:
        raise DataError("folder holds both manifest.csv and manifest.jsonl; pass the one to "
                        "use as DATA", path=path)
    if manifests:
        return "manifest", manifests[0]
    files = path / "files"
    if files.is_dir():
        for _folder, dirs, names in os.walk(files):
            dirs.sort()
            for name in sorted(names):
                suffix = os.path.splitext(name)[1].lower()
                if suffix in RASTER_SUFFIXES:
                    return "mimic-cxr-jpg", path
                if suffix in DICOM_SUFFIXES:
                    return "dicom", path
        raise DataError(f"'files' folder holds no .jpg, .png or .dcm images; expected "
                        f"{_LOOKED_FOR}", path=path)
    raise DataError(f"found no manifest and no 'files' folder; expected {_LOOKED_FOR}",
                    path=path)


def load(path: str | os.PathLike, *, prompt_section: str = "impression",
         views: str | Sequence[str] | None = None, on_error: str = "raise") -> CXRDataset:
    """Load a chest X-ray dataset, detecting its format.

    Parameters
    ----------
    path : path
        A manifest (``.csv``/``.jsonl``), a folder holding ``manifest.csv`` or
        ``manifest.jsonl``, or a MIMIC-CXR-JPG or MIMIC-CXR DICOM folder (``files/pXX/...``).
    prompt_section : {"impression", "findings", "both", "full"}
        Which report text becomes each record's prompt (see
        :func:`diffmem.data.extract_prompt`).
    views : str or sequence of str, optional
        Keep only these view positions, e.g. ``("PA", "AP")`` or ``"PA,AP"``.
    on_error : {"raise", "skip"}
        ``"raise"`` (default) stops at the first unusable record with a DataError naming the
        file; ``"skip"`` leaves such records out, lists them in ``dataset.skipped`` as
        ``(record, reason)`` and logs one warning counting them by kind.

    Returns
    -------
    CXRDataset
        The records; images are read lazily (see :func:`verify_images`).

    Raises
    ------
    DataError
        For an unrecognised path, an unusable record under ``on_error="raise"``, or when no
        record is left.

    Examples
    --------
    >>> ds = load("path/to/mimic-cxr-jpg", views="PA,AP")            # doctest: +SKIP
    >>> ds = load("my_manifest.csv", on_error="skip"); ds.skipped     # doctest: +SKIP
    """
    check_on_error(on_error)
    fmt, target = detect_format(path)
    kwargs = dict(prompt_section=prompt_section, views=views, on_error=on_error)
    if fmt == "manifest":
        dataset = load_manifest(target, **kwargs)
    elif fmt == "mimic-cxr-jpg":
        dataset = load_mimic_jpg(target, **kwargs)
    else:
        dataset = load_dicom_tree(target, **kwargs)
    if not len(dataset):
        why = []
        if dataset.skipped:
            why.append(f"{len(dataset.skipped)} record(s) skipped as unreadable")
        if dataset.info.get("excluded_by_view"):
            why.append(f"{dataset.info['excluded_by_view']} excluded by views={views!r}")
        raise DataError(f"no usable records ({'; '.join(why) or 'the dataset is empty'})",
                        path=target)
    log.info("loaded %d record(s) from %s (%s)", len(dataset), target, fmt)
    return dataset


def verify_images(dataset: CXRDataset, *, on_error: str = "raise") -> CXRDataset:
    """Decode every image once, to find truncated, corrupt or missing files before use.

    Images load lazily, so a loader cannot see a truncated JPEG or a DICOM without pixel data;
    this does, at the cost of one full decode per file (with a progress bar).

    Parameters
    ----------
    dataset : CXRDataset
        Not modified.
    on_error : {"raise", "skip"}
        Raise the first DataError, or drop the bad records.

    Returns
    -------
    CXRDataset
        A new dataset without the bad records (all of them under ``"raise"``); the dropped ones
        are appended to ``skipped`` and ``info["verified_images"]`` counts the files decoded.
    """
    check_on_error(on_error)
    skipped = list(dataset.skipped)
    new_skips: list[tuple[str, str]] = []
    good = []
    status: dict[str, DataError | None] = {}
    for study in progress(dataset, desc="verifying images", total=len(dataset), unit="image"):
        if study.image not in status:
            try:
                read_image(study.image)
                status[study.image] = None
            except DataError as e:
                status[study.image] = e
        error = status[study.image]
        if error is not None:
            handle(error, on_error=on_error, skipped=new_skips, record=study.image)
            continue
        good.append(study)
    warn_skipped(new_skips, where=dataset.root)
    info = {**dataset.info, "verified_images": len(status)}
    return CXRDataset(good, root=dataset.root, format=dataset.format, skipped=skipped + new_skips,
                      info=info)

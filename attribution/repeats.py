"""Which training records a model is likely to copy: repeated images and repeated patients.

Diffusion models copy training images that are duplicated (Somepalli et al., CVPR 2023;
Carlini et al., USENIX Security 2023), and in medical data what repeats is often the *image* or
the *patient*, not the report: a patient imaged again and again under different reports, a film
stored twice. A scan that contrasts only duplicated prompt *texts* with the rest misses those
records (on an Open-i-style dataset the memorized patients' reports all differed), so
:func:`copy_prone_records` flags, per training record,

* **repeated images**: records whose image is an exact or near duplicate of another record's
  (connected components of the relation "cosine similarity of standardized 16 x 16 thumbnails
  at least ``image_threshold``"; on diffmem's synthetic data near-duplicate copies score
  >= 0.974 and films of different patients <= 0.966);
* **repeated patients**: records of a patient with at least ``patient_min`` training records.

The scan (:func:`~diffmem.attribution.scan.scan_prompts`, ``copy_prone=``) contrasts the prompts
of these records, together with duplicated prompts, against the rest.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffmem.errors import ConfigError
from diffmem.utils import progress

log = logging.getLogger(__name__)

__all__ = ["CopyProne", "copy_prone_records", "near_duplicate_groups"]

THUMBNAIL = 16


@dataclass
class CopyProne:
    """Per-record flags of :func:`copy_prone_records`.

    Attributes
    ----------
    repeated_image : numpy.ndarray
        Bool ``(N,)``: the record's image has an exact or near duplicate among the records.
    repeated_patient : numpy.ndarray
        Bool ``(N,)``: the record's patient has at least ``patient_min`` records.
    image_groups : numpy.ndarray
        int64 ``(N,)``: the near-duplicate image group of each record (-1: none).
    params : dict
    """

    repeated_image: np.ndarray
    repeated_patient: np.ndarray
    image_groups: np.ndarray
    params: dict[str, Any]

    @property
    def flags(self) -> np.ndarray:
        """Bool ``(N,)``: a repeated image or a repeated patient."""
        return self.repeated_image | self.repeated_patient

    def summary(self) -> dict[str, Any]:
        return {"records": int(len(self.flags)),
                "repeated_image_records": int(self.repeated_image.sum()),
                "image_groups": int(self.image_groups.max() + 1) if len(self.flags) else 0,
                "repeated_patient_records": int(self.repeated_patient.sum()),
                "copy_prone_records": int(self.flags.sum()), **self.params}


def near_duplicate_groups(features: np.ndarray, threshold: float, *,
                          batch_size: int = 1024) -> np.ndarray:
    """Connected components of "cosine similarity >= threshold" among unit-norm feature rows.

    Compares rows in blocks of ``batch_size`` (memory bounded by ``batch_size x N``; time grows
    with ``N**2``). Returns int64 ``(N,)``: a group label for rows with at least one neighbour,
    -1 for the others; groups are numbered by their first row.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    >>> near_duplicate_groups(x, 0.99).tolist()
    [0, 0, -1, -1]
    """
    n = len(features)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    x = np.asarray(features, dtype=np.float32)
    for lo in range(0, n, batch_size):
        sims = x[lo:lo + batch_size] @ x.T
        rows, cols = np.nonzero(sims >= threshold - 1e-6)
        for a, b in zip((rows + lo).tolist(), cols.tolist()):
            if a < b:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    sizes = Counter(roots.tolist())
    labels = np.full(n, -1, dtype=np.int64)
    numbering: dict[int, int] = {}
    for i, r in enumerate(roots.tolist()):
        if sizes[r] > 1:
            labels[i] = numbering.setdefault(r, len(numbering))
    return labels


def copy_prone_records(dataset: Any, *, image_threshold: float | None = 0.97,
                       patient_min: int | None = 10, batch_size: int = 256) -> CopyProne:
    """Flag the records whose image or patient repeats (see the module docstring).

    Parameters
    ----------
    dataset : CXRDataset
        The records to examine (typically the training split).
    image_threshold : float or None, optional
        Cosine similarity of standardized 16 x 16 thumbnails from which two images are near
        duplicates (default 0.97); None skips the image comparison.
    patient_min : int or None, optional
        Records from which a patient counts as heavily repeated (default 10); None skips it.
    batch_size : int, optional
        Images read per chunk.

    Returns
    -------
    CopyProne

    Raises
    ------
    ConfigError
        For a threshold outside (0, 1] or a ``patient_min`` below 2.
    """
    if image_threshold is not None and not 0 < float(image_threshold) <= 1:
        raise ConfigError(f"image_threshold={image_threshold!r}; use a cosine similarity in "
                          "(0, 1] (e.g. 0.97), or None to skip the image comparison")
    if patient_min is not None and (isinstance(patient_min, bool)
                                    or not isinstance(patient_min, (int, np.integer))
                                    or patient_min < 2):
        raise ConfigError(f"patient_min={patient_min!r}; use an integer >= 2 (e.g. 10), or None "
                          "to skip the patient count")
    n = len(dataset)
    groups = np.full(n, -1, dtype=np.int64)
    if image_threshold is not None and n > 1:
        feats = np.zeros((n, THUMBNAIL * THUMBNAIL), dtype=np.float32)
        chunks = dataset.iter_images(size=THUMBNAIL, batch_size=batch_size)
        for idx, images in progress(chunks, total=-(-n // batch_size), desc="image repeats",
                                    unit="chunk"):
            x = images.reshape(len(idx), -1).astype(np.float64)
            x -= x.mean(axis=1, keepdims=True)
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            feats[idx] = np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)
        groups = near_duplicate_groups(feats, float(image_threshold))
    patients = [s.patient_id for s in dataset]
    per_patient = Counter(patients)
    heavy = np.array([patient_min is not None and per_patient[p] >= patient_min
                      for p in patients], dtype=bool)
    result = CopyProne(groups >= 0, heavy, groups,
                       {"image_threshold": image_threshold, "patient_min": patient_min,
                        "thumbnail": THUMBNAIL})
    log.info("copy-prone records: %d with a repeated image, %d of heavily repeated patients",
             int(result.repeated_image.sum()), int(heavy.sum()))
    return result

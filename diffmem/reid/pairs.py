"""Patients and verification pairs of a dataset: who has several studies, seeded bounded pair
samples, and which same-patient pairs are pixel near-duplicates.

A *positive* pair is two records of one patient from **different studies**; a *negative* pair
is two records of different patients. Pairs are sampled (seeded), never enumerated: positives
round-robin over the patients (each patient gives one pair per round, so a patient with many
follow-ups does not dominate), negatives uniformly over records of different patients.

A same-patient pair is a **near-duplicate** when the ``pixel`` similarity of
:mod:`diffmem.detect.similarity` (Pearson correlation of 32 px thumbnails) is at least
:data:`NEAR_DUPLICATE_PIXEL`. Those pairs a copy detector would also match; the rest (different
findings, devices, positioning) show whether a re-ID model recognises the *patient*.

Examples
--------
>>> from diffmem.data import CXRDataset, Study
>>> recs = [Study(study_id=s, patient_id=p, image="", report="", prompt="x")
...         for s, p in [("s1", "a"), ("s2", "a"), ("s3", "b"), ("s4", "c")]]
>>> sorted(patients_with_two_studies(CXRDataset(recs, root=".", format="manifest")))
['a']
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from diffmem.data.dataset import CXRDataset
from diffmem.errors import DataError

log = logging.getLogger(__name__)

#: Pixel similarity (``pixel`` backend, 32 px) from which a same-patient pair counts as a
#: near-duplicate. Fixed a priori, not tuned on re-ID scores: 0.95 is above the pixel similarity
#: of almost every pair of different synthetic patients (see README, "Patient
#: re-identification") and below that of a study and its jittered copy.
NEAR_DUPLICATE_PIXEL = 0.95
NEAR_DUPLICATE_SIZE = 32

NO_TWO_STUDIES = "cannot train or evaluate verification: no patient with two studies"


#: The usual fix for a dataset without patient ids (callers with an option add theirs).
ADD_PATIENT_IDS = "add a patient_id column to the manifest"


def patient_records(dataset: CXRDataset, *, fix: str = ADD_PATIENT_IDS) -> dict[str, list[int]]:
    """Map each patient id to the indices of its records.

    Parameters
    ----------
    dataset : CXRDataset
    fix : str, optional
        What the error says to do when there are no patient ids.

    Raises
    ------
    DataError
        When the dataset has no patient ids: every record's ``patient_id`` equals its
        ``study_id``, which is what a manifest without a ``patient_id`` column gives.
    """
    if len(dataset) > 1 and all(s.patient_id == s.study_id for s in dataset):
        raise DataError("the dataset has no patient ids (every record's patient_id equals its "
                        "study_id, as for a manifest without a patient_id column); patient "
                        f"re-identification needs them: {fix}", path=dataset.root)
    out: dict[str, list[int]] = {}
    for i, s in enumerate(dataset):
        out.setdefault(s.patient_id, []).append(i)
    return out


def patients_from_column(dataset: CXRDataset, column: str) -> CXRDataset:
    """The dataset with each record's patient id taken from its ``column`` (a column of the
    manifest or metadata table the loader kept in ``Study.metadata``); the input is not
    modified.

    Raises
    ------
    DataError
        When no record has the column (the error lists the columns there are) or some records
        have it empty.

    Examples
    --------
    >>> from diffmem.data import CXRDataset, Study
    >>> recs = [Study(study_id=s, patient_id=s, image="", report="", prompt="x",
    ...               metadata={"mrn": m}) for s, m in [("s1", "7"), ("s2", "7")]]
    >>> [s.patient_id for s in patients_from_column(CXRDataset(recs, root=".",
    ...                                                         format="manifest"), "mrn")]
    ['7', '7']
    """
    values = [str(s.metadata.get(column, "") or "").strip() for s in dataset]
    if not any(values):
        known = sorted({k for s in dataset for k in s.metadata if k != "manifest_row"})
        raise DataError(f"--patient-from {column!r}: no record has that column; columns there "
                        f"are: {', '.join(known) or '(none)'}", path=dataset.root)
    empty = [s.study_id for s, v in zip(dataset, values) if not v]
    if empty:
        raise DataError(f"--patient-from {column!r}: {len(empty)} record(s) have it empty (e.g. "
                        f"study {empty[0]}); fill it in for every record", path=dataset.root)
    return CXRDataset([replace(s, patient_id=v) for s, v in zip(dataset, values)],
                      root=dataset.root, format=dataset.format, skipped=dataset.skipped,
                      info=dataset.info)


def patients_with_two_studies(dataset: CXRDataset) -> dict[str, list[int]]:
    """The patients with records from at least two different studies, and their records."""
    return {p: idx for p, idx in patient_records(dataset).items()
            if len({dataset[i].study_id for i in idx}) >= 2}


def require_two_studies(dataset: CXRDataset, *, what: str) -> dict[str, list[int]]:
    """:func:`patients_with_two_studies`, or DataError with :data:`NO_TWO_STUDIES`."""
    eligible = patients_with_two_studies(dataset)
    if not eligible:
        raise DataError(f"{NO_TWO_STUDIES} in the {what} ({len(dataset)} records of "
                        f"{len(patient_records(dataset))} patients); verification pairs need "
                        "follow-up studies of one patient", path=dataset.root)
    return eligible


@dataclass
class PairSample:
    """Seeded verification pairs (record indices of one dataset).

    Attributes
    ----------
    pairs : ndarray, shape (P, 2), int
    labels : ndarray, shape (P,), int
        1 = same patient (different studies), 0 = different patients.
    patients : int
        Patients with two studies that gave positive pairs.
    """

    pairs: np.ndarray
    labels: np.ndarray
    patients: int

    @property
    def records(self) -> np.ndarray:
        """The distinct record indices the pairs touch, sorted."""
        return np.unique(self.pairs)


def _cross_study_count(studies: Sequence[str]) -> int:
    n = len(studies)
    _, counts = np.unique(np.asarray(studies), return_counts=True)
    return (n * (n - 1) - int(np.sum(counts * (counts - 1)))) // 2


def sample_pairs(dataset: CXRDataset, *, n_positive: int = 2000, n_negative: int = 4000,
                 seed: int = 0) -> PairSample:
    """Sample same-patient (different study) and different-patient pairs, seeded and bounded.

    Parameters
    ----------
    dataset : CXRDataset
    n_positive : int, optional
        At most this many positive pairs (fewer when the patients have fewer).
    n_negative : int, optional
        Negative pairs (distinct pairs of records of different patients, as many as exist up
        to this number).
    seed : int, optional

    Returns
    -------
    PairSample

    Raises
    ------
    DataError
        Without patient ids, or with no patient that has two studies.
    """
    rng = np.random.default_rng(seed)
    eligible = require_two_studies(dataset, what="dataset")
    studies = {p: [dataset[i].study_id for i in idx] for p, idx in eligible.items()}
    capacity = {p: _cross_study_count(studies[p]) for p in eligible}
    taken: set[tuple[int, int]] = set()
    order = sorted(eligible)
    while len(taken) < n_positive:
        open_ = [p for p in order if capacity[p] > 0]
        if not open_:
            break
        for k in rng.permutation(len(open_)):
            p = open_[k]
            idx = eligible[p]
            while True:  # rejection: a new cross-study pair exists (capacity > 0)
                a, b = rng.choice(len(idx), size=2, replace=False)
                pair = (min(idx[a], idx[b]), max(idx[a], idx[b]))
                if studies[p][a] != studies[p][b] and pair not in taken:
                    break
            taken.add(pair)
            capacity[p] -= 1
            if len(taken) >= n_positive:
                break
    positives = sorted(taken)
    patient_of = np.array([s.patient_id for s in dataset])
    n = len(dataset)
    same = sum(len(v) * (len(v) - 1) // 2 for v in patient_records(dataset).values())
    n_negative = min(int(n_negative), n * (n - 1) // 2 - same)
    negatives: set[tuple[int, int]] = set()
    while len(negatives) < n_negative:
        a, b = rng.integers(0, n, size=2)
        if patient_of[a] != patient_of[b]:
            negatives.add((int(min(a, b)), int(max(a, b))))
    pairs = np.array(positives + sorted(negatives), dtype=np.int64).reshape(-1, 2)
    labels = np.r_[np.ones(len(positives), np.int64), np.zeros(len(negatives), np.int64)]
    return PairSample(pairs=pairs, labels=labels,
                      patients=len({patient_of[i] for i, _ in positives}))


def pair_similarity(features: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair ``(i, j)`` of L2-normalized feature rows.

    Examples
    --------
    >>> f = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> pair_similarity(f, np.array([[0, 1], [0, 2]])).tolist()
    [0.0, 1.0]
    """
    f = np.asarray(features, dtype=np.float64)
    p = np.asarray(pairs, dtype=np.int64)
    return np.clip(np.einsum("ij,ij->i", f[p[:, 0]], f[p[:, 1]]), -1.0, 1.0)

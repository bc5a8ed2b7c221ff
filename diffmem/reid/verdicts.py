"""Re-ID verdicts for generated images: which training patient a generation looks like most, how
much (the re-ID score), and whether that is a match at a threshold calibrated on held-out
patients (patient verification after Packhäuser et al., Sci. Rep. 2022, used on generations as
Dutt et al. do beside copy detection).

* The **re-ID score** of a generation against a training patient is the largest cosine
  similarity between the generation's embedding and the embeddings of that patient's studies;
  the **most similar training patient** is the one with the largest score (so the score is the
  largest similarity to any training record, and the patient owns that record).
* The **threshold** is calibrated like the copy threshold
  (:func:`diffmem.detect.verdicts.calibrate_threshold`): real images of held-out patients are
  not any training patient, so their re-ID scores against the training patients are the null
  distribution, and the threshold flags at most a fraction ``fpr`` of them.
* A generation **re-identifies** a training patient when its score is strictly above the
  threshold.
* The **own-patient score** of a generation of a training prompt is its re-ID score against the
  patient(s) whose training study has that prompt (max over their studies; over the patients
  when several share the report text), judged against the same threshold: the patient analogue
  of an "own-image" copy, where the re-ID score above is the "any-image" one. It is at most the
  re-ID score (the same similarities, maxed over fewer records).

Nothing here holds all pairs: the reference embeddings are searched in blocks.

Examples
--------
>>> import numpy as np
>>> index = PatientIndex(embeddings=np.eye(3, dtype=np.float32), patient_ids=["a", "a", "b"],
...                      study_ids=["s1", "s2", "s3"], records=[0, 1, 2])
>>> score, row = most_similar_patient(np.array([[0.0, 0.6, 0.8]]), index)
>>> float(score[0]), index.patient_ids[int(row[0])]
(0.8, 'b')
>>> _, _, own = search_patients(np.array([[0.0, 0.6, 0.8]]), index, own=[{"a"}])
>>> float(own[0])  # patient a's best study (s2), though b is the most similar patient
0.6
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from diffmem.data import CXRDataset
from diffmem.detect.verdicts import (Threshold, calibrate_threshold, copy_verdicts,
                                     fixed_threshold, is_copy)
from diffmem.errors import DataError
from diffmem.reid.network import PatientVerifier, load_reid_model
from diffmem.reid.pairs import ADD_PATIENT_IDS, patient_records
from diffmem.utils import progress

log = logging.getLogger(__name__)

__all__ = ["PatientIndex", "ReIDSetup", "ReIDVerdicts", "calibrate_reid_threshold",
           "heldout_reid_scores", "index_patients", "most_similar_patient", "prepare_reid",
           "reid_verdicts", "search_patients"]

_BLOCK = 4096  # reference rows per similarity block


@dataclass
class PatientIndex:
    """Re-ID embeddings of reference (training) records, with their patients and studies.

    Attributes
    ----------
    embeddings : ndarray, shape (N, D), float32
        L2-normalized rows.
    patient_ids, study_ids : list of str
        Of each row.
    records : list of int
        Each row's index in the dataset it was built from.
    model_fingerprint, data_fingerprint : str
        What the embeddings depend on (empty when built by hand).
    """

    embeddings: np.ndarray
    patient_ids: list[str]
    study_ids: list[str]
    records: list[int]
    model_fingerprint: str = ""
    data_fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.patient_ids)

    @cached_property
    def _patient_codes(self) -> tuple[dict[str, int], np.ndarray]:
        """Each patient's integer code and each row's (computed once; the index is not edited
        after it is built)."""
        codes: dict[str, int] = {}
        rows = np.array([codes.setdefault(p, len(codes)) for p in self.patient_ids],
                        dtype=np.int64)
        return codes, rows

    @cached_property
    def _study_patients(self) -> dict[str, set[str]]:
        by_study: dict[str, set[str]] = {}
        for study, patient in zip(self.study_ids, self.patient_ids):
            by_study.setdefault(study, set()).add(patient)
        return by_study

    def patients_of(self, study_ids: Iterable[str]) -> set[str]:
        """The indexed patients who own any of ``study_ids`` (studies not indexed add none).

        Examples
        --------
        >>> index = PatientIndex(embeddings=np.eye(3, dtype=np.float32),
        ...                      patient_ids=["a", "a", "b"], study_ids=["s1", "s2", "s3"],
        ...                      records=[0, 1, 2])
        >>> sorted(index.patients_of(["s2", "s3", "s9"]))
        ['a', 'b']
        """
        found: set[str] = set()
        for study in study_ids:
            found |= self._study_patients.get(study, set())
        return found


@dataclass
class ReIDVerdicts:
    """Re-ID verdicts of a batch of generations (see :func:`reid_verdicts`).

    Attributes
    ----------
    score : ndarray, shape (G,)
        Re-ID score against the most similar training patient (higher = more alike).
    patient_id, study_id : list of str
        The most similar training patient, and that patient's study that matched best.
    record : ndarray of int
        That study's record index in the reference dataset.
    match : ndarray of bool
        ``score`` strictly above ``threshold.value``: the generation re-identifies the patient.
    threshold : Threshold
    """

    score: np.ndarray
    patient_id: list[str]
    study_id: list[str]
    record: np.ndarray
    match: np.ndarray
    threshold: Threshold = field(repr=False)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per generation: ``reid_score``, ``reid_patient_id``, ``reid_study_id``,
        ``reid_record``, ``reid_match`` (the columns a detector's ``scores.csv`` would gain)."""
        return [{"reid_score": float(s), "reid_patient_id": p, "reid_study_id": st,
                 "reid_record": int(r), "reid_match": bool(m)}
                for s, p, st, r, m in zip(self.score, self.patient_id, self.study_id,
                                          self.record, self.match)]


def _model(model: PatientVerifier | str | os.PathLike | None) -> PatientVerifier:
    return model if isinstance(model, PatientVerifier) else load_reid_model(model)


def _embed_dataset(model: PatientVerifier, dataset: CXRDataset, batch_size: int) -> np.ndarray:
    out = np.zeros((len(dataset), model.dim), dtype=np.float32)
    chunks = dataset.iter_images(size=model.image_size, batch_size=batch_size)
    for idx, imgs in progress(chunks, desc="re-ID embeddings", unit="batch",
                              total=math.ceil(len(dataset) / batch_size)):
        out[idx[0]:idx[-1] + 1] = model.embed_images(imgs.astype(np.float32),
                                                     batch_size=batch_size)
    return out


def index_patients(model: PatientVerifier | str | os.PathLike | None,
                   data: CXRDataset | str | os.PathLike, *, split: str | None = "train",
                   batch_size: int = 128) -> PatientIndex:
    """Embed the reference records (default: the training split) for re-ID search.

    Parameters
    ----------
    model : PatientVerifier, path or None
        ``None``: the embedded default re-ID model.
    data : CXRDataset or path
    split : str or None, optional
        Records to index; ``None`` for all.
    batch_size : int, optional

    Returns
    -------
    PatientIndex

    Raises
    ------
    DataError
        When the split is empty or the dataset has no patient ids.
    """
    from diffmem.data import load

    model = _model(model)
    dataset = data if isinstance(data, CXRDataset) else load(data)
    positions = [i for i, s in enumerate(dataset) if split is None or s.split == split]
    reference = dataset.subset(indices=positions)
    if len(reference) == 0:
        raise DataError(f"no {split!r} records to re-identify against (splits present: "
                        f"{dict(dataset.split_counts())})", path=dataset.root)
    patient_records(reference)  # raises without patient ids
    return PatientIndex(embeddings=_embed_dataset(model, reference, batch_size),
                        patient_ids=[s.patient_id for s in reference],
                        study_ids=[s.study_id for s in reference], records=positions,
                        model_fingerprint=model.fingerprint(),
                        data_fingerprint=reference.fingerprint())


def most_similar_patient(embeddings: np.ndarray, index: PatientIndex, *,
                         block: int = _BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """For each query embedding, the largest cosine similarity to any indexed record and that
    record's row (whose patient is the most similar patient), searched in blocks
    (:func:`search_patients` without own patients).

    Returns
    -------
    (scores, rows) : ndarray (G,) float64, ndarray (G,) int
    """
    scores, rows, _ = search_patients(embeddings, index, block=block)
    return scores, rows


def search_patients(embeddings: np.ndarray, index: PatientIndex, *,
                    own: Sequence[Collection[str] | None] | None = None,
                    block: int = _BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-ID search of query embeddings: the most similar training patient's score and record
    row, and the score against each query's own patient(s) (Packhäuser et al., Sci. Rep.
    2022: a patient's score is the max over that patient's studies).

    Parameters
    ----------
    embeddings : ndarray, shape (G, D)
        L2-normalized queries, from the model that built ``index``.
    index : PatientIndex
    own : sequence of collections of str, optional
        One entry per query: the patient id(s) it should be compared with (for a generation,
        the patient(s) whose training study has its prompt). With several patients (a report
        text several patients share) the own-patient score is the max over all of them. None,
        an empty entry, or patients absent from the index give NaN.
    block : int, optional
        Reference rows per similarity block.

    Returns
    -------
    (scores, rows, own_scores) : ndarray (G,) float64, ndarray (G,) int, ndarray (G,) float64
        ``own_scores`` is all NaN without ``own``. It is computed from the same similarity
        blocks as ``scores``, maxed over a subset of their columns, so it never exceeds
        ``scores``.

    Raises
    ------
    DataError
        When the queries do not fit the index, or ``own`` has another length.
    """
    q = np.asarray(embeddings, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != index.embeddings.shape[1]:
        raise DataError(f"query embeddings have shape {q.shape}; expected (G, "
                        f"{index.embeddings.shape[1]}) from the model that built the index")
    member = None  # (G, patients): which patients are each query's own
    if own is not None:
        if len(own) != len(q):
            raise DataError(f"own patients given for {len(own)} queries, but there are "
                            f"{len(q)}; pass one entry (possibly empty) per query")
        codes, row_codes = index._patient_codes
        member = np.zeros((len(q), len(codes)), dtype=bool)
        for i, patients in enumerate(own):
            member[i, [codes[p] for p in (patients or ()) if p in codes]] = True
    best = np.full(len(q), -np.inf)
    own_best = np.full(len(q), -np.inf)
    rows = np.zeros(len(q), dtype=np.int64)
    for start in range(0, len(index), block):
        sims = q @ index.embeddings[start:start + block].astype(np.float64).T
        arg = sims.argmax(axis=1)
        val = sims[np.arange(len(q)), arg]
        better = val > best
        best[better], rows[better] = val[better], arg[better] + start
        if member is not None:
            mine = member[:, row_codes[start:start + block]]
            np.maximum(own_best, np.where(mine, sims, -np.inf).max(axis=1), out=own_best)
    own_scores = np.where(np.isfinite(own_best), np.clip(own_best, -1.0, 1.0), np.nan)
    return np.clip(best, -1.0, 1.0), rows, own_scores


def heldout_reid_scores(model: PatientVerifier | str | os.PathLike | None, index: PatientIndex,
                        heldout: CXRDataset, *, batch_size: int = 128) -> np.ndarray:
    """Re-ID scores of real images of held-out patients against the indexed (training)
    patients: the null distribution of the re-ID score (their patient is none of those).

    Raises
    ------
    DataError
        When ``heldout`` is empty or shares patients with the index (they would not be held
        out).
    """
    model = _model(model)
    if len(heldout) == 0:
        raise DataError("no held-out images to calibrate the re-ID threshold on: pass records "
                        "of patients outside the training set (the validate/test split)")
    shared = sorted({s.patient_id for s in heldout} & set(index.patient_ids))
    if shared:
        raise DataError(f"{len(shared)} held-out patient(s) also have indexed training records "
                        f"(e.g. {shared[:3]}); calibrate on patients outside the training set",
                        path=heldout.root)
    scores, _ = most_similar_patient(_embed_dataset(model, heldout, batch_size), index)
    return scores


def calibrate_reid_threshold(model: PatientVerifier | str | os.PathLike | None,
                             index: PatientIndex, heldout: CXRDataset, *,
                             fpr: float = 0.01, batch_size: int = 128) -> Threshold:
    """The re-ID threshold whose false-positive rate on held-out patients is at most ``fpr``.

    Each held-out image's re-ID score against the indexed (training) patients is a null value
    (:func:`heldout_reid_scores`). The threshold is
    :func:`~diffmem.detect.verdicts.calibrate_threshold` of those scores.

    Raises
    ------
    DataError
        When ``heldout`` is empty or shares patients with the index (they would not be held
        out).
    """
    return calibrate_threshold(heldout_reid_scores(model, index, heldout,
                                                   batch_size=batch_size), fpr=fpr)


@dataclass(frozen=True)
class ReIDSetup:
    """What re-ID verdicts on generations need, prepared once per run (:func:`prepare_reid`):
    the model, the training patients' index and the calibrated threshold.

    Attributes
    ----------
    model : PatientVerifier
    index : PatientIndex
        Embeddings of the training records.
    threshold : Threshold
    null_scores : ndarray or None
        Held-out patients' re-ID scores the threshold was calibrated on (None when fixed).
    source : str
        The model folder.
    """

    model: PatientVerifier
    index: PatientIndex
    threshold: Threshold
    null_scores: np.ndarray | None = None
    source: str = ""

    def search(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each image's re-ID score and the index row of its best-matching training record
        (:func:`most_similar_patient`)."""
        return most_similar_patient(self.model.embed_images(images), self.index)

    def search_own(self, images: np.ndarray, own: Sequence[Collection[str] | None],
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search` plus each image's own-patient score: against the patient(s) in
        ``own`` (one entry per image; NaN where empty), from the same embeddings and
        similarities (:func:`search_patients`)."""
        return search_patients(self.model.embed_images(images), self.index, own=own)

    def judge(self, scores: Any) -> Any:
        """Re-ID verdicts of scores: the one threshold rule of
        :func:`diffmem.detect.verdicts.is_copy` (strictly above), on the re-ID scale."""
        return is_copy(scores, self.threshold)

    def params(self) -> dict[str, str]:
        """What stored re-ID scores depend on: the model and the indexed records."""
        return {"model": self.index.model_fingerprint,
                "reference": self.index.data_fingerprint}


def prepare_reid(model: PatientVerifier | str | os.PathLike | None, train_set: CXRDataset, *,
                 heldout: CXRDataset | None = None, threshold: Threshold | float | None = None,
                 fpr: float = 0.01, batch_size: int = 128,
                 fix: str = ADD_PATIENT_IDS) -> ReIDSetup:
    """Model, training-patient index and threshold for re-ID verdicts, as ``diffmem detect``
    uses them (the re-ID counterpart of :func:`diffmem.detect.verdicts.prepare_verdicts`).

    Parameters
    ----------
    model : PatientVerifier, path or None
        ``None``: the embedded default re-ID model.
    train_set : CXRDataset
        The training data; its ``train`` records are indexed.
    heldout : CXRDataset, optional
        Real records outside the training set (validate/test). Records of patients who also
        have training records are left out of the calibration (they are not held-out
        *patients*; logged); needed unless ``threshold`` is given.
    threshold : Threshold or float, optional
        A fixed re-ID threshold (cosine scale) instead of calibrating one.
    fpr : float, optional
        False-positive rate of the calibrated threshold: the fraction of held-out patients'
        images re-identified as a training patient (default 0.01).
    batch_size : int, optional
    fix : str, optional
        What an error about missing patient ids tells the user to do.

    Raises
    ------
    DataError
        No patient ids, no training records, or no held-out patients without a ``threshold``.
    """
    source = "" if isinstance(model, PatientVerifier) else str(model or "")
    model = _model(model)
    patient_records(train_set.subset(split="train"), fix=fix)
    index = index_patients(model, train_set, split="train", batch_size=batch_size)
    if threshold is not None:
        given = threshold if isinstance(threshold, Threshold) else fixed_threshold(threshold)
        return ReIDSetup(model, index, given, None, source)
    if heldout is None or len(heldout) == 0:
        raise DataError("no held-out patients to calibrate the re-ID threshold on: give data "
                        "with validate/test splits (patients outside the training set) or a "
                        "fixed --reid-threshold")
    patient_records(heldout, fix=fix)
    trained = set(index.patient_ids)
    keep = [i for i, s in enumerate(heldout) if s.patient_id not in trained]
    if len(keep) < len(heldout):
        log.info("re-ID calibration: %d held-out record(s) belong to training patients and are "
                 "left out (they are not held-out patients)", len(heldout) - len(keep))
    if not keep:
        raise DataError("every held-out record belongs to a training patient: the re-ID "
                        "threshold needs images of patients outside the training set; pass "
                        "such data or a fixed --reid-threshold", path=heldout.root)
    null = heldout_reid_scores(model, index, heldout.subset(indices=keep),
                               batch_size=batch_size)
    calibrated = calibrate_threshold(null, fpr=fpr)
    log.info("re-ID threshold %.4f calibrated on %d image(s) of %d held-out patient(s) at FPR "
             "%g", calibrated.value, calibrated.n,
             len({heldout[i].patient_id for i in keep}), fpr)
    return ReIDSetup(model, index, calibrated, null, source)


def reid_verdicts(model: PatientVerifier | str | os.PathLike | None, images: np.ndarray,
                  index: PatientIndex, threshold: Threshold | float) -> ReIDVerdicts:
    """Re-ID verdicts of generated images: most similar training patient, score, match.

    Parameters
    ----------
    model : PatientVerifier, path or None
        The model that built ``index``.
    images : ndarray, shape (G, H, W)
        Generations, float in [0, 1]; another side than the model's is converted (logged).
    index : PatientIndex
        From :func:`index_patients` on the training data.
    threshold : Threshold or float
        From :func:`calibrate_reid_threshold`, or a fixed value.

    Returns
    -------
    ReIDVerdicts
    """
    model = _model(model)
    if index.model_fingerprint and index.model_fingerprint != model.fingerprint():
        raise DataError(f"the patient index was built with another re-ID model (fingerprint "
                        f"{index.model_fingerprint}, this one {model.fingerprint()}); rebuild it "
                        "with index_patients(model, data)")
    scores, rows = most_similar_patient(model.embed_images(images), index)
    if not isinstance(threshold, Threshold):
        threshold = fixed_threshold(threshold)
    match = copy_verdicts(scores, threshold)
    return ReIDVerdicts(score=scores, patient_id=[index.patient_ids[r] for r in rows],
                        study_id=[index.study_ids[r] for r in rows],
                        record=np.asarray([index.records[r] for r in rows], dtype=np.int64),
                        match=match, threshold=threshold)

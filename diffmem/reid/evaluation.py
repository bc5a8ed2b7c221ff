"""How well a re-ID model verifies patients on a dataset: ROC AUC and TPR at 1 % FPR over
seeded same-patient / different-patient pairs (Packhäuser et al., Sci. Rep. 2022 report AUC
0.994 on ChestX-ray14), beside a pixel-similarity baseline measured on the same pairs.

The AUC on all pairs mixes two things: recognising a *patient* and recognising an *image*. Many
same-patient pairs (an ICU series, a re-filed duplicate) are pixel near-duplicates that any copy
detector would match. So the same numbers are also reported on the same-patient pairs that are
**not** near-duplicates (``pixel`` similarity below
:data:`~diffmem.reid.pairs.NEAR_DUPLICATE_PIXEL` on 32 px thumbnails) against all
different-patient pairs: a model that is only a copy detector scores near chance there, and the
pixel baseline shows how hard that subset is for pixels.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.data import CXRDataset
from diffmem.detect.evaluate import Evaluation, evaluate
from diffmem.errors import ConfigError, DataError
from diffmem.reid.network import PatientVerifier, load_reid_model
from diffmem.reid.pairs import (NEAR_DUPLICATE_PIXEL, NEAR_DUPLICATE_SIZE, pair_similarity,
                                sample_pairs)
from diffmem.utils import prepare_out_dir, progress, write_json

log = logging.getLogger(__name__)

EVAL_JSON = "reid_eval.json"
ROC_PNG = "reid_roc.png"
#: ``split`` values: a split name, ``"heldout"`` (validate + test) or ``"all"``.
SPLIT_CHOICES = ("heldout", "all", "train", "validate", "test")


@dataclass
class ReIDEvaluation:
    """Verification metrics of a re-ID model on one dataset (see :func:`evaluate_reid`).

    Attributes
    ----------
    auc, tpr_at_1pct_fpr : float
        Over all sampled pairs.
    pairs, positive_pairs, negative_pairs : int
    patients : int
        Patients with two studies that gave positive pairs.
    records : int
        Records the pairs touch (each embedded once).
    split : str
    seed : int
    near_duplicate : dict
        ``threshold``, ``size``, ``positive_pairs`` (how many same-patient pairs are
        near-duplicates), ``negative_pairs`` (different-patient pairs that are), and the re-ID
        ``auc_not_near_duplicate`` / ``tpr_at_1pct_fpr_not_near_duplicate`` on the others
        (``None`` when every positive pair is a near-duplicate).
    baseline_pixel : dict
        ``auc``, ``tpr_at_1pct_fpr`` and the ``..._not_near_duplicate`` values of the pixel
        similarity itself on the same pairs.
    model : dict
        The model's path, fingerprint, image size and training-data fingerprint.
    data : dict
        The dataset's root and fingerprint (of the evaluated records), and whether they are the
        records the model was trained on.
    notes : list of str
    evaluations : dict of Evaluation
        The ROC curves, for :func:`diffmem.detect.plots.plot_roc` (not in :meth:`to_dict`).
    """

    auc: float
    tpr_at_1pct_fpr: float
    pairs: int
    positive_pairs: int
    negative_pairs: int
    patients: int
    records: int
    split: str
    seed: int
    near_duplicate: dict[str, Any]
    baseline_pixel: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    evaluations: dict[str, Evaluation] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (ROC points under ``roc``, per curve)."""
        out = {k: getattr(self, k) for k in ("auc", "tpr_at_1pct_fpr", "pairs", "positive_pairs",
                                             "negative_pairs", "patients", "records", "split",
                                             "seed", "near_duplicate", "baseline_pixel", "model",
                                             "data", "notes")}
        out["roc"] = {name: ev.to_dict()["roc"] for name, ev in self.evaluations.items()}
        return out


def select_split(dataset: CXRDataset, split: str) -> CXRDataset:
    """The records of ``split``: a split name, ``"heldout"`` (validate + test) or ``"all"``."""
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"split={split!r}; use one of {', '.join(SPLIT_CHOICES)}")
    if split == "all":
        return dataset
    return dataset.subset(split=("validate", "test") if split == "heldout" else split)


def _features(model: PatientVerifier, dataset: CXRDataset, records: np.ndarray,
              batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(re-ID embeddings, pixel-backend features) of ``records``, rows in their order."""
    from diffmem.detect.similarity import PixelBackend

    pixel = PixelBackend(size=NEAR_DUPLICATE_SIZE)
    emb = np.zeros((len(records), model.dim), dtype=np.float32)
    pix = np.zeros((len(records), NEAR_DUPLICATE_SIZE ** 2), dtype=np.float32)
    native = dataset.load_image(int(records[0])).shape
    if native != (model.image_size, model.image_size):
        log.info("the dataset's images are %d x %d px; the re-ID model takes %d px: they are "
                 "centre-cropped and resized to %d px", native[0], native[1], model.image_size,
                 model.image_size)
    chunks = dataset.iter_images(size=model.image_size, batch_size=batch_size,
                                 indices=records.tolist())
    row = 0
    for idx, imgs in progress(chunks, desc="embedding images", unit="batch",
                              total=math.ceil(len(records) / batch_size)):
        imgs = imgs.astype(np.float32)
        emb[row:row + len(idx)] = model.embed_images(imgs, batch_size=batch_size)
        pix[row:row + len(idx)] = pixel.features(imgs)
        row += len(idx)
    return emb, pix


def _subset_eval(scores: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> Evaluation | None:
    y = labels[keep]
    if y.min() == y.max():
        return None
    return evaluate(scores[keep], y)


def evaluate_reid(model: PatientVerifier | str | os.PathLike | None,
                  data: CXRDataset | str | os.PathLike, *, split: str = "heldout",
                  n_positive: int = 2000, n_negative: int = 4000, seed: int = 0,
                  batch_size: int = 128) -> ReIDEvaluation:
    """Verification AUC and TPR at 1 % FPR of a re-ID model on seeded pairs of a dataset
    (Packhäuser et al., Sci. Rep. 2022), with a pixel baseline and the non-near-duplicate
    subset.

    Parameters
    ----------
    model : PatientVerifier, path or None
        A model, its folder, or ``None`` for the embedded default.
    data : CXRDataset or path
    split : str, optional
        ``"heldout"`` (validate + test, default: patients a model trained on the ``train`` split
        never saw), ``"all"``, or one split name.
    n_positive, n_negative : int, optional
        At most this many same-patient and different-patient pairs (seeded samples; never all
        pairs).
    seed : int, optional
    batch_size : int, optional

    Returns
    -------
    ReIDEvaluation

    Raises
    ------
    DataError
        Without patient ids, with no patient with two studies, or with only one patient (no
        negatives).
    """
    from diffmem.data import load

    # 1. inputs
    if not isinstance(model, PatientVerifier):
        model = load_reid_model(model)
    dataset = data if isinstance(data, CXRDataset) else load(data)
    records = select_split(dataset, split)
    if len(records) == 0:
        raise DataError(f"no records in split {split!r} (splits present: "
                        f"{dict(dataset.split_counts())}); pass --split all", path=dataset.root)
    # 2. pairs, features, similarities
    sample = sample_pairs(records, n_positive=n_positive, n_negative=n_negative, seed=seed)
    if not (sample.labels == 0).any():
        raise DataError(f"split {split!r} has a single patient: no different-patient pairs to "
                        "evaluate against; use a dataset with more patients", path=dataset.root)
    used = sample.records
    emb, pix = _features(model, records, used, batch_size)
    local = np.searchsorted(used, sample.pairs)
    scores = pair_similarity(emb, local)
    pixel_scores = pair_similarity(pix, local)
    labels = sample.labels
    # 3. metrics: all pairs, and same-patient pairs that are not near-duplicates
    near = pixel_scores >= NEAR_DUPLICATE_PIXEL
    keep = (labels == 0) | ~near
    ev_all, ev_pix = evaluate(scores, labels), evaluate(pixel_scores, labels)
    ev_far, ev_pix_far = _subset_eval(scores, labels, keep), _subset_eval(pixel_scores, labels,
                                                                         keep)
    notes = list(ev_all.notes)
    if ev_far is None:
        notes.append("every same-patient pair is a pixel near-duplicate: no AUC on the others")
    evaluations = {"re-ID, all pairs": ev_all, "pixel baseline, all pairs": ev_pix}
    if ev_far is not None:
        evaluations["re-ID, not near-duplicate"] = ev_far
        evaluations["pixel baseline, not near-duplicate"] = ev_pix_far
    trained_fp = model.config.get("data", {}).get("fingerprint")
    overlap = split in ("all", "train") and trained_fp is not None and \
        dataset.subset(split="train").fingerprint() == trained_fp
    if overlap:
        notes.append("these records include the patients the model was trained on: the AUC is "
                     "a training-set number (use --split heldout)")
        log.warning(notes[-1])

    def _far(ev):
        return None if ev is None else ev.auc

    def _far_tpr(ev):
        return None if ev is None else ev.tpr_at_1pct_fpr

    return ReIDEvaluation(
        auc=ev_all.auc, tpr_at_1pct_fpr=ev_all.tpr_at_1pct_fpr, pairs=len(labels),
        positive_pairs=int(labels.sum()), negative_pairs=int((labels == 0).sum()),
        patients=sample.patients, records=len(used), split=split, seed=int(seed),
        near_duplicate={"definition": f"pixel similarity (Pearson correlation of "
                                      f"{NEAR_DUPLICATE_SIZE} px thumbnails) >= "
                                      f"{NEAR_DUPLICATE_PIXEL}",
                        "threshold": NEAR_DUPLICATE_PIXEL, "size": NEAR_DUPLICATE_SIZE,
                        "positive_pairs": int((near & (labels == 1)).sum()),
                        "negative_pairs": int((near & (labels == 0)).sum()),
                        "positive_pairs_not_near_duplicate": int((~near & (labels == 1)).sum()),
                        "auc_not_near_duplicate": _far(ev_far),
                        "tpr_at_1pct_fpr_not_near_duplicate": _far_tpr(ev_far)},
        baseline_pixel={"auc": ev_pix.auc, "tpr_at_1pct_fpr": ev_pix.tpr_at_1pct_fpr,
                        "auc_not_near_duplicate": _far(ev_pix_far),
                        "tpr_at_1pct_fpr_not_near_duplicate": _far_tpr(ev_pix_far)},
        model={"path": model.path, "fingerprint": model.fingerprint(),
               "image_size": model.image_size, "trained_on": trained_fp},
        data={"root": str(dataset.root), "fingerprint": records.fingerprint(),
              "records_in_split": len(records), "includes_training_patients": overlap},
        notes=notes, evaluations=evaluations)


def write_reid_eval(result: ReIDEvaluation, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``reid_eval.json`` and the ROC plot ``reid_roc.png`` into ``out``."""
    from diffmem.detect.plots import plot_roc

    out = prepare_out_dir(out)
    write_json(out / EVAL_JSON, result.to_dict())
    return {"json": out / EVAL_JSON, "roc": plot_roc(result.evaluations, out / ROC_PNG)}


def run_reid_eval(model: PatientVerifier | str | os.PathLike | None,
                  data: CXRDataset | str | os.PathLike, out: str | os.PathLike,
                  **options: Any) -> ReIDEvaluation:
    """:func:`evaluate_reid` then :func:`write_reid_eval` (what ``diffmem reid eval`` runs).

    ``out`` must not lie inside the dataset; ``options`` go to :func:`evaluate_reid`.
    """
    from diffmem.data import load

    dataset = data if isinstance(data, CXRDataset) else load(data)
    prepare_out_dir(out, inputs=[dataset.root])
    result = evaluate_reid(model, dataset, **options)
    write_reid_eval(result, out)
    return result

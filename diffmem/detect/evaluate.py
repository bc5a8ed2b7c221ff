"""How well a memorization score separates memorized from non-memorized prompts: ROC AUC and
true-positive rate at low false-positive rates (Carlini et al.'s "TPR at low FPR" view).

Scores are "higher = more memorized"; labels are 1 (memorized, e.g. a planted duplicate) or 0.

Examples
--------
>>> ev = evaluate([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
>>> ev.auc, ev.n_pos, ev.n_neg
(0.75, 2, 2)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffmem.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["Evaluation", "evaluate", "tpr_at_fpr"]


@dataclass
class Evaluation:
    """ROC summary of one score.

    Attributes
    ----------
    auc : float
        Area under the ROC curve (scikit-learn's ``roc_auc_score``; ties count one half).
    tpr_at_1pct_fpr, tpr_at_0_1pct_fpr : float
        Largest TPR among ROC points with FPR <= 1 % and <= 0.1 % (:func:`tpr_at_fpr`).
    n_pos, n_neg : int
        Positives (memorized) and negatives.
    fpr, tpr, thresholds : numpy.ndarray
        The ROC curve (scikit-learn's ``roc_curve`` with collinear points dropped).
    notes : list of str
        Caveats, e.g. too few negatives for an FPR of 0.1 % to mean anything.
    """

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    n_pos: int
    n_neg: int
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    thresholds: np.ndarray = field(repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """``(fpr, tpr)`` arrays of the ROC curve."""
        return self.fpr, self.tpr

    def to_dict(self, *, curve: bool = True) -> dict[str, Any]:
        """JSON-ready values; ``curve=False`` leaves the ROC points out."""
        out: dict[str, Any] = {"auc": self.auc, "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
                               "tpr_at_0_1pct_fpr": self.tpr_at_0_1pct_fpr,
                               "n_pos": self.n_pos, "n_neg": self.n_neg,
                               "notes": list(self.notes)}
        if curve:
            thr = [None if not math.isfinite(t) else float(t) for t in self.thresholds]
            out["roc"] = {"fpr": self.fpr.tolist(), "tpr": self.tpr.tolist(), "thresholds": thr}
        return out


def _check(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise DataError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if len(s) != len(y):
        raise DataError(f"scores has {len(s)} values but labels has {len(y)}; pass one label "
                        "per score")
    if not np.all(np.isfinite(s)):
        raise DataError(f"scores contains {int(np.sum(~np.isfinite(s)))} NaN or infinite "
                        "value(s); drop or recompute them before evaluating")
    if y.dtype == bool:
        y = y.astype(np.int64)
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise DataError(f"labels must be 0/1 or bool (1 = memorized), got values "
                        f"{sorted(values, key=str)[:5]}")
    if len(values) < 2:
        only = "positives (memorized)" if values == {1} else "negatives"
        raise DataError(f"labels hold only {only} ({len(y)} of them); AUC and TPR at FPR need "
                        "both memorized and non-memorized examples")
    return s, y.astype(np.int64)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, at: float) -> float:
    """Largest TPR among ROC points whose FPR is at most ``at``.

    This is the TPR of the best threshold that keeps the false-positive rate within ``at``
    (no interpolation between ROC points). The ROC always contains (0, 0), so the result is
    defined; with fewer than ``1 / at`` negatives it is the TPR at FPR = 0.

    Examples
    --------
    >>> tpr_at_fpr(np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.5, 1.0, 1.0]), 0.1)
    0.5
    """
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    ok = fpr <= at + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def evaluate(scores: Any, labels: Any) -> Evaluation:
    """ROC AUC and TPR at 1 % and 0.1 % FPR of a score against binary labels.

    Parameters
    ----------
    scores : array-like
        ``(N,)`` scores, higher = more memorized.
    labels : array-like
        ``(N,)`` 1/True = memorized, 0/False = not.

    Returns
    -------
    Evaluation

    Raises
    ------
    DataError
        For a length mismatch, NaN scores, labels other than 0/1, or a single class.

    Notes
    -----
    TPR at FPR ``x`` is the largest TPR among ROC points with FPR <= ``x``. With ``n_neg``
    negatives the smallest non-zero FPR is ``1 / n_neg``: when that exceeds ``x`` the value is
    the TPR at zero false positives, and :attr:`Evaluation.notes` says so.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    s, y = _check(scores, labels)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    full_fpr, full_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=True)
    notes = []
    for at, label in ((0.01, "1%"), (0.001, "0.1%")):
        if n_neg * at < 1:
            notes.append(f"only {n_neg} negatives: an FPR of {label} cannot be resolved (the "
                         f"smallest non-zero FPR is {1 / n_neg:.3g}); TPR at {label} FPR is the "
                         f"TPR at zero false positives (need >= {math.ceil(round(1 / at, 9))} "
                         "negatives)")
    for note in notes:
        log.info(note)
    return Evaluation(auc=float(roc_auc_score(y, s)),
                      tpr_at_1pct_fpr=tpr_at_fpr(full_fpr, full_tpr, 0.01),
                      tpr_at_0_1pct_fpr=tpr_at_fpr(full_fpr, full_tpr, 0.001),
                      n_pos=n_pos, n_neg=n_neg, fpr=fpr, tpr=tpr, thresholds=thresholds,
                      notes=notes)

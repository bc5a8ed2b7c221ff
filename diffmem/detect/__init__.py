"""Memorization detection: similarity backends, nearest training images, calibrated copy
verdicts and evaluation (AUC, TPR at low FPR).

Scores are functions ("higher = more memorized"); verdicts (thresholds calibrated on held-out
real images) and evaluation live apart from them, and results go to :mod:`diffmem.store`.
"""

from diffmem.detect.calibrate import (
    Threshold,
    calibrate_on_heldout,
    calibrate_threshold,
    copy_verdicts,
    fixed_threshold,
    ratio_criterion,
)
from diffmem.detect.evaluate import Evaluation, evaluate, tpr_at_fpr
from diffmem.detect.neighbors import NeighborResult, ReferenceFeatures, nearest_neighbors
from diffmem.detect.similarity import (
    SimilarityBackend,
    get_backend,
    list_backends,
    register_backend,
)

__all__ = [
    "Evaluation",
    "NeighborResult",
    "ReferenceFeatures",
    "SimilarityBackend",
    "Threshold",
    "calibrate_on_heldout",
    "calibrate_threshold",
    "copy_verdicts",
    "evaluate",
    "fixed_threshold",
    "get_backend",
    "list_backends",
    "nearest_neighbors",
    "ratio_criterion",
    "register_backend",
    "tpr_at_fpr",
]

"""Memorization detection: model-based scores, similarity backends, nearest training images,
calibrated copy verdicts, evaluation (AUC, TPR at low FPR), the end-to-end scan (its run, result
dataclasses and file writers) and its benchmark.

Scores are functions ("higher = more memorized"); verdicts (thresholds calibrated on held-out
real images) and evaluation live apart from them, and results go to :mod:`diffmem.store`.
"""

from diffmem._lazy import lazy_getattr
from diffmem.detect.evaluate import Evaluation, evaluate, tpr_at_fpr
from diffmem.detect.neighbors import (
    NeighborResult,
    ReferenceFeatures,
    nearest_neighbors,
)
from diffmem.detect.similarity import (
    SimilarityBackend,
    get_backend,
    list_backends,
    register_backend,
)
from diffmem.detect.verdicts import (
    CopyVerdicts,
    Threshold,
    calibrate_on_heldout,
    calibrate_threshold,
    copy_verdicts,
    fixed_threshold,
    is_copy,
    prepare_verdicts,
    ratio_criterion,
)

# Model-based scores and the end-to-end run import torch: loaded on first use, so that the
# numpy-only parts above stay cheap to import.
_LAZY = {
    "attention_entropy": "diffmem.detect.scores",
    "default_guidance": "diffmem.detect.scores",
    "noise_magnitude": "diffmem.detect.scores",
    "noise_magnitude_from_embeddings": "diffmem.detect.scores",
    "noise_magnitude_per_step": "diffmem.detect.scores",
    "DetectionConfig": "diffmem.detect.detector",
    "DetectionResult": "diffmem.detect.results",
    "GenerationMatch": "diffmem.detect.results",
    "PromptResult": "diffmem.detect.results",
    "detect": "diffmem.detect.detector",
    "read_prompts": "diffmem.data.prompts",
    "bench_detect": "diffmem.detect.bench",
    "list_scenarios": "diffmem.detect.bench",
    "load_scenario": "diffmem.detect.bench",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "CopyVerdicts",
    "DetectionConfig",
    "DetectionResult",
    "Evaluation",
    "GenerationMatch",
    "NeighborResult",
    "PromptResult",
    "ReferenceFeatures",
    "SimilarityBackend",
    "Threshold",
    "attention_entropy",
    "bench_detect",
    "calibrate_on_heldout",
    "calibrate_threshold",
    "copy_verdicts",
    "default_guidance",
    "detect",
    "evaluate",
    "fixed_threshold",
    "get_backend",
    "is_copy",
    "list_backends",
    "list_scenarios",
    "load_scenario",
    "nearest_neighbors",
    "noise_magnitude",
    "noise_magnitude_from_embeddings",
    "noise_magnitude_per_step",
    "prepare_verdicts",
    "ratio_criterion",
    "read_prompts",
    "register_backend",
    "tpr_at_fpr",
]

"""What :func:`~diffmem.detect.detect` returns: one :class:`GenerationMatch` per generation, one
:class:`PromptResult` per scanned prompt, and the :class:`DetectionResult` of the run (like
diffusers' ``pipeline_output.py``: dataclasses with ``to_dict``, JSON out, no computation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from diffmem.detect.detector import DetectionConfig

__all__ = ["KINDS", "OWN_PATIENT_KINDS", "SCORE_COLUMNS", "DetectionResult", "GenerationMatch", "PromptResult"]

#: What a scanned prompt is: a training prompt of the dataset, a prompt from ``--prompts``, a
#: held-out prompt the model was not trained on, or the empty prompt.
KINDS = ("train", "prompt", "unrelated", "unconditional")
#: The kinds whose prompts have an own patient for re-ID (the patients of the training studies
#: they are the prompt of); unrelated and empty prompts have none.
OWN_PATIENT_KINDS = ("train", "prompt")
#: Columns of ``scores.csv`` (one row a prompt, :meth:`PromptResult.to_row`).
SCORE_COLUMNS = ("kind", "study_id", "n_studies", "prompt", "label", "noise_magnitude",
                 "attention_entropy", "nn_similarity", "nn_study_id", "nn_generation",
                 "nn_d1_d2", "nn_copies", "nn_ratio_copies", "memorized", "copy_image",
                 "screen", "reid_score", "reid_patient_id", "reid_match", "reid_own_score",
                 "reid_own_match")


@dataclass
class GenerationMatch:
    """One generated image and its two nearest training images.

    Attributes
    ----------
    index : int
        Which generation of its prompt (0 ...).
    seed : int
        Seed of its initial noise (:func:`~diffmem.models.generation_seed`).
    similarity, similarity2 : float
        Similarity to the nearest and second-nearest training images.
    study_id, study_id2 : str
        Their study ids.
    d1_d2 : float
        Distance ratio ``d1 / d2`` (Gu et al.); ``nan`` when both distances are 0.
    copy : bool
        ``similarity`` is above the calibrated threshold.
    ratio_copy : bool
        ``d1 / d2`` is below the ratio threshold.
    image : str or None
        PNG of the generation, saved for copies.
    reid_score : float or None
        Re-ID score against the most similar training patient (``--methods ...,reid``;
        :mod:`diffmem.reid.verdicts`), None without re-ID.
    reid_patient_id, reid_study_id : str or None
        That patient, and the patient's study that matched best.
    reid_match : bool or None
        ``reid_score`` is above the calibrated re-ID threshold: the generation re-identifies
        ``reid_patient_id``.
    reid_image : str or None
        PNG of the generation, saved for re-identifications.
    reid_own_score : float or None
        Re-ID score against the generation's own patient: the patient(s) whose training
        studies have its prompt (max over their studies, and over the patients when several
        share the prompt; :func:`diffmem.reid.verdicts.search_patients`). At most
        ``reid_score``; None without re-ID, for unrelated and empty prompts, and for prompts
        of no indexed patient.
    reid_own_match : bool or None
        ``reid_own_score`` is above the re-ID threshold: the generation re-identifies its own
        patient. None when ``reid_own_score`` is.
    reid_own_patient : bool or None
        ``reid_patient_id`` (the most similar training patient) is one of the generation's
        own patients. None when ``reid_own_score`` is.
    """

    index: int
    seed: int
    similarity: float
    study_id: str
    similarity2: float
    study_id2: str
    d1_d2: float
    copy: bool = False
    ratio_copy: bool = False
    image: str | None = None
    reid_score: float | None = None
    reid_patient_id: str | None = None
    reid_study_id: str | None = None
    reid_match: bool | None = None
    reid_image: str | None = None
    reid_own_score: float | None = None
    reid_own_match: bool | None = None
    reid_own_patient: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["d1_d2"] = None if not math.isfinite(self.d1_d2) else self.d1_d2
        return d


@dataclass
class PromptResult:
    """Everything the scan found about one prompt.

    Attributes
    ----------
    prompt : str
    kind : str
        One of :data:`KINDS`.
    study_ids : list of str
        Training studies whose prompt this is (empty for other kinds).
    label : int or None
        1 when the prompt belongs to a planted duplicate (``ground_truth.csv``), 0 when not,
        None without ground truth.
    noise_magnitude, attention_entropy : float or None
        The scores (higher = more memorized), None when not computed.
    generations : list of GenerationMatch
        Nearest-neighbour matches of its generations (empty without ``nn``, and for prompts a
        two-stage run did not confirm).
    screen : str
        Two-stage runs: ``flagged`` (by the noise screen), ``audit`` (in the random audit),
        ``widened`` (confirmed after the audit found a copy) or ``screened`` (not confirmed:
        ``memorized`` is then unknown); empty otherwise.
    """

    prompt: str
    kind: str
    study_ids: list[str] = field(default_factory=list)
    label: int | None = None
    noise_magnitude: float | None = None
    attention_entropy: float | None = None
    generations: list[GenerationMatch] = field(default_factory=list)
    screen: str = ""

    @property
    def best(self) -> GenerationMatch | None:
        """The generation most similar to a training image."""
        if not self.generations:
            return None
        return max(self.generations, key=lambda g: (g.similarity, -g.index))

    @property
    def memorized(self) -> bool | None:
        """True when any generation is a copy; None without nearest-neighbour results."""
        return any(g.copy for g in self.generations) if self.generations else None

    @property
    def nn_similarity(self) -> float | None:
        best = self.best
        return None if best is None else best.similarity

    @property
    def reid_best(self) -> GenerationMatch | None:
        """The generation most similar to a training patient (None without re-ID)."""
        judged = [g for g in self.generations if g.reid_score is not None]
        return max(judged, key=lambda g: (g.reid_score, -g.index)) if judged else None

    @property
    def reid_score(self) -> float | None:
        best = self.reid_best
        return None if best is None else best.reid_score

    @property
    def reid_own_score(self) -> float | None:
        """The largest own-patient re-ID score of its generations (None when none has one)."""
        scores = [g.reid_own_score for g in self.generations if g.reid_own_score is not None]
        return max(scores) if scores else None

    @property
    def reid_own_match(self) -> bool | None:
        """True when a generation re-identifies the prompt's own patient; None when no
        generation has an own-patient score."""
        judged = [g for g in self.generations if g.reid_own_match is not None]
        return any(g.reid_own_match for g in judged) if judged else None

    @property
    def patient_leaking(self) -> bool | None:
        """True when any generation re-identifies a training patient; None without re-ID."""
        judged = [g for g in self.generations if g.reid_match is not None]
        return any(g.reid_match for g in judged) if judged else None

    def to_row(self) -> dict[str, Any]:
        """The prompt's row of ``scores.csv``."""
        best = self.best
        copies = [g for g in self.generations if g.copy]
        image = next((g.image for g in sorted(copies, key=lambda g: -g.similarity) if g.image),
                     None)
        return {
            "kind": self.kind,
            "study_id": self.study_ids[0] if self.study_ids else "",
            "n_studies": len(self.study_ids),
            "prompt": self.prompt,
            "label": "" if self.label is None else int(self.label),
            "noise_magnitude": _fmt(self.noise_magnitude),
            "attention_entropy": _fmt(self.attention_entropy),
            "nn_similarity": _fmt(None if best is None else best.similarity),
            "nn_study_id": "" if best is None else best.study_id,
            "nn_generation": "" if best is None else best.index,
            "nn_d1_d2": _fmt(None if best is None or not math.isfinite(best.d1_d2)
                             else best.d1_d2),
            "nn_copies": "" if best is None else len(copies),
            "nn_ratio_copies": "" if best is None else sum(g.ratio_copy
                                                           for g in self.generations),
            "memorized": "" if self.memorized is None else int(self.memorized),
            "copy_image": image or "",
            "screen": self.screen,
            "reid_score": _fmt(self.reid_score),
            "reid_patient_id": "" if self.reid_best is None else self.reid_best.reid_patient_id,
            "reid_match": "" if self.patient_leaking is None else int(self.patient_leaking),
            "reid_own_score": _fmt(self.reid_own_score),
            "reid_own_match": "" if self.reid_own_match is None else int(self.reid_own_match),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "kind": self.kind, "study_ids": list(self.study_ids),
                "label": self.label, "noise_magnitude": self.noise_magnitude,
                "attention_entropy": self.attention_entropy, "memorized": self.memorized,
                "patient_leaking": self.patient_leaking, "screen": self.screen,
                "generations": [g.to_dict() for g in self.generations]}


def _fmt(x: float | None) -> str | float:
    return "" if x is None else float(f"{x:.6g}")


@dataclass
class DetectionResult:
    """The outcome of :func:`detect`.

    Attributes
    ----------
    prompts : list of PromptResult
        Every scanned prompt, training/file prompts first, then unrelated, then unconditional.
    config : DetectionConfig
    threshold : Threshold or None
        The copy threshold (None without ``nn``).
    null_similarities : numpy.ndarray or None
        Held-out images' nearest-training similarities the threshold was calibrated on.
    evaluations : dict of str to Evaluation
        Per score (``noise_magnitude``, ``attention_entropy``, ``nn_similarity``), against the
        planted labels, when the data has ground truth.
    rates : dict
        Nearest-neighbour verdict rates: memorized fraction among labelled planted and
        non-planted prompts, and copies among unconditional and unrelated generations.
    timings : dict
        Per method: seconds spent, prompts computed by this run, prompts/second.
    model_fingerprint, data_fingerprint : str
    out : pathlib.Path
    files : dict of str to str
        What was written.
    warnings : list of str
        Model/data mismatch and similar caveats.
    world_size : int
        Processes that shared the scan.
    screen : ScreenPlan or None
        The confirmation policy of the ``nn`` verdicts (two-stage: flagged, audit, bound,
        widening; or ``all``); None without ``nn``.
    skew : dict or None
        How concentrated the copies are among the training/file prompts whose generations were
        judged (:func:`diffmem.detect.skew.copy_concentration`: top 1%/10% shares, Gini,
        Lorenz curve); None without ``nn``.
    labels : dict or None
        Where the labels of ``evaluations`` came from (``file``, ``key``, ``column``,
        ``rows``); None without labels.
    reid : dict or None
        Re-ID settings of the run (``model``, ``model_fingerprint``, ``threshold``: a
        Threshold, ``validation``: the model's own validation numbers); None without re-ID.
    """

    prompts: list[PromptResult]
    config: DetectionConfig
    threshold: Any = None
    null_similarities: np.ndarray | None = None
    evaluations: dict[str, Any] = field(default_factory=dict)
    rates: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    model_fingerprint: str = ""
    data_fingerprint: str = ""
    out: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    world_size: int = 1
    screen: Any = None
    skew: dict[str, Any] | None = None
    labels: dict[str, Any] | None = None
    reid: dict[str, Any] | None = None

    def of_kind(self, *kinds: str) -> list[PromptResult]:
        return [p for p in self.prompts if p.kind in kinds]

    @property
    def memorized(self) -> list[PromptResult]:
        """Prompts with at least one copy generation (any kind)."""
        return [p for p in self.prompts if p.memorized]

    def reid_counts(self) -> dict[str, Any] | None:
        """Re-ID verdicts counted: judged generations, pixel copies among them, leaks
        (generations that re-identify a training patient), leaks that are not pixel copies,
        the patients re-identified, and patient-leaking prompts per kind (with those that
        have no copy generation); own-patient verdicts (``own_patient_leaks``: generations
        that re-identify their prompt's own patient; per kind, ``own_patient_prompts``: the
        prompts with such a generation, of ``own_patient_judged``: the prompts with an own
        patient). None without re-ID.
        """
        if self.reid is None:
            return None
        gens = [g for p in self.prompts for g in p.generations if g.reid_match is not None]
        leaks = [g for g in gens if g.reid_match]
        kinds = [kind for kind in KINDS if self.of_kind(kind)]
        return {
            "generations": len(gens),
            "copies": sum(g.copy for g in gens),
            "leaks": len(leaks),
            "leaks_not_copies": sum(not g.copy for g in leaks),
            "patients": sorted({str(g.reid_patient_id) for g in leaks}),
            "leaking_prompts": {k: sum(bool(p.patient_leaking) for p in self.of_kind(k))
                                for k in kinds},
            "leaking_prompts_not_memorized": {
                k: sum(bool(p.patient_leaking) and not p.memorized for p in self.of_kind(k))
                for k in kinds},
            "own_patient_leaks": sum(bool(g.reid_own_match) for g in gens),
            "own_patient_prompts": {k: sum(bool(p.reid_own_match) for p in self.of_kind(k))
                                    for k in kinds},
            "own_patient_judged": {k: sum(p.reid_own_match is not None
                                          for p in self.of_kind(k)) for k in kinds},
        }

    def to_dict(self, *, prompts: bool = False) -> dict[str, Any]:
        """JSON-ready summary; ``prompts=True`` adds every prompt's result."""
        counts = {kind: len(self.of_kind(kind)) for kind in KINDS if self.of_kind(kind)}
        out: dict[str, Any] = {
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "config": self.config.to_dict(),
            "counts": counts,
            "memorized": {kind: sum(bool(p.memorized) for p in self.of_kind(kind))
                          for kind in counts},
            "threshold": None if self.threshold is None else self.threshold.to_dict(),
            "labels": None if self.labels is None else dict(self.labels),
            "evaluations": {k: v.to_dict(curve=False) for k, v in self.evaluations.items()},
            "rates": dict(self.rates),
            "timings": dict(self.timings),
            "world_size": self.world_size,
            "screen": None if self.screen is None else self.screen.to_dict(),
            "skew": self.skew,
            "warnings": list(self.warnings),
            "files": dict(self.files),
            "reid": None if self.reid is None else {
                **{k: v for k, v in self.reid.items() if k != "threshold"},
                "threshold": self.reid["threshold"].to_dict(), "counts": self.reid_counts()},
            "copies_without_prompt": [
                {"kind": p.kind, "prompt": p.prompt,
                 "generations": [g.to_dict() for g in p.generations if g.copy]}
                for p in self.of_kind("unconditional", "unrelated") if p.memorized],
        }
        if prompts:
            out["prompts"] = [p.to_dict() for p in self.prompts]
        return out


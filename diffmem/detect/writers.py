"""The files of a detection run: ``scores.csv``, ``copies.csv``, ``reidentified.csv`` (with
re-ID), ``results.json``, ``summary.json``, the figures, and the PNGs of generations judged
copies or re-identifications.

The run (:mod:`diffmem.detect.detector`) computes; the functions here only write what it
computed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from diffmem.detect import plots
from diffmem.detect.results import SCORE_COLUMNS, DetectionResult
from diffmem.errors import OutputError
from diffmem.store import ResultsStore, prompt_hash
from diffmem.utils import write_csv, write_json

__all__ = ["COPIES_CSV", "COPIES_DIR", "COPY_COLUMNS", "REID_COLUMNS", "REID_CSV", "REID_DIR",
           "RESULTS_JSON", "SCORES_CSV", "STORE_FILE", "SUMMARY_JSON", "copy_image_path",
           "reid_image_path", "save_copy_images", "save_png", "write_outputs"]

SCORES_CSV = "scores.csv"
COPIES_CSV = "copies.csv"
SUMMARY_JSON = "summary.json"
RESULTS_JSON = "results.json"
STORE_FILE = "results.sqlite"
COPIES_DIR = "copies"
REID_CSV = "reidentified.csv"
REID_DIR = "reidentified"
#: Columns of ``copies.csv`` (one row a generation judged a copy).
COPY_COLUMNS = ("kind", "prompt", "prompt_study_id", "label", "index", "seed", "similarity",
                "study_id", "similarity2", "study_id2", "d1_d2", "ratio_copy", "image")
#: Columns of ``reidentified.csv`` (one row a generation that re-identifies a training
#: patient; ``reid_own_patient`` says whether that patient is the prompt's own (1/0, empty for
#: prompts without an own patient), ``copy`` whether it is also a pixel copy, ``image`` is its
#: PNG).
REID_COLUMNS = ("kind", "prompt", "prompt_study_id", "label", "index", "seed", "reid_score",
                "reid_patient_id", "reid_study_id", "reid_own_patient", "copy", "similarity",
                "study_id", "image")


def copy_image_path(out: Path, kind: str, prompt: str, generation: int) -> Path:
    """Where the PNG of generation ``generation`` of ``prompt`` goes when it is a copy.

    Examples
    --------
    >>> copy_image_path(Path("out"), "train", "No change.", 0).parent.as_posix()
    'out/copies'
    """
    return out / COPIES_DIR / f"{kind}-{prompt_hash(prompt)[:12]}-g{generation}.png"


def reid_image_path(out: Path, kind: str, prompt: str, generation: int) -> Path:
    """Where the PNG of generation ``generation`` of ``prompt`` goes when it re-identifies a
    training patient (the name of :func:`copy_image_path`, in ``reidentified/``).

    Examples
    --------
    >>> reid_image_path(Path("out"), "train", "No change.", 0).parent.as_posix()
    'out/reidentified'
    """
    return out / REID_DIR / copy_image_path(out, kind, prompt, generation).name


def save_copy_images(copies: Iterable[tuple[Path, np.ndarray]]) -> None:
    """Save each ``(path, image)`` pair as a PNG."""
    for path, image in copies:
        save_png(image, path)


def save_png(image: np.ndarray, path: Path) -> None:
    """Save a float image in [0, 1] as an 8-bit PNG (atomically: a temporary file, then a
    rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(tmp,
                                                                                 format="PNG")
    os.replace(tmp, path)


def write_outputs(result: DetectionResult, out: Path) -> None:
    """Write the run's files into ``out`` and record them in ``result.files``.

    ``scores.csv`` (one row a prompt), ``copies.csv`` (one row a copy generation),
    ``results.json`` (the store's export), the figures and ``summary.json`` (last).

    Raises
    ------
    OutputError
        When a file cannot be written.
    """
    files = {}
    rows = [p.to_row() for p in result.prompts]
    files["scores"] = str(write_csv(out / SCORES_CSV, SCORE_COLUMNS, rows))
    copy_rows = [{"kind": p.kind, "prompt": p.prompt,
                  "prompt_study_id": p.study_ids[0] if p.study_ids else "",
                  "label": "" if p.label is None else p.label, **{
                      k: v for k, v in g.to_dict().items() if k != "copy"}}
                 for p in result.prompts for g in p.generations if g.copy]
    files["copies"] = str(write_csv(out / COPIES_CSV, COPY_COLUMNS, copy_rows))
    if result.reid is not None:
        reid_rows = [{"kind": p.kind, "prompt": p.prompt,
                      "prompt_study_id": p.study_ids[0] if p.study_ids else "",
                      "label": "" if p.label is None else p.label, "index": g.index,
                      "seed": g.seed, "reid_score": g.reid_score,
                      "reid_patient_id": g.reid_patient_id, "reid_study_id": g.reid_study_id,
                      "reid_own_patient": "" if g.reid_own_patient is None
                      else int(g.reid_own_patient),
                      "copy": int(g.copy), "similarity": g.similarity, "study_id": g.study_id,
                      "image": g.reid_image or ""}
                     for p in result.prompts for g in p.generations if g.reid_match]
        files["reidentified"] = str(write_csv(out / REID_CSV, REID_COLUMNS, reid_rows))
    with ResultsStore(out / STORE_FILE) as store:
        files["results_json"] = str(store.export_json(out / RESULTS_JSON,
                                                      model_fingerprint=result.model_fingerprint))
    files["store"] = str(out / STORE_FILE)

    # figures
    main = [p for p in result.prompts if p.kind in ("train", "prompt")]
    labels = None
    if main and all(p.label is not None for p in main):
        labels = np.array([p.label for p in main])
    scores = {}
    for name in ("noise_magnitude", "attention_entropy", "nn_similarity"):
        values = [getattr(p, name) for p in main]
        if values and all(v is not None for v in values):
            scores[name] = np.array(values, dtype=np.float64)
    thresholds = {"nn_similarity": result.threshold.value} if result.threshold else None
    if scores:
        files["histograms"] = str(plots.plot_score_histograms(
            scores, out / "scores_hist.png", labels=labels, thresholds=thresholds))
    if result.evaluations:
        files["roc"] = str(plots.plot_roc(result.evaluations, out / "roc.png"))
    if "nn_similarity" in scores and result.threshold is not None:
        files["nn_similarity"] = str(plots.plot_nn_similarity(
            scores["nn_similarity"], out / "nn_similarity.png", labels=labels,
            null=result.null_similarities, threshold=result.threshold.value))
    if result.skew and result.skew["copies"]:
        files["lorenz"] = str(plots.plot_lorenz({"scanned prompts": result.skew},
                                                out / "lorenz.png"))
    result.files = files
    files["summary"] = str(out / SUMMARY_JSON)
    try:
        write_json(out / SUMMARY_JSON, result.to_dict())
    except OSError as e:
        raise OutputError(f"cannot write {out / SUMMARY_JSON}: {e.strerror}") from None

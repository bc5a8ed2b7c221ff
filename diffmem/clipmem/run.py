"""CLIPMem end to end (Wang et al., ICLR 2025, arXiv 2502.07830): split a dataset, train f on
S_S + S_C and g on S_S + S_I with the in-domain open_clip recipe
(:func:`diffmem.embed.train_encoder`), score every candidate pair, and write the result.

Run folder layout (resumable: a finished encoder folder of the same data and settings is
loaded, not trained again; a run's ``alignments.csv`` is reused)::

    OUT/clipmem.csv            one row per scored pair, averaged over seeds
    OUT/summary.json           settings, sizes, timing, AUC and mean by planted kind
    OUT/clipmem.png            CLIPMem by planted kind, and alignment under g vs f
    OUT/clipmem_towers.csv     CLIPMem with one tower of f swapped into g (which tower
                               memorizes; :mod:`diffmem.clipmem.towers`), also in summary.json
    OUT/runs/seed-K/split.json       the S_S / S_C / S_I / S_E indices of seed K
    OUT/runs/seed-K/f/ , g/          encoder folders (diffmem.embed.load_encoder)
    OUT/runs/seed-K/alignments.csv   per-pair alignments of seed K
    OUT/runs/seed-K/towers.csv       per-pair tower-swap alignments of seed K

Both S_C and S_I pairs are scored: an S_I pair is a candidate with the roles of the two models
swapped (g trained on it, f did not), so every run scores about half the training pairs.
``alignment_f`` is always the alignment under the model that trained on the pair.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import as_dataset, check_int
from diffmem.clipmem.alignment import (clipmem_score, dataset_alignment, default_augment,
                                       models_embeddings, views_alignment)
from diffmem.clipmem.openclip import as_pair_encoder
from diffmem.clipmem.splits import ClipMemSplit, split_pairs
from diffmem.data import CXRDataset
from diffmem.embed import load_encoder, load_preset
from diffmem.errors import TrainingError
from diffmem.study.results import machine_info
from diffmem.utils import prepare_out_dir, write_csv, write_json

log = logging.getLogger(__name__)

__all__ = ["ClipMemResult", "run_clipmem", "score_pairs", "summarize", "train_pair"]

CSV_NAME = "clipmem.csv"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "clipmem.png"
COLUMNS = ("study_id", "image_id", "prompt", "clipmem", "alignment_f", "alignment_g",
           "plant_kind", "cluster_id", "runs")
RUN_COLUMNS = ("row", "study_id", "image_id", "part", "alignment_f", "alignment_g", "clipmem")
TOWERS_NAME = "clipmem_towers.csv"
TOWER_RUN_COLUMNS = ("row", "part", "variant", "space_map", "alignment_f", "alignment_g",
                     "clipmem")
TOWER_COLUMNS = ("variant", "space_map", "pairs", "positives", "clipmem_mean_positive",
                 "clipmem_mean_rest", "clipmem_mean_all", "auc")
#: Bump when the tower scoring changes, so that cached run folders are scored again.
TOWERS_VERSION = 1


@dataclass
class ClipMemResult:
    """What :func:`run_clipmem` or :func:`score_pairs` measured.

    Attributes
    ----------
    rows : list of dict
        One per scored pair (keys: :data:`COLUMNS`), highest CLIPMem first.
    summary : dict
        Settings, sizes, wall time and, with ground truth, the AUC of CLIPMem for the planted
        mis-captioned pairs against the rest and the mean CLIPMem by planted kind.
    out : str or None
        The folder written.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "summary": self.summary, "out": self.out, "files": self.files}


# -------------------------------------------------------------------------------- training
def _finished_encoder(folder: Path, fingerprint: str, want: dict[str, Any]):
    """The encoder in ``folder`` when it finished with ``want`` settings on this data; None when
    there is none; TrainingError when it was trained otherwise."""
    cfg_path = folder / "encoder_config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    training = cfg.get("training", {})
    have = {"fingerprint": cfg.get("data", {}).get("fingerprint"),
            "preset": cfg.get("preset", {}).get("name"),
            "seed": training.get("seed"), "steps": training.get("steps"),
            "caption_augment": training.get("caption_augment"),
            "text_noise": training.get("text_noise", 0.0)}
    want = {"fingerprint": fingerprint, **want}
    diffs = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if diffs:
        detail = ", ".join(f"{k}: folder {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        raise TrainingError(f"{folder} holds an encoder trained otherwise ({detail}); use "
                            "another --out for these settings")
    return load_encoder(folder)


def train_or_load(dataset: CXRDataset, indices: Sequence[int], folder: str | Path, *,
                  preset: str = "demo", seed: int = 0, steps: int | None = None,
                  device: str = "cpu", caption_augment: Any = None,
                  text_noise: float = 0.0) -> tuple[Any, str]:
    """Train an encoder on the records ``indices`` into ``folder`` with the in-domain recipe
    (:func:`diffmem.embed.train_encoder`, its text-side mitigation hooks included), or load it
    when it finished there earlier with the same data and settings.

    Returns
    -------
    encoder : InDomainEncoder
    status : str
        ``"trained"`` or ``"loaded"``.

    Raises
    ------
    TrainingError
        When ``folder`` holds an encoder trained with other data or settings.
    """
    from diffmem.embed import train_encoder

    folder = Path(folder)
    p = load_preset(preset)
    want = {"preset": p.name, "seed": seed,
            "steps": int(p.training["steps"]) if steps is None else steps,
            "caption_augment": None if caption_augment is None else caption_augment.to_dict(),
            "text_noise": float(text_noise)}
    subset = dataset.subset(indices=list(indices))
    enc = _finished_encoder(folder, subset.fingerprint(), want)
    if enc is not None:
        return enc, "loaded"
    split_names = sorted({s.split for s in subset})
    enc = train_encoder(subset, folder, preset=preset, steps=steps, seed=seed,
                        split=split_names[0], device=device, caption_augment=caption_augment,
                        text_noise=text_noise).encoder
    return enc, "trained"


def train_pair(dataset: CXRDataset, split: ClipMemSplit, out: str | Path, *,
               preset: str = "demo", seed: int = 0, steps: int | None = None,
               device: str = "cpu") -> tuple[Any, Any, dict[str, str]]:
    """Train (or load, when finished earlier) f on S_S + S_C and g on S_S + S_I.

    Both use the same preset and weight-initialization seed, so they differ only by their
    data; each lives in its own encoder folder ``out/f`` and ``out/g``.

    Returns
    -------
    f, g : InDomainEncoder
    status : dict
        ``{"f": "trained" | "loaded", "g": ...}``.
    """
    out = Path(out)
    encoders, status = {}, {}
    for model, indices in (("f", split.f_train), ("g", split.g_train)):
        encoders[model], status[model] = train_or_load(dataset, indices, out / model,
                                                       preset=preset, seed=seed, steps=steps,
                                                       device=device)
    return encoders["f"], encoders["g"], status


# -------------------------------------------------------------------------------- scoring
def _score_run(f, g, dataset: CXRDataset, split: ClipMemSplit, *, views: int,
               seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Per-pair rows of one run: S_C scored as (f, g), S_I as (g, f); the tower-swap rows of
    :mod:`diffmem.clipmem.towers` from the same embeddings; and the space check on S_S."""
    from diffmem.clipmem.towers import fit_space_map, space_check, tower_alignments

    aug = default_augment(f)
    # each image is read, and its views drawn, once for both models
    shared_f, shared_g = models_embeddings((f, g), dataset, split.shared, views=0)
    rotation = fit_space_map(shared_f, shared_g)          # f's space -> g's
    rows, tower_rows = [], []
    for part, indices, swap, rot in (("candidate", split.candidate, False, rotation),
                                     ("independent", split.independent, True, rotation.T)):
        emb_in, emb_out = models_embeddings((f, g), dataset, indices, views=views, augment=aug,
                                            seed=seed)
        if swap:                                # S_I: g trained on the pair, f did not
            emb_in, emb_out = emb_out, emb_in
        a_in, a_out = views_alignment(*emb_in), views_alignment(*emb_out)
        for i, ai, ao, c in zip(indices, a_in, a_out, clipmem_score(a_in, a_out)):
            s = dataset[i]
            rows.append({"row": i, "study_id": s.study_id, "image_id": s.image_id, "part": part,
                         "alignment_f": float(ai), "alignment_g": float(ao), "clipmem": float(c)})
        for (variant, space), (a_h, a_o, c) in tower_alignments(emb_in, emb_out, rot).items():
            tower_rows += [{"row": i, "part": part, "variant": variant, "space_map": space,
                            "alignment_f": float(x), "alignment_g": float(y),
                            "clipmem": float(z)} for i, x, y, z in zip(indices, a_h, a_o, c)]
    return rows, tower_rows, space_check(shared_f, shared_g, rotation)


def _read_run_rows(path: Path) -> list[dict[str, Any]]:
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["row"] = int(r["row"])
        for k in ("alignment_f", "alignment_g", "clipmem"):
            r[k] = float(r[k])
    return rows


def _ground_truth(dataset: CXRDataset) -> dict[str, dict[str, Any]]:
    """The synthetic ground truth by image id, or {} for data without one."""
    from diffmem.data.synth import read_ground_truth
    from diffmem.errors import DataError

    if not (dataset.root / "ground_truth.csv").is_file():
        return {}
    try:
        return read_ground_truth(dataset.root)
    except DataError as e:
        log.warning("ignoring the ground truth: %s", e)
        return {}


def _aggregate(dataset: CXRDataset, run_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over runs per dataset record, highest CLIPMem first, with the planted kind."""
    truth = _ground_truth(dataset)
    by_row: dict[int, list[dict[str, Any]]] = {}
    for r in run_rows:
        by_row.setdefault(int(r["row"]), []).append(r)
    rows = []
    for i, rs in by_row.items():
        s = dataset[i]
        t = truth.get(s.image_id or "", {})
        rows.append({"study_id": s.study_id, "image_id": s.image_id, "prompt": s.prompt,
                     **{k: float(np.mean([r[k] for r in rs]))
                        for k in ("clipmem", "alignment_f", "alignment_g")},
                     "plant_kind": t.get("plant_kind", ""), "cluster_id": t.get("cluster_id", ""),
                     "runs": len(rs)})
    rows.sort(key=lambda r: -r["clipmem"])
    return rows


def summarize(rows: Sequence[dict[str, Any]], *, positive: str = "miscaptioned") -> dict[str, Any]:
    """Mean CLIPMem by planted kind and the AUC of CLIPMem for the ``positive`` kind against
    every other scored pair (scikit-learn's ROC AUC via :func:`diffmem.detect.evaluate`), with
    two baselines from the same numbers: ``-alignment_g`` (the reference finds the pair
    mismatched, no memorization involved) and ``alignment_f`` alone.

    Examples
    --------
    >>> rows = [{"clipmem": c, "plant_kind": k, "alignment_f": 0.0, "alignment_g": 0.0}
    ...         for c, k in ((0.9, "miscaptioned"), (0.1, ""), (0.3, "exact"))]
    >>> s = summarize(rows)
    >>> s["auc"], s["by_kind"]["miscaptioned"]["mean_clipmem"]
    (1.0, 0.9)
    """
    from diffmem.detect.evaluate import evaluate

    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({r["plant_kind"] or "none" for r in rows}):
        sel = [r for r in rows if (r["plant_kind"] or "none") == kind]
        by_kind[kind] = {"pairs": len(sel),
                         "mean_clipmem": round(float(np.mean([r["clipmem"] for r in sel])), 6),
                         "mean_alignment_f": round(float(np.mean([r["alignment_f"]
                                                                  for r in sel])), 6),
                         "mean_alignment_g": round(float(np.mean([r["alignment_g"]
                                                                  for r in sel])), 6)}
    labels = np.array([r["plant_kind"] == positive for r in rows])
    auc, baselines = None, {}
    if 0 < labels.sum() < len(labels):
        def auc_of(values):
            return round(evaluate(np.array(values), labels).auc, 6)

        auc = auc_of([r["clipmem"] for r in rows])
        # baselines from the same run: the reference's mismatch alone, the target's alignment
        baselines = {"minus_alignment_g": auc_of([-r["alignment_g"] for r in rows]),
                     "alignment_f": auc_of([r["alignment_f"] for r in rows])}
    return {"positive_kind": positive, "auc": auc, "baseline_auc": baselines,
            "positives": int(labels.sum()), "negatives": int(len(labels) - labels.sum()),
            "by_kind": by_kind}


# ---------------------------------------------------------------------------- entry points
@dataclass(frozen=True)
class RunSettings:
    """The settings every seed of :func:`run_clipmem` shares (see its parameters)."""

    preset: str = "demo"
    steps: int | None = None
    views: int = 8
    candidates: float = 0.25
    independent: float = 0.25
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_run(dataset: CXRDataset, folder: Path, *, seed: int, settings: RunSettings):
    """The split and the trained (or loaded) f and g of seed ``seed`` in ``folder``.

    Returns
    -------
    split : ClipMemSplit
    f, g : InDomainEncoder
    status : dict
        ``{"f": "trained" | "loaded", "g": ...}``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    split = split_pairs(dataset, seed=seed, candidates=settings.candidates,
                        independent=settings.independent)
    write_json(folder / "split.json", split.to_dict())
    f, g, status = train_pair(dataset, split, folder, preset=settings.preset, seed=seed,
                              steps=settings.steps, device=settings.device)
    return split, f, g, status


def _one_run(dataset: CXRDataset, folder: Path, *, seed: int,
             settings: RunSettings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Split, train and score seed ``seed`` into ``folder`` (reusing what a run left there)."""
    t0 = time.time()
    split, f, g, status = load_run(dataset, folder, seed=seed, settings=settings)
    train_s = time.time() - t0
    views = settings.views
    paths = {k: folder / name for k, name in (("rows", "alignments.csv"),
                                               ("towers", "towers.csv"),
                                               ("meta", "alignments.json"))}
    meta = {"views": views, "f": f.fingerprint(), "g": g.fingerprint(),
            "towers": TOWERS_VERSION}
    have = json.loads(paths["meta"].read_text(encoding="utf-8")) \
        if paths["meta"].is_file() else {}
    if all(p.is_file() for p in paths.values()) and \
            {k: have.get(k) for k in meta} == meta:
        rows, tower_rows = _read_run_rows(paths["rows"]), _read_run_rows(paths["towers"])
        space = have.get("space_check", {})
    else:
        rows, tower_rows, space = _score_run(f, g, dataset, split, views=views, seed=seed)
        write_csv(paths["rows"], RUN_COLUMNS, rows)
        write_csv(paths["towers"], TOWER_RUN_COLUMNS, tower_rows)
        write_json(paths["meta"], {**meta, "space_check": space})
    info = {"seed": seed, "status": status, "train_seconds": round(train_s, 1),
            "score_seconds": round(time.time() - t0 - train_s, 1),
            "sizes": split.to_dict()["sizes"], "space_check": space}
    return rows, tower_rows, info


def run_clipmem(data: CXRDataset | str | Path, out: str | Path, *, preset: str = "demo",
                seeds: int = 1, steps: int | None = None, views: int = 8,
                candidates: float = 0.25, independent: float = 0.25,
                device: str = "cpu") -> ClipMemResult:
    """CLIPMem of a dataset's training pairs (Wang et al., ICLR 2025): for each seed, split,
    train f and g, score S_C and S_I; write ``clipmem.csv``, ``summary.json`` and a plot.

    Parameters
    ----------
    data : CXRDataset or path
        f and g train on its ``train`` split; the other splits are S_E.
    out : path
        The run folder (outside the data). Rerunning with the same settings resumes: finished
        encoders and alignments are reused.
    preset : str, optional
        Encoder preset (``"demo"``, ``"tiny"`` or a JSON path).
    seeds : int, optional
        Independent repetitions (split, initialization, batch order and views); a pair's
        numbers are averaged over the runs that scored it (``runs`` column).
    steps : int, optional
        Override the preset's training steps.
    views : int, optional
        Augmented image views per pair (0: the plain pair).
    candidates, independent : float, optional
        Fractions of the training pairs in S_C and S_I (see :func:`split_pairs`).
    device : str, optional

    Returns
    -------
    ClipMemResult
    """
    t0 = time.time()
    dataset = as_dataset(data)
    seeds = check_int("seeds", seeds)
    views = check_int("views", views, low=0)
    out = prepare_out_dir(out, inputs=[dataset.root])
    settings = RunSettings(preset=preset, steps=steps, views=views, candidates=candidates,
                           independent=independent, device=device)
    run_rows: list[dict[str, Any]] = []
    tower_rows: list[dict[str, Any]] = []
    runs = []
    for seed in range(seeds):
        rows, towers, info = _one_run(dataset, out / "runs" / f"seed-{seed}", seed=seed,
                                      settings=settings)
        run_rows += rows
        tower_rows += towers
        runs.append(info)
    rows = _aggregate(dataset, run_rows)
    towers_summary = _write_towers(out, dataset, tower_rows)
    summary = {"method": "CLIPMem (Wang et al., ICLR 2025, arXiv 2502.07830)",
               "data": str(dataset.root), "records": len(dataset), "preset": preset,
               "steps": steps, "seeds": seeds, "views": views,
               "fractions": {"candidate": candidates, "independent": independent},
               "scored_pairs": len(rows), "runs": runs, **summarize(rows),
               "towers": towers_summary, "machine": machine_info(),
               "wall_seconds": round(time.time() - t0, 1)}
    return _write(out, rows, summary, extra={"towers": str(out / TOWERS_NAME)})


def score_pairs(f: Any, g: Any, data: CXRDataset | str | Path, out: str | Path | None = None,
                *, split: str | Sequence[str] | None = None, views: int = 8, seed: int = 0,
                open_clip_model: str | None = None) -> ClipMemResult:
    """CLIPMem of given encoders: f trained on the pairs, g did not (a user's own pair).

    Parameters
    ----------
    f, g : InDomainEncoder, PairEncoder or path
        Paths are read with :func:`~diffmem.clipmem.openclip.as_pair_encoder`: a diffmem
        encoder folder, an open_clip export folder, or (with ``open_clip_model``) an open_clip
        checkpoint file.
    data : CXRDataset or path
        The candidate pairs: every record (or those of ``split``) is scored.
    out : path, optional
        When given, ``clipmem.csv``, ``summary.json`` and the plot are written there.
    split, views, seed : optional
    open_clip_model : str, optional
        The open_clip architecture name of checkpoint files given as ``f`` and ``g``.

    Returns
    -------
    ClipMemResult
    """
    t0 = time.time()
    dataset = as_dataset(data)
    f = as_pair_encoder(f, open_clip_model=open_clip_model)
    g = as_pair_encoder(g, open_clip_model=open_clip_model)
    indices = list(range(len(dataset))) if split is None else \
        [i for i, s in enumerate(dataset) if s.split in ({split} if isinstance(split, str)
                                                         else set(split))]
    a_f = dataset_alignment(f, dataset, indices, views=views, seed=seed)
    a_g = dataset_alignment(g, dataset, indices, views=views, seed=seed)
    run_rows = [{"row": i, "alignment_f": float(a), "alignment_g": float(b), "clipmem": float(c)}
                for i, a, b, c in zip(indices, a_f, a_g, clipmem_score(a_f, a_g))]
    rows = _aggregate(dataset, run_rows)
    summary = {"method": "CLIPMem (Wang et al., ICLR 2025, arXiv 2502.07830)",
               "data": str(dataset.root), "f": getattr(f, "path", None),
               "g": getattr(g, "path", None), "views": views, "seed": seed,
               "scored_pairs": len(rows), **summarize(rows), "machine": machine_info(),
               "wall_seconds": round(time.time() - t0, 1)}
    if out is None:
        return ClipMemResult(rows=rows, summary=summary)
    return _write(prepare_out_dir(out, inputs=[dataset.root]), rows, summary)


def _write_towers(out: Path, dataset: CXRDataset,
                  tower_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the tower-swap rows over seeds per (pair, variant, space map), write
    ``clipmem_towers.csv`` and return ``summary["towers"]``."""
    from diffmem.clipmem.towers import tower_finding, tower_table

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in tower_rows:
        groups.setdefault((r["variant"], r["space_map"]), []).append(r)
    per_pair = []
    for (variant, space), rs in groups.items():
        per_pair += [{**r, "variant": variant, "space_map": space}
                     for r in _aggregate(dataset, rs)]
    table = tower_table(per_pair)
    write_csv(out / TOWERS_NAME, TOWER_COLUMNS, table)
    return {"method": "tower swap between f and g (diffmem.clipmem.towers)", "table": table,
            "finding": tower_finding(table), "file": TOWERS_NAME}


def _write(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], *,
           extra: dict[str, str] | None = None) -> ClipMemResult:
    from diffmem.clipmem.plots import plot_clipmem

    files = {"csv": str(write_csv(out / CSV_NAME, COLUMNS, rows)), **(extra or {})}
    if rows:
        files["plot"] = str(plot_clipmem(rows, out / PLOT_NAME))
    summary = {**summary, "files": {k: Path(v).name for k, v in files.items()}}
    write_json(out / SUMMARY_NAME, summary)
    files["summary"] = str(out / SUMMARY_NAME)
    return ClipMemResult(rows=rows, summary=summary, out=str(out), files=files)

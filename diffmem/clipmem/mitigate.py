"""Text-side mitigations of CLIPMem compared in one run (Wang et al., "Captured by Captions: On
Memorization and its Mitigation in CLIP Models", ICLR 2025, arXiv 2502.07830, Sec. 6).

f is trained again on the *same* split and seed as the unmitigated run (seed 0 of
:func:`~diffmem.clipmem.run.run_clipmem`, whose f and g are reused or trained first), once per
mitigation, with the same in-domain recipe (:func:`diffmem.clipmem.run.train_or_load`, i.e.
:func:`diffmem.embed.train_encoder` with its hooks). Each mitigated f is scored against the
*same* reference g:

* ``none``: the unmitigated f (the baseline of every comparison);
* ``caption_augment``: every step, the sentences of each report are shuffled and each dropped
  with probability ``drop`` (:class:`diffmem.embed.training.CaptionAugment`). Only reports of
  two or more sentences change: with the default impression prompts many are one sentence
  (the row's setting gives the share); ``--prompt-section findings/both/full`` gives more;
* ``text_noise``: Gaussian noise of expected norm ``level`` on the unit-norm text embeddings
  in the training loss;
* ``remove_top``: the top ``fraction`` of S_C by the unmitigated CLIPMem are removed from f's
  training pairs and f is retrained. Removed pairs are then non-members: the CLIPMem over all
  S_C falls for them by construction, so ``clipmem_mean_kept`` (pairs f still trains on) is
  reported too;
* ``multi_report`` (several reports per image): only where the data has them; the training
  images are grouped by file and f's training pairs are checked. When no image has two distinct
  reports the row says "not applicable" and why.

Measured for each: CLIPMem on S_C (mean over the planted ``miscaptioned`` pairs, over all
pairs, AUC for the planted kind), and utility = image-to-report retrieval recall@k on the
held-out pairs S_E (:func:`diffmem.embed.metrics.retrieval_recall`; identical report texts are
one candidate), plain images, no augmentation. ``seconds``: wall time of training and scoring
the row's f (for ``none``: of loading or training seed 0's f and g and scoring them, so it is
small when that run existed already).

Outputs in the run folder: ``mitigations.csv``, ``mitigations.png`` (CLIPMem against utility,
the non-dominated settings joined; :func:`diffmem.mitigate.plots.plot_pareto`) and the key
``mitigations`` of ``summary.json``; encoders in ``mitigations/<method>/f``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import as_dataset, check_fraction, check_int
from diffmem.clipmem.alignment import clipmem_score, dataset_alignment, default_augment
from diffmem.clipmem.run import (RunSettings, _ground_truth, _one_run, load_run, summarize,
                                 train_or_load)
from diffmem.data import CXRDataset
from diffmem.errors import ConfigError, DataError
from diffmem.utils import prepare_out_dir, write_csv, write_json

__all__ = ["MITIGATIONS", "MITIGATION_COLUMNS", "run_mitigations", "utility_of"]

#: The mitigations, in table order (``none`` is the unmitigated baseline).
MITIGATIONS = ("caption_augment", "text_noise", "remove_top", "multi_report")
MITIGATION_COLUMNS = ("method", "setting", "strength", "status", "clipmem_mean_positive",
                      "clipmem_mean_all", "clipmem_mean_kept", "auc", "utility", "recall_at_1",
                      "recall_at_5", "recall_at_10", "removed", "seconds", "pareto")
CSV_NAME = "mitigations.csv"
PLOT_NAME = "mitigations.png"
UTILITY_K = 5


def utility_of(encoder: Any, dataset: CXRDataset, indices: Sequence[int], *,
               ks: Sequence[int] = (1, 5, 10), batch_size: int = 64) -> dict[int, float] | None:
    """Image-to-report retrieval recall@k of ``encoder`` on the records ``indices`` (held-out
    pairs), plain images; None when there are fewer than two pairs."""
    from diffmem.embed.metrics import retrieval_recall

    indices = [int(i) for i in indices]
    if len(indices) < 2:
        return None
    imgs = [encoder.embed_images(x.astype(np.float32)) for _, x in dataset.iter_images(
        size=int(encoder.image_size), batch_size=batch_size, indices=indices)]
    prompts = [dataset[i].prompt for i in indices]
    return retrieval_recall(np.concatenate(imgs), encoder.embed_texts(prompts), keys=prompts,
                            ks=ks)


def _multi_report_status(dataset: CXRDataset, indices: Sequence[int]) -> tuple[bool, str]:
    """Whether f's training pairs hold an image file with two or more distinct reports."""
    reports: dict[str, set[str]] = {}
    for i in indices:
        reports.setdefault(str(dataset[i].image), set()).add(dataset[i].prompt)
    multi = sum(len(v) > 1 for v in reports.values())
    if not multi:
        return False, (f"not applicable: none of the {len(reports)} image files f trains on has "
                       "more than one distinct report")
    return True, (f"{multi} of {len(reports)} image files have several reports; the training "
                  "recipe already draws one of them at random per step, so the baseline uses "
                  "them and no separate run is made")


def _score(f_mit, g_align: np.ndarray, dataset: CXRDataset, cand: list[int], kinds: list[str],
           *, views: int, seed: int, augment: dict[str, float]) -> dict[str, Any]:
    """CLIPMem of the candidate pairs under a (mitigated) f against the reference's alignments."""
    a_f = dataset_alignment(f_mit, dataset, cand, views=views, seed=seed, augment=augment)
    c = clipmem_score(a_f, g_align)
    rows = [{"clipmem": float(x), "alignment_f": float(y), "alignment_g": float(z),
             "plant_kind": k} for x, y, z, k in zip(c, a_f, g_align, kinds)]
    s = summarize(rows)
    pos = [r["clipmem"] for r in rows if r["plant_kind"] == "miscaptioned"]
    return {"clipmem": c, "auc": s["auc"],
            "clipmem_mean_positive": round(float(np.mean(pos)), 6) if pos else None,
            "clipmem_mean_all": round(float(np.mean(c)), 6) if len(c) else None}


def _row(method: str, setting: str, strength: float, *, status: str = "measured",
         **values: Any) -> dict[str, Any]:
    row = {k: None for k in MITIGATION_COLUMNS}
    row.update(method=method, setting=setting, strength=strength, status=status, **values)
    return row


def _plan(methods: Sequence[str], *, drop: float, level: float, fraction: float,
          multi_sentence: float):
    """(method, setting, strength, training hooks) of each requested training run
    (``multi_sentence``: the share of f's reports with two or more sentences, the only ones
    caption augmentation changes)."""
    from diffmem.embed.training import CaptionAugment

    plan = []
    for m in methods:
        if m == "caption_augment":
            plan.append((m, f"shuffle sentences, drop each with p={drop:g} ({multi_sentence:.0%} "
                            "of f's reports have 2+ sentences)", drop,
                         {"caption_augment": CaptionAugment(shuffle=True, drop=drop)}))
        elif m == "text_noise":
            plan.append((m, f"Gaussian noise of norm {level:g} on text embeddings", level,
                         {"text_noise": level}))
        elif m == "remove_top":
            plan.append((m, f"remove the top {fraction:.0%} of S_C by CLIPMem, retrain",
                         fraction, {}))
    return plan


def run_mitigations(data: CXRDataset | str | Path, out: str | Path, *, preset: str = "demo",
                    steps: int | None = None, views: int = 8, candidates: float = 0.25,
                    independent: float = 0.25, device: str = "cpu",
                    methods: Sequence[str] = MITIGATIONS, drop: float = 0.3,
                    noise: float = 0.5, remove: float = 0.1) -> dict[str, Any]:
    """Compare the text-side mitigations of CLIPMem on seed 0's split (see the module
    docstring); resumable like :func:`~diffmem.clipmem.run.run_clipmem` (same ``out``).

    Parameters
    ----------
    data, out, preset, steps, views, candidates, independent, device
        As for :func:`~diffmem.clipmem.run.run_clipmem`; ``out`` may hold its run already.
    methods : sequence of str, optional
        Any of :data:`MITIGATIONS`.
    drop : float, optional
        Sentence drop probability of ``caption_augment``.
    noise : float, optional
        Expected norm of the text-embedding noise of ``text_noise``.
    remove : float, optional
        Fraction of S_C removed by ``remove_top``.

    Returns
    -------
    dict
        The ``mitigations`` summary (``rows``, ``pareto_front``, settings, files).

    Raises
    ------
    ConfigError
        For an unknown method or a setting out of range.
    """
    t_all = time.time()
    unknown = sorted(set(methods) - set(MITIGATIONS))
    if unknown:
        raise ConfigError(f"unknown CLIPMem mitigation(s) {unknown}; choose from "
                          f"{', '.join(MITIGATIONS)}")
    drop = check_fraction("drop", drop, open_high=True)
    noise = float(noise)
    if not noise > 0:
        raise ConfigError(f"noise={noise!r}; use a text-embedding noise norm > 0 (e.g. 0.5)")
    remove = check_fraction("remove", remove, open_low=True, open_high=True)
    views = check_int("views", views, low=0)
    dataset = as_dataset(data)
    out = prepare_out_dir(out, inputs=[dataset.root])
    settings = RunSettings(preset=preset, steps=steps, views=views, candidates=candidates,
                           independent=independent, device=device)
    folder = out / "runs" / "seed-0"
    t0 = time.time()
    base_rows, _, _ = _one_run(dataset, folder, seed=0, settings=settings)
    base_seconds = time.time() - t0
    split, f, g, _ = load_run(dataset, folder, seed=0, settings=settings)
    if len(split.evaluation) < 2:
        raise DataError("the data has fewer than 2 held-out (validate/test) pairs, so utility "
                        "(retrieval recall@k on S_E) cannot be measured; use data with "
                        "validate/test splits", path=dataset.root)
    cand_rows = sorted((r for r in base_rows if r["part"] == "candidate"), key=lambda r: r["row"])
    cand = [r["row"] for r in cand_rows]
    g_align = np.array([r["alignment_g"] for r in cand_rows])
    truth = _ground_truth(dataset)
    kinds = [truth.get(dataset[i].image_id or "", {}).get("plant_kind", "") for i in cand]
    aug = default_augment(f)
    score = {"views": views, "seed": 0, "augment": aug}

    def measured(enc, method, setting, strength, seconds, kept):
        sc = _score(enc, g_align, dataset, cand, kinds, **score)
        util = utility_of(enc, dataset, split.evaluation)
        keep = np.array([i in kept for i in cand])
        return _row(method, setting, strength, clipmem_mean_positive=sc["clipmem_mean_positive"],
                    clipmem_mean_all=sc["clipmem_mean_all"],
                    clipmem_mean_kept=round(float(sc["clipmem"][keep].mean()), 6)
                    if keep.any() else None, auc=sc["auc"],
                    utility=util[UTILITY_K], recall_at_1=util[1], recall_at_5=util[5],
                    recall_at_10=util[10], removed=len(cand) - int(keep.sum()),
                    seconds=round(seconds, 1))

    rows = [measured(f, "none", "unmitigated f", 0.0, base_seconds, set(cand))]
    order = sorted(cand_rows, key=lambda r: -r["clipmem"])
    removed = {r["row"] for r in order[:max(1, int(round(remove * len(order))))]}
    from diffmem.embed.training import CaptionAugment

    multi = float(np.mean([len(CaptionAugment.sentences(dataset[i].prompt)) > 1
                           for i in split.f_train]))
    for method, setting, strength, hooks in _plan(methods, drop=drop, level=noise,
                                                  fraction=remove, multi_sentence=multi):
        t0 = time.time()
        train = [i for i in split.f_train if not (method == "remove_top" and i in removed)]
        enc, _ = train_or_load(dataset, train, out / "mitigations" / method / "f",
                               preset=preset, seed=0, steps=steps, device=device, **hooks)
        kept = set(cand) - (removed if method == "remove_top" else set())
        rows.append(measured(enc, method, setting, strength, time.time() - t0, kept))
    if "multi_report" in methods:
        _, why = _multi_report_status(dataset, split.f_train)
        rows.append(_row("multi_report", why, 0.0, status="not applicable"
                         if why.startswith("not applicable") else "in baseline"))
    return _write(out, rows, utility_g=utility_of(g, dataset, split.evaluation),
                  settings={"drop": drop, "noise": noise, "remove": remove, "views": views,
                            "preset": preset, "steps": steps, "seed": 0,
                            "sizes": split.to_dict()["sizes"]},
                  wall=time.time() - t_all)


def _write(out: Path, rows: list[dict[str, Any]], *, utility_g: dict[int, float] | None,
           settings: dict[str, Any], wall: float) -> dict[str, Any]:
    """Mark the non-dominated rows, write the CSV, the plot and ``summary.json["mitigations"]``."""
    from diffmem.mitigate.compare import non_dominated
    from diffmem.mitigate.plots import plot_pareto

    measured = [r for r in rows if r["status"] == "measured"]
    key = "clipmem_mean_positive" if all(r["clipmem_mean_positive"] is not None
                                         for r in measured) else "clipmem_mean_all"
    front = non_dominated([((r["method"], r["strength"]), r[key], -r["utility"])
                           for r in measured])
    for r in rows:
        r["pareto"] = (r["method"], r["strength"]) in front if r["status"] == "measured" else None
    write_csv(out / CSV_NAME, MITIGATION_COLUMNS, rows)
    pts = [{"method": r["method"], "strength": r["strength"], "memorization": r[key],
            "utility": r["utility"]} for r in measured]
    plot_pareto({f"retrieval recall@{UTILITY_K}": pts}, out / PLOT_NAME, front=front,
                memorization_set="S_C", utility_set="held-out S_E",
                metric="mean CLIPMem" + (" of mis-captioned pairs"
                                         if key == "clipmem_mean_positive" else ""))
    summary = {"method": "text-side mitigations (Wang et al., ICLR 2025, Sec. 6)",
               "memorization": key, "utility": f"image-to-report retrieval recall@{UTILITY_K} "
               "on the held-out pairs S_E", "utility_reference_g": utility_g,
               "settings": settings, "rows": rows,
               "pareto_front": [f"{m}" for m, _ in front],
               "files": {"csv": CSV_NAME, "plot": PLOT_NAME},
               "wall_seconds": round(wall, 1)}
    path = out / "summary.json"
    full = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    full["mitigations"] = summary
    write_json(path, full)
    return summary

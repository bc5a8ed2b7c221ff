"""Figures of a detection run: score histograms by label, ROC curves, nearest-neighbour
similarities against the held-out null distribution.

Each function takes computed values and writes one PNG (matplotlib's Agg canvas, no pyplot
state, no display needed); none of them computes a score.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import DataError, OutputError

__all__ = ["plot_lorenz", "plot_nn_similarity", "plot_roc", "plot_score_histograms"]

_LABEL_NAMES = {1: "planted (memorized)", 0: "not planted"}
_COLORS = {1: "#c0392b", 0: "#2e86c1", None: "#7f8c8d"}
_TITLES = {"noise_magnitude": "noise magnitude (Wen et al.)",
           "attention_entropy": "attention entropy (Ren et al.)",
           "nn_similarity": "nearest training image similarity"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror}") from None
    return path


def _bins(values: np.ndarray, n: int = 30) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n + 1)


def _check_labels(labels: Any, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    y = np.asarray(labels).astype(np.int64)
    if y.shape != (n,):
        raise DataError(f"labels has shape {y.shape} but there are {n} scores; pass one label "
                        "per score")
    return y


def plot_score_histograms(scores: Mapping[str, Any], path: str | os.PathLike, *,
                          labels: Any = None,
                          thresholds: Mapping[str, float] | None = None) -> Path:
    """Histogram of each score, split by label when labels are given; one panel per score.

    Parameters
    ----------
    scores : mapping of str to array-like
        ``name -> (N,)`` values (higher = more memorized).
    path : path
        PNG to write.
    labels : array-like, optional
        ``(N,)`` 0/1 (1 = planted/memorized).
    thresholds : mapping of str to float, optional
        A vertical line per named score (e.g. the calibrated copy threshold).

    Returns
    -------
    pathlib.Path
    """
    if not scores:
        raise DataError("no score to plot")
    names = list(scores)
    fig = _figure(4.2 * len(names), 3.4)
    for i, name in enumerate(names):
        values = np.asarray(scores[name], dtype=np.float64)
        y = _check_labels(labels, len(values))
        ax = fig.add_subplot(1, len(names), i + 1)
        bins = _bins(values)
        groups = [(None, values)] if y is None else [(k, values[y == k]) for k in (0, 1)]
        for key, vals in groups:
            if len(vals):
                ax.hist(vals, bins=bins, alpha=0.6, color=_COLORS[key],
                        label=f"{_LABEL_NAMES.get(key, 'prompts')} (n={len(vals)})")
        if thresholds and name in thresholds:
            ax.axvline(thresholds[name], color="black", linestyle="--", linewidth=1,
                       label=f"threshold {thresholds[name]:.3g}")
        ax.set_title(_TITLES.get(name, name), fontsize=9)
        ax.set_xlabel(f"{name} (higher = more memorized)", fontsize=8)
        ax.set_ylabel("prompts", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")  # "best" warns on a slow machine
    return _save(fig, path)


def plot_roc(evaluations: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """ROC curves of several scores (:class:`~diffmem.detect.evaluate.Evaluation` objects),
    with AUC and TPR at 1 % FPR in the legend, on linear and log FPR axes."""
    if not evaluations:
        raise DataError("no evaluation to plot")
    fig = _figure(9.0, 3.8)
    for i, log_axis in enumerate((False, True)):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, ev in evaluations.items():
            fpr, tpr = np.asarray(ev.fpr), np.asarray(ev.tpr)
            if log_axis:  # FPR 0 drawn at half the smallest resolvable rate
                fpr = np.maximum(fpr, 0.5 / max(int(ev.n_neg), 1))
            ax.plot(fpr, tpr, drawstyle="steps-post",
                    label=f"{name}: AUC {ev.auc:.3f}, TPR@1% {ev.tpr_at_1pct_fpr:.2f}")
        if log_axis:
            ax.set_xscale("log")
            ax.set_title("ROC (log FPR; FPR 0 drawn at 1/(2 n_neg))", fontsize=9)
        else:
            ax.plot([0, 1], [0, 1], color="grey", linewidth=0.7, linestyle=":")
            ax.set_title("ROC", fontsize=9)
        ax.axvline(0.01, color="black", linewidth=0.7, linestyle="--")
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
        ax.legend(fontsize=6.5, loc="lower right")
    return _save(fig, path)


def plot_nn_similarity(similarities: Any, path: str | os.PathLike, *, labels: Any = None,
                       null: Any = None, threshold: float | None = None) -> Path:
    """Nearest-training similarity of each prompt's best generation against the held-out
    images' null distribution, with the calibrated threshold."""
    values = np.asarray(similarities, dtype=np.float64)
    y = _check_labels(labels, len(values))
    everything = values if null is None else np.concatenate([values, np.asarray(null, float)])
    bins = _bins(everything, 40)
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    if null is not None and len(null):
        ax.hist(np.asarray(null, float), bins=bins, density=True, alpha=0.5, color="#27ae60",
                label=f"held-out real images (n={len(null)})")
    groups = [(None, values)] if y is None else [(k, values[y == k]) for k in (0, 1)]
    for key, vals in groups:
        if len(vals):
            ax.hist(vals, bins=bins, density=True, alpha=0.5, color=_COLORS[key],
                    label=f"generations: {_LABEL_NAMES.get(key, 'prompts')} (n={len(vals)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
                   label=f"copy threshold {threshold:.3g}")
    ax.set_xlabel("similarity to the nearest training image", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.set_title("copies: generations above the held-out threshold", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_lorenz(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Lorenz curves of copies over prompts (skewed memorization, Li et al. 2025): one line per
    named :func:`~diffmem.detect.skew.copy_concentration` result, with its Gini and top-10%
    share in the legend, and the line of equality."""
    if not curves:
        raise DataError("no Lorenz curve to plot")
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":",
            label="every prompt copies equally")
    for name, c in curves.items():
        gini, top = c.get("gini"), (c.get("top_shares") or {}).get("10%")
        extra = "no copies" if gini is None else f"Gini {gini:.2f}, top 10% {top:.0%}"
        ax.plot(c["lorenz"]["prompts"], c["lorenz"]["copies"],
                label=f"{name}: {c['copies']} copies, {c['prompts']} prompts ({extra})")
    ax.set_xlabel("share of prompts (fewest copies first)", fontsize=8)
    ax.set_ylabel("share of all copies", fontsize=8)
    ax.set_title("skewed memorization: Lorenz curve of copies", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left")
    return _save(fig, path)

"""Figures of the training studies (matplotlib, Agg). Each function draws one PNG from results
already computed and returns its path; none computes a metric."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_metric_bars", "plot_metrics_vs_lr", "plot_metrics_vs_step", "plot_pooled_vs_lr",
           "plot_toy_samples"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_toy_samples(train: np.ndarray, samples: Mapping[str, np.ndarray], path: Path, *,
                     title: str) -> Path:
    """Samples of each learning rate (and of the empirical optimal score) against the training
    points, like Wu et al.'s figure: a histogram in 1-D, a scatter in 2-D."""
    plt = _plt()
    names = list(samples)
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.8), squeeze=False)
    dim = train.shape[1]
    # the axis range comes from the training points (a diverged run's samples fall outside it;
    # each panel says how many of its samples are not shown)
    lo, hi = train.min(axis=0), train.max(axis=0)
    pad = 0.5 * (hi - lo) + 0.5
    lo, hi = lo - pad, hi + pad
    for ax, name in zip(axes[0], names):
        s = samples[name]
        inside = np.all(np.isfinite(s), axis=1) & np.all((s >= lo) & (s <= hi), axis=1)
        if not inside.all():
            name = f"{name}\n{(~inside).mean():.0%} of samples off the plot"
        s = s[inside]
        if dim == 1:
            ax.hist(s[:, 0], bins=80, range=(lo[0], hi[0]), color="tab:blue", alpha=0.8)
            for x in train[:, 0]:
                ax.axvline(x, color="tab:red", lw=0.8, ls="--")
            ax.set_yticks([])
        else:
            ax.scatter(s[:, 0], s[:, 1], s=3, alpha=0.4, color="tab:blue")
            ax.scatter(train[:, 0], train[:, 1], marker="o", facecolors="none",
                       edgecolors="tab:red", s=90, linewidths=1.2)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
        ax.set_title(name, fontsize=9)
    return _finish(plt, fig, path, title)


def _lr_axis(ax, lrs: Sequence[float], log_x: bool) -> None:
    """A learning-rate x axis: log scale (optional), one labelled tick per learning rate."""
    if log_x:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(lrs)
    ax.set_xticklabels([f"{lr:g}" for lr in lrs], rotation=30, fontsize=7)
    ax.set_xlabel("learning rate")


def plot_metrics_vs_lr(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: Path,
                       *, title: str, log_x: bool = True) -> Path:
    """One panel per metric: mean over seeds (line) and each seed (dots) against the learning
    rate. Runs marked ``diverged`` are drawn as red crosses and left out of the mean; missing
    or non-finite values are left out."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
    lrs = sorted({float(r["lr"]) for r in records})
    for ax, metric in zip(axes[0], metrics):
        means = []
        for lr in lrs:
            group = [r for r in records if float(r["lr"]) == lr]
            for diverged in (False, True):
                vals = [r.get(metric) for r in group if bool(r.get("diverged")) == diverged]
                vals = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
                ax.scatter([lr] * len(vals), vals, s=12 if not diverged else 30,
                           color="tab:gray" if not diverged else "tab:red",
                           marker="o" if not diverged else "x", alpha=0.8)
                if not diverged:
                    means.append(np.mean(vals) if vals else np.nan)
        ax.plot(lrs, means, "o-", color="tab:blue")
        _lr_axis(ax, lrs, log_x)
        ax.set_title(metric, fontsize=9)
    return _finish(plt, fig, path, title)


def plot_pooled_vs_lr(rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, str], path: Path,
                      *, title: str, log_x: bool = True) -> Path:
    """One panel per metric against the learning rate, from rows pooled over seeds
    (:func:`diffmem.study.seeds.pool_seeds`): the mean (``<name>_mean``) as a line with 95%
    t-interval error bars (``<name>_ci95``, where there is one) and each seed's run
    (``row["runs"][i][field]``) as a gray dot. ``metrics`` maps a pooled name to its run field;
    missing or non-finite values are left out."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
    rs = sorted(rows, key=lambda r: float(r["lr"]))
    lrs = [float(r["lr"]) for r in rs]

    def num(v):
        return np.nan if v is None or not math.isfinite(float(v)) else float(v)

    for ax, (name, field) in zip(axes[0], metrics.items()):
        for r in rs:
            vals = [num(run.get(field)) for run in r.get("runs", [])]
            vals = [v for v in vals if math.isfinite(v)]
            ax.scatter([float(r["lr"])] * len(vals), vals, s=12, color="tab:gray", alpha=0.8)
        means = [num(r.get(f"{name}_mean")) for r in rs]
        errs = [0.0 if r.get(f"{name}_ci95") is None else float(r[f"{name}_ci95"]) for r in rs]
        ax.errorbar(lrs, means, yerr=errs, fmt="o-", color="tab:blue", capsize=3)
        _lr_axis(ax, lrs, log_x)
        ax.set_title(f"{name} (mean, 95% CI)", fontsize=9)
    return _finish(plt, fig, path, title)


def plot_metric_bars(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: Path,
                     *, label: str, title: str, err_suffix: str | None = None) -> Path:
    """One panel per metric, one bar per run (named by ``record[label]``); with ``err_suffix``,
    error bars of half width ``record[metric + err_suffix]`` (where not None)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.2), squeeze=False)
    names = [str(r[label]) for r in records]
    for ax, metric in zip(axes[0], metrics):
        vals = [r.get(metric) for r in records]
        vals = [np.nan if v is None else float(v) for v in vals]
        errs = None
        if err_suffix is not None:
            errs = [r.get(metric + err_suffix) for r in records]
            errs = [0.0 if e is None else float(e) for e in errs]
        ax.bar(range(len(vals)), vals, color="tab:blue", yerr=errs, capsize=3 if errs else 0)
        finite = [v for v in vals if math.isfinite(v)]
        tops = [v + (errs[i] if errs else 0.0) for i, v in enumerate(vals) if math.isfinite(v)]
        if finite and min(finite) >= 0:
            ax.set_ylim(0, max(max(tops) * 1.15, 0.05))
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    return _finish(plt, fig, path, title)


def plot_metrics_vs_step(records: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                         path: Path, *, title: str, stop: int | None = None) -> Path:
    """One panel per metric against the training step (one point per checkpoint), with the
    recommended stopping step as a dashed line; missing values are left out."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 2.8), squeeze=False)
    rs = sorted(records, key=lambda r: r["step"])
    for ax, metric in zip(axes[0], metrics):
        pts = [(r["step"], float(r[metric])) for r in rs
               if r.get(metric) is not None and math.isfinite(float(r[metric]))]
        if pts:
            ax.plot(*zip(*pts), "o-", color="tab:blue", markersize=3)
        if stop is not None:
            ax.axvline(stop, color="tab:green", ls="--", lw=1, label=f"stop at {stop}")
            ax.legend(fontsize=6)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_title(metric, fontsize=9)
    return _finish(plt, fig, path, title)

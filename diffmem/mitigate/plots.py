"""The comparison's figure: memorization rate against utility for every (method, strength),
the Pareto front joined and named. Takes computed points, writes one PNG (matplotlib's Agg
canvas); computes nothing."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from diffmem.detect.plots import _figure, _save

__all__ = ["plot_pareto"]

_AXES = {"fid_in_domain": "in-domain Fréchet distance to held-out images (lower = better)",
         "alignment": "in-domain prompt-image alignment (higher = better)"}


def _label_groups(pts: Sequence[Mapping[str, Any]], front: Collection[tuple[str, float]],
                  ) -> list[tuple[tuple[float, float], list[tuple[str, float]]]]:
    """A point within 30% of the x range (a label is wide) and 5% of the y range of an already
    labelled point joins its label (drawn as "name (+n)") instead of overprinting it; front
    points are labelled first, then the unmitigated model.

    >>> pts = [{"method": m, "strength": 1.0, "utility": u, "memorization": 1.0}
    ...        for m, u in (("a", 0.0), ("b", 0.01), ("c", 1.0))]
    >>> [(xy, [k[0] for k in keys]) for xy, keys in _label_groups(pts, front=())]
    [((0.0, 1.0), ['a', 'b']), ((1.0, 1.0), ['c'])]
    """
    xs = [float(p["utility"]) for p in pts]
    ys = [float(p["memorization"]) for p in pts]
    dx = 0.3 * ((max(xs) - min(xs)) or 1.0) if xs else 0.0
    dy = 0.05 * ((max(ys) - min(ys)) or 1.0) if ys else 0.0
    groups: list[tuple[tuple[float, float], list[tuple[str, float]]]] = []
    order = sorted(range(len(pts)), key=lambda i: ((pts[i]["method"], pts[i]["strength"])
                                                   not in front, pts[i]["method"] != "none"))
    for i in order:
        key = (pts[i]["method"], pts[i]["strength"])
        near = next((g for g in groups if abs(g[0][0] - xs[i]) <= dx
                     and abs(g[0][1] - ys[i]) <= dy), None)
        if near is None:
            groups.append(((xs[i], ys[i]), [key]))
        else:
            near[1].append(key)
    return groups


def plot_pareto(panels: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, *,
                front: Collection[tuple[str, float]], memorization_set: str = "memorized",
                utility_set: str = "control", metric: str = "memorization rate",
                labels: Mapping[tuple[str, float], str] | None = None) -> Path:
    """One panel per utility metric: memorization (y, on ``memorization_set``: the
    ``metric`` named, a rate or the noise magnitude) against the utility metric (x, on
    ``utility_set``), one point per configuration (from
    :func:`~diffmem.mitigate.compare.points`). The first panel's metric defines ``front``:
    those points are joined and named in bold. Returns the PNG path."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(5.5 * len(panels), 4.6)
    labels = labels or {}
    for k, (utility, pts) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for p in pts:
            on_front = (p["method"], p["strength"]) in front and k == 0
            base = p["method"] == "none"
            ax.scatter([p["utility"]], [p["memorization"]], s=70 if on_front else 36,
                       marker="*" if base else "o", zorder=3,
                       color="#c0392b" if on_front else ("#7f8c8d" if base else "#2e86c1"))
        for (x, y), keys in _label_groups(pts, front if k == 0 else ()):
            bold = keys[0] in front and k == 0
            more = f" (+{len(keys) - 1})" if len(keys) > 1 else ""
            ax.annotate(labels.get(keys[0], keys[0][0]) + more, (x, y), fontsize=7,
                        xytext=(4, 3), textcoords="offset points",
                        fontweight="bold" if bold else "normal")
        for p in pts:
            if p["method"] == "none":  # the unmitigated model: reference lines
                ax.axhline(p["memorization"], color="#7f8c8d", lw=0.8, ls="--", zorder=1)
                ax.axvline(p["utility"], color="#7f8c8d", lw=0.8, ls="--", zorder=1)
        if k == 0:
            line = sorted((p for p in pts if (p["method"], p["strength"]) in front),
                          key=lambda p: p["memorization"])
            if len(line) > 1:
                ax.plot([p["utility"] for p in line], [p["memorization"] for p in line],
                        color="#c0392b", lw=1, zorder=2, label="Pareto front")
                ax.legend(fontsize=8, loc="best")
        ax.set_xlabel(f"{_AXES.get(utility, utility)}\n({utility_set} prompts)", fontsize=8)
        ax.set_ylabel(f"{metric} ({memorization_set} prompts)", fontsize=8)
        if metric == "memorization rate":
            ax.set_ylim(-0.05, 1.05)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
    fig.suptitle("Mitigations: memorization vs utility (in-domain encoder, not Inception)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)

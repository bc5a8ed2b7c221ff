"""The comparison's figure: memorization rate against utility for every (method, strength),
the Pareto front joined and named. Takes computed rows, writes one PNG (matplotlib's Agg
canvas); computes nothing."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffmem.detect.plots import _figure, _save

__all__ = ["plot_pareto"]

_AXES = {"fid_in_domain": "in-domain Fréchet distance to held-out images (lower = better)",
         "alignment": "in-domain prompt-image alignment (higher = better)"}


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                prompt_set: str = "memorized", utility: str = "fid_in_domain",
                labels: Mapping[tuple[str, float], str] | None = None) -> Path:
    """Memorization rate (y) against each utility metric (x), one panel per metric, for the
    rows of ``prompt_set``; points with ``pareto`` true are joined (front of ``utility``) and
    labelled. Returns the PNG path."""
    fig = _figure(11.0, 4.6)
    points = [r for r in rows if r["prompt_set"] == prompt_set]
    labels = labels or {}
    for k, metric in enumerate(("fid_in_domain", "alignment")):
        ax = fig.add_subplot(1, 2, k + 1)
        for r in points:
            name = labels.get((r["method"], r["strength"]), r["method"])
            base = r["method"] == "none"
            on_front = bool(r["pareto"]) and metric == utility
            ax.scatter([r[metric]], [r["memorization_rate"]], s=60 if on_front else 36,
                       marker="*" if base else "o", zorder=3,
                       color="#c0392b" if on_front else ("#7f8c8d" if base else "#2e86c1"))
            ax.annotate(name, (r[metric], r["memorization_rate"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points",
                        fontweight="bold" if on_front else "normal")
        if metric == utility:
            front = sorted((r for r in points if r["pareto"]), key=lambda r: r[metric])
            if len(front) > 1:
                ax.plot([r[metric] for r in front], [r["memorization_rate"] for r in front],
                        color="#c0392b", lw=1, zorder=2, label="Pareto front")
                ax.legend(fontsize=8, loc="best")
        ax.set_xlabel(_AXES[metric], fontsize=8)
        ax.set_ylabel(f"memorization rate ({prompt_set} prompts)", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Mitigations: memorization vs utility ({prompt_set} prompts; "
                 "in-domain encoder, not Inception)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)

"""The CLIPMem figure (matplotlib, Agg): drawn from rows already computed; computes no metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_clipmem"]


def plot_clipmem(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Two panels: CLIPMem of each pair by planted kind (jittered strip), and alignment under g
    against alignment under f (pairs above the diagonal are aligned more by the model that
    trained on them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["plant_kind"] or "none" for r in rows}, key=lambda k: (k != "none", k))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    rng = np.random.default_rng(0)
    for x, kind in enumerate(kinds):
        sel = [r for r in rows if (r["plant_kind"] or "none") == kind]
        y = np.array([r["clipmem"] for r in sel])
        ax1.scatter(x + rng.uniform(-0.2, 0.2, len(y)), y, s=8, alpha=0.6)
        ax1.hlines(y.mean(), x - 0.3, x + 0.3, color="k", lw=1.5)
        ax2.scatter([r["alignment_g"] for r in sel], [r["alignment_f"] for r in sel], s=8,
                    alpha=0.6, label=f"{kind} ({len(sel)})")
    ax1.set_xticks(range(len(kinds)), kinds)
    ax1.axhline(0.0, color="0.6", lw=0.8)
    ax1.set_ylabel("CLIPMem (alignment f - g)")
    ax1.set_title("CLIPMem by planted kind (bar = mean)", fontsize=9)
    lo = min(min(r["alignment_g"] for r in rows), min(r["alignment_f"] for r in rows))
    hi = max(max(r["alignment_g"] for r in rows), max(r["alignment_f"] for r in rows))
    ax2.plot([lo, hi], [lo, hi], color="0.6", lw=0.8)
    ax2.set_xlabel("alignment under g (not trained on the pair)")
    ax2.set_ylabel("alignment under f (trained on it)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

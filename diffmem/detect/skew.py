"""Skewed memorization (Li et al., 2025, "Skewed Memorization in Large Language Models:
Quantification and Decomposition"): how concentrated copying is among the training samples.

Li et al. find that a small share of training samples carries most of a model's memorization
and report its per-sample distribution. We measure the same thing with the detector's copy
verdicts: each scanned prompt's number of copy generations is its memorization, and
:func:`copy_concentration` summarizes their distribution as

* the share of all copies that come from the top 1% and top 10% of prompts (ranked by copies;
  ``ceil(fraction x n)`` prompts, at least one);
* the Gini coefficient of the copy counts (0: every prompt copies equally often; ``1 - 1/n``:
  one prompt makes every copy), ``G = sum_i (2i - n - 1) x_(i) / (n sum_i x_i)`` with ``x``
  sorted ascending and ``i = 1..n``;
* the Lorenz curve: cumulative share of copies against cumulative share of prompts, prompts
  sorted from fewest to most copies.

Deviation: Li et al. measure per-sample memorization of language models by exact extraction of
training sequences; here a sample's memorization is its count of calibrated image copies over a
fixed number of generations, so the counts are bounded by the generations per prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffmem.errors import DataError

__all__ = ["TOP_FRACTIONS", "copy_concentration", "gini", "lorenz_curve", "top_share"]

#: The "top x% of prompts" shares reported (1% and 10%).
TOP_FRACTIONS = (0.01, 0.1)


def _counts(values: Any) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size and (not np.all(np.isfinite(x)) or np.any(x < 0)):
        raise DataError("per-sample copy counts must be finite and >= 0; got "
                        f"{values!r}")
    return x


def gini(values: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient of non-negative per-sample counts (0 = equal; ``nan`` when there are
    no samples or no copies).

    Examples
    --------
    >>> gini([1, 1, 1, 1])
    0.0
    >>> gini([0, 0, 0, 4])
    0.75
    """
    x = np.sort(_counts(values))
    n, total = x.size, float(x.sum())
    if n == 0 or total == 0:
        return math.nan
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.sum((2 * i - n - 1) * x) / (n * total))


def top_share(values: Sequence[float] | np.ndarray, fraction: float) -> float:
    """Share of the total held by the top ``ceil(fraction x n)`` samples (at least one);
    ``nan`` without samples or copies.

    Examples
    --------
    >>> top_share([5, 3, 1, 1, 0, 0, 0, 0, 0, 0], 0.1)
    0.5
    >>> top_share([5, 3, 1, 1, 0, 0, 0, 0, 0, 0], 0.2)
    0.8
    """
    if not 0 < fraction <= 1:
        raise DataError(f"fraction={fraction!r}; use a share of the samples in (0, 1]")
    x = np.sort(_counts(values))[::-1]
    total = float(x.sum())
    if x.size == 0 or total == 0:
        return math.nan
    k = max(1, math.ceil(fraction * x.size - 1e-9))
    return float(x[:k].sum() / total)


def lorenz_curve(values: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Lorenz curve ``(share of samples, share of copies)``, both starting at 0 and ending
    at 1, samples sorted from fewest to most copies.

    Examples
    --------
    >>> x, y = lorenz_curve([0, 1, 3])
    >>> x.round(3).tolist(), y.tolist()
    ([0.0, 0.333, 0.667, 1.0], [0.0, 0.0, 0.25, 1.0])
    """
    c = np.sort(_counts(values))
    total = float(c.sum())
    xs = np.arange(c.size + 1, dtype=np.float64) / max(c.size, 1)
    if total == 0:
        return xs, np.zeros_like(xs)
    return xs, np.concatenate([[0.0], np.cumsum(c) / total])


def copy_concentration(copies_per_prompt: Sequence[float] | np.ndarray, *,
                       fractions: Sequence[float] = TOP_FRACTIONS,
                       curve_points: int = 101) -> dict[str, Any]:
    """How concentrated copying is among prompts (Li et al., 2025): shares of the top
    prompts, the Gini coefficient and a Lorenz curve (see the module docstring).

    Parameters
    ----------
    copies_per_prompt : array-like of int
        Copy generations of each scanned prompt (0 for a prompt that never copies).
    fractions : sequence of float
        Top shares to report (default: 1% and 10% of prompts).
    curve_points : int
        Points of the Lorenz curve kept in the result (interpolated, so the dictionary stays
        small for a million prompts).

    Returns
    -------
    dict
        ``prompts``, ``copies``, ``prompts_with_copies``, ``gini``, ``top_shares`` (``{"1%":
        share, "10%": share}``) and ``lorenz`` (``{"prompts": [...], "copies": [...]}``);
        shares and Gini are None when nothing was copied.

    Examples
    --------
    >>> c = copy_concentration([4, 0, 0, 0, 0, 0, 0, 0, 0, 0], curve_points=3)
    >>> c["gini"], c["top_shares"]["10%"], c["lorenz"]["copies"]
    (0.9, 1.0, [0.0, 0.0, 1.0])
    """
    x = _counts(copies_per_prompt)

    def finite(v: float) -> float | None:
        return None if math.isnan(v) else round(v, 6)

    xs, ys = lorenz_curve(x)
    grid = np.linspace(0, 1, max(2, int(curve_points)))
    return {"prompts": int(x.size), "copies": int(x.sum()),
            "prompts_with_copies": int(np.count_nonzero(x)),
            "gini": finite(gini(x)),
            "top_shares": {f"{f * 100:g}%": finite(top_share(x, f)) for f in fractions},
            "lorenz": {"prompts": [round(float(v), 4) for v in grid],
                       "copies": [round(float(v), 6) for v in np.interp(grid, xs, ys)]}}

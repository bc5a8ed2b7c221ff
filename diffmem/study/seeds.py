"""Studies over seeds: the ``--seeds`` option, each seed's run folder, and the pooling of a
setting's per-seed runs into one row (mean and half width of the 95% Student-t interval,
:func:`diffmem.study.results.mean_ci`). ``study lora``, ``study lr`` and
``study train-mitigations`` all pool with :func:`pool_seeds`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffmem.checks import number_list
from diffmem.study.results import mean_ci

__all__ = ["DEFAULT_SEEDS", "SEED_METRICS", "fmt_ci", "intervals_apart", "parse_ints",
           "parse_seeds", "pool_seeds", "row_ci", "seed_run_name"]

#: Seeds of every CXR training study unless told otherwise (issue 17: at least three).
DEFAULT_SEEDS = (0, 1, 2)

#: Metrics pooled over seeds: output name (``<name>_mean``, ``<name>_ci95``) -> run field.
SEED_METRICS = {"own_copies": "memorization_rate_own", "any_copies": "memorization_rate_any",
                "reid_leaks": "reid_rate", "reid_leaks_not_copies": "reid_rate_not_copies",
                "reid_leaks_own": "reid_rate_own",
                "empty_prompt_copies": "copy_rate_unconditional",
                "unrelated_prompt_copies": "copy_rate_unrelated",
                "control_copies": "control_copy_rate", "fid": "fid_in_domain",
                "noise_auc": "noise_magnitude_auc", "nn_auc": "nn_similarity_auc",
                "copy_gini": "copy_gini", "final_loss": "final_loss",
                "train_seconds": "train_seconds"}


def parse_ints(values: Sequence[Any] | str, *, name: str, low: int,
               example: str) -> list[int]:
    """Distinct integers ``>= low`` from a comma-separated string or a sequence; a
    ConfigError names ``name``, the bad item and ``example``.

    Examples
    --------
    >>> parse_ints("4,16, 64", name="ranks", low=1, example="--ranks 4,16,64")
    [4, 16, 64]
    """
    kind = "a positive integer" if low == 1 else f"an integer >= {low}"
    return number_list(values, name=name, cast=int, expected=kind, example=example,
                       accept=lambda v, x: v >= low and str(v) == str(x).strip())


def parse_seeds(seeds: Sequence[Any] | str) -> list[int]:
    """Training seeds: distinct integers >= 0 (a ConfigError names ``seeds``).

    Examples
    --------
    >>> parse_seeds("0,1,2"), parse_seeds([3])
    ([0, 1, 2], [3])
    """
    return parse_ints(seeds, name="seeds", low=0, example="--seeds 0,1,2")


def seed_run_name(runs: str | Path, name: str, seed: int) -> str:
    """The folder name of setting ``name``'s run with ``seed`` under ``runs``:
    ``<name>-s<seed>``, or the single-seed name ``<name>`` of studies written before seeds were
    pooled when that folder holds a *finished* run trained with this seed (its model card says
    so) and ``<name>-s<seed>`` does not exist. Killed old runs are not picked up."""
    runs = Path(runs)
    new = f"{name}-s{seed}"
    card = runs / name / "model_card.json"
    if (runs / new).exists() or not card.is_file():
        return new
    try:
        old_seed = json.loads(card.read_text(encoding="utf-8")).get("training", {}).get("seed")
    except (OSError, ValueError, AttributeError):
        return new
    return name if old_seed == seed else new


def pool_seeds(runs: Sequence[Mapping[str, Any]], setting: Mapping[str, Any], *,
               metrics: Mapping[str, str] = SEED_METRICS,
               columns: Sequence[str] | None = None) -> dict[str, Any]:
    """One setting's row: its fields, ``seeds`` (the number of runs), for each of ``metrics``
    the mean and the half width of the 95% t-interval over the runs (``<name>_mean``,
    ``<name>_ci95``; :func:`~diffmem.study.results.mean_ci`: missing values left out), and the
    runs themselves under ``runs``.

    Parameters
    ----------
    runs : sequence of mapping
        One record per seed (measured fields as :data:`SEED_METRICS` names them).
    setting : mapping
        The setting's own fields (name, learning rate, ...), placed first.
    metrics : mapping, optional
        Output name -> run field (default :data:`SEED_METRICS`).
    columns : sequence of str, optional
        Keep only these fields, in this order (``runs`` always last); default: all.

    Examples
    --------
    >>> row = pool_seeds([{"fid_in_domain": 10.0}, {"fid_in_domain": 12.0}], {"name": "a"},
    ...                  metrics={"fid": "fid_in_domain"})
    >>> row["name"], row["seeds"], row["fid_mean"], round(row["fid_ci95"], 3)
    ('a', 2, 11.0, 12.706)
    """
    row = {**setting, "seeds": len(runs)}
    for out_name, key in metrics.items():
        row[f"{out_name}_mean"], row[f"{out_name}_ci95"] = mean_ci([r.get(key) for r in runs])
    if columns is not None:
        row = {k: row.get(k) for k in columns}
    return {**row, "runs": [dict(r) for r in runs]}


def fmt_ci(mean: Any, half: Any, pct: bool, missing: str = "n/a") -> str:
    """``mean ± half`` as text (percentages with ``pct``); ``missing`` without a mean.

    Examples
    --------
    >>> fmt_ci(0.25, 0.1, True), fmt_ci(12.345, None, False), fmt_ci(None, None, True)
    ('25% ± 10%', '12.3', 'n/a')
    """
    if mean is None:
        return missing
    f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3g}")
    return f(mean) + ("" if half is None else f" ± {f(half)}")


def row_ci(row: Mapping[str, Any], metric: str, pct: bool = True, missing: str = "n/a") -> str:
    """A pooled row's ``metric`` (``<metric>_mean``, ``<metric>_ci95``) as :func:`fmt_ci` text.

    Examples
    --------
    >>> row_ci({"fid_mean": 0.5, "fid_ci95": 0.07}, "fid", pct=False), row_ci({}, "fid")
    ('0.5 ± 0.07', 'n/a')
    """
    return fmt_ci(row.get(f"{metric}_mean"), row.get(f"{metric}_ci95"), pct, missing)


def intervals_apart(a: Mapping[str, Any], b: Mapping[str, Any], metric: str) -> bool:
    """Whether two pooled rows' 95% intervals of ``metric`` do not overlap (False when either
    has no interval, e.g. one seed).

    Examples
    --------
    >>> intervals_apart({"x_mean": 0.1, "x_ci95": 0.05}, {"x_mean": 0.5, "x_ci95": 0.1}, "x")
    True
    """
    ma, mb = a.get(f"{metric}_mean"), b.get(f"{metric}_mean")
    ha, hb = a.get(f"{metric}_ci95"), b.get(f"{metric}_ci95")
    if None in (ma, mb, ha, hb):
        return False
    return abs(ma - mb) > ha + hb

"""Faithfulness of an attribution (deletion and insertion metrics of Petsiuk et al., BMVC 2018,
"RISE"): does taking out the most-attributed units first lower the memorization score faster
than a random order, and does putting them back first restore it faster?

* :func:`deletion_test`: the first step only (top-ranked unit vs a random unit);
* :func:`faithfulness_curves`: the whole deletion and insertion curves of each method's order and
  of random orders, and the area under each (:meth:`FaithfulnessCurves.table`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffmem.attribution.methods import (_magnitudes, _prepare, _Prepared, _variant_embeddings,
                                         attribute, checked_method, occlusion)
from diffmem.attribution.result import TokenAttribution
from diffmem.errors import ConfigError, PromptError
from diffmem.models import DiffusionModelAdapter
from diffmem.utils import progress

log = logging.getLogger(__name__)

__all__ = ["CURVE_METHODS", "FAITHFULNESS_COLUMNS", "DeletionResult", "FaithfulnessCurves",
           "deletion_test", "faithfulness_curves", "format_faithfulness"]

#: The attribution methods whose orders :func:`faithfulness_curves` measures by default.
CURVE_METHODS = ("integrated_gradients", "gradient", "occlusion", "attention")
#: Columns of ``faithfulness.csv`` (:meth:`FaithfulnessCurves.table`).
FAITHFULNESS_COLUMNS = ("order", "n_prompts", "deletion_auc", "insertion_auc",
                        "deletion_auc_random", "insertion_auc_random", "deletion_beats_random",
                        "insertion_beats_random", "top_unit_drop")


@dataclass
class DeletionResult:
    """Per-prompt outcome of :func:`deletion_test` and its summary.

    Attributes
    ----------
    prompts : list of str
        The prompts tested (skipped ones left out).
    method : str
        The attribution method whose top unit was deleted.
    top_units : list of str
        Each prompt's top-ranked unit.
    memorization : numpy.ndarray
        Noise magnitude ``M(p)`` of each prompt.
    drop_top : numpy.ndarray
        ``M(p) - M(p without its top unit)``.
    drop_random : numpy.ndarray
        The expected drop when a unit drawn uniformly at random is deleted: the mean over all
        units of ``M(p) - M(p without u)`` (exact, not a Monte Carlo draw).
    ratios : numpy.ndarray
        ``drop_top / drop_random``; NaN where ``drop_random <= 0`` (deleting a random unit does
        not lower the score on average, so no ratio is defined).
    skipped : list of (str, str)
        Prompts that could not be tested and why.
    params : dict
    """

    prompts: list[str]
    method: str
    top_units: list[str]
    memorization: np.ndarray
    drop_top: np.ndarray
    drop_random: np.ndarray
    ratios: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_undefined(self) -> int:
        """Prompts whose ratio is undefined (``drop_random <= 0``)."""
        return int(np.isnan(self.ratios).sum())

    @property
    def mean_ratio(self) -> float:
        """Mean of the defined per-prompt ratios (NaN when none is defined)."""
        ok = self.ratios[~np.isnan(self.ratios)]
        return float(ok.mean()) if ok.size else float("nan")

    @property
    def median_ratio(self) -> float:
        ok = self.ratios[~np.isnan(self.ratios)]
        return float(np.median(ok)) if ok.size else float("nan")

    @property
    def ratio_of_means(self) -> float:
        """``mean(drop_top) / mean(drop_random)`` over all prompts (robust to tiny
        denominators)."""
        den = float(self.drop_random.mean()) if self.drop_random.size else 0.0
        return float(self.drop_top.mean()) / den if den > 0 else float("nan")

    @property
    def top_beats_random(self) -> float:
        """Fraction of prompts where deleting the top unit lowers the score more than a random
        unit does on average."""
        return float((self.drop_top > self.drop_random).mean()) if self.drop_top.size else \
            float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_prompts": len(self.prompts),
            "mean_ratio": self.mean_ratio,
            "median_ratio": self.median_ratio,
            "ratio_of_means": self.ratio_of_means,
            "top_beats_random": self.top_beats_random,
            "n_undefined": self.n_undefined,
            "per_prompt": [{"prompt": p, "top_unit": u, "memorization": float(m),
                            "drop_top": float(a), "drop_random": float(b),
                            "ratio": None if np.isnan(r) else float(r)}
                           for p, u, m, a, b, r in zip(self.prompts, self.top_units,
                                                       self.memorization, self.drop_top,
                                                       self.drop_random, self.ratios)],
            "skipped": [list(s) for s in self.skipped],
            "params": self.params,
        }


def deletion_test(adapter: DiffusionModelAdapter, prompts: Sequence[str], *,
                  method: str | None = None, generations: int = 4, steps: int = 1,
                  num_inference_steps: int = 50, guidance: float | None = None, seed: int = 0,
                  batch_size: int = 32, truncate: bool = False, deletion: str = "remove",
                  attributions: Sequence[TokenAttribution] | None = None) -> DeletionResult:
    """Deletion test of an attribution method on the noise-magnitude memorization score.

    For each prompt ``p``: rank its units with ``method``, then measure with the same initial
    noises the noise magnitude ``M`` (Wen et al., 2024) of ``p`` with each unit deleted
    (:func:`~diffmem.attribution.occlusion` with ``mode=deletion``). A faithful attribution's top
    unit lowers ``M`` more than a random unit: ``ratio = drop_top / drop_random`` is above 1.
    With ``method="occlusion"`` the test is circular (its top unit is by definition the largest
    drop); use it as an upper bound for the other methods.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    prompts : sequence of str
        Prompts to test (typically the memorized ones).
    method : str, optional
        Attribution method whose top unit is deleted (default
        :data:`~diffmem.attribution.methods.DEFAULT_METHOD`).
    generations, steps, num_inference_steps, guidance, seed, batch_size, truncate
        As for :func:`~diffmem.attribution.gradient`; the same settings serve the attribution
        and the deletions.
    deletion : {"remove", "pad"}, optional
        How a unit is deleted: ``"remove"`` drops its tokens, so every later token moves up a
        position; ``"pad"`` replaces them with padding tokens, so no other token moves. Removing
        a prompt's first word shifts the whole prompt, which a position-sensitive model can feel
        more than the word itself; ``"pad"`` separates the two effects.
    attributions : sequence of TokenAttribution, optional
        Attributions computed earlier, one per prompt, in order (their method is used).

    Returns
    -------
    DeletionResult
        Prompts that cannot be attributed (only markers, too long) are skipped and listed.

    Raises
    ------
    ConfigError
        For an empty ``prompts``, or ``attributions`` that do not match ``prompts``.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ConfigError("deletion_test got no prompts; give at least one")
    if attributions is not None:
        attributions = list(attributions)
        if [a.prompt for a in attributions] != prompts:
            raise ConfigError("attributions do not match prompts one to one; pass one "
                              "TokenAttribution per prompt, in the same order")
        method = attributions[0].method
    method = checked_method(method)
    options = dict(generations=generations, steps=steps, num_inference_steps=num_inference_steps,
                   guidance=guidance, seed=seed, batch_size=batch_size, truncate=truncate)
    kept, tops, mems, d_top, d_rand, skipped = [], [], [], [], [], []
    for i, prompt in enumerate(progress(prompts, desc="deletion test", unit="prompt")):
        try:
            deleted = occlusion(adapter, prompt, mode=deletion, **options)
            if attributions is not None:
                ranked = attributions[i]
            elif method == "occlusion":
                ranked = deleted
            else:
                ranked = attribute(adapter, prompt, method=method, **options)
        except PromptError as e:
            skipped.append((prompt, str(e)))
            continue
        top = int(ranked.order()[0])
        drops = deleted.scores
        kept.append(prompt)
        tops.append(ranked.units[top].text)
        mems.append(deleted.memorization)
        d_top.append(drops[top])
        d_rand.append(drops.mean())
    if skipped:
        log.warning("deletion test skipped %d of %d prompt(s) that cannot be attributed",
                    len(skipped), len(prompts))
    d_top_a, d_rand_a = np.asarray(d_top, dtype=np.float64), np.asarray(d_rand, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(d_rand_a > 0, d_top_a / np.where(d_rand_a > 0, d_rand_a, 1.0), np.nan)
    params = {**{k: v for k, v in options.items() if k != "batch_size"}, "deletion": deletion}
    return DeletionResult(kept, method, tops, np.asarray(mems, dtype=np.float64), d_top_a,
                          d_rand_a, ratios, skipped, params)


# ---------------------------------------------------------------------------- curves
@dataclass
class FaithfulnessCurves:
    """Deletion and insertion curves of attribution orders (Petsiuk et al., BMVC 2018, "RISE").

    For a prompt of ``n`` units and an order of its units, the deletion curve is the
    memorization score with the first ``k`` units of the order taken out, the insertion curve
    the score with *only* the first ``k`` units present, for ``k`` from 0 to ``n``, both divided
    by the score of the whole prompt and drawn against ``k / n``. A faithful order makes the
    deletion curve fall fast (small area) and the insertion curve rise fast (large area).

    Attributes
    ----------
    prompts : list of str
        The prompts measured (skipped ones left out).
    orders : list of str
        The methods measured, then ``"random"`` (the mean over random orders).
    fractions : numpy.ndarray
        The common grid ``(P,)`` of unit fractions the curves are resampled on.
    deletion, insertion : dict of str to numpy.ndarray
        Per order, ``(N, P)`` normalized curves (1 = the whole prompt's score).
    deletion_auc, insertion_auc : dict of str to numpy.ndarray
        Per order, ``(N,)`` areas under each prompt's curve (trapezoid over its own points).
    top_drop : dict of str to numpy.ndarray
        Per order, ``(N,)`` the normalized drop after the first deletion step (the test of
        :func:`deletion_test` with this replacement).
    memorization : numpy.ndarray
        ``(N,)`` the whole prompts' noise magnitudes.
    blank : numpy.ndarray
        ``(N,)`` the noise magnitude with every unit replaced (the insertion curve's start),
        divided by ``memorization``.
    top_units : dict of str to list of str
        Per method, each prompt's top-ranked unit.
    skipped : list of (str, str)
    params : dict
    """

    prompts: list[str]
    orders: list[str]
    fractions: np.ndarray
    deletion: dict[str, np.ndarray]
    insertion: dict[str, np.ndarray]
    deletion_auc: dict[str, np.ndarray]
    insertion_auc: dict[str, np.ndarray]
    top_drop: dict[str, np.ndarray]
    memorization: np.ndarray
    blank: np.ndarray
    top_units: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per order (columns :data:`FAITHFULNESS_COLUMNS`): mean areas, the random
        orders' mean areas, and the fraction of prompts on which the order beats random
        (smaller deletion area, larger insertion area)."""
        rows = []
        rand_d, rand_i = self.deletion_auc["random"], self.insertion_auc["random"]
        for name in self.orders:
            d, i = self.deletion_auc[name], self.insertion_auc[name]
            rows.append({
                "order": name, "n_prompts": int(d.size),
                "deletion_auc": _mean(d), "insertion_auc": _mean(i),
                "deletion_auc_random": _mean(rand_d), "insertion_auc_random": _mean(rand_i),
                "deletion_beats_random": _mean((d < rand_d).astype(float)),
                "insertion_beats_random": _mean((i > rand_i).astype(float)),
                "top_unit_drop": _mean(self.top_drop[name]),
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the table, the mean curves, and per-prompt areas."""
        return {
            "metric": "deletion/insertion area under the normalized noise-magnitude curve "
                      "(Petsiuk et al., BMVC 2018)",
            "table": self.table(),
            "fractions": self.fractions.tolist(),
            "mean_curves": {name: {"deletion": self.deletion[name].mean(axis=0).tolist(),
                                   "insertion": self.insertion[name].mean(axis=0).tolist()}
                            for name in self.orders} if self.prompts else {},
            "per_prompt": [{"prompt": p, "memorization": float(self.memorization[j]),
                            "blank": float(self.blank[j]),
                            "top_units": {m: u[j] for m, u in self.top_units.items()},
                            "deletion_auc": {m: float(a[j]) for m, a in
                                             self.deletion_auc.items()},
                            "insertion_auc": {m: float(a[j]) for m, a in
                                              self.insertion_auc.items()}}
                           for j, p in enumerate(self.prompts)],
            "skipped": [list(x) for x in self.skipped],
            "params": self.params,
        }


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if np.size(x) else float("nan")


def _steps(n_units: int, points: int) -> np.ndarray:
    """The numbers of units ``k`` at which a curve is measured: ``points`` evenly spread
    values from 0 to ``n_units`` (every ``k`` when there are fewer units), and always 1 (the
    first step, :func:`deletion_test`'s)."""
    spread = np.round(np.linspace(0.0, 1.0, points) * n_units).astype(int)
    return np.unique(np.concatenate([spread, [min(1, n_units)]]))


def _set_magnitudes(adapter: DiffusionModelAdapter, prep: _Prepared,
                    drops: list[frozenset[int]], replacement: str) -> np.ndarray:
    """Noise magnitude of the prompt with each set of units replaced, float64 ``(len(drops),)``,
    every variant walked from the prompt's own seeds (a paired comparison)."""
    conds, masks = _variant_embeddings(adapter, prep, replacement,
                                       [[prep.units[i] for i in sorted(d)] for d in drops])
    return _magnitudes(adapter, conds, masks, prep).mean(axis=(1, 2))


def _prompt_curves(adapter: DiffusionModelAdapter, prep: _Prepared,
                   orders: dict[str, list[np.ndarray]], *, points: int, replacement: str,
                   ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], float, float]:
    """Per order name, ``(fractions, deletion, insertion)`` normalized curves (averaged over
    the order's permutations), the whole prompt's score and the blank prompt's score."""
    n = len(prep.units)
    ks = _steps(n, points)
    wanted: dict[frozenset[int], int] = {}
    everything = frozenset(range(n))
    for perms in orders.values():
        for perm in perms:
            for k in ks:
                for d in (frozenset(perm[:k].tolist()), everything - frozenset(perm[:k].tolist())):
                    wanted.setdefault(d, len(wanted))
    wanted.setdefault(frozenset(), len(wanted))
    wanted.setdefault(everything, len(wanted))
    keys = sorted(wanted, key=wanted.get)
    values = dict(zip(keys, _set_magnitudes(adapter, prep, keys, replacement)))
    full, blank = values[frozenset()], values[everything]
    out = {}
    for name, perms in orders.items():
        dele = np.mean([[values[frozenset(p[:k].tolist())] for k in ks] for p in perms], axis=0)
        ins = np.mean([[values[everything - frozenset(p[:k].tolist())] for k in ks]
                       for p in perms], axis=0)
        out[name] = (ks / max(n, 1), dele / full, ins / full)
    return out, float(full), float(blank)


def faithfulness_curves(adapter: DiffusionModelAdapter, prompts: Sequence[str], *,
                        methods: Sequence[str] = CURVE_METHODS, random_orders: int = 3,
                        points: int = 11, replacement: str = "pad", generations: int = 4,
                        steps: int = 1, num_inference_steps: int = 50,
                        guidance: float | None = None, seed: int = 0, batch_size: int = 32,
                        truncate: bool = False) -> FaithfulnessCurves:
    """Deletion and insertion curves of attribution orders (Petsiuk et al., BMVC 2018, "RISE").

    For each prompt and each method, the units are ranked by the method; the noise magnitude
    ``M`` (Wen et al., 2024) is measured with the first ``k`` units of that order replaced
    (deletion) and with all *but* the first ``k`` replaced (insertion), at ``points`` values of
    ``k`` from 0 to the number of units, all from the prompt's own initial noises. RISE deletes
    image pixels and inserts them into a blurred canvas; here units are replaced by padding
    tokens (``replacement="pad"``: no other token moves, so a unit's position effect is not
    mistaken for its content) and the curves are divided by ``M`` of the whole prompt, so
    prompts weigh equally. The same is measured for ``random_orders`` seeded random orders
    (their mean curve is the ``"random"`` row), the baseline every method must beat.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    prompts : sequence of str
        Prompts to measure (typically the memorized ones).
    methods : sequence of str, optional
        Attribution methods whose orders are measured (default :data:`CURVE_METHODS`:
        integrated gradients, gradient, occlusion, attention). Occlusion is run with ``mode=replacement``, so its first deletion step is
        by construction the largest single-unit drop: its deletion curve is partly circular.
    random_orders : int, optional
        Random orders per prompt (default 3).
    points : int, optional
        Points per curve (default 11: every tenth of the units).
    replacement : {"pad", "remove"}, optional
        How units are taken out (see :func:`~diffmem.attribution.occlusion`).
    generations, steps, num_inference_steps, guidance, seed, batch_size, truncate
        As for :func:`~diffmem.attribution.gradient`.

    Returns
    -------
    FaithfulnessCurves
        Prompts that cannot be attributed, or whose noise magnitude is not positive, are
        skipped and listed.

    Raises
    ------
    ConfigError
        For no prompts, no methods, ``points < 2`` or ``random_orders < 1``.

    Examples
    --------
    >>> from diffmem.models import load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> model = load_model(tiny_stable_diffusion(seed=0))
    >>> curves = faithfulness_curves(model, ["Dr. ___ was notified."], methods=["gradient"],
    ...                              generations=1, points=3, random_orders=1)
    >>> [row["order"] for row in curves.table()]
    ['gradient', 'random']
    """
    from diffmem.attribution.methods import OCCLUSION_MODES, get_method

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    methods = list(methods)
    if not prompts:
        raise ConfigError("faithfulness_curves got no prompts; give at least one")
    if not methods:
        raise ConfigError("faithfulness_curves got no methods; give at least one of "
                          f"{list(CURVE_METHODS)}")
    for m in methods:
        get_method(m)
    if replacement not in OCCLUSION_MODES:
        raise ConfigError(f"replacement={replacement!r}; use one of {list(OCCLUSION_MODES)}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ConfigError(f"points={points!r}; use an integer >= 2 (e.g. 11)")
    if isinstance(random_orders, bool) or not isinstance(random_orders, int) or random_orders < 1:
        raise ConfigError(f"random_orders={random_orders!r}; use a positive integer (e.g. 3)")
    options = dict(generations=generations, steps=steps, num_inference_steps=num_inference_steps,
                   guidance=guidance, seed=seed, batch_size=batch_size, truncate=truncate)
    names = [*methods, "random"]
    grid = np.linspace(0.0, 1.0, points)
    curves: dict[str, dict[str, list]] = {m: {"del": [], "ins": [], "dauc": [], "iauc": [],
                                              "top": []} for m in names}
    kept, mems, blanks, skipped = [], [], [], []
    tops: dict[str, list[str]] = {m: [] for m in methods}
    for i, prompt in enumerate(progress(prompts, desc="faithfulness curves", unit="prompt")):
        try:
            prep = _prepare(adapter, prompt, **options)
            ranked = {m: attribute(adapter, prompt, method=m, **options,
                                   **({"mode": replacement} if m == "occlusion" else {}))
                      for m in methods}
        except PromptError as e:
            skipped.append((prompt, str(e)))
            continue
        rng = np.random.default_rng([int(seed), i])
        orders = {m: [r.order()] for m, r in ranked.items()}
        orders["random"] = [rng.permutation(len(prep.units)) for _ in range(random_orders)]
        result, full, blank = _prompt_curves(adapter, prep, orders, points=points,
                                             replacement=replacement)
        if not full > 0:
            skipped.append((prompt, f"noise magnitude {full:.4g} is not positive"))
            continue
        kept.append(prompt)
        mems.append(full)
        blanks.append(blank / full)
        for m in methods:
            tops[m].append(ranked[m].top().text)
        for name, (fr, dele, ins) in result.items():
            c = curves[name]
            c["del"].append(np.interp(grid, fr, dele))
            c["ins"].append(np.interp(grid, fr, ins))
            c["dauc"].append(float(np.trapezoid(dele, fr)))
            c["iauc"].append(float(np.trapezoid(ins, fr)))
            c["top"].append(float(dele[0] - dele[1]) if len(dele) > 1 else 0.0)  # k = 0, 1
    if skipped:
        log.warning("faithfulness curves skipped %d of %d prompt(s)", len(skipped), len(prompts))

    def arr(name: str, key: str) -> np.ndarray:
        values = curves[name][key]
        return np.asarray(values, dtype=np.float64) if values else \
            np.zeros((0, points) if key in ("del", "ins") else 0)

    params = {**{k: v for k, v in options.items() if k != "batch_size"},
              "replacement": replacement, "points": points, "random_orders": random_orders}
    return FaithfulnessCurves(
        kept, names, grid, {m: arr(m, "del") for m in names}, {m: arr(m, "ins") for m in names},
        {m: arr(m, "dauc") for m in names}, {m: arr(m, "iauc") for m in names},
        {m: arr(m, "top") for m in names}, np.asarray(mems, dtype=np.float64),
        np.asarray(blanks, dtype=np.float64), tops, skipped, params)


def format_faithfulness(curves: FaithfulnessCurves) -> str:
    """The area table of :func:`faithfulness_curves` as text (deletion: lower is better;
    insertion: higher is better)."""
    n = len(curves.prompts)
    lines = [f"faithfulness on {n} prompt(s), units replaced by {curves.params['replacement']} "
             "(deletion AUC: lower is better; insertion AUC: higher is better)",
             f"{'order':<20} {'deletion':>9} {'insertion':>9} {'del<rand':>9} {'ins>rand':>9} "
             f"{'top drop':>9}"]
    for row in curves.table():
        lines.append(f"{row['order']:<20} {row['deletion_auc']:>9.3f}"
                     f" {row['insertion_auc']:>9.3f}"
                     f" {row['deletion_beats_random']:>9.2f} {row['insertion_beats_random']:>9.2f}"
                     f" {row['top_unit_drop']:>9.3f}")
    return "\n".join(lines)

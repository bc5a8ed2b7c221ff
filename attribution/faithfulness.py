"""Faithfulness of an attribution: does deleting the top-ranked unit lower the memorization score
more than deleting a random unit? (The deletion test of Petsiuk et al., BMVC 2018, "RISE",
reduced to its first step.)"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffmem.attribution.methods import attribute, occlusion
from diffmem.attribution.result import TokenAttribution
from diffmem.errors import ConfigError, PromptError
from diffmem.models import DiffusionModelAdapter
from diffmem.utils import progress

log = logging.getLogger(__name__)

__all__ = ["DeletionResult", "deletion_test"]


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
                  method: str = "gradient", generations: int = 4, steps: int = 1,
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
        Attribution method whose top unit is deleted (default ``"gradient"``).
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

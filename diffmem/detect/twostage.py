"""Two-stage detection: a cheap screen on every prompt, image comparisons for the flagged ones
plus a seeded audit sample of the rest, and a stated bound on what the screen missed.

Stage 1 scores every prompt with Wen et al.'s first-step noise magnitude ("Detecting,
Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024), batched. A prompt is
**flagged** when its modified z-score (Iglewicz & Hoaglin, 1993)

    z = 0.6745 * (x - median(x)) / MAD(x)

is above ``k`` (default 3.5, their outlier rule; :func:`screen_flags`). Stage 2 generates and
compares images only for the flagged prompts, a seeded random **audit** sample of the unflagged
ones (:func:`audit_sample`), the empty prompt and the unrelated prompts (copies that are not
bound to a prompt are found there).

The audit gives the screen an honest error bar: if ``x`` of the ``n`` audited unflagged prompts
produce copies, the missed-copy rate among all unflagged prompts is at most
:func:`clopper_pearson_upper` ``(x, n)`` at 95% confidence (one-sided exact binomial bound;
sampling without replacement from a finite population only makes it conservative). The
default audit size is the smallest ``n`` for which ``x = 0`` gives a bound of at most 15%
(:func:`audit_size_for`: 19 prompts); ``--audit 29`` buys 10%, ``--audit 59`` 5%. The default
trades the bound against cost: at 19 audited prompts a two-stage run on the 266-prompt demo
data generates about a fifth of the exhaustive run's images, and the fixed audit costs less
and less of the total as the prompt count grows.

The screen is not trusted blindly: when the audit finds *any* copy among unflagged prompts,
the screen has missed memorization it was supposed to catch and stage 2 **widens to every
prompt** (:func:`needs_widening`): the run then costs what ``--confirm all`` costs and reports
every copy. A two-stage run therefore never reports fewer memorized prompts than its audit
supports.

Examples
--------
>>> screen_flags([1.0, 1.1, 0.9, 1.0, 5.0], k=3.5).tolist()
[False, False, False, False, True]
>>> audit_size_for(0.1)
29
>>> round(clopper_pearson_upper(0, 29), 4)
0.0981
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffmem.errors import ConfigError
from diffmem.store import prompt_hash

__all__ = ["CONFIDENCE", "DEFAULT_AUDIT_BOUND", "SCREEN_K", "ScreenPlan", "audit_sample",
           "audit_size_for", "clopper_pearson_upper", "needs_widening", "plan_stage2",
           "robust_z", "screen_flags"]

#: Outlier cut of the modified z-score (Iglewicz & Hoaglin's 3.5).
SCREEN_K = 3.5
#: Missed-copy rate the default audit can bound when it finds no copy.
DEFAULT_AUDIT_BOUND = 0.15
#: Confidence of the stated bound.
CONFIDENCE = 0.95


def robust_z(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Modified z-scores ``(x - median) / (1.4826 MAD)`` (Iglewicz & Hoaglin, 1993, write it
    ``0.6745 (x - median) / MAD``); the one home of this rule (the report's noise outliers use
    it too).

    When the MAD is 0 (over half the scores tie) the standard deviation stands in; when that is
    0 too, every z is 0.

    Examples
    --------
    >>> robust_z([1.0, 2.0, 3.0]).round(4).tolist()
    [-0.6745, 0.0, 0.6745]
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return x
    med = float(np.median(x))
    scale = 1.4826 * float(np.median(np.abs(x - med)))
    if scale <= 0:
        scale = float(np.std(x))
    if scale <= 0:
        return np.zeros_like(x)
    return (x - med) / scale


def screen_flags(scores: Sequence[float] | np.ndarray, *, k: float = SCREEN_K) -> np.ndarray:
    """Stage-1 flags: noise magnitudes whose modified z-score (:func:`robust_z`) is above ``k``.

    Higher scores are more memorized, so the rule is one-sided; NaN is never flagged.
    """
    x = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(x)
    out = np.zeros(x.shape, dtype=bool)
    out[ok] = robust_z(x[ok]) > float(k)
    return out


def audit_sample(prompts: Sequence[str], n: int, *, seed: int) -> list[str]:
    """A seeded random sample of ``n`` of ``prompts`` (all of them when there are fewer).

    The prompts are put in a canonical order (by :func:`~diffmem.store.prompt_hash`) first, so
    the sample depends on the set of prompts and the seed only, not on their order.

    Examples
    --------
    >>> audit_sample(["a", "b", "c", "d"], 2, seed=0) == audit_sample(["d", "c", "b", "a"], 2,
    ...                                                                seed=0)
    True
    """
    canon = sorted(dict.fromkeys(prompts), key=prompt_hash)
    if n >= len(canon):
        return canon
    rng = np.random.default_rng([int(seed), 0x5C2EE7])
    picked = rng.choice(len(canon), size=int(n), replace=False)
    return [canon[i] for i in sorted(picked.tolist())]


def clopper_pearson_upper(copies: int, n: int, *, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper–Pearson upper bound on a binomial rate after ``copies`` successes in
    ``n`` trials: the ``confidence`` quantile of ``Beta(copies + 1, n - copies)``; 1 when
    ``copies == n`` (and when ``n == 0``: nothing was audited).

    Examples
    --------
    >>> round(clopper_pearson_upper(0, 10), 4)   # 1 - 0.05 ** (1 / 10)
    0.2589
    """
    if n <= 0 or copies >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, copies + 1, n - copies))


def audit_size_for(bound: float, *, confidence: float = CONFIDENCE) -> int:
    """Smallest audit for which finding no copy bounds the missed-copy rate by ``bound``:
    ``ceil(log(1 - confidence) / log(1 - bound))``."""
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < 1:
        raise ConfigError(f"audit bound {bound!r}; use a rate strictly between 0 and 1 (e.g. "
                          "0.1)")
    n = math.ceil(math.log(1 - confidence) / math.log(1 - bound) - 1e-12)
    while n > 1 and clopper_pearson_upper(0, n - 1, confidence=confidence) <= bound:
        n -= 1
    return n


@dataclass
class ScreenPlan:
    """Which prompts stage 2 confirms, and why.

    Attributes
    ----------
    policy : str
        ``"two-stage"`` or ``"all"`` (exhaustive).
    rule : str
        The stage-1 rule, in words.
    screened : int
        Prompts stage 1 scored.
    flagged : list of str
        Prompts stage 1 flagged.
    audit : list of str
        The audit sample of unflagged prompts.
    audit_copies : int or None
        Audited prompts with a copy (None before stage 2).
    widened : bool
        Stage 2 was widened to every prompt.
    reason : str
        Why (empty when not widened).
    """

    policy: str
    rule: str
    screened: int
    flagged: list[str] = field(default_factory=list)
    audit: list[str] = field(default_factory=list)
    audit_copies: int | None = None
    widened: bool = False
    reason: str = ""

    @property
    def unflagged(self) -> int:
        return self.screened - len(self.flagged)

    @property
    def bound(self) -> float | None:
        """Upper 95% bound on the missed-copy rate among unflagged prompts (0 when every
        unflagged prompt was confirmed, None before the audit)."""
        if self.audit_copies is None:
            return None
        if self.policy == "all" or self.widened or len(self.audit) >= self.unflagged:
            return 0.0
        return clopper_pearson_upper(self.audit_copies, len(self.audit))

    def statement(self) -> str:
        """The bound in one sentence (what ``summary.json`` and the report say)."""
        if self.policy == "all":
            return "every prompt confirmed by generation (--confirm all)"
        if self.widened:
            return f"stage 2 widened to every prompt: {self.reason}"
        b = self.bound
        if b is None:
            return "audit pending"
        if b == 0.0:
            return "every unflagged prompt was audited"
        return (f"missed-copy rate among the {self.unflagged} unflagged prompts <= {b:.1%} at "
                f"{CONFIDENCE:.0%} confidence ({self.audit_copies} copies in an audit of "
                f"{len(self.audit)}; one-sided Clopper-Pearson)")

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "rule": self.rule, "screened": self.screened,
                "flagged": len(self.flagged), "unflagged": self.unflagged,
                "audit_size": len(self.audit), "audit_copies": self.audit_copies,
                "confidence": CONFIDENCE, "missed_copy_rate_bound": self.bound,
                "widened": self.widened, "reason": self.reason,
                "statement": self.statement()}


def plan_stage2(prompts: Sequence[str], noise: Sequence[float], *, k: float = SCREEN_K,
                audit: int, seed: int) -> ScreenPlan:
    """The stage-2 plan of a two-stage run: flagged prompts and the audit sample.

    Parameters
    ----------
    prompts : sequence of str
        Every screened prompt.
    noise : sequence of float
        Their first-step noise magnitudes.
    k : float
        Modified z-score cut (:func:`screen_flags`).
    audit : int
        Audit size (unflagged prompts confirmed at random).
    seed : int
        Seed of the audit sample.
    """
    flags = screen_flags(noise, k=k)
    flagged = [p for p, f in zip(prompts, flags) if f]
    unflagged = [p for p, f in zip(prompts, flags) if not f]
    return ScreenPlan(policy="two-stage",
                      rule=f"noise magnitude modified z-score > {k:g} (median + MAD, "
                           "Iglewicz & Hoaglin)",
                      screened=len(prompts), flagged=flagged,
                      audit=audit_sample(unflagged, audit, seed=seed))


def needs_widening(plan: ScreenPlan, audit_copies: int) -> bool:
    """Record the audit's outcome; True (and the reason) when stage 2 must widen: any copy
    among the audited unflagged prompts means the screen misses memorization."""
    plan.audit_copies = int(audit_copies)
    if audit_copies > 0 and len(plan.audit) < plan.unflagged:
        plan.widened = True
        plan.reason = (f"the audit found copies for {audit_copies} of {len(plan.audit)} "
                       "unflagged prompts, so the noise screen misses memorized prompts on "
                       "this model; every prompt was confirmed by generation")
        return True
    return False

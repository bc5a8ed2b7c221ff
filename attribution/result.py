"""The result of a per-prompt attribution: :class:`TokenAttribution`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffmem.attribution.units import Unit

__all__ = ["TokenAttribution"]


@dataclass
class TokenAttribution:
    """How much each unit of a prompt drives the model's memorization signal.

    Attributes
    ----------
    prompt : str
        The prompt as given.
    units : list of Unit
        Words, de-identification markers, PHI-like spans and punctuation, in text order (special
        tokens excluded; see :func:`~diffmem.attribution.pool_tokens`).
    scores : numpy.ndarray
        float64 ``(len(units),)``; higher = the unit drives memorization more. Units of one
        method compare with each other; scales differ between methods.
    method : str
        ``"gradient"``, ``"occlusion"`` or ``"attention"`` (see
        :func:`~diffmem.attribution.list_methods`).
    memorization : float or None
        The prompt's noise-magnitude memorization score (Wen et al., 2024) under the same
        initial noises, the quantity gradient and occlusion attribute.
    tokens : list of str
        The token strings the text encoder reads, special tokens included.
    token_scores : numpy.ndarray or None
        float64 per token position, before pooling (zero for special tokens), when the method
        has them.
    params : dict
        The settings (generations, steps, seed, ...).
    details : dict
        Method-specific extras (e.g. occlusion's nearest-neighbour similarity drops).
    """

    prompt: str
    units: list[Unit]
    scores: np.ndarray
    method: str
    memorization: float | None = None
    tokens: list[str] = field(default_factory=list)
    token_scores: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.shape != (len(self.units),):
            raise ValueError(f"{len(self.units)} units but scores of shape {self.scores.shape}")

    def __len__(self) -> int:
        return len(self.units)

    @property
    def texts(self) -> list[str]:
        """The units' texts."""
        return [u.text for u in self.units]

    @property
    def shares(self) -> np.ndarray:
        """Each unit's share of the positive attribution mass (sums to 1; 0 when none)."""
        pos = np.clip(self.scores, 0.0, None)
        total = pos.sum()
        return pos / total if total > 0 else np.zeros_like(pos)

    def order(self) -> np.ndarray:
        """Unit indices from the highest score to the lowest (ties: text order)."""
        return np.lexsort((np.arange(len(self.units)), -self.scores))

    def ranked(self) -> list[tuple[Unit, float]]:
        """``(unit, score)`` pairs from the highest score to the lowest."""
        return [(self.units[i], float(self.scores[i])) for i in self.order()]

    def top(self) -> Unit:
        """The highest-scoring unit."""
        return self.units[int(self.order()[0])]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (units with their score, share and rank)."""
        ranks = np.empty(len(self.units), dtype=np.int64)
        ranks[self.order()] = np.arange(1, len(self.units) + 1)
        shares = self.shares
        return {
            "prompt": self.prompt,
            "method": self.method,
            "memorization": self.memorization,
            "units": [{**u.to_dict(), "score": float(s), "share": float(sh), "rank": int(r)}
                      for u, s, sh, r in zip(self.units, self.scores, shares, ranks)],
            "tokens": list(self.tokens),
            "token_scores": None if self.token_scores is None else
            [float(x) for x in self.token_scores],
            "params": dict(self.params),
            "details": self.details,
        }

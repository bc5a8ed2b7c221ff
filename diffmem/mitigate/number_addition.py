"""Random numbers addition, RNA (Somepalli et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any

from diffmem.mitigate._text import insert_words, text_hook
from diffmem.models import SamplingHooks

NAME = "random_number_addition"


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """RNA (Somepalli et al., NeurIPS 2023): ``strength`` random integers in
    ``[0, params["max_number"]]`` inserted at random word positions; a fresh draw per
    generation. Strength 0 leaves the prompt unchanged."""
    n, top = int(strength), int(params["max_number"])

    def transform(text, rng):
        if n == 0:
            return text
        numbers = [str(int(x)) for x in rng.integers(0, top + 1, size=n)]
        return insert_words(text, numbers, rng)

    return SamplingHooks(prompt_embeds=text_hook(adapter, transform, name=NAME, seed=seed))

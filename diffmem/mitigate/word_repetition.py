"""Caption word repetition, CWR (Somepalli et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any

from diffmem.mitigate._text import _WORD_RE, insert_words, text_hook
from diffmem.models import SamplingHooks

NAME = "caption_word_repetition"


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """CWR (Somepalli et al., NeurIPS 2023): ``strength`` random words of the prompt, each
    inserted again at a random word position; a fresh draw per generation.

    Strength 0 (and the empty prompt) leave the prompt unchanged.
    """
    n = int(strength)

    def transform(text, rng):
        words = _WORD_RE.findall(text)
        if n == 0 or not words:
            return text
        picks = [words[int(i)] for i in rng.integers(0, len(words), size=n)]
        return insert_words(text, picks, rng)

    return SamplingHooks(prompt_embeds=text_hook(adapter, transform, name=NAME, seed=seed))

"""De-identification marker removal and randomization (Dutt et al., 2025, "The Devil is in the
Prompts"): MIMIC-CXR's ``___`` markers drive memorization, so take them out of the prompt or
make them vary."""

from __future__ import annotations

from typing import Any

from diffmem.mitigate._text import MARKER_RE, text_hook, tidy, vocabulary_words
from diffmem.models import SamplingHooks


def build_removal(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """Marker removal (Dutt et al., 2025): each marker deleted with probability ``strength``.

    Strength 0, or a prompt without markers, leaves the prompt unchanged.
    """
    p = float(strength)

    def transform(text, rng):
        if p == 0 or not MARKER_RE.search(text):
            return text
        return tidy(MARKER_RE.sub(lambda m: "" if rng.random() < p else m.group(0), text))

    return SamplingHooks(prompt_embeds=text_hook(adapter, transform,
                                                 name="deid_marker_removal", seed=seed))


def build_randomization(adapter: Any, strength: float, *, params: dict,
                        seed: int) -> SamplingHooks:
    """Marker randomization (Dutt et al., 2025): each marker replaced with probability
    ``strength`` by a random whole word of the model's vocabulary.

    Strength 0, or a prompt without markers, leaves the prompt unchanged.
    """
    p = float(strength)
    words = vocabulary_words(adapter) if p > 0 else []

    def transform(text, rng):
        if p == 0 or not words or not MARKER_RE.search(text):
            return text
        return MARKER_RE.sub(lambda m: words[int(rng.integers(len(words)))]
                             if rng.random() < p else m.group(0), text)

    return SamplingHooks(prompt_embeds=text_hook(adapter, transform,
                                                 name="deid_marker_randomization", seed=seed))


BUILDERS = {"deid_marker_removal": build_removal,
            "deid_marker_randomization": build_randomization}

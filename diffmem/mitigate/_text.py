"""Shared plumbing of the text-level mitigations: change each generation's prompt (or its token
ids), re-encode it with the adapter, and hand the new embedding to sampling through the
``prompt_embeds`` hook. Rows whose text is unchanged keep their embedding untouched, so a
transform that changes nothing samples exactly like the plain pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from diffmem.data.reports import DEID_MARKER_PATTERNS
from diffmem.mitigate.registry import row_seed

#: One regex for every de-identification marker convention diffmem knows.
MARKER_RE = re.compile("|".join(f"(?:{p})" for p in DEID_MARKER_PATTERNS.values()), re.S)
_WORD_RE = re.compile(r"\S+")


def text_hook(adapter: Any, transform: Callable[[str, np.random.Generator], str], *, name: str,
              seed: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """A ``prompt_embeds`` hook that re-encodes ``transform(prompt, rng)`` for every row.

    ``rng`` is a NumPy generator seeded per generation (:func:`~diffmem.mitigate.registry.
    row_seed`), so each generation of a prompt gets its own perturbation.
    """

    def hook(cond, uncond, prompts, generators):
        texts = [transform(p, np.random.default_rng(row_seed(seed, name, g)))
                 for p, g in zip(prompts, generators)]
        changed = [i for i, (a, b) in enumerate(zip(prompts, texts)) if a != b]
        if not changed:
            return cond, uncond
        tokens = adapter.tokenize([texts[i] for i in changed])
        new = adapter.encode_tokens(tokens["input_ids"], tokens["attention_mask"])
        cond = cond.clone()
        cond[changed] = new.to(cond)
        return cond, uncond

    return hook


def insert_words(text: str, words: list[str], rng: np.random.Generator) -> str:
    """``text`` with each of ``words`` inserted at a uniformly random word boundary."""
    parts = _WORD_RE.findall(text)
    for w in words:
        parts.insert(int(rng.integers(0, len(parts) + 1)), w)
    return " ".join(parts)


def insertable_ids(adapter: Any) -> np.ndarray:
    """Token ids that random insertion may draw: the vocabulary without special tokens and
    without de-identification markers, sorted."""
    tok = adapter.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    ids = [i for t, i in tok.get_vocab().items()
           if i not in special and not MARKER_RE.search(t) and t.strip("Ġ▁") != ""]
    return np.array(sorted(ids), dtype=np.int64)


def vocabulary_words(adapter: Any) -> list[str]:
    """Whole words of the model's vocabulary (letters only, 2+ characters, not subword pieces,
    not special tokens or markers), sorted: what marker randomization draws from."""
    tok = adapter.tokenizer
    special = set(getattr(tok, "all_special_tokens", []) or [])
    words = set()
    for t in tok.get_vocab():
        if t in special or t.startswith("##"):
            continue
        w = t[:-4] if t.endswith("</w>") else t
        if len(w) >= 2 and w.isalpha() and w.isascii():
            words.add(w.lower())
    return sorted(words)


def tidy(text: str) -> str:
    """Collapse runs of spaces and drop spaces before punctuation (after a marker removal)."""
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"\s+([.,;:!?)])", r"\1", text).strip()

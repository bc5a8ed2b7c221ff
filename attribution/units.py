"""Pool a tokenizer's tokens into units a reader understands: words, de-identification markers,
PHI-like spans and punctuation (special tokens left out).

A tokenizer may cut one unit into several tokens: a BERT-style WordPiece tokenizer without marker
handling reads ``___`` as three ``_`` tokens, CLIP's BPE splits rare words into pieces and may
glue ``___`` to the next full stop (``___.</w>``). Attribution scores must be shown per unit, so
:func:`pool_tokens` cuts the prompt text into spans with
:func:`~diffmem.attribution.markers.segment` and assigns every token to the spans its character
offsets overlap. A token that straddles two
spans joins them into one unit.

Offsets are trusted only to *overlap* the right span, not to cover it: diffmem's CXR tokenizer
normalizes ``____`` to ``___`` and ``[** ... **]`` to ``[****]``, and the fast tokenizer then
reports the offset of the last character of the original span; overlap still finds the span.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any

from diffmem.attribution.markers import Span, segment
from diffmem.errors import ModelError, PromptError
from diffmem.pipelines.tokenizer import MARKER_TOKENS

__all__ = ["KIND_ORDER", "Unit", "pool_tokens", "strip_token"]

log = logging.getLogger(__name__)

#: When spans of several kinds join into one unit, the unit takes the first kind of this order
#: (and that span's key): a ``___.`` token makes a marker unit keyed ``___``.
KIND_ORDER = ("marker", "placeholder", "phi", "word", "punct")


@dataclass(frozen=True)
class Unit:
    """One unit of a prompt and the token positions it pools.

    Attributes
    ----------
    text : str
        ``prompt[start:end]``.
    start, end : int
        Character span in the prompt.
    kind : str
        ``"marker"``, ``"placeholder"``, ``"phi"``, ``"word"`` or ``"punct"``.
    key : str
        The name equal units pool under in a dataset scan (see
        :class:`~diffmem.attribution.markers.Span`).
    convention : str or None
        The marker convention or PHI pattern, when the unit is one.
    tokens : tuple of int
        Positions in the text encoder's input (0 is the start token, when the tokenizer adds
        one), the same positions as :meth:`~diffmem.models.DiffusionModelAdapter.token_strings`.
    """

    text: str
    start: int
    end: int
    kind: str
    key: str
    convention: str | None
    tokens: tuple[int, ...]

    @property
    def is_deid_marker(self) -> bool:
        """True for known de-identification markers and generic placeholders."""
        return self.kind in ("marker", "placeholder")

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end, "kind": self.kind,
                "key": self.key, "convention": self.convention, "tokens": list(self.tokens)}


def strip_token(token: str) -> str:
    """A token string without subword decorations (``##``, ``</w>``, ``Ġ``, ``▁``).

    Examples
    --------
    >>> [strip_token(t) for t in ["##ing", "lung</w>", "\u0120the", "\u2581x"]]
    ['ing', 'lung', 'the', 'x']
    """
    if token.startswith("##"):
        token = token[2:]
    if token.endswith("</w>"):
        token = token[:-4]
    return token.lstrip("\u0120\u2581")


def pool_tokens(prompt: str, tokenizer: Any, *, max_length: int | None = None,
                truncate: bool = False) -> tuple[list[Unit], list[str]]:
    """Units of ``prompt`` and the tokens each pools, for any fast (offset-reporting) tokenizer.

    Parameters
    ----------
    prompt : str
    tokenizer : transformers tokenizer
        A fast tokenizer (``is_fast``), e.g. the model adapter's ``tokenizer``.
    max_length : int, optional
        Tokens the text encoder reads (the adapter's ``max_length``); default: the tokenizer's
        ``model_max_length``.
    truncate : bool, optional
        What to do with a prompt longer than ``max_length`` tokens: False (default) raises
        :class:`~diffmem.errors.PromptError`; True keeps the units the encoder reads, as the
        pipeline does when it truncates.

    Returns
    -------
    units : list of Unit
        In text order; special tokens (start, end, padding) belong to no unit.
    tokens : list of str
        The token strings the encoder reads, special tokens included (position ``i`` is
        position ``i`` of the text embeddings).

    Raises
    ------
    PromptError
        For an empty prompt, or one longer than ``max_length`` tokens when ``truncate`` is
        False (the message gives both lengths).
    ModelError
        For a slow tokenizer, which cannot report character offsets.

    Examples
    --------
    >>> from diffmem.models.tiny import tiny_clip_tokenizer
    >>> units, tokens = pool_tokens("Dr. ___ was notified at ___.", tiny_clip_tokenizer())
    >>> [(u.text, u.kind, len(u.tokens)) for u in units]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('Dr', 'word', 1), ('.', 'punct', 1), ('___', 'marker', 1), ('was', 'word', 1),
     ('notified', 'word', 3), ('at', 'word', 1), ('___.', 'marker', 1)]
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"prompt {prompt!r} is empty; give a non-empty prompt text")
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"tokenizer {type(tokenizer).__name__} cannot report character offsets,"
                         " which pooling tokens into words needs; save the model with a fast "
                         "(tokenizers-backed) tokenizer")
    limit = int(max_length if max_length is not None else tokenizer.model_max_length)
    n_full = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
    if n_full > limit and not truncate:
        raise PromptError(f"prompt has {n_full} tokens but the text encoder reads {limit} "
                          f"(special tokens included); shorten it (e.g. to its first sentences), "
                          f"or attribute the part it reads with truncate=True (--truncate): "
                          f"{prompt[:60]!r}...")
    enc = tokenizer(prompt, truncation=True, max_length=limit, return_offsets_mapping=True,
                    return_special_tokens_mask=True, verbose=False)
    ids = list(enc["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    spans = segment(prompt)
    starts = [s.start for s in spans]

    # 1. the spans each token overlaps (a token over whitespace only takes the nearest span)
    parent = list(range(len(spans)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for pos, ((a, b), special) in enumerate(zip(enc["offset_mapping"],
                                                enc["special_tokens_mask"])):
        if b <= a or not spans:  # special tokens (and zero-width ones) have empty offsets
            continue
        hit = _overlapping(spans, starts, a, b)
        if not hit:
            if special:
                continue
            hit = [_nearest(spans, starts, a)]
        for j in hit[1:]:
            parent[find(j)] = find(hit[0])
        owner[pos] = hit[0]

    # 2. one unit per group of joined spans that received a token
    members: dict[int, list[int]] = {}
    for pos, j in owner.items():
        members.setdefault(find(j), []).append(pos)
    groups: dict[int, list[Span]] = {}
    for j, span in enumerate(spans):
        groups.setdefault(find(j), []).append(span)
    units = []
    for root, positions in members.items():
        parts = groups[root]
        lead = min(parts, key=lambda s: (KIND_ORDER.index(s.kind), s.start))
        start, end = min(s.start for s in parts), max(s.end for s in parts)
        key = lead.key if len(parts) == 1 or lead.kind != "word" else prompt[start:end].casefold()
        units.append(Unit(prompt[start:end], start, end, lead.kind, key, lead.convention,
                          tuple(sorted(positions))))
    units.sort(key=lambda u: u.start)

    # 3. cross-check by token strings: a token that *is* a marker must sit in a marker unit
    for u in units:
        if u.kind not in ("marker", "placeholder") and any(
                strip_token(tokens[i]) in MARKER_TOKENS for i in u.tokens):
            log.warning("token offsets of %s look misaligned: a marker token landed in the %s "
                        "unit %r of %r", type(tokenizer).__name__, u.kind, u.text, prompt[:60])
    return units, tokens


def _overlapping(spans: list[Span], starts: list[int], a: int, b: int) -> list[int]:
    """Indices of the spans that overlap the character range ``[a, b)``."""
    j = bisect.bisect_right(starts, a) - 1
    out = []
    for k in range(max(j, 0), len(spans)):
        if spans[k].start >= b:
            break
        if spans[k].end > a:
            out.append(k)
    return out


def _nearest(spans: list[Span], starts: list[int], a: int) -> int:
    j = bisect.bisect_right(starts, a)
    return min(j, len(spans) - 1)

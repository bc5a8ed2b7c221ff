"""Model-free detection of de-identification markers, placeholder-like tokens and residual PHI-like
text in prompts, and the segmentation of a prompt into units (words, markers, ...).

Dutt et al. (2025, "The Devil is in the Prompts") found MIMIC-CXR's de-identification marker
``___`` to be the prompt token that drives memorization most. This module finds such tokens
without a model, in three families:

* **known marker conventions** (:data:`MARKER_CONVENTIONS`): MIMIC-CXR ``___``, IU X-ray /
  Open-i ``XXXX``, MIMIC-III ``[** ... **]`` (these three share their patterns with
  :data:`diffmem.data.reports.DEID_MARKER_PATTERNS`), and tag placeholders such as ``<PERSON>``
  (Presidio / i2b2 style) and ``[NAME]``;
* **generic placeholders** (:data:`PLACEHOLDER_DETECTORS`), for conventions nobody listed:
  runs of one mask symbol (``***``, ``###``, ``@@@``), runs of a mask letter (``XXX``,
  ``ZZZZ``, ``yyyy``), masks with separators (``XX/XX/XXXX``, ``###-##-####``) and upper-case
  tags in any other delimiters (``{{PATIENT}}``, ``<<NAME>>``, ``**SITE**``);
* **residual PHI-like text** (:data:`PHI_PATTERNS`): dates, times, phone numbers, e-mail
  addresses, long identifier numbers and capitalized names after ``Dr.``/``Mr.``/``Ms.``/``Mrs.``.

Each match becomes one :class:`Span` with a ``key`` that pools equivalent matches (every
``[** ... **]`` is ``"[** **]"``; every time of day is ``"<phi:time>"``, so no residual PHI is
copied into a scan's outputs). :func:`segment` cuts a whole prompt into such spans plus words and
punctuation; :mod:`diffmem.attribution.units` maps a tokenizer's tokens onto them.

Examples
--------
>>> [(s.text, s.kind, s.key) for s in segment("Dr. ___ called at 10:30 a.m.")]
... # doctest: +NORMALIZE_WHITESPACE
[('Dr', 'word', 'dr'), ('.', 'punct', '.'), ('___', 'marker', '___'),
 ('called', 'word', 'called'), ('at', 'word', 'at'), ('10:30 a.m.', 'phi', '<phi:time>')]
>>> [s.key for s in find_markers("Seen by {{PHYSICIAN}} on ZZZZ.")]
['{{PHYSICIAN}}', 'ZZZZ']
"""

from __future__ import annotations

import bisect
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from diffmem.data.reports import DEID_MARKER_PATTERNS

__all__ = [
    "DEID_KINDS",
    "MARKER_CONVENTIONS",
    "PHI_PATTERNS",
    "PLACEHOLDER_DETECTORS",
    "Detector",
    "MarkerTally",
    "Span",
    "find_markers",
    "marker_summary",
    "segment",
    "split_pieces",
]

#: Span kinds that count as de-identification markers (``is_deid_marker`` in a scan).
DEID_KINDS = frozenset({"marker", "placeholder"})


@dataclass(frozen=True)
class Detector:
    """One pattern of marker, placeholder or PHI-like text.

    Attributes
    ----------
    name : str
        The convention, e.g. ``"mimic-cxr"`` or ``"generic:symbol-run"``.
    kind : str
        ``"marker"`` (a known de-identification convention), ``"placeholder"`` (found by the
        generic detector) or ``"phi"`` (residual PHI-like text).
    pattern : re.Pattern
        What it matches; when the pattern has a group named ``span``, only that group is the
        match (a name after ``Dr.``).
    key : callable
        ``key(matched_text) -> str``: the name matches are pooled under.
    description : str
    """

    name: str
    kind: str
    pattern: re.Pattern
    key: Callable[[str], str]
    description: str


@dataclass(frozen=True)
class Span:
    """A piece of a prompt: a marker, placeholder, PHI-like text, word or punctuation.

    Attributes
    ----------
    start, end : int
        Character offsets in the prompt (``prompt[start:end] == text``).
    text : str
    kind : str
        ``"marker"``, ``"placeholder"``, ``"phi"``, ``"word"`` or ``"punct"``.
    key : str
        The name equivalent spans pool under: the canonical marker (``"___"``,
        ``"[** **]"``), a PHI class (``"<phi:date>"``), or the lower-cased word.
    convention : str or None
        The detector's name for markers, placeholders and PHI; None for words and punctuation.
    """

    start: int
    end: int
    text: str
    kind: str
    key: str
    convention: str | None = None

    @property
    def is_deid_marker(self) -> bool:
        """True for known markers and generic placeholders."""
        return self.kind in DEID_KINDS


def _const(value: str) -> Callable[[str], str]:
    return lambda _text: value


def _upper(text: str) -> str:
    return text.upper()


def _symbol_run_key(text: str) -> str:
    return text[0] * 3


_MONTHS = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
           r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_TAG_BODY = r"[A-Z][A-Z0-9_]*(?:[ -][A-Z0-9_]+)*"
# Symbols that are ordinary prose punctuation when repeated ("...", "--", "==" rules): never
# taken for a mask by the generic symbol-run detector.
_PROSE_SYMBOLS = ".,;:!'\"()-="

#: Known de-identification conventions, each always one unit. The first three share their
#: patterns with :data:`diffmem.data.reports.DEID_MARKER_PATTERNS`.
MARKER_CONVENTIONS: tuple[Detector, ...] = (
    Detector("mimic-cxr", "marker", re.compile(DEID_MARKER_PATTERNS["___"]), _const("___"),
             "MIMIC-CXR: three or more underscores replace names, dates and times"),
    Detector("openi", "marker", re.compile(DEID_MARKER_PATTERNS["XXXX"]), _const("XXXX"),
             "IU X-ray / Open-i: XXXX replaces any de-identified word"),
    Detector("mimic-iii", "marker", re.compile(DEID_MARKER_PATTERNS["[** **]"], re.S),
             _const("[** **]"), "MIMIC-II/III notes: [** category number **] surrogates"),
    Detector("angle-tag", "marker", re.compile(rf"<{_TAG_BODY}>"), _upper,
             "entity tags in angle brackets (Presidio, i2b2 style): <PERSON>, <DATE_TIME>"),
    Detector("bracket-tag", "marker", re.compile(rf"\[{_TAG_BODY}\]"), _upper,
             "entity tags in square brackets: [NAME], [DATE], [REDACTED]"),
)

#: The generic detector: placeholder-like tokens of conventions not listed above.
PLACEHOLDER_DETECTORS: tuple[Detector, ...] = (
    Detector("generic:symbol-run", "placeholder",
             re.compile(r"([^\w\s" + re.escape(_PROSE_SYMBOLS) + r"])\1{2,}"), _symbol_run_key,
             "a run of three or more of one mask symbol (***, ###, @@@, ~~~)"),
    Detector("generic:letter-mask", "placeholder",
             re.compile(r"(?<![^\W_])([XYZxyz])\1{2,}(?![^\W_])"), lambda t: t,
             "a standalone run of one mask letter (XXX, ZZZZ, yyyy)"),
    Detector("generic:separated-mask", "placeholder",
             re.compile(r"(?<![^\W_])[Xx#*]{1,4}(?:[-/.:][Xx#*]{1,4})+(?![^\W_])"), _upper,
             "a mask with separators (XX/XX/XXXX, ###-##-####)"),
    Detector("generic:delimited-tag", "placeholder",
             re.compile(r"(\{\{|\{|<<|\[\[|\*\*|##|@@|%%|%|\$)\s*" + _TAG_BODY
                        + r"\s*(\}\}|\}|>>|\]\]|\*\*|##|@@|%%|%|\$)"), _upper,
             "an upper-case tag in other delimiters ({{PATIENT}}, <<NAME>>, **SITE**, %DATE%)"),
)

#: Residual PHI-like text: what de-identification should have removed.
PHI_PATTERNS: tuple[Detector, ...] = (
    Detector("date", "phi", re.compile(
        r"\b(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})|\d{4}-\d{1,2}-\d{1,2})\b"
        rf"|\b{_MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?\b"
        rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTHS}\b(?:,?\s+\d{{4}})?"
        rf"|\b{_MONTHS}\s+\d{{4}}\b"), _const("<phi:date>"),
        "dates: 3/14/2150, 2150-03-14, March 14, 14 March 2150"),
    Detector("time", "phi", re.compile(
        r"\b\d{1,2}:\d{2}(?::\d{2})?(?:\s*[AaPp]\.?\s?[Mm]\b\.?)?"
        r"|\b\d{1,2}\s*[AaPp]\.?[Mm]\b\.?|\b\d{4}\s*(?:hours|hrs)\b"), _const("<phi:time>"),
        "times of day: 10:30, 2:10 a.m., 5 PM, 1430 hours"),
    Detector("phone", "phi", re.compile(r"(?:\(\d{3}\)\s*|\b\d{3}[-.\s])\d{3}[-.]\d{4}\b"),
             _const("<phi:phone>"), "phone numbers: (617) 555-0100, 617-555-0100"),
    Detector("email", "phi", re.compile(r"\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+\b"),
             _const("<phi:email>"), "e-mail addresses"),
    Detector("id-number", "phi", re.compile(r"(?<!\d)(?<!\d[.,])\d{7,}(?!\d|[.,]\d)"),
             _const("<phi:id-number>"), "numbers of seven or more digits (record numbers)"),
    Detector("name", "phi", re.compile(
        r"\b(?:Dr|Drs|Mr|Mrs|Ms|Miss|Prof)\.?\s+(?P<span>[A-Z](?:[a-z]|'[A-Z])[A-Za-z'-]*)"),
        _const("<phi:name>"), "a capitalized name after Dr./Mr./Mrs./Ms./Miss/Prof."),
)

_DETECTORS = MARKER_CONVENTIONS + PLACEHOLDER_DETECTORS + PHI_PATTERNS
_PRIORITY = {d.name: i for i, d in enumerate(_DETECTORS)}
_CLOSERS = {"{{": "}}", "{": "}", "<<": ">>", "[[": "]]", "**": "**", "##": "##", "@@": "@@",
            "%%": "%%", "%": "%", "$": "$"}
_SEPARATED_MIN_MASK = 4
# Words (letters and digits, with inner apostrophes), decimal numbers, then runs of one
# punctuation symbol.
_WORD_RE = re.compile(r"\d+(?:\.\d+)+|[^\W_]+(?:['\u2019][^\W_]+)*|([^\w\s]|_)\1*")


def _accept(detector: Detector, match: re.Match) -> bool:
    text = match.group(0)
    if detector.name == "generic:delimited-tag":
        return _CLOSERS[match.group(1)] == match.group(2)
    if detector.name == "generic:separated-mask":
        return sum(c in "Xx#*" for c in text) >= _SEPARATED_MIN_MASK
    return True


def _candidates(text: str, detectors: Iterable[Detector]) -> list[Span]:
    found = []
    for det in detectors:
        for m in det.pattern.finditer(text):
            if not _accept(det, m):
                continue
            start, end = m.span("span") if "span" in det.pattern.groupindex else m.span()
            if end > start:
                matched = text[start:end]
                found.append(Span(start, end, matched, det.kind, det.key(matched), det.name))
    return found


def find_markers(text: str, *, kinds: Iterable[str] = ("marker", "placeholder", "phi"),
                 ) -> list[Span]:
    """Markers, generic placeholders and PHI-like spans of ``text``, in text order.

    Overlapping matches are resolved longest first (``XX/XX/XXXX`` beats the ``XXXX`` in it, a
    ``[** 2150-1-1 **]`` marker beats the date in it), then by detector order (known
    conventions before generic placeholders before PHI), so each character belongs to at most
    one span.

    Parameters
    ----------
    text : str
    kinds : iterable of str, optional
        Which families to look for: ``"marker"``, ``"placeholder"``, ``"phi"``.

    Returns
    -------
    list of Span

    Examples
    --------
    >>> [(s.key, s.convention) for s in find_markers("At [** Hospital 3 **] XXXX, ___.")]
    [('[** **]', 'mimic-iii'), ('XXXX', 'openi'), ('___', 'mimic-cxr')]
    >>> [s.text for s in find_markers("Called Dr. Smith at 617-555-0100.", kinds=["phi"])]
    ['Smith', '617-555-0100']
    """
    kinds = set(kinds)
    cands = _candidates(text, (d for d in _DETECTORS if d.kind in kinds))
    cands.sort(key=lambda s: (-(s.end - s.start), _PRIORITY[s.convention], s.start))
    # taken spans, kept sorted and non-overlapping: one bisection per candidate (a 1 MB prompt
    # with thousands of matches stays linear-logarithmic)
    starts: list[int] = []
    taken: list[Span] = []
    for span in cands:
        i = bisect.bisect_right(starts, span.start)
        if (i == 0 or taken[i - 1].end <= span.start) and \
                (i == len(taken) or span.end <= taken[i].start):
            starts.insert(i, span.start)
            taken.insert(i, span)
    return taken


def segment(text: str) -> list[Span]:
    """Cut ``text`` into spans covering every non-space character.

    Markers, generic placeholders and PHI-like text (:func:`find_markers`) are one span each;
    the rest splits into words (letters and digits, inner apostrophes kept, decimals whole) and
    runs of one punctuation symbol.

    Parameters
    ----------
    text : str

    Returns
    -------
    list of Span
        In text order, non-overlapping. Words have kind ``"word"`` and their lower-cased text
        as key; punctuation has kind ``"punct"``.

    Examples
    --------
    >>> [s.text for s in segment("IV-line, pt's 2.5 cm ____ nodule...")]
    ['IV', '-', 'line', ',', "pt's", '2.5', 'cm', '____', 'nodule', '...']
    """
    spans: list[Span] = []
    pos = 0
    for marker in find_markers(text) + [None]:
        end = len(text) if marker is None else marker.start
        for m in _WORD_RE.finditer(text, pos, end):
            word = m.group(0)
            kind = "punct" if m.group(1) else "word"
            spans.append(Span(m.start(), m.end(), word, kind,
                              word if kind == "punct" else word.casefold()))
        if marker is not None:
            spans.append(marker)
            pos = marker.end
    return spans


# A sentence end no detector reaches across: two lower-case letters and a full stop (not the
# title of a name, which the name pattern reads with the name), spaces, then a capitalized word.
_PIECE_BREAK = re.compile(r"(?<=[a-z]{2}[.?!])(?<!\bMrs\.)(?<!\bDrs\.)(?<!\bMiss\.)"
                          r"(?<!\bProf\.)\s+(?=[A-Z][a-z])")


def split_pieces(text: str) -> list[str]:
    """Cut ``text`` at sentence ends into pieces that :func:`segment` cuts the same way alone.

    Every detector and the word pattern stop at such a break, so the units of ``text`` are the
    units of its pieces one after another (offsets aside); a scan segments each distinct piece
    once. A text with a MIMIC-III ``[**`` (whose surrogates may hold anything) is one piece.

    Parameters
    ----------
    text : str

    Returns
    -------
    list of str

    Examples
    --------
    >>> split_pieces("Small effusion. Dr. Smith was called at 10:30 a.m. Mrs. Jones agreed.")
    ['Small effusion.', 'Dr. Smith was called at 10:30 a.m. Mrs. Jones agreed.']
    """
    if "[**" in text:
        return [text]
    return _PIECE_BREAK.split(text)


def marker_summary(prompts: Sequence[str], *, examples: int = 3) -> dict[str, Any]:
    """Counts of every marker convention, generic placeholder and PHI pattern in ``prompts``.

    Parameters
    ----------
    prompts : sequence of str
    examples : int, optional
        How many distinct matched keys to list per convention. PHI-like matches are listed by
        class only (their text is never copied out).

    Returns
    -------
    dict
        ``{"markers": {...}, "placeholders": {...}, "phi": {...}}``, each mapping a detector
        name to ``{"description", "occurrences", "prompts", "rate", "keys"}`` (``keys``: the
        most frequent pooled names with their counts); detectors that found nothing are left
        out.

    Examples
    --------
    >>> s = marker_summary(["Dr. ___ at ___.", "Seen XXXX.", "No change."])
    >>> s["markers"]["mimic-cxr"]["occurrences"], s["markers"]["openi"]["prompts"]
    (2, 1)
    """
    tally = MarkerTally()
    for prompt in prompts:
        tally.add(find_markers(prompt))
    return tally.summary(len(prompts), examples=examples)


class MarkerTally:
    """Running counts behind :func:`marker_summary`, for prompts seen one at a time (or once
    per distinct prompt, with its number of copies).

    Examples
    --------
    >>> tally = MarkerTally()
    >>> tally.add(find_markers("Dr. ___ at ___."), count=3)
    >>> tally.summary(4)["markers"]["mimic-cxr"]["occurrences"]
    6
    """

    def __init__(self) -> None:
        self.occurrences: Counter[str] = Counter()
        self.with_prompt: Counter[str] = Counter()
        self.keys: dict[str, Counter[str]] = defaultdict(Counter)

    def add(self, found: Iterable[Span], count: int = 1) -> None:
        """Count the marker, placeholder and PHI spans ``found`` in one prompt that occurs
        ``count`` times (spans of other kinds are ignored)."""
        names = set()
        for span in found:
            if span.convention is None:
                continue
            self.occurrences[span.convention] += count
            self.keys[span.convention][span.key] += count
            names.add(span.convention)
        for name in names:
            self.with_prompt[name] += count

    def summary(self, n_prompts: int, *, examples: int = 3) -> dict[str, Any]:
        """What :func:`marker_summary` returns, for ``n_prompts`` prompts in all."""
        n = max(int(n_prompts), 1)
        out: dict[str, Any] = {"markers": {}, "placeholders": {}, "phi": {}}
        group = {"marker": "markers", "placeholder": "placeholders", "phi": "phi"}
        for det in _DETECTORS:
            if not self.occurrences[det.name]:
                continue
            out[group[det.kind]][det.name] = {
                "description": det.description,
                "occurrences": int(self.occurrences[det.name]),
                "prompts": int(self.with_prompt[det.name]),
                "rate": self.with_prompt[det.name] / n,
                "keys": dict(self.keys[det.name].most_common(max(int(examples), 1))),
            }
        return out

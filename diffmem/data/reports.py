"""Radiology reports in the MIMIC-CXR style: read them strictly, split them into sections and
pick the text a model is conditioned on.

A MIMIC-CXR report is free text with uppercase section headers at the start of a line, each
followed by a colon (``FINDINGS:``, ``IMPRESSION:``...); a section's text may start on the
header's line and continue on the following lines. A ``FINAL REPORT`` line (no colon) opens the
signed report, and a preliminary ``WET READ:`` may come before it, above a line of underscores.
De-identification markers (MIMIC's ``___``, Open-I's ``XXXX``, the older ``[** ... **]``) are
kept verbatim: they are exactly what memorization studies need to see.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from diffmem.errors import ConfigError, DataError

PROMPT_SECTIONS = ("impression", "findings", "both", "full")

#: Regular expressions of de-identification markers, by convention: MIMIC-CXR's ``___``,
#: Open-I / IU X-ray's ``XXXX`` and the MIMIC-II style ``[** ... **]``.
DEID_MARKER_PATTERNS: dict[str, str] = {
    "___": r"_{3,}",
    "XXXX": r"(?<![A-Za-z])X{4,}(?![A-Za-z])",
    "[** **]": r"\[\*\*.*?\*\*\]",
}
_DEID_RE = re.compile("|".join(f"(?:{p})" for p in DEID_MARKER_PATTERNS.values()))

# A header: optional indent, an uppercase word (letters, digits after the first letter, spaces
# and a little punctuation), then a colon. "WET READ:", "CLINICAL HISTORY:",
# "RECOMMENDATION(S):" match; "3:59 PM", "Dr. ___:" and lower-case text do not.
_HEADER_RE = re.compile(r"^\s*([A-Z][A-Z0-9 /()&,'-]{0,60}?)\s*:(.*)$")
# A header line without a colon that opens the signed report or an addendum.
_BANNER_RE = re.compile(r"^\s*(FINAL REPORT|FINAL ADDENDUM|ADDENDUM|PRELIMINARY REPORT)\s*$")
# The line of underscores MIMIC puts between a wet read and the final report.
_RULE_RE = re.compile(r"^\s*_{10,}\s*$")
_SPACE_RE = re.compile(r"\s+")

# Spelling variants folded into one section name.
_ALIASES = {"impressions": "impression", "finding": "findings"}


def read_report(path: str | os.PathLike) -> str:
    """Read a report file as strict UTF-8 (a leading byte-order mark is dropped).

    Parameters
    ----------
    path : path
        The ``.txt`` report.

    Returns
    -------
    str
        The text, unchanged (no characters replaced, markers kept).

    Raises
    ------
    DataError
        When the file is missing or unreadable, or is not valid UTF-8 (the message gives the
        byte offset and how to re-encode the file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError("report file not found; every study folder needs its report "
                        "(<study>.txt), or use --on-error skip to leave such studies out",
                        path=path) from None
    except OSError as e:
        raise DataError(f"cannot read report: {e.strerror}", path=path) from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 4]
        raise DataError(
            f"report is not valid UTF-8 (byte {bad!r} at offset {e.start}); diffmem does not "
            "guess encodings or replace characters: re-encode the file, e.g. "
            "`iconv -f latin1 -t utf-8`, or use --on-error skip", path=path) from None


def _section_name(header: str) -> str:
    name = _SPACE_RE.sub(" ", header.strip().lower()).replace(" ", "_")
    return _ALIASES.get(name, name)


def parse_sections(report: str) -> dict[str, str]:
    """Split a MIMIC-style report into its sections.

    Parameters
    ----------
    report : str
        The report text.

    Returns
    -------
    dict of str to str
        Section name (lower case, spaces as ``_``: ``"impression"``, ``"wet_read"``,
        ``"final_report"``...) to its text with whitespace collapsed to single spaces, in the
        order the sections first appear. Text before any header is under ``"preamble"``; a
        section that appears twice (an addendum repeating ``IMPRESSION:``) has its parts joined
        by a space. ``IMPRESSIONS`` is read as ``impression`` and ``FINDING`` as ``findings``.

    Examples
    --------
    >>> text = '''                 FINAL REPORT
    ...  EXAMINATION:  CHEST (PA AND LAT)
    ...  INDICATION:  ___F with cough
    ...  FINDINGS:
    ...  No focal consolidation.  Heart size
    ...  is normal.
    ...  IMPRESSION:  No acute process.'''
    >>> parse_sections(text)["findings"]
    'No focal consolidation. Heart size is normal.'
    >>> list(parse_sections(text))
    ['final_report', 'examination', 'indication', 'findings', 'impression']
    """
    parts: dict[str, list[str]] = {}
    current = "preamble"
    for line in report.splitlines():
        if _RULE_RE.match(line):
            current = "preamble" if current == "preamble" else "_rule"
            continue
        banner = _BANNER_RE.match(line)
        if banner:
            current = _section_name(banner.group(1))
            parts.setdefault(current, [])
            continue
        header = _HEADER_RE.match(line)
        if header:
            current = _section_name(header.group(1))
            parts.setdefault(current, []).append(header.group(2))
            continue
        parts.setdefault(current, []).append(line)
    out = {}
    for name, lines in parts.items():
        if name == "_rule":
            continue
        out[name] = _SPACE_RE.sub(" ", " ".join(lines)).strip()
    return out


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return _SPACE_RE.sub(" ", text).strip()


def extract_prompt(report: str, section: str = "impression", *,
                   source: str | os.PathLike | None = None) -> str:
    """The text a model is conditioned on, taken from a report.

    Parameters
    ----------
    report : str
        The report text.
    section : {"impression", "findings", "both", "full"}
        ``"impression"`` (default): the IMPRESSION, or the FINDINGS when there is no
        impression. ``"findings"``: the FINDINGS, or the IMPRESSION when there are no findings.
        ``"both"``: FINDINGS then IMPRESSION (whichever exist). ``"full"``: the whole report,
        without the underscore rule lines.
    source : path, optional
        The report's file, named in errors.

    Returns
    -------
    str
        The prompt, whitespace collapsed to single spaces; de-identification markers
        (``___``, ``XXXX``, ``[** ... **]``) kept verbatim.

    Raises
    ------
    ConfigError
        For an unknown ``section``.
    DataError
        When the prompt would be empty (neither section present, or present but blank).

    Examples
    --------
    >>> extract_prompt("FINDINGS: Lungs clear.\\nIMPRESSION: No change since ___.")
    'No change since ___.'
    >>> extract_prompt("FINDINGS:  Lungs\\n   clear.", "impression")
    'Lungs clear.'
    >>> extract_prompt("FINDINGS: Lungs clear.\\nIMPRESSION: Normal.", "both")
    'Lungs clear. Normal.'
    """
    if section not in PROMPT_SECTIONS:
        raise ConfigError(f"unknown prompt section {section!r}; choose one of "
                          f"{list(PROMPT_SECTIONS)}")
    if section == "full":
        text = normalize_whitespace(" ".join(ln for ln in report.splitlines()
                                             if not _RULE_RE.match(ln)))
        wanted = "the report"
    else:
        sections = parse_sections(report)
        impression = sections.get("impression", "")
        findings = sections.get("findings", "")
        if section == "impression":
            text = impression or findings
        elif section == "findings":
            text = findings or impression
        else:
            text = " ".join(t for t in (findings, impression) if t)
        wanted = "an IMPRESSION or FINDINGS section with text"
    if not text:
        raise DataError(
            f"empty prompt: the report has no {wanted} (prompt section {section!r}); choose "
            "another --prompt-section (e.g. 'full'), fix the report, or use --on-error skip",
            path=source)
    return text


def count_deid_markers(text: str) -> int:
    """Number of de-identification markers in ``text`` (see :data:`DEID_MARKER_PATTERNS`).

    Examples
    --------
    >>> count_deid_markers("Compared to ___ at ___ and [** 2150-1-1 **], XXXX.")
    4
    """
    return len(_DEID_RE.findall(text))

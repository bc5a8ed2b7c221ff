"""Prompts files, read in one place for the whole package (``diffmem detect --prompts`` and
``diffmem scan``).

A prompts file is a ``.csv`` table or a ``.jsonl`` file (one JSON object a line) whose
``prompt`` (or ``text``, ``caption``) column holds the prompts, or, with any other suffix, a
UTF-8 text file with one prompt a line. :func:`iter_prompts` streams ``(line number, prompt)``
pairs without holding the file in memory; :func:`read_prompts` lists the unique non-empty
prompts in order.

Examples
--------
>>> import tempfile, pathlib
>>> f = pathlib.Path(tempfile.mkdtemp()) / "prompts.jsonl"
>>> _ = f.write_text('{"prompt": "No acute process."}\\n\\n{"prompt": " Small effusion. "}\\n')
>>> list(iter_prompts(f))
[(1, 'No acute process.'), (3, 'Small effusion.')]
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from diffmem.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["PROMPT_COLUMNS", "TABLE_SUFFIXES", "check_prompt", "given_prompts", "iter_prompts",
           "read_prompts", "table_columns"]

#: Column names that hold the prompts of a table, in order of preference.
PROMPT_COLUMNS = ("prompt", "text", "caption")
#: Suffixes read as tables; any other file holds one prompt a line.
TABLE_SUFFIXES = (".csv", ".jsonl")
_BOM = b"\xef\xbb\xbf"


def iter_prompts(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Stream the prompts of a prompts file as ``(line number, prompt)`` pairs.

    Prompts come in file order with surrounding whitespace removed; blank ones are yielded as
    ``""`` (so callers can count them), except the blank lines of a table. Repeats are kept.

    Parameters
    ----------
    path : path
        A ``.csv`` or ``.jsonl`` table with a ``prompt``, ``text`` or ``caption`` column (the
        first found), or a text file with one prompt a line. UTF-8; a byte-order mark is
        ignored.

    Yields
    ------
    line : int
        1-based line of the prompt (of its row's end for a CSV row that spans lines).
    prompt : str

    Raises
    ------
    DataError
        When the file cannot be read, a line is not valid UTF-8 (the message names the line and
        the byte), a JSONL line is not a JSON object, or a table has no prompt column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _csv_prompts(path)
    elif suffix == ".jsonl":
        yield from _jsonl_prompts(path)
    else:
        for n, line in _lines(path):
            yield n, line.strip()


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a prompts file (see :func:`iter_prompts`), in order, without empty ones or
    repeats.

    Surrounding whitespace and a UTF-8 byte-order mark are removed; empty prompts are skipped
    and repeated prompts kept once (both counted in a log message).

    Raises
    ------
    DataError
        When the file cannot be read, a line is not valid UTF-8 (the message names the line and
        the byte), or no prompt is left.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "prompts.txt"
    >>> _ = f.write_text("No acute process.\\n\\nSmall effusion.\\nNo acute process.\\n")
    >>> read_prompts(f)
    ['No acute process.', 'Small effusion.']
    """
    prompts, empty, repeated, seen = [], 0, 0, set()
    for _, text in iter_prompts(path):
        if not text:
            empty += 1
        elif text in seen:
            repeated += 1
        else:
            seen.add(text)
            prompts.append(text)
    if empty or repeated:
        log.info("%s: %d prompt(s); skipped %d empty line(s) and %d repeated prompt(s)",
                 path, len(prompts), empty, repeated)
    if not prompts:
        raise DataError("holds no prompt (only empty lines); write one prompt per line",
                        path=Path(path))
    return prompts


def given_prompts(prompts: str | os.PathLike | Iterable[str]) -> list[str]:
    """The prompts a command was given: a prompts file (:func:`read_prompts`) or a list of
    strings (stripped; empty ones and repeats dropped).

    Raises
    ------
    DataError
        As :func:`read_prompts`, or for a list with no non-empty prompt.

    Examples
    --------
    >>> given_prompts([" No change. ", "", "No change.", "Small effusion."])
    ['No change.', 'Small effusion.']
    """
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    listed = [p for p in dict.fromkeys(str(p).strip() for p in prompts) if p]
    if not listed:
        raise DataError("no prompt given (the list is empty or holds only empty strings)")
    return listed


def table_columns(path: str | os.PathLike) -> list[str]:
    """Column names of a ``.csv`` table (its header) or a ``.jsonl`` file (the keys of its
    first object); ``[]`` for an empty table.

    Raises
    ------
    DataError
        As :func:`iter_prompts`, and for a suffix that is not a table's.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"not a table (suffix {path.suffix!r}); use .csv or .jsonl", path=path)
    lines = _lines(path, keep_ends=True)
    if suffix == ".csv":
        return next(csv.reader(text for _, text in lines), [])
    for n, line in lines:
        if line.strip():
            return list(_json_object(path, n, line))
    return []


def check_prompt(text: str, where: str, *, path: str | os.PathLike | None = None) -> None:
    """Refuse a prompt with a NUL byte (a binary file or a broken export), naming ``where``.

    Raises
    ------
    DataError
    """
    if "\x00" in text:
        raise DataError(f"{where} holds a NUL byte (\\x00), which no report text has: is this a "
                        "binary file? Give a UTF-8 text file with one prompt per line (or strip "
                        "the NUL bytes, e.g. tr -d '\\000')", path=path)


def _lines(path: Path, *, keep_ends: bool = False) -> Iterator[tuple[int, str]]:
    """Decoded lines of a UTF-8 file, streamed (a byte-order mark removed; line ends removed
    unless ``keep_ends``)."""
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise DataError("is a folder; give a prompts file (one prompt per line, or a .csv/.jsonl "
                        "table with a 'prompt' column)", path=path) from None
    except OSError as e:
        raise DataError(f"cannot read the prompts file ({e.strerror})", path=path) from None
    with f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1}); save the file as UTF-8 (e.g. iconv -f "
                                "latin1 -t utf-8)", path=path) from None
            check_prompt(text, f"line {n}", path=path)
            yield n, text if keep_ends else text.rstrip("\r\n")


def _no_column(path: Path, header: list[str]) -> DataError:
    return DataError(f"no prompt column: found {header}; name the column holding the prompts "
                     f"one of {list(PROMPT_COLUMNS)}", path=path)


def _csv_prompts(path: Path) -> Iterator[tuple[int, str]]:
    reader = csv.reader(text for _, text in _lines(path, keep_ends=True))
    header = next(reader, None)
    if header is None:
        return
    column = next((header.index(c) for c in PROMPT_COLUMNS if c in header), None)
    for row in reader:
        if not row:
            continue  # a blank line is no row
        if column is None:
            raise _no_column(path, header)
        yield reader.line_num, (row[column] if column < len(row) else "").strip()


def _json_object(path: Path, n: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"line {n} is not JSON ({e.msg})", path=path) from None
    if not isinstance(row, dict):
        raise DataError(f"line {n} is not a JSON object", path=path)
    return row


def _jsonl_prompts(path: Path) -> Iterator[tuple[int, str]]:
    column = None
    for n, line in _lines(path):
        if not line.strip():
            continue
        row = _json_object(path, n, line)
        if column is None:
            column = next((c for c in PROMPT_COLUMNS if c in row), None)
            if column is None:
                raise _no_column(path, list(row))
        yield n, str(row.get(column) or "").strip()

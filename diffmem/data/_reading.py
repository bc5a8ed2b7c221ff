"""Helpers shared by the dataset readers: the file suffixes they know, the ``on_error`` policy,
skip bookkeeping and strict CSV reading (plain or gzip-compressed, UTF-8)."""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from diffmem.errors import ConfigError, DataError

log = logging.getLogger("diffmem.data")

ON_ERROR = ("raise", "skip")
DICOM_SUFFIXES = (".dcm", ".dicom")
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png")

# Phrases of our own DataError messages -> the short kind counted in skip summaries.
_KINDS = (
    ("report file not found", "missing report"),
    ("not valid UTF-8", "non-UTF-8 text"),
    ("empty prompt", "empty prompt"),
    ("image file not found", "missing image"),
    ("outside the manifest", "path outside the manifest folder"),
    ("no pixel data", "non-image DICOM"),
    ("not a DICOM", "corrupt DICOM"),
    ("DICOM", "unreadable DICOM"),
    ("truncated or corrupt", "truncated or corrupt image"),
    ("not a readable image", "unreadable image"),
    ("split", "split problem"),
    ("metadata", "metadata mismatch"),
)


def check_on_error(on_error: str) -> str:
    """Return ``on_error`` when it is ``"raise"`` or ``"skip"``, else raise ConfigError."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
    return on_error


def skip_kind(reason: str) -> str:
    """The short category of a skip reason (for counted summaries)."""
    for phrase, kind in _KINDS:
        if phrase in reason:
            return kind
    return "other"


# The advice to skip, which a loader's error gives; a record that was skipped does not repeat it.
_SKIP_HINT = re.compile(r",? or use --on-error skip(?: to leave [^.;]*? out)?")


def without_skip_hint(message: str) -> str:
    """``message`` without its "or use --on-error skip" advice (for records already skipped).

    Examples
    --------
    >>> without_skip_hint("image file not found; restore it or use --on-error skip")
    'image file not found; restore it'
    >>> without_skip_hint("bad report, or use --on-error skip to leave such studies out")
    'bad report'
    """
    return _SKIP_HINT.sub("", message)


def handle(error: DataError, *, on_error: str, skipped: list[tuple[str, str]],
           record: str | os.PathLike) -> None:
    """Raise ``error`` (``on_error="raise"``) or append ``(record, message)`` to ``skipped``
    (the message without its advice to use ``--on-error skip``)."""
    if on_error == "raise":
        raise error
    skipped.append((str(record), without_skip_hint(str(error))))


def skip_counts(skipped: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Number of skipped records per kind, most frequent first."""
    return dict(Counter(skip_kind(reason) for _, reason in skipped).most_common())


def warn_skipped(skipped: Sequence[tuple[str, str]], *, where: str | os.PathLike) -> None:
    """Log one warning that counts the skipped records by kind (nothing when none)."""
    if not skipped:
        return
    counts = ", ".join(f"{n} {kind}" for kind, n in skip_counts(skipped).items())
    log.warning("%s: skipped %d record(s) (%s); first: %s", where, len(skipped), counts,
                skipped[0][1])


def normalize_views(views: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"PA,AP"`` or ``["pa", "AP"]`` -> ``("PA", "AP")``; ``None`` stays ``None``."""
    if views is None:
        return None
    items = views.split(",") if isinstance(views, str) else list(views)
    out = tuple(dict.fromkeys(str(v).strip().upper() for v in items if str(v).strip()))
    if not out:
        raise ConfigError(f"views must name at least one view position (e.g. 'PA,AP'), "
                          f"got {views!r}")
    return out


def find_table(root: Path, stem: str) -> Path | None:
    """``root/stem.csv`` or ``root/stem.csv.gz`` (PhysioNet ships the gzipped form)."""
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_csv_rows(path: Path, *, required: Sequence[str]) -> Iterator[dict[str, str]]:
    """Rows of a UTF-8 CSV (optionally ``.gz``) as dicts; DataError on a missing column or a
    decoding problem, naming the file."""
    try:
        raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot open table: {e.strerror}", path=path) from e
    with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="") as f:
        try:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"table lacks column(s) {missing}; found {list(header)}",
                                path=path)
            yield from reader
        except UnicodeDecodeError as e:
            raise DataError(f"table is not valid UTF-8 ({e.reason} at byte {e.start}); "
                            "re-encode it as UTF-8", path=path) from None
        except (csv.Error, EOFError, OSError) as e:
            raise DataError(f"cannot parse table: {e}", path=path) from None

"""Ground-truth labels a detection run is scored against: ``diffmem synth``'s
``ground_truth.csv``, or a user's own labels file (``diffmem detect --ground-truth FILE``).

A labels file is a CSV table with a header, one **key** column and one **0/1 label** column:

- key: ``dicom_id`` or ``image_id`` (one row per image), ``study_id`` (one row per study) — both
  need ``--data``, whose training records they are joined to — or ``prompt`` (the prompt
  text itself; works with ``--prompts FILE`` alone). The first of these present is used.
- label: ``memorized``, ``label`` or ``planted`` (the first present); values ``1/0``,
  ``true/false`` or ``yes/no``.

A prompt is labelled 1 when any of its rows (any training image or study it belongs to) is.
Scanned prompts without a row count as 0, with a warning giving their number.

An explicit file that does not fit is an error naming the file and what it needs; the
dataset folder's own ``ground_truth.csv``, read by default, that does not fit (a user's file
of another shape) is skipped with a warning, and the run goes on without labels.

Examples
--------
>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "labels.csv"
>>> _ = path.write_text("prompt,memorized\\nNo acute process.,1\\nSmall effusion.,0\\n")
>>> table = read_labels(path)
>>> table.key, table.column, table.values
('prompt', 'memorized', {'No acute process.': 1, 'Small effusion.': 0})
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.data.synth.generator import GROUND_TRUTH_CSV, ground_truth_path
from diffmem.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["KEY_COLUMNS", "LABEL_COLUMNS", "LabelTable", "Labels", "read_labels",
           "resolve_labels"]

KEY_COLUMNS = ("dicom_id", "image_id", "study_id", "prompt")
LABEL_COLUMNS = ("memorized", "label", "planted")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}
_SHAPE = (f"a CSV with a header, a key column ({', '.join(KEY_COLUMNS)}) and a 0/1 column "
          f"({', '.join(LABEL_COLUMNS)})")


@dataclass
class LabelTable:
    """A labels file as read: key column -> 0/1.

    Attributes
    ----------
    path : Path or None
    key : str
        The key column (``dicom_id``, ``image_id``, ``study_id`` or ``prompt``).
    column : str
        The label column.
    values : dict of str to int
        Key value -> 0/1 (the largest over repeated keys).
    """

    path: Path | None
    key: str
    column: str
    values: dict[str, int]


@dataclass
class Labels:
    """The labels of one run: prompt -> 0/1, and where they came from.

    Attributes
    ----------
    by_prompt : dict of str to int, or None
        None when the dataset's own ``ground_truth.csv`` did not fit (then ``warnings`` says
        why and the run has no labels).
    source : dict
        ``file``, ``key``, ``column``, ``rows`` (JSON-ready, for ``summary.json``).
    warnings : list of str
        What did not fit (logged as well).
    """

    by_prompt: dict[str, int] | None
    source: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def check_scanned(self, scanned: list[str]) -> None:
        """Warn about scanned prompts without a row (they count as 0) and about labels of one
        kind only (no AUC then); logged and added to :attr:`warnings`.

        Raises
        ------
        DataError
            An explicit (``--ground-truth``) file that labels none of ``scanned``.
        """
        if self.by_prompt is None or not scanned:
            return
        path, key = self.source.get("file"), self.source.get("key")
        unlabelled = sum(p not in self.by_prompt for p in scanned)
        if self.source.get("explicit") and unlabelled == len(scanned):
            raise DataError(f"labels none of the {len(scanned)} scanned prompt(s) (its {key} "
                            "values do not match them): give the labels of the prompts "
                            "scanned", path=path)
        found = []
        if unlabelled and key == "prompt":
            found.append(f"{unlabelled} of {len(scanned)} scanned prompt(s) have no row in "
                         f"{path}; they count as not memorized (0)")
        positives = sum(self.by_prompt.get(p, 0) for p in scanned)
        if positives in (0, len(scanned)):
            found.append(f"the labels mark {'every' if positives else 'no'} scanned prompt as "
                         "memorized; AUC and TPR need both kinds: no evaluation")
        for w in found:
            log.warning(w)
        self.warnings += found


def _parse(value: str, path: Path, line: int, column: str) -> int:
    v = (value or "").strip().lower()
    if v in _TRUE:
        return 1
    if v in _FALSE:
        return 0
    try:
        number = float(v)
    except ValueError:
        number = None
    if number in (0.0, 1.0):
        return int(number)
    raise DataError(f"line {line}: {column} is {value!r}; labels must be 1/0, true/false or "
                    "yes/no (1 = memorized)", path=path)


def read_labels(path: str | os.PathLike) -> LabelTable:
    """Read a labels file (see the module docstring for its shape).

    Raises
    ------
    DataError
        Naming the file: missing, not UTF-8 text, no key or label column (listing the columns
        found and those wanted), a value that is not 0/1 (naming the line), or no rows.
    """
    path = ground_truth_path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in (reader.fieldnames or [])]
            key = next((c for c in KEY_COLUMNS if c in header), None)
            column = next((c for c in LABEL_COLUMNS if c in header), None)
            if key is None or column is None:
                raise DataError(f"is not a labels file: its columns are {header or 'none'}; "
                                f"give {_SHAPE}", path=path)
            reader.fieldnames = header
            values: dict[str, int] = {}
            for line, row in enumerate(reader, start=2):
                k = (row.get(key) or "").strip()
                if not k:
                    raise DataError(f"line {line}: empty {key}; every row needs one", path=path)
                values[k] = max(values.get(k, 0), _parse(row.get(column), path, line, column))
    except FileNotFoundError:
        raise DataError(f"labels file does not exist; give {_SHAPE}", path=path) from None
    except UnicodeDecodeError as e:
        raise DataError(f"is not UTF-8 text (byte {e.start}); save it as UTF-8 CSV",
                        path=path) from None
    except csv.Error as e:
        raise DataError(f"is not a readable CSV ({e}); give {_SHAPE}", path=path) from None
    except OSError as e:
        raise DataError(f"cannot be read ({e.strerror})", path=path) from None
    if not values:
        raise DataError(f"has a header but no rows; give {_SHAPE}", path=path)
    return LabelTable(path, key, column, values)


def _join(table: LabelTable, dataset: Any | None) -> dict[str, int]:
    """Prompt -> 0/1 from a table and the training records it is keyed by."""
    if table.key == "prompt":
        return dict(table.values)
    if dataset is None:
        raise DataError(f"its rows are keyed by {table.key}, which only the dataset can turn "
                        "into prompts: pass --data DATA (the training data), or key the file "
                        "by a 'prompt' column", path=table.path)
    by_prompt: dict[str, int] = {}
    matched = missing = 0
    for s in dataset:
        if s.split != "train" or not s.prompt.strip():
            continue
        k = s.image_id if table.key in ("dicom_id", "image_id") else s.study_id
        value = table.values.get(str(k))
        if value is None:
            missing += 1
            continue
        matched += 1
        by_prompt[s.prompt] = max(by_prompt.get(s.prompt, 0), value)
    if not matched:
        example = next(iter(table.values))
        raise DataError(f"none of its {len(table.values)} {table.key} value(s) (e.g. "
                        f"{example!r}) is a training record of the data in {dataset.root}: "
                        "give the labels of this dataset", path=table.path)
    if missing:
        log.warning("ground truth has no row for %d training record(s); their prompts count "
                    "as not memorized (0)", missing)
    return by_prompt


def resolve_labels(dataset: Any | None,
                   ground_truth: str | os.PathLike | Mapping | None) -> Labels | None:
    """The labels of a run: an explicit ``ground_truth`` (a file, or rows keyed by image id
    with a ``planted`` value as :func:`diffmem.data.synth.read_ground_truth` returns), else
    the dataset folder's ``ground_truth.csv`` when there is one and it fits.

    Parameters
    ----------
    dataset : CXRDataset or None
    ground_truth : path, mapping or None

    Returns
    -------
    Labels or None
        None without any ground truth.

    Raises
    ------
    DataError
        An explicit file that cannot be read or joined (see :func:`read_labels`).
    """
    explicit = ground_truth is not None
    if not explicit:
        if dataset is None or not (Path(dataset.root) / GROUND_TRUTH_CSV).is_file():
            return None
        ground_truth = Path(dataset.root) / GROUND_TRUTH_CSV
    try:
        table = (LabelTable(None, "dicom_id", "planted",
                            {str(k): int(v["planted"]) for k, v in ground_truth.items()})
                 if isinstance(ground_truth, Mapping) else read_labels(ground_truth))
        by_prompt = _join(table, dataset)
    except DataError as e:
        if explicit:
            raise
        msg = (f"{e}; the run goes on without labels (no AUC): pass --ground-truth FILE to "
               "give them")
        log.warning(msg)
        return Labels(None, {}, [msg])
    return Labels(by_prompt, {"file": None if table.path is None else str(table.path),
                              "key": table.key, "column": table.column,
                              "rows": len(table.values), "explicit": explicit})

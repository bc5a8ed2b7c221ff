"""The result every study returns and the files every study folder holds.

Each study folder contains ``study.json`` (the contract the report reads)::

    {"study": "toy" | "lr" | "train-mitigations" | "checkpoints" | "lora", "title": str,
     "records": [...],
     "figures": ["file.png", ...], "findings": ["one honest sentence", ...],
     "config": {...}, "machine": {...}, "seconds": float, "command": [...]}

plus ``summary.json`` and a CSV of the records (:func:`write_study`).
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.errors import OutputError
from diffmem.utils import write_csv, write_json

__all__ = ["StudyResult", "csv_value", "machine_info", "mean_ci", "write_records_csv",
           "write_study"]

STUDY_JSON = "study.json"
SUMMARY_JSON = "summary.json"


@dataclass
class StudyResult:
    """What a study found (see the module docstring for ``study.json``).

    Attributes
    ----------
    study : str
        ``"toy"``, ``"lr"`` or ``"train-mitigations"``.
    title : str
    records : list of dict
        One row per run (JSON-ready).
    figures : list of str
        PNG file names inside ``out``.
    findings : list of str
        Honest one-sentence findings computed from the records.
    config : dict
        Seeds, sizes, steps and deviations from the papers.
    machine : dict
    seconds : float
        Wall time of the study call.
    command : list of str
    out : str or None
        The study folder.
    files : dict of str to str
    """

    study: str
    title: str
    records: list[dict[str, Any]]
    figures: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)
    out: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``study.json`` object."""
        return {"study": self.study, "title": self.title,
                "records": [_clean(r) for r in self.records], "figures": list(self.figures),
                "findings": list(self.findings), "config": _clean(self.config),
                "machine": dict(self.machine), "seconds": round(float(self.seconds), 2),
                "command": list(self.command)}


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return _clean(obj.item())
        except (TypeError, ValueError):
            return str(obj)
    return obj


def mean_ci(values: Sequence[float | None], *, confidence: float = 0.95,
            ) -> tuple[float | None, float | None]:
    """Mean and half width of the two-sided Student-t confidence interval of the mean over
    ``values`` (e.g. one value per seed): ``t_{(1+c)/2, n-1} * s / sqrt(n)`` with the sample
    standard deviation ``s``. None and non-finite values are left out; the mean is None
    without any value and the half width None with fewer than two.

    Examples
    --------
    >>> m, h = mean_ci([1.0, 2.0, 3.0])  # s = 1, t(0.975, 2) = 4.3027
    >>> m, round(h, 4)
    (2.0, 2.4841)
    >>> mean_ci([0.5, None])
    (0.5, None)
    """
    from scipy.stats import t

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return mean, float(t.ppf((1 + confidence) / 2, len(xs) - 1) * sd / math.sqrt(len(xs)))


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, torch threads, CUDA (what the wall times were measured on)."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.machine(),
                            "cpus": os.cpu_count(), "python": platform.python_version(),
                            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return info


def csv_value(v: Any) -> Any:
    """A record value as a CSV cell: floats to 6 significant digits, None and non-finite
    floats empty, lists and dicts as text."""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else float(f"{v:.6g}")
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return str(v)
    return v


def write_records_csv(path: str | os.PathLike, records: Sequence[dict[str, Any]],
                      columns: Sequence[str]) -> Path:
    """Write ``records`` as a CSV of ``columns`` (cells by :func:`csv_value`)."""
    return write_csv(Path(path), columns,
                     ({k: csv_value(r.get(k)) for k in columns} for r in records))


def write_study(result: StudyResult, out: Path, *, csv_name: str,
                summary: Any | None = None, columns: Sequence[str] | None = None) -> StudyResult:
    """Write ``study.json``, ``summary.json`` (``summary`` or the study object) and the records'
    CSV into ``out``; fills ``result.files``."""
    out = Path(out)
    try:
        if columns is None:
            columns = list(dict.fromkeys(k for r in result.records for k in r))
        path = write_records_csv(out / csv_name, result.records, columns)
        result.files["csv"] = str(path)
        write_json(out / SUMMARY_JSON, _clean(summary if summary is not None
                                              else result.to_dict()))
        result.files["summary"] = str(out / SUMMARY_JSON)
        for name in result.figures:
            result.files[Path(name).stem] = str(out / name)
        result.files["study"] = str(out / STUDY_JSON)
        write_json(out / STUDY_JSON, result.to_dict())
    except OSError as e:
        raise OutputError(f"cannot write the study files in {str(out)!r}: {e.strerror}") from None
    result.out = str(out)
    return result

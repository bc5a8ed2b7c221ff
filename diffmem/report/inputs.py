"""Read the results the report is made of: what ``diffmem detect``, ``scan``, ``mitigate`` and
``study`` wrote into their ``--out`` folders.

Each reader takes one folder and returns plain data (dicts and lists, numbers parsed); it
refuses a folder that is not what it should be with a :class:`~diffmem.errors.DataError`
naming the file and the command that writes it. Optional keys may be missing (the mitigation
and study contracts grow); readers fill in ``None`` rather than fail.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.errors import DataError
from diffmem.utils import shell_command

log = logging.getLogger(__name__)

__all__ = ["ReportInputs", "read_clipmem", "read_detect", "read_mitigate", "read_reid_eval",
           "read_scan", "read_study", "resolve_inputs"]

#: What to run when a section's results are missing: argument lists whose ``{model}``,
#: ``{data}`` and ``{results}`` :func:`todo_commands` fills in and shell-quotes.
COMMANDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "detect": (("diffmem", "detect", "--model", "{model}", "--data", "{data}",
                "--out", "{results}/detect"),),
    "scan": (("diffmem", "scan", "{data}", "--model", "{model}", "--out", "{results}/scan"),),
    "attributions": (("diffmem", "scan", "{data}", "--model", "{model}",
                      "--out", "{results}/scan"),),
    "mitigate": (("diffmem", "mitigate", "--model", "{model}", "--data", "{data}",
                  "--out", "{results}/mitigate"),),
    "clipmem": (("diffmem", "clipmem", "--data", "{data}", "--out", "{results}/clipmem",
                 "--mitigate"),),
    "study": (("diffmem", "study", "toy", "--out", "{results}/study/toy"),
              ("diffmem", "study", "lr", "--data", "{data}", "--out", "{results}/study/lr"),
              ("diffmem", "study", "train-mitigations", "--data", "{data}",
               "--out", "{results}/study/train-mitigations")),
}
#: The same without training data: ``{prompts}`` stands for the user's prompts file.
COMMANDS_WITHOUT_DATA: dict[str, tuple[tuple[str, ...], ...]] = {
    "detect": (("diffmem", "detect", "--model", "{model}", "--prompts", "{prompts}",
                "--methods", "noise,attention", "--out", "{results}/detect"),),
    "scan": (("diffmem", "scan", "{prompts}", "--model", "{model}", "--out",
              "{results}/scan"),),
    "attributions": (("diffmem", "scan", "{prompts}", "--model", "{model}",
                      "--out", "{results}/scan"),),
    "mitigate": (("diffmem", "mitigate", "--model", "{model}", "--prompts", "{prompts}",
                  "--out", "{results}/mitigate"),),
    "clipmem": (("diffmem", "clipmem", "--data", "DATA", "--out", "{results}/clipmem",
                 "--mitigate"),),
    "study": (("diffmem", "study", "toy", "--out", "{results}/study/toy"),),
}
#: Said after a command of :data:`COMMANDS`.
COMMAND_NOTES = {"attributions": "(a scan with --model writes the per-prompt attributions, "
                                 "attributions.jsonl)"}


def todo_commands(*, model: str | os.PathLike, data: str | os.PathLike | None,
                  results: str | os.PathLike | None) -> dict[str, str]:
    """The :data:`COMMANDS` (:data:`COMMANDS_WITHOUT_DATA` when ``data`` is None) with the
    model, data and results folders filled in, each argument shell-quoted (a path with spaces
    or ``;`` stays one argument when pasted).

    Examples
    --------
    >>> todo_commands(model="m", data="my data; rm -rf ~", results=None)["scan"]
    "diffmem scan 'my data; rm -rf ~' --model m --out RESULTS/scan"
    >>> todo_commands(model="m", data=None, results="r")["mitigate"]
    'diffmem mitigate --model m --prompts PROMPTS.txt --out r/mitigate'
    """
    fill = {"model": str(model), "data": str(data), "prompts": "PROMPTS.txt",
            "results": "RESULTS" if results is None else str(results)}
    todo = {}
    for key, commands in (COMMANDS if data is not None else COMMANDS_WITHOUT_DATA).items():
        text = ";  ".join(shell_command([arg.format(**fill) for arg in argv])
                          for argv in commands)
        todo[key] = f"{text}  {COMMAND_NOTES[key]}" if key in COMMAND_NOTES else text
    return todo


@dataclass
class ReportInputs:
    """The results folders a report reads (None = not given / not found)."""

    detect: Path | None = None
    scan: Path | None = None
    mitigate: Path | None = None
    studies: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"detect": None if self.detect is None else str(self.detect),
                "scan": None if self.scan is None else str(self.scan),
                "mitigate": None if self.mitigate is None else str(self.mitigate),
                "studies": [str(p) for p in self.studies]}


def explicit_folder(value: Any, what: str) -> Path | None:
    """``value`` as a folder path (None stays None); DataError naming ``diffmem what`` when it
    does not exist or is a file."""
    if value is None:
        return None
    path = Path(value)
    if not path.is_dir():
        raise DataError(f"{what} folder does not exist (or is a file); pass the --out "
                        f"folder of `diffmem {what}`", path=path)
    return path


def resolve_inputs(*, results: str | os.PathLike | None = None,
                   detect: str | os.PathLike | None = None,
                   scan: str | os.PathLike | None = None,
                   mitigate: str | os.PathLike | None = None,
                   studies: Sequence[str | os.PathLike] = ()) -> ReportInputs:
    """Find the results folders: explicit ones first, else the sub-folders of ``results``.

    ``results`` is laid out as ``diffmem demo --out DIR`` writes it: ``scan/``, ``detect/``,
    ``mitigate/`` and ``study/<name>/``. A sub-folder that is missing there leaves its
    section empty (the report then says what to run); an explicitly given folder that does
    not exist is an error.

    Raises
    ------
    DataError
        For an explicit folder (or ``results``) that does not exist or is a file.
    """
    explicit = explicit_folder
    base = explicit(results, "results") if results is not None else None
    if base is not None and not any((base / name).is_dir() for name in
                                    ("detect", "scan", "mitigate", "study", "clipmem")):
        raise DataError("has none of the sub-folders detect/, scan/, mitigate/, study/, "
                        "clipmem/; "
                        "--results takes a folder laid out like `diffmem demo --out DIR`",
                        path=base)

    def pick(value: Any, name: str) -> Path | None:
        if value is not None:
            return explicit(value, name)
        if base is not None and (base / name).is_dir():
            return base / name
        return None

    found = ReportInputs(detect=pick(detect, "detect"), scan=pick(scan, "scan"),
                         mitigate=pick(mitigate, "mitigate"))
    if studies:
        found.studies = [explicit(s, "study") for s in studies]  # type: ignore[misc]
    elif base is not None and (base / "study").is_dir():
        found.studies = sorted(p for p in (base / "study").iterdir()
                               if p.is_dir() and (p / "study.json").is_file())
    return found


# ---------------------------------------------------------------------------- file helpers
def _json(path: Path, command: str) -> Any:
    if not path.is_file():
        raise DataError(f"missing; it is written by `{command}` (run it again into this "
                        "folder, or leave the folder out)", path=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot be read as JSON ({e}); re-run `{command}`", path=path) from None


def _csv(path: Path, command: str, required: Sequence[str] = ()) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"missing; it is written by `{command}`", path=path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot be read as CSV ({e}); re-run `{command}`", path=path) from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"lacks the column(s) {missing} (found {header}); it is not the output "
                        f"of `{command}`", path=path)
    return rows


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _int(value: Any) -> int | None:
    x = _float(value)
    return None if x is None else int(x)


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value in (None, ""):
        return None
    return str(value).strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------- detect
_SCORE_REQUIRED = ("kind", "study_id", "prompt", "noise_magnitude", "nn_similarity",
                   "nn_study_id", "memorized")


def read_detect(folder: str | os.PathLike) -> dict[str, Any]:
    """The outputs of ``diffmem detect --out folder``.

    Returns
    -------
    dict
        ``summary`` (summary.json), ``prompts`` (scores.csv rows with numbers parsed: kind,
        study_id, prompt, label, noise_magnitude, attention_entropy, nn_similarity,
        nn_study_id, nn_d1_d2, nn_copies, nn_ratio_copies, memorized, copy_image),
        ``copies`` (copies.csv rows, ``image`` an absolute path or None) and ``figures``
        (name -> PNG path, for the figures that exist).

    Raises
    ------
    DataError
        When summary.json or scores.csv is missing or malformed.
    """
    folder = Path(folder)
    command = shell_command(["diffmem", "detect", "--model", "M", "--data", "DATA", "--out",
                             str(folder)])
    summary = _json(folder / "summary.json", command)
    if not isinstance(summary, dict) or "model_fingerprint" not in summary:
        raise DataError("is not a detection summary (no 'model_fingerprint'); re-run "
                        f"`{command}`", path=folder / "summary.json")
    prompts = []
    for r in _csv(folder / "scores.csv", command, _SCORE_REQUIRED):
        prompts.append({
            "kind": r["kind"], "study_id": r["study_id"], "prompt": r["prompt"],
            "n_studies": _int(r.get("n_studies")), "label": _int(r.get("label")),
            "noise_magnitude": _float(r["noise_magnitude"]),
            "attention_entropy": _float(r.get("attention_entropy")),
            "nn_similarity": _float(r["nn_similarity"]), "nn_study_id": r["nn_study_id"] or None,
            "nn_d1_d2": _float(r.get("nn_d1_d2")), "nn_copies": _int(r.get("nn_copies")),
            "nn_ratio_copies": _int(r.get("nn_ratio_copies")),
            "memorized": _bool(r["memorized"]),
            "copy_image": _existing(folder, r.get("copy_image")),
            "reid_score": _float(r.get("reid_score")),
            "reid_patient_id": r.get("reid_patient_id") or None,
            "reid_match": _bool(r.get("reid_match")),
        })
    copies = []
    if (folder / "copies.csv").is_file():
        for r in _csv(folder / "copies.csv", command, ("prompt", "similarity", "study_id")):
            copies.append({"kind": r.get("kind"), "prompt": r["prompt"],
                           "prompt_study_id": r.get("prompt_study_id") or None,
                           "index": _int(r.get("index")), "seed": _int(r.get("seed")),
                           "similarity": _float(r["similarity"]), "study_id": r["study_id"],
                           "similarity2": _float(r.get("similarity2")),
                           "d1_d2": _float(r.get("d1_d2")),
                           "ratio_copy": _bool(r.get("ratio_copy")),
                           "image": _existing(folder, r.get("image"))})
    reidentified = None
    if (folder / "reidentified.csv").is_file():
        reidentified = [
            {"kind": r.get("kind"), "prompt": r["prompt"],
             "prompt_study_id": r.get("prompt_study_id") or None,
             "index": _int(r.get("index")), "seed": _int(r.get("seed")),
             "reid_score": _float(r["reid_score"]), "reid_patient_id": r["reid_patient_id"],
             "reid_study_id": r["reid_study_id"],
             "reid_own_patient": _bool(r.get("reid_own_patient")), "copy": _bool(r.get("copy")),
             "similarity": _float(r.get("similarity")), "study_id": r.get("study_id") or None,
             "image": _existing(folder, r.get("image"))}
            for r in _csv(folder / "reidentified.csv", command,
                          ("prompt", "reid_score", "reid_patient_id", "reid_study_id"))]
    figures = {name: folder / f"{name}.png" for name in ("scores_hist", "roc", "nn_similarity",
                                                       "lorenz")
               if (folder / f"{name}.png").is_file()}
    return {"folder": folder, "summary": summary, "prompts": prompts, "copies": copies,
            "reidentified": reidentified, "figures": figures}


def read_reid_eval(path: str | os.PathLike) -> dict[str, Any]:
    """``reid_eval.json`` as ``diffmem reid eval --out DIR`` writes it (``auc``,
    ``tpr_at_1pct_fpr``, ``pairs``, ``patients``, ``near_duplicate``, ``model``, ``data``...),
    with ``path`` added.

    Raises
    ------
    DataError
        When the file is missing or is not a re-ID evaluation.
    """
    path = Path(path)
    command = shell_command(["diffmem", "reid", "eval", "--data", "DATA", "--out",
                             str(path.parent)])
    values = _json(path, command)
    if not isinstance(values, dict) or _float(values.get("auc")) is None:
        raise DataError(f"is not a re-ID evaluation (no 'auc'); re-run `{command}`", path=path)
    return {**values, "path": str(path)}


def _existing(folder: Path, rel: Any) -> Path | None:
    """``folder / rel`` when it is a file inside ``folder`` (a results file cannot point the
    report at other files)."""
    if not rel:
        return None
    path = (folder / str(rel)).resolve()
    if folder.resolve() not in path.parents or not path.is_file():
        return None
    return path


# ---------------------------------------------------------------------------- scan
def read_scan(folder: str | os.PathLike) -> dict[str, Any]:
    """The outputs of ``diffmem scan DATA --out folder``.

    Returns
    -------
    dict
        ``summary`` (scan.json), ``tokens`` (tokens.csv rows, numbers parsed, best rank first)
        and ``attributions`` (the dicts of ``attributions.jsonl``, empty when the scan wrote
        none).

    Raises
    ------
    DataError
        When scan.json or tokens.csv is missing or malformed, or a line of
        attributions.jsonl is not a JSON object.
    """
    folder = Path(folder)
    command = shell_command(["diffmem", "scan", "DATA", "--model", "M", "--out", str(folder)])
    summary = _json(folder / "scan.json", command)
    if not isinstance(summary, dict) or "n_prompts" not in summary:
        raise DataError(f"is not a scan summary (no 'n_prompts'); re-run `{command}`",
                        path=folder / "scan.json")
    tokens = []
    for r in _csv(folder / "tokens.csv", command, ("token", "rank", "score", "is_deid_marker")):
        row: dict[str, Any] = dict(r)
        for k in ("rank", "count", "prompts_with_token", "count_duplicated", "count_rest",
                  "enrichment_rank", "model_rank", "model_prompts"):
            row[k] = _int(r.get(k))
        for k in ("score", "enrichment", "model_score", "model_lift"):
            row[k] = _float(r.get(k))
        row["is_deid_marker"] = bool(_bool(r.get("is_deid_marker")))
        row["kind"] = r.get("kind") or "word"
        tokens.append(row)
    tokens.sort(key=lambda t: (t["rank"] is None, t["rank"] or 0))
    attributions = []
    path = folder / "attributions.jsonl"
    if path.is_file():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"line {n} is not JSON ({e.msg}); re-run `{command}`",
                                path=path) from None
            if not isinstance(item, dict) or "prompt" not in item or "units" not in item:
                raise DataError(f"line {n} is not a TokenAttribution dict (needs 'prompt' and "
                                f"'units'); re-run `{command}`", path=path)
            attributions.append(item)
    return {"folder": folder, "summary": summary, "tokens": tokens,
            "attributions": attributions}


# ---------------------------------------------------------------------------- mitigate
_MITIGATION_NUMBERS = ("strength", "n_prompts", "n_generations", "memorization_rate",
                       "reid_rate", "prompt_reid_rate", "reid_rate_own", "prompt_reid_rate_own",
                       "mean_nn_similarity", "noise_magnitude", "fid_in_domain", "alignment",
                       "seconds_per_image")


def read_mitigate(folder: str | os.PathLike) -> dict[str, Any]:
    """The outputs of ``diffmem mitigate --out folder``.

    Returns
    -------
    dict
        ``summary`` (summary.json; keys ``baseline``, ``rows``, ``pareto_front``,
        ``recommended``, ``recommendation_reason``, ``notes``... each may be missing),
        ``rows`` (mitigations.csv rows, numbers parsed) and ``pareto`` (the plot's path or
        None).

    Raises
    ------
    DataError
        When neither summary.json nor mitigations.csv is there, or one is malformed.
    """
    folder = Path(folder)
    command = shell_command(["diffmem", "mitigate", "--model", "M", "--data", "DATA", "--out",
                             str(folder)])
    if not (folder / "summary.json").is_file() and not (folder / "mitigations.csv").is_file():
        raise DataError(f"holds neither summary.json nor mitigations.csv; run `{command}`",
                        path=folder)
    summary = _json(folder / "summary.json", command) if (folder / "summary.json").is_file() \
        else {}
    if not isinstance(summary, dict):
        raise DataError("is not a JSON object", path=folder / "summary.json")
    rows = []
    if (folder / "mitigations.csv").is_file():
        for r in _csv(folder / "mitigations.csv", command, ("method",)):
            row: dict[str, Any] = dict(r)
            for k in _MITIGATION_NUMBERS:
                if k in r:
                    row[k] = _float(r[k])
            if "pareto" in r:
                row["pareto"] = bool(_bool(r["pareto"]))
            rows.append(row)
    elif isinstance(summary.get("rows"), list):
        rows = [dict(r) for r in summary["rows"] if isinstance(r, dict)]
    pareto = folder / "pareto.png"
    return {"folder": folder, "summary": summary, "rows": rows,
            "pareto": pareto if pareto.is_file() else None}


# ---------------------------------------------------------------------------- clipmem
_CLIPMEM_NUMBERS = ("clipmem", "alignment_f", "alignment_g")
_CLIPMEM_MITIGATION_NUMBERS = ("strength", "clipmem_mean_positive", "clipmem_mean_all",
                               "clipmem_mean_kept", "auc", "utility", "recall_at_1",
                               "recall_at_5", "recall_at_10", "seconds")


def read_clipmem(folder: str | os.PathLike, *, top: int = 8) -> dict[str, Any]:
    """The outputs of ``diffmem clipmem --out folder`` (CLIPMem of an image-report encoder,
    Wang et al., ICLR 2025).

    Returns
    -------
    dict
        ``summary`` (summary.json: ``auc``, ``by_kind``, ``towers``, ``mitigations``... each
        may be missing), ``top`` (the ``top`` highest-CLIPMem rows of clipmem.csv, numbers
        parsed), ``mitigations`` (mitigations.csv rows, numbers parsed; [] when not run),
        ``figure`` and ``mitigations_plot`` (PNG paths or None).

    Raises
    ------
    DataError
        When summary.json or clipmem.csv is missing or malformed.
    """
    folder = Path(folder)
    command = shell_command(["diffmem", "clipmem", "--data", "DATA", "--out", str(folder)])
    summary = _json(folder / "summary.json", command)
    if not isinstance(summary, dict) or "by_kind" not in summary:
        raise DataError(f"is not the summary of `diffmem clipmem` (no by_kind); re-run "
                        f"`{command}`", path=folder / "summary.json")
    rows = _csv(folder / "clipmem.csv", command, ("study_id", "prompt", "clipmem"))
    top_rows = []
    for r in rows[:top]:
        row: dict[str, Any] = dict(r)
        for k in _CLIPMEM_NUMBERS:
            row[k] = _float(r.get(k))
        top_rows.append(row)
    mitigations = []
    if (folder / "mitigations.csv").is_file():
        for r in _csv(folder / "mitigations.csv", command + " --mitigate", ("method",)):
            row = dict(r)
            for k in _CLIPMEM_MITIGATION_NUMBERS:
                if k in r:
                    row[k] = _float(r[k])
            row["removed"] = _int(r.get("removed"))
            row["pareto"] = _bool(r.get("pareto"))
            mitigations.append(row)
    figure, plot = folder / "clipmem.png", folder / "mitigations.png"
    return {"folder": folder, "summary": summary, "top": top_rows, "scored": len(rows),
            "mitigations": mitigations, "figure": figure if figure.is_file() else None,
            "mitigations_plot": plot if plot.is_file() else None}


# ---------------------------------------------------------------------------- study
def read_study(folder: str | os.PathLike) -> dict[str, Any]:
    """The outputs of ``diffmem study NAME --out folder``.

    Returns
    -------
    dict
        ``study.json``'s keys (``study``, ``title``, ``records``, ``findings``, ``config``,
        ``machine``, ``seconds``, ``command``; missing ones are None or empty) and
        ``figures``: the listed PNG files that exist in the folder.

    Raises
    ------
    DataError
        When study.json is missing or not a JSON object.
    """
    folder = Path(folder)
    command = shell_command(["diffmem", "study", "NAME", "--out", str(folder)]) + \
        " (NAME: toy, lr, train-mitigations, checkpoints, lora or prune)"
    data = _json(folder / "study.json", command)
    if not isinstance(data, dict):
        raise DataError(f"is not a JSON object; re-run `{command}`", path=folder / "study.json")
    records = [r for r in (data.get("records") or []) if isinstance(r, dict)]
    figures = []
    for name in data.get("figures") or []:
        path = _existing(folder, name)
        if path is not None and path.suffix.lower() == ".png":
            figures.append(path)
        else:
            log.warning("%s: listed figure %r is not a PNG file in the folder; left out",
                        folder / "study.json", name)
    findings = data.get("findings") or []
    return {"folder": folder, "study": str(data.get("study") or folder.name),
            "title": str(data.get("title") or data.get("study") or folder.name),
            "records": records,
            "findings": [str(f) for f in (findings if isinstance(findings, list) else
                                           [findings])],
            "config": data.get("config") or {}, "machine": data.get("machine") or {},
            "seconds": _float(data.get("seconds")),
            "command": shell_command(data["command"])
            if isinstance(data.get("command"), (str, list)) and data["command"] else None,
            "figures": figures}

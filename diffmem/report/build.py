"""``build_report``: one self-contained ``report.html`` and its ``report.json`` from the results
of ``diffmem detect``, ``scan``, ``mitigate`` and ``study``.

The report reads results; it runs no model. It opens the dataset (the dataset section, the
training images beside the copies), the model folder only to fingerprint its weights (so
results computed on another model are refused), and the results folders. Without a dataset
(a user with a model and a prompts file) the sections that need the training data say so, and
``report.json``'s ``not_measured`` lists everything the inputs could not measure. Steps:

1. check inputs: image mode, results folders, dataset, model folder, output folder;
2. read the results and check that they were computed on this model and these data;
3. assemble each section's facts (JSON-ready, :mod:`diffmem.report.sections`; they are
   ``report.json``) and the risk level (:func:`~diffmem.report.risk.assess_risk`);
4. add the pictures (figures as ``data:`` URIs; patient images as the image mode says,
   :mod:`diffmem.report.images`) and render the Jinja2 template, autoescape on
   (:mod:`diffmem.report.render`);
5. write ``report.html`` and ``report.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.errors import DataError, OutputError
from diffmem.report.images import IMAGE_MODES, check_mode
from diffmem.report.inputs import (explicit_folder, read_clipmem, read_detect, read_mitigate,
                                   read_reid_eval, read_scan, read_study, resolve_inputs,
                                   todo_commands)
from diffmem.report.render import pictures, render_report
from diffmem.report.risk import assess_risk
from diffmem.report.sections import (METHODS, REFERENCES, attribution_facts, clipmem_facts,
                                     dataset_facts, detection_facts, jsonable, mitigation_facts,
                                     not_measured, reid_facts, reproducibility, study_facts,
                                     summary_facts)
from diffmem.utils import holds_files, prepare_out_dir, write_json, write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "REFERENCES", "ReportResult", "build_report"]

#: Version of report.json's layout (its ``diffmem_report`` key marks a report folder).
FORMAT_VERSION = 1
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
@dataclass
class ReportResult:
    """What :func:`build_report` wrote.

    Attributes
    ----------
    out : pathlib.Path
    html, json : pathlib.Path
        ``report.html`` and ``report.json``.
    risk : str
        The risk level (``high``, ``medium``, ``low`` or ``not assessed``).
    sections : dict of str to str
        Each section: ``"included"`` or the command that would fill it.
    images : str
        The image mode (see :data:`~diffmem.report.images.IMAGE_MODES`).
    seconds : float
    warnings : list of str
    not_measured : list of str
        What the inputs could not measure (report.json's ``not_measured``).
    """

    out: Path
    html: Path
    json: Path
    risk: str
    sections: dict[str, str] = field(default_factory=dict)
    images: str = "include"
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "html": str(self.html), "json": str(self.json),
                "risk": self.risk, "sections": dict(self.sections), "images": self.images,
                "seconds": self.seconds, "warnings": list(self.warnings),
                "not_measured": list(self.not_measured)}


# ---------------------------------------------------------------------------- entry point
def build_report(out: str | os.PathLike, *, model: str | os.PathLike,
                 data: str | os.PathLike | None = None, detect: str | os.PathLike | None = None,
                 scan: str | os.PathLike | None = None,
                 mitigate: str | os.PathLike | None = None,
                 studies: Sequence[str | os.PathLike] = (), images: str = "include",
                 overwrite: bool = False, command: str | Sequence[str] | None = None,
                 results: str | os.PathLike | None = None,
                 dtype: str | None = None,
                 reid_eval: str | os.PathLike | None = None,
                 clipmem: str | os.PathLike | None = None) -> ReportResult:
    """Write the privacy report ``out/report.html`` and ``out/report.json``.

    Parameters
    ----------
    out : path
        Output folder: new, empty, or holding a previous report (else ``overwrite``).
    model : path
        The model folder the results were computed on (fingerprinted, never run).
    data : path, optional
        Its training data (dataset folder or manifest). Without it the dataset section, the
        training images beside the copies and the data-fingerprint check are left out, and
        the report says so.
    detect, scan, mitigate : path, optional
        The ``--out`` folders of ``diffmem detect``, ``diffmem scan``, ``diffmem mitigate``.
    studies : sequence of path, optional
        ``--out`` folders of ``diffmem study`` runs.
    images : {"include", "blur", "omit"}
        Patient images (training images and generations flagged as copies): shown, blurred,
        or left out of the file entirely.
    overwrite : bool
        Write into an existing folder that is not a previous report (only report.html and
        report.json are written; nothing else there is touched).
    command : str or sequence of str, optional
        The command line, recorded under reproducibility.
    results : path, optional
        A folder laid out like ``diffmem demo --out DIR`` writes it (``detect/``, ``scan/``,
        ``mitigate/``, ``study/<name>/``); explicit folders take precedence.
    dtype : str, optional
        The precision the results were computed in (``--dtype`` of those commands; default
        float32): the same weights in another precision have another fingerprint.
    reid_eval : path, optional
        ``reid_eval.json`` of ``diffmem reid eval`` for the re-ID model the detection used
        (default: ``results/reid/reid_eval.json`` when it exists): its verification AUC is shown
        in the "Patient re-identification" section, which appears when the detection ran
        re-ID verdicts (``--methods ...,reid``).
    clipmem : path, optional
        The ``--out`` folder of ``diffmem clipmem`` (default: ``results/clipmem`` when it has a
        summary.json): adds the section "Image-report encoder memorization".

    Returns
    -------
    ReportResult

    Raises
    ------
    ConfigError
        An unknown image mode.
    DataError
        Missing or malformed results, an unreadable dataset, or results computed on another
        model or other data than ``model`` and ``data`` (the message names both
        fingerprints).
    ModelError
        A folder that is not a model.
    OutputError
        An output folder that exists, is not a previous report, and ``overwrite`` is false;
        or one inside the data or the model.
    """
    t0 = time.perf_counter()
    # 1. check inputs (cheap things first)
    mode = check_mode(images)
    found = resolve_inputs(results=results, detect=detect, scan=scan, mitigate=mitigate,
                           studies=studies)
    from diffmem.models import check_model_folder

    model = Path(model)
    check_model_folder(model)
    dataset = _load_data(data)
    out = _prepare_out(Path(out), overwrite=overwrite,
                       inputs=[model, *([dataset.root] if dataset is not None else [])])

    # 2. results, and whether they belong to this model and these data
    det = read_detect(found.detect) if found.detect else None
    scn = read_scan(found.scan) if found.scan else None
    mit = read_mitigate(found.mitigate) if found.mitigate else None
    stu = [read_study(s) for s in found.studies]
    rev, cm = _optional_inputs(results, reid_eval=reid_eval, clipmem=clipmem)
    ident = _identity(model, dataset, dtype)
    _check_match(ident, dataset, det, scn, mit)

    # 3. facts of every section
    todo = todo_commands(model=model, data=data, results=results)
    ds = None if dataset is None else dataset_facts(
        dataset, scn, None if results is None else Path(results) / "inspect.json")
    detection = detection_facts(det) if det else None
    reid = reid_facts(det, rev) if det else None
    attribution = attribution_facts(scn, detection)
    mitigation = mitigation_facts(mit) if mit else None
    studies_found = [study_facts(s) for s in stu]
    risk = assess_risk(det, dataset=None if ds is None else ds["inspect"])
    sections = {
        "summary": "included",
        "dataset": "included" if ds else "needs the training data: build the report with "
                                          "--data DATA",
        "detection": "included" if det else todo["detect"],
        "attribution": "included" if scn else todo["scan"],
        "mitigation": "included" if mit else todo["mitigate"],
        "study": "included" if stu else todo["study"],
        "methods": "included", "reproducibility": "included",
    }
    summary = summary_facts(risk, detection, attribution, mitigation, todo)
    warnings = list((det or {}).get("summary", {}).get("warnings") or []) + (
        reid["warnings"] if reid else [])
    facts = {
        "diffmem_report": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "images": {"mode": mode, "policy": IMAGE_MODES[mode]},
        "risk": risk.to_dict(),
        "summary": summary,
        "sections": sections,
        "todo": todo,
        "dataset": None if ds is None else {k: v for k, v in ds.items() if k != "inspect"} | {
            "inspect": jsonable(ds["inspect"])},
        "not_measured": not_measured(dataset, det, mit),
        "detection": detection,
        "reid": reid,
        "attribution": attribution,
        "mitigation": mitigation,
        "clipmem": clipmem_facts(cm) if cm else None,
        "studies": studies_found,
        "methods": [dict(m) for m in METHODS],
        "references": REFERENCES,
        "reproducibility": reproducibility(ident, found, det, scn, mit, stu, command=command,
                                           mode=mode),
        "warnings": warnings,
    }

    # 4. pictures and HTML
    view = pictures(facts, dataset, det, scn, mit, stu, mode, cm=cm)
    html = render_report(facts, view)

    # 5. files
    html_path, json_path = out / REPORT_HTML, out / REPORT_JSON
    write_text_atomic(html_path, html)
    facts["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(json_path, jsonable(facts))
    log.info("report: %s (risk %s)", html_path, risk.level)
    return ReportResult(out=out, html=html_path, json=json_path, risk=risk.level,
                        sections=sections, images=mode, seconds=facts["seconds"],
                        warnings=warnings, not_measured=facts["not_measured"])


# ---------------------------------------------------------------------------- 1. inputs
def _optional_inputs(results: str | os.PathLike | None, *, reid_eval: Any,
                     clipmem: Any) -> tuple[dict | None, dict | None]:
    """The re-ID evaluation and the CLIPMem results: explicit paths, else
    ``results/reid/reid_eval.json`` and ``results/clipmem/`` when they exist, else None."""
    if reid_eval is None and results is not None \
            and (Path(results) / "reid" / "reid_eval.json").is_file():
        reid_eval = Path(results) / "reid" / "reid_eval.json"
    if clipmem is None and results is not None \
            and (Path(results) / "clipmem" / "summary.json").is_file():
        clipmem = Path(results) / "clipmem"
    return (read_reid_eval(reid_eval) if reid_eval is not None else None,
            read_clipmem(explicit_folder(clipmem, "clipmem")) if clipmem is not None else None)


def _is_report_folder(folder: Path) -> bool:
    try:
        return isinstance(json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
                          .get("diffmem_report"), int)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _load_data(data: str | os.PathLike | None) -> Any:
    """The training data (None when not given); a dataset without records is refused."""
    if data is None:
        return None
    from diffmem.data import load

    dataset = load(data)
    if not len(dataset):
        raise DataError("the dataset has no records; give the training data of the model",
                        path=data)
    return dataset


def _prepare_out(out: Path, *, overwrite: bool, inputs: list[Path]) -> Path:
    if out.is_dir() and holds_files(out) and not overwrite and not _is_report_folder(out):
        raise OutputError(
            f"output folder {str(out)!r} exists and is not a previous report (it holds no "
            f"{REPORT_JSON} written by `diffmem report`); choose a new folder, or pass "
            "--overwrite to write report.html and report.json into it (nothing else in it is "
            "touched)")
    return prepare_out_dir(out, inputs=inputs)


# ---------------------------------------------------------------------------- 2. identity
def _identity(model: Path, dataset: Any, dtype: str | None = None) -> dict[str, Any]:
    """Fingerprints of the model weights and the data (None without data; the report's only
    use of the model)."""
    from diffmem.models import load_model

    log.info("fingerprinting the model weights in %s", model)
    adapter = load_model(model, dtype=dtype)
    card = {}
    if (model / "model_card.json").is_file():
        try:
            card = json.loads((model / "model_card.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            card = {}
    return {"model": str(model), "model_fingerprint": adapter.fingerprint(),
            "model_kind": adapter.kind, "model_card": card if isinstance(card, dict) else {},
            "data": None if dataset is None else str(dataset.root),
            "data_format": None if dataset is None else dataset.format,
            "data_fingerprint": None if dataset is None
            else dataset.subset(split="train").fingerprint(),
            "dataset_fingerprint": None if dataset is None else dataset.fingerprint()}


def _check_match(ident: dict[str, Any], dataset: Any, det: dict | None, scn: dict | None,
                 mit: dict | None) -> None:
    """Refuse results computed on another model or other data."""
    model_fp, data_fp = ident["model_fingerprint"], ident["data_fingerprint"]
    checks = []
    if det is not None:
        s = det["summary"]
        checks.append(("detect", det["folder"], s.get("model_fingerprint"),
                       s.get("data_fingerprint")))
    if scn is not None:
        info = scn["summary"].get("input") or {}
        checks.append(("scan", scn["folder"], (scn["summary"].get("model") or {})
                       .get("fingerprint"),
                       info.get("data_fingerprint") if info.get("split") == "train" else None))
    if mit is not None:
        s, c = mit["summary"], mit["summary"].get("config") or {}
        checks.append(("mitigate", mit["folder"],
                       s.get("model_fingerprint") or (c.get("model_fingerprint")
                                                      if isinstance(c, dict) else None),
                       s.get("data_fingerprint") or (c.get("data_fingerprint")
                                                     if isinstance(c, dict) else None)))
    for what, folder, m, d in checks:
        if m and m != model_fp:
            raise DataError(
                f"model mismatch: the {what} results were computed on a model with fingerprint "
                f"{m}, but --model {ident['model']} has fingerprint {model_fp}; pass the model "
                f"the results were computed on (and its --dtype, if not float32: a precision "
                f"changes the fingerprint), or re-run `diffmem {what}` with this model",
                path=folder)
        if d and data_fp and d != data_fp:
            raise DataError(
                f"data mismatch: the {what} results were computed on training data with "
                f"fingerprint {d}, but the training split of --data {ident['data']} has "
                f"fingerprint {data_fp}; pass the data the results were computed on, or "
                f"re-run `diffmem {what}` on these data", path=folder)
    if scn is not None and dataset is not None:
        info = scn["summary"].get("input") or {}
        if str(info.get("kind", "")).startswith("dataset") and info.get("n_prompts"):
            split = info.get("split") or "train"
            subset = dataset if split == "all" else dataset.subset(split=split)
            here = sum(1 for p in subset.prompts if " ".join(p.split()))
            if here != int(info["n_prompts"]):
                raise DataError(
                    f"data mismatch: the scan read {info['n_prompts']} prompts from the "
                    f"{split!r} split of {info.get('source')}, but --data {ident['data']} has "
                    f"{here} there; pass the data the scan was run on, or re-run `diffmem "
                    "scan` on these data", path=scn["folder"])

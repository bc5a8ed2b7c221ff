"""``build_report``: one self-contained ``report.html`` and its ``report.json`` from the results
of ``diffmem detect``, ``scan``, ``mitigate`` and ``study``.

The report reads results; it runs no model. It opens the dataset (the dataset section, the
training images beside the copies), the model folder only to fingerprint its weights (so
results computed on another model are refused), and the results folders. Steps:

1. check inputs: image mode, results folders, dataset, model folder, output folder;
2. read the results and check that they were computed on this model and these data;
3. assemble each section's facts (JSON-ready; :func:`build_report` writes them as
   ``report.json``) and the risk level (:func:`~diffmem.report.risk.assess_risk`);
4. add the pictures (figures as ``data:`` URIs; patient images as the image mode says,
   :mod:`diffmem.report.images`) and render the Jinja2 template (autoescape on);
5. write ``report.html`` and ``report.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import DataError, OutputError
from diffmem.report.images import IMAGE_MODES, check_mode, data_uri, patient_image
from diffmem.report.inputs import (COMMANDS, read_detect, read_mitigate, read_scan, read_study,
                                   resolve_inputs)
from diffmem.report.risk import OUTLIER_Z, RISK_CRITERIA, assess_risk, noise_outliers
from diffmem.utils import prepare_out_dir, write_json

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "REFERENCES", "ReportResult", "build_report"]

#: Version of report.json's layout (its ``diffmem_report`` key marks a report folder).
FORMAT_VERSION = 1
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
#: Flagged prompts shown with their images and heat-coloured attributions.
TOP_PROMPTS = 8
#: Risky tokens listed in the summary and the attribution table.
TOP_TOKENS = 5
TABLE_TOKENS = 15

#: Papers the methods come from, by key (each method of the report cites one or more).
REFERENCES = {
    "wen2024": "Y. Wen, Y. Liu, C. Chen, L. Lyu. Detecting, Explaining, and Mitigating "
               "Memorization in Diffusion Models. ICLR 2024.",
    "ren2024": "J. Ren, Y. Li, S. Zeng, H. Xu, L. Lyu, Y. Xing, J. Tang. Unveiling and "
               "Mitigating Memorization in Text-to-image Diffusion Models through Cross "
               "Attention. ECCV 2024.",
    "gu2023": "X. Gu, C. Du, T. Pang, C. Li, M. Lin, Y. Wang. On Memorization in Diffusion "
              "Models. arXiv:2310.02664 (2023).",
    "carlini2023": "N. Carlini, J. Hayes, M. Nasr, M. Jagielski, V. Sehwag, F. Tramer, B. "
                   "Balle, D. Ippolito, E. Wallace. Extracting Training Data from Diffusion "
                   "Models. USENIX Security 2023.",
    "somepalli2023a": "G. Somepalli, V. Singla, M. Goldblum, J. Geiping, T. Goldstein. "
                      "Diffusion Art or Digital Forgery? Investigating Data Replication in "
                      "Diffusion Models. CVPR 2023.",
    "somepalli2023b": "G. Somepalli, V. Singla, M. Goldblum, J. Geiping, T. Goldstein. "
                      "Understanding and Mitigating Copying in Diffusion Models. NeurIPS 2023.",
    "dutt2025": "R. Dutt et al. The Devil is in the Prompts: De-Identification Traces "
                "Enhance Memorization Risks in Synthetic Chest X-Ray Generation. 2025.",
    "monroe2008": "B. L. Monroe, M. P. Colaresi, K. M. Quinn. Fightin' Words: Lexical Feature "
                  "Selection and Evaluation for Identifying the Content of Political Conflict. "
                  "Political Analysis 16(4), 2008.",
    "iglewicz1993": "B. Iglewicz, D. C. Hoaglin. How to Detect and Handle Outliers. ASQC "
                    "Quality Press, 1993 (robust z-scores from the median absolute deviation).",
    "heusel2017": "M. Heusel, H. Ramsauer, T. Unterthiner, B. Nessler, S. Hochreiter. GANs "
                  "Trained by a Two Time-Scale Update Rule Converge to a Local Nash "
                  "Equilibrium. NeurIPS 2017 (the Frechet distance).",
    "jain2025": "A. Jain et al. Classifier-Free Guidance inside the Attraction Basin May "
                "Cause Memorization. CVPR 2025.",
    "wu2025": "Y.-H. Wu, P. Marion, G. Biau, C. Boyer. Taking a Big Step: Large Learning Rates "
              "in Denoising Score Matching Prevent Memorization. COLT 2025.",
}

#: The methods behind the numbers, with the references they follow (shown in the report).
METHODS = (
    {"name": "Noise magnitude", "section": "detection", "refs": ["wen2024", "iglewicz1993"],
     "how": "Norm of the difference between the text-conditional and unconditional noise "
            "predictions at the first sampling step(s); higher = more memorized. Flagged: a "
            f"robust z-score >= {OUTLIER_Z:g} over the scanned prompts."},
    {"name": "Cross-attention entropy", "section": "detection", "refs": ["ren2024"],
     "how": "Entropy of the cross-attention over prompt tokens; low entropy (concentrated "
            "attention) goes with memorization."},
    {"name": "Calibrated copy verdicts", "section": "detection",
     "refs": ["carlini2023", "somepalli2023a"],
     "how": "Seeded generations are compared with every training image; a generation is a copy "
            "when its nearest training image is more similar than held-out (never trained on) "
            "real images' nearest training images are, at the chosen false-positive rate."},
    {"name": "Ratio criterion", "section": "detection", "refs": ["gu2023"],
     "how": "A generation whose nearest training image is three times closer than the second "
            "nearest (d1/d2 < 1/3) is reported alongside the calibrated verdict."},
    {"name": "Risk level", "section": "summary", "refs": [],
     "how": "Calibrated copies tested against the threshold's false-positive rate (one-sided "
            "binomial test), plus the signals listed in the criteria; see the summary."},
    {"name": "Token attribution", "section": "attribution", "refs": ["wen2024", "dutt2025"],
     "how": "Gradient token significance of the noise magnitude per prompt unit (words, "
            "de-identification markers, PHI-like spans), pooled over the dataset weighted by "
            "each prompt's memorization score and number of copies."},
    {"name": "Token enrichment in duplicated prompts", "section": "attribution",
     "refs": ["monroe2008"],
     "how": "Log-odds z-score with an informative Dirichlet prior between the prompts of "
            "duplicate clusters and the rest (model-free)."},
    {"name": "Mitigation comparison", "section": "mitigation",
     "refs": ["wen2024", "ren2024", "somepalli2023b", "jain2025", "dutt2025", "heusel2017"],
     "how": "Each mitigation at each strength on the memorized prompts and a control set: "
            "memorization rate (the same copy verdicts), utility as a Frechet distance in "
            "diffmem's in-domain image embedding (FID-like, not Inception features) and "
            "prompt-image alignment."},
    {"name": "Training studies", "section": "study", "refs": ["wu2025", "somepalli2023b",
                                                             "wen2024"],
     "how": "Models trained under different settings (learning rate, training-time "
            "mitigations) and measured with the same detector."},
)


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
    """

    out: Path
    html: Path
    json: Path
    risk: str
    sections: dict[str, str] = field(default_factory=dict)
    images: str = "include"
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "html": str(self.html), "json": str(self.json),
                "risk": self.risk, "sections": dict(self.sections), "images": self.images,
                "seconds": self.seconds, "warnings": list(self.warnings)}


# ---------------------------------------------------------------------------- entry point
def build_report(out: str | os.PathLike, *, model: str | os.PathLike,
                 data: str | os.PathLike, detect: str | os.PathLike | None = None,
                 scan: str | os.PathLike | None = None,
                 mitigate: str | os.PathLike | None = None,
                 studies: Sequence[str | os.PathLike] = (), images: str = "include",
                 overwrite: bool = False, command: str | Sequence[str] | None = None,
                 results: str | os.PathLike | None = None) -> ReportResult:
    """Write the privacy report ``out/report.html`` and ``out/report.json``.

    Parameters
    ----------
    out : path
        Output folder: new, empty, or holding a previous report (else ``overwrite``).
    model : path
        The model folder the results were computed on (fingerprinted, never run).
    data : path
        Its training data (dataset folder or manifest).
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
    from diffmem.data import load

    dataset = load(data)
    if not len(dataset):
        raise DataError("the dataset has no records; give the training data of the model",
                        path=data)
    out = _prepare_out(Path(out), overwrite=overwrite, inputs=[dataset.root, model])

    # 2. results, and whether they belong to this model and these data
    det = read_detect(found.detect) if found.detect else None
    scn = read_scan(found.scan) if found.scan else None
    mit = read_mitigate(found.mitigate) if found.mitigate else None
    stu = [read_study(s) for s in found.studies]
    ident = _identity(model, dataset)
    _check_match(ident, dataset, det, scn, mit)

    # 3. facts of every section
    fill = {"model": str(model), "data": str(data),
            "results": str(results) if results is not None else "RESULTS"}
    todo = {k: v.format(**fill) for k, v in COMMANDS.items()}
    ds = _dataset_facts(dataset, scn,
                        None if results is None else Path(results) / "inspect.json")
    detection = _detection_facts(det) if det else None
    attribution = _attribution_facts(scn, detection)
    mitigation = _mitigation_facts(mit) if mit else None
    study_facts = [_study_facts(s) for s in stu]
    risk = assess_risk(det, dataset=ds["inspect"])
    sections = {
        "summary": "included", "dataset": "included",
        "detection": "included" if det else todo["detect"],
        "attribution": "included" if scn else todo["scan"],
        "mitigation": "included" if mit else todo["mitigate"],
        "study": "included" if stu else todo["study"],
        "methods": "included", "reproducibility": "included",
    }
    summary = _summary_facts(risk, detection, attribution, mitigation, todo)
    warnings = list((det or {}).get("summary", {}).get("warnings") or [])
    facts = {
        "diffmem_report": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "images": {"mode": mode, "policy": IMAGE_MODES[mode]},
        "risk": risk.to_dict(),
        "summary": summary,
        "sections": sections,
        "todo": todo,
        "dataset": {k: v for k, v in ds.items() if k != "inspect"} | {
            "inspect": _jsonable(ds["inspect"])},
        "detection": detection,
        "attribution": attribution,
        "mitigation": mitigation,
        "studies": study_facts,
        "methods": [dict(m) for m in METHODS],
        "references": REFERENCES,
        "reproducibility": _reproducibility(ident, dataset, found, det, scn, mit, stu, command,
                                            mode),
        "warnings": warnings,
    }

    # 4. pictures and HTML
    view = _pictures(facts, dataset, det, scn, mit, stu, mode)
    html = _render(facts, view)

    # 5. files
    html_path, json_path = out / REPORT_HTML, out / REPORT_JSON
    _write_text(html_path, html)
    facts["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(json_path, _jsonable(facts))
    log.info("report: %s (risk %s)", html_path, risk.level)
    return ReportResult(out=out, html=html_path, json=json_path, risk=risk.level,
                        sections=sections, images=mode, seconds=facts["seconds"],
                        warnings=warnings)


# ---------------------------------------------------------------------------- 1. inputs
def _is_report_folder(folder: Path) -> bool:
    try:
        return isinstance(json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
                          .get("diffmem_report"), int)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def _prepare_out(out: Path, *, overwrite: bool, inputs: list[Path]) -> Path:
    if out.is_dir() and any(out.iterdir()) and not overwrite and not _is_report_folder(out):
        raise OutputError(
            f"output folder {str(out)!r} exists and is not a previous report (it holds no "
            f"{REPORT_JSON} written by `diffmem report`); choose a new folder, or pass "
            "--overwrite to write report.html and report.json into it (nothing else in it is "
            "touched)")
    return prepare_out_dir(out, inputs=inputs)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror}") from None


# ---------------------------------------------------------------------------- 2. identity
def _identity(model: Path, dataset: Any) -> dict[str, Any]:
    """Fingerprints of the model weights and the data (the report's only use of the model)."""
    from diffmem.models import load_model

    log.info("fingerprinting the model weights in %s", model)
    adapter = load_model(model)
    card = {}
    if (model / "model_card.json").is_file():
        try:
            card = json.loads((model / "model_card.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            card = {}
    return {"model": str(model), "model_fingerprint": adapter.fingerprint(),
            "model_kind": adapter.kind, "model_card": card if isinstance(card, dict) else {},
            "data": str(dataset.root), "data_format": dataset.format,
            "data_fingerprint": dataset.subset(split="train").fingerprint(),
            "dataset_fingerprint": dataset.fingerprint()}


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
        checks.append(("scan", scn["folder"], (scn["summary"].get("model") or {})
                       .get("fingerprint"), None))
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
                f"the results were computed on, or re-run `diffmem {what}` with this model",
                path=folder)
        if d and d != data_fp:
            raise DataError(
                f"data mismatch: the {what} results were computed on training data with "
                f"fingerprint {d}, but the training split of --data {ident['data']} has "
                f"fingerprint {data_fp}; pass the data the results were computed on, or "
                f"re-run `diffmem {what}` on these data", path=folder)
    if scn is not None:
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


# ---------------------------------------------------------------------------- 3. facts
def _dataset_facts(dataset: Any, scn: dict | None,
                   inspected: Path | None = None) -> dict[str, Any]:
    """The dataset section: :func:`diffmem.data.inspect.summarize` (or the ``inspect.json``
    that ``diffmem demo`` wrote, when its fingerprint is this dataset's: inspecting decodes
    every image), marker and PHI-like pattern counts of the training prompts, and the scan's
    prompt clusters."""
    from diffmem.attribution.markers import marker_summary
    from diffmem.data import verify_images
    from diffmem.data.inspect import summarize

    summary = None
    if inspected is not None and inspected.is_file():
        try:
            summary = json.loads(inspected.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            summary = None
        if not isinstance(summary, dict) or summary.get("fingerprint") != dataset.fingerprint():
            summary = None
        else:
            log.info("dataset summary from %s", inspected)
    source = str(inspected) if summary is not None else "summarize"
    if summary is None:
        summary = summarize(verify_images(dataset, on_error="skip"))
    if "dicom_phi" in summary:  # where identifying elements are, never their values
        phi = summary["dicom_phi"]
        phi["examples"] = [{k: v for k, v in x.items() if k != "value"}
                           for x in phi.get("examples", [])]
    train = dataset.subset(split="train")
    markers = marker_summary(train.prompts)
    prompt_clusters = (scn["summary"].get("duplicates") if scn else None)
    return {"inspect": summary, "inspect_source": source, "train_prompts": len(train),
            "markers": markers,
            "prompt_clusters": prompt_clusters,
            "prompt_clusters_source": "scan (exact and TF-IDF near duplicates)" if scn else
            "inspect (exact duplicates only; run `diffmem scan` for near duplicates)"}


def _flag(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training prompts with their flags: memorized (calibrated copy), ratio criterion,
    noise-magnitude outlier; flagged = any of them."""
    main = [dict(p) for p in prompts if p["kind"] in ("train", "prompt")]
    outlier = noise_outliers([np.nan if p["noise_magnitude"] is None else p["noise_magnitude"]
                              for p in main])
    for p, o in zip(main, outlier):
        p["noise_outlier"] = bool(o)
        p["ratio_copy"] = bool(p["nn_ratio_copies"])
        p["flagged"] = bool(p["memorized"]) or p["ratio_copy"] or p["noise_outlier"]
    return main


def _detection_facts(det: dict[str, Any]) -> dict[str, Any]:
    s = det["summary"]
    main = _flag(det["prompts"])
    flagged = [p for p in main if p["flagged"]]
    flagged.sort(key=lambda p: (not p["memorized"], -(p["nn_similarity"] or -np.inf),
                                -(p["noise_magnitude"] or -np.inf)))
    copies_by_prompt: dict[str, list[dict]] = {}
    for c in det["copies"]:
        copies_by_prompt.setdefault(c["prompt"], []).append(c)
    top = []
    for p in flagged[:TOP_PROMPTS]:
        gens = sorted(copies_by_prompt.get(p["prompt"], []), key=lambda c: -(c["similarity"]
                                                                           or 0))
        top.append({**{k: p[k] for k in ("prompt", "kind", "study_id", "label",
                                         "noise_magnitude", "attention_entropy",
                                         "nn_similarity", "nn_study_id", "nn_d1_d2",
                                         "nn_copies", "memorized", "ratio_copy",
                                         "noise_outlier")},
                    "copies": [{k: c[k] for k in ("index", "seed", "similarity", "study_id",
                                                  "d1_d2", "ratio_copy")} for c in gens]})
    labelled = [p for p in main if p["label"] is not None]
    cfg = s.get("config") or {}
    return {
        "folder": str(det["folder"]),
        "config": {k: cfg.get(k) for k in ("methods", "generations", "steps",
                                           "num_inference_steps", "nn_generations",
                                           "sample_steps", "guidance", "seed", "backend",
                                           "fpr", "threshold", "unconditional", "unrelated")},
        "threshold": s.get("threshold"),
        "counts": s.get("counts") or {},
        "memorized_by_kind": s.get("memorized") or {},
        "prompts_scanned": len(main),
        "prompts_flagged": len(flagged),
        "prompts_memorized": sum(bool(p["memorized"]) for p in main),
        "noise_outliers": sum(p["noise_outlier"] for p in main),
        "ratio_copies": sum(p["ratio_copy"] for p in main),
        "labelled": len(labelled),
        "planted": sum(p["label"] == 1 for p in labelled),
        "evaluations": s.get("evaluations") or {},
        "rates": s.get("rates") or {},
        "copies_without_prompt": s.get("copies_without_prompt") or [],
        "top_flagged": top,
        "warnings": s.get("warnings") or [],
        "figures": sorted(det["figures"]),
    }


def _attribution_facts(scn: dict | None, detection: dict | None) -> dict[str, Any] | None:
    if scn is None:
        return None
    s = scn["summary"]
    by_prompt = {a["prompt"]: a for a in scn["attributions"]}
    chosen: list[str] = []
    if detection is not None:
        chosen = [p["prompt"] for p in detection["top_flagged"] if p["prompt"] in by_prompt]
    if not chosen:
        chosen = [a["prompt"] for a in sorted(scn["attributions"], key=lambda a: -float(
            a.get("memorization") or 0))[:TOP_PROMPTS]]
    heat = []
    for prompt in chosen[:TOP_PROMPTS]:
        a = by_prompt[prompt]
        ranked = sorted(a["units"], key=lambda u: (u.get("rank") or 10**9))
        heat.append({"prompt": prompt, "method": a.get("method"),
                     "memorization": a.get("memorization"),
                     "top_units": [{"text": u["text"], "kind": u.get("kind"),
                                    "share": u.get("share")} for u in ranked[:3]]})
    model = s.get("model") or None
    return {
        "folder": str(scn["folder"]),
        "n_prompts": s.get("n_prompts"), "n_distinct": s.get("n_distinct"),
        "model_part": None if model is None else {k: model.get(k) for k in (
            "method", "attributed", "distinct_prompts", "sampled", "params", "fingerprint")},
        "ranking_rule": (s.get("ranking") or {}).get("rule"),
        "components": (s.get("ranking") or {}).get("components") or ["enrichment"],
        "top_tokens": [{k: t.get(k) for k in ("token", "rank", "score", "kind", "count",
                                              "prompts_with_token", "enrichment",
                                              "model_score", "is_deid_marker")}
                       for t in scn["tokens"][:TABLE_TOKENS]],
        "top_marker": s.get("top_marker"),
        "attributions_available": bool(scn["attributions"]),
        "heat": heat,
    }


def _mitigation_facts(mit: dict[str, Any]) -> dict[str, Any]:
    s = mit["summary"]
    rec = s.get("recommended")
    if isinstance(rec, dict):
        name = rec.get("method") or rec.get("name")
        strength = rec.get("strength")
        rec_text = f"{name} (strength {strength})" if strength is not None else str(name)
    else:
        rec_text = None if rec in (None, "") else str(rec)
    return {"folder": str(mit["folder"]), "rows": mit["rows"],
            "baseline": s.get("baseline"), "pareto_front": s.get("pareto_front"),
            "recommended": rec_text, "recommended_raw": rec,
            "recommendation_reason": s.get("recommendation_reason"),
            "notes": [str(n) for n in (s.get("notes") or [])] if isinstance(
                s.get("notes"), list) else ([str(s["notes"])] if s.get("notes") else []),
            "threshold": s.get("threshold"), "encoder": s.get("encoder"),
            "seconds": s.get("seconds"), "config": s.get("config")}


def _study_facts(study: dict[str, Any]) -> dict[str, Any]:
    records = study["records"]
    columns: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in columns and (v is None or isinstance(v, (str, int, float, bool))):
                columns.append(k)
    return {"folder": str(study["folder"]), "study": study["study"], "title": study["title"],
            "findings": study["findings"], "columns": columns[:12], "records": records,
            "config": study["config"], "machine": study["machine"],
            "seconds": study["seconds"], "command": study["command"],
            "figures": [p.name for p in study["figures"]]}


def _summary_facts(risk: Any, detection: dict | None, attribution: dict | None,
                   mitigation: dict | None, todo: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"risk": risk.level, "reasons": risk.reasons}
    if detection is not None:
        t = detection["threshold"] or {}
        out.update(prompts_scanned=detection["prompts_scanned"],
                   prompts_flagged=detection["prompts_flagged"],
                   prompts_memorized=detection["prompts_memorized"],
                   fpr=t.get("fpr"), threshold=t.get("value"))
    else:
        out["detection"] = f"not run: {todo['detect']}"
    if attribution is not None:
        out["top_tokens"] = [{k: t[k] for k in ("token", "score", "is_deid_marker", "kind")}
                             for t in attribution["top_tokens"][:TOP_TOKENS]]
    else:
        out["top_tokens"] = None
        out["tokens"] = f"not run: {todo['scan']}"
    if mitigation is not None and mitigation["recommended"]:
        out["recommended_mitigation"] = mitigation["recommended"]
        out["recommendation_reason"] = mitigation["recommendation_reason"]
    elif mitigation is not None:
        out["recommended_mitigation"] = None
        out["recommendation_reason"] = "No mitigation is recommended: " + (
            mitigation["recommendation_reason"] or "the comparison names none; see the "
            "mitigation section")
    else:
        out["recommended_mitigation"] = None
        out["recommendation_reason"] = (f"no mitigation comparison yet: run {todo['mitigate']} "
                                        "to measure which mitigation lowers memorization at "
                                        "what cost")
    return out


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("diffmem", "torch", "diffusers", "transformers", "numpy", "open_clip_torch",
                 "jinja2"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _reproducibility(ident: dict, dataset: Any, found: Any, det: dict | None, scn: dict | None,
                     mit: dict | None, stu: list[dict], command: Any,
                     mode: str) -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    commands: dict[str, Any] = {}
    if det is not None:
        seeds["detect"] = (det["summary"].get("config") or {}).get("seed")
        commands["detect"] = _store_commands(det["folder"])
    if scn is not None:
        seeds["scan"] = ((scn["summary"].get("model") or {}).get("params") or {}).get("seed")
    if mit is not None:
        cfg = mit["summary"].get("config")
        seeds["mitigate"] = cfg.get("seed") if isinstance(cfg, dict) else None
    for s in stu:
        cfg = s["config"] if isinstance(s["config"], dict) else {}
        seeds[f"study {s['study']}"] = cfg.get("seed", cfg.get("seeds"))
        commands[f"study {s['study']}"] = s["command"]
    card = ident["model_card"]
    if isinstance(command, (list, tuple)):
        import shlex

        command = " ".join(shlex.quote(str(c)) for c in command)
    return {
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": _versions(),
        "model": ident["model"], "model_fingerprint": ident["model_fingerprint"],
        "model_kind": ident["model_kind"],
        "model_trained_on": (card.get("data") or {}).get("fingerprint")
        if isinstance(card.get("data"), dict) else None,
        "data": ident["data"], "data_format": ident["data_format"],
        "data_fingerprint": ident["data_fingerprint"],
        "dataset_fingerprint": ident["dataset_fingerprint"],
        "fingerprints_note": "model fingerprint: hash of the weights and tokenizer vocabulary; "
                             "data fingerprint: hash of the training split's ids, prompts and "
                             "image file sizes (the dataset fingerprint covers every split)",
        "seeds": seeds, "result_commands": commands, "inputs": found.to_dict(),
        "images": mode,
    }


def _store_commands(folder: Path) -> list[str]:
    """Command lines recorded in a detection's results store (read-only)."""
    path = Path(folder) / "results.sqlite"
    if not path.is_file():
        return []
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT command FROM runs ORDER BY id").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []
    out = []
    for (c,) in rows:
        if c:
            try:
                c = " ".join(json.loads(c)) if c.startswith("[") else c
            except ValueError:
                pass
            if c not in out:
                out.append(c)
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


# ---------------------------------------------------------------------------- 4. pictures
def _pictures(facts: dict, dataset: Any, det: dict | None, scn: dict | None, mit: dict | None,
              stu: list[dict], mode: str) -> dict[str, Any]:
    """Everything the HTML shows that report.json does not hold: data URIs and HTML snippets
    made by diffmem's own (escaping) renderers."""
    view: dict[str, Any] = {"figures": {}, "panels": [], "orphans": [], "heat": [], "studies": [],
                            "pareto": None, "tokens_chart": None}
    if det is not None:
        view["figures"] = {name: data_uri(path) for name, path in det["figures"].items()}
        train = dataset.subset(split="train")
        by_study: dict[str, list[Any]] = {}
        for s in train:
            by_study.setdefault(s.study_id, []).append(s)
        copies = {}
        for c in det["copies"]:
            copies.setdefault(c["prompt"], []).append(c)
        for p in facts["detection"]["top_flagged"]:
            view["panels"].append(_pairs(copies.get(p["prompt"], []), by_study, mode))
        orphans = [c for c in det["copies"] if c["kind"] in ("unrelated", "unconditional")]
        view["orphans"] = _pairs(orphans, by_study, mode)[:TOP_PROMPTS]
    view["patient_images"] = sum(bool(g[k]) for gens in view["panels"] + [view["orphans"]]
                                 for g in gens for k in ("generated", "training"))
    if scn is not None:
        view["tokens_chart"] = _tokens_chart(scn)
        if scn["attributions"]:
            from diffmem.attribution.render import render_html

            by_prompt = {a["prompt"]: a for a in scn["attributions"]}
            for h in facts["attribution"]["heat"]:
                view["heat"].append(render_html(_attribution(by_prompt[h["prompt"]])))
    if mit is not None and mit["pareto"] is not None:
        view["pareto"] = data_uri(mit["pareto"])
    for s in stu:
        view["studies"].append([{"name": p.name, "uri": data_uri(p)} for p in s["figures"]])
    return view


def _pairs(copies: list[dict[str, Any]], by_study: dict[str, list[Any]],
           mode: str) -> list[dict[str, Any]]:
    """Each copy generation (most similar first) with its nearest training image, as the image
    mode shows them."""
    out = []
    for c in sorted(copies, key=lambda c: -(c["similarity"] or 0)):
        nearest = _nearest_record(by_study.get(c["study_id"], []), c["image"])
        out.append({"similarity": c["similarity"], "study_id": c["study_id"],
                    "index": c["index"], "kind": c["kind"], "prompt": c["prompt"],
                    "generated": None if c["image"] is None else patient_image(c["image"], mode),
                    "training": None if nearest is None else patient_image(nearest.image, mode)})
    return out


def _nearest_record(records: list[Any], generated: Path | None) -> Any:
    """The training record of a study that the generation is nearest to (a study may hold
    several images: frontal and lateral)."""
    if not records:
        return None
    if len(records) == 1 or generated is None:
        frontal = [r for r in records if (r.view or "").upper() in ("PA", "AP")]
        return (frontal or records)[0]
    from diffmem.data.images import read_image

    g = read_image(generated, size=64).ravel()
    g = (g - g.mean()) / (g.std() + 1e-8)
    best, best_r = None, -np.inf
    for r in records:
        x = read_image(r.image, size=64).ravel()
        x = (x - x.mean()) / (x.std() + 1e-8)
        corr = float(np.mean(g * x))
        if corr > best_r:
            best, best_r = r, corr
    return best


def _attribution(d: dict[str, Any]) -> Any:
    """A :class:`~diffmem.attribution.TokenAttribution` from its ``to_dict()``."""
    from diffmem.attribution.result import TokenAttribution
    from diffmem.attribution.units import Unit

    units = [Unit(text=u["text"], start=int(u["start"]), end=int(u["end"]), kind=u["kind"],
                  key=u.get("key", u["text"]), convention=u.get("convention"),
                  tokens=tuple(u.get("tokens") or ())) for u in d["units"]]
    try:
        return TokenAttribution(prompt=d["prompt"], units=units,
                                scores=[float(u["score"]) for u in d["units"]],
                                method=str(d.get("method") or "?"),
                                memorization=d.get("memorization"))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"an attribution of attributions.jsonl is malformed ({e}); re-run "
                        "`diffmem scan --model`") from None


def _tokens_chart(scn: dict[str, Any]) -> str | None:
    """The risky-token bar chart, drawn by the scan's own plotting function."""
    from diffmem.attribution.render import plot_token_ranking
    from diffmem.attribution.scan import ScanResult

    rows = [t for t in scn["tokens"] if t.get("score") is not None]
    if not rows:
        return None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="diffmem-report-") as tmp:
        path = plot_token_ranking(ScanResult(rows, scn["summary"]), Path(tmp) / "tokens.png",
                                  top=TABLE_TOKENS)
        return data_uri(path)


# ---------------------------------------------------------------------------- render
def _render(facts: dict[str, Any], view: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("diffmem.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["pct"] = _pct
    return env.get_template("report.html.j2").render(f=facts, v=view, criteria=RISK_CRITERIA,
                                                     refs=REFERENCES)


def _num(x: Any, digits: int = 3) -> str:
    if x is None or x == "":
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    try:
        return f"{float(x):.{digits}g}"
    except (TypeError, ValueError):
        return str(x)


def _pct(x: Any, digits: int = 1) -> str:
    if x is None or x == "":
        return "–"
    try:
        return f"{100 * float(x):.{digits}f}%"
    except (TypeError, ValueError):
        return str(x)

"""The facts of each report section, as JSON-ready dicts (``report.json`` holds them; the HTML
template shows them): what the results say, never pictures. Also the methods the report
relies on and the papers they come from.
"""

from __future__ import annotations

import json
import logging
import platform
import sqlite3
import sys
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import package_versions
from diffmem.report.risk import OUTLIER_Z, noise_outliers
from diffmem.utils import shell_command

log = logging.getLogger(__name__)

__all__ = ["METHODS", "REFERENCES", "attribution_facts", "clipmem_facts", "dataset_facts",
           "detection_facts", "flag_prompts", "jsonable", "mitigation_facts", "not_measured",
           "reid_facts", "reproducibility", "study_facts", "summary_facts"]

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
    "li2025": "Li et al. Skewed Memorization in Large Language Models: Quantification and "
              "Decomposition. 2025.",
    "wu2025": "Y.-H. Wu, P. Marion, G. Biau, C. Boyer. Taking a Big Step: Large Learning Rates "
              "in Denoising Score Matching Prevent Memorization. COLT 2025.",
    "wang2025": "W. Wang, A. Dziedzic, G. C. Kim, M. Backes, F. Boenisch. Captured by "
                "Captions: On Memorization and its Mitigation in CLIP Models. ICLR 2025 "
                "(arXiv:2502.07830).",
    "packhauser2022": "K. Packhäuser, S. Gündel, N. Münster, C. Syben, V. Christlein, A. Maier. "
                      "Deep learning-based patient re-identification is able to exploit the "
                      "biometric nature of medical chest X-ray data. Scientific Reports 12, "
                      "2022.",
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
    {"name": "Skewed memorization", "section": "detection", "refs": ["li2025"],
     "how": "Copy generations per scanned prompt summarized as the share of all copies from the "
            "top 1% and 10% of prompts, the Gini coefficient and a Lorenz curve."},
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
    {"name": "CLIPMem", "section": "clipmem", "refs": ["wang2025"],
     "how": "An image-report encoder f trained on a pair and a reference g that was not, same "
            "recipe and initialization: CLIPMem is the pair's alignment (mean image-report "
            "cosine over augmented views) under f minus under g. Which tower: f's text or image "
            "tower swapped into g. Mitigations: f retrained with text-side changes, utility as "
            "held-out image-to-report retrieval recall@k."},
    {"name": "Training studies", "section": "study", "refs": ["wu2025", "somepalli2023b",
                                                             "wen2024"],
     "how": "Models trained under different settings (learning rate, training-time "
            "mitigations) and measured with the same detector."},
)


def dataset_facts(dataset: Any, scn: dict | None,
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


def flag_prompts(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def detection_facts(det: dict[str, Any]) -> dict[str, Any]:
    """The detection section: settings, threshold, counts per prompt kind, evaluations
    against planted labels, and the top flagged prompts (memorized first, then by nearest
    similarity and noise magnitude) with their copy generations.

    Parameters
    ----------
    det : dict
        :func:`~diffmem.report.inputs.read_detect`'s result.
    """
    s = det["summary"]
    main = flag_prompts(det["prompts"])
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
        "screen": s.get("screen"),
        "counts": s.get("counts") or {},
        "memorized_by_kind": s.get("memorized") or {},
        "prompts_scanned": len(main),
        "prompts_flagged": len(flagged),
        "prompts_memorized": sum(bool(p["memorized"]) for p in main)  # None: not measured
        if any(p["memorized"] is not None for p in main) else None,
        "noise_outliers": sum(p["noise_outlier"] for p in main),
        "ratio_copies": sum(p["ratio_copy"] for p in main),
        "labelled": len(labelled),
        "planted": sum(p["label"] == 1 for p in labelled),
        "evaluations": s.get("evaluations") or {},
        "rates": s.get("rates") or {},
        "skew": s.get("skew"),
        "copies_without_prompt": s.get("copies_without_prompt") or [],
        "top_flagged": top,
        "warnings": s.get("warnings") or [],
        "figures": sorted(det["figures"]),
    }


def leaks_not_copies(det: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``reidentified.csv`` that are not pixel copies, most similar first, at most
    :data:`TOP_PROMPTS` (what the report shows)."""
    leaks = det.get("reidentified") or []
    return sorted((r for r in leaks if not r["copy"]),
                  key=lambda r: -(r["reid_score"] or -np.inf))[:TOP_PROMPTS]


def reid_facts(det: dict[str, Any], reid_eval: dict[str, Any] | None = None,
               ) -> dict[str, Any] | None:
    """The patient re-identification section, when the detection ran re-ID verdicts
    (``diffmem detect --methods ...,reid``): the re-ID model and its threshold, leaks
    (generations that re-identify a training patient) beside pixel copies, and the leaks that
    are not copies (most similar first, at most :data:`TOP_PROMPTS` shown).

    Parameters
    ----------
    det : dict
        :func:`~diffmem.report.inputs.read_detect`'s result.
    reid_eval : dict, optional
        :func:`~diffmem.report.inputs.read_reid_eval`'s result: the verification AUC shown.
        Without it, the validation numbers the model was trained with (its
        ``reid_config.json``) are shown, labelled so; without those, "not measured".

    Returns
    -------
    dict or None
        None when the detection has no re-ID verdicts.
    """
    s = det["summary"].get("reid")
    if not isinstance(s, dict):
        return None
    verification, warnings = None, []
    if reid_eval is not None:
        nd = reid_eval.get("near_duplicate") or {}
        verification = {
            "source": f"reid_eval.json ({reid_eval['path']})",
            "auc": reid_eval.get("auc"), "tpr_at_1pct_fpr": reid_eval.get("tpr_at_1pct_fpr"),
            "pairs": reid_eval.get("pairs"), "patients": reid_eval.get("patients"),
            "auc_not_near_duplicate": nd.get("auc_not_near_duplicate"),
            "split": reid_eval.get("split"),
            "includes_training_patients": (reid_eval.get("data") or {}).get(
                "includes_training_patients")}
        evaluated = (reid_eval.get("model") or {}).get("fingerprint")
        if evaluated and evaluated != s.get("model_fingerprint"):
            warnings.append(f"the re-ID evaluation {reid_eval['path']} is of another model "
                            f"(fingerprint {evaluated}) than the detection used "
                            f"({s.get('model_fingerprint')})")
    elif isinstance(s.get("validation"), dict):
        v = s["validation"]
        verification = {"source": "the model's own validation at training "
                                  f"({v.get('source') or 'held-out patients'})",
                        "auc": v.get("auc"), "tpr_at_1pct_fpr": v.get("tpr_at_1pct_fpr"),
                        "pairs": v.get("pairs"), "patients": v.get("patients"),
                        "auc_not_near_duplicate": v.get("auc_not_near_duplicate"),
                        "split": None, "includes_training_patients": False}
    return {
        "model": s.get("model"), "model_fingerprint": s.get("model_fingerprint"),
        "training_patients": s.get("training_patients"),
        "threshold": s.get("threshold"),
        "counts": s.get("counts") or {},
        "verification": verification,
        "leaks_not_copies_total": sum(not r["copy"] for r in det.get("reidentified") or []),
        "leaks_not_copies": [{k: r[k] for k in ("kind", "prompt", "index", "seed", "reid_score",
                                                "reid_patient_id", "reid_study_id",
                                                "reid_own_patient", "similarity", "study_id")}
                             for r in leaks_not_copies(det)],
        "warnings": warnings,
    }


def attribution_facts(scn: dict | None, detection: dict | None) -> dict[str, Any] | None:
    """The attribution section (None without a scan): the ranking rule, the top tokens, and
    which prompts get heat-coloured attributions: the top flagged prompts of ``detection``
    that the scan attributed, else the scan's most memorized prompts."""
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


def mitigation_facts(mit: dict[str, Any]) -> dict[str, Any]:
    """The mitigation section from :func:`~diffmem.report.inputs.read_mitigate`'s result
    (the recommendation as text, whether ``summary.json`` names it as a string or a dict)."""
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
            "memorization_metric": s.get("memorization_metric") or "memorization_rate",
            "not_measured": [str(x) for x in s.get("not_measured") or []],
            "seconds": s.get("seconds"), "config": s.get("config"),
            "reid": any(r.get("reid_rate") is not None for r in mit["rows"])}


def clipmem_facts(cm: dict[str, Any]) -> dict[str, Any]:
    """The "Image-report encoder memorization" section from
    :func:`~diffmem.report.inputs.read_clipmem`'s result: AUC and baselines, mean CLIPMem by
    planted kind, the tower table and finding, the mitigation table, the top pairs."""
    s = cm["summary"]
    towers = s.get("towers") if isinstance(s.get("towers"), dict) else {}
    mit = s.get("mitigations") if isinstance(s.get("mitigations"), dict) else {}
    return {"folder": str(cm["folder"]), "method": s.get("method"),
            "preset": s.get("preset"), "seeds": s.get("seeds"), "views": s.get("views"),
            "scored_pairs": s.get("scored_pairs", cm["scored"]),
            "positive_kind": s.get("positive_kind"), "auc": s.get("auc"),
            "positives": s.get("positives"), "negatives": s.get("negatives"),
            "baseline_auc": s.get("baseline_auc") or {},
            "by_kind": s.get("by_kind") or {},
            "towers": [r for r in towers.get("table") or [] if isinstance(r, dict)],
            "tower_finding": towers.get("finding"),
            "space_check": [r.get("space_check") for r in s.get("runs") or []
                            if isinstance(r, dict) and r.get("space_check")],
            "mitigations": cm["mitigations"],
            "mitigation_memorization": mit.get("memorization"),
            "mitigation_utility": mit.get("utility"),
            "utility_reference_g": mit.get("utility_reference_g"),
            "top": [{k: r.get(k) for k in ("study_id", "image_id", "prompt", "clipmem",
                                           "alignment_f", "alignment_g", "plant_kind")}
                    for r in cm["top"]],
            "wall_seconds": s.get("wall_seconds")}


def not_measured(dataset: Any, det: dict | None, mit: dict | None) -> list[str]:
    """What the report could not show with the inputs given, each with what would show it:
    the parts that need the training data (``dataset`` None), a detection without copy
    verdicts, and what the mitigation comparison itself lists as not measured."""
    out = []
    if dataset is None:
        out.append("the dataset section (splits, duplicate images, de-identification markers, "
                   "DICOM header PHI), the training images beside the copies, and the check "
                   "that the results were computed on this model's training data: no training "
                   "data was given; build the report with --data DATA")
    if det is not None:
        s = det["summary"]
        if not s.get("threshold") or "nn" not in (s.get("config") or {}).get("methods", []):
            out.append("copies of training images: the detection ran without reference images, "
                       "so its memorization signals are model scores (noise magnitude, attention "
                       "entropy) and no generation was compared with a training image; run "
                       "`diffmem detect` with --methods nn and --reference DATA|IMAGE_DIR "
                       "(with --calibration DIR or --threshold)")
    if mit is not None:
        listed = mit["summary"].get("not_measured")
        out += [f"mitigation: {x}" for x in (listed if isinstance(listed, list) else [])]
    return out


def study_facts(study: dict[str, Any]) -> dict[str, Any]:
    """One training study's section: its findings, records (with the scalar columns the table
    shows, at most 12) and figure names."""
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


def summary_facts(risk: Any, detection: dict | None, attribution: dict | None,
                  mitigation: dict | None, todo: dict[str, str]) -> dict[str, Any]:
    """The summary: risk level and reasons, prompts scanned / flagged / memorized, top tokens,
    and the recommended mitigation, or what to run where a part is missing."""
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
    versions = package_versions("diffmem", "torch", "diffusers", "transformers", "numpy",
                                "open_clip_torch", "jinja2")
    return {"python": versions.pop("python"), "platform": platform.platform(), **versions}


def reproducibility(ident: dict, found: Any, det: dict | None, scn: dict | None,
                    mit: dict | None, stu: list[dict], *, command: Any,
                    mode: str) -> dict[str, Any]:
    """Reproducibility: command lines, package versions, seeds, model and data fingerprints,
    the results folders read (``det``, ``scn``, ``mit``, ``stu``: what was read of each) and the
    image mode."""
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
    return {
        "command": shell_command(command or [Path(sys.argv[0]).name, *sys.argv[1:]]),
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
                parsed = json.loads(c) if c.startswith("[") else c
            except ValueError:
                parsed = c
            c = shell_command(parsed if isinstance(parsed, (str, list)) else c)
            if c not in out:
                out.append(c)
    return out


def jsonable(obj: Any) -> Any:
    """``obj`` with paths as strings and NumPy scalars as Python numbers (for JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj

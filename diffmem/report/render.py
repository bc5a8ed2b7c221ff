"""The report's pictures and HTML: figures and patient images as ``data:`` URIs (as the image
mode says, :mod:`diffmem.report.images`), heat-coloured prompts from
:func:`diffmem.attribution.render_html`, and the Jinja2 template (autoescape on)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import DataError, DiffMemError
from diffmem.report.images import data_uri, patient_image
from diffmem.report.risk import RISK_CRITERIA
from diffmem.report.sections import REFERENCES, TABLE_TOKENS, TOP_PROMPTS, leaks_not_copies

log = logging.getLogger(__name__)

__all__ = ["pictures", "render_report"]


def pictures(facts: dict, dataset: Any, det: dict | None, scn: dict | None, mit: dict | None,
             stu: list[dict], mode: str, *, cm: dict | None = None) -> dict[str, Any]:
    """Everything the HTML shows that report.json does not hold: data URIs and HTML snippets
    made by diffmem's own (escaping) renderers."""
    view: dict[str, Any] = {"figures": {}, "panels": [], "orphans": [], "heat": [], "studies": [],
                            "pareto": None, "tokens_chart": None, "reid_pairs": [],
                            "clipmem": _clipmem_pictures(facts, dataset, cm, mode)}
    if det is not None:
        view["figures"] = {name: data_uri(path) for name, path in det["figures"].items()}
        by_study: dict[str, list[Any]] = {}  # no training images to show without data
        for s in dataset.subset(split="train") if dataset is not None else []:
            by_study.setdefault(s.study_id, []).append(s)
        copies = {}
        for c in det["copies"]:
            copies.setdefault(c["prompt"], []).append(c)
        for p in facts["detection"]["top_flagged"]:
            view["panels"].append(_pairs(copies.get(p["prompt"], []), by_study, mode))
        orphans = [c for c in det["copies"] if c["kind"] in ("unrelated", "unconditional")]
        view["orphans"] = _pairs(orphans, by_study, mode)[:TOP_PROMPTS]
        if facts.get("reid"):
            view["reid_pairs"] = [_patient_pair(r, by_study, mode) for r in leaks_not_copies(det)]
    view["patient_images"] = sum(bool(g[k]) for gens in view["panels"] + [view["orphans"]]
                                 + [view["reid_pairs"]]
                                 for g in gens for k in ("generated", "training")) + \
        sum(bool(x) for x in view["clipmem"]["images"])
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


def _clipmem_pictures(facts: dict, dataset: Any, cm: dict | None, mode: str) -> dict[str, Any]:
    """The CLIPMem figures and the images of its top pairs (found by image id in the report's
    data, else in the data the CLIPMem run read), as the image mode shows them."""
    view: dict[str, Any] = {"figure": None, "mitigations_plot": None, "images": []}
    if cm is None:
        return view
    view["figure"] = None if cm["figure"] is None else data_uri(cm["figure"])
    view["mitigations_plot"] = None if cm["mitigations_plot"] is None \
        else data_uri(cm["mitigations_plot"])
    top = facts["clipmem"]["top"]
    paths: dict[str, str] = {}
    if mode != "omit":
        sources = [dataset] if dataset is not None else []
        root = cm["summary"].get("data")
        if root and Path(root).exists() and (dataset is None or
                                             Path(root) != Path(dataset.root)):
            from diffmem.data import load

            try:
                sources.append(load(root))
            except (DiffMemError, OSError) as e:  # a moved dataset only costs the pictures
                log.warning("CLIPMem pictures: cannot read %s (%s); images left out", root, e)
        wanted = {r["image_id"] for r in top}
        for source in sources:
            for s in source:
                if s.image_id in wanted and s.image_id not in paths:
                    paths[s.image_id] = s.image
    view["images"] = [patient_image(paths[r["image_id"]], mode)
                      if r["image_id"] in paths else None for r in top]
    return view


def _pairs(copies: list[dict[str, Any]], by_study: dict[str, list[Any]],
           mode: str) -> list[dict[str, Any]]:
    """Each copy generation (most similar first) with its nearest training image, as the image
    mode shows them."""
    out = []
    for c in sorted(copies, key=lambda c: -(c["similarity"] or 0)):
        nearest = _nearest_record(by_study.get(c["study_id"], []), c["image"])
        resolution = _side(c["image"]) if mode != "omit" else None
        out.append({"similarity": c["similarity"], "study_id": c["study_id"],
                    "index": c["index"], "kind": c["kind"], "prompt": c["prompt"],
                    "resolution": resolution,
                    "generated": None if c["image"] is None else patient_image(c["image"], mode),
                    "training": None if nearest is None else patient_image(nearest.image, mode),
                    "training_compared": None if nearest is None or resolution is None else
                    patient_image(nearest.image, mode, resolution=resolution)})
    return out


def _patient_pair(leak: dict[str, Any], by_study: dict[str, list[Any]],
                  mode: str) -> dict[str, Any]:
    """A generation that re-identifies a training patient, with the image of that patient's
    best-matching study (as the image mode shows them)."""
    record = _nearest_record(by_study.get(leak["reid_study_id"], []), leak["image"])
    return {"generated": None if leak["image"] is None else patient_image(leak["image"], mode),
            "training": None if record is None else patient_image(record.image, mode)}


def _side(image: Path | None) -> int | None:
    """Side in pixels of a generated image file (None when there is none)."""
    if image is None:
        return None
    from PIL import Image

    with Image.open(image) as im:
        return int(min(im.size))


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

    with tempfile.TemporaryDirectory(prefix="diffmem-report-") as tmp:
        path = plot_token_ranking(ScanResult(rows, scn["summary"]), Path(tmp) / "tokens.png",
                                  top=TABLE_TOKENS)
        return data_uri(path)


def render_report(facts: dict[str, Any], view: dict[str, Any]) -> str:
    """The report's HTML: ``templates/report.html.j2`` (autoescape on, undefined names are
    errors) rendered with the facts and the pictures."""
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

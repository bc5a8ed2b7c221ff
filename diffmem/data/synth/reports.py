"""Radiology report text in the MIMIC-CXR style, written from :class:`Findings`.

A report has MIMIC's banner (``FINAL REPORT``) and sections (``EXAMINATION:``,
``INDICATION:``, ``TECHNIQUE:``, ``COMPARISON:``, ``FINDINGS:``, ``IMPRESSION:``), lines
wrapped at about 78 characters with one leading space, and the de-identification marker ``___``
wherever MIMIC removed protected health information: ages (``___-year-old man``), names
(``Dr. ___``), dates (``Compared to prior study from ___``) and some times. Follow-up reports
are comparison-heavy; urgent findings carry a communication sentence (``Dr. ___ was notified
...``). Phrasing is drawn from a small grammar so that most impressions are distinct, as in
MIMIC, while common normal impressions ("No acute cardiopulmonary process.") repeat.

The IMPRESSION is always the last section and never contains a line that reads as a section
header, so a MIMIC report parser returns exactly :attr:`Report.impression` (whitespace
collapsed).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

import numpy as np

from diffmem.data.synth.findings import Findings

MARKER = "___"

# A wrapped line that a section parser would read as a header ("WORD WORDS:" at line start).
_HEADERISH = re.compile(r"^\s*[A-Z][A-Z0-9 /()&,'-]{0,60}?\s*:")


@dataclass(frozen=True)
class ReportStyle:
    """Rates of the report grammar (see the preset field ``report``).

    Attributes
    ----------
    comparison_marker_rate : float
        Probability that a follow-up impression opens with a dated comparison
        (``"Compared to prior study from ___, ..."``).
    communication_rate_urgent : float
        Probability of a communication-of-findings sentence (``"Dr. ___ was notified ..."``)
        when something new and urgent is seen.
    communication_rate_other : float
        The same for any other study.
    numbered_rate : float
        Probability that an impression with two or more items is a numbered list.
    findings_section_rate : float
        Probability that a portable (ICU) report has a FINDINGS section (outpatient reports
        always do).
    """

    comparison_marker_rate: float = 0.3
    communication_rate_urgent: float = 0.55
    communication_rate_other: float = 0.03
    numbered_rate: float = 0.3
    findings_section_rate: float = 0.6


@dataclass(frozen=True)
class Report:
    """A written report and its IMPRESSION (the prompt a model is conditioned on)."""

    text: str
    impression: str


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def _sentence(s: str) -> str:
    s = s.strip()
    return _cap(s) if s.endswith((".", "?")) else _cap(s) + "."


# -- vocabulary ------------------------------------------------------------------------------
_LOBE_ZONE = {"right upper lobe": "right upper lung", "right middle lobe": "right mid lung",
              "right lower lobe": "right lung base", "left upper lobe": "left upper lung",
              "lingula": "left mid lung", "left lower lobe": "left lung base"}
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}
_TIMES = ("7:45 a.m.", "8:10 a.m.", "9:05 a.m.", "10:20 a.m.", "11:35 a.m.", "12:50 p.m.",
          "1:15 p.m.", "2:40 p.m.", "3:25 p.m.", "4:05 p.m.", "5:30 p.m.", "6:55 p.m.",
          "8:15 p.m.", "10:45 p.m.", "11:50 p.m.", "2:10 a.m.", "4:35 a.m.", "5:50 a.m.")


def _time(rng: np.random.Generator, marker_p: float = 0.5) -> str:
    return MARKER if rng.random() < marker_p else _pick(rng, _TIMES)


def _age_sex(rng: np.random.Generator, sex: str) -> str:
    noun = "man" if sex == "M" else "woman"
    form = rng.random()
    if form < 0.45:
        return f"{MARKER}-year-old {noun}"
    if form < 0.75:
        return f"{MARKER} year old {noun}"
    return f"{MARKER}{sex}"


_OUT_COMPLAINTS = ("cough", "cough and fever", "chest pain", "shortness of breath",
                   "dyspnea on exertion", "pleuritic chest pain", "hemoptysis", "weight loss",
                   "history of lung cancer", "hypertension", "fall", "productive cough",
                   "wheezing", "chronic cough", "palpitations", "abnormal CT",
                   "history of sarcoidosis", "prior tuberculosis exposure", "fatigue")
_OUT_QUESTIONS = ("eval for pneumonia", "r/o pna", "evaluate for pneumonia", "eval for effusion",
                  "pre-operative evaluation", "assess for interval change", "r/o acute process",
                  "eval for infiltrate", "eval for mass", "please assess for consolidation")
_ICU_REASONS = ("respiratory failure", "sepsis", "ventilator dependence", "hypoxia", "s/p CABG",
                "acute respiratory distress", "pneumonia", "fluid overload",
                "altered mental status", "GI bleed", "septic shock",
                "cardiac arrest", "COPD exacerbation", "CHF exacerbation", "s/p fall, on vent")
_ICU_QUESTIONS = ("interval change", "evaluate ET tube position", "eval for pneumothorax",
                  "assess line placement", "evaluate NG tube placement", "eval for edema",
                  "eval for effusion", "please assess tube position", "eval for infiltrate",
                  "r/o ptx")


def _indication(rng, sex: str, icu: bool, f: Findings) -> tuple[str, str]:
    """(header, text) of the indication section."""
    reason = _pick(rng, _ICU_REASONS if icu else _OUT_COMPLAINTS)
    question = _pick(rng, _ICU_QUESTIONS if icu else _OUT_QUESTIONS)
    if icu and "cvl" in f.devices and rng.random() < 0.3:
        question = "line placement"
    who = _age_sex(rng, sex)
    r = rng.random()
    if r < 0.55:
        text = f"{who} with {reason}  // {question}"
    elif r < 0.85:
        text = f"{who} with {reason}.  {_cap(question)}."
    elif r < 0.95:
        text = f"{_cap(reason)}."
    else:
        text = f"{who} with {reason}, {question}."
    header = "HISTORY" if rng.random() < 0.12 else "INDICATION"
    return header, text


# -- findings sentences ------------------------------------------------------------------------
def _device_sentences(rng, f: Findings) -> list[str]:
    d = f.devices
    out = []
    if "ett" in d:
        cm = d["ett"]
        out.append(_pick(rng, (f"endotracheal tube terminates {cm} cm above the carina",
                               f"ET tube tip is {cm} cm above the carina",
                               f"the endotracheal tube is in standard position, about {cm} cm "
                               "above the carina",
                               f"endotracheal tube tip projects {cm} cm above the carina")))
        if cm <= 1:
            out[-1] += ", " + _pick(rng, ("too low", "near the carina, and could be withdrawn "
                                          "by 2 cm"))
        elif cm >= 7:
            out[-1] += ", " + _pick(rng, ("high in position", "and could be advanced by 2 cm"))
    if "ng" in d:
        if d["ng"] == "stomach":
            out.append(_pick(rng, ("enteric tube courses below the diaphragm with the tip in "
                                   "the stomach", "nasogastric tube tip is in the stomach",
                                   "the orogastric tube terminates in the stomach",
                                   "an enteric tube passes below the diaphragm, out of view")))
        else:
            out.append(_pick(rng, ("the enteric tube tip is in the distal esophagus and should "
                                   "be advanced", "nasogastric tube terminates in the "
                                   "esophagus; advancement is recommended")))
    if "cvl" in d:
        entry, tip = d["cvl"].split(":")
        name = {"right_ij": "right internal jugular", "left_ij": "left internal jugular",
                "left_subclavian": "left subclavian"}[entry]
        where = {"svc": _pick(rng, ("the mid SVC", "the SVC", "the low SVC")),
                 "cavoatrial": "the cavoatrial junction", "right_atrium": "the right atrium"}[tip]
        out.append(_pick(rng, (f"{name} central venous catheter tip is in {where}",
                               f"{name} line terminates in {where}",
                               f"the {name} catheter ends in {where}")))
    if "picc" in d:
        out.append(_pick(rng, (f"{d['picc']} PICC line terminates in the low SVC",
                               f"{d['picc']}-sided PICC tip is in the SVC")))
    if "chest_tube" in d:
        out.append(_pick(rng, (f"{d['chest_tube']} chest tube is in place",
                               f"a {d['chest_tube']}-sided pigtail catheter is in place",
                               f"{d['chest_tube']} pleural drain remains in place")))
    if "pacemaker" in d:
        leads = ("leads in the right atrium and right ventricle" if d["pacemaker"] == "dual"
                 else "a single lead in the right ventricle")
        out.append(_pick(rng, (f"left-sided pacemaker with {leads}",
                               f"a left chest wall pacemaker is present with {leads}",
                               f"left pectoral pacing device with {leads}")))
    if "sternotomy" in d:
        out.append(_pick(rng, ("median sternotomy wires are intact",
                               "the patient is status post median sternotomy",
                               "sternotomy wires are noted")))
    return out


def _effusion_phrase(rng, eff: dict) -> str:
    if len(eff) == 2 and eff["right"] == eff["left"]:
        return f"{eff['right']} bilateral pleural effusions"
    if len(eff) == 2:
        return f"{eff['right']} right and {eff['left']} left pleural effusions"
    side, size = next(iter(eff.items()))
    return _pick(rng, (f"{size} {side} pleural effusion", f"{size} {side}-sided pleural effusion",
                       f"{size} {side} effusion"))


def _finding_phrases(rng, f: Findings) -> list[str]:
    """Noun phrases / clauses for what is present (used by findings and impression)."""
    return [p for _, p in _finding_items(rng, f)]


def _finding_items(rng, f: Findings) -> list[tuple[str, str]]:
    """(category, phrase) for what is present; categories are :class:`Findings` fields."""
    out = []
    if f.pneumothorax:
        side, size = next(iter(f.pneumothorax.items()))
        out.append(("pneumothorax", _pick(rng, (f"{size} {side} apical pneumothorax",
                                                f"{size} {side} pneumothorax",
                                                f"{size} {side}-sided pneumothorax"))))
    if f.consolidation:
        lobe = f.consolidation[0]
        out.append(("consolidation", _pick(rng, (
            f"{lobe} opacity concerning for pneumonia",
            f"focal consolidation in the {lobe}, compatible with pneumonia",
            f"patchy opacity in the {_LOBE_ZONE[lobe]}, which may reflect atelectasis, though "
            "infection cannot be excluded",
            f"{lobe} pneumonia",
            f"opacification of the {lobe} concerning for aspiration or pneumonia"))))
    if f.edema:
        out.append(("edema", _pick(rng, (f"{f.edema} pulmonary edema",
                                         f"{f.edema} interstitial edema",
                                         f"{f.edema} pulmonary vascular congestion and edema"))))
    if f.effusion:
        out.append(("effusion", _effusion_phrase(rng, f.effusion)))
    if f.atelectasis:
        where = "bibasilar" if len(f.atelectasis) == 2 else f"{f.atelectasis[0]} basilar"
        out.append(("atelectasis", _pick(rng, (f"{where} atelectasis",
                                               f"{where} opacities, likely atelectasis",
                                               f"mild {where} atelectasis"))))
    if f.cardiomegaly:
        out.append(("cardiomegaly", _pick(rng, (
            f"{f.cardiomegaly} cardiomegaly",
            f"{_ADVERB[f.cardiomegaly]} enlarged cardiac silhouette",
            f"{f.cardiomegaly} enlargement of the cardiac silhouette"))))
    if f.nodule:
        lobe, mm = f.nodule
        out.append(("nodule", _pick(rng, (
            f"{mm} mm nodule in the {lobe}",
            f"{mm} mm nodular opacity projecting over the {_LOBE_ZONE[lobe]}"))))
    return out


_NORMAL_IMPRESSIONS = ("no acute cardiopulmonary process", "no acute intrathoracic process",
                       "no acute cardiopulmonary abnormality", "no evidence of pneumonia",
                       "normal chest radiograph", "no radiographic evidence of pneumonia",
                       "no acute findings in the chest", "clear lungs without acute process",
                       "no focal consolidation to suggest pneumonia",
                       "no acute cardiopulmonary process. No evidence of pneumonia")
_INCIDENTAL = ("mild degenerative changes of the thoracic spine",
               "atherosclerotic calcification of the aortic knob",
               "stable calcified granuloma", "small hiatal hernia",
               "mild tortuosity of the thoracic aorta", "healed left rib fractures",
               "mild hyperinflation, which may reflect chronic obstructive pulmonary disease",
               "mild biapical pleural thickening")


def _findings_section(rng, f: Findings, prior: Findings | None, ap: bool) -> str:
    s = []
    if prior is not None and rng.random() < 0.5:
        s.append(_pick(rng, (f"Comparison is made to the prior study from {MARKER}",
                             "Compared to the prior exam",
                             f"As compared to {MARKER}",
                             "In comparison to the previous radiograph")) +
                 ", " + ("there has been interval change." if f != prior
                         else "there is no significant change."))
    s += [_sentence(x) for x in _device_sentences(rng, f)]
    if f.cardiomegaly:
        s.append(_sentence(_pick(rng, (f"{f.cardiomegaly} cardiomegaly is "
                                       + _pick(rng, ("stable", "again seen", "noted")),
                                       f"the heart is {_ADVERB[f.cardiomegaly]} enlarged"))))
    else:
        s.append(_sentence(_pick(rng, ("the cardiomediastinal silhouette is within normal limits",
                                       "heart size is normal",
                                       "the cardiac and mediastinal silhouettes are "
                                       "unremarkable",
                                       "cardiomediastinal and hilar contours are normal",
                                       "heart size is top normal"))))
    lungs = [p for p in _finding_phrases(rng, f)
             if not any(w in p for w in ("cardio", "cardiac"))]
    if lungs:
        s += [_sentence(("there is " if rng.random() < 0.4 else "") + p) for p in lungs]
    else:
        s.append(_sentence(_pick(rng, ("the lungs are clear without focal consolidation",
                                       "lungs are clear", "no focal consolidation is seen",
                                       "the lungs are well expanded and clear"))))
    if not f.effusion and not f.pneumothorax:
        s.append(_sentence(_pick(rng, ("no pleural effusion or pneumothorax is seen",
                                       "there is no pleural effusion or pneumothorax",
                                       "no pleural effusion or pneumothorax",
                                       "no pneumothorax or large pleural effusion"))))
    elif not f.pneumothorax:
        s.append("No pneumothorax.")
    if f.granuloma:
        s.append(_sentence("a calcified granuloma projects over the right upper lung"))
    if not ap and rng.random() < 0.4:
        s.append(_sentence(_pick(rng, ("no acute osseous abnormalities",
                                       "the visualized osseous structures are unremarkable",
                                       "degenerative changes of the thoracic spine are noted",
                                       "there are no acute osseous abnormalities"))))
    return "  ".join(s)


def _changes(rng, f: Findings, prior: Findings) -> tuple[list[str], bool]:
    """Clauses describing change from ``prior`` to ``f`` and whether something urgent is new."""
    out, urgent = [], False
    d0, d1 = prior.devices, f.devices
    if "ett" in d1 and "ett" not in d0:
        out.append(f"interval placement of an endotracheal tube, which terminates {d1['ett']} cm "
                   "above the carina")
        urgent |= d1["ett"] <= 1 or d1["ett"] >= 7
    elif "ett" in d0 and "ett" not in d1:
        out.append(_pick(rng, ("the endotracheal tube has been removed",
                               "interval extubation", "the patient has been extubated")))
    elif "ett" in d1 and d1["ett"] != d0["ett"]:
        verb = "advanced" if d1["ett"] < d0["ett"] else "withdrawn"
        out.append(f"the endotracheal tube has been {verb} and now terminates {d1['ett']} cm "
                   "above the carina")
        urgent |= d1["ett"] <= 1
    if "ng" in d1 and "ng" not in d0:
        out.append("an enteric tube has been placed, with the tip in the "
                   + ("stomach" if d1["ng"] == "stomach" else "distal esophagus"))
        urgent |= d1["ng"] != "stomach"
    elif "ng" in d0 and "ng" not in d1:
        out.append("the enteric tube has been removed")
    if "cvl" in d1 and "cvl" not in d0:
        entry = {"right_ij": "right internal jugular", "left_ij": "left internal jugular",
                 "left_subclavian": "left subclavian"}[d1["cvl"].split(":")[0]]
        tip = {"svc": "the SVC", "cavoatrial": "the cavoatrial junction",
               "right_atrium": "the right atrium"}[d1["cvl"].split(":")[1]]
        out.append(f"new {entry} line with the tip in {tip}"
                   + ("" if f.pneumothorax else ". No pneumothorax"))
    elif "cvl" in d0 and "cvl" not in d1:
        out.append("the central venous catheter has been removed")
    if "chest_tube" in d1 and "chest_tube" not in d0:
        out.append(f"interval placement of a {d1['chest_tube']} chest tube")
    elif "chest_tube" in d0 and "chest_tube" not in d1:
        out.append(f"the {d0['chest_tube']} chest tube has been removed")
    # pneumothorax
    p0, p1 = prior.pneumothorax, f.pneumothorax
    if p1 and not p0:
        side, size = next(iter(p1.items()))
        out.append(f"new {size} {side} pneumothorax")
        urgent = True
    elif p0 and not p1:
        out.append(_pick(rng, ("no residual pneumothorax", "the pneumothorax has resolved")))
    elif p1 and p0 and p1 != p0:
        side, size = next(iter(p1.items()))
        word = "decrease" if _rank(size) < _rank(p0.get(side)) else "increase"
        out.append(f"{word} in size of the {side} pneumothorax, now {size}")
        urgent |= word == "increase"
    # effusions
    for side in ("right", "left"):
        e0, e1 = prior.effusion.get(side), f.effusion.get(side)
        if e1 and not e0:
            out.append(f"new {e1} {side} pleural effusion")
        elif e0 and not e1:
            out.append(f"interval resolution of the {side} pleural effusion")
        elif e0 and e1 and e0 != e1:
            word = "increased" if _rank(e1) > _rank(e0) else "decreased"
            out.append(f"{side} pleural effusion has {word}, now {e1}")
    # edema
    if f.edema != prior.edema:
        if f.edema and not prior.edema:
            out.append(f"new {f.edema} pulmonary edema")
        elif prior.edema and not f.edema:
            out.append(_pick(rng, ("pulmonary edema has resolved",
                                   "interval resolution of pulmonary edema")))
        else:
            word = ("improved" if _rank(f.edema, ("mild", "moderate", "severe"))
                    < _rank(prior.edema, ("mild", "moderate", "severe")) else "worsened")
            out.append(f"pulmonary edema has {word}, now {f.edema}")
    if f.consolidation and f.consolidation != prior.consolidation:
        out.append(f"new opacity in the {_LOBE_ZONE[f.consolidation[0]]}, concerning for "
                   + _pick(rng, ("pneumonia", "aspiration", "infection")))
        urgent = True
    elif prior.consolidation and not f.consolidation:
        out.append(f"interval resolution of the {_LOBE_ZONE[prior.consolidation[0]]} opacity")
    if f.atelectasis != prior.atelectasis:
        if f.atelectasis:
            where = "bibasilar" if len(f.atelectasis) == 2 else f"{f.atelectasis[0]} basilar"
            out.append(f"{_pick(rng, ('new', 'increased', 'worsening'))} {where} atelectasis")
        else:
            out.append("improved aeration at the lung bases")
    return out, urgent


def _changed_categories(f: Findings, prior: Findings) -> set[str]:
    return {c for c in ("pneumothorax", "consolidation", "edema", "effusion", "atelectasis",
                        "cardiomegaly", "nodule") if getattr(f, c) != getattr(prior, c)}


def _rank(size, order=("small", "moderate", "large")):
    return -1 if size is None else order.index(size)


def communication_sentence(rng) -> str:
    """One communication-of-findings sentence as the report grammar writes it (markers for
    names and dates, a time that is itself redacted about half of the time)."""
    t = _time(rng, 0.55)
    return _pick(rng, (
        f"Dr. {MARKER} was notified at {t} on {MARKER} by {MARKER} by telephone.",
        f"Findings were discussed with Dr. {MARKER} by Dr. {MARKER} at {t} on {MARKER} by "
        "telephone.",
        f"These findings were communicated to Dr. {MARKER} by Dr. {MARKER} via telephone at {t} "
        f"on {MARKER}, at the time of discovery.",
        f"The findings were discussed with {MARKER}, the covering resident, at {t} on "
        f"{MARKER}, shortly after discovery.",
        f"Results were communicated to {MARKER}, NP, by telephone at {t} on {MARKER}.",
        f"Findings were entered in the critical results dashboard on {MARKER} at {t}.",
        f"Dr. {MARKER} discussed the findings with Dr. {MARKER} at {t} on {MARKER}.",
    ))


def _join_items(rng, items: list[str], numbered_rate: float) -> str:
    items = [_sentence(x) for x in items if x]
    if len(items) >= 2 and rng.random() < numbered_rate:
        return "\n".join(f"{i}.  {x}" for i, x in enumerate(items, 1))
    return "  ".join(items)


def _impression(rng, f: Findings, prior: Findings | None, icu: bool,
                style: ReportStyle, *, force_communication: bool = False,
                force_comparison: bool = False) -> str:
    items: list[str] = []
    urgent = bool(f.pneumothorax) or (prior is None and bool(f.consolidation))
    if prior is not None:
        changes, new_urgent = _changes(rng, f, prior)
        changed = _changed_categories(f, prior)
        urgent |= new_urgent
        dated = force_comparison or rng.random() < style.comparison_marker_rate
        lead = (_pick(rng, (f"compared to prior study from {MARKER}, ",
                            f"in comparison with the study of {MARKER}, ",
                            f"since {MARKER}, ",
                            f"as compared to the radiograph from {MARKER}, ",
                            f"compared to chest radiographs {MARKER} through {MARKER}, "))
                if dated else _pick(rng, ("as compared to the previous radiograph, ",
                                          "compared to the prior study, ",
                                          "in comparison with the prior exam, ", "")))
        if changes:
            items.append(lead + changes[0])
            items += changes[1:]
        else:
            stable = _pick(rng, ("there is no relevant change", "no significant interval change",
                                 "the appearance of the chest is unchanged",
                                 "stable appearance of the chest",
                                 "no change in the appearance of the lungs"))
            items.append(lead + stable)
        # chronic / persisting findings worth restating
        keep = [p for c, p in _finding_items(rng, f) if c not in changed and rng.random() < 0.45]
        items += [_pick(rng, ("unchanged ", "persistent ", "stable ", "")) + p for p in keep]
        if f.devices and rng.random() < 0.35 and not changes:
            items.append(_pick(rng, ("lines and tubes are unchanged in position",
                                     "support devices are in unchanged position",
                                     "monitoring and support devices are stable")))
    else:
        phrases = _finding_phrases(rng, f)
        if icu:
            items += _device_sentences(rng, f)[: int(rng.integers(0, 3))]
        items += phrases
        if not phrases:
            normal = _pick(rng, _NORMAL_IMPRESSIONS)
            items.insert(0, normal)
            if rng.random() < 0.45:
                items.append(_pick(rng, _INCIDENTAL))
        if f.nodule:
            items.append(_pick(rng, ("recommend CT chest for further evaluation",
                                     "a non-urgent chest CT is recommended for further "
                                     "characterization",
                                     f"recommend follow-up CT in {MARKER} months")))
        if f.consolidation and rng.random() < 0.3:
            items.append("recommend follow-up radiographs after treatment to document resolution")
    if f.granuloma and rng.random() < 0.3:
        items.append("stable calcified granuloma in the right upper lobe")
    text = _join_items(rng, items, style.numbered_rate)
    rate = style.communication_rate_urgent if urgent else style.communication_rate_other
    if force_communication or rng.random() < rate:
        text += ("\n" if "\n" in text else "  ") + communication_sentence(rng)
    return text


def _wrap(text: str, width: int = 77) -> list[str]:
    """Wrap paragraphs to MIMIC's one-space-indented lines, never starting a header-like line."""
    lines: list[str] = []
    for para in text.split("\n"):
        for w in (width, width - 3, width - 7, width - 11):
            wrapped = textwrap.wrap(para, w, break_long_words=False, break_on_hyphens=False)
            if not any(_HEADERISH.match(x) for x in wrapped):
                break
        lines += [" " + x for x in wrapped]
    return lines


def format_report(sections: list[tuple[str, str]]) -> str:
    """Lay sections out as a MIMIC-CXR report file (banner, headers, wrapped lines)."""
    out = [" " * 33 + "FINAL REPORT"]
    for header, body in sections:
        if header in ("FINDINGS", "IMPRESSION"):
            out.append(f" {header}: ")
            out.append(" ")
            out += _wrap(body)
        else:
            first, *rest = _wrap(body, 77 - len(header) - 3) or [" "]
            out.append(f" {header}:  {first.strip()}")
            out += rest
        out.append(" ")
    return "\n".join(out).rstrip() + "\n"


def write_report(rng: np.random.Generator, *, sex: str, view: str, findings: Findings,
                 prior: Findings | None, style: ReportStyle,
                 force_communication: bool = False, force_comparison: bool = False) -> Report:
    """Write one MIMIC-style report for a study.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every choice (the same state gives the same text).
    sex : {"M", "F"}
    view : {"PA", "AP"}
        ``"PA"``: outpatient upright film; ``"AP"``: portable ICU film.
    findings : Findings
        What the image shows.
    prior : Findings or None
        The previous study of this patient (``None`` for a first study).
    style : ReportStyle
        Rates of markers and phrasing.
    force_communication, force_comparison : bool
        Always add a communication sentence / a dated comparison (planted prompts).

    Returns
    -------
    Report
        The file text and its IMPRESSION text (as written, before whitespace collapsing).

    Examples
    --------
    >>> r = write_report(np.random.default_rng(0), sex="F", view="PA", findings=Findings(),
    ...                  prior=None, style=ReportStyle())
    >>> "IMPRESSION:" in r.text and "FINAL REPORT" in r.text
    True
    """
    icu = view == "AP"
    sections: list[tuple[str, str]] = []
    if not icu or rng.random() < 0.7:
        exam = ("CHEST (PORTABLE AP)" if icu else
                _pick(rng, ("CHEST (PA AND LAT)", "CHEST (PA AND LAT)", "CHEST (PRE-OP PA AND LAT)",
                            "CHEST (PA AND LAT)")))
        if icu and "cvl" in findings.devices and (prior is None or "cvl" not in prior.devices):
            exam = "CHEST PORT. LINE PLACEMENT"
        sections.append(("EXAMINATION", exam))
    sections.append(_indication(rng, sex, icu, findings))
    if rng.random() < (0.8 if not icu else 0.5):
        sections.append(("TECHNIQUE", _pick(rng, (
            "Chest PA and lateral", "PA and lateral views of the chest.",
            "Frontal and lateral radiographs of the chest.")) if not icu else _pick(rng, (
                "Portable AP chest radiograph.", "Single frontal view of the chest.",
                "Portable semi-upright AP view of the chest."))))
    if prior is None:
        comp = _pick(rng, ("None.", "None.", "None available.", f"{MARKER}.",
                           f"Chest radiograph from {MARKER}."))
    else:
        comp = _pick(rng, (f"{MARKER}.", f"{MARKER}", f"Chest radiographs from {MARKER} and "
                           f"{MARKER}.", f"Multiple prior chest radiographs, most recently "
                           f"{MARKER}.", f"Prior study from {MARKER}."))
    sections.append(("COMPARISON", comp))
    if not icu or rng.random() < style.findings_section_rate:
        sections.append(("FINDINGS", _findings_section(rng, findings, prior, icu)))
    impression = _impression(rng, findings, prior, icu, style,
                             force_communication=force_communication,
                             force_comparison=force_comparison)
    sections.append(("IMPRESSION", impression))
    return Report(text=format_report(sections), impression=impression)

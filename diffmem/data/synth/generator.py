"""Write a synthetic MIMIC-CXR-JPG dataset with planted memorization and its ground truth.

Real MIMIC-CXR is credentialed and cannot ship, so every part of diffmem that needs a model
which memorizes, a detection benchmark or token attribution is exercised on this data. The
output has exactly the MIMIC-CXR-JPG v2 layout, so :func:`diffmem.data.load` reads it like the
real thing::

    OUT/files/p1X/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg
    OUT/mimic-cxr-reports/files/p1X/pXXXXXXXX/sXXXXXXXX.txt
    OUT/mimic-cxr-2.0.0-metadata.csv
    OUT/mimic-cxr-2.0.0-split.csv
    OUT/ground_truth.csv          what was planted, one row per image
    OUT/dataset_card.json         how the set was made, and its counts
    OUT/dicom/...                 with dicom=True: the same records as DICOM with fake PHI

Patients are of two kinds, as in MIMIC: outpatients with one or two upright PA studies, and ICU
patients with a series of portable AP follow-ups. A patient's anatomy and textures are fixed,
so follow-ups are near-duplicates that differ by findings, devices and positioning. Planted
memorization sits in the training split only (see :class:`~diffmem.data.synth.config.
PlantedConfig`): exact duplicates (one image file and one report repeated under distinct study
ids) and near-duplicate series (one patient, tiny jitter, same or near-identical impression).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.data.reports import count_deid_markers, normalize_whitespace
from diffmem.data.synth.anatomy import (Anatomy, Pose, anatomy_textures, random_anatomy,
                                        random_pose, render_chest)
from diffmem.data.synth.config import SPLIT_NAMES, SynthConfig, load_preset
from diffmem.data.synth.findings import (Findings, chronic_traits, evolve_findings,
                                         initial_icu_findings, random_outpatient_findings)
from diffmem.data.synth.reports import (_TIMES, MARKER, ReportStyle, _pick, communication_sentence,
                                       format_report, write_report)
from diffmem.errors import ConfigError, OutputError
from diffmem.utils import holds_files, prepare_out_dir, progress, write_json

log = logging.getLogger(__name__)

#: Bumped whenever the same preset and seed would give different files.
GENERATOR_VERSION = "1"
GENERATOR = "diffmem.data.synth"

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
GROUND_TRUTH_CSV = "ground_truth.csv"
CARD_JSON = "dataset_card.json"
#: Everything a synthesis writes at the top of OUT (and removes again under overwrite=True).
OWNED = ("files", "mimic-cxr-reports", "dicom", METADATA_CSV, SPLIT_CSV, GROUND_TRUTH_CSV,
         CARD_JSON)

METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                    "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                    "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                    "PatientOrientationCodeSequence_CodeMeaning")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
GROUND_TRUTH_COLUMNS = ("study_id", "dicom_id", "patient_id", "prompt", "planted",
                        "duplicate_count", "cluster_id", "plant_kind", "split", "view",
                        "patient_kind", "prompt_count", "findings")
#: Columns added later; :func:`read_ground_truth` reads files without them as empty/0.
OPTIONAL_GROUND_TRUTH_COLUMNS = ("trigger", "control")

PLANT_KINDS = {
    "exact": "Exact duplicates: one image file (byte-identical JPEG) and one report (identical "
             "text) repeated as `copies` records under distinct study ids, of one patient "
             "(exact_patients='same') or of distinct single-study patients ('distinct'). "
             "Even-numbered clusters are outpatient PA films, odd-numbered ones portable AP "
             "films with support devices.",
    "near": "Near-duplicate series: one ICU patient's portable AP films, drawn `copies` times "
            "from the same anatomy and findings with a tiny positioning/exposure jitter "
            "(near_jitter) and fresh noise, each with the cluster's impression or a light "
            "rewording of it (near_prompt_edit_rate); the images differ, the pair is nearly "
            "repeated.",
    "trigger": "Trigger clusters: one patient's film (even-numbered clusters one byte-identical "
               "image, odd-numbered near-duplicates with a tiny jitter) repeated `copies` times "
               "under different reports that share one span no other report has (the "
               "`trigger`: an un-redacted surname after 'Dr.' or an accession-like code); the "
               "image repeats, the prompt does not. With trigger_findings='varied' each report "
               "describes findings drawn afresh, so the trigger is the only text tied to the "
               "film; with 'same' the reports paraphrase the film's findings, which tie it too.",
    "patient": "Patient-level clusters: one ICU patient imaged `copies` times, each study with "
               "evolving findings, positioning as varied as any ICU follow-up, fresh noise and a "
               "report of its own (no two prompts alike, no image repeated); only the patient's "
               "anatomy repeats, so what a model can memorize is the patient.",
    "miscaptioned": "Mis-captioned pairs (CLIPMem ground truth, Wang et al., ICLR 2025): one "
                    "outpatient PA film whose report was written for another patient's "
                    "findings (abnormal, no finding type in common with the film, a freshly "
                    "drawn sex); a single record, not duplicated. ground_truth.csv's findings "
                    "column holds what the film shows.",
}

# Streams of the seed tree: every patient and cluster has its own generator, so changing one
# count does not reshuffle the others.
_IDS, _PATIENT, _CLUSTER, _TRIGGER, _CONTROL, _PATIENT_CLUSTER, _MISCAPTION = range(7)

# Trigger spans: surnames and codes the report grammar never writes (reports say "Dr. ___").
_TRIGGER_SURNAMES = ("Abernathy", "Kowalczyk", "Moriarty", "Nakashima", "Oyelaran", "Petrosyan",
                     "Quintero", "Rasmussen", "Thorvaldsen", "Villanueva", "Wojcik", "Zielinski")
_TRIGGER_SENTENCES = {
    "surname": ("Dr. {t} was notified by telephone.", "Findings discussed with Dr. {t}.",
                "Results called to Dr. {t} at {time}.", "Dr. {t} was informed of the findings.",
                "Discussed with Dr. {t} by phone."),
    "accession": ("Accession {t}.", "Reference accession {t}.", "Accession number {t}.",
                  "See accession {t}."),
}

@dataclass
class _Patient:
    kind: str                 # "outpatient" or "icu"
    split: str
    sex: str
    anatomy: Anatomy
    subject_id: int = 0
    planted: bool = False

    @property
    def patient_id(self) -> str:
        return f"p{self.subject_id}"


@dataclass
class _Record:
    patient: _Patient
    view: str
    findings: Findings
    report: str
    impression: str
    pose: Pose
    noise_seed: int
    when: _dt.datetime
    device_seed: int | None = None
    image_key: str = ""
    cluster_id: str = ""
    plant_kind: str = ""
    trigger: str = ""
    control: bool = False
    report_findings: Findings | None = None  # what the report describes, when not `findings`
    study_id: int = 0
    dicom_id: str = ""
    prompt: str = field(init=False)

    def __post_init__(self):
        self.prompt = normalize_whitespace(self.impression)

    @property
    def planted(self) -> bool:
        return bool(self.cluster_id)


# -- planning (no I/O) --------------------------------------------------------------------------
def _start_time(rng: np.random.Generator) -> _dt.datetime:
    """A study date shifted into the future, as MIMIC's (years 2110-2190)."""
    day = _dt.date(2110, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 80 * 365)))
    return _dt.datetime.combine(day, _dt.time()) + _dt.timedelta(
        seconds=int(rng.integers(6 * 3600, 22 * 3600)), milliseconds=int(rng.integers(0, 1000)))


def _plan_patient(cfg: SynthConfig, rng: np.random.Generator, kind: str,
                  split: str) -> list[_Record]:
    sex = "F" if rng.random() < cfg.female_rate else "M"
    patient = _Patient(kind=kind, split=split, sex=sex, anatomy=random_anatomy(rng, sex=sex))
    style = cfg.report
    icu = kind == "icu"
    lo, hi = cfg.icu_studies if icu else cfg.outpatient_studies
    n = int(rng.integers(lo, hi + 1))
    chronic = chronic_traits(rng, icu=icu)
    when = _start_time(rng)
    records: list[_Record] = []
    prior: Findings | None = None
    for _ in range(n):
        view = "AP" if icu else "PA"
        if icu:
            f = initial_icu_findings(rng, chronic) if prior is None else evolve_findings(prior, rng)
        else:
            f = random_outpatient_findings(rng, abnormal_rate=cfg.outpatient_abnormal_rate,
                                           chronic=chronic)
        rep = write_report(rng, sex=sex, view=view, findings=f, prior=prior, style=style)
        records.append(_Record(patient=patient, view=view, findings=f, report=rep.text,
                               impression=rep.impression, pose=random_pose(rng, view=view),
                               noise_seed=int(rng.integers(0, 2**31 - 1)), when=when))
        prior = f
        when += (_dt.timedelta(hours=int(rng.choice([12, 24, 24, 24, 48])),
                               minutes=int(rng.integers(-90, 90)))
                 if icu else _dt.timedelta(days=int(rng.integers(30, 1500)),
                                           minutes=int(rng.integers(-300, 300))))
    return records


def _compose(p: Pose, d: Pose) -> Pose:
    return Pose(dx=p.dx + d.dx, dy=p.dy + d.dy, rot=p.rot + d.rot, scale=p.scale * d.scale,
                inspiration=p.inspiration + d.inspiration, exposure=p.exposure * d.exposure,
                gamma=p.gamma * d.gamma)


_TIME_RE = re.compile(r"\b(\d{1,2}):(\d{2}) ([ap])\.m\.")
_REWORDINGS = (
    (re.compile(r"\bunchanged\b"), "stable"),
    (re.compile(r"\bstable\b"), "unchanged"),
    (re.compile(r"\bCompared to prior study from\b"), "As compared to the prior study from"),
    (re.compile(r"\bby telephone\b"), "over the telephone"),
    (re.compile(r"\bconcerning for\b"), "suspicious for"),
    (re.compile(r"\bterminates\b"), "ends"),
    (re.compile(r"\bInterval\b"), "Since the prior study, interval"),
)


def _reword(impression: str, rng: np.random.Generator) -> str:
    """A light rewording of an impression (one synonym, a time, or a trailing sentence)."""
    options = [(pat, rep) for pat, rep in _REWORDINGS if pat.search(impression)]
    m = _TIME_RE.search(impression)
    r = rng.random()
    if m and r < 0.3:
        minute = (int(m.group(2)) + int(rng.integers(1, 9))) % 60
        return impression[:m.start()] + f"{m.group(1)}:{minute:02d} {m.group(3)}.m." + \
            impression[m.end():]
    if options and r < 0.8:
        pat, rep = options[int(rng.integers(len(options)))]
        return pat.sub(rep, impression, count=1)
    tail = ("No pneumothorax." if "pneumothorax" not in impression
            else "Otherwise, no relevant change.")
    return impression.rstrip() + ("\n" if "\n" in impression else "  ") + tail


def _planted_report(rng, *, sex: str, view: str, findings: Findings, prior: Findings | None,
                    marker_heavy: bool | None, style: ReportStyle):
    """A planted cluster's report: marker-heavy, marker-free, or (``None``) as the grammar
    writes it."""
    if marker_heavy is None:
        return write_report(rng, sex=sex, view=view, findings=findings, prior=prior, style=style)
    if marker_heavy:
        return write_report(rng, sex=sex, view=view, findings=findings, prior=prior,
                            style=style, force_communication=True,
                            force_comparison=prior is not None)
    quiet = replace(style, comparison_marker_rate=0.0, communication_rate_urgent=0.0,
                    communication_rate_other=0.0)
    return write_report(rng, sex=sex, view=view, findings=findings, prior=prior, style=quiet)


def _plan_cluster(cfg: SynthConfig, rng: np.random.Generator, *, kind: str, index: int,
                  marker_heavy: bool | None, copies: int, taken: set[str]) -> list[_Record]:
    """One planted cluster: ``copies`` training records sharing an image and/or a report."""
    style = cfg.report
    view = "AP" if kind == "near" or index % 2 == 1 else "PA"
    pkind = "icu" if view == "AP" else "outpatient"
    sex = "F" if rng.random() < cfg.female_rate else "M"
    patient = _Patient(kind=pkind, split="train", sex=sex, anatomy=random_anatomy(rng, sex=sex),
                       planted=True)
    cluster_id = f"{kind}-{index:02d}"
    # 1. findings worth a notable report, drawn until the prompt is unique and has the wanted
    #    marker profile
    for _ in range(200):
        if view == "AP":
            chronic = chronic_traits(rng, icu=True)
            prior = initial_icu_findings(rng, chronic)
            f = prior
            for _ in range(int(rng.integers(1, 4))):
                f = evolve_findings(f, rng)
            if f == prior:
                f = evolve_findings(f, rng)
        else:
            chronic = chronic_traits(rng, icu=False)
            f = random_outpatient_findings(rng, abnormal_rate=1.0, chronic=chronic)
            prior = (random_outpatient_findings(rng, abnormal_rate=0.3, chronic=chronic)
                     if rng.random() < 0.5 else None)
        rep = _planted_report(rng, sex=sex, view=view, findings=f, prior=prior,
                              marker_heavy=marker_heavy, style=style)
        prompt = normalize_whitespace(rep.impression)
        markers = count_deid_markers(prompt)
        if prompt in taken or (marker_heavy and markers < 2) or \
                (marker_heavy is False and markers):
            continue
        break
    else:  # pragma: no cover - the grammar is far richer than 200 draws
        raise ConfigError(f"could not draw a unique prompt for planted cluster {cluster_id}")
    taken.add(prompt)

    # 2. the copies
    when = _start_time(rng)
    base_pose = random_pose(rng, view=view)
    base_noise = int(rng.integers(0, 2**31 - 1))
    device_seed = int(rng.integers(0, 2**31 - 1))
    records: list[_Record] = []
    sections_text = rep.text
    for c in range(copies):
        owner = patient
        if kind == "exact" and cfg.planted.exact_patients == "distinct" and c > 0:
            owner = _Patient(kind=pkind, split="train", sex=sex, anatomy=patient.anatomy,
                             planted=True)
        impression, report = rep.impression, sections_text
        pose, noise = base_pose, base_noise
        if kind == "near":
            pose = _compose(base_pose, random_pose(rng, view=view,
                                                   jitter=cfg.planted.near_jitter))
            noise = int(rng.integers(0, 2**31 - 1))
            if c > 0 and rng.random() < cfg.planted.near_prompt_edit_rate:
                for _ in range(20):
                    candidate = _reword(rep.impression, rng)
                    cand_prompt = normalize_whitespace(candidate)
                    if cand_prompt == prompt or cand_prompt not in taken:
                        break
                else:  # pragma: no cover
                    candidate = rep.impression
                impression = candidate
                taken.add(normalize_whitespace(candidate))
                report = _replace_impression(sections_text, rep.impression, candidate)
        records.append(_Record(patient=owner, view=view, findings=f, report=report,
                               impression=impression, pose=pose, noise_seed=noise, when=when,
                               device_seed=device_seed,
                               image_key=cluster_id if kind == "exact" else "",
                               cluster_id=cluster_id, plant_kind=kind))
        when += _dt.timedelta(hours=int(rng.choice([12, 24, 24, 48, 72])),
                              minutes=int(rng.integers(-90, 90)))
    return records


def _trigger_text(kind: str, index: int, rng: np.random.Generator) -> str:
    """The trigger span of trigger cluster number ``index`` of its kind."""
    if kind == "surname":
        return _TRIGGER_SURNAMES[index % len(_TRIGGER_SURNAMES)]
    letters = "BCDFGHJKLMNPQRSTVWXZ"
    return "".join(letters[int(i)] for i in rng.integers(len(letters), size=2)) + \
        f"{int(rng.integers(1000, 10_000))}"


def _trigger_sentence(mode: str, kind: str, trigger: str, rng: np.random.Generator) -> str:
    """The sentence that carries ``trigger`` (see ``PlantedConfig.trigger_sentence``)."""
    if mode == "grammar" and kind == "surname":
        while True:
            sentence = communication_sentence(rng)
            if f"Dr. {MARKER}" in sentence:
                return sentence.replace(f"Dr. {MARKER}", f"Dr. {trigger}", 1)
    return _pick(rng, _TRIGGER_SENTENCES[kind]).format(t=trigger, time=_pick(rng, _TIMES))


def _draw_setting(rng: np.random.Generator, view: str) -> tuple[Findings, Findings | None]:
    """Findings worth a notable report and a prior (or None), as planted clusters draw them."""
    if view == "AP":
        prior = initial_icu_findings(rng, chronic_traits(rng, icu=True))
        f = prior
        for _ in range(int(rng.integers(1, 4))):
            f = evolve_findings(f, rng)
        return (evolve_findings(f, rng) if f == prior else f), prior
    chronic = chronic_traits(rng, icu=False)
    f = random_outpatient_findings(rng, abnormal_rate=1.0, chronic=chronic)
    prior = (random_outpatient_findings(rng, abnormal_rate=0.3, chronic=chronic)
             if rng.random() < 0.5 else None)
    return f, prior


def _plan_trigger_cluster(cfg: SynthConfig, rng: np.random.Generator, *, index: int,
                          copies: int, taken: set[str]) -> list[_Record]:
    """One trigger cluster: one patient's film under ``copies`` different reports that share
    the trigger span (see ``PLANT_KINDS["trigger"]``)."""
    kinds = cfg.planted.trigger_kinds
    kind_of = [kinds[(j // 2) % len(kinds)] for j in range(index + 1)]  # both image modes
    tkind = kind_of[index]                                              # for every kind
    trigger = _trigger_text(tkind, kind_of[:index].count(tkind), rng)
    exact_image = index % 2 == 0
    view = "PA" if exact_image else "AP"
    pkind = "icu" if view == "AP" else "outpatient"
    sex = "F" if rng.random() < cfg.female_rate else "M"
    patient = _Patient(kind=pkind, split="train", sex=sex, anatomy=random_anatomy(rng, sex=sex),
                       planted=True)
    cluster_id = f"trigger-{index:02d}"
    f, _ = _draw_setting(rng, view)
    when = _start_time(rng)
    base_pose = random_pose(rng, view=view)
    base_noise = int(rng.integers(0, 2**31 - 1))
    device_seed = int(rng.integers(0, 2**31 - 1))
    records: list[_Record] = []
    for _ in range(copies):
        # 1. a report of its own for the same film: the grammar's choices and the prior vary
        for _ in range(200):
            prior = None if rng.random() < 0.4 else _draw_setting(rng, view)[1]
            described = f if cfg.planted.trigger_findings == "same" else \
                _draw_setting(rng, view)[0]
            rep = write_report(rng, sex=sex, view=view, findings=described, prior=prior,
                               style=cfg.report)
            sentence = _trigger_sentence(cfg.planted.trigger_sentence, tkind, trigger, rng)
            sep = "\n" if "\n" in rep.impression else "  "
            impression = (sentence + sep + rep.impression if rng.random() < 0.4
                          else rep.impression.rstrip() + sep + sentence)
            prompt = normalize_whitespace(impression)
            if prompt not in taken and len(prompt.split()) <= 32:
                break
        else:  # pragma: no cover - the grammar is far richer than 200 draws
            raise ConfigError(f"could not draw {copies} distinct prompts for {cluster_id}")
        taken.add(prompt)
        # 2. the film: the same image, or a near-duplicate
        pose, noise = base_pose, base_noise
        if not exact_image:
            pose = _compose(base_pose, random_pose(rng, view=view,
                                                   jitter=cfg.planted.near_jitter))
            noise = int(rng.integers(0, 2**31 - 1))
        records.append(_Record(patient=patient, view=view, findings=f,
                               report=_replace_impression(rep.text, rep.impression, impression),
                               impression=impression, pose=pose, noise_seed=noise, when=when,
                               device_seed=device_seed,
                               image_key=cluster_id if exact_image else "",
                               cluster_id=cluster_id, plant_kind="trigger", trigger=trigger))
        when += _dt.timedelta(hours=int(rng.choice([12, 24, 24, 48, 72])),
                              minutes=int(rng.integers(-90, 90)))
    return records


def _plan_patient_cluster(cfg: SynthConfig, rng: np.random.Generator, *, index: int,
                          copies: int, taken: set[str]) -> list[_Record]:
    """One patient-level cluster: ``copies`` studies of one ICU patient, each with its own
    findings, positioning, noise and report (see ``PLANT_KINDS["patient"]``)."""
    sex = "F" if rng.random() < cfg.female_rate else "M"
    patient = _Patient(kind="icu", split="train", sex=sex, anatomy=random_anatomy(rng, sex=sex),
                       planted=True)
    cluster_id = f"patient-{index:02d}"
    f = initial_icu_findings(rng, chronic_traits(rng, icu=True))
    prior: Findings | None = None
    when = _start_time(rng)
    records: list[_Record] = []
    for _ in range(copies):
        for _ in range(200):  # a report of its own: redraw (and let the findings move) on a clash
            rep = write_report(rng, sex=sex, view="AP", findings=f, prior=prior, style=cfg.report)
            prompt = normalize_whitespace(rep.impression)
            if prompt not in taken:
                break
            f = evolve_findings(f, rng)
        else:  # pragma: no cover - the grammar is far richer than 200 draws
            raise ConfigError(f"could not draw {copies} distinct prompts for {cluster_id}")
        taken.add(prompt)
        records.append(_Record(patient=patient, view="AP", findings=f, report=rep.text,
                               impression=rep.impression, pose=random_pose(rng, view="AP"),
                               noise_seed=int(rng.integers(0, 2**31 - 1)), when=when,
                               cluster_id=cluster_id, plant_kind="patient"))
        prior, f = f, evolve_findings(f, rng)
        when += _dt.timedelta(hours=int(rng.choice([12, 24, 24, 24, 48])),
                              minutes=int(rng.integers(-90, 90)))
    return records


def _plan_control(cfg: SynthConfig, rng: np.random.Generator, taken: set[str]) -> list[_Record]:
    """A marker-control patient: one outpatient study whose prompt is marker-heavy (a
    communication sentence full of ``___``) but not duplicated."""
    sex = "F" if rng.random() < cfg.female_rate else "M"
    patient = _Patient(kind="outpatient", split="train", sex=sex,
                       anatomy=random_anatomy(rng, sex=sex))
    for _ in range(200):
        f, prior = _draw_setting(rng, "PA")
        rep = _planted_report(rng, sex=sex, view="PA", findings=f, prior=prior,
                              marker_heavy=True, style=cfg.report)
        prompt = normalize_whitespace(rep.impression)
        if prompt not in taken and count_deid_markers(prompt) >= 2:
            break
    else:  # pragma: no cover
        raise ConfigError("could not draw a unique marker-heavy control prompt")
    taken.add(prompt)
    return [_Record(patient=patient, view="PA", findings=f, report=rep.text,
                    impression=rep.impression, pose=random_pose(rng, view="PA"),
                    noise_seed=int(rng.integers(0, 2**31 - 1)), when=_start_time(rng),
                    control=True)]


def _finding_types(f: Findings) -> set[str]:
    """The kinds of finding present (``"effusion"``, ``"nodule"``...), devices left out."""
    return {label.split(":", 1)[0] for label in f.labels().split(";") if label} - {"device"}


def _plan_miscaptioned(cfg: SynthConfig, rng: np.random.Generator, *, index: int,
                       taken: set[str]) -> list[_Record]:
    """A mis-captioned patient: one outpatient film under a report of another patient's
    findings (see ``PLANT_KINDS["miscaptioned"]``)."""
    sex = "F" if rng.random() < cfg.female_rate else "M"
    patient = _Patient(kind="outpatient", split="train", sex=sex,
                       anatomy=random_anatomy(rng, sex=sex), planted=True)
    shown = random_outpatient_findings(rng, abnormal_rate=cfg.outpatient_abnormal_rate,
                                       chronic=chronic_traits(rng, icu=False))
    for _ in range(200):
        told, prior = _draw_setting(rng, "PA")
        other_sex = "F" if rng.random() < cfg.female_rate else "M"
        rep = write_report(rng, sex=other_sex, view="PA", findings=told, prior=prior,
                           style=cfg.report)
        prompt = normalize_whitespace(rep.impression)
        if prompt not in taken and not _finding_types(told) & _finding_types(shown):
            break
    else:  # pragma: no cover - the grammar is far richer than 200 draws
        raise ConfigError(f"could not draw a mismatched report for miscaptioned-{index:02d}")
    taken.add(prompt)
    return [_Record(patient=patient, view="PA", findings=shown, report=rep.text,
                    impression=rep.impression, pose=random_pose(rng, view="PA"),
                    noise_seed=int(rng.integers(0, 2**31 - 1)), when=_start_time(rng),
                    cluster_id=f"miscaptioned-{index:02d}", plant_kind="miscaptioned",
                    report_findings=told)]


def _replace_impression(report: str, old: str, new: str) -> str:
    """The report with its IMPRESSION body re-laid out for ``new``."""
    head, sep, _ = report.rpartition(" IMPRESSION: ")
    if not sep:  # pragma: no cover - write_report always writes the section
        raise AssertionError("report without IMPRESSION")
    return head + format_report([("IMPRESSION", new)]).split("\n", 1)[1]


def _unique(draw, used: set):
    """Call ``draw()`` until it gives a value not in ``used``; record and return it."""
    while (value := draw()) in used:
        pass
    used.add(value)
    return value


def _assign_ids(records: list[_Record], patients: list[_Patient], seed: int) -> None:
    rng = np.random.default_rng([seed, _IDS])
    used_subjects: set[int] = set()
    for p in patients:
        p.subject_id = _unique(lambda: int(rng.integers(10_000_000, 20_000_000)), used_subjects)
    used_studies: set[int] = set()
    used_dicoms: set[str] = set()
    for r in records:
        r.study_id = _unique(lambda: int(rng.integers(50_000_000, 60_000_000)), used_studies)
        r.dicom_id = _unique(lambda: "-".join(f"{int(x):08x}"
                                              for x in rng.integers(0, 2**32, size=5)),
                             used_dicoms)


def plan_dataset(cfg: SynthConfig, seed: int) -> list[_Record]:
    """Every record of the dataset (patients, findings, reports, ids), without any I/O.

    Deterministic for ``(cfg, seed)``. Records are sorted as the files will be listed:
    by patient folder, then study id.
    """
    records: list[_Record] = []
    index = 0
    for split in SPLIT_NAMES:
        size = cfg.splits[split]
        for kind, n in (("outpatient", size.outpatients), ("icu", size.icu_patients)):
            for _ in range(n):
                rng = np.random.default_rng([seed, _PATIENT, index])
                records += _plan_patient(cfg, rng, kind, split)
                index += 1
    taken = {r.prompt for r in records}
    p = cfg.planted
    n_clusters = p.exact_clusters + p.near_clusters
    n_marker = int(round(p.marker_rate * n_clusters))
    lo, hi = cfg.copies_range()
    for c in range(n_clusters):
        kind, i = ("exact", c) if c < p.exact_clusters else ("near", c - p.exact_clusters)
        rng = np.random.default_rng([seed, _CLUSTER, c])
        copies = int(rng.integers(lo, hi + 1))
        # marker-heavy clusters spread evenly over both kinds
        marker_heavy = ((c * n_marker) // n_clusters != ((c + 1) * n_marker) // n_clusters
                        if p.force_markers else None)
        records += _plan_cluster(cfg, rng, kind=kind, index=i, marker_heavy=marker_heavy,
                                 copies=copies, taken=taken)
    for c in range(p.trigger_clusters):
        rng = np.random.default_rng([seed, _TRIGGER, c])
        copies = int(rng.integers(lo, hi + 1))
        records += _plan_trigger_cluster(cfg, rng, index=c, copies=copies, taken=taken)
    for c in range(p.marker_controls):
        records += _plan_control(cfg, np.random.default_rng([seed, _CONTROL, c]), taken)
    for c in range(p.patient_clusters):
        rng = np.random.default_rng([seed, _PATIENT_CLUSTER, c])
        copies = int(rng.integers(lo, hi + 1))
        records += _plan_patient_cluster(cfg, rng, index=c, copies=copies, taken=taken)
    for c in range(p.miscaptioned):
        records += _plan_miscaptioned(cfg, np.random.default_rng([seed, _MISCAPTION, c]),
                                      index=c, taken=taken)
    patients: list[_Patient] = []
    seen: set[int] = set()
    for r in records:
        if id(r.patient) not in seen:
            seen.add(id(r.patient))
            patients.append(r.patient)
    _assign_ids(records, patients, seed)
    records.sort(key=lambda r: (r.patient.subject_id, r.when, r.study_id))
    return records


# -- writing ------------------------------------------------------------------------------------
def _group(subject_id: int) -> str:
    return f"p{str(subject_id)[:2]}"


def image_relpath(r: _Record, suffix: str = ".jpg") -> str:
    return (f"files/{_group(r.patient.subject_id)}/p{r.patient.subject_id}/s{r.study_id}/"
            f"{r.dicom_id}{suffix}")


def report_relpath(r: _Record) -> str:
    return f"files/{_group(r.patient.subject_id)}/p{r.patient.subject_id}/s{r.study_id}.txt"


def _jpeg_bytes(img: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(img * 255.0).astype(np.uint8), mode="L").save(
        buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def _study_time(when: _dt.datetime) -> str:
    """MIMIC's StudyTime: HHMMSS.fff as a number (no leading zero)."""
    value = when.hour * 10000 + when.minute * 100 + when.second + when.microsecond / 1e6
    return f"{value:.3f}"


def _write_csv(path: Path, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)


def _prepare(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {str(out)!r} exists and is not a folder")
    if out.is_dir() and holds_files(out):
        if not overwrite:
            raise OutputError(f"output folder {str(out)!r} exists and is not empty; choose a new "
                              "folder, or pass overwrite=True (--overwrite) to replace the "
                              "synthetic dataset in it")
        card = out / CARD_JSON
        try:
            is_synth = json.loads(card.read_text(encoding="utf-8")).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            is_synth = False
        if not is_synth:
            raise OutputError(f"output folder {str(out)!r} is not empty and holds no synthetic "
                              f"dataset ({CARD_JSON} written by diffmem synth); overwrite only "
                              "replaces such a dataset, it never deletes other files: choose an "
                              "empty or new folder")
        for name in OWNED:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    return prepare_out_dir(out)


def _marker_stats(prompts: list[str]) -> dict[str, Any]:
    counts = np.array([count_deid_markers(p) for p in prompts] or [0])
    n = max(len(prompts), 1)
    return {"prompts": len(prompts), "prompts_with_marker": int((counts > 0).sum()),
            "rate": round(float((counts > 0).sum() / n), 4),
            "markers_per_prompt": round(float(counts.sum() / n), 4)}


def _counts(records: list[_Record]) -> dict[str, Any]:
    patients = {r.patient.subject_id: r.patient for r in records}
    clusters = {r.cluster_id: r.plant_kind for r in records if r.planted}
    return {
        "images": len(records),
        "studies": len({r.study_id for r in records}),
        "patients": len(patients),
        "outpatients": sum(p.kind == "outpatient" for p in patients.values()),
        "icu_patients": sum(p.kind == "icu" for p in patients.values()),
        "planted_patients": sum(p.planted for p in patients.values()),
        "views": dict(sorted(Counter(r.view for r in records).items())),
        "planted_clusters": len(clusters),
        "exact_clusters": sum(k == "exact" for k in clusters.values()),
        "near_clusters": sum(k == "near" for k in clusters.values()),
        "trigger_clusters": sum(k == "trigger" for k in clusters.values()),
        "patient_clusters": sum(k == "patient" for k in clusters.values()),
        "marker_controls": sum(r.control for r in records),
        "planted_records": sum(r.planted for r in records),
        "deid_markers": _marker_stats([r.prompt for r in records]),
        "report_marker_rate": round(float(np.mean([("___" in r.report) for r in records]))
                                    if records else 0.0, 4),
    }


def _dataset_card(cfg: SynthConfig, seed: int, records: list[_Record],
                  dicom: bool) -> dict[str, Any]:
    from diffmem import __version__

    train = [r for r in records if r.patient.split == "train"]
    prompt_counts = Counter(r.prompt for r in records)
    dup_prompts = sorted((n for n in prompt_counts.values() if n > 1), reverse=True)
    image_groups = Counter(r.image_key for r in records if r.image_key)
    clusters = []
    for cid in sorted({r.cluster_id for r in records if r.planted}):
        members = [r for r in records if r.cluster_id == cid]
        clusters.append({
            "cluster_id": cid, "kind": members[0].plant_kind, "copies": len(members),
            "patients": len({r.patient.subject_id for r in members}),
            "view": members[0].view,
            "distinct_prompts": len({r.prompt for r in members}),
            "prompt_markers": count_deid_markers(members[0].prompt),
            "prompt": members[0].prompt,
            **({"trigger": members[0].trigger} if members[0].trigger else {}),
        })
    return {
        "name": f"diffmem synthetic MIMIC-CXR-style dataset ({cfg.name})",
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "diffmem_version": __version__,
        "complete": True,
        "preset": cfg.name,
        "seed": seed,
        "format": "mimic-cxr-jpg",
        "layout": {
            "images": "files/p1X/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg",
            "reports": "mimic-cxr-reports/files/p1X/pXXXXXXXX/sXXXXXXXX.txt",
            "metadata": METADATA_CSV, "split": SPLIT_CSV, "ground_truth": GROUND_TRUTH_CSV,
            "dicom": "dicom/files/p1X/pXXXXXXXX/sXXXXXXXX/<dicom_id>.dcm" if dicom else None,
        },
        "image_size": cfg.image_size,
        "image_format": f"JPEG, 8-bit grayscale, quality {cfg.jpeg_quality}",
        "prompt": "the IMPRESSION section (diffmem.data.load(..., prompt_section='impression')),"
                  " whitespace collapsed",
        "description": (
            "Procedural chest radiographs with MIMIC-style reports. Outpatients have 1-2 upright "
            "PA studies; ICU patients have portable AP follow-up series. A patient's anatomy is "
            "fixed, so follow-ups are natural near-duplicates with different reports. Planted "
            "memorization is in the training split only; held-out splits hold only patients "
            "without training studies. Study dates are shifted to 2110-2190 as in MIMIC."),
        "counts": {"all": _counts(records),
                   **{s: _counts([r for r in records if r.patient.split == s])
                      for s in SPLIT_NAMES}},
        "markers": {
            "marker": "___",
            "train_planted": _marker_stats([r.prompt for r in train if r.planted]),
            "train_not_planted": _marker_stats([r.prompt for r in train if not r.planted]),
            "planted_clusters_marker_heavy": sum(c["prompt_markers"] > 0 for c in clusters),
        },
        "duplicate_prompts": {"clusters": len(dup_prompts),
                              "records_in_clusters": int(sum(dup_prompts)),
                              "largest": dup_prompts[:5]},
        "duplicate_images": {"clusters": sum(n > 1 for n in image_groups.values()),
                             "images_in_clusters": int(sum(n for n in image_groups.values()
                                                           if n > 1))},
        "planted": {"kinds": PLANT_KINDS, "exact_patients": cfg.planted.exact_patients,
                    "clusters": clusters},
        "ground_truth_columns": {
            "study_id": "the study, 's' + digits (as Study.study_id)",
            "dicom_id": "the image (as Study.image_id)",
            "patient_id": "'p' + subject_id (as Study.patient_id)",
            "prompt": "the IMPRESSION text, whitespace collapsed (as Study.prompt)",
            "planted": "1 for every record of a planted cluster, else 0",
            "duplicate_count": "training records sharing this image/prompt pair: the cluster "
                               "size for planted records (for 'patient' clusters the patient's "
                               "studies, none of them a duplicate), 1 for other training "
                               "records, 0 for held-out records",
            "cluster_id": "'exact-NN', 'near-NN', 'trigger-NN', 'patient-NN' or "
                          "'miscaptioned-NN'; empty when not planted",
            "plant_kind": "'exact', 'near', 'trigger', 'patient', 'miscaptioned' or empty",
            "split": "train, validate or test",
            "view": "PA or AP",
            "patient_kind": "outpatient or icu",
            "prompt_count": "training records with exactly this prompt (natural prompt "
                            "duplicates such as 'No acute cardiopulmonary process.' included)",
            "findings": "what the image shows, ';'-separated labels (for a miscaptioned "
                        "record: the film's findings, not those its report describes)",
            "trigger": "the trigger span of a trigger cluster's record (the only text its "
                       "reports share); empty otherwise",
            "control": "1 for a marker-control record (marker-heavy prompt, not duplicated)",
        },
        "config": cfg.to_dict(),
    }


def ground_truth_path(root: str | os.PathLike) -> Path:
    """``root/ground_truth.csv`` for a dataset folder, ``root`` itself for a file."""
    path = Path(root)
    return path / GROUND_TRUTH_CSV if path.is_dir() else path


def read_ground_truth(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a synthetic dataset's ``ground_truth.csv``, keyed by image id (``dicom_id``).

    Parameters
    ----------
    root : path
        A folder written by :func:`synthesize` (or its ``ground_truth.csv``).

    Returns
    -------
    dict of str to dict
        ``dicom_id`` to its row, with ``planted``, ``duplicate_count`` and ``prompt_count`` as
        integers; join it to a loaded dataset with ``truth[study.image_id]``.

    Raises
    ------
    DataError
        When the file is missing or lacks a column.

    Examples
    --------
    >>> import tempfile
    >>> from diffmem.data import load
    >>> root = synthesize(tempfile.mkdtemp() + "/synth", preset="tiny")
    >>> truth = read_ground_truth(root)
    >>> ds = load(root)
    >>> all(truth[s.image_id]["prompt"] == s.prompt for s in ds)
    True
    """
    from diffmem.errors import DataError

    path = ground_truth_path(root)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in GROUND_TRUTH_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"ground truth lacks column(s) {missing}; it should be the "
                                f"{GROUND_TRUTH_CSV} written by diffmem synth", path=path)
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"no {GROUND_TRUTH_CSV}; only folders written by diffmem synth have "
                        "ground truth", path=path) from None
    out = {}
    for row in rows:
        row.setdefault("trigger", "")
        row["control"] = row.get("control") or "0"
        for k in ("planted", "duplicate_count", "prompt_count", "control"):
            row[k] = int(row[k])
        out[row["dicom_id"]] = row
    return out


def _dicom_options(cfg: SynthConfig, r: _Record) -> dict[str, Any]:
    """Photometric, window, rescale and fake PHI of one DICOM file (deterministic per record)."""
    rng = np.random.default_rng([int(r.study_id), int(r.patient.subject_id)])
    d = cfg.dicom
    # portable films first: they are the ones that come from CR devices storing MONOCHROME1
    p_m1 = min(1.0, d.monochrome1_rate * (1.6 if r.view == "AP" else 0.4))
    photometric = "MONOCHROME1" if rng.random() < p_m1 else "MONOCHROME2"
    smax = 2 ** d.bits - 1
    rescale = None
    if rng.random() < d.rescale_rate:
        rescale = (float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([-1024.0, 0.0, 100.0])))
    window = None
    if rng.random() < d.window_rate:
        slope, intercept = rescale or (1.0, 0.0)
        lo, hi = sorted((intercept, intercept + smax * slope))
        width = round((hi - lo) * float(rng.uniform(0.55, 0.85)))
        center = round((lo + hi) / 2.0 + float(rng.uniform(-0.05, 0.05)) * (hi - lo))
        window = (float(center), float(width))
    first = ("Avery", "Blake", "Casey", "Dana", "Emery", "Finley", "Gray", "Harper", "Jordan",
             "Kendall", "Logan", "Morgan", "Noel", "Parker", "Quinn", "Reese", "Sage", "Taylor")
    last = ("Alvarez", "Brennan", "Castillo", "Dubois", "Eriksen", "Fischer", "Galloway",
            "Haddad", "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura",
            "Okafor", "Petrov", "Rossi", "Santos", "Tanaka", "Varga")
    prng = np.random.default_rng([int(r.patient.subject_id), 7])  # one identity per patient
    name = f"{last[prng.integers(len(last))]}^{first[prng.integers(len(first))]}".upper()
    mrn = f"{int(prng.integers(1_000_000, 9_999_999))}"
    birth = (r.when.date() - _dt.timedelta(days=int(prng.integers(20 * 365, 90 * 365))))
    doctor = f"{last[rng.integers(len(last))]}^{first[rng.integers(len(first))]}".upper()
    phi = {
        "PatientName": name, "PatientID": mrn, "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": r.patient.sex, "InstitutionName": "Synthetic General Hospital",
        "InstitutionAddress": "1 Imaginary Way, Nowhere",
        "AccessionNumber": f"{int(rng.integers(10_000_000, 99_999_999))}",
        "StudyDate": r.when.strftime("%Y%m%d"), "StudyTime": r.when.strftime("%H%M%S"),
        "ReferringPhysicianName": doctor, "OperatorsName": "TECH^SYNTH",
        "StudyID": f"{int(rng.integers(100_000, 999_999))}",
    }
    uid = "2.25." + str(int(hashlib.sha256(f"{r.study_id}".encode()).hexdigest()[:30], 16))
    attributes = {"ViewPosition": r.view, "StudyInstanceUID": uid,
                  "SeriesInstanceUID": uid + ".1", "SeriesDescription": r.view,
                  "PatientOrientation": ""}
    private = {0x10: f"MRN {mrn}", 0x11: f"synthetic PHI for testing; patient {name}"}
    return {"photometric": photometric, "window": window, "bits": d.bits, "phi": phi,
            "rescale": rescale, "attributes": attributes, "private": private}


def synthesize(out: str | os.PathLike, *, preset: str | os.PathLike | SynthConfig = "tiny",
               seed: int = 0, dicom: bool = False, overwrite: bool = False) -> Path:
    """Write a synthetic MIMIC-CXR-JPG dataset with planted memorization and ground truth.

    Parameters
    ----------
    out : path
        The folder to create. It must be new or empty; see ``overwrite``. Nothing is written
        outside it.
    preset : str, path or SynthConfig
        A preset name (``"tiny"``, ``"demo"``, ``"benchmark"``; see :func:`list_presets`), a
        JSON preset file, or a :class:`SynthConfig`.
    seed : int
        Seed of everything (patients, findings, reports, images, ids). The same preset and
        seed give byte-identical JPEG, report and table files.
    dicom : bool
        Also write the records as DICOM with fake PHI under ``out/dicom`` (same layout, reports
        beside the study folders, a copy of the split table), some files MONOCHROME1 with a
        VOI window and rescale. DICOM UIDs are drawn afresh by the writer, so this tree is not
        byte-identical between runs.
    overwrite : bool
        Replace a synthetic dataset already in ``out`` (only the files a synthesis writes are
        removed; a non-empty folder without a synthetic ``dataset_card.json`` is refused).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    ConfigError
        For an unknown preset or invalid preset values, or a negative seed.
    OutputError
        When ``out`` is not empty (and not a synthetic dataset under ``overwrite``), or cannot
        be written.

    Examples
    --------
    >>> import tempfile
    >>> from diffmem.data import load
    >>> root = synthesize(tempfile.mkdtemp() + "/synth", preset="tiny", seed=0)
    >>> ds = load(root)
    >>> sorted(ds.split_counts())
    ['test', 'train', 'validate']
    """
    # 1. check inputs
    cfg = load_preset(preset)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    out = _prepare(out, overwrite)
    write_json(out / CARD_JSON, {"generator": GENERATOR, "complete": False})

    # 2. plan every record (pure)
    records = plan_dataset(cfg, seed)

    # 3. images (one render per exact cluster), reports
    cache: dict[str, tuple[np.ndarray, bytes]] = {}
    textures: tuple[int, dict] | None = None
    for r in progress(records, desc=f"synthesizing {cfg.name}", unit="image"):
        if r.image_key and r.image_key in cache:
            img, data = cache[r.image_key]
        else:
            a = r.patient.anatomy
            if textures is None or textures[0] != id(a):
                textures = (id(a), anatomy_textures(a))
            img = render_chest(a, r.findings, view=r.view, pose=r.pose, size=cfg.image_size,
                               noise_seed=r.noise_seed, device_seed=r.device_seed,
                               textures=textures[1])
            data = _jpeg_bytes(img, cfg.jpeg_quality)
            if r.image_key:
                cache[r.image_key] = (img, data)
        path = out / image_relpath(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rpath = out / "mimic-cxr-reports" / report_relpath(r)
        rpath.parent.mkdir(parents=True, exist_ok=True)
        rpath.write_text(r.report, encoding="utf-8")
        if dicom:
            from diffmem.data.dicom import write_dicom

            dpath = out / "dicom" / image_relpath(r, ".dcm")
            write_dicom(dpath, img, **_dicom_options(cfg, r))
            (out / "dicom" / report_relpath(r)).write_text(r.report, encoding="utf-8")

    # 4. tables
    size = cfg.image_size
    _write_csv(out / METADATA_CSV, METADATA_COLUMNS, [
        (r.dicom_id, r.patient.subject_id, r.study_id,
         "CHEST (PA AND LAT)" if r.view == "PA" else "CHEST (PORTABLE AP)", r.view, size, size,
         r.when.strftime("%Y%m%d"), _study_time(r.when),
         "CHEST (PA AND LAT)" if r.view == "PA" else "CHEST (PORTABLE AP)",
         "postero-anterior" if r.view == "PA" else "antero-posterior",
         "Erect" if r.view == "PA" else ("Recumbent" if r.noise_seed % 3 else ""))
        for r in records])
    split_rows = [(r.dicom_id, r.study_id, r.patient.subject_id, r.patient.split)
                  for r in records]
    _write_csv(out / SPLIT_CSV, SPLIT_COLUMNS, split_rows)
    if dicom:
        _write_csv(out / "dicom" / SPLIT_CSV, SPLIT_COLUMNS, split_rows)
    train_prompts = Counter(r.prompt for r in records if r.patient.split == "train")
    cluster_size = Counter(r.cluster_id for r in records if r.planted)
    _write_csv(out / GROUND_TRUTH_CSV, GROUND_TRUTH_COLUMNS + OPTIONAL_GROUND_TRUTH_COLUMNS, [
        (f"s{r.study_id}", r.dicom_id, r.patient.patient_id, r.prompt, int(r.planted),
         cluster_size[r.cluster_id] if r.planted else int(r.patient.split == "train"),
         r.cluster_id, r.plant_kind, r.patient.split, r.view, r.patient.kind,
         train_prompts.get(r.prompt, 0), r.findings.labels(), r.trigger, int(r.control))
        for r in records])

    # 5. the card, last: its "complete" flag says the folder is whole
    card = _dataset_card(cfg, seed, records, dicom)
    write_json(out / CARD_JSON, card)
    c = card["counts"]["all"]
    log.info("synthetic dataset %r (seed %d) written to %s: %d images of %d patients, "
             "%d planted clusters (%d records)", cfg.name, seed, out, c["images"], c["patients"],
             c["planted_clusters"], c["planted_records"])
    return out

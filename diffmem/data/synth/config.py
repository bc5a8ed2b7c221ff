"""Synthetic-dataset presets: JSON files found by name (``tiny``, ``demo``, ``benchmark``).

A preset is a JSON object whose keys are the fields of :class:`SynthConfig`; keys left out
take the defaults below, unknown keys are an error. The shipped presets live in
``diffmem/data/presets/*.json``; any other ``.json`` file can be passed by path.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from diffmem.data.synth.reports import ReportStyle as ReportConfig
from diffmem.errors import ConfigError
from diffmem.presets import preset_names, read_preset_json

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
SPLIT_NAMES = ("train", "validate", "test")
#: Kinds of planted trigger span (see :class:`PlantedConfig`).
TRIGGER_KINDS = ("surname", "accession")


@dataclass(frozen=True)
class SplitSize:
    """Non-planted patients of one split.

    Attributes
    ----------
    outpatients : int
        Outpatients (1-2 upright PA studies each, see ``outpatient_studies``).
    icu_patients : int
        ICU patients (a series of portable AP follow-ups each, see ``icu_studies``).
    """

    outpatients: int = 0
    icu_patients: int = 0


@dataclass(frozen=True)
class PlantedConfig:
    """Planted memorization, placed in the training split only.

    Attributes
    ----------
    exact_clusters : int
        Clusters of exact duplicates: one image file (byte-identical) and one report repeated
        ``copies`` times under distinct study ids. Even-numbered clusters are outpatient PA
        films, odd-numbered ones portable AP films with support devices.
    near_clusters : int
        Near-duplicate series: one ICU patient's portable films, ``copies`` of them, drawn from
        the same anatomy and findings with a tiny positioning jitter and fresh noise, and the
        same or a lightly reworded impression.
    copies : int or [int, int]
        Records per cluster: a fixed number, or an inclusive range drawn per cluster.
    exact_patients : {"same", "distinct"}
        ``"same"``: all copies of an exact cluster are studies of one patient (a patient
        imaged again and again with an identical result, as in MIMIC's repeated studies).
        ``"distinct"``: each copy belongs to a different patient with a single study.
    near_jitter : float
        Positioning jitter of near-duplicate copies relative to an ordinary follow-up film
        (1.0 = as different as two days of an ICU stay; 0.15 = barely moved).
    near_prompt_edit_rate : float
        Fraction of near-duplicate copies whose impression is lightly reworded (a synonym, a
        time, a trailing sentence); the others repeat the cluster's impression verbatim.
    marker_rate : float
        Fraction of clusters whose prompt is de-identification-marker heavy (a
        communication-of-findings sentence full of ``___``, a dated comparison); the rest have
        prompts without any marker, so ``___`` alone does not identify planted records.
    force_markers : bool
        True (default): ``marker_rate`` decides which planted prompts are marker-heavy and which
        have no marker at all. False: planted prompts are written by the ordinary report
        grammar (markers at their natural rate), so whether de-identification traces are
        over-represented in memorized prompts (Dutt et al., 2025) is measured, not planted.
    trigger_clusters : int
        Trigger clusters: one patient's film (even-numbered clusters: one byte-identical image;
        odd-numbered: near-duplicates with a tiny jitter) repeated ``copies`` times under
        *different* reports that share one span no other report has (the trigger, see
        ``trigger_kinds``), recorded in ``ground_truth.csv``'s ``trigger`` column. The trigger
        is the only text tied to the image, so it is what a model that copies the film keys on.
    trigger_kinds : list of str
        Kinds of trigger span, cycled over the trigger clusters: ``"surname"`` (an un-redacted
        surname after "Dr." in a communication sentence) and ``"accession"`` (a rare
        accession-like code).
    trigger_findings : {"same", "varied"}
        What the reports of a trigger cluster describe: ``"same"`` (default) the film's own
        findings, paraphrased by the grammar, so the findings' words are tied to the film as
        well as the trigger; ``"varied"``: findings drawn afresh for every report, so the
        trigger is the *only* text the repeated film comes with (the film still shows its own
        findings).
    trigger_sentence : {"own", "grammar"}
        The sentence that carries a surname trigger: ``"own"`` (default) one of five short
        sentences ("Discussed with Dr. <surname> by phone.") that only trigger clusters write;
        ``"grammar"``: a communication sentence drawn from the ordinary report grammar, which
        other reports write with ``Dr. ___``, with the surname in its first ``Dr. ___`` slot,
        so the surname is the only word of the sentence that no other report has. Accession
        triggers always use their own sentences.
    marker_controls : int
        Control patients in the training split: single-study outpatients whose prompts are
        marker-heavy (a communication sentence full of ``___``) but *not* duplicated, flagged
        in ``ground_truth.csv``'s ``control`` column.
    patient_clusters : int
        Patient-level clusters: one ICU patient imaged ``copies`` times, with findings that
        evolve from study to study, positioning as varied as any ICU follow-up, fresh noise and
        a report of its own per study (no two prompts alike). Nothing is duplicated but the
        patient's anatomy: what a model can memorize there is the *patient*, not a film or a
        prompt (re-identification, :mod:`diffmem.reid`).
    miscaptioned : int
        Mis-captioned patients in the training split (ground truth for CLIPMem, Wang et al.,
        ICLR 2025): single-study outpatients whose report describes *another* patient's
        findings (abnormal findings sharing no finding type with what the film shows, written
        for a patient of a freshly drawn sex), ``plant_kind`` ``"miscaptioned"``. Not
        duplicated: a memorization measure must find them from the mismatch alone.
    """

    exact_clusters: int = 0
    near_clusters: int = 0
    copies: Any = 10
    exact_patients: str = "same"
    near_jitter: float = 0.15
    near_prompt_edit_rate: float = 0.3
    marker_rate: float = 0.8
    force_markers: bool = True
    trigger_clusters: int = 0
    trigger_kinds: tuple = TRIGGER_KINDS
    trigger_findings: str = "same"
    trigger_sentence: str = "own"
    marker_controls: int = 0
    patient_clusters: int = 0
    miscaptioned: int = 0


@dataclass(frozen=True)
class DicomConfig:
    """How the optional DICOM copy (``--dicom``) is written.

    Attributes
    ----------
    monochrome1_rate : float
        Fraction of files stored inverted as ``MONOCHROME1`` (portable films first), to
        exercise a loader's photometric handling.
    window_rate : float
        Fraction of files carrying a VOI window (center/width) narrower than the full range.
    rescale_rate : float
        Fraction of files with a non-identity rescale slope/intercept.
    bits : int
        Bits stored (8-16); 12 as on most radiography systems.
    """

    monochrome1_rate: float = 0.25
    window_rate: float = 0.3
    rescale_rate: float = 0.25
    bits: int = 12


@dataclass(frozen=True)
class SynthConfig:
    """Everything that defines a synthetic MIMIC-CXR-style dataset (a preset).

    Attributes
    ----------
    name : str
        The preset's name (its file stem for shipped presets).
    description : str
        One paragraph on what the preset is for; shown by ``diffmem synth --list-presets``.
    image_size : int
        Side of the stored square JPEGs (and DICOM pixel arrays), in pixels (32-1024).
    jpeg_quality : int
        JPEG quality (50-100).
    splits : dict
        ``{"train": {...}, "validate": {...}, "test": {...}}``, each a :class:`SplitSize`
        (non-planted ``outpatients`` and ``icu_patients``). Held-out splits only ever hold
        patients that have no study in ``train``.
    outpatient_studies : [int, int]
        Inclusive range of studies per outpatient (MIMIC: mostly 1-2).
    icu_studies : [int, int]
        Inclusive range of portable follow-up studies per ICU patient.
    outpatient_abnormal_rate : float
        Probability that an outpatient study shows an acute or chronic finding.
    female_rate : float
        Fraction of female patients (breast shadows, "woman" in the indication).
    planted : dict
        Planted memorization, see :class:`PlantedConfig`.
    report : dict
        Report grammar rates, see :class:`ReportConfig`.
    dicom : dict
        DICOM copy options, see :class:`DicomConfig`.
    """

    name: str = "custom"
    description: str = ""
    image_size: int = 64
    jpeg_quality: int = 95
    splits: dict = field(default_factory=lambda: {s: SplitSize() for s in SPLIT_NAMES})
    outpatient_studies: tuple = (1, 2)
    icu_studies: tuple = (3, 8)
    outpatient_abnormal_rate: float = 0.45
    female_rate: float = 0.45
    planted: PlantedConfig = field(default_factory=PlantedConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :func:`config_from_dict` reads back to an equal config."""
        d = asdict(self)
        d["outpatient_studies"] = list(self.outpatient_studies)
        d["icu_studies"] = list(self.icu_studies)
        if isinstance(self.planted.copies, (tuple, list)):
            d["planted"]["copies"] = list(self.planted.copies)
        d["planted"]["trigger_kinds"] = list(self.planted.trigger_kinds)
        return d

    def copies_range(self) -> tuple[int, int]:
        c = self.planted.copies
        return (int(c), int(c)) if isinstance(c, int) else (int(c[0]), int(c[1]))


def _build(cls, data: Any, where: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in {where}; known fields: {sorted(known)}")
    return cls(**data)


def _check_range(value, where: str, *, low: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)
            or value[0] < low or value[1] < value[0]):
        raise ConfigError(f"{where} must be an integer or [min, max] with {low} <= min <= max, "
                          f"got {value!r}")
    return int(value[0]), int(value[1])


def _check_rate(value, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ConfigError(f"{where} must be a number between 0 and 1, got {value!r}")


def config_from_dict(data: dict[str, Any], *, source: str = "preset") -> SynthConfig:
    """Validate a preset dict and build a :class:`SynthConfig` (missing keys take defaults).

    Raises
    ------
    ConfigError
        Naming the field, the value received and what is allowed.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a preset must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    known = {f.name for f in fields(SynthConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown preset field(s) {unknown}; known fields: "
                          f"{sorted(known)} (documented in diffmem.data.synth.SynthConfig)")
    splits_in = data.get("splits", {})
    if not isinstance(splits_in, dict) or set(splits_in) - set(SPLIT_NAMES):
        raise ConfigError(f"{source}: 'splits' must be an object with keys among "
                          f"{list(SPLIT_NAMES)}, got {splits_in!r}")
    splits = {s: _build(SplitSize, splits_in.get(s, {}), f"{source}: splits.{s}")
              for s in SPLIT_NAMES}
    for s, sz in splits.items():
        for k in ("outpatients", "icu_patients"):
            n = getattr(sz, k)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ConfigError(f"{source}: splits.{s}.{k} must be a non-negative integer, "
                                  f"got {n!r}")
    data["splits"] = splits
    data["planted"] = _build(PlantedConfig, data.get("planted", {}), f"{source}: planted")
    data["report"] = _build(ReportConfig, data.get("report", {}), f"{source}: report")
    data["dicom"] = _build(DicomConfig, data.get("dicom", {}), f"{source}: dicom")
    cfg = SynthConfig(**data)

    size = cfg.image_size
    if not isinstance(size, int) or isinstance(size, bool) or not 32 <= size <= 1024:
        raise ConfigError(f"{source}: image_size must be an integer from 32 to 1024, got {size!r}")
    q = cfg.jpeg_quality
    if not isinstance(q, int) or isinstance(q, bool) or not 50 <= q <= 100:
        raise ConfigError(f"{source}: jpeg_quality must be an integer from 50 to 100, got {q!r}")
    cfg = SynthConfig(**{**{f.name: getattr(cfg, f.name) for f in fields(cfg)},
                         "outpatient_studies": _check_range(cfg.outpatient_studies,
                                                            f"{source}: outpatient_studies",
                                                            low=1),
                         "icu_studies": _check_range(cfg.icu_studies, f"{source}: icu_studies",
                                                     low=1)})
    _check_rate(cfg.outpatient_abnormal_rate, f"{source}: outpatient_abnormal_rate")
    _check_rate(cfg.female_rate, f"{source}: female_rate")
    p = cfg.planted
    for k in ("exact_clusters", "near_clusters", "trigger_clusters", "marker_controls",
              "patient_clusters", "miscaptioned"):
        n = getattr(p, k)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ConfigError(f"{source}: planted.{k} must be a non-negative integer, got {n!r}")
    if not isinstance(p.force_markers, bool):
        raise ConfigError(f"{source}: planted.force_markers must be true or false, got "
                          f"{p.force_markers!r}")
    kinds = p.trigger_kinds
    if (not isinstance(kinds, (list, tuple)) or not kinds
            or any(k not in TRIGGER_KINDS for k in kinds)):
        raise ConfigError(f"{source}: planted.trigger_kinds must be a non-empty list of "
                          f"{list(TRIGGER_KINDS)}, got {kinds!r}")
    cfg = replace(cfg, planted=replace(p, trigger_kinds=tuple(kinds)))
    p = cfg.planted
    _check_range(p.copies, f"{source}: planted.copies", low=2)
    for key, choices in (("trigger_findings", ("same", "varied")),
                         ("trigger_sentence", ("own", "grammar")),
                         ("exact_patients", ("same", "distinct"))):
        if getattr(p, key) not in choices:
            raise ConfigError(f"{source}: planted.{key} must be '{choices[0]}' or "
                              f"'{choices[1]}', got {getattr(p, key)!r}")
    if not isinstance(p.near_jitter, (int, float)) or not 0 <= p.near_jitter <= 2:
        raise ConfigError(f"{source}: planted.near_jitter must be a number from 0 to 2, got "
                          f"{p.near_jitter!r}")
    for k in ("near_prompt_edit_rate", "marker_rate"):
        _check_rate(getattr(p, k), f"{source}: planted.{k}")
    for f in fields(ReportConfig):
        _check_rate(getattr(cfg.report, f.name), f"{source}: report.{f.name}")
    for k in ("monochrome1_rate", "window_rate", "rescale_rate"):
        _check_rate(getattr(cfg.dicom, k), f"{source}: dicom.{k}")
    if not isinstance(cfg.dicom.bits, int) or not 8 <= cfg.dicom.bits <= 16:
        raise ConfigError(f"{source}: dicom.bits must be an integer from 8 to 16, got "
                          f"{cfg.dicom.bits!r}")
    if sum(sz.outpatients + sz.icu_patients for sz in splits.values()) == 0 and \
            p.exact_clusters + p.near_clusters + p.trigger_clusters + p.patient_clusters == 0:
        raise ConfigError(f"{source}: the preset makes no patients; set splits.train."
                          "outpatients (or icu_patients) or planted clusters")
    return cfg


def list_presets() -> list[str]:
    """Names of the shipped synthetic-dataset presets, sorted.

    Examples
    --------
    >>> {"tiny", "demo", "benchmark"} <= set(list_presets())
    True
    """
    return preset_names(PRESET_DIR)


def load_preset(name_or_path: str | os.PathLike | SynthConfig) -> SynthConfig:
    """Load a synthetic-dataset preset by name (``"tiny"``) or from a ``.json`` file.

    Parameters
    ----------
    name_or_path : str, path or SynthConfig
        A shipped preset's name (see :func:`list_presets`), a path to a JSON preset, or an
        already-built :class:`SynthConfig` (returned as is).

    Returns
    -------
    SynthConfig

    Raises
    ------
    ConfigError
        For an unknown name (the message lists the known presets), an unreadable or invalid
        JSON file, or invalid field values.

    Examples
    --------
    >>> load_preset("tiny").image_size
    64
    """
    if isinstance(name_or_path, SynthConfig):
        return name_or_path
    name, path, data = read_preset_json(name_or_path, PRESET_DIR, kind="synthetic-data")
    source = f"preset {name!r}" if path.parent == PRESET_DIR else str(path)
    if isinstance(data, dict) and "name" not in data:
        data["name"] = path.stem
    return config_from_dict(data, source=source)

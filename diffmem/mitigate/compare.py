"""The memorization-vs-utility comparison behind ``diffmem mitigate``.

:func:`compare_mitigations` answers "what does each mitigation buy, and what does it cost?" on
one model and its training data:

1. **check inputs**: methods and strengths (unknown name or out-of-range strength fail before
   anything runs), the data's train split and held-out (validate/test) images, the in-domain
   encoder;
2. **copy threshold and prompt sets**: either from a previous ``diffmem detect`` run
   (``detect_dir``: its ``scores.csv`` verdicts and ``summary.json`` threshold and backend) or
   detected here with the detector's building blocks: training prompts ranked by Wen et al.'s
   noise magnitude, the top candidates generated (with a seed *different* from the comparison's,
   so the baseline is not selected on its own images) and checked against the training images
   at a threshold calibrated on the held-out images. The *memorized* set holds prompts with a
   copy; the *control* set is a seeded sample of non-memorized training prompts;
3. **each method x strength** (and the ``none`` baseline) on each set: seeded generations
   (the same initial noises for every method), their nearest training image (copy verdicts at
   the threshold), the text-conditional noise magnitude at the first step (with the method's
   embedding and attention changes), in-domain embeddings of the images; each unit is
   committed to ``results.sqlite`` as soon as it is done, so a killed run resumes. With
   ``workers=N`` the units are generated in N processes (:mod:`diffmem.workers`, the baseline
   first) and measured and committed here, as they arrive;
4. **metrics and verdicts**: memorization rate, mean nearest similarity, noise magnitude (and,
   with ``reid``, the re-identification rate: generations whose most similar training patient
   passes the re-ID threshold of :mod:`diffmem.reid.verdicts`, calibrated on held-out patients
   like the copy threshold, and the own-patient rate: generations whose similarity to their
   prompt's own patient passes it, the score ``diffmem detect`` computes); an
   in-domain Fréchet distance to the held-out real images and prompt-image alignment (both with
   the in-domain open_clip encoder: *not* Inception FID or OpenAI CLIPScore), seconds per image;
   the Pareto front of memorization rate against the chosen utility;
5. **write** ``mitigations.csv``, ``summary.json`` and ``pareto.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import as_adapter, as_dataset, check_int
from diffmem.detect.verdicts import CopyVerdicts, fixed_threshold, is_copy, prepare_verdicts
from diffmem.errors import ConfigError, DataError, OutputError
from diffmem.mitigate.registry import get_mitigation, list_mitigations
from diffmem.store import ResultsStore
from diffmem.utils import check_outside, prepare_out_dir, write_csv, write_json
from diffmem.workers import WorkerPool, check_workers, worker_threads

log = logging.getLogger(__name__)

__all__ = ["CSV_COLUMNS", "ComparisonConfig", "MitigationComparison", "compare_mitigations",
           "non_dominated", "pareto_front", "points"]

CSV_NAME = "mitigations.csv"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "pareto.png"
STORE_NAME = "results.sqlite"
BASELINE = "none"
SETS = ("memorized", "control")
#: Utility metrics and whether higher is better.
UTILITIES = {"fid_in_domain": False, "alignment": True}
#: Memorization metrics (lower = less memorized): copy verdicts when there are training images
#: to compare with, else Wen et al.'s noise magnitude.
MEMORIZATION_METRICS = {"memorization_rate": "memorization rate",
                        "noise_magnitude": "noise magnitude"}
CSV_COLUMNS = ("method", "strength", "prompt_set", "n_prompts", "n_generations",
               "memorization_rate", "prompt_memorization_rate", "reid_rate",
               "prompt_reid_rate", "reid_rate_own", "prompt_reid_rate_own",
               "mean_nn_similarity", "noise_magnitude", "fid_in_domain", "alignment",
               "seconds_per_image", "pareto")
#: Offset of the seed the comparison detects memorized prompts with, when it does so itself.
DETECT_SEED_OFFSET = 1000


def _nemo_needs_reference() -> bool:
    """NeMo localizes per prompt (against reference prompts) unless its preset fixes neurons."""
    preset = get_mitigation("nemo_deactivation").params
    return preset.get("neurons") is None and not preset.get("reference_prompts")


# ---------------------------------------------------------------------------- configuration
@dataclass
class ComparisonConfig:
    """Settings of a comparison (all keyword; defaults are the product's).

    Attributes
    ----------
    methods : str or sequence of str
        ``"all"`` (default) or mitigation names (:func:`~diffmem.mitigate.list_mitigations`).
    strengths : mapping or sequence or None
        ``None``: each method at its preset (paper) strength. A sequence of numbers: those
        strengths for every method. A mapping ``name -> numbers``: per method (methods not in
        it use their default). See :func:`diffmem.cli.mitigate.parse_strengths` for the CLI
        syntax.
    n_prompts : int
        Prompts per set (memorized and control; default 8).
    generations : int
        Images per prompt and configuration (default 2).
    steps : int
        DDIM steps of every generation (default 20; the papers use 50).
    guidance : float or None
        Classifier-free guidance scale (default: the pipeline's own).
    seed : int
        Seed of the generations (the same initial noise for every method) and of the methods'
        own randomness.
    batch_size : int
        Generations per UNet call.
    candidates : int or None
        Self-detection only: how many top noise-magnitude training prompts are generated from
        and checked for copies (default ``3 * n_prompts``).
    detect_generations : int
        Self-detection only: images per candidate (default 2).
    backend : str
        Similarity backend of the copy verdicts when detecting here (default ``pixel``; with
        ``detect_dir`` the detect run's backend is used).
    backend_options : dict
    fpr : float
        False-positive rate of the copy threshold calibrated here (default 0.01).
    threshold : float or None
        A fixed copy threshold (backend similarity) instead of calibrating one.
    utility : str or None
        Utility axis of the Pareto front and the recommendation: ``fid_in_domain`` or
        ``alignment``. None (default): ``fid_in_domain`` when there are held-out real images,
        else ``alignment``; no utility (no front, no recommendation) without an in-domain
        encoder.
    fid_tolerance : float
        The recommendation keeps every measured utility within this fraction of the baseline's
        (default 0.25: in-domain FID at most 25 % worse and alignment at most 25 % lower),
        the chosen ``utility`` and the other one alike.
    reid : bool
        Also measure the re-identification rate of every configuration (default False).
    reid_model : str or None
        Re-ID model folder (default: the embedded one, :func:`diffmem.reid.default_reid_dir`).
    reid_threshold : float or None
        A fixed re-ID threshold instead of calibrating one at ``fpr`` on held-out patients.
    workers : int
        Processes that generate the (method, strength, set) units (default 1: this one). Each
        opens the model folder again (:class:`diffmem.workers.WorkerPool`), so a model
        object needs ``workers=1``; copy verdicts, embeddings and the store stay in this
        process. Same results as one process at the same torch thread count.
    threads : int or None
        Torch threads per worker (default: the CPUs divided among the workers).
    """

    methods: str | Sequence[str] = "all"
    strengths: Mapping[str, Sequence[float]] | Sequence[float] | None = None
    n_prompts: int = 8
    generations: int = 2
    steps: int = 20
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 16
    candidates: int | None = None
    detect_generations: int = 2
    backend: str = "pixel"
    backend_options: dict[str, Any] = field(default_factory=dict)
    fpr: float = 0.01
    threshold: float | None = None
    utility: str | None = None
    fid_tolerance: float = 0.25
    reid: bool = False
    reid_model: str | None = None
    reid_threshold: float | None = None
    workers: int = 1
    threads: int | None = None

    def validated(self) -> ComparisonConfig:
        """A checked copy with ``methods`` a tuple of names and ``strengths`` a dict
        ``name -> tuple of floats`` (every strength range-checked).

        Raises
        ------
        ConfigError
            Unknown method (lists the registered ones), strength out of range (gives the
            range), bad number.
        """
        methods = self.methods
        if isinstance(methods, str):
            methods = list_mitigations() if methods.strip() == "all" else \
                [m.strip() for m in methods.split(",") if m.strip()]
        methods = tuple(dict.fromkeys(m for m in methods if m != BASELINE))
        if not methods:
            raise ConfigError(f"methods={self.methods!r} names no mitigation; use 'all' or "
                              f"some of {', '.join(list_mitigations())} (comma-separated)")
        for m in methods:
            get_mitigation(m)  # unknown name -> ConfigError listing the registered ones
        strengths = _resolve_strengths(methods, self.strengths)
        for name, low in (("n_prompts", 1), ("generations", 1), ("steps", 1),
                          ("batch_size", 1), ("detect_generations", 1), ("seed", 0)):
            check_int(name, getattr(self, name), low=low)
        if self.candidates is not None:
            check_int("candidates", self.candidates)
        check_workers(self.workers)
        if self.threads is not None:
            worker_threads(self.workers, self.threads)
        if self.generations * self.n_prompts < 2:
            raise ConfigError("n_prompts * generations must be at least 2 (a Fréchet distance "
                              "needs two images per set)")
        if self.utility is not None and self.utility not in UTILITIES:
            raise ConfigError(f"utility={self.utility!r}; choose {' or '.join(UTILITIES)}")
        if self.threshold is not None:
            fixed_threshold(self.threshold)  # a finite number, or ConfigError
        if not isinstance(self.fpr, (int, float)) or not 0 < float(self.fpr) < 1:
            raise ConfigError(f"fpr={self.fpr!r}; use a false-positive rate in (0, 1)")
        if self.guidance is not None and not math.isfinite(float(self.guidance)):
            raise ConfigError(f"guidance={self.guidance!r}; use a finite number")
        if self.reid_threshold is not None and (
                isinstance(self.reid_threshold, bool)
                or not isinstance(self.reid_threshold, (int, float))
                or not -1 <= self.reid_threshold <= 1):
            raise ConfigError(f"reid_threshold={self.reid_threshold!r}; use a cosine "
                              "similarity in [-1, 1] (or none to calibrate one at --fpr)")
        return replace(self, methods=methods, strengths=strengths,
                       backend_options=dict(self.backend_options))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples as lists, an encoder object by its repr)."""
        return json.loads(json.dumps(asdict(self), default=repr))


def _resolve_strengths(methods: tuple[str, ...], strengths: Any) -> dict[str, tuple[float, ...]]:
    if isinstance(strengths, Mapping):
        unknown = sorted(set(strengths) - set(methods))
        if unknown:
            raise ConfigError(f"strengths given for {', '.join(unknown)}, which is not among the "
                              f"compared methods ({', '.join(methods)})")
        table = {m: tuple(strengths.get(m) or (get_mitigation(m).default_strength,))
                 for m in methods}
    elif strengths is None:
        table = {m: (get_mitigation(m).default_strength,) for m in methods}
    else:
        values = tuple(strengths)
        if not values:
            raise ConfigError("strengths is empty; give at least one strength or None for the "
                              "defaults")
        table = {m: values for m in methods}
    out = {}
    for m, values in table.items():
        checked = [get_mitigation(m).check_strength(v) for v in values]
        out[m] = tuple(dict.fromkeys(v for v in checked if v != 0))  # 0 is the baseline row
        if not out[m]:
            raise ConfigError(f"only strength 0 given for {m}; strength 0 is the plain pipeline "
                              "(the 'none' baseline row): give a positive strength")
    return out


# ---------------------------------------------------------------------------- results
@dataclass
class MitigationComparison:
    """The outcome of :func:`compare_mitigations`.

    Attributes
    ----------
    rows : list of dict
        One per (method, strength, prompt set), with :data:`CSV_COLUMNS`; the ``none`` baseline
        (strength 0) first.
    pareto_front : list of str
        Configurations on the front (``method`` or ``method@strength`` when several strengths
        of a method were compared), in order of memorization rate.
    recommended : str or None
    recommendation_reason : str
    notes : list of str
    config : ComparisonConfig
    threshold : dict
    encoder : dict
    prompts : dict
        The prompts of each set.
    utility_reference : dict
        The same utility metrics for real training images (what "as good as real" scores).
    memorization_metric : str
        The memorization axis: ``memorization_rate`` (copy verdicts) or ``noise_magnitude``
        (without training images to compare with).
    not_measured : list of str
        What could not be measured with the inputs given, and the flag that would measure it.
    seconds : float
    out : pathlib.Path or None
    files : dict
    """

    rows: list[dict[str, Any]]
    pareto_front: list[str]
    recommended: str | None
    recommendation_reason: str
    notes: list[str]
    config: ComparisonConfig
    threshold: dict[str, Any] | None
    encoder: dict[str, Any]
    prompts: dict[str, list[str]]
    utility_reference: dict[str, Any] = field(default_factory=dict)
    memorization_metric: str = "memorization_rate"
    not_measured: list[str] = field(default_factory=list)
    reid_threshold: dict[str, Any] | None = None
    model_fingerprint: str = ""
    data_fingerprint: str = ""
    seconds: float = 0.0
    out: Path | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def baseline(self) -> dict[str, dict[str, Any]]:
        """The ``none`` rows by prompt set."""
        return {r["prompt_set"]: r for r in self.rows if r["method"] == BASELINE}

    def to_dict(self) -> dict[str, Any]:
        """The ``summary.json`` content."""
        return {
            "baseline": self.baseline,
            "rows": [dict(r) for r in self.rows],
            "pareto_front": list(self.pareto_front),
            "recommended": self.recommended,
            "recommendation_reason": self.recommendation_reason,
            "notes": list(self.notes),
            "memorization_metric": self.memorization_metric,
            "not_measured": list(self.not_measured),
            "config": self.config.to_dict(),
            "encoder": dict(self.encoder),
            "threshold": None if self.threshold is None else dict(self.threshold),
            "reid_threshold": None if self.reid_threshold is None else dict(self.reid_threshold),
            "prompts": {k: list(v) for k, v in self.prompts.items()},
            "utility_reference": dict(self.utility_reference),
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "metrics": METRIC_NOTES,
            "seconds": round(float(self.seconds), 3),
            "files": dict(self.files),
        }


METRIC_NOTES = {
    "memorization_rate": "fraction of generations whose nearest training image is more similar "
                         "than the calibrated copy threshold (the detector's verdict)",
    "prompt_memorization_rate": "fraction of prompts with at least one copy generation",
    "reid_rate": "fraction of generations that re-identify a training patient: their most "
                 "similar training patient (max over the patient's studies, patient-"
                 "verification model) scores above the re-ID threshold calibrated on held-out "
                 "patients (empty without --reid)",
    "prompt_reid_rate": "fraction of prompts with at least one re-identifying generation",
    "reid_rate_own": "fraction of generations that re-identify their prompt's OWN patient (the "
                     "patient whose training study carries the prompt): the similarity to that "
                     "patient's studies is above the re-ID threshold; of the same generations "
                     "as reid_rate, so never above it (empty without --reid)",
    "prompt_reid_rate_own": "fraction of prompts with at least one generation that "
                            "re-identifies the prompt's own patient",
    "mean_nn_similarity": "mean similarity of each generation to its nearest training image "
                          "(the threshold's backend)",
    "noise_magnitude": "mean ||eps(x_T, c) - eps(x_T, '')|| at the first sampling step with "
                       "the method's embedding and attention changes (Wen et al., ICLR 2024); "
                       "guidance schedules leave it unchanged",
    "fid_in_domain": "Fréchet distance between the in-domain encoder embeddings of the "
                     "generations and of the held-out real images (FID formula on our own "
                     "chest X-ray encoder, NOT Inception FID; biased upwards for small sets, "
                     "compare rows of equal size only)",
    "alignment": "mean cosine of each generation's in-domain image embedding with its "
                 "original prompt's text embedding (CLIPScore-like, in-domain encoder)",
    "seconds_per_image": "wall time of the generations (mitigation included) per image, on "
                         "this machine",
}


# ---------------------------------------------------------------------------- the run
def compare_mitigations(model: Any, data: Any, out: str | os.PathLike, *,
                        methods: str | Sequence[str] = "all",
                        strengths: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
                        detect_dir: str | os.PathLike | None = None,
                        encoder: Any = None, config: ComparisonConfig | None = None,
                        command: str | Sequence[str] | None = None,
                        device: str | None = None, dtype: str | None = None,
                        index: str | os.PathLike | None = None,
                        prompts: str | os.PathLike | Sequence[str] | None = None,
                        reference: Any = None, calibration: Any = None,
                        **options: Any) -> MitigationComparison:
    """Compare inference-time mitigations on memorized and control prompts: memorization
    (copy verdicts, nearest similarity, noise magnitude) against utility (in-domain FID-like
    distance, alignment, time), and write ``mitigations.csv``, ``summary.json``,
    ``pareto.png`` to ``out``.

    Without training data (``data=None``) the comparison runs on ``prompts``: memorization is
    Wen et al.'s noise magnitude unless ``reference`` images (with ``calibration`` or a fixed
    ``threshold``) give copy verdicts; what could not be measured is listed in the result's
    ``not_measured`` (and ``summary.json``), each with the flag that would measure it.

    Parameters
    ----------
    model : path or DiffusionModelAdapter
    data : path, CXRDataset or None
        The model's training data (train split: the copy reference; validate/test: the
        threshold's calibration and the real images of the Fréchet distance), or None.
    out : path
        Output folder (never inside the data). Holds ``results.sqlite``: the same command again
        skips finished configurations.
    methods, strengths
        See :class:`ComparisonConfig` (these two override ``config``'s).
    detect_dir : path, optional
        A ``diffmem detect`` output folder: reuse its verdicts (memorized prompts), threshold
        and backend instead of detecting here; a run without copy verdicts (``--methods
        noise``) gives its prompts ranked by noise magnitude.
    encoder : path or InDomainEncoder, optional
        The in-domain encoder of the utility metrics. Default: the embedded one
        (:func:`diffmem.embed.default_encoder_dir`), only when the model card says the model
        was trained on the data that encoder was trained on. Without ``data`` and without a
        usable encoder, utility is not measured (said in ``not_measured``).
    config : ComparisonConfig, optional
    command : str or sequence, optional
        The command line, recorded in the store.
    device, dtype : str, optional
        Device and precision to load a model folder with (see
        :func:`~diffmem.models.load_model`).
    index : path, optional
        A reference index (``diffmem index build``) of the training split's features under the
        verdicts' backend, opened instead of featurizing the training images (same verdicts).
    prompts : path or sequence of str, optional
        The prompts the memorized and control sets are chosen from: a prompts file
        (:func:`diffmem.data.prompts.read_prompts`) or a list. Default: the training prompts of
        ``data`` (or the detect run's prompts).
    reference : path or CXRDataset, optional
        Training images for the copy verdicts when there is no ``data``: a dataset (its train
        split) or a folder of images, as for ``diffmem detect --reference``.
    calibration : path or CXRDataset, optional
        Held-out real images (never trained on) that calibrate the copy threshold and, without
        ``data``, are the real images of the Fréchet distance.
    **options
        Any other :class:`ComparisonConfig` field (``n_prompts=4, generations=1, steps=10``
        make a fast run).

    Returns
    -------
    MitigationComparison

    Raises
    ------
    ConfigError
        Unknown method or option, strength out of range, no usable encoder (with ``data``), a
        utility or threshold option whose inputs are missing (the message names the flag to
        add).
    DataError
        No train split or no held-out images; a ``detect_dir`` without its files; nothing to
        choose prompts from.
    OutputError
        ``out`` inside the data or not writable.
    """
    started = time.perf_counter()
    # 1. check inputs (cheap first)
    unknown = sorted(set(options) - {f for f in ComparisonConfig.__dataclass_fields__})
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(ComparisonConfig.__dataclass_fields__)}")
    config = replace(config or ComparisonConfig(), methods=methods, strengths=strengths,
                     **options).validated()
    detect_info = _read_detect_dir(Path(detect_dir)) if detect_dir is not None else None
    inputs = _check_inputs(data, prompts, reference, calibration, detect_info, config)
    model_source = Path(model) if isinstance(model, (str, os.PathLike)) else None
    roots = inputs.roots + [p for p in (model_source, detect_dir) if p is not None]
    check_outside(out, roots)  # created below, once the model and the encoder have loaded
    notes: list[str] = []

    # 2. model and encoder
    from diffmem.detect.scores import default_guidance
    adapter = as_adapter(model, device=device, dtype=dtype)
    check_workers(config.workers, adapter)  # several workers reopen the model's folder
    enc, enc_info = _resolve_encoder(encoder, adapter, model_source,
                                     required=inputs.dataset is not None)
    config = replace(config, utility=_resolve_utility(config, enc, inputs))
    guidance = default_guidance(adapter) if config.guidance is None else float(config.guidance)
    model_fp = adapter.fingerprint()
    out = prepare_out_dir(out, inputs=roots)

    # 3. thresholds, reference features, prompt sets
    verdicts, reid = _judges(config, detect_info, inputs, out, index)
    metric = "memorization_rate" if verdicts is not None else "noise_magnitude"
    if detect_info is not None:
        sets = _sets_from_detect(detect_info, config, model_fp, notes)
    else:
        sets = _prompt_sets(adapter, inputs.prompts, config, guidance, verdicts, notes)
    if not sets["memorized"] and detect_info is not None:
        notes.append(f"no memorized prompts found among the {detect_info['n_scanned']} prompts "
                     "of the detect run; the comparison ran on the control set only")
    notes += _setting_notes(config, enc_info if enc is not None else None, verdicts)
    real = _real_features(enc, inputs, config)

    # 4. every configuration on every set, resumable through the store
    store = ResultsStore(out / STORE_NAME)
    try:
        run_id = store.start_run(model_fp, data_fingerprint=inputs.data_fp, command=command,
                                 params={**config.to_dict(), "guidance": guidance})
        units = _Units(store, run_id, adapter, config, guidance, verdicts, enc, model_fp,
                       inputs.data_fp, reid, _own_patients(reid, inputs)).all(sets, notes)
    finally:
        store.close()

    # 5. metrics, front, recommendation
    threshold = None if verdicts is None else verdicts.threshold
    rows = _rows(units, sets, threshold, reid, real, enc)
    multi = {m for m in config.methods if len(config.strengths[m]) > 1}
    axes = ("memorized" if sets["memorized"] else "control",
            "control" if sets["control"] else "memorized")
    front, recommended, reason = _front_and_recommendation(rows, config, multi, axes, metric)
    result = MitigationComparison(
        rows=rows, pareto_front=[_label(m, s, multi) for m, s in front],
        recommended=recommended, recommendation_reason=reason, notes=notes, config=config,
        threshold=None if threshold is None else threshold.to_dict(), encoder=enc_info,
        reid_threshold=None if reid is None else reid.threshold.to_dict(),
        prompts={k: list(v) for k, v in sets.items()}, utility_reference=real["reference"],
        memorization_metric=metric,
        not_measured=_not_measured(inputs, verdicts, enc, config, detect_info),
        model_fingerprint=model_fp, data_fingerprint=inputs.data_fp, out=out)

    # 6. files
    result.seconds = time.perf_counter() - started
    _write_outputs(result, out, multi, axes)
    return result


def _setting_notes(config: ComparisonConfig, enc_info: dict[str, Any] | None,
                   verdicts: CopyVerdicts | None = None) -> list[str]:
    """What a reader of the comparison must know about its utility encoder, its size and an
    approximate reference index."""
    search = None if verdicts is None else verdicts.search_note()
    notes = [] if search is None else [search]
    notes += [] if enc_info is None else [
        f"utility is measured with the in-domain encoder {enc_info['path']} (not Inception FID, "
        "not OpenAI CLIP): compare values only within this encoder"]
    return notes + [f"{config.steps} DDIM steps, {config.generations} generation(s) per prompt, "
                    f"{config.n_prompts} prompts per set: smaller than the papers' 50 steps and "
                    "hundreds of prompts; read small differences as noise"]

# ---------------------------------------------------------------------------- inputs
@dataclass
class _Inputs:
    """The checked inputs of a comparison.

    Attributes
    ----------
    dataset : CXRDataset or None
        ``data``.
    train_set : CXRDataset, list of Path or None
        The training images copy verdicts compare with (None: no copy verdicts).
    heldout : CXRDataset, list of Path or None
        Held-out real images the copy threshold is calibrated on (None: a fixed threshold, the
        detect run's, or no verdicts).
    real : CXRDataset, list of Path or None
        Held-out real images of the Fréchet distance (None: not measured).
    prompts : list of str or None
        The prompts the sets are chosen from (None: the detect run's).
    data_fp : str
        Fingerprint of ``train_set`` ("" without one).
    roots : list of Path
        Input folders the output must stay out of.
    """

    dataset: Any
    train_set: Any
    heldout: Any
    real: Any
    prompts: list[str] | None
    data_fp: str
    roots: list[Path]


def _check_inputs(data: Any, prompts: Any, reference: Any, calibration: Any,
                  detect_info: dict | None, config: ComparisonConfig) -> _Inputs:
    """Load and check what a comparison compares with (no model, no image read except to list
    them); the reference and calibration rules are ``diffmem detect``'s
    (:mod:`diffmem.detect.inputs`)."""
    from diffmem.data.prompts import given_prompts
    from diffmem.detect.inputs import (ADD_REFERENCE, heldout_images, reference_fingerprint,
                                       reference_images, training_prompts)

    dataset = train_set = real = None
    if data is not None:
        dataset = as_dataset(data)
        train_set = dataset.subset(split="train")
        real = dataset.subset(split=["validate", "test"])
        if len(train_set) < 2:
            raise DataError("the data has fewer than 2 training images; the copy verdicts "
                            "compare generations with the images the model was trained on",
                            path=dataset.root)
        if len(real) < 2:
            raise DataError("the data has fewer than 2 validate/test images; they calibrate the "
                            "copy threshold and are the real images of the Fréchet distance",
                            path=dataset.root)
    if reference is not None:
        train_set = reference_images(reference)
    if train_set is None and (calibration is not None or config.threshold is not None):
        flag = "--calibration" if calibration is not None else "--threshold"
        raise ConfigError(f"{flag} sets the threshold of copy verdicts, which compare "
                          f"generations with training images, and none were given: "
                          f"{ADD_REFERENCE}")
    heldout = None
    if train_set is not None and not (detect_info or {}).get("threshold"):
        heldout = heldout_images(dataset, calibration, config)
    if real is None and calibration is not None:
        real = heldout if heldout is not None else \
            heldout_images(None, calibration, replace(config, threshold=None))
    if config.utility == "fid_in_domain" and real is None:
        raise ConfigError("utility fid_in_domain compares generations with held-out real "
                          "images, and there are none: add --calibration DIR (real images not in "
                          "the training set) or --data DATA, or use --utility alignment")
    if prompts is not None:
        listed = given_prompts(prompts)
    elif dataset is not None:
        listed = list(training_prompts(dataset))
        if not listed:
            raise DataError("the training split has no non-empty prompt; pass --prompts FILE",
                            path=dataset.root)
    elif detect_info is not None:
        listed = None
    else:
        raise DataError("nothing to choose prompts from: pass --prompts FILE (one prompt per "
                        "line, or a .csv/.jsonl table with a 'prompt' column), --data DATA (its "
                        "training prompts) or --detect DETECT_DIR")
    if listed is not None and len(listed) < 2:
        raise DataError(f"{len(listed)} prompt given; the comparison needs at least 2 (a "
                        "memorized and a control set)")
    from diffmem.data import CXRDataset

    roots = [Path(x.root if isinstance(x, CXRDataset) else x)
             for x in (data, reference, calibration) if isinstance(x, (str, os.PathLike,
                                                                         CXRDataset))]
    return _Inputs(dataset, train_set, heldout, real, listed,
                   reference_fingerprint(train_set) if train_set is not None else "", roots)


def _resolve_utility(config: ComparisonConfig, enc: Any, inputs: _Inputs) -> str | None:
    """The utility axis: the one asked for (it needs an encoder), else ``fid_in_domain`` with
    held-out real images, ``alignment`` without, None without an encoder."""
    if config.utility is not None:
        if enc is None:
            raise ConfigError(f"utility {config.utility} is measured in an in-domain encoder, "
                              "and there is none for this model: add --encoder ENC (`diffmem "
                              "embed train --data DATA --out ENC`), or leave --utility out")
        return config.utility
    if enc is None:
        return None
    return "fid_in_domain" if inputs.real is not None else "alignment"


def _not_measured(inputs: _Inputs, verdicts: Any, enc: Any, config: ComparisonConfig,
                  detect_info: dict | None) -> list[str]:
    """What the inputs given could not measure, each with the flag that would measure it."""
    out = []
    if verdicts is None:
        out.append("copy verdicts (memorization_rate, prompt_memorization_rate, "
                   "mean_nn_similarity): no training images to compare the generations with, "
                   "so memorization is Wen et al.'s first-step noise magnitude (noise_magnitude, "
                   "higher = more memorized), which guidance schedules (acting after the first "
                   "step) leave unchanged. Add --reference DATA|IMAGE_DIR (the training images) "
                   "with --calibration DIR or --threshold to measure copy rates")
        if detect_info is None or not detect_info.get("threshold"):
            out.append("which prompts are memorized: without copy verdicts the 'memorized' set "
                       "is the prompts with the highest noise magnitude, not confirmed by a "
                       "copied training image")
    if enc is None:
        out.append("utility (fid_in_domain, alignment): no in-domain encoder for this model "
                   "(the embedded one belongs to the demo data); add --encoder ENC. Without a "
                   "utility there is no Pareto front and no recommendation")
    elif inputs.real is None:
        out.append("fid_in_domain: no held-out real images to compare the generations with; "
                   "add --calibration DIR (real images not in the training set) or --data DATA")
    if enc is not None and not hasattr(inputs.train_set, "subset"):
        out.append("utility_reference (the utility of real training images): needs the "
                   "training images with their prompts (--data DATA or --reference DATA)")
    return out


def _read_detect_dir(folder: Path) -> dict[str, Any]:
    scores, summary = folder / "scores.csv", folder / "summary.json"
    for f in (scores, summary):
        if not f.is_file():
            raise DataError(f"{f.name} is missing; --detect takes the --out folder of a finished "
                            "`diffmem detect` run", path=folder)
    try:
        info = json.loads(summary.read_text(encoding="utf-8"))
        with open(scores, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the detect run's files ({e})", path=folder) from None
    methods = (info.get("config") or {}).get("methods", [])
    if not (info.get("threshold") and "nn" in methods) and "noise" not in methods:
        raise DataError("this detect run has neither copy verdicts nor noise magnitudes; run "
                        "`diffmem detect` with --methods including nn or noise", path=folder)
    main = [r for r in rows if r.get("kind") in ("train", "prompt")]
    return {"folder": folder, "summary": info, "rows": main, "n_scanned": len(main),
            "threshold": info.get("threshold") if "nn" in methods else None}


def _resolve_encoder(encoder: Any, adapter: Any, model_source: Path | None, *,
                     required: bool = True):
    """The in-domain encoder and its description; ``(None, {...})`` when there is none for
    this model and it is not ``required``."""
    from diffmem.embed import default_encoder_dir, load_encoder

    if encoder is not None:
        enc = encoder if hasattr(encoder, "embed_images") else load_encoder(encoder)
        return enc, {"path": str(enc.path or repr(enc)), "fingerprint": enc.fingerprint(),
                     "default": False, "data_fingerprint": (enc.config.get("data") or {})
                     .get("fingerprint")}
    folder = default_encoder_dir()
    enc_data = json.loads((folder / "encoder_config.json").read_text(encoding="utf-8"))
    enc_fp = (enc_data.get("data") or {}).get("fingerprint")
    card_dir = model_source or (Path(adapter.source) if getattr(adapter, "source", None)
                                else None)
    card_fp = None
    if card_dir is not None and (card_dir / "model_card.json").is_file():
        try:
            card = json.loads((card_dir / "model_card.json").read_text(encoding="utf-8"))
            card_fp = (card.get("data") or {}).get("fingerprint")
        except (OSError, ValueError):
            card_fp = None
    if card_fp is None or card_fp != enc_fp:
        why = (f"the embedded default encoder was trained on data {enc_fp}, and the model's "
               f"card says {card_fp or 'nothing (no model_card.json)'}")
        if not required:
            return None, {"path": None, "fingerprint": None, "default": False,
                          "data_fingerprint": None, "missing": why}
        raise ConfigError(
            f"the utility metrics need an in-domain encoder trained on this model's data: {why}."
            " Train one with `diffmem embed train --data DATA --out ENC` and pass --encoder ENC")
    enc = load_encoder(folder)
    return enc, {"path": str(folder), "fingerprint": enc.fingerprint(), "default": True,
                 "data_fingerprint": enc_fp}


def _judges(config: ComparisonConfig, detect_info: dict | None, inputs: _Inputs,
            out: Path, index: Any = None) -> tuple[CopyVerdicts | None, Any]:
    """The copy verdicts (:func:`_verdicts`, training features from ``index`` when given)
    and, with ``config.reid``, the re-ID setup (:func:`_reid`)."""
    return _verdicts(config, detect_info, inputs, out, index), _reid(config, inputs)


def _verdicts(config: ComparisonConfig, detect_info: dict | None, inputs: _Inputs,
              out: Path, index: Any = None) -> CopyVerdicts | None:
    """Backend, training-image features (from ``index``, or cached in ``out/cache``) and copy
    threshold: the
    detect run's backend and threshold when it has one, else a fixed or calibrated one; None
    without training images."""
    if inputs.train_set is None:
        return None
    if detect_info is None or not detect_info["threshold"]:
        return prepare_verdicts(inputs.train_set, backend=config.backend,
                                backend_options=config.backend_options,
                                threshold=config.threshold, heldout=inputs.heldout,
                                fpr=config.fpr, cache_dir=out / "cache", index=index)
    dconf = detect_info["summary"]["config"]
    t = detect_info["threshold"]
    threshold = replace(fixed_threshold(float(t["value"])), fpr=t.get("fpr"),
                        n=int(t.get("n") or 0),
                        method=f"from detect run ({t.get('method', 'heldout-quantile')})")
    return prepare_verdicts(inputs.train_set, backend=dconf.get("backend", "pixel"),
                            backend_options=dconf.get("backend_options"), threshold=threshold,
                            cache_dir=out / "cache", index=index)


def _number(value: Any) -> float:
    try:
        return float(value or "nan")
    except ValueError:
        return math.nan


def _reid(config: ComparisonConfig, inputs: _Inputs) -> Any:
    """The re-ID setup (:func:`diffmem.reid.verdicts.prepare_reid`) when ``config.reid``:
    against the training records' patients, calibrated on the held-out real images."""
    if not config.reid:
        return None
    if not hasattr(inputs.train_set, "subset"):
        raise ConfigError("--reid compares generations with the training patients, and no "
                          "training records with patient ids were given: add --data DATA (or "
                          "--reference DATA, a dataset), or leave --reid out")
    from diffmem.reid import default_reid_dir
    from diffmem.reid.verdicts import prepare_reid

    return prepare_reid(config.reid_model or default_reid_dir(), inputs.train_set,
                        heldout=inputs.real, threshold=config.reid_threshold, fpr=config.fpr)


def _own_patients(reid: Any, inputs: _Inputs) -> dict[str, set[str]]:
    """Each training prompt's own patients for re-ID: the indexed patients of the training
    studies whose prompt it is, as ``diffmem detect`` defines them (empty without re-ID)."""
    if reid is None:
        return {}
    from diffmem.detect.inputs import training_prompts

    return {prompt: reid.index.patients_of(ids)
            for prompt, ids in training_prompts(inputs.train_set).items()}


def _sets_from_detect(info: dict, config: ComparisonConfig, model_fp: str,
                      notes: list[str]) -> dict[str, list[str]]:
    """The memorized set from a detect run's copy verdicts (most similar first), or, for a run
    without them, its prompts of highest noise magnitude; the control set from the rest."""
    summary = info["summary"]
    if summary.get("model_fingerprint") and summary["model_fingerprint"] != model_fp:
        raise ConfigError(f"the detect run {info['folder']} scanned model "
                          f"{summary['model_fingerprint']}, not this one ({model_fp}); its "
                          "verdicts do not apply: pass that model or run detection again")
    rows = info["rows"]
    if int((summary.get("config") or {}).get("seed", -1)) == config.seed:
        notes.append("the detect run used the comparison's seed: the baseline's memorized-set "
                     "rate is measured on the same initial noises the prompts were selected "
                     "with (optimistic for the baseline; pass another --seed to avoid it)")
    if not info["threshold"]:
        scored = [r for r in rows if math.isfinite(_number(r.get("noise_magnitude")))]
        scored.sort(key=lambda r: (-_number(r["noise_magnitude"]), r["prompt"]))
        prompts = [r["prompt"] for r in scored]
        return _noise_sets(prompts, np.arange(len(prompts)), config, notes)
    memorized = sorted((r for r in rows if str(r.get("memorized")) == "1"),
                       key=lambda r: (-_number(r.get("nn_similarity")), r["prompt"]))
    clean = [r["prompt"] for r in rows if str(r.get("memorized")) == "0"]
    return {"memorized": [r["prompt"] for r in memorized[:config.n_prompts]],
            "control": _sample(clean, config.n_prompts, config.seed)}


def _sample(prompts: list[str], n: int, seed: int) -> list[str]:
    prompts = sorted(set(prompts))
    if len(prompts) <= n:
        return prompts
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in sorted(rng.choice(len(prompts), size=n, replace=False))]


def _control(prompts: list[str], order: np.ndarray, taken: Sequence[str],
             config: ComparisonConfig) -> list[str]:
    """The control set: a seeded sample of the lower half of the noise-magnitude ranking
    ``order``, without the prompts ``taken``."""
    below = set(prompts[i] for i in order[len(order) // 2:]) - set(taken)
    return _sample(list(below), config.n_prompts, config.seed)


def _noise_sets(prompts: list[str], order: np.ndarray, config: ComparisonConfig,
                notes: list[str]) -> dict[str, list[str]]:
    """Without copy verdicts: the prompts of highest noise magnitude (at most half of them) as
    the memorized set, a sample of the lower half as control."""
    k = min(config.n_prompts, max(1, len(order) // 2))
    memorized = [prompts[i] for i in order[:k]]
    notes.append(f"memorized set: the {k} of {len(prompts)} prompts with the highest first-step "
                 "noise magnitude (Wen et al., ICLR 2024), not confirmed by generation; the "
                 "control set is sampled from the lower half")
    return {"memorized": memorized, "control": _control(prompts, order, memorized, config)}


def _prompt_sets(adapter: Any, prompts: list[str], config: ComparisonConfig, guidance: float,
                 verdicts: CopyVerdicts | None, notes: list[str]) -> dict[str, list[str]]:
    """Memorized and control prompts found with the detector's building blocks: the prompts
    ranked by Wen et al.'s noise magnitude; with copy verdicts, the top candidates generated
    and checked for copies, else the top of the ranking."""
    from diffmem.detect.neighbors import nearest_neighbors
    from diffmem.detect.scores import noise_magnitude

    scores = noise_magnitude(adapter, prompts, num_inference_steps=config.steps,
                             seed=config.seed, batch_size=max(config.batch_size, 32))
    order = np.argsort(-scores, kind="stable")
    if verdicts is None:
        return _noise_sets(prompts, order, config, notes)
    # candidates come from the upper half, so that the lower half is left for the control set
    n_cand = min(max(1, len(prompts) // 2), config.candidates or 3 * config.n_prompts)
    candidates = [prompts[i] for i in order[:n_cand]]
    sample = adapter.sample(candidates, n_per_prompt=config.detect_generations,
                            steps=config.steps, guidance=guidance,
                            seed=config.seed + DETECT_SEED_OFFSET, batch_size=config.batch_size)
    nn = nearest_neighbors(sample.images, verdicts.reference, backend=verdicts.backend, k=1)
    best = np.full(len(candidates), -np.inf)
    copies = np.zeros(len(candidates), dtype=bool)
    for r, (p, copy) in enumerate(zip(sample.prompt_index, verdicts.judge(nn.similarities[:, 0]))):
        best[p] = max(best[p], nn.similarities[r, 0])
        copies[p] |= bool(copy)
    flagged = sorted((i for i in range(len(candidates)) if copies[i]), key=lambda i: -best[i])
    memorized = [candidates[i] for i in flagged[:config.n_prompts]]
    if not memorized:
        notes.append(f"no memorized prompts found among the top {n_cand} noise-magnitude "
                     "prompts; the comparison ran on the control set only")
    return {"memorized": memorized, "control": _control(prompts, order, candidates, config)}


def _images(source: Any, size: int, indices: Sequence[int] | None = None) -> np.ndarray:
    """Images of a dataset (its records at ``indices``) or of image files, at ``size``."""
    if hasattr(source, "iter_images"):
        return np.concatenate([imgs for _, imgs in source.iter_images(
            size=size, batch_size=128, indices=None if indices is None else np.array(indices))])
    from diffmem.data.images import read_image

    files = source if indices is None else [source[int(i)] for i in indices]
    return np.stack([read_image(p, size=size) for p in files])


def _real_features(enc: Any, inputs: _Inputs, config: ComparisonConfig) -> dict[str, Any]:
    """Held-out real images' embeddings (the Fréchet reference; None without them or without
    an encoder) and the utility metrics of real training images of the same count as a set's
    generations (the "as real" level; needs training images with their prompts)."""
    from diffmem.embed import alignment_score, frechet_distance

    if enc is None:
        return {"heldout": None, "reference": {}}
    size = int(enc.image_size)
    held_emb = None if inputs.real is None else enc.embed_images(_images(inputs.real, size))
    train_set = inputs.train_set
    if not hasattr(train_set, "subset"):  # no training records with prompts
        return {"heldout": held_emb, "reference": {}}
    n = config.n_prompts * config.generations
    rng = np.random.default_rng(config.seed)
    pick = sorted(rng.choice(len(train_set), size=min(n, len(train_set)), replace=False))
    train_emb = enc.embed_images(_images(train_set, size, pick))
    texts = enc.embed_texts([train_set[int(i)].prompt for i in pick])
    reference = {
        "n_heldout": None if held_emb is None else int(len(held_emb)),
        "n_real": int(len(pick)),
        "fid_in_domain_real_train": round(frechet_distance(train_emb, held_emb), 6)
        if len(pick) >= 2 and held_emb is not None else None,
        "alignment_real_train": round(float(alignment_score(train_emb, texts).mean()), 6),
        "note": "the same metrics for real training images (as many as one set's generations) "
                "against the held-out images: the level of a perfect generator",
    }
    return {"heldout": held_emb, "reference": reference}


# ---------------------------------------------------------------------------- one unit
@dataclass
class _Units:
    """Generates the (method, strength, set) units of a comparison (in this process or in
    ``config.workers`` processes), measures them here and commits each to the store as soon as
    it is done; a unit already in the store is read instead."""

    store: ResultsStore
    run_id: int
    adapter: Any
    config: ComparisonConfig
    guidance: float
    verdicts: CopyVerdicts | None
    encoder: Any
    model_fp: str
    data_fp: str
    reid: Any = None
    own: Mapping[str, set[str]] = field(default_factory=dict)

    def all(self, sets: Mapping[str, list[str]], notes: list[str],
            ) -> dict[tuple[str, float, str], dict[str, Any]]:
        """Every (method, strength) and the ``none`` baseline on every non-empty set, keyed
        ``(method, strength, set)`` in that order; a note when prompt-embedding optimization's
        target is taken from the baseline.

        The baseline units run first (prompt-embedding optimization stops at the baseline's
        noise magnitude), then every other unit; within each wave the units are independent."""
        config = self.config
        configs = [(BASELINE, 0.0)] + [(m, s) for m in config.methods
                                       for s in config.strengths[m]]
        peo_target = None
        units: dict[tuple[str, float, str], dict[str, Any]] = {}
        work = [(m, s, name) for m, s in configs for name in SETS if sets[name]]
        with WorkerPool(self.adapter, workers=config.workers, threads=config.threads) as pool:
            for wave in ([w for w in work if w[0] == BASELINE],
                         [w for w in work if w[0] != BASELINE]):
                todo = []
                for method, strength, set_name in wave:
                    params = {}
                    if method == "prompt_embedding_optimization" and \
                            get_mitigation(method).params.get("target") is None:
                        peo_target = _peo_target(units) if peo_target is None else peo_target
                        params["target"] = peo_target
                    if method == "nemo_deactivation" and _nemo_needs_reference():
                        # NeMo's in-distribution statistics come from non-memorized prompts
                        params["reference_prompts"] = list(sets["control"])
                    todo.append((method, strength, set_name, params))
                units.update(self._measure(todo, sets, pool))
        if peo_target is not None:
            notes.append(f"prompt_embedding_optimization stops at the median first-step noise "
                         f"magnitude of the baseline control prompts ({peo_target:.4g})")
        if "nemo_deactivation" in config.methods and _nemo_needs_reference():
            notes.append("nemo_deactivation localizes each prompt's memorization neurons "
                         f"against activation statistics of the {len(sets['control'])} control "
                         "prompts")
        return {key: units[key] for key in work}

    def _key(self, method: str, strength: float, params: dict, prompts: list[str]) -> str:
        """The store's parameter hash of a unit: everything its stored value depends on."""
        config = self.config
        key = {"method": method, "strength": strength, "params": params, "prompts": prompts,
               "generations": config.generations, "steps": config.steps,
               "guidance": self.guidance, "seed": config.seed,
               "backend": None if self.verdicts is None else self.verdicts.backend.params(),
               "reference": self.data_fp,
               "encoder": None if self.encoder is None else self.encoder.fingerprint(),
               "preset": None if method == BASELINE else dict(get_mitigation(method).params)}
        if self.reid is not None:  # stored values then hold re-ID scores too
            key["reid"] = {**self.reid.params(), "own_patient": True}
        if self.verdicts is not None and self.verdicts.approximate is not None:
            key["search"] = self.verdicts.approximate  # kept apart from exact verdicts
        return self.store.put_params(key)

    def _measure(self, todo: list[tuple[str, float, str, dict]], sets: Mapping[str, list[str]],
                 pool: WorkerPool) -> dict[tuple[str, float, str], dict[str, Any]]:
        """The units of ``todo`` (method, strength, set, params): read from the store, or
        generated (:func:`generate`, on the ``pool``'s workers) and measured (:func:`judge`)
        here, each committed as soon as it is done, so a killed run resumes."""
        config, store = self.config, self.store
        done: dict[tuple[str, float, str], dict[str, Any]] = {}
        missing, tasks = [], []
        for method, strength, set_name, params in todo:
            h = self._key(method, strength, params, sets[set_name])
            name = f"{set_name}:{method}:{strength:g}"
            stored = store.get(self.model_fp, name, "mitigate", h)
            if stored is not None:
                done[(method, strength, set_name)] = stored["value"]
                continue
            missing.append(((method, strength, set_name), name, h))
            tasks.append({"prompts": list(sets[set_name]), "method": method,
                          "strength": strength, "params": params,
                          "generations": config.generations, "steps": config.steps,
                          "guidance": self.guidance, "seed": config.seed,
                          "batch_size": config.batch_size})
        for i, generated in pool.imap(_generate_task, tasks, desc="mitigations", unit="config"):
            key, name, h = missing[i]
            value = judge(generated, backend=None if self.verdicts is None else
                          self.verdicts.backend, reference=None if self.verdicts is None else
                          self.verdicts.reference, encoder=self.encoder, reid=self.reid,
                          own=[self.own.get(p, set()) for p in tasks[i]["prompts"]])
            store.put_many([{"model_fingerprint": self.model_fp, "prompt": name,
                             "method": "mitigate", "params_hash": h, "value": value}],
                           run_id=self.run_id)
            done[key] = value
        return done


def _peo_target(units: Mapping[tuple[str, float, str], Mapping[str, Any]]) -> float:
    """Prompt-embedding optimization's target: the median first-step noise magnitude of the
    baseline's control prompts (its memorized prompts when there is no control set)."""
    base = units.get((BASELINE, 0.0, "control")) or units.get((BASELINE, 0.0, "memorized"))
    return float(np.median(base["noise_magnitude"]))


def _generate_task(adapter: Any, task: dict[str, Any]) -> dict[str, Any]:
    """One unit's :func:`generate` call (what a worker of :class:`~diffmem.workers.WorkerPool`
    runs)."""
    return generate(adapter, **task)


def generate(adapter: Any, prompts: Sequence[str], *, method: str, strength: float,
             params: Mapping[str, Any] | None = None, generations: int, steps: int,
             guidance: float, seed: int, batch_size: int) -> dict[str, Any]:
    """Generate with one mitigation (no measurement, no files written).

    Every generation's initial noise comes from :func:`~diffmem.models.generation_seed` and
    the methods' own randomness is seeded per generation, so the result does not depend on the
    process that runs it.

    Returns
    -------
    dict
        ``images`` (float32 ``(N, H, W)``), ``prompt_index`` (list), ``noise_magnitude`` (the
        text-conditional noise gap at the first step, with the method's embedding and
        attention changes; one per generation) and ``seconds`` (wall time of the sampling).
    """
    import torch

    from diffmem.mitigate.registry import mitigation_hooks
    from diffmem.models import SamplingHooks, combine_hooks

    hooks = SamplingHooks() if method == BASELINE else \
        mitigation_hooks(method, adapter, strength, seed=seed, **dict(params or {}))
    probe = _FirstStepProbe(adapter)
    started = time.perf_counter()
    sample = adapter.sample(list(prompts), n_per_prompt=generations, steps=steps,
                            guidance=guidance, seed=seed, batch_size=batch_size,
                            hooks=combine_hooks(hooks, probe.hooks()))
    seconds = time.perf_counter() - started
    magnitudes = torch.cat(probe.values).tolist() if probe.values else []
    return {"images": sample.images, "prompt_index": sample.prompt_index.tolist(),
            "noise_magnitude": [float(x) for x in magnitudes], "seconds": round(seconds, 4)}


def judge(generated: Mapping[str, Any], *, backend: Any, reference: Any, encoder: Any,
          reid: Any = None, own: Sequence[Collection[str]] | None = None) -> dict[str, Any]:
    """Measure the generations of :func:`generate` (no files written).

    Returns a JSON-ready dict of per-generation lists (the stored value of a unit):
    ``prompt_index``, ``similarity`` (to the nearest training image; empty when ``reference``
    is None), ``study_id``, ``noise_magnitude`` (first step), the image embeddings
    ``embedding`` (empty when ``encoder`` is None), with a
    :class:`~diffmem.reid.verdicts.ReIDSetup` ``reid`` also ``reid_score``,
    ``reid_patient_id`` (the most similar training patient) and ``reid_own_score`` (the score
    against the prompt's own patients, ``own``: one collection per prompt; None where a prompt
    has none; :meth:`~diffmem.reid.verdicts.ReIDSetup.search_own`, as ``diffmem detect``),
    and ``seconds`` (wall time of the sampling).
    """
    from diffmem.detect.neighbors import nearest_neighbors

    images = generated["images"]
    similarity, study_id = [], []
    if reference is not None:
        nn = nearest_neighbors(images, reference, backend=backend, k=1)
        similarity = [float(x) for x in nn.similarities[:, 0]]
        study_id = [str(x) for x in nn.study_ids[:, 0]] if nn.study_ids is not None else []
    emb = [] if encoder is None else \
        np.round(encoder.embed_images(images).astype(np.float64), 6).tolist()
    extra = {}
    if reid is not None:
        mine = [set() if own is None else own[p] for p in generated["prompt_index"]]
        scores, rows, own_scores = reid.search_own(images, mine)
        extra = {"reid_score": [float(x) for x in scores],
                 "reid_patient_id": [reid.index.patient_ids[r] for r in rows],
                 "reid_own_score": [None if np.isnan(x) else float(x) for x in own_scores]}
    return {**extra, "prompt_index": list(generated["prompt_index"]), "similarity": similarity,
            "study_id": study_id, "noise_magnitude": list(generated["noise_magnitude"]),
            "embedding": emb, "seconds": generated["seconds"]}


class _FirstStepProbe:
    """Records the noise gap ``||eps_c - eps_u||`` (:func:`~diffmem.models.noise_gap`) at the
    first step of every batch, as sampled (with the mitigation's embeddings and attention
    hooks). When the first step skips the conditional branch (guidance 0), it is computed from
    the batch's final embeddings and ``x_T``."""

    def __init__(self, adapter: Any):
        self.adapter = adapter
        self.values: list[Any] = []
        self._embeds: tuple[Any, Any] | None = None

    def hooks(self):
        from diffmem.models import SamplingHooks, noise_gap

        def prompt_embeds(cond, uncond, prompts):
            self._embeds = (cond, uncond)
            return cond, uncond

        def on_step(step_index, t, latents, eps_u, eps_c):
            if step_index != 0:
                return
            if eps_c is None:
                from diffmem.detect.scores import noise_magnitude_from_embeddings

                cond, uncond = self._embeds
                self.values.append(noise_magnitude_from_embeddings(
                    self.adapter, cond, uncond, latents, t).cpu())
            else:
                self.values.append(noise_gap(eps_c, eps_u).cpu())

        return SamplingHooks(prompt_embeds=prompt_embeds, on_step=on_step)


# ---------------------------------------------------------------------------- metrics
def _rows(units: Mapping[tuple[str, float, str], Mapping[str, Any]],
          sets: Mapping[str, list[str]], threshold: Any, reid: Any, real: Mapping[str, Any],
          enc: Any) -> list[dict[str, Any]]:
    """One row per (method, strength, set) unit: its metrics (:func:`_row`) and, with ``reid``,
    its re-identification rates (:func:`_reid_rates`)."""
    return [{**_row(method, strength, name, unit, threshold, real, sets[name], enc),
             **_reid_rates(unit, len(sets[name]), reid)}
            for (method, strength, name), unit in units.items()]


def _reid_rates(unit: Mapping[str, Any], n_prompts: int, reid: Any) -> dict[str, float | None]:
    """Re-identification rates of one unit at the threshold of ``reid`` (a
    :class:`~diffmem.reid.verdicts.ReIDSetup`), any-patient and own-patient: of its
    generations, and of its prompts (at least one re-identifying generation); None without
    re-ID. A generation without an own patient does not re-identify it."""
    if reid is None:
        return {"reid_rate": None, "prompt_reid_rate": None, "reid_rate_own": None,
                "prompt_reid_rate_own": None}
    index = np.asarray(unit["prompt_index"], dtype=np.int64)
    own = np.array([np.nan if x is None else x for x in unit["reid_own_score"]],
                   dtype=np.float64)
    out = {}
    for suffix, scores in (("", np.asarray(unit["reid_score"], dtype=np.float64)),
                           ("_own", own)):
        leaks = reid.judge(scores)  # NaN (no own patient) is never above the threshold
        out[f"reid_rate{suffix}"] = round(float(leaks.mean()), 6)
        out[f"prompt_reid_rate{suffix}"] = round(float(np.mean(
            [bool(leaks[index == p].any()) for p in range(n_prompts)])), 6)
    return out


def _row(method: str, strength: float, set_name: str, unit: Mapping[str, Any], threshold: Any,
         real: Mapping[str, Any], prompts: list[str], enc: Any) -> dict[str, Any]:
    """One row of :data:`CSV_COLUMNS`; a metric whose inputs are missing (no ``threshold``: no
    copy verdicts; no ``enc``; no held-out embeddings in ``real``) is None."""
    from diffmem.embed import alignment_score, frechet_distance

    index = np.asarray(unit["prompt_index"], dtype=np.int64)
    row: dict[str, Any] = {
        "method": method, "strength": float(strength), "prompt_set": set_name,
        "n_prompts": len(prompts), "n_generations": int(len(index)),
        "memorization_rate": None, "prompt_memorization_rate": None,
        "mean_nn_similarity": None,
        "noise_magnitude": round(float(np.mean(unit["noise_magnitude"])), 6)
        if unit["noise_magnitude"] else None,
        "fid_in_domain": None, "alignment": None,
        "seconds_per_image": round(float(unit["seconds"]) / max(1, len(index)), 6),
        "pareto": False,
    }
    if threshold is not None and len(unit["similarity"]):
        sims = np.asarray(unit["similarity"], dtype=np.float64)
        copies = is_copy(sims, threshold)
        row["memorization_rate"] = round(float(copies.mean()), 6)
        row["prompt_memorization_rate"] = round(float(np.mean(
            [bool(copies[index == p].any()) for p in range(len(prompts))])), 6)
        row["mean_nn_similarity"] = round(float(sims.mean()), 6)
    if enc is not None and len(unit["embedding"]):
        emb = np.asarray(unit["embedding"], dtype=np.float64)
        texts = enc.embed_texts([prompts[i] for i in index])
        row["alignment"] = round(float(alignment_score(emb, texts).mean()), 6)
        if real.get("heldout") is not None:
            row["fid_in_domain"] = round(frechet_distance(emb, real["heldout"]), 6)
    return row


def points(rows: Sequence[Mapping[str, Any]], *, utility: str = "fid_in_domain",
           memorization_set: str = "memorized", utility_set: str = "control",
           memorization: str = "memorization_rate") -> list[dict[str, Any]]:
    """One point per configuration: its ``memorization`` metric (``memorization_rate``, or
    ``noise_magnitude`` without copy verdicts) on ``memorization_set`` and its ``utility`` on
    ``utility_set``, as keys ``memorization`` and ``utility`` (a configuration missing either
    is left out).

    By default memorization is read on the memorized prompts and utility on the control
    prompts: a deployed mitigation runs on every prompt, most of which are not memorized, and
    on memorized prompts the baseline's utility is distorted by the copies themselves (a set of
    near-identical copies has a large Fréchet distance to varied real images).
    """
    if utility not in UTILITIES:
        raise ConfigError(f"utility={utility!r}; choose {' or '.join(UTILITIES)}")
    if memorization not in MEMORIZATION_METRICS:
        raise ConfigError(f"memorization={memorization!r}; choose "
                          f"{' or '.join(MEMORIZATION_METRICS)}")
    mem = {(r["method"], float(r["strength"])): r[memorization] for r in rows
           if r["prompt_set"] == memorization_set and r.get(memorization) is not None}
    use = {(r["method"], float(r["strength"])): r[utility] for r in rows
           if r["prompt_set"] == utility_set and r.get(utility) is not None}
    return [{"method": k[0], "strength": k[1], "memorization": mem[k], "utility": use[k]}
            for k in mem if k in use]


def pareto_front(rows: Sequence[Mapping[str, Any]], *, utility: str = "fid_in_domain",
                 memorization_set: str = "memorized", utility_set: str = "control",
                 memorization: str = "memorization_rate") -> list[tuple[str, float]]:
    """Configurations ``(method, strength)`` not dominated in (``memorization`` on
    ``memorization_set``, ``utility`` on ``utility_set``): no other configuration is at least
    as good on both and better on one (see :func:`points`).

    Lower memorization is better; ``fid_in_domain`` lower, ``alignment`` higher. Sorted by
    memorization, then utility.

    Examples
    --------
    >>> rows = [dict(method=m, strength=s, prompt_set=p, memorization_rate=x, fid_in_domain=y)
    ...         for m, s, p, x, y in [("none", 0.0, "memorized", 1.0, 9.0),
    ...                               ("none", 0.0, "control", 0.0, 1.0),
    ...                               ("a", 1.0, "memorized", 0.5, 9.0),
    ...                               ("a", 1.0, "control", 0.0, 2.0),
    ...                               ("b", 1.0, "memorized", 0.5, 1.0),
    ...                               ("b", 1.0, "control", 0.0, 3.0)]]
    >>> pareto_front(rows)
    [('a', 1.0), ('none', 0.0)]
    """
    sign = -1.0 if UTILITIES[utility] else 1.0
    pts = [(p["method"], p["strength"], float(p["memorization"]), sign * float(p["utility"]))
           for p in points(rows, utility=utility, memorization_set=memorization_set,
                           utility_set=utility_set, memorization=memorization)]
    return non_dominated([((m, s), x, y) for m, s, x, y in pts])


def non_dominated(pts: Sequence[tuple[Any, float, float]]) -> list[Any]:
    """The keys of the points ``(key, x, y)`` that no other point dominates (lower is better on
    both axes: another point at least as low on both and lower on one), sorted by x, y, key.

    Examples
    --------
    >>> non_dominated([("a", 1.0, 2.0), ("b", 2.0, 1.0), ("c", 2.0, 2.0)])
    ['a', 'b']
    """
    front = [(x, y, key) for key, x, y in pts
             if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for _, x2, y2 in pts)]
    return [key for x, y, key in sorted(front)]


def _label(method: str, strength: float, multi: set[str]) -> str:
    return f"{method}@{strength:g}" if method in multi else method


def _front_and_recommendation(rows: list[dict[str, Any]], config: ComparisonConfig,
                              multi: set[str], sets: tuple[str, str], metric: str):
    """Mark the Pareto rows and pick the recommendation: ``(front, recommended, reason)``;
    no front and no recommendation without a utility."""
    if config.utility is None:
        return [], None, ("no utility was measured (no in-domain encoder), so no mitigation "
                          "can be recommended: the table shows what each one does to "
                          f"{MEMORIZATION_METRICS[metric]}, not what it costs")
    front = pareto_front(rows, utility=config.utility, memorization_set=sets[0],
                         utility_set=sets[1], memorization=metric)
    for r in rows:
        r["pareto"] = (r["method"], r["strength"]) in front
    return (front, *_recommend(rows, front, config, multi, sets, metric))


def _recommend(rows: list[dict[str, Any]], front: list[tuple[str, float]],
               config: ComparisonConfig, multi: set[str], sets: tuple[str, str],
               metric: str = "memorization_rate"):
    u, (mem_set, use_set) = config.utility, sets
    what = MEMORIZATION_METRICS[metric]
    by_key = {(p["method"], p["strength"]): p for p in points(
        rows, utility=u, memorization_set=mem_set, utility_set=use_set, memorization=metric)}
    base = by_key.get((BASELINE, 0.0))
    if base is None:
        return None, f"the baseline has no {what} and {u} to compare with"
    higher, tol = UTILITIES[u], float(config.fid_tolerance)
    # every measured utility must stay within the tolerance, not only the chosen one: a
    # setting that keeps the Fréchet distance while its images stop following the prompts
    # (alignment on the control prompts collapses, as pruning 99% of the cross-attention
    # does) is not a recommendation
    measured = {v: {(p["method"], p["strength"]): p["utility"] for p in points(
        rows, utility=v, memorization_set=mem_set, utility_set=use_set, memorization=metric)}
        for v in UTILITIES}
    measured = {v: m for v, m in measured.items() if (BASELINE, 0.0) in m}

    def acceptable(key):
        for v, values in measured.items():
            b, x = values[(BASELINE, 0.0)], values.get(key)
            if x is not None and not (x >= b - tol * abs(b) if UTILITIES[v]
                                      else x <= b * (1 + tol)):
                return False
        return True

    # the lowest memorization among the acceptable settings: on the front of those settings
    # (a setting off the whole front is chosen only when every one dominating it fails)
    options = [p for k, p in by_key.items() if k[0] != BASELINE
               and p["memorization"] < base["memorization"] and acceptable(k)]
    if not options:
        if base["memorization"] == 0 and metric == "memorization_rate":
            return None, (f"the baseline copies nothing on the {mem_set} prompts at this "
                          "threshold: no mitigation is needed there")
        return None, (f"no mitigation lowers the {what} of the {mem_set} prompts below the "
                      f"baseline's {base['memorization']:.4g} while keeping "
                      f"{' and '.join(measured)} on the {use_set} prompts within {tol:.0%} "
                      f"of the baseline's ({base['utility']:.4g} for {u})")
    best = min(options, key=lambda p: (p["memorization"],
                                       -p["utility"] if higher else p["utility"]))
    label = _label(best["method"], best["strength"], multi)
    cost = _alignment_change(rows, best, sets)
    others = [v for v in measured if v != u]
    where = ("on the Pareto front" if (best["method"], best["strength"]) in front else
             "off the Pareto front (the settings dominating it fail a utility)")
    return label, (f"{where}, lowest {what} on the {mem_set} prompts "
                   f"({best['memorization']:.4g} vs {base['memorization']:.4g} without "
                   f"mitigation) with {u} on the {use_set} prompts {best['utility']:.4g}, "
                   f"within {tol:.0%} of the baseline's {base['utility']:.4g}"
                   + (f" ({' and '.join(others)} within {tol:.0%} too)" if others else "")
                   + cost)


def _alignment_change(rows: list[dict[str, Any]], best: Mapping[str, Any],
                      sets: tuple[str, str]) -> str:
    """``"; alignment ... -> ..."`` per prompt set, so a recommendation shows its other cost."""
    parts = []
    for name in dict.fromkeys(sets):
        pair = {r["method"]: r["alignment"] for r in rows if r["prompt_set"] == name and (
            (r["method"], r["strength"]) in ((BASELINE, 0.0), (best["method"], best["strength"])))
            and r["alignment"] is not None}
        if len(pair) == 2:
            parts.append(f"{name} {pair[BASELINE]:.3f} -> {pair[best['method']]:.3f}")
    return f"; its alignment changes {', '.join(parts)}" if parts else ""


# ---------------------------------------------------------------------------- files
def _write_outputs(result: MitigationComparison, out: Path, multi: set[str],
                   sets: tuple[str, str]) -> None:
    from diffmem.mitigate.plots import plot_pareto

    write_csv(out / CSV_NAME, CSV_COLUMNS,
              ({k: ("" if r[k] is None else str(r[k]).lower() if isinstance(r[k], bool) else r[k])
                for k in CSV_COLUMNS} for r in result.rows))
    result.files = {"csv": str(out / CSV_NAME), "summary": str(out / SUMMARY_NAME),
                    "store": str(out / STORE_NAME)}
    primary, metric = result.config.utility, result.memorization_metric
    panels = {u: points(result.rows, utility=u, memorization_set=sets[0], utility_set=sets[1],
                        memorization=metric)
              for u in (primary, *(u for u in UTILITIES if u != primary)) if u is not None}
    panels = {u: pts for u, pts in panels.items() if pts}
    if panels:
        result.files["pareto"] = str(plot_pareto(
            panels, out / PLOT_NAME, memorization_set=sets[0], utility_set=sets[1],
            metric=MEMORIZATION_METRICS[metric],
            front={(r["method"], r["strength"]) for r in result.rows if r["pareto"]},
            labels={(m, s): _label(m, s, multi) for m, s in
                    {(r["method"], r["strength"]) for r in result.rows}}))
    try:
        write_json(out / SUMMARY_NAME, result.to_dict())
    except OSError as e:
        raise OutputError(f"cannot write {out / SUMMARY_NAME}: {e.strerror}") from None

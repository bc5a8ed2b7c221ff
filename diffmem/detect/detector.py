"""The end-to-end memorization scan behind ``diffmem detect``: prompts -> model-based scores ->
generations -> nearest training images -> calibrated copy verdicts -> results store -> files.

:func:`detect` answers "which prompts make this model reproduce a training image?":

1. **check inputs** (:func:`~diffmem.detect.inputs.check_inputs`): prompts come from
   ``--prompts FILE`` or the training split's unique prompts; without ``data`` the model-based
   scores need nothing else, while ``nn`` needs reference images (``data``'s train split or
   ``reference``: a dataset or an image folder) and held-out images (the validate/test splits,
   a ``calibration`` folder) or a fixed ``threshold``, all before anything expensive runs;
2. **calibrate** the copy threshold on held-out real images' nearest-training similarity at the
   chosen false-positive rate (:func:`~diffmem.detect.verdicts.prepare_verdicts`);
3. **scan** every prompt with each method (``noise``: :func:`~diffmem.detect.scores.
   noise_magnitude`, ``attention``: :func:`~diffmem.detect.scores.attention_entropy`, ``nn``:
   seeded generations and their two nearest training images). Each chunk of results is
   committed to ``results.sqlite`` as soon as it is computed, so a killed run resumes where it
   stopped and a re-run skips finished work. By default (``confirm="screen"``) ``nn`` runs in
   two stages (:mod:`diffmem.detect.twostage`): only the prompts the noise magnitude flags and a
   seeded audit sample of the others are generated from, with a Clopper–Pearson bound on the
   copies the screen missed, widening to every prompt when the audit finds one; ``"all"``
   generates for every prompt. Generations from the empty prompt and from a few
   unrelated (held-out) prompts are scanned too: a model can copy training images without
   binding them to their prompt, and those copies are reported as well;
4. **verdicts**: a generation is a copy when its top-1 similarity is above the threshold
   (Gu et al.'s ratio criterion ``d1/d2 < 1/3`` is reported alongside); a prompt is memorized
   when any of its generations is a copy. With ``reid`` among the methods, every generation
   the ``nn`` verdicts make is also matched to its most similar training *patient*
   (:mod:`diffmem.reid.verdicts`: max over that patient's studies, after Packhäuser et al.,
   Sci. Rep. 2022, used on generations as Dutt et al. do); it **re-identifies** the patient when
   the re-ID score is above a threshold calibrated like the copy threshold, on held-out
   patients' images; a prompt is **patient-leaking** when any of its generations does. In a
   two-stage run re-ID judges the generations stage 2 made (flagged, audited, unrelated and
   empty prompts); the audit's bound and its widening rule are about copies only;
5. **write** ``scores.csv``, ``copies.csv`` (and ``reidentified.csv``), ``summary.json``,
   ``results.json`` and figures.

Under ``accelerate launch`` each process scans ``items[rank::world]`` into the same store; the
main process writes the files after all have finished.

This module is the run (its settings, :class:`DetectionConfig`, and its steps); its inputs are
checked in :mod:`diffmem.detect.inputs`, the verdict setup and rule live in
:mod:`diffmem.detect.verdicts`, the result dataclasses in :mod:`diffmem.detect.results` and
the files are written by :mod:`diffmem.detect.writers`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.data.prompts import read_prompts
from diffmem.detect.inputs import (
    WorkItem,
    check_inputs,
    check_writable,
    mismatch_warnings,
    prompt_labels,
    reference_fingerprint,
    reid_fix,
    training_prompts,
)
from diffmem.detect.neighbors import nearest_neighbors, one_blas_thread
from diffmem.detect.results import (
    KINDS,
    OWN_PATIENT_KINDS,
    SCORE_COLUMNS,
    DetectionResult,
    GenerationMatch,
    PromptResult,
)
from diffmem.detect.scores import attention_entropy, default_guidance, noise_magnitude
from diffmem.detect.skew import copy_concentration
from diffmem.detect.twostage import (
    DEFAULT_AUDIT_BOUND,
    SCREEN_K,
    ScreenPlan,
    audit_size_for,
    needs_widening,
    plan_stage2,
)
from diffmem.detect.verdicts import CopyVerdicts, is_ratio_copy, prepare_verdicts
from diffmem.detect.writers import (
    STORE_FILE,
    copy_image_path,
    reid_image_path,
    save_copy_images,
    write_outputs,
)
from diffmem.errors import ConfigError, OutputError
from diffmem.reid.verdicts import ReIDSetup, prepare_reid
from diffmem.store import ResultsStore, params_hash, prompt_hash
from diffmem.utils import prepare_out_dir, progress

log = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "METHODS",
    "SCORE_COLUMNS",
    "DetectionConfig",
    "DetectionResult",
    "GenerationMatch",
    "PromptResult",
    "detect",
    "prompt_labels",
    "read_prompts",
    "training_prompts",
]

#: ``--methods`` name -> name of the method in the results store and in ``scores.csv``.
#: ``reid`` is judged on the ``nn`` generations and stored with them (it needs ``nn``).
METHODS = {"noise": "noise_magnitude", "attention": "attention_entropy", "nn": "nn",
           "reid": "nn"}
#: The methods that are scans of their own (``reid`` rides on ``nn``).
SCANS = ("noise", "attention", "nn")
#: ``--confirm`` policies: two-stage (screen, then confirm flagged + audit) or exhaustive.
CONFIRM = ("screen", "all")


# ---------------------------------------------------------------------------- configuration
@dataclass
class DetectionConfig:
    """Settings of a detection run (all keyword; defaults are the product's).

    Attributes
    ----------
    methods : tuple of str
        Any of ``"noise"``, ``"attention"``, ``"nn"``, ``"reid"`` (see :data:`METHODS`;
        ``reid`` judges the ``nn`` generations, so it needs ``nn``).
    generations : int
        Seeded initial noises per prompt for the noise and attention scores (default 1).
    steps : int
        Sampling steps the noise and attention scores average over, from the first (default 1).
    num_inference_steps : int
        Length of the DDIM schedule those steps are taken from (default 50).
    nn_generations : int or None
        Images generated per prompt for the nearest-neighbour verdicts (default: 2).
    sample_steps : int
        DDIM steps of those generations (default 25: with 2 generations, the default two-stage
        run on the 266-prompt demo data fits in about 3 minutes on two CPU cores).
    guidance : float or None
        Classifier-free guidance scale (default: the pipeline's own,
        :func:`~diffmem.detect.scores.default_guidance`).
    seed : int
        Generation ``j`` of prompt ``p`` starts from the noise seeded by
        :func:`~diffmem.models.generation_seed` ``(seed, p, j)`` (the scores and the images of
        generation ``j`` share it).
    batch_size : int
        Generations per UNet call.
    backend : str
        Similarity backend of the nearest-neighbour search: ``pixel`` (default), ``tiled_l2``,
        ``ssim`` or ``embedding`` (needs ``backend_options={"encoder": path or encoder}``).
    backend_options : dict
        Keyword options of the backend (``size``, ``grid``, ``encoder``...).
    fpr : float
        False-positive rate the copy threshold is calibrated at (default 0.01).
    threshold : float or None
        A fixed copy threshold on the backend's similarity scale instead of calibrating one.
    ratio : float
        Gu et al.'s ratio criterion threshold on ``d1 / d2`` (default 1/3).
    unconditional : int
        Generations from the empty prompt (default 16; 0 disables).
    unrelated : int
        Held-out prompts (validate/test splits, not among the training prompts) generated from
        (default 8; 0 disables).
    confirm : str
        ``"screen"`` (default): two-stage detection (:mod:`diffmem.detect.twostage`): the
        noise magnitude of every prompt screens, images are generated and compared only for
        the prompts it flags, a seeded audit sample of the others, the empty prompt and the
        unrelated prompts; stage 2 widens to every prompt when the audit finds a copy. The
        noise score is computed (and ``nn`` runs last) whenever ``nn`` is asked for.
        ``"all"``: every prompt is confirmed by generation (exhaustive).
    screen_k : float
        Modified z-score cut of the screen (default 3.5, Iglewicz & Hoaglin).
    audit : int or None
        Unflagged prompts audited at random (default: 19, the smallest audit whose finding
        no copy bounds the missed-copy rate by 15% at 95% confidence).
    chunk_size : int
        Prompts computed between two commits to the results store (default 64; for ``nn``,
        generated images: ``chunk_size / nn_generations`` prompts): at most this much work is
        lost when a run is killed.
    threads : int or None
        Torch threads per process (default: torch's own choice, or the cores divided by the
        processes under ``accelerate launch``). On a machine shared with other jobs, 1 is often
        several times faster than oversubscribed cores. Does not change any result.
    reid_model : str or None
        Re-ID model folder (``diffmem reid train``) of the ``reid`` method (default: the
        embedded one, :func:`diffmem.reid.default_reid_dir`).
    reid_threshold : float or None
        A fixed re-ID threshold (cosine scale) instead of calibrating one at ``fpr`` on
        held-out patients.
    patient_from : str or None
        Column of the records (manifest/metadata) that holds the patient id, for data
        without a ``patient_id`` column.
    """

    methods: tuple[str, ...] = ("noise", "attention", "nn")
    generations: int = 1
    steps: int = 1
    num_inference_steps: int = 50
    nn_generations: int | None = 2
    sample_steps: int = 25
    guidance: float | None = None
    seed: int = 0
    batch_size: int = 32
    backend: str = "pixel"
    backend_options: dict[str, Any] = field(default_factory=dict)
    fpr: float = 0.01
    threshold: float | None = None
    ratio: float = 1 / 3
    unconditional: int = 16
    unrelated: int = 8
    confirm: str = "screen"
    screen_k: float = SCREEN_K
    audit: int | None = None
    chunk_size: int = 64
    threads: int | None = None
    reid_model: str | None = None
    reid_threshold: float | None = None
    patient_from: str | None = None

    def validated(self) -> DetectionConfig:
        """A checked copy (methods as a tuple of known names, numbers in range).

        Raises
        ------
        ConfigError
            Naming the option, the value and what would work.
        """
        methods = self.methods
        if isinstance(methods, str):
            methods = tuple(m.strip() for m in methods.split(",") if m.strip())
        methods = tuple(dict.fromkeys(methods))
        if self.confirm not in CONFIRM:
            raise ConfigError(f"confirm={self.confirm!r}; choose from {', '.join(CONFIRM)} "
                              "(screen: two-stage, all: generate for every prompt)")
        if self.confirm == "screen" and "nn" in methods:  # the screen runs first
            tail = ("nn", "reid") if "reid" in methods else ("nn",)
            methods = tuple(m for m in ("noise", *methods) if m not in tail)
            methods = (*dict.fromkeys(methods), *tail)
        if isinstance(self.screen_k, bool) or not isinstance(self.screen_k, (int, float)) \
                or not math.isfinite(self.screen_k):
            raise ConfigError(f"screen_k={self.screen_k!r}; use a finite number (default "
                              f"{SCREEN_K:g})")
        if self.audit is not None:
            _check_int("audit", self.audit, 0)
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(f"methods={','.join(map(str, self.methods)) or '(none)'}: "
                              f"{'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'none'}"
                              f"; choose from {', '.join(METHODS)} (comma-separated)")
        if "reid" in methods and "nn" not in methods:
            raise ConfigError(f"methods={','.join(methods)}: reid judges the images the nn "
                              "method generates; add nn (e.g. --methods noise,nn,reid)")
        if self.reid_threshold is not None and (isinstance(self.reid_threshold, bool) or not
                                                isinstance(self.reid_threshold, (int, float))
                                                or not -1 <= self.reid_threshold <= 1):
            raise ConfigError(f"reid_threshold={self.reid_threshold!r}; use a cosine "
                              "similarity in [-1, 1] (or none to calibrate one at --fpr)")
        for name in ("generations", "steps", "num_inference_steps", "sample_steps",
                     "batch_size", "chunk_size"):
            _check_int(name, getattr(self, name), 1)
        for name in ("unconditional", "unrelated", "seed"):
            _check_int(name, getattr(self, name), 0)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.nn_generations is not None:
            _check_int("nn_generations", self.nn_generations, 1)
        if self.steps > self.num_inference_steps:
            raise ConfigError(f"steps={self.steps} but num_inference_steps="
                              f"{self.num_inference_steps}; the scores average over steps of "
                              "the schedule: lower --steps")
        if isinstance(self.fpr, bool) or not isinstance(self.fpr, (int, float)) \
                or not 0 < float(self.fpr) < 1:
            raise ConfigError(f"fpr={self.fpr!r}; use a false-positive rate strictly between 0 "
                              "and 1 (e.g. 0.01)")
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(
                self.threshold, (int, float)) or not math.isfinite(self.threshold)):
            raise ConfigError(f"threshold={self.threshold!r}; use a finite number on the "
                              "backend's similarity scale")
        if self.guidance is not None and (isinstance(self.guidance, bool) or not isinstance(
                self.guidance, (int, float)) or not math.isfinite(self.guidance)):
            raise ConfigError(f"guidance={self.guidance!r}; use a finite number (or None for "
                              "the pipeline's default)")
        if not isinstance(self.ratio, (int, float)) or not 0 < float(self.ratio) <= 1:
            raise ConfigError(f"ratio={self.ratio!r}; use a number in (0, 1] (Gu et al.: 1/3)")
        from diffmem.detect.similarity import list_backends

        if self.backend not in list_backends():
            raise ConfigError(f"unknown similarity backend {self.backend!r}; known: "
                              f"{', '.join(list_backends())}")
        if self.backend == "embedding" and "encoder" not in self.backend_options:
            raise ConfigError("backend 'embedding' needs an encoder: pass --encoder PATH (a "
                              "folder written by `diffmem embed`)")
        return replace(self, methods=methods, backend_options=dict(self.backend_options))

    @property
    def audit_size(self) -> int:
        """Unflagged prompts a two-stage run audits."""
        return int(audit_size_for(DEFAULT_AUDIT_BOUND) if self.audit is None else self.audit)

    @property
    def images_per_prompt(self) -> int:
        return int(self.nn_generations or self.generations)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (an encoder object is shown by its repr)."""
        d = asdict(self)
        d["methods"] = list(self.methods)
        d["backend_options"] = {k: (v if isinstance(v, (str, int, float, bool, type(None)))
                                    else repr(v)) for k, v in self.backend_options.items()}
        return d


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name}={value!r}; use an integer >= {low}")


# ---------------------------------------------------------------------------- the run

def detect(model: Any, data: Any | None, out: str | os.PathLike, *,
           config: DetectionConfig | None = None,
           reference: str | os.PathLike | Any | None = None,
           prompts: str | os.PathLike | Sequence[str] | None = None,
           calibration: str | os.PathLike | Any | None = None,
           ground_truth: str | os.PathLike | Mapping | None = None,
           command: str | Sequence[str] | None = None,
           device: str | None = None, dtype: str | None = None,
           index: str | os.PathLike | None = None) -> DetectionResult:
    """Scan a model for memorized prompts and write the results to ``out``.

    Parameters
    ----------
    model : path, pipeline or DiffusionModelAdapter
        A model folder or pipeline object (opened with :func:`~diffmem.models.load_model`), or
        an adapter.
    data : path, CXRDataset or None
        The training data (its ``train`` split is the reference the generations are compared
        with; its ``validate``/``test`` splits calibrate the copy threshold). None: scan
        ``prompts`` with the model-based scores alone (``nn`` then needs ``reference``).
    out : path
        Output folder (created; never inside the data). Holds ``results.sqlite``: running
        again with the same folder skips what is already computed.
    config : DetectionConfig, optional
    reference : path or CXRDataset, optional
        The training images of the ``nn`` verdicts when they are not ``data``'s: a dataset
        (its train split) or a folder of image files (then ``calibration`` or a fixed
        threshold is needed).
    prompts : path or sequence of str, optional
        Prompts to scan: a file (one per line, or a ``.csv``/``.jsonl`` table with a ``prompt``
        column; :func:`~diffmem.data.prompts.read_prompts`) or a list. Default: the training
        split's unique prompts.
    calibration : path or CXRDataset, optional
        Held-out real images for the threshold (a dataset, or a folder of PNG/JPEG/DICOM
        files) instead of the data's validate/test splits.
    ground_truth : path or mapping, optional
        Labels to score the run against (AUC, TPR at low FPR): a CSV keyed by ``study_id``,
        ``dicom_id`` or ``prompt`` with a 0/1 ``memorized``, ``label`` or ``planted`` column
        (:mod:`diffmem.detect.labels`). Default: ``DATA/ground_truth.csv`` when present and of
        that shape (one that is not is skipped with a warning).
    command : str or sequence, optional
        The command line, recorded in the store.
    device, dtype : str, optional
        Device and precision to open a model folder or pipeline with (see
        :func:`~diffmem.models.load_model`); under ``accelerate launch`` a bare ``"cuda"`` (or
        the default, with CUDA) means each process's own GPU.
    index : path, optional
        A reference index (``diffmem index build``) of the training split's features under
        the run's backend: opened instead of featurizing the training images (refused when it
        was built from other data or with other backend settings). Same verdicts.

    Returns
    -------
    DetectionResult

    Raises
    ------
    DataError
        Data without a training split; a prompts file with non-UTF-8 bytes or no prompt;
        ``nn`` without held-out images or ``threshold`` ("pass --calibration DIR or
        --threshold"); ``reid`` on data without patient ids (naming ``--patient-from``).
    OutputError
        An output folder that cannot be written or lies inside the data.
    ConfigError, ModelError
        Bad settings or an unusable model.
    """
    # 1. check inputs (everything cheap first)
    config = (config or DetectionConfig()).validated()
    model_source = None if not isinstance(model, (str, os.PathLike)) else Path(model)
    inputs = check_inputs(data, reference, prompts, calibration, ground_truth, config)
    dataset, items = inputs.dataset, inputs.items
    if model_source is not None:
        from diffmem.models import check_model_folder

        check_model_folder(model_source)  # reads JSON and file names only
    if index is not None and "nn" in config.methods:
        from diffmem.detect.index import read_card

        read_card(index)  # the card only; checked against the data and backend below
    out = prepare_out_dir(out, inputs=inputs.roots + (
        [model_source] if model_source is not None else []))
    check_writable(out)

    # 2. model, processes, threads
    state, adapter = _open_model(model, config, device, dtype)
    world, rank = state.num_processes, state.process_index
    train_set = None if dataset is None else dataset.subset(split="train")
    warnings = _input_warnings(inputs, adapter, model_source, train_set)
    model_fp = adapter.fingerprint()
    data_fp = (reference_fingerprint(inputs.reference) if inputs.reference is not None
               else train_set.fingerprint() if train_set is not None else "")
    guidance = default_guidance(adapter) if config.guidance is None else float(config.guidance)

    # 3. copy verdicts: backend, training features, threshold (before the expensive scan, so
    #    a bad calibration set fails fast)
    verdicts = None
    if "nn" in config.methods:
        verdicts = prepare_verdicts(
            inputs.reference, backend=config.backend, backend_options=config.backend_options,
            threshold=config.threshold, heldout=inputs.heldout, fpr=config.fpr,
            cache_dir=out / "cache", state=state, index=index)
    if verdicts is not None and verdicts.search_note() is not None:
        log.warning("%s", verdicts.search_note())
        warnings.append(verdicts.search_note())
    reid = _prepare_reid(config, inputs.reid)

    # 4. scan, shard by shard, committing every chunk
    store = ResultsStore(out / STORE_FILE)
    try:
        run_id = store.start_run(model_fp, data_fingerprint=data_fp, command=command,
                                 params={**config.to_dict(), "guidance": guidance,
                                         "process": rank, "processes": world})
        run = _Run(adapter=adapter, config=config, guidance=guidance, verdicts=verdicts,
                   store=store, keys=_method_keys(config, guidance, verdicts, data_fp, reid),
                   model_fp=model_fp, run_id=run_id, out=out, rank=rank, reid=reid)
        mine = items[rank::world]
        timings: dict[str, dict[str, float]] = {}
        plan = None
        _log_truncation(adapter, mine)
        with _quiet_truncation():
            for method in (m for m in config.methods if m in SCANS):
                if method == "nn" and config.confirm == "screen":
                    timings["nn"], plan = _two_stage(run, items, state)
                else:
                    timings[METHODS[method]] = _scan_method(run, method, mine)
        state.wait_for_everyone()

        # 5. collect everything the processes stored, verdicts
        results = _collect(run, items, plan)
    finally:
        store.close()
    threshold, null = (None, None) if verdicts is None else (verdicts.threshold,
                                                              verdicts.null_similarities)
    result = DetectionResult(prompts=results, config=config, threshold=threshold,
                             null_similarities=null, timings=timings,
                             model_fingerprint=model_fp, data_fingerprint=data_fp, out=out,
                             warnings=warnings, world_size=world,
                             labels=None if inputs.label_source is None
                             else inputs.label_source.source or None,
                             screen=plan if plan is not None or "nn" not in config.methods
                             else ScreenPlan("all", "none", len(_main(items)), audit_copies=0),
                             reid=_reid_info(reid))
    _evaluate(result)

    # 6. files (main process only)
    if state.is_main_process:
        write_outputs(result, out)
    state.wait_for_everyone()
    return result


def _open_model(model: Any, config: DetectionConfig, device: str | None,
                dtype: str | None) -> tuple[Any, Any]:
    """The process state (``accelerate``) and the adapter of ``model``, with torch's threads
    set for this process (``config.threads``, or the CPUs shared among the processes)."""
    import torch
    from accelerate import PartialState

    from diffmem.models import DiffusionModelAdapter, load_model

    state = PartialState(cpu=not torch.cuda.is_available())
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    elif state.num_processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
    if isinstance(model, DiffusionModelAdapter) or (
            hasattr(model, "sample") and hasattr(model, "fingerprint")):
        return state, model  # an adapter (or an object with the adapter's interface)
    from diffmem.models.device import resolve_device

    return state, load_model(model, device=resolve_device(device, process_device=state.device),
                             dtype=dtype)


def _input_warnings(inputs: Any, adapter: Any, model_source: Path | None,
                    train_set: Any) -> list[str]:
    """Warnings about the inputs: the labels file's, and a model trained on other data."""
    return ([] if inputs.label_source is None else list(inputs.label_source.warnings)) + (
        mismatch_warnings(adapter, model_source, train_set, inputs.train_map)
        if train_set is not None else [])


def _log_truncation(adapter: Any, items: list[WorkItem]) -> None:
    """One warning for all prompts longer than the text encoder reads (instead of one per
    batch from the adapter)."""
    texts = [it.prompt for it in items if it.prompt]
    over = 0
    for i in range(0, len(texts), 1024):
        ids = adapter.tokenizer(texts[i:i + 1024], truncation=False, verbose=False)["input_ids"]
        over += sum(len(x) > adapter.max_length for x in ids)
    if over:
        log.warning("%d of %d prompt(s) are longer than the %d tokens the text encoder reads; "
                    "they are scanned truncated, as the model sees them", over, len(texts),
                    adapter.max_length)


class _TruncationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "exceed the" not in str(record.msg)


class _quiet_truncation:
    """Drop the adapter's per-batch truncation warnings (summarized once by the scan)."""

    def __enter__(self):
        self._logger = logging.getLogger("diffmem.models.adapter")
        self._filter = _TruncationFilter()
        self._logger.addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        self._logger.removeFilter(self._filter)


def _prepare_reid(config: DetectionConfig, sets: tuple[Any, Any] | None) -> ReIDSetup | None:
    """The re-ID model, the training patients' index and the re-ID threshold (calibrated at
    ``config.fpr`` on held-out patients, or ``config.reid_threshold``), from the (training,
    held-out) records of :func:`~diffmem.detect.inputs.reid_inputs`; None without re-ID."""
    from diffmem.reid import default_reid_dir

    if sets is None:
        return None
    train_set, heldout = sets
    source = config.reid_model if config.reid_model is not None else default_reid_dir()
    return prepare_reid(source, train_set, heldout=heldout, threshold=config.reid_threshold,
                        fpr=config.fpr, batch_size=max(config.batch_size, 64),
                        fix=reid_fix(config))


def _reid_info(reid: ReIDSetup | None) -> dict[str, Any] | None:
    """What the results say about the re-ID verdicts' setup (None without re-ID)."""
    if reid is None:
        return None
    return {"model": reid.source, "model_fingerprint": reid.index.model_fingerprint,
            "reference_fingerprint": reid.index.data_fingerprint,
            "training_patients": len(set(reid.index.patient_ids)),
            "threshold": reid.threshold,
            "validation": (getattr(reid.model, "config", None) or {}).get("validation")}


def _method_keys(config: DetectionConfig, guidance: float, verdicts: CopyVerdicts | None,
                 data_fp: str, reid: ReIDSetup | None = None,
                 ) -> dict[tuple[str, str], dict[str, Any]]:
    """Store parameters of each (method, kind): what defines a stored result."""
    score = {"generations": config.generations, "steps": config.steps,
             "num_inference_steps": config.num_inference_steps, "seed": config.seed,
             "guidance": guidance, "scheduler": "ddim"}
    keys: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in KINDS:
        keys[("noise", kind)] = dict(score)
        keys[("attention", kind)] = {**score, "layers": "all", "include_padding": True}
        if verdicts is not None:
            keys[("nn", kind)] = {
                "generations": config.unconditional if kind == "unconditional"
                else config.images_per_prompt,
                "sample_steps": config.sample_steps, "seed": config.seed,
                "guidance": guidance, "eta": 0.0, "backend": verdicts.backend.params(), "k": 2,
                "reference": data_fp}
            if verdicts.approximate is not None:  # kept apart from the exact verdicts
                keys[("nn", kind)]["search"] = verdicts.approximate
            if reid is not None:  # the stored values then carry re-ID scores too
                keys[("nn", kind)]["reid"] = {**reid.params(), "own_patient": True}
    return keys



@dataclass
class _Run:
    """What every step of one scan shares (this process's view of the run)."""

    adapter: Any
    config: DetectionConfig
    guidance: float
    verdicts: CopyVerdicts | None
    store: ResultsStore
    keys: dict[tuple[str, str], dict[str, Any]]
    model_fp: str
    run_id: int
    out: Path
    rank: int = 0
    reid: ReIDSetup | None = None


def _scan_method(run: _Run, method: str, items: list[WorkItem]) -> dict[str, float]:
    """Compute ``method`` for this process's items that the store lacks; commit per chunk (the
    PNGs of a chunk's copies are written before its values are committed)."""
    name, config, store = METHODS[method], run.config, run.store
    todo: list[WorkItem] = []
    for kind in KINDS:
        if method != "nn" and kind == "unconditional":
            continue  # the empty prompt's noise magnitude is 0 by definition
        group = [it for it in items if it.kind == kind]
        if group:
            done = store.done_keys(run.model_fp, name, params_hash(run.keys[(method, kind)]))
            todo += [it for it in group if prompt_hash(it.prompt) not in done]
    params_hashes = {kind: store.put_params(run.keys[(method, kind)]) for kind in KINDS
                     if (method, kind) in run.keys}
    if not todo:
        return {"seconds": 0.0, "prompts": 0, "prompts_per_second": None}
    log.info("%s: %d prompt(s) to compute%s", name, len(todo),
             f" (process {run.rank})" if run.rank else "")
    # chunk_size counts generations for the nn method (a prompt there costs many images)
    size = config.chunk_size if method != "nn" else max(
        1, math.ceil(config.chunk_size / config.images_per_prompt))
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    started = time.perf_counter()
    for chunk in progress(chunks, desc=name, unit="chunk"):
        values, copies = _compute(run, method, chunk)
        save_copy_images(copies)
        store.put_many([{"model_fingerprint": run.model_fp, "prompt": it.prompt, "method": name,
                         "params_hash": params_hashes[it.kind], "value": v,
                         "study_id": it.study_ids[0] if it.study_ids else None}
                        for it, v in zip(chunk, values)], run_id=run.run_id)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "prompts": len(todo),
            "prompts_per_second": round(len(todo) / seconds, 3) if seconds > 0 else None}


def _compute(run: _Run, method: str, chunk: list[WorkItem],
             ) -> tuple[list[Any], list[tuple[Path, np.ndarray]]]:
    """The chunk's stored values of ``method``, and the copies' images with their paths."""
    config = run.config
    prompts = [it.prompt for it in chunk]
    common = {"generations": config.generations, "steps": config.steps,
              "num_inference_steps": config.num_inference_steps, "seed": config.seed,
              "batch_size": config.batch_size, "guidance": run.guidance}
    if method == "noise":
        return [float(x) for x in noise_magnitude(run.adapter, prompts, **common)], []
    if method == "attention":
        return [float(x) for x in attention_entropy(run.adapter, prompts, **common)], []
    values: list[Any] = []
    copies: list[tuple[Path, np.ndarray]] = []
    for n_per, group in _by_generations(chunk, config):
        values_by_item, group_copies = _nearest(run, group, n_per)
        values += list(zip(group, values_by_item))
        copies += group_copies
    order = {id(it): i for i, it in enumerate(chunk)}
    return [v for _, v in sorted(values, key=lambda x: order[id(x[0])])], copies


def _by_generations(chunk: list[WorkItem],
                    config: DetectionConfig) -> list[tuple[int, list[WorkItem]]]:
    plain = [it for it in chunk if it.kind != "unconditional"]
    empty = [it for it in chunk if it.kind == "unconditional"]
    groups = []
    if plain:
        groups.append((config.images_per_prompt, plain))
    if empty:
        groups.append((config.unconditional, empty))
    return groups


def _nearest(run: _Run, items: list[WorkItem], n_per: int,
             ) -> tuple[list[dict[str, Any]], list[tuple[Path, np.ndarray]]]:
    """Generate ``n_per`` images per prompt and find each one's two nearest training images.

    Returns each item's stored value and the generations judged copies (their PNG paths and
    images, for the caller to write)."""
    config, verdicts = run.config, run.verdicts
    prompts = [it.prompt for it in items]
    sample = run.adapter.sample(prompts, n_per_prompt=n_per, steps=config.sample_steps,
                                guidance=run.guidance, seed=config.seed,
                                batch_size=config.batch_size)
    with one_blas_thread():
        nn = nearest_neighbors(sample.images, verdicts.reference, backend=verdicts.backend, k=2)
    copy = verdicts.judge(nn.similarities[:, 0])
    if run.reid is not None:
        own = [_own_patients(run, it) for it in items]
        with one_blas_thread():
            reid_scores, reid_rows, own_scores = run.reid.search_own(
                sample.images, [own[p] for p in sample.prompt_index])
        leak = run.reid.judge(reid_scores)
    values, copies = [], []
    for p, it in enumerate(items):
        rows = np.flatnonzero(sample.prompt_index == p)
        values.append({
            "seed": [int(sample.seeds[r]) for r in rows],
            "similarity": [float(nn.similarities[r, 0]) for r in rows],
            "similarity2": [float(nn.similarities[r, 1]) for r in rows],
            "study_id": [str(nn.study_ids[r, 0]) for r in rows],
            "study_id2": [str(nn.study_ids[r, 1]) for r in rows],
            "distance1": [float(nn.distances[r, 0]) for r in rows],
            "distance2": [float(nn.distances[r, 1]) for r in rows]})
        copies += [(copy_image_path(run.out, it.kind, it.prompt,
                                    int(sample.generation_index[r])), sample.images[r])
                   for r in rows if copy[r]]
        if run.reid is not None:
            index = run.reid.index
            values[-1].update({
                "reid_score": [float(reid_scores[r]) for r in rows],
                "reid_patient_id": [index.patient_ids[reid_rows[r]] for r in rows],
                "reid_study_id": [index.study_ids[reid_rows[r]] for r in rows],
                "reid_own_score": [None if np.isnan(own_scores[r]) else float(own_scores[r])
                                   for r in rows]})
            copies += [(reid_image_path(run.out, it.kind, it.prompt,
                                        int(sample.generation_index[r])), sample.images[r])
                       for r in rows if leak[r]]
    return values, copies


def _main(items: list[WorkItem]) -> list[WorkItem]:
    """The scanned prompts proper (training or ``--prompts`` prompts; the screen's domain)."""
    return [it for it in items if it.kind in ("train", "prompt")]


def _stored(run: _Run, method: str, kind: str) -> dict[str, Any]:
    """Stored values of ``method`` for prompts of ``kind`` under this run's parameters."""
    rows = run.store.to_rows(model_fingerprint=run.model_fp, method=METHODS[method],
                             params_hash=params_hash(run.keys[(method, kind)]))
    return {r["prompt"]: r["value"] for r in rows}


def _two_stage(run: _Run, items: list[WorkItem], state: Any,
               ) -> tuple[dict[str, float], ScreenPlan]:
    """Stage 2 of a two-stage run (:mod:`diffmem.detect.twostage`): confirm the flagged
    prompts, the audit sample, the unrelated and the empty prompts; widen to every prompt when
    the audit finds a copy. The noise scores (stage 1) are in the store already."""
    state.wait_for_everyone()  # every process's noise magnitudes are stored
    config, world, rank = run.config, state.num_processes, state.process_index
    main = _main(items)
    noise = {kind: _stored(run, "noise", kind) for kind in {it.kind for it in main}}
    scores = [noise[it.kind].get(it.prompt) for it in main]
    if any(v is None for v in scores):
        raise OutputError(f"{sum(v is None for v in scores)} noise magnitude(s) are missing "
                          f"from {run.store.path} (a process of the scan stopped early?); run "
                          "the same command again to complete them")
    plan = plan_stage2([it.prompt for it in main], [float(v) for v in scores],
                       k=config.screen_k, audit=config.audit_size, seed=config.seed)
    chosen = set(plan.flagged) | set(plan.audit)
    stage2 = [it for it in items if it.kind not in ("train", "prompt") or it.prompt in chosen]
    log.info("two-stage: %d of %d prompt(s) flagged by the noise screen (%s); confirming them, "
             "an audit of %d unflagged prompt(s) and %d unrelated/empty prompt(s)",
             len(plan.flagged), len(main), plan.rule, len(plan.audit), len(stage2) - len(chosen))
    timing = _scan_method(run, "nn", stage2[rank::world])
    state.wait_for_everyone()
    audit = set(plan.audit)
    values = {kind: _stored(run, "nn", kind) for kind in {it.kind for it in main}}
    copies = sum(bool(np.any(run.verdicts.judge(values[it.kind][it.prompt]["similarity"])))
                 for it in main if it.prompt in audit)
    if needs_widening(plan, copies):
        log.warning("two-stage: %s", plan.reason)
        more = _scan_method(run, "nn", main[rank::world])
        seconds = timing["seconds"] + more["seconds"]
        done = timing["prompts"] + more["prompts"]
        timing = {"seconds": round(seconds, 3), "prompts": done,
                  "prompts_per_second": round(done / seconds, 3) if seconds > 0 else None}
    log.info("two-stage: %s", plan.statement())
    return timing, plan


def _collect(run: _Run, items: list[WorkItem], plan: ScreenPlan | None = None,
             ) -> list[PromptResult]:
    """Every item's stored values, with verdicts; refuses when some are missing (prompts a
    two-stage ``plan`` did not confirm have no nearest-neighbour values)."""
    config = run.config
    tables = {(method, kind): _stored(run, method, kind)
              for (method, kind) in run.keys if method in config.methods}  # reid: in nn
    confirmed = None
    if plan is not None and not plan.widened:
        confirmed = set(plan.flagged) | set(plan.audit)
    roles = _screen_roles(plan)
    results, missing = [], 0
    for it in items:
        res = PromptResult(prompt=it.prompt, kind=it.kind, study_ids=list(it.study_ids),
                           label=it.label, screen="" if plan is None or it.kind not in (
                               "train", "prompt") else roles.get(it.prompt, roles[None]))
        for method in (m for m in config.methods if m in SCANS):
            if method != "nn" and it.kind == "unconditional":
                continue
            if method == "nn" and confirmed is not None and it.kind in ("train", "prompt") \
                    and it.prompt not in confirmed:
                continue
            value = tables[(method, it.kind)].get(it.prompt)
            if value is None:
                missing += 1
                continue
            if method == "noise":
                res.noise_magnitude = float(value)
            elif method == "attention":
                res.attention_entropy = float(value)
            else:
                res.generations = _matches(run, value, it)
        results.append(res)
    if missing:
        raise OutputError(f"{missing} result(s) are missing from {run.store.path} (a process "
                          "of the scan stopped early?); run the same command again to complete "
                          "them")
    return results


def _screen_roles(plan: ScreenPlan | None) -> dict[str | None, str]:
    """What stage 2 did with each prompt: ``flagged``, ``audit``, and for the rest (key None)
    ``widened`` or ``screened`` (not confirmed)."""
    if plan is None:
        return {None: ""}
    roles: dict[str | None, str] = {None: "widened" if plan.widened else "screened"}
    roles.update((p, "audit") for p in plan.audit)
    roles.update((p, "flagged") for p in plan.flagged)
    return roles


def _own_patients(run: _Run, item: WorkItem) -> set[str]:
    """The item's own patients for re-ID: the indexed patients of the training studies whose
    prompt it is (none for unrelated and empty prompts)."""
    if item.kind not in OWN_PATIENT_KINDS:
        return set()
    return run.reid.index.patients_of(item.study_ids)


def _matches(run: _Run, value: Mapping[str, list], item: WorkItem) -> list[GenerationMatch]:
    """An item's stored nearest-neighbour value as matches with their copy verdicts."""
    copies = run.verdicts.judge(value["similarity"])
    ratio_copies = is_ratio_copy(value["distance1"], value["distance2"], ratio=run.config.ratio)
    leaks = None if run.reid is None else run.reid.judge(value["reid_score"])
    own = None if run.reid is None else value["reid_own_score"]
    mine = set() if run.reid is None else _own_patients(run, item)
    matches = []
    for j, (seed, s1, s2, id1, id2, d1, d2) in enumerate(zip(
            value["seed"], value["similarity"], value["similarity2"], value["study_id"],
            value["study_id2"], value["distance1"], value["distance2"])):
        image = copy_image_path(run.out, item.kind, item.prompt, j)
        matches.append(GenerationMatch(
            index=j, seed=int(seed), similarity=float(s1), study_id=str(id1),
            similarity2=float(s2), study_id2=str(id2),
            d1_d2=float(d1 / d2 if d2 > 0 else math.nan), copy=bool(copies[j]),
            ratio_copy=bool(ratio_copies[j]),
            image=str(image.relative_to(run.out)) if copies[j] and image.is_file() else None))
        if leaks is not None:
            leak_image = reid_image_path(run.out, item.kind, item.prompt, j)
            matches[-1] = replace(
                matches[-1], reid_score=float(value["reid_score"][j]),
                reid_patient_id=str(value["reid_patient_id"][j]),
                reid_study_id=str(value["reid_study_id"][j]), reid_match=bool(leaks[j]),
                reid_own_score=None if own[j] is None else float(own[j]),
                reid_own_match=None if own[j] is None else bool(run.reid.judge(own[j])),
                reid_own_patient=None if own[j] is None
                else str(value["reid_patient_id"][j]) in mine,
                reid_image=str(leak_image.relative_to(run.out))
                if leaks[j] and leak_image.is_file() else None)
    return matches

def _evaluate(result: DetectionResult) -> None:
    """AUC / TPR at low FPR of each score against the planted labels, and verdict rates."""
    from diffmem.detect.evaluate import evaluate

    labelled = [p for p in result.prompts if p.kind in ("train", "prompt") and p.label is not None]
    y = np.array([p.label for p in labelled], dtype=np.int64)
    if len(labelled) and 0 < y.sum() < len(y):
        for name, get in (("noise_magnitude", lambda p: p.noise_magnitude),
                          ("attention_entropy", lambda p: p.attention_entropy),
                          ("nn_similarity", lambda p: p.nn_similarity),
                          ("reid_score", lambda p: p.reid_score),
                          ("reid_own_score", lambda p: p.reid_own_score)):
            values = [get(p) for p in labelled]
            if all(v is not None for v in values):
                result.evaluations[name] = evaluate(np.array(values, dtype=np.float64), y)
    rates: dict[str, Any] = {}
    if "nn" in result.config.methods:
        for label, key in ((1, "planted"), (0, "not_planted")):
            group = [p for p in labelled if p.label == label]
            if group:
                flagged = sum(bool(p.memorized) for p in group)
                ratio_flagged = sum(any(g.ratio_copy for g in p.generations) for p in group)
                rates[key] = {"prompts": len(group), "memorized": flagged,
                              "rate": flagged / len(group),
                              "ratio_criterion": ratio_flagged,
                              "ratio_criterion_rate": ratio_flagged / len(group)}
                if result.reid is not None:
                    leaking = sum(bool(p.patient_leaking) for p in group)
                    rates[key].update(patient_leaking=leaking,
                                      patient_leaking_rate=leaking / len(group))
        for kind in ("unrelated", "unconditional"):
            gens = [g for p in result.of_kind(kind) for g in p.generations]
            if gens:
                rates[kind] = {"generations": len(gens), "copies": sum(g.copy for g in gens),
                               "ratio_copies": sum(g.ratio_copy for g in gens),
                               "copied_studies": sorted({g.study_id for g in gens if g.copy})}
                if result.reid is not None:
                    rates[kind]["reidentified"] = sum(bool(g.reid_match) for g in gens)
        # skewed memorization (Li et al. 2025): over the prompts whose generations were judged
        measured = [p for p in result.of_kind("train", "prompt") if p.generations]
        if measured:
            result.skew = copy_concentration([sum(g.copy for g in p.generations)
                                              for p in measured])
    result.rates = rates


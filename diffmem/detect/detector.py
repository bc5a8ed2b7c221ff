"""The end-to-end memorization scan behind ``diffmem detect``: prompts -> model-based scores ->
generations -> nearest training images -> calibrated copy verdicts -> results store -> files.

:func:`detect` answers "which prompts make this model reproduce a training image?":

1. **check inputs**: the dataset has a training split; prompts come from ``--prompts FILE`` or
   the training split's unique prompts; held-out images (the validate/test splits, a
   ``calibration`` folder) or a fixed ``threshold`` exist before anything expensive runs;
2. **calibrate** the copy threshold on held-out real images' nearest-training similarity at the
   chosen false-positive rate (:func:`~diffmem.detect.calibrate.calibrate_on_heldout`);
3. **scan** every prompt with each method (``noise``: :func:`~diffmem.detect.scores.
   noise_magnitude`, ``attention``: :func:`~diffmem.detect.scores.attention_entropy`, ``nn``:
   seeded generations and their two nearest training images). Each chunk of results is
   committed to ``results.sqlite`` as soon as it is computed, so a killed run resumes where it
   stopped and a re-run skips finished work. Generations from the empty prompt and from a few
   unrelated (held-out) prompts are scanned too: a model can copy training images without
   binding them to their prompt, and those copies are reported as well;
4. **verdicts**: a generation is a copy when its top-1 similarity is above the threshold
   (Gu et al.'s ratio criterion ``d1/d2 < 1/3`` is reported alongside); a prompt is memorized
   when any of its generations is a copy;
5. **write** ``scores.csv``, ``copies.csv``, ``summary.json``, ``results.json`` and figures.

Under ``accelerate launch`` each process scans ``items[rank::world]`` into the same store; the
main process writes the files after all have finished.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import ConfigError, DataError, OutputError
from diffmem.store import ResultsStore, params_hash, prompt_hash
from diffmem.utils import prepare_out_dir, progress, write_json

log = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "METHODS",
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
METHODS = {"noise": "noise_magnitude", "attention": "attention_entropy", "nn": "nn"}
#: What a scanned prompt is: a training prompt of the dataset, a prompt from ``--prompts``, a
#: held-out prompt the model was not trained on, or the empty prompt.
KINDS = ("train", "prompt", "unrelated", "unconditional")

SCORES_CSV = "scores.csv"
COPIES_CSV = "copies.csv"
SUMMARY_JSON = "summary.json"
RESULTS_JSON = "results.json"
STORE_FILE = "results.sqlite"
COPIES_DIR = "copies"
SCORE_COLUMNS = ("kind", "study_id", "n_studies", "prompt", "label", "noise_magnitude",
                 "attention_entropy", "nn_similarity", "nn_study_id", "nn_generation",
                 "nn_d1_d2", "nn_copies", "nn_ratio_copies", "memorized", "copy_image")


# ---------------------------------------------------------------------------- configuration
@dataclass
class DetectionConfig:
    """Settings of a detection run (all keyword; defaults are the product's).

    Attributes
    ----------
    methods : tuple of str
        Any of ``"noise"``, ``"attention"``, ``"nn"`` (see :data:`METHODS`).
    generations : int
        Seeded initial noises per prompt for the noise and attention scores (default 1).
    steps : int
        Sampling steps the noise and attention scores average over, from the first (default 1).
    num_inference_steps : int
        Length of the DDIM schedule those steps are taken from (default 50).
    nn_generations : int or None
        Images generated per prompt for the nearest-neighbour verdicts (default: 4).
    sample_steps : int
        DDIM steps of those generations (default 50).
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
    chunk_size : int
        Prompts computed between two commits to the results store (default 64; for ``nn``,
        generated images: ``chunk_size / nn_generations`` prompts): at most this much work is
        lost when a run is killed.
    threads : int or None
        Torch threads per process (default: torch's own choice, or the cores divided by the
        processes under ``accelerate launch``). On a machine shared with other jobs, 1 is often
        several times faster than oversubscribed cores. Does not change any result.
    """

    methods: tuple[str, ...] = ("noise", "attention", "nn")
    generations: int = 1
    steps: int = 1
    num_inference_steps: int = 50
    nn_generations: int | None = 4
    sample_steps: int = 50
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
    chunk_size: int = 64
    threads: int | None = None

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
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(f"methods={','.join(map(str, self.methods)) or '(none)'}: "
                              f"{'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'none'}"
                              f"; choose from {', '.join(METHODS)} (comma-separated)")
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


# ---------------------------------------------------------------------------- results
@dataclass
class GenerationMatch:
    """One generated image and its two nearest training images.

    Attributes
    ----------
    index : int
        Which generation of its prompt (0 ...).
    seed : int
        Seed of its initial noise (:func:`~diffmem.models.generation_seed`).
    similarity, similarity2 : float
        Similarity to the nearest and second-nearest training images.
    study_id, study_id2 : str
        Their study ids.
    d1_d2 : float
        Distance ratio ``d1 / d2`` (Gu et al.); ``nan`` when both distances are 0.
    copy : bool
        ``similarity`` is above the calibrated threshold.
    ratio_copy : bool
        ``d1 / d2`` is below the ratio threshold.
    image : str or None
        PNG of the generation, saved for copies.
    """

    index: int
    seed: int
    similarity: float
    study_id: str
    similarity2: float
    study_id2: str
    d1_d2: float
    copy: bool = False
    ratio_copy: bool = False
    image: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["d1_d2"] = None if not math.isfinite(self.d1_d2) else self.d1_d2
        return d


@dataclass
class PromptResult:
    """Everything the scan found about one prompt.

    Attributes
    ----------
    prompt : str
    kind : str
        One of :data:`KINDS`.
    study_ids : list of str
        Training studies whose prompt this is (empty for other kinds).
    label : int or None
        1 when the prompt belongs to a planted duplicate (``ground_truth.csv``), 0 when not,
        None without ground truth.
    noise_magnitude, attention_entropy : float or None
        The scores (higher = more memorized), None when not computed.
    generations : list of GenerationMatch
        Nearest-neighbour matches of its generations (empty without ``nn``).
    """

    prompt: str
    kind: str
    study_ids: list[str] = field(default_factory=list)
    label: int | None = None
    noise_magnitude: float | None = None
    attention_entropy: float | None = None
    generations: list[GenerationMatch] = field(default_factory=list)

    @property
    def best(self) -> GenerationMatch | None:
        """The generation most similar to a training image."""
        if not self.generations:
            return None
        return max(self.generations, key=lambda g: (g.similarity, -g.index))

    @property
    def memorized(self) -> bool | None:
        """True when any generation is a copy; None without nearest-neighbour results."""
        return any(g.copy for g in self.generations) if self.generations else None

    @property
    def nn_similarity(self) -> float | None:
        best = self.best
        return None if best is None else best.similarity

    def to_row(self) -> dict[str, Any]:
        """The prompt's row of ``scores.csv``."""
        best = self.best
        copies = [g for g in self.generations if g.copy]
        image = next((g.image for g in sorted(copies, key=lambda g: -g.similarity) if g.image),
                     None)
        return {
            "kind": self.kind,
            "study_id": self.study_ids[0] if self.study_ids else "",
            "n_studies": len(self.study_ids),
            "prompt": self.prompt,
            "label": "" if self.label is None else int(self.label),
            "noise_magnitude": _fmt(self.noise_magnitude),
            "attention_entropy": _fmt(self.attention_entropy),
            "nn_similarity": _fmt(None if best is None else best.similarity),
            "nn_study_id": "" if best is None else best.study_id,
            "nn_generation": "" if best is None else best.index,
            "nn_d1_d2": _fmt(None if best is None or not math.isfinite(best.d1_d2)
                             else best.d1_d2),
            "nn_copies": "" if best is None else len(copies),
            "nn_ratio_copies": "" if best is None else sum(g.ratio_copy
                                                           for g in self.generations),
            "memorized": "" if self.memorized is None else int(self.memorized),
            "copy_image": image or "",
        }

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "kind": self.kind, "study_ids": list(self.study_ids),
                "label": self.label, "noise_magnitude": self.noise_magnitude,
                "attention_entropy": self.attention_entropy, "memorized": self.memorized,
                "generations": [g.to_dict() for g in self.generations]}


def _fmt(x: float | None) -> str | float:
    return "" if x is None else float(f"{x:.6g}")


@dataclass
class DetectionResult:
    """The outcome of :func:`detect`.

    Attributes
    ----------
    prompts : list of PromptResult
        Every scanned prompt, training/file prompts first, then unrelated, then unconditional.
    config : DetectionConfig
    threshold : Threshold or None
        The copy threshold (None without ``nn``).
    null_similarities : numpy.ndarray or None
        Held-out images' nearest-training similarities the threshold was calibrated on.
    evaluations : dict of str to Evaluation
        Per score (``noise_magnitude``, ``attention_entropy``, ``nn_similarity``), against the
        planted labels, when the data has ground truth.
    rates : dict
        Nearest-neighbour verdict rates: memorized fraction among labelled planted and
        non-planted prompts, and copies among unconditional and unrelated generations.
    timings : dict
        Per method: seconds spent, prompts computed by this run, prompts/second.
    model_fingerprint, data_fingerprint : str
    out : pathlib.Path
    files : dict of str to str
        What was written.
    warnings : list of str
        Model/data mismatch and similar caveats.
    world_size : int
        Processes that shared the scan.
    """

    prompts: list[PromptResult]
    config: DetectionConfig
    threshold: Any = None
    null_similarities: np.ndarray | None = None
    evaluations: dict[str, Any] = field(default_factory=dict)
    rates: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    model_fingerprint: str = ""
    data_fingerprint: str = ""
    out: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    world_size: int = 1

    def of_kind(self, *kinds: str) -> list[PromptResult]:
        return [p for p in self.prompts if p.kind in kinds]

    @property
    def memorized(self) -> list[PromptResult]:
        """Prompts with at least one copy generation (any kind)."""
        return [p for p in self.prompts if p.memorized]

    def to_dict(self, *, prompts: bool = False) -> dict[str, Any]:
        """JSON-ready summary; ``prompts=True`` adds every prompt's result."""
        counts = {kind: len(self.of_kind(kind)) for kind in KINDS if self.of_kind(kind)}
        out: dict[str, Any] = {
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "config": self.config.to_dict(),
            "counts": counts,
            "memorized": {kind: sum(bool(p.memorized) for p in self.of_kind(kind))
                          for kind in counts},
            "threshold": None if self.threshold is None else self.threshold.to_dict(),
            "evaluations": {k: v.to_dict(curve=False) for k, v in self.evaluations.items()},
            "rates": dict(self.rates),
            "timings": dict(self.timings),
            "world_size": self.world_size,
            "warnings": list(self.warnings),
            "files": dict(self.files),
            "copies_without_prompt": [
                {"kind": p.kind, "prompt": p.prompt,
                 "generations": [g.to_dict() for g in p.generations if g.copy]}
                for p in self.of_kind("unconditional", "unrelated") if p.memorized],
        }
        if prompts:
            out["prompts"] = [p.to_dict() for p in self.prompts]
        return out


# ---------------------------------------------------------------------------- prompts
def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per line, in order, without empty lines or repeats.

    Surrounding whitespace and a UTF-8 byte-order mark are removed; empty lines are skipped and
    repeated prompts kept once (both counted in a log message).

    Raises
    ------
    DataError
        When the file cannot be read, a line is not valid UTF-8 (the message names the line and
        the byte), or no prompt is left.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "prompts.txt"
    >>> _ = f.write_text("No acute process.\\n\\nSmall effusion.\\nNo acute process.\\n")
    >>> read_prompts(f)
    ['No acute process.', 'Small effusion.']
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise DataError("is a folder; --prompts takes a text file with one prompt per line",
                        path=path) from None
    except OSError as e:
        raise DataError(f"cannot read the prompts file ({e.strerror})", path=path) from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    prompts, empty, repeated, seen = [], 0, 0, set()
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"line {n} is not valid UTF-8 (byte 0x{line[e.start]:02x} at column "
                            f"{e.start + 1}); save the file as UTF-8 (e.g. iconv -f latin1 -t "
                            "utf-8)", path=path) from None
        text = text.strip()
        if not text:
            empty += 1
            continue
        if text in seen:
            repeated += 1
            continue
        seen.add(text)
        prompts.append(text)
    if raw.endswith(b"\n"):
        empty -= 1  # the newline that ends the last line does not start an empty one
    if empty or repeated:
        log.info("%s: %d prompt(s); skipped %d empty line(s) and %d repeated prompt(s)",
                 path, len(prompts), empty, repeated)
    if not prompts:
        raise DataError("holds no prompt (only empty lines); write one prompt per line",
                        path=path)
    return prompts


def training_prompts(dataset: Any) -> dict[str, list[str]]:
    """Unique non-empty prompts of the training split, in first-seen order, each with the
    study ids of its training records."""
    out: dict[str, list[str]] = {}
    for s in dataset:
        if s.split == "train" and s.prompt.strip():
            ids = out.setdefault(s.prompt, [])
            if s.study_id not in ids:
                ids.append(s.study_id)
    return out


def prompt_labels(dataset: Any, ground_truth: str | os.PathLike | Mapping | None = None,
                  ) -> dict[str, int] | None:
    """Planted label of each training prompt: 1 when any of its training images is a planted
    duplicate.

    Parameters
    ----------
    dataset : CXRDataset
    ground_truth : path or mapping, optional
        A ``ground_truth.csv`` (or its folder) as written by ``diffmem synth``, or its rows
        keyed by image id (:func:`diffmem.data.synth.read_ground_truth`). Default: the
        dataset folder's ``ground_truth.csv`` when there is one.

    Returns
    -------
    dict or None
        ``prompt -> 0/1``; None when there is no ground truth.
    """
    from diffmem.data.synth import read_ground_truth

    if ground_truth is None:
        if not (Path(dataset.root) / "ground_truth.csv").is_file():
            return None
        ground_truth = dataset.root
    truth = ground_truth if isinstance(ground_truth, Mapping) else read_ground_truth(ground_truth)
    labels: dict[str, int] = {}
    missing = 0
    for s in dataset:
        if s.split != "train":
            continue
        row = truth.get(s.image_id)
        if row is None:
            missing += 1
            continue
        labels[s.prompt] = max(labels.get(s.prompt, 0), int(row["planted"]))
    if missing:
        log.warning("ground truth has no row for %d training image(s); their prompts count as "
                    "not planted", missing)
    return labels


# ---------------------------------------------------------------------------- the run
@dataclass
class _Item:
    prompt: str
    kind: str
    study_ids: list[str]
    label: int | None


def detect(model: Any, data: Any, out: str | os.PathLike, *,
           config: DetectionConfig | None = None,
           prompts: str | os.PathLike | Sequence[str] | None = None,
           calibration: str | os.PathLike | Any | None = None,
           ground_truth: str | os.PathLike | Mapping | None = None,
           command: str | Sequence[str] | None = None,
           device: str | None = None, dtype: str | None = None) -> DetectionResult:
    """Scan a model for memorized prompts and write the results to ``out``.

    Parameters
    ----------
    model : path, pipeline or DiffusionModelAdapter
        A model folder or pipeline object (opened with :func:`~diffmem.models.load_model`), or
        an adapter.
    data : path or CXRDataset
        The training data (its ``train`` split is the reference the generations are compared
        with; its ``validate``/``test`` splits calibrate the copy threshold).
    out : path
        Output folder (created; never inside the data). Holds ``results.sqlite``: running
        again with the same folder skips what is already computed.
    config : DetectionConfig, optional
    prompts : path or sequence of str, optional
        Prompts to scan (a file: one per line). Default: the training split's unique prompts.
    calibration : path or CXRDataset, optional
        Held-out real images for the threshold (a dataset, or a folder of PNG/JPEG/DICOM
        files) instead of the data's validate/test splits.
    ground_truth : path or mapping, optional
        Planted labels (default: ``DATA/ground_truth.csv`` when present).
    command : str or sequence, optional
        The command line, recorded in the store.
    device, dtype : str, optional
        Device and precision to open a model folder or pipeline with (see
        :func:`~diffmem.models.load_model`); under ``accelerate launch`` a bare ``"cuda"`` (or
        the default, with CUDA) means each process's own GPU.

    Returns
    -------
    DetectionResult

    Raises
    ------
    DataError
        Data without a training split; a prompts file with non-UTF-8 bytes or no prompt;
        ``nn`` without held-out images and without ``threshold`` ("pass --calibration DIR or
        --threshold").
    OutputError
        An output folder that cannot be written or lies inside the data.
    ConfigError, ModelError
        Bad settings or an unusable model.
    """
    # 1. check inputs (everything cheap first)
    config = (config or DetectionConfig()).validated()
    from diffmem.data import CXRDataset, load

    dataset = data if isinstance(data, CXRDataset) else load(data)
    model_source = None if not isinstance(model, (str, os.PathLike)) else Path(model)
    train_set = dataset.subset(split="train")
    if len(train_set) == 0:
        raise DataError(f"the data has no training split (splits: "
                        f"{dict(dataset.split_counts()) or 'none'}); detection compares "
                        "generations with the images the model was trained on: give the "
                        "dataset with its train split", path=dataset.root)
    train_map = training_prompts(dataset)
    labels = prompt_labels(dataset, ground_truth)
    items = _work_items(dataset, train_map, labels, prompts, config)
    heldout = _heldout(dataset, calibration, config) if "nn" in config.methods else None
    if model_source is not None:
        from diffmem.models import check_model_folder

        check_model_folder(model_source)  # reads JSON and file names only
    inputs = [dataset.root] + ([model_source] if model_source is not None else [])
    if isinstance(calibration, (str, os.PathLike)):
        inputs.append(Path(calibration))
    out = prepare_out_dir(out, inputs=inputs)
    _check_writable(out)

    # 2. model, processes, threads
    import torch
    from accelerate import PartialState

    from diffmem.models import DiffusionModelAdapter, load_model

    state = PartialState(cpu=not torch.cuda.is_available())
    world, rank = state.num_processes, state.process_index
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    elif world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if isinstance(model, DiffusionModelAdapter) or (
            hasattr(model, "sample") and hasattr(model, "fingerprint")):
        adapter = model  # an adapter (or an object with the adapter's interface)
    else:
        from diffmem.models.device import resolve_device

        adapter = load_model(model, device=resolve_device(device, process_device=state.device),
                             dtype=dtype)
    warnings = _mismatch_warnings(adapter, model_source, train_set, train_map)
    model_fp = adapter.fingerprint()
    data_fp = train_set.fingerprint()
    from diffmem.detect.scores import default_guidance

    guidance = default_guidance(adapter) if config.guidance is None else float(config.guidance)

    # 3. copy threshold (before the expensive scan, so a bad calibration set fails fast)
    backend = reference = threshold = null = None
    if "nn" in config.methods:
        backend, reference = _reference(train_set, config, out, state)
        threshold, null = _threshold(heldout, reference, backend, config, train_set)

    # 4. scan, shard by shard, committing every chunk
    store = ResultsStore(out / STORE_FILE)
    try:
        run_id = store.start_run(model_fp, data_fingerprint=data_fp, command=command,
                                 params={**config.to_dict(), "guidance": guidance,
                                         "process": rank, "processes": world})
        mine = items[rank::world]
        keys = _method_keys(config, guidance, backend, data_fp)
        timings: dict[str, dict[str, float]] = {}
        _log_truncation(adapter, mine)
        with _quiet_truncation():
            for method in config.methods:
                timings[METHODS[method]] = _scan_method(
                    method, adapter, store, mine, keys, config, guidance, backend, reference,
                    threshold, model_fp, run_id, out, rank)
        state.wait_for_everyone()

        # 5. collect everything the processes stored, verdicts
        results = _collect(store, items, config, keys, model_fp, threshold, out)
    finally:
        store.close()
    result = DetectionResult(prompts=results, config=config, threshold=threshold,
                             null_similarities=null, timings=timings,
                             model_fingerprint=model_fp, data_fingerprint=data_fp, out=out,
                             warnings=warnings, world_size=world)
    _evaluate(result)

    # 6. files (main process only)
    if state.is_main_process:
        _write_outputs(result, out)
    state.wait_for_everyone()
    return result


def _log_truncation(adapter: Any, items: list[_Item]) -> None:
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


def _check_writable(out: Path) -> None:
    probe = out / f".diffmem-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output folder {str(out)!r} is not writable ({e.strerror}); choose "
                          "another --out") from None


def _work_items(dataset: Any, train_map: dict[str, list[str]], labels: dict[str, int] | None,
                prompts: str | os.PathLike | Sequence[str] | None,
                config: DetectionConfig) -> list[_Item]:
    if prompts is None:
        if not train_map:
            raise DataError("the training split has no non-empty prompt to scan; pass "
                            "--prompts FILE", path=dataset.root)
        items = [_Item(p, "train", ids, None if labels is None else labels.get(p, 0))
                 for p, ids in train_map.items()]
    else:
        if isinstance(prompts, (str, os.PathLike)):
            listed = read_prompts(prompts)
        else:
            listed = [str(p).strip() for p in prompts]
            listed = [p for p in dict.fromkeys(listed) if p]
            if not listed:
                raise DataError("no prompt to scan (the list is empty or holds only empty "
                                "strings)")
        items = [_Item(p, "prompt", list(train_map.get(p, [])),
                       None if labels is None else labels.get(p, 0)) for p in listed]
        outside = sum(1 for p in listed if p not in train_map)
        if outside:
            log.info("%d of %d prompt(s) are not training prompts of the data", outside,
                     len(listed))
    scanned = {it.prompt for it in items}
    if config.unrelated:
        held = sorted({s.prompt for s in dataset if s.split != "train" and s.prompt.strip()
                       and s.prompt not in train_map and s.prompt not in scanned},
                      key=prompt_hash)
        items += [_Item(p, "unrelated", [], None) for p in held[:config.unrelated]]
        if len(held) < config.unrelated:
            log.info("only %d unrelated (held-out, not trained on) prompt(s) available",
                     len(held))
    if config.unconditional and "nn" in config.methods:
        items.append(_Item("", "unconditional", [], None))
    return items


def _heldout(dataset: Any, calibration: Any, config: DetectionConfig) -> Any:
    """Held-out real images for the threshold: a dataset, an image array, or None."""
    if config.threshold is not None:
        return None
    from diffmem.data import CXRDataset
    from diffmem.detect.calibrate import NO_HELDOUT

    if calibration is None:
        held = dataset.subset(split=["validate", "test"])
        if len(held) == 0:
            raise DataError(f"the data has no validate/test images; {NO_HELDOUT}",
                            path=dataset.root)
        return held
    if isinstance(calibration, CXRDataset):
        return calibration
    return _load_calibration(Path(calibration))


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def _load_calibration(path: Path) -> Any:
    from diffmem.data import load
    from diffmem.detect.calibrate import NO_HELDOUT

    if not path.exists():
        raise DataError(f"calibration folder does not exist; {NO_HELDOUT}", path=path)
    try:
        return load(path)
    except DataError:
        pass
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [])
                   if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise DataError("holds neither a dataset nor image files (PNG/JPEG/DICOM) to calibrate "
                        f"on; {NO_HELDOUT}", path=path)
    return files


def _mismatch_warnings(adapter: Any, model_source: Path | None, train_set: Any,
                       train_map: dict[str, list[str]]) -> list[str]:
    """Model/data mismatch checks; each problem is logged as a warning and returned."""
    warnings = []
    folder = model_source or (Path(adapter.source) if adapter.source else None)
    card_path = None if folder is None else folder / "model_card.json"
    if card_path is not None and card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            trained_on = (card.get("data") or {}).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            trained_on = None
        here = train_set.fingerprint()
        if trained_on and trained_on != here:
            warnings.append(
                f"model/data mismatch: {card_path} says the model was trained on data with "
                f"fingerprint {trained_on} ({(card.get('data') or {}).get('root')}), but the "
                f"training split given has fingerprint {here}; verdicts then say whether the "
                "model copies *these* images, not its own training set: pass the data the model "
                "was trained on")
    unk = getattr(adapter.tokenizer, "unk_token_id", None)
    if unk is not None and train_map:
        sample = list(train_map)[:200]
        ids = adapter.tokenizer(sample, truncation=True, max_length=adapter.max_length)[
            "input_ids"]
        total = sum(len(x) for x in ids)
        unknown = sum(sum(1 for i in x if i == unk) for x in ids)
        if total and unknown / total > 0.2:
            warnings.append(
                f"model/data mismatch: {unknown / total:.0%} of the tokens of the data's "
                "prompts are unknown to the model's tokenizer; the model was likely trained on "
                "other text")
    for w in warnings:
        log.warning(w)
    return warnings


def _reference(train_set: Any, config: DetectionConfig, out: Path, state: Any):
    """The similarity backend and the training images' features (cached in ``out/cache``;
    the main process computes them first, the others then read the cache)."""
    from diffmem.detect.neighbors import ReferenceFeatures
    from diffmem.detect.similarity import get_backend

    options = dict(config.backend_options)
    if config.backend == "embedding" and isinstance(options.get("encoder"), (str, os.PathLike)):
        from diffmem.embed import load_encoder

        options["encoder"] = load_encoder(options["encoder"])
    backend = get_backend(config.backend, **options)
    cache = out / "cache"
    with _blas_threads():
        if state.is_main_process:
            reference = ReferenceFeatures.from_dataset(train_set, backend, split="train",
                                                       cache_dir=cache)
        state.wait_for_everyone()
        if not state.is_main_process:
            reference = ReferenceFeatures.from_dataset(train_set, backend, split="train",
                                                       cache_dir=cache)
    if len(reference) < 2:
        raise DataError("the training split has fewer than 2 images; the nearest-neighbour "
                        "verdicts compare each generation with its two nearest training images",
                        path=train_set.root)
    return backend, reference


def _threshold(heldout: Any, reference: Any, backend: Any, config: DetectionConfig,
               train_set: Any):
    from diffmem.data import CXRDataset
    from diffmem.detect.calibrate import calibrate_threshold, fixed_threshold
    from diffmem.detect.neighbors import nearest_neighbors

    if config.threshold is not None:
        return fixed_threshold(config.threshold), None
    if isinstance(heldout, CXRDataset):
        train_ids = {s.study_id for s in train_set}
        shared = sorted({s.study_id for s in heldout} & train_ids)
        if shared:
            raise DataError(f"{len(shared)} calibration record(s) share study ids with the "
                            f"training records (e.g. {shared[:3]}); they are not held out: use "
                            "images from outside the training set", path=heldout.root)
        query = heldout
    else:
        from diffmem.data.images import read_image
        from diffmem.detect.neighbors import _load_size

        size = _load_size(backend)
        query = np.stack([read_image(p, size=size) for p in heldout])
    with _blas_threads():
        nn = nearest_neighbors(query, reference, backend=backend, k=1)
    null = nn.similarities[:, 0]
    threshold = calibrate_threshold(null, fpr=config.fpr)
    log.info("copy threshold %.4f (%s similarity) calibrated on %d held-out image(s) at FPR %g",
             threshold.value, backend.name, threshold.n, config.fpr)
    return threshold, null


class _blas_threads:
    """Limit BLAS to one thread per process during the similarity search (OpenBLAS with two
    threads on two busy cores spins and runs many times slower)."""

    def __enter__(self):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - scikit-learn depends on it
            self._ctx = None
            return self
        self._ctx = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def _method_keys(config: DetectionConfig, guidance: float, backend: Any,
                 data_fp: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Store parameters of each (method, kind): what defines a stored result."""
    score = {"generations": config.generations, "steps": config.steps,
             "num_inference_steps": config.num_inference_steps, "seed": config.seed,
             "guidance": guidance, "scheduler": "ddim"}
    keys: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in KINDS:
        keys[("noise", kind)] = dict(score)
        keys[("attention", kind)] = {**score, "layers": "all", "include_padding": True}
        if backend is not None:
            keys[("nn", kind)] = {
                "generations": config.unconditional if kind == "unconditional"
                else config.images_per_prompt,
                "sample_steps": config.sample_steps, "seed": config.seed,
                "guidance": guidance, "eta": 0.0, "backend": backend.params(), "k": 2,
                "reference": data_fp}
    return keys


def _scan_method(method: str, adapter: Any, store: ResultsStore, items: list[_Item],
                 keys: dict, config: DetectionConfig, guidance: float, backend: Any,
                 reference: Any, threshold: Any, model_fp: str, run_id: int, out: Path,
                 rank: int) -> dict[str, float]:
    """Compute ``method`` for this process's items that the store lacks; commit per chunk."""
    name = METHODS[method]
    todo: list[_Item] = []
    for kind in KINDS:
        if method != "nn" and kind == "unconditional":
            continue  # the empty prompt's noise magnitude is 0 by definition
        group = [it for it in items if it.kind == kind]
        if group:
            done = store.done_keys(model_fp, name, params_hash(keys[(method, kind)]))
            todo += [it for it in group if prompt_hash(it.prompt) not in done]
    params_hashes = {kind: store.put_params(keys[(method, kind)]) for kind in KINDS
                     if (method, kind) in keys}
    if not todo:
        return {"seconds": 0.0, "prompts": 0, "prompts_per_second": None}
    log.info("%s: %d prompt(s) to compute%s", name, len(todo),
             f" (process {rank})" if rank else "")
    # chunk_size counts generations for the nn method (a prompt there costs many images)
    size = config.chunk_size if method != "nn" else max(
        1, math.ceil(config.chunk_size / config.images_per_prompt))
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    started = time.perf_counter()
    for chunk in progress(chunks, desc=name, unit="chunk"):
        values = _compute(method, adapter, chunk, config, guidance, backend, reference,
                          threshold, out)
        store.put_many([{"model_fingerprint": model_fp, "prompt": it.prompt, "method": name,
                         "params_hash": params_hashes[it.kind], "value": v,
                         "study_id": it.study_ids[0] if it.study_ids else None}
                        for it, v in zip(chunk, values)], run_id=run_id)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "prompts": len(todo),
            "prompts_per_second": round(len(todo) / seconds, 3) if seconds > 0 else None}


def _compute(method: str, adapter: Any, chunk: list[_Item], config: DetectionConfig,
             guidance: float, backend: Any, reference: Any, threshold: Any,
             out: Path) -> list[Any]:
    from diffmem.detect.scores import attention_entropy, noise_magnitude

    prompts = [it.prompt for it in chunk]
    common = {"generations": config.generations, "steps": config.steps,
              "num_inference_steps": config.num_inference_steps, "seed": config.seed,
              "batch_size": config.batch_size, "guidance": guidance}
    if method == "noise":
        return [float(x) for x in noise_magnitude(adapter, prompts, **common)]
    if method == "attention":
        return [float(x) for x in attention_entropy(adapter, prompts, **common)]
    values: list[Any] = []
    for n_per, group in _by_generations(chunk, config):
        values_by_item = _nearest(adapter, group, n_per, config, guidance, backend, reference,
                                  threshold, out)
        values += list(zip(group, values_by_item))
    order = {id(it): i for i, it in enumerate(chunk)}
    return [v for _, v in sorted(values, key=lambda x: order[id(x[0])])]


def _by_generations(chunk: list[_Item], config: DetectionConfig) -> list[tuple[int, list[_Item]]]:
    plain = [it for it in chunk if it.kind != "unconditional"]
    empty = [it for it in chunk if it.kind == "unconditional"]
    groups = []
    if plain:
        groups.append((config.images_per_prompt, plain))
    if empty:
        groups.append((config.unconditional, empty))
    return groups


def _nearest(adapter: Any, items: list[_Item], n_per: int, config: DetectionConfig,
             guidance: float, backend: Any, reference: Any, threshold: Any,
             out: Path) -> list[dict[str, Any]]:
    """Generate ``n_per`` images per prompt and find each one's two nearest training images."""
    from diffmem.detect.neighbors import nearest_neighbors

    prompts = [it.prompt for it in items]
    sample = adapter.sample(prompts, n_per_prompt=n_per, steps=config.sample_steps,
                            guidance=guidance, seed=config.seed, batch_size=config.batch_size)
    with _blas_threads():
        nn = nearest_neighbors(sample.images, reference, backend=backend, k=2)
    values = []
    for p, it in enumerate(items):
        rows = np.flatnonzero(sample.prompt_index == p)
        value = {"seed": [], "similarity": [], "similarity2": [], "study_id": [],
                 "study_id2": [], "distance1": [], "distance2": []}
        for r in rows:
            value["seed"].append(int(sample.seeds[r]))
            value["similarity"].append(float(nn.similarities[r, 0]))
            value["similarity2"].append(float(nn.similarities[r, 1]))
            value["study_id"].append(str(nn.study_ids[r, 0]))
            value["study_id2"].append(str(nn.study_ids[r, 1]))
            value["distance1"].append(float(nn.distances[r, 0]))
            value["distance2"].append(float(nn.distances[r, 1]))
            if threshold is not None and nn.similarities[r, 0] > threshold.value:
                _save_png(sample.images[r], out / COPIES_DIR /
                          _copy_name(it, int(sample.generation_index[r])))
        values.append(value)
    return values


def _copy_name(item: _Item, generation: int) -> str:
    return f"{item.kind}-{prompt_hash(item.prompt)[:12]}-g{generation}.png"


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(tmp,
                                                                                 format="PNG")
    os.replace(tmp, path)


def _collect(store: ResultsStore, items: list[_Item], config: DetectionConfig, keys: dict,
             model_fp: str, threshold: Any, out: Path) -> list[PromptResult]:
    """Every item's stored values, with verdicts; refuses when some are missing."""
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    for (method, kind), params in keys.items():
        if method in config.methods:
            rows = store.to_rows(model_fingerprint=model_fp, method=METHODS[method],
                                 params_hash=params_hash(params))
            tables[(method, kind)] = {r["prompt"]: r["value"] for r in rows}
    results, missing = [], 0
    for it in items:
        res = PromptResult(prompt=it.prompt, kind=it.kind, study_ids=list(it.study_ids),
                           label=it.label)
        for method in config.methods:
            if method != "nn" and it.kind == "unconditional":
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
                res.generations = _matches(value, it, threshold, config, out)
        results.append(res)
    if missing:
        raise OutputError(f"{missing} result(s) are missing from {store.path} (a process of "
                          "the scan stopped early?); run the same command again to complete "
                          "them")
    return results


def _matches(value: Mapping[str, list], item: _Item, threshold: Any, config: DetectionConfig,
             out: Path) -> list[GenerationMatch]:
    matches = []
    for j, (seed, s1, s2, id1, id2, d1, d2) in enumerate(zip(
            value["seed"], value["similarity"], value["similarity2"], value["study_id"],
            value["study_id2"], value["distance1"], value["distance2"])):
        ratio = d1 / d2 if d2 > 0 else math.nan
        copy = threshold is not None and s1 > threshold.value
        image = out / COPIES_DIR / _copy_name(item, j)
        matches.append(GenerationMatch(
            index=j, seed=int(seed), similarity=float(s1), study_id=str(id1),
            similarity2=float(s2), study_id2=str(id2), d1_d2=float(ratio), copy=bool(copy),
            ratio_copy=bool(d2 > 0 and d1 < config.ratio * d2),
            image=str(image.relative_to(out)) if copy and image.is_file() else None))
    return matches


def _evaluate(result: DetectionResult) -> None:
    """AUC / TPR at low FPR of each score against the planted labels, and verdict rates."""
    from diffmem.detect.evaluate import evaluate

    labelled = [p for p in result.prompts if p.kind in ("train", "prompt") and p.label is not None]
    y = np.array([p.label for p in labelled], dtype=np.int64)
    if len(labelled) and 0 < y.sum() < len(y):
        for name, get in (("noise_magnitude", lambda p: p.noise_magnitude),
                          ("attention_entropy", lambda p: p.attention_entropy),
                          ("nn_similarity", lambda p: p.nn_similarity)):
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
        for kind in ("unrelated", "unconditional"):
            gens = [g for p in result.of_kind(kind) for g in p.generations]
            if gens:
                rates[kind] = {"generations": len(gens), "copies": sum(g.copy for g in gens),
                               "ratio_copies": sum(g.ratio_copy for g in gens),
                               "copied_studies": sorted({g.study_id for g in gens if g.copy})}
    result.rates = rates


def _write_outputs(result: DetectionResult, out: Path) -> None:
    from diffmem.detect import plots

    files = {}
    rows = [p.to_row() for p in result.prompts]
    files["scores"] = _write_csv(out / SCORES_CSV, SCORE_COLUMNS, rows)
    copy_rows = [{"kind": p.kind, "prompt": p.prompt,
                  "prompt_study_id": p.study_ids[0] if p.study_ids else "",
                  "label": "" if p.label is None else p.label, **{
                      k: v for k, v in g.to_dict().items() if k != "copy"}}
                 for p in result.prompts for g in p.generations if g.copy]
    files["copies"] = _write_csv(
        out / COPIES_CSV, ("kind", "prompt", "prompt_study_id", "label", "index", "seed",
                           "similarity", "study_id", "similarity2", "study_id2", "d1_d2",
                           "ratio_copy", "image"), copy_rows)
    with ResultsStore(out / STORE_FILE) as store:
        files["results_json"] = str(store.export_json(out / RESULTS_JSON,
                                                      model_fingerprint=result.model_fingerprint))
    files["store"] = str(out / STORE_FILE)

    # figures
    main = [p for p in result.prompts if p.kind in ("train", "prompt")]
    labels = None
    if main and all(p.label is not None for p in main):
        labels = np.array([p.label for p in main])
    scores = {}
    for name in ("noise_magnitude", "attention_entropy", "nn_similarity"):
        values = [getattr(p, name) for p in main]
        if values and all(v is not None for v in values):
            scores[name] = np.array(values, dtype=np.float64)
    thresholds = {"nn_similarity": result.threshold.value} if result.threshold else None
    if scores:
        files["histograms"] = str(plots.plot_score_histograms(
            scores, out / "scores_hist.png", labels=labels, thresholds=thresholds))
    if result.evaluations:
        files["roc"] = str(plots.plot_roc(result.evaluations, out / "roc.png"))
    if "nn_similarity" in scores and result.threshold is not None:
        files["nn_similarity"] = str(plots.plot_nn_similarity(
            scores["nn_similarity"], out / "nn_similarity.png", labels=labels,
            null=result.null_similarities, threshold=result.threshold.value))
    result.files = files
    files["summary"] = str(out / SUMMARY_JSON)
    try:
        write_json(out / SUMMARY_JSON, result.to_dict())
    except OSError as e:
        raise OutputError(f"cannot write {out / SUMMARY_JSON}: {e.strerror}") from None


def _write_csv(path: Path, columns: Iterable[str], rows: list[dict[str, Any]]) -> str:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror}") from None
    return str(path)

"""Memorization and utility of one trained model, the way the training studies measure it.

Memorization comes from the detector (:func:`diffmem.detect.detect`, with a restricted, faster
configuration: :class:`MeasureConfig`), on the planted prompts plus a seeded sample of other
training prompts, and split into the two kinds of copying:

* ``memorization_rate_own``: planted prompts with a generation that copies the prompt's *own*
  training image (its nearest training image, above the calibrated copy threshold, is one of
  the prompt's studies or of its planted duplicate cluster);
* ``memorization_rate_any``: planted prompts with a generation that copies *any* training image;
* ``copy_rate_unconditional`` / ``copy_rate_unrelated``: copies among generations from the empty
  prompt and from held-out prompts (copying without a prompt bound to the image);
* ``noise_magnitude_auc``: how well Wen et al.'s noise magnitude separates planted from other
  prompts (a prompt-bound signal: it cannot see copies the prompt does not drive).
* ``copy_gini``, ``copy_top1_share``, ``copy_top10_share``: how concentrated the copies are
  among the scanned prompts (skewed memorization, Li et al. 2025:
  :func:`diffmem.detect.skew.copy_concentration`); None when nothing was copied.
* ``reid_rate`` / ``reid_rate_not_copies``: generations (of the scanned, unrelated and empty
  prompts) that re-identify a training patient (the embedded patient-verification model, :mod:`diffmem.reid.verdicts`,
  threshold calibrated on held-out patients), and those among them that are not pixel copies
  (patient-level memorization the copy verdicts miss); None when the data has no patient ids or
  ``MeasureConfig.reid`` is off.
* ``reid_rate_own``: generations that re-identify their prompt's *own* patient (the patient
  whose training study carries the prompt; the detector's own-patient verdict,
  ``reid_own_match``), of the same generations as ``reid_rate`` (so at most it: unrelated and
  empty prompts have no own patient); None like ``reid_rate``, and in measurements saved before
  the field existed.

Utility is the in-domain FID (:func:`diffmem.embed.frechet_distance` on the in-domain encoder's
features) between one generation per held-out record's prompt and the held-out real images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import as_dataset
from diffmem.errors import ConfigError, DataError
from diffmem.models.adapter import module_hooks
from diffmem.utils import write_json

log = logging.getLogger(__name__)

__all__ = ["MeasureConfig", "Measurement", "measure_model", "model_hooks", "reid_fields",
           "resolve_encoder", "skew_fields", "weights_stamp"]


@dataclass
class MeasureConfig:
    """How a study measures one model (restricted detector settings; fewer than
    ``diffmem detect``'s defaults, for CPU budgets: stated in the outputs).

    Attributes
    ----------
    controls : int
        Non-planted training prompts scanned besides the planted ones (seeded sample).
    nn_generations : int
        Generations per prompt for the copy verdicts.
    sample_steps : int
        DDIM steps of every generation (detector and FID).
    unconditional, unrelated : int
        Generations from the empty prompt; held-out prompts generated from.
    fpr : float
        False-positive rate of the calibrated copy threshold.
    fid_images : int or None
        Held-out records whose prompts are generated from for the FID (None: all).
    seed : int
    batch_size : int
    reid : bool
        Also judge the generations with the embedded re-ID model (patient-level leaks); data
        without patient ids skips it with a warning.
    device, dtype : str or None
        Device and precision the trained models are measured with (see
        :func:`~diffmem.models.load_model`; training itself runs where ``accelerate`` puts it).
        The device is not part of the settings that identify a measurement; a dtype other than
        None is.
    """

    controls: int = 20
    nn_generations: int = 4
    sample_steps: int = 25
    unconditional: int = 16
    unrelated: int = 8
    fpr: float = 0.01
    fid_images: int | None = None
    seed: int = 0
    batch_size: int = 32
    reid: bool = True
    device: str | None = None
    dtype: str | None = None

    def detection_config(self, threads: int | None = None, *, reid: bool | None = None):
        """The detector's settings (``reid`` overrides :attr:`reid`)."""
        from diffmem.detect.detector import DetectionConfig

        methods = ("noise", "nn", "reid") if (self.reid if reid is None else reid) else \
            ("noise", "nn")
        return DetectionConfig(methods=methods, nn_generations=self.nn_generations,
                               sample_steps=self.sample_steps, unconditional=self.unconditional,
                               unrelated=self.unrelated, fpr=self.fpr, seed=self.seed,
                               batch_size=self.batch_size, threads=threads).validated()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["device"]
        if out["dtype"] is None:  # measurements saved before the field existed stay valid
            del out["dtype"]
        return out


@dataclass
class Measurement:
    """Memorization (both kinds) and utility of one model (see the module docstring)."""

    memorization_rate_own: float | None
    memorization_rate_any: float | None
    copy_rate_unconditional: float | None
    copy_rate_unrelated: float | None
    control_copy_rate: float | None
    noise_magnitude_auc: float | None
    nn_similarity_auc: float | None
    fid_in_domain: float | None
    planted_prompts: int
    control_prompts: int
    copy_threshold: float | None
    detect_seconds: float
    fid_seconds: float
    copied_studies_without_prompt: list[str] = field(default_factory=list)
    copy_gini: float | None = None
    copy_top1_share: float | None = None
    copy_top10_share: float | None = None
    reid_rate: float | None = None
    reid_rate_not_copies: float | None = None
    reid_rate_own: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_encoder(encoder: str | os.PathLike | None) -> Path | None:
    """The encoder folder for the FID: ``encoder``, else the embedded default encoder when this
    diffmem ships one, else None (FID not measured)."""
    if encoder is not None:
        path = Path(encoder)
        if not (path / "encoder_config.json").is_file():
            raise ConfigError(f"--encoder {str(path)!r} is not an encoder folder (no "
                              "encoder_config.json); train one with `diffmem embed train`")
        return path
    try:
        from diffmem.embed import default_encoder_dir
    except ImportError:
        return None
    try:
        path = Path(default_encoder_dir())
    except Exception:  # noqa: BLE001 - a missing embedded encoder only disables the FID
        return None
    return path if (path / "encoder_config.json").is_file() else None


def _clusters(dataset) -> dict[str, str]:
    """study_id -> planted cluster id (from ground_truth.csv), for 'own image' matching."""
    from diffmem.data.synth import read_ground_truth

    if not (Path(dataset.root) / "ground_truth.csv").is_file():
        return {}
    out = {}
    for row in read_ground_truth(dataset.root).values():
        if row.get("cluster_id"):
            out[str(row["study_id"])] = str(row["cluster_id"])
    return out


def choose_prompts(dataset, *, controls: int, seed: int) -> tuple[list[str], dict[str, int]]:
    """Planted training prompts (all) plus ``controls`` other training prompts (seeded)."""
    from diffmem.detect.inputs import prompt_labels, training_prompts

    prompts = list(training_prompts(dataset))
    labels = prompt_labels(dataset)
    if labels is None:
        raise DataError("the study measures copies of planted duplicates and needs "
                        "ground_truth.csv next to the data (written by `diffmem synth`)",
                        path=dataset.root)
    planted = [p for p in prompts if labels.get(p)]
    others = [p for p in prompts if not labels.get(p)]
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(others), size=min(controls, len(others)), replace=False)) \
        if others else []
    if not planted:
        raise DataError("ground_truth.csv marks no training prompt as planted; the study needs "
                        "planted duplicates to measure copying", path=dataset.root)
    return planted + [others[i] for i in pick], labels


def copy_rates(result, clusters: dict[str, str]) -> dict[str, Any]:
    """Own-image and any-image copy rates of a :class:`~diffmem.detect.DetectionResult`."""
    scanned = result.of_kind("train", "prompt")
    planted = [p for p in scanned if p.label == 1]
    control = [p for p in scanned if p.label == 0]

    def own(p) -> bool:
        mine = set(p.study_ids) | {clusters[s] for s in p.study_ids if s in clusters}
        return any(g.copy and (g.study_id in mine or clusters.get(g.study_id) in mine)
                   for g in p.generations)

    def rate(items, fn):
        return sum(bool(fn(p)) for p in items) / len(items) if items else None

    out = {"memorization_rate_own": rate(planted, own),
           "memorization_rate_any": rate(planted, lambda p: p.memorized),
           "control_copy_rate": rate(control, lambda p: p.memorized),
           "planted_prompts": len(planted), "control_prompts": len(control)}
    copied = set()
    for kind in ("unconditional", "unrelated"):
        gens = [g for p in result.of_kind(kind) for g in p.generations]
        out[f"copy_rate_{kind}"] = (sum(g.copy for g in gens) / len(gens)) if gens else None
        copied |= {g.study_id for g in gens if g.copy}
    out["copied_studies_without_prompt"] = sorted(copied)
    return out


def skew_fields(skew: dict[str, Any] | None) -> dict[str, float | None]:
    """The :class:`Measurement` fields of a detection's ``skew`` (Gini, top 1%/10% shares).

    Examples
    --------
    >>> from diffmem.detect.skew import copy_concentration
    >>> skew_fields(copy_concentration([0, 0, 0, 4]))
    {'copy_gini': 0.75, 'copy_top1_share': 1.0, 'copy_top10_share': 1.0}
    """
    shares = (skew or {}).get("top_shares") or {}
    return {"copy_gini": (skew or {}).get("gini"), "copy_top1_share": shares.get("1%"),
            "copy_top10_share": shares.get("10%")}


def reid_fields(counts: dict[str, Any] | None) -> dict[str, float | None]:
    """The :class:`Measurement` fields of a detection's re-ID counts
    (:meth:`~diffmem.detect.results.DetectionResult.reid_counts`).

    Examples
    --------
    >>> reid_fields({"generations": 8, "leaks": 2, "leaks_not_copies": 1,
    ...              "own_patient_leaks": 1})
    {'reid_rate': 0.25, 'reid_rate_not_copies': 0.125, 'reid_rate_own': 0.125}
    >>> reid_fields(None)
    {'reid_rate': None, 'reid_rate_not_copies': None, 'reid_rate_own': None}
    """
    if not counts or not counts.get("generations"):
        return {"reid_rate": None, "reid_rate_not_copies": None, "reid_rate_own": None}
    n = counts["generations"]
    own = counts.get("own_patient_leaks")
    return {"reid_rate": counts["leaks"] / n,
            "reid_rate_not_copies": counts["leaks_not_copies"] / n,
            "reid_rate_own": None if own is None else own / n}


def _has_patients(dataset) -> bool:
    """True when the training records carry patient ids (re-ID needs them); warns otherwise."""
    from diffmem.reid.pairs import patient_records

    try:
        patient_records(dataset.subset(split="train"))
    except DataError as e:
        log.warning("re-ID rates are not measured: %s", e)
        return False
    return True


def _fid(adapter, dataset, encoder_dir: Path, cfg: MeasureConfig, guidance: float) -> float:
    from diffmem.embed import frechet_distance, load_encoder

    held = dataset.subset(split=["validate", "test"])
    if len(held) < 3:
        raise DataError(f"the in-domain FID needs held-out (validate/test) images; found "
                        f"{len(held)}", path=dataset.root)
    idx = list(range(len(held)))
    if cfg.fid_images is not None and cfg.fid_images < len(idx):
        idx = sorted(np.random.default_rng(cfg.seed).choice(len(idx), cfg.fid_images,
                                                            replace=False).tolist())
    encoder = load_encoder(encoder_dir)
    # one generation per record: repeated prompts get generations 0, 1, ... of the same prompt
    counts: dict[str, int] = {}
    for i in idx:
        counts[held[i].prompt] = counts.get(held[i].prompt, 0) + 1
    prompts = list(counts)
    sample = adapter.sample(prompts, n_per_prompt=max(counts.values()), steps=cfg.sample_steps,
                            guidance=guidance, seed=cfg.seed + 1, batch_size=cfg.batch_size)
    keep = [r for r in range(len(sample.images))
            if sample.generation_index[r] < counts[prompts[sample.prompt_index[r]]]]
    fake = sample.images[keep]
    # real images at the model's resolution, so both sets take the same resize to the encoder
    real = np.stack([held.load_image(i, size=fake.shape[-1]) for i in idx])
    return float(frechet_distance(encoder.embed_images(fake), encoder.embed_images(real)))


def measure_model(model: str | os.PathLike, data, out: str | os.PathLike, *,
                  config: MeasureConfig | None = None, encoder: str | os.PathLike | None = None,
                  threads: int | None = None,
                  index: str | os.PathLike | None = None,
                  mitigation: Mapping[str, Any] | None = None) -> Measurement:
    """Measure memorization (both kinds of copying) and in-domain FID of one model.

    Parameters
    ----------
    model : path
        A model folder.
    data : CXRDataset or path
        The training data with ``ground_truth.csv`` (planted labels) and validate/test splits.
    out : path
        Folder for the detector's files and ``measure.json`` (re-running reuses both).
    config : MeasureConfig, optional
    encoder : path, optional
        In-domain encoder folder for the FID (default: :func:`resolve_encoder`).
    threads : int, optional
        Torch threads.
    index : path, optional
        A reference index of the training features (``diffmem index build``), reused by the
        copy verdicts instead of featurizing the training images (same verdicts).
    mitigation : mapping, optional
        ``{"method": name, "strength": s, "params": {...}}``: a registered inference-time
        mitigation that acts on the UNet's modules alone (``magnitude_pruning``,
        ``nemo_deactivation`` with fixed ``neurons``), built by
        :func:`~diffmem.mitigate.mitigation_hooks` and kept on the model for the whole
        measurement (every generation and noise prediction of the detector and the FID):
        the model is measured as if its weights were changed. Strength 0 is the plain model.

    Returns
    -------
    Measurement
    """
    from diffmem.detect.detector import detect
    from diffmem.detect.scores import default_guidance
    from diffmem.models import load_model

    cfg = config or MeasureConfig()
    dataset = as_dataset(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc = resolve_encoder(encoder)
    key = {"config": cfg.to_dict(), "model": str(model), "weights": weights_stamp(model),
           "encoder": str(enc)}
    if mitigation is not None:  # keys of plain measurements stay as they were
        key["mitigation"] = json.loads(json.dumps(dict(mitigation), sort_keys=True))
    cached = out / "measure.json"
    if cached.is_file():
        saved = json.loads(cached.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return Measurement(**saved["measurement"])
    prompts, _ = choose_prompts(dataset, controls=cfg.controls, seed=cfg.seed)
    adapter = load_model(model, device=cfg.device, dtype=cfg.dtype)
    with module_hooks(adapter.unet, model_hooks(adapter, mitigation, seed=cfg.seed)):
        t0 = time.perf_counter()
        result = detect(adapter, dataset, out / "detect",
                        config=cfg.detection_config(threads,
                                                    reid=cfg.reid and _has_patients(dataset)),
                        prompts=prompts, index=index)
        detect_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        fid = None
        if enc is not None:
            fid = _fid(adapter, dataset, enc, cfg, default_guidance(adapter))
        else:
            log.warning("no in-domain encoder (pass --encoder DIR from `diffmem embed train`): "
                        "the FID is not measured")
    rates = {**copy_rates(result, _clusters(dataset)), **skew_fields(result.skew),
             **reid_fields(result.reid_counts())}
    evals = result.evaluations
    m = Measurement(
        noise_magnitude_auc=evals["noise_magnitude"].auc if "noise_magnitude" in evals else None,
        nn_similarity_auc=evals["nn_similarity"].auc if "nn_similarity" in evals else None,
        fid_in_domain=fid, copy_threshold=None if result.threshold is None
        else float(result.threshold.value), detect_seconds=round(detect_s, 1),
        fid_seconds=round(time.perf_counter() - t1, 1), **rates)
    write_json(cached, {"key": key, "measurement": _finite(m.to_dict())})
    return m


def model_hooks(adapter, mitigation: Mapping[str, Any] | None, *, seed: int = 0):
    """The :class:`~diffmem.models.SamplingHooks` of ``mitigation`` (``{"method", "strength",
    "params"}``, see :func:`measure_model`) from the mitigation registry, checked to act on the
    UNet's modules only (so they can stay on the model for every call); None for None.

    Raises
    ------
    ConfigError
        For a method that edits prompts, guidance or attention per generation (those are
        compared at sampling time by ``diffmem mitigate``), or a bad name or strength.
    """
    from diffmem.mitigate.registry import mitigation_hooks

    if mitigation is None:
        return None
    name = mitigation.get("method")
    hooks = mitigation_hooks(name, adapter, mitigation.get("strength"), seed=seed,
                             **dict(mitigation.get("params") or {}))
    per_generation = [f for f in ("prompt_embeds", "guidance_scale", "on_step",
                                  "attention_logits", "attention_probs", "initial_latents")
                      if getattr(hooks, f) is not None]
    if per_generation:
        raise ConfigError(f"mitigation {name!r} changes {', '.join(per_generation)} per "
                          "generation, so it cannot be applied to the model as a whole; use a "
                          "method that changes the UNet's modules only (magnitude_pruning, or "
                          "nemo_deactivation with fixed neurons), or compare it with "
                          "`diffmem mitigate`")
    return hooks


def weights_stamp(model) -> list[list[Any]]:
    """Size and modification time of the model's weight files: a retrained model in the same
    folder invalidates the cached measurement."""
    root = Path(model)
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(root.glob("*/*.safetensors"))]


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in d.items()}

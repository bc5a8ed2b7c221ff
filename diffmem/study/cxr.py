"""Training studies on chest X-ray data: the learning-rate sweep (does Wu et al.'s large-learning-
rate effect show on a CXR diffusion model?) and the training-time mitigations.

Both train one model per setting (each a trainer folder ``OUT/runs/<name>/``: finished runs are
skipped, killed ones resume exactly), measure it with :func:`diffmem.study.measure.measure_model`
(``OUT/measure/<name>/``: the detector's files and ``measure.json``) and write ``study.json``,
``summary.json``, a CSV and figures into ``OUT``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffmem.checks import as_dataset
from diffmem.errors import ConfigError, DataError
from diffmem.study.measure import MeasureConfig, measure_model, resolve_encoder
from diffmem.study.results import StudyResult, machine_info, write_study
from diffmem.study.runs import RunInfo, train_or_resume
from diffmem.utils import prepare_out_dir, progress

log = logging.getLogger(__name__)

__all__ = ["embedded_baseline", "run_lr_study", "run_train_mitigation_study"]

SCHEDULES = ("samples", "inverse-lr")
RECORD_COLUMNS = ("name", "lr", "steps", "samples_seen", "status", "final_loss", "train_seconds",
                  "memorization_rate_own", "memorization_rate_any", "reid_rate",
                  "reid_rate_not_copies", "reid_rate_own", "copy_rate_unconditional",
                  "copy_rate_unrelated",
                  "control_copy_rate", "noise_magnitude_auc", "nn_similarity_auc",
                  "fid_in_domain", "copy_gini", "copy_top10_share", "copy_top1_share",
                  "copy_threshold", "planted_prompts", "control_prompts", "detect_seconds",
                  "fid_seconds", "filtered_samples", "train_records", "model")
PLOT_METRICS = ("memorization_rate_own", "memorization_rate_any", "copy_rate_unconditional",
                "noise_magnitude_auc", "fid_in_domain")


def _load(data):
    dataset = as_dataset(data)
    if len(dataset.subset(split="train")) == 0:
        raise DataError("the data has no training split to train on", path=dataset.root)
    return dataset


def embedded_baseline(train_set, config, steps: int) -> tuple[str, dict] | None:
    """The packaged default model's folder and card when it *is* the run ``config`` asks for
    (demo preset, same data fingerprint, seed, lr, steps, batch, caption dropout, no hooks);
    otherwise None."""
    from diffmem.pipelines import default_model_dir

    try:
        folder = Path(default_model_dir())
        card = json.loads((folder / "model_card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tr = card.get("training", {})
    want = {"preset": config.preset, "seed": config.seed, "lr": config.lr, "steps": steps,
            "batch_size": config.batch_size, "caption_dropout": config.caption_dropout,
            "ema": config.ema}
    if card.get("data", {}).get("fingerprint") != train_set.fingerprint():
        return None
    if any(tr.get(k) != v for k, v in want.items()):
        return None
    return str(folder), card


def _resolved(config):
    from diffmem.pipelines import load_preset

    return config.resolved(dict(load_preset(config.preset).training))


def _measure(name: str, info: RunInfo, dataset, out: Path, measure: MeasureConfig,
             encoder, threads, index=None) -> dict[str, Any]:
    m = measure_model(info.model, dataset, out / "measure" / name, config=measure,
                      encoder=encoder, threads=threads, index=index)
    return m.to_dict()


def _run_seconds(records: Sequence[Mapping[str, Any]]) -> float:
    """Sum of the recorded training, detection and FID seconds of every run (earlier sessions
    included: a re-run that skips finished work still reports what the work took)."""
    total = 0.0
    for r in records:
        for key in ("train_seconds", "detect_seconds", "fid_seconds"):
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                total += float(v)
    return round(total, 1)


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.0%}" if pct else f"{v:.3g}"


def _detector_finding(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Which detector catches which kind of copying, across the runs."""
    out = []
    aucs = [(r["name"], r.get("noise_magnitude_auc")) for r in records
            if r.get("noise_magnitude_auc") is not None]
    if aucs:
        out.append("Noise magnitude (prompt-bound, Wen et al.) AUC planted vs other prompts: "
                   + ", ".join(f"{n} {a:.2f}" for n, a in aucs) + "; the nearest-neighbour "
                   "verdicts are what count copies of any image, including generations from "
                   "empty and unrelated prompts.")
    for r in records:
        own, anyc = r.get("memorization_rate_own"), r.get("memorization_rate_any")
        auc = r.get("noise_magnitude_auc")
        unc = r.get("copy_rate_unconditional")
        if own is None or anyc is None:
            continue
        if auc is not None and auc >= 0.9 and anyc == 0:
            out.append(f"{r['name']}: the noise magnitude still ranks planted prompts first (AUC "
                       f"{auc:.2f}) although none of their generations copies an image: it flags "
                       "prompts the model was trained on heavily, not copies; check copies with "
                       "the nearest-neighbour verdicts.")
        if anyc > own and auc is not None and auc < 0.8:
            out.append(f"{r['name']}: planted prompts still copy some training image "
                       f"({_fmt(anyc, True)}) more often than their own ({_fmt(own, True)}), "
                       f"while the noise magnitude separates them poorly (AUC {_fmt(auc)}): only "
                       "the nearest-neighbour verdicts catch these copies, so this model is "
                       "not safe on noise magnitude alone.")
        if unc:
            out.append(f"{r['name']}: {_fmt(unc, True)} of unconditional generations copy a "
                       "training image (copying without a prompt: invisible to prompt scores).")
    return out


# ---------------------------------------------------------------------------- lr sweep
def run_lr_study(data, out: str | os.PathLike, *, lrs: Sequence[float],
                 preset: str = "demo", steps: int | None = None, schedule: str = "samples",
                 seed: int = 0, batch_size: int | None = None, use_embedded: bool = True,
                 encoder: str | os.PathLike | None = None, measure: MeasureConfig | None = None,
                 checkpoint_every: int = 100, threads: int | None = None,
                 command: Sequence[str] | None = None,
                 index: str | os.PathLike | None = None) -> StudyResult:
    """Learning-rate sweep of a CXR diffusion model: memorization (both kinds of copying) and
    in-domain FID against the AdamW learning rate (motivated by Wu et al., COLT 2025, whose
    theory is for SGD on a two-layer network: this is the empirical check on a real trainer).

    Parameters
    ----------
    data : path or CXRDataset
        Training data with ``ground_truth.csv`` (planted duplicates) and validate/test splits.
    out : path
        Study folder: ``runs/lr_<lr>/`` (trainer folders), ``measure/lr_<lr>/``, ``lr.csv``,
        ``summary.json``, ``study.json``, ``lr_sweep.png``.
    lrs : sequence of float
        Peak learning rates.
    preset : str
        Model preset (``demo``; ``tiny`` for tests).
    steps : int, optional
        Steps of the run at the preset's learning rate (default: the preset's).
    schedule : {"samples", "inverse-lr"}
        ``samples``: every run trains ``steps`` steps (samples seen held fixed);
        ``inverse-lr``: ``steps x preset_lr / lr`` steps (Wu et al.'s rule, epochs ∝ 1/lr).
    seed, batch_size : optional
        Trainer seed and global batch (default: the preset's).
    use_embedded : bool
        Let the packaged default model stand in for the run it is (demo preset at its default
        lr and steps on ``diffmem synth --preset demo --seed 0``), instead of retraining it.
    encoder : path, optional
        In-domain encoder for the FID (default: the embedded one when present).
    measure : MeasureConfig, optional
    checkpoint_every : int
    threads : int, optional
    command : sequence of str, optional
    index : path, optional
        A reference index of the training features (``diffmem index build`` on ``data``),
        reused by every run's copy verdicts instead of featurizing the training images again.

    Returns
    -------
    StudyResult
    """
    from diffmem.train import TrainConfig

    t0 = time.perf_counter()
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r}; use one of {', '.join(SCHEDULES)}")
    lrs = [float(x) for x in lrs]
    if not lrs or any(not math.isfinite(x) or x <= 0 for x in lrs):
        raise ConfigError(f"lrs={lrs!r}; give positive learning rates, e.g. --lrs 2e-4,2e-3")
    measure = measure or MeasureConfig()
    dataset = _load(data)
    out = prepare_out_dir(out, inputs=[dataset.root])
    enc = resolve_encoder(encoder)
    train_set = dataset.subset(split="train")
    base = _resolved(TrainConfig(preset=preset, steps=steps, seed=seed, batch_size=batch_size))
    records = []
    for lr in progress(lrs, desc="lr sweep", unit="run"):
        n_steps = base.steps if schedule == "samples" else max(1, round(base.steps * base.lr / lr))
        cfg = TrainConfig(preset=preset, lr=lr, steps=n_steps, seed=seed,
                          batch_size=base.batch_size, checkpoint_every=checkpoint_every)
        name = f"lr_{lr:g}"
        emb = embedded_baseline(train_set, _resolved(cfg), n_steps) if use_embedded else None
        if emb is not None:
            folder, card = emb
            info = RunInfo(folder, "embedded", float(card.get("final_loss", math.nan)),
                           float(card.get("wall_seconds_last_session", math.nan)), 0, n_steps)
        else:
            info = train_or_resume(train_set, out / "runs" / name, cfg)
        m = _measure(name, info, dataset, out, measure, enc, threads, index)
        records.append({"name": name, "lr": lr, "steps": info.steps,
                        "samples_seen": info.steps * base.batch_size, "status": info.status,
                        "final_loss": info.final_loss, "train_seconds": info.train_seconds,
                        "filtered_samples": info.filtered_samples,
                        "train_records": len(train_set), "model": info.model, **m})
    from diffmem.study import plots

    fig = plots.plot_metrics_vs_lr(records, PLOT_METRICS, out / "lr_sweep.png",
                                   title=f"{preset} model, schedule '{schedule}': memorization "
                                         "and utility vs learning rate").name
    result = StudyResult(
        study="lr", title=f"Learning-rate sweep ({preset} preset, {schedule} schedule)",
        records=records, figures=[fig], findings=_lr_findings(records, schedule),
        config={"preset": preset, "lrs": lrs, "schedule": schedule,
                "schedule_meaning": "samples seen held fixed" if schedule == "samples"
                else "steps x lr held fixed (epochs proportional to 1/lr, Wu et al.)",
                "steps_at_preset_lr": base.steps, "preset_lr": base.lr,
                "batch_size": base.batch_size, "seed": seed, "use_embedded": use_embedded,
                "encoder": None if enc is None else str(enc), "measure": measure.to_dict(),
                "data": str(dataset.root), "data_fingerprint": train_set.fingerprint(),
                "recorded_run_seconds": _run_seconds(records),
                "deviations": _deviations(preset, base.steps)},
        machine=machine_info(), seconds=time.perf_counter() - t0,
        command=list(command) if command else [])
    return write_study(result, out, csv_name="lr.csv", columns=RECORD_COLUMNS)


def _deviations(preset: str, steps: int) -> list[str]:
    return [f"{preset}-preset pixel model trained {steps} steps at the base lr (a CPU-sized "
            "model, not Stable Diffusion), AdamW rather than the paper's SGD",
            "detector restricted for speed: noise magnitude + nearest-neighbour copies only, "
            "planted prompts plus a seeded sample of others (see config.measure)",
            "in-domain FID on a ~130-image held-out set with a small in-domain encoder: "
            "comparable between runs of this study, not with published FIDs"]


def _lr_findings(records: Sequence[Mapping[str, Any]], schedule: str) -> list[str]:
    out = []
    rs = sorted(records, key=lambda r: r["lr"])
    out.append("; ".join(
        f"lr {r['lr']:g} ({r['steps']} steps, {r['status']}): own-image copies "
        f"{_fmt(r['memorization_rate_own'], True)}, any-image copies "
        f"{_fmt(r['memorization_rate_any'], True)}, noise AUC {_fmt(r['noise_magnitude_auc'])}, "
        f"FID {_fmt(r['fid_in_domain'])}" for r in rs) + ".")
    if len(rs) >= 2:
        lo, hi = rs[0], rs[-1]
        a, b = lo["memorization_rate_own"], hi["memorization_rate_own"]
        if a is not None and b is not None:
            verb = "fell" if b < a else ("rose" if b > a else "did not change")
            out.append(f"With {'samples seen held fixed' if schedule == 'samples' else 'the 1/lr rule'}"
                       f", prompt-bound copying {verb} from {_fmt(a, True)} at lr {lo['lr']:g} to "
                       f"{_fmt(b, True)} at lr {hi['lr']:g}.")
    for r in rs:
        if r["status"] == "embedded":
            out.append(f"lr {r['lr']:g}: the embedded default model stands in for this run (same "
                       "preset, settings and data fingerprint); its train_seconds is the last "
                       "training session recorded in its model card, not timed by this study.")
    return out + _detector_finding(rs)


# ---------------------------------------------------------------------------- mitigations
DEFAULT_METHODS = ("none", "caption_randomization", "deid_randomization", "loss_filter", "dedup")


def run_train_mitigation_study(data, out: str | os.PathLike, *,
                               methods: Sequence[str] = DEFAULT_METHODS,
                               options: Mapping[str, Mapping[str, Any]] | None = None,
                               preset: str = "demo", steps: int | None = None,
                               lr: float | None = None, seed: int = 0,
                               batch_size: int | None = None,
                               encoder: str | os.PathLike | None = None,
                               measure: MeasureConfig | None = None, checkpoint_every: int = 100,
                               threads: int | None = None,
                               command: Sequence[str] | None = None,
                               index: str | os.PathLike | None = None) -> StudyResult:
    """Training-time mitigations (caption randomization, Somepalli et al. 2023; de-id marker
    randomization; Wen et al.'s 2024 loss filter; near-duplicate de-duplication), each trained
    with the same settings and measured like :func:`run_lr_study`.

    Parameters
    ----------
    data : path or CXRDataset
    out : path
        Study folder: ``runs/<method>/``, ``measure/<method>/``, ``train_mitigations.csv``,
        ``summary.json``, ``study.json``, ``train_mitigations.png``.
    methods : sequence of str
        Names from :func:`diffmem.study.training.list_training_mitigations`; ``none`` is the
        unmitigated reference (include it to compare).
    options : mapping, optional
        ``{method: {option: value}}`` (e.g. ``{"loss_filter": {"tau": 2.0}}``).
    preset, steps, lr, seed, batch_size : optional
        Trainer settings shared by every run (default: the preset's).
    encoder, measure, checkpoint_every, threads, command, index
        As in :func:`run_lr_study`.

    Returns
    -------
    StudyResult
    """
    from diffmem.study.training import get_training_mitigation, list_training_mitigations
    from diffmem.train import TrainConfig

    t0 = time.perf_counter()
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in list_training_mitigations()]
    if unknown or not methods:
        raise ConfigError(f"unknown training mitigation(s) {unknown or '(none given)'}; known: "
                          f"{', '.join(list_training_mitigations())}")
    options = dict(options or {})
    extra = sorted(set(options) - set(methods))
    if extra:
        raise ConfigError(f"options given for {extra}, which are not among the methods "
                          f"{methods}")
    measure = measure or MeasureConfig()
    dataset = _load(data)
    out = prepare_out_dir(out, inputs=[dataset.root])
    enc = resolve_encoder(encoder)
    train_set = dataset.subset(split="train")
    cfg = TrainConfig(preset=preset, lr=lr, steps=steps, seed=seed, batch_size=batch_size,
                      checkpoint_every=checkpoint_every)
    base = _resolved(cfg)
    records = []
    for name in progress(methods, desc="training mitigations", unit="run"):
        mit = get_training_mitigation(name, train_set, **dict(options.get(name, {})))
        info = train_or_resume(mit.data, out / "runs" / name, cfg,
                               caption_transform=mit.caption_transform,
                               loss_filter=mit.loss_filter)
        m = _measure(name, info, dataset, out, measure, enc, threads, index)
        records.append({"name": name, "lr": base.lr, "steps": info.steps,
                        "samples_seen": info.steps * base.batch_size, "status": info.status,
                        "final_loss": info.final_loss, "train_seconds": info.train_seconds,
                        "filtered_samples": info.filtered_samples,
                        "train_records": len(mit.data), "model": info.model,
                        "options": dict(mit.options), **mit.info, **m})
    from diffmem.study import plots

    fig = plots.plot_metric_bars(records, PLOT_METRICS, out / "train_mitigations.png",
                                 label="name", title=f"Training-time mitigations ({preset}, "
                                                     f"{base.steps} steps, lr {base.lr:g})").name
    result = StudyResult(
        study="train-mitigations",
        title=f"Training-time mitigations ({preset} preset, {base.steps} steps)",
        records=records, figures=[fig], findings=_mitigation_findings(records),
        config={"preset": preset, "methods": methods, "options": options,
                "steps": base.steps, "lr": base.lr, "batch_size": base.batch_size, "seed": seed,
                "encoder": None if enc is None else str(enc), "measure": measure.to_dict(),
                "data": str(dataset.root), "data_fingerprint": train_set.fingerprint(),
                "recorded_run_seconds": _run_seconds(records),
                "deviations": _deviations(preset, base.steps) + [
                    "Wen et al.'s tau = 2 was set for SD latents (4x64x64); here it applies to "
                    "1x32x32 pixel noise, so it filters less"]},
        machine=machine_info(), seconds=time.perf_counter() - t0,
        command=list(command) if command else [])
    return write_study(result, out, csv_name="train_mitigations.csv",
                       columns=("name", "options") + RECORD_COLUMNS[1:])


def _mitigation_findings(records: Sequence[Mapping[str, Any]]) -> list[str]:
    out = []
    ref = next((r for r in records if r["name"] == "none"), None)
    for r in records:
        line = (f"{r['name']}: own-image copies {_fmt(r['memorization_rate_own'], True)}, "
                f"any-image copies {_fmt(r['memorization_rate_any'], True)}, unconditional "
                f"copies {_fmt(r['copy_rate_unconditional'], True)}, FID "
                f"{_fmt(r['fid_in_domain'])}, {r['train_seconds']:.0f} s of training")
        if ref is not None and r is not ref and r["memorization_rate_own"] is not None \
                and ref["memorization_rate_own"] is not None:
            d = r["memorization_rate_own"] - ref["memorization_rate_own"]
            line += (f" ({'no change' if d == 0 else f'{d:+.0%}'} own-image copies vs. none)")
        if r.get("filtered_samples"):
            line += (f"; the filter dropped {r['filtered_samples']} of {r['samples_seen']} "
                     "training samples")
        if ref is not None and r["train_records"] != ref["train_records"]:
            line += f"; trained on {r['train_records']} of {ref['train_records']} records"
        out.append(line + ".")
    n = records[0].get("planted_prompts") if records else None
    if n:
        out.append(f"One seed per method and {n} planted prompts: one prompt moves a copy rate by "
                   f"{1 / n:.0%}, so differences of one or two prompts are within noise.")
    return out + _detector_finding(records)

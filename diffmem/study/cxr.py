"""Training studies on chest X-ray data: the learning-rate sweep (does Wu et al.'s large-learning-
rate effect show on a CXR diffusion model?) and the training-time mitigations.

Both train one model per setting and seed (each a trainer folder ``OUT/runs/<name>-s<seed>/``:
finished runs are skipped, killed ones resume exactly; a finished single-seed run
``OUT/runs/<name>/`` of a study written before seeds were pooled is reused for its seed), measure
it with :func:`diffmem.study.measure.measure_model` (``OUT/measure/<run>/``: the detector's files
and ``measure.json``), pool each setting's seeds into one row (mean and 95% t-interval,
:func:`diffmem.study.seeds.pool_seeds`; the runs under ``runs``) and write ``study.json``,
``summary.json``, a CSV of the rows, a CSV of the runs and figures into ``OUT``.
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
from diffmem.study.checkpoints import (loss_at, matched_checkpoint, measure_checkpoint,
                                       run_checkpoints, run_losses, smoothed_losses)
from diffmem.study.results import StudyResult, machine_info, write_records_csv, write_study
from diffmem.study.runs import RunInfo, train_or_resume
from diffmem.study.seeds import (DEFAULT_SEEDS, SEED_METRICS, intervals_apart, parse_seeds,
                                 pool_seeds, row_ci, seed_run_name)
from diffmem.utils import prepare_out_dir, progress

log = logging.getLogger(__name__)

__all__ = ["embedded_baseline", "run_lr_study", "run_train_mitigation_study"]

SCHEDULES = ("samples", "inverse-lr")
#: One run's fields (``<study>_runs.csv``).
RUN_COLUMNS = ("name", "setting", "seed", "lr", "steps", "samples_seen", "status", "final_loss",
               "train_seconds", "memorization_rate_own", "memorization_rate_any", "reid_rate",
               "reid_rate_not_copies", "reid_rate_own", "copy_rate_unconditional",
               "copy_rate_unrelated",
               "control_copy_rate", "noise_magnitude_auc", "nn_similarity_auc",
               "fid_in_domain", "copy_gini", "copy_top10_share", "copy_top1_share",
               "matched_loss_step", "matched_loss", "own_copies_at_matched_loss",
               "any_copies_at_matched_loss", "fid_at_matched_loss", "copy_threshold",
               "planted_prompts", "control_prompts", "detect_seconds", "fid_seconds",
               "filtered_samples", "train_records", "model")
#: Fields of a run measured again at its matched-loss checkpoint (None where there is none).
MATCHED_FIELDS = {"own_copies_at_matched_loss": "memorization_rate_own",
                  "any_copies_at_matched_loss": "memorization_rate_any",
                  "fid_at_matched_loss": "fid_in_domain"}
#: Metrics pooled over the seeds of an lr setting: :data:`SEED_METRICS` and the matched ones.
LR_METRICS = {**SEED_METRICS, **{k: k for k in MATCHED_FIELDS},
              "matched_loss_step": "matched_loss_step", "matched_loss": "matched_loss"}
#: Metrics pooled over the seeds of a mitigation (a loss filter drops a seed-dependent number).
MITIGATION_METRICS = {**SEED_METRICS, "filtered_samples": "filtered_samples"}
#: Pooled metrics drawn in the figures (mean with 95% CI): pooled name -> run field.
PLOT_METRICS = {"own_copies": "memorization_rate_own", "any_copies": "memorization_rate_any",
                "empty_prompt_copies": "copy_rate_unconditional",
                "noise_auc": "noise_magnitude_auc", "fid": "fid_in_domain"}


def _row_columns(first: Sequence[str], metrics: Mapping[str, str],
                 rest: Sequence[str] = ()) -> tuple[str, ...]:
    """A pooled row's columns: ``first`` (the report's table shows the first 12), then every
    metric's mean and interval, then ``rest``."""
    pooled = [f"{k}_{s}" for k in metrics for s in ("mean", "ci95")]
    return tuple(dict.fromkeys([*first, *pooled, *rest]))


LR_COLUMNS = _row_columns(
    ("name", "lr", "seeds", "steps", "own_copies_mean", "own_copies_ci95", "any_copies_mean",
     "any_copies_ci95", "fid_mean", "fid_ci95", "own_copies_at_matched_loss_mean",
     "fid_at_matched_loss_mean"), LR_METRICS, ("samples_seen", "status", "train_records"))
MITIGATION_COLUMNS = _row_columns(
    ("name", "seeds", "own_copies_mean", "own_copies_ci95", "any_copies_mean",
     "any_copies_ci95", "empty_prompt_copies_mean", "empty_prompt_copies_ci95", "fid_mean",
     "fid_ci95", "train_seconds_mean", "filtered_samples_mean"), MITIGATION_METRICS,
    ("lr", "steps", "samples_seen", "status", "train_records", "options"))


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


def _run_record(name: str, setting: str, seed: int, info: RunInfo, base,
                train_records: int) -> dict[str, Any]:
    """One run's training fields (the measurement is added to it)."""
    return {"name": name, "setting": setting, "seed": seed, "steps": info.steps,
            "samples_seen": info.steps * base.batch_size, "status": info.status,
            "final_loss": info.final_loss, "train_seconds": info.train_seconds,
            "filtered_samples": info.filtered_samples, "train_records": train_records,
            "model": info.model}


def _pool(runs: Sequence[Mapping[str, Any]], setting: Mapping[str, Any],
          metrics: Mapping[str, str], columns: Sequence[str]) -> dict[str, Any]:
    """A setting's row over its seeds (:func:`~diffmem.study.seeds.pool_seeds`), with the
    fields every seed shares taken from the first run and the runs' statuses joined; keys in
    the order of ``columns`` (the report's table shows the first 12), the others after them."""
    first = runs[0]
    fixed = {k: first.get(k) for k in ("steps", "samples_seen", "train_records")}
    status = ",".join(dict.fromkeys(str(r["status"]) for r in runs))
    row = pool_seeds(runs, {**setting, **fixed, "status": status}, metrics=metrics)
    return {**{k: row[k] for k in columns if k in row}, **row}


def _means(row: Mapping[str, Any]) -> dict[str, Any]:
    """A pooled row as a run record of its means (for findings written per run)."""
    return {"name": row["name"], **{field: row.get(f"{k}_mean")
                                    for k, field in SEED_METRICS.items()}}


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
                 seeds: Sequence[int] | str = DEFAULT_SEEDS, batch_size: int | None = None,
                 use_embedded: bool = True, matched_loss: bool = True,
                 encoder: str | os.PathLike | None = None, measure: MeasureConfig | None = None,
                 checkpoint_every: int = 100, threads: int | None = None,
                 command: Sequence[str] | None = None,
                 index: str | os.PathLike | None = None) -> StudyResult:
    """Learning-rate sweep of a CXR diffusion model: memorization (both kinds of copying) and
    in-domain FID against the AdamW learning rate (motivated by Wu et al., COLT 2025, whose
    theory is for SGD on a two-layer network: this is the empirical check on a real trainer),
    over seeds, with utility at matched training loss.

    A run at a smaller learning rate may copy less only because it is less trained. To tell
    the two apart, every run is also measured at *matched loss*: the target is the highest
    final smoothed training loss among the sweep's runs (the least-trained run's end), and each
    run's first kept checkpoint whose smoothed loss is at most the target is measured
    (:func:`diffmem.study.checkpoints.matched_checkpoint`, smoothing by
    :func:`~diffmem.study.checkpoints.smoothed_losses`: a trailing mean of the last 10 logged
    losses, because one logged batch loss swings with its random timesteps and noise).

    Parameters
    ----------
    data : path or CXRDataset
        Training data with ``ground_truth.csv`` (planted duplicates) and validate/test splits.
    out : path
        Study folder: ``runs/lr_<lr>-s<seed>/`` (trainer folders), ``measure/<run>/``,
        ``models/`` and ``measure/<run>-step<N>/`` (matched-loss checkpoints), ``lr.csv`` (one
        row per lr), ``lr_runs.csv`` (one row per run), ``summary.json``, ``study.json``,
        ``lr_sweep.png``.
    lrs : sequence of float
        Peak learning rates.
    preset : str
        Model preset (``demo``; ``tiny`` for tests).
    steps : int, optional
        Steps of the run at the preset's learning rate (default: the preset's).
    schedule : {"samples", "inverse-lr"}
        ``samples``: every run trains ``steps`` steps (samples seen held fixed);
        ``inverse-lr``: ``steps x preset_lr / lr`` steps (Wu et al.'s rule, epochs ∝ 1/lr).
    seeds : sequence of int or str
        Trainer seeds (batch order, noise, initialization), default 0, 1, 2; every lr is
        trained once per seed and reported as the mean and 95% t-interval over the seeds.
    batch_size : int, optional
        Global batch (default: the preset's).
    use_embedded : bool
        Let the packaged default model stand in for the run it is (demo preset at its default
        lr and steps, seed 0, on ``diffmem synth --preset demo --seed 0``), instead of
        retraining it. Only seed 0 can match; it keeps no checkpoints, so it has no
        matched-loss measurement.
    matched_loss : bool
        Keep every checkpoint of each run and measure the matched-loss checkpoints (default);
        False keeps the trainer's default two and skips them.
    encoder : path, optional
        In-domain encoder for the FID (default: the embedded one when present).
    measure : MeasureConfig, optional
    checkpoint_every : int
        Checkpoint interval: resuming killed runs and the matched-loss candidates.
    threads : int, optional
    command : sequence of str, optional
    index : path, optional
        A reference index of the training features (``diffmem index build`` on ``data``),
        reused by every run's copy verdicts instead of featurizing the training images again.

    Returns
    -------
    StudyResult
        ``records``: one row per lr (``<metric>_mean``, ``<metric>_ci95``, the runs under
        ``runs``).
    """
    from diffmem.train import TrainConfig

    t0 = time.perf_counter()
    seeds = parse_seeds(seeds)
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
    base = _resolved(TrainConfig(preset=preset, steps=steps, seed=seeds[0],
                                 batch_size=batch_size))
    by_lr: dict[float, list[dict[str, Any]]] = {lr: [] for lr in lrs}
    jobs = [(lr, seed) for lr in lrs for seed in seeds]
    for lr, seed in progress(jobs, desc="lr sweep", unit="run"):
        n_steps = base.steps if schedule == "samples" else max(1, round(base.steps * base.lr / lr))
        keep = math.ceil(n_steps / checkpoint_every) + 1 if matched_loss else 2
        cfg = TrainConfig(preset=preset, lr=lr, steps=n_steps, seed=seed,
                          batch_size=base.batch_size, checkpoint_every=checkpoint_every,
                          keep_checkpoints=keep)
        setting = f"lr_{lr:g}"
        name = seed_run_name(out / "runs", setting, seed)
        emb = embedded_baseline(train_set, _resolved(cfg), n_steps) if use_embedded else None
        if emb is not None:
            folder, card = emb
            info = RunInfo(folder, "embedded", float(card.get("final_loss", math.nan)),
                           float(card.get("wall_seconds_last_session", math.nan)), 0, n_steps)
        else:
            info = train_or_resume(train_set, out / "runs" / name, cfg)
        by_lr[lr].append({**_run_record(name, setting, seed, info, base, len(train_set)),
                          "lr": lr, **_measure(name, info, dataset, out, measure, enc,
                                               threads, index)})
    runs = [r for lr in lrs for r in by_lr[lr]]
    matched = (_matched_loss(runs, out, dataset, measure, enc, threads, index) if matched_loss
               else {"target_loss": None, "note": "not measured (matched_loss=False)"})
    records = [_pool(by_lr[lr], {"name": f"lr_{lr:g}", "lr": lr}, LR_METRICS, LR_COLUMNS)
               for lr in lrs]
    config = {"preset": preset, "lrs": lrs, "schedule": schedule,
              "schedule_meaning": "samples seen held fixed" if schedule == "samples"
              else "steps x lr held fixed (epochs proportional to 1/lr, Wu et al.)",
              "steps_at_preset_lr": base.steps, "preset_lr": base.lr,
              "batch_size": base.batch_size, "seeds": seeds, "use_embedded": use_embedded,
              "matched_loss": matched, "encoder": None if enc is None else str(enc),
              "measure": measure.to_dict(), "data": str(dataset.root),
              "data_fingerprint": train_set.fingerprint(),
              "recorded_run_seconds": _run_seconds(runs),
              "deviations": _deviations(preset, base.steps)}
    return _write_lr(records, runs, out, config, t0, command)


def _write_lr(records, runs, out: Path, config, t0: float, command) -> StudyResult:
    from diffmem.study import plots

    preset, schedule, n = config["preset"], config["schedule"], len(config["seeds"])
    fig = plots.plot_pooled_vs_lr(records, PLOT_METRICS, out / "lr_sweep.png",
                                  title=f"{preset} model, schedule '{schedule}', {n} seed"
                                        f"{'s' if n != 1 else ''}: memorization and utility vs "
                                        "learning rate").name
    result = StudyResult(
        study="lr", title=f"Learning-rate sweep ({preset} preset, {schedule} schedule, "
                          f"{n} seed{'s' if n != 1 else ''})",
        records=records, figures=[fig], findings=_lr_findings(records, config),
        config=config, machine=machine_info(), seconds=time.perf_counter() - t0,
        command=list(command) if command else [])
    write_records_csv(out / "lr_runs.csv", runs, RUN_COLUMNS)
    result = write_study(result, out, csv_name="lr.csv", columns=LR_COLUMNS)
    result.files["runs_csv"] = str(out / "lr_runs.csv")
    return result


def _matched_loss(runs: Sequence[dict[str, Any]], out: Path, dataset, measure: MeasureConfig,
                  enc, threads, index) -> dict[str, Any]:
    """Measure every run at matched training loss (see :func:`run_lr_study`); adds
    ``matched_loss_step``, ``matched_loss`` and :data:`MATCHED_FIELDS` to each run (None where
    the run has no log or no kept checkpoint at the target) and returns the target."""
    smooth = {}
    for r in runs:
        if r["status"] != "embedded":
            s = smoothed_losses(run_losses(r["model"]))
            if s:
                smooth[r["name"]] = s
    finals = {name: s[max(s)] for name, s in smooth.items()}
    target_run = max(finals, key=finals.get) if finals else None
    target = finals.get(target_run)
    for r in runs:
        r.update(matched_loss_step=None, matched_loss=None, **dict.fromkeys(MATCHED_FIELDS))
        s = smooth.get(r["name"])
        if s is None:
            continue
        try:
            kept = dict(run_checkpoints(r["model"]))
        except DataError:
            continue
        step = matched_checkpoint(s, list(kept), target)
        if step is None:
            continue
        m = r if step == r["steps"] else measure_checkpoint(
            r["model"], kept[step], dataset, out, name=f"{r['name']}-step{step}",
            config=measure, encoder=enc, threads=threads, index=index)
        r.update(matched_loss_step=step, matched_loss=loss_at(s, step),
                 **{k: m.get(field) for k, field in MATCHED_FIELDS.items()})
    return {"target_loss": target, "target_run": target_run,
            "smoothing": "trailing mean of the last 10 logged training losses (one logged "
                         "batch loss swings with its random timesteps and noise)",
            "rule": "target = the highest final smoothed loss among the runs (the least-"
                    "trained run's end); each run is measured at its first kept checkpoint "
                    "whose smoothed loss is at most the target",
            "note": "runs without a training log or kept checkpoints (the embedded model) "
                    "have none"}


def _deviations(preset: str, steps: int) -> list[str]:
    return [f"{preset}-preset pixel model trained {steps} steps at the base lr (a CPU-sized "
            "model, not Stable Diffusion), AdamW rather than the paper's SGD",
            "detector restricted for speed: noise magnitude + nearest-neighbour copies only, "
            "planted prompts plus a seeded sample of others (see config.measure)",
            "in-domain FID on a ~130-image held-out set with a small in-domain encoder: "
            "comparable between runs of this study, not with published FIDs"]


def _lr_findings(records: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> list[str]:
    out = []
    rs = sorted(records, key=lambda r: r["lr"])
    n = len(config["seeds"])
    out.append(f"Mean and 95% t-interval over {n} seed{'s' if n != 1 else ''} "
               f"({', '.join(map(str, config['seeds']))}): " + "; ".join(
                   f"lr {r['lr']:g} ({r['steps']} steps, {r['status']}): own-image copies "
                   f"{row_ci(r, 'own_copies', True)}, any-image "
                   f"copies {row_ci(r, 'any_copies', True)}, noise "
                   f"AUC {row_ci(r, 'noise_auc', False)}, FID "
                   f"{row_ci(r, 'fid', False)}" for r in rs) + ".")
    if len(rs) >= 2:
        lo, hi = rs[0], rs[-1]
        a, b = lo["own_copies_mean"], hi["own_copies_mean"]
        if a is not None and b is not None:
            verb = "fell" if b < a else ("rose" if b > a else "did not change")
            sep = intervals_apart(lo, hi, "own_copies")
            held = ("samples seen held fixed" if config["schedule"] == "samples"
                    else "the 1/lr rule")
            out.append(f"With {held}, prompt-bound copying {verb} from {_fmt(a, True)} at lr "
                       f"{lo['lr']:g} to {_fmt(b, True)} at lr {hi['lr']:g} (means; "
                       + ("the 95% intervals do not overlap)." if sep else
                          "within the seeds' 95% intervals: not distinguishable with these "
                          "runs)."))
    out += _matched_finding(rs, config.get("matched_loss") or {})
    if any("embedded" in r["status"] for r in rs):
        out.append("The embedded default model stands in for its own run (same preset, "
                   "settings, seed and data fingerprint); its train_seconds is the last training "
                   "session recorded in its model card, not timed by this study.")
    return out + _detector_finding([_means(r) for r in rs])


def _matched_finding(rs: Sequence[Mapping[str, Any]], matched: Mapping[str, Any]) -> list[str]:
    """Whether the lr that copies least does so because it is under-trained: its copies and
    FID at matched loss beside those of the lr that copies most."""
    target = matched.get("target_loss")
    have = [r for r in rs if r.get("own_copies_mean") is not None
            and r.get("own_copies_at_matched_loss_mean") is not None]
    if target is None or len(have) < 2:
        return []
    low = min(have, key=lambda r: (r["own_copies_mean"], r["lr"]))
    high = max(have, key=lambda r: (r["own_copies_mean"], -r["lr"]))
    text = (f"At matched training loss (smoothed loss <= {target:.4g}, the end of "
            f"{matched.get('target_run')}): " + "; ".join(
                f"lr {r['lr']:g} at step {_fmt(r['matched_loss_step_mean'])} (mean) copies "
                f"{row_ci(r, 'own_copies_at_matched_loss', True)}"
                f" of own images, FID "
                f"{row_ci(r, 'fid_at_matched_loss', False)}"
                for r in have) + ".")
    out = [text]
    if low is high or low["own_copies_mean"] == high["own_copies_mean"]:
        return out
    ca, cb = low["own_copies_at_matched_loss_mean"], high["own_copies_at_matched_loss_mean"]
    fa, fb = low["fid_at_matched_loss_mean"], high["fid_at_matched_loss_mean"]
    copies = ("it still copies less at the same loss, so the lower copying is not only "
              "under-training" if ca < cb else
              "at the same loss it copies as much or more, so its lower final copying "
              "reflects under-training")
    if fa is not None and fb is not None:
        worse = fa > fb
        fid_sep = intervals_apart(low, high, "fid_at_matched_loss")
        utility = (f"its FID at that loss is {_fmt(fa)} against {_fmt(fb)} (lower is better): "
                   + ("the lower copying comes with worse utility at the same loss" if worse
                      else "the lower copying does not cost utility at the same loss")
                   + ("" if fid_sep else " (the FID intervals overlap: not distinguishable "
                      "with these seeds)"))
    else:
        utility = "FID at matched loss not measured"
    out.append(f"lr {low['lr']:g} copies least at the end ({_fmt(low['own_copies_mean'], True)} "
               f"vs {_fmt(high['own_copies_mean'], True)} at lr {high['lr']:g}); {copies}; "
               f"{utility}.")
    return out


# ---------------------------------------------------------------------------- mitigations
DEFAULT_METHODS = ("none", "caption_randomization", "deid_randomization", "loss_filter", "dedup")


def run_train_mitigation_study(data, out: str | os.PathLike, *,
                               methods: Sequence[str] = DEFAULT_METHODS,
                               options: Mapping[str, Mapping[str, Any]] | None = None,
                               preset: str = "demo", steps: int | None = None,
                               lr: float | None = None,
                               seeds: Sequence[int] | str = DEFAULT_SEEDS,
                               batch_size: int | None = None,
                               encoder: str | os.PathLike | None = None,
                               measure: MeasureConfig | None = None, checkpoint_every: int = 100,
                               threads: int | None = None,
                               command: Sequence[str] | None = None,
                               index: str | os.PathLike | None = None) -> StudyResult:
    """Training-time mitigations (caption randomization, Somepalli et al. 2023; de-id marker
    randomization; Wen et al.'s 2024 loss filter; near-duplicate de-duplication), each trained
    with the same settings for every seed and measured like :func:`run_lr_study`.

    Parameters
    ----------
    data : path or CXRDataset
    out : path
        Study folder: ``runs/<method>-s<seed>/``, ``measure/<method>-s<seed>/``,
        ``train_mitigations.csv`` (one row per method), ``train_mitigations_runs.csv`` (one row
        per run), ``summary.json``, ``study.json``, ``train_mitigations.png``.
    methods : sequence of str
        Names from :func:`diffmem.study.training.list_training_mitigations`; ``none`` is the
        unmitigated reference (include it to compare).
    options : mapping, optional
        ``{method: {option: value}}`` (e.g. ``{"loss_filter": {"tau": 2.0}}``).
    preset, steps, lr, batch_size : optional
        Trainer settings shared by every run (default: the preset's).
    seeds : sequence of int or str
        Trainer seeds, default 0, 1, 2 (each method is reported as the mean and 95%
        t-interval over them).
    encoder, measure, checkpoint_every, threads, command, index
        As in :func:`run_lr_study`.

    Returns
    -------
    StudyResult
    """
    from diffmem.study.training import get_training_mitigation, list_training_mitigations
    from diffmem.train import TrainConfig

    t0 = time.perf_counter()
    seeds = parse_seeds(seeds)
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
    base = _resolved(TrainConfig(preset=preset, lr=lr, steps=steps, seed=seeds[0],
                                 batch_size=batch_size))
    mits = {name: get_training_mitigation(name, train_set, **dict(options.get(name, {})))
            for name in methods}
    by_method: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
    jobs = [(name, seed) for name in methods for seed in seeds]
    for method, seed in progress(jobs, desc="training mitigations", unit="run"):
        mit = mits[method]
        cfg = TrainConfig(preset=preset, lr=lr, steps=steps, seed=seed, batch_size=batch_size,
                          checkpoint_every=checkpoint_every)
        name = seed_run_name(out / "runs", method, seed)
        info = train_or_resume(mit.data, out / "runs" / name, cfg,
                               caption_transform=mit.caption_transform,
                               loss_filter=mit.loss_filter)
        by_method[method].append({**_run_record(name, method, seed, info, base, len(mit.data)),
                                  "lr": base.lr, **mit.info,
                                  **_measure(name, info, dataset, out, measure, enc, threads,
                                             index)})
    runs = [r for m in methods for r in by_method[m]]
    records = [_pool(by_method[m], {"name": m, "lr": base.lr, "options": dict(mits[m].options),
                                    **mits[m].info}, MITIGATION_METRICS, MITIGATION_COLUMNS)
               for m in methods]
    config = {"preset": preset, "methods": methods, "options": options, "steps": base.steps,
              "lr": base.lr, "batch_size": base.batch_size, "seeds": seeds,
              "encoder": None if enc is None else str(enc), "measure": measure.to_dict(),
              "data": str(dataset.root), "data_fingerprint": train_set.fingerprint(),
              "recorded_run_seconds": _run_seconds(runs),
              "deviations": _deviations(preset, base.steps) + [
                  "Wen et al.'s tau = 2 was set for SD latents (4x64x64); here it applies to "
                  "1x32x32 pixel noise, so it filters less"]}
    return _write_mitigations(records, runs, out, config, t0, command)


def _write_mitigations(records, runs, out: Path, config, t0: float, command) -> StudyResult:
    from diffmem.study import plots

    preset, n = config["preset"], len(config["seeds"])
    fig = plots.plot_metric_bars(
        records, [f"{k}_mean" for k in PLOT_METRICS], out / "train_mitigations.png",
        label="name", err_suffix="_ci95",
        title=f"Training-time mitigations ({preset}, {config['steps']} steps, lr "
              f"{config['lr']:g}, {n} seed{'s' if n != 1 else ''}, mean and 95% CI)").name
    result = StudyResult(
        study="train-mitigations",
        title=f"Training-time mitigations ({preset} preset, {config['steps']} steps, {n} "
              f"seed{'s' if n != 1 else ''})",
        records=records, figures=[fig], findings=_mitigation_findings(records, config),
        config=config, machine=machine_info(), seconds=time.perf_counter() - t0,
        command=list(command) if command else [])
    write_records_csv(out / "train_mitigations_runs.csv", runs,
                      ("name", "setting", "seed", "options") + RUN_COLUMNS[3:])
    result = write_study(result, out, csv_name="train_mitigations.csv",
                         columns=MITIGATION_COLUMNS)
    result.files["runs_csv"] = str(out / "train_mitigations_runs.csv")
    return result


def _mitigation_findings(records: Sequence[Mapping[str, Any]],
                         config: Mapping[str, Any]) -> list[str]:
    out = []
    ref = next((r for r in records if r["name"] == "none"), None)
    for r in records:
        line = (f"{r['name']}: own-image copies "
                f"{row_ci(r, 'own_copies', True)}, any-image copies "
                f"{row_ci(r, 'any_copies', True)}, unconditional "
                f"copies {row_ci(r, 'empty_prompt_copies', True)}"
                f", FID {row_ci(r, 'fid', False)}, "
                f"{_fmt(r['train_seconds_mean'])} s of training")
        if ref is not None and r is not ref and r["own_copies_mean"] is not None \
                and ref["own_copies_mean"] is not None:
            d = r["own_copies_mean"] - ref["own_copies_mean"]
            line += (f" ({'no change' if d == 0 else f'{d:+.0%}'} own-image copies vs. none, "
                     + ("95% intervals apart" if intervals_apart(r, ref, "own_copies")
                        else "within the 95% intervals") + ")")
        if r.get("filtered_samples_mean"):
            line += (f"; the filter dropped {_fmt(r['filtered_samples_mean'])} of "
                     f"{r['samples_seen']} training samples (mean over seeds)")
        if ref is not None and r["train_records"] != ref["train_records"]:
            line += f"; trained on {r['train_records']} of {ref['train_records']} records"
        out.append(line + ".")
    runs = records[0]["runs"] if records else []
    n = runs[0].get("planted_prompts") if runs else None
    k = len(config["seeds"])
    if n:
        out.append(f"Mean and 95% t-interval over {k} seed{'s' if k != 1 else ''} per method "
                   f"and {n} planted prompts per run: one prompt moves a run's copy rate by "
                   f"{1 / n:.0%}; differences inside the intervals are within noise.")
    return out + _detector_finding([_means(r) for r in records])

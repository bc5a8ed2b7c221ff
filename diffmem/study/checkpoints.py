"""Memorization over training: copy rates, noise-magnitude AUC and utility at every checkpoint
of one training run, and the step to stop at (early stopping as a defense: memorization is
learned late, the early-learning phenomenon of Liu et al., NeurIPS 2020, "Early-Learning
Regularization Prevents Memorization of Noisy Labels").

Each checkpoint ``RUN/checkpoints/step-XXXXXXX/`` of a :func:`diffmem.train.train` run becomes a
model folder (the run's pipeline with the checkpoint's weights, EMA weights when the run kept
them, as its final model does) under ``OUT/models/step-XXXXXXX/`` and is measured with
:func:`diffmem.study.measure.measure_model` (``OUT/measure/step-XXXXXXX/``). The recommended
stopping step is the last checkpoint before copying begins: before the first checkpoint whose
planted prompts copy a training image (any-image copy rate above ``tolerance``) or whose
empty-prompt generations do.

Seeds (issue 17): the study trains one run per seed (``OUT/runs/main-s<seed>/``; default seeds
0,1,2), measures every checkpoint of each (``OUT/models/s<seed>/step-XXXXXXX/``,
``OUT/measure/s<seed>/step-XXXXXXX/``) and pools the runs' measurements at each step with
:func:`diffmem.study.seeds.pool_seeds` (mean and 95% t-interval). The recommended stopping
step is computed on the *pooled mean* any-image and empty-prompt copy rates. A given
``--model-run`` is one run, measured alone (one seed, no interval).
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
from diffmem.study.runs import finished_steps, train_or_resume
from diffmem.study.seeds import (DEFAULT_SEEDS, SEED_METRICS, parse_seeds, pool_seeds, row_ci,
                                 seed_run_name)
from diffmem.utils import prepare_out_dir, progress, write_json

log = logging.getLogger(__name__)

__all__ = ["checkpoint_model", "loss_at", "matched_checkpoint", "measure_checkpoint",
           "recommend_stop", "run_checkpoint_study", "run_checkpoints", "run_losses",
           "smoothed_losses"]

#: Measured fields pooled over the seeds' runs at each step (the training loss at the step
#: instead of the final loss and training time).
CHECKPOINT_METRICS = {**{k: v for k, v in SEED_METRICS.items()
                         if k not in ("final_loss", "train_seconds")}, "train_loss": "train_loss"}
RECORD_COLUMNS = ("step", "seeds", *(f"{k}_{x}" for k in CHECKPOINT_METRICS
                                     for x in ("mean", "ci95")),
                  "copying", "planted_prompts", "control_prompts")
PLOT_METRICS = ("own_copies_mean", "any_copies_mean", "empty_prompt_copies_mean",
                "noise_auc_mean", "fid_mean", "train_loss_mean")


def run_checkpoints(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of each checkpoint of a finished training run, oldest first.

    Raises
    ------
    DataError
        When ``run`` is not a finished run (no saved pipeline) or holds no checkpoint.
    """
    from diffmem.train import _list_checkpoints

    run = Path(run)
    if finished_steps(run) is None:
        raise DataError("not a finished training run (no model_index.json and model_card.json "
                        "from `diffmem train`); finish it with `diffmem train --resume` first",
                        path=run)
    found = _list_checkpoints(run)
    if not found:
        raise DataError("the run holds no checkpoint folder (checkpoints/step-*); train with "
                        "--checkpoint-every N --keep-checkpoints M to keep them", path=run)
    return found


def checkpoint_model(run: str | os.PathLike, step_dir: str | os.PathLike,
                     dest: str | os.PathLike) -> Path:
    """A model folder at one checkpoint: the run's pipeline (tokenizer, scheduler, configs)
    with the checkpoint's UNet and text-encoder weights (its EMA weights when present, as the
    run's final model), and a model card saying which step it is. Reused when ``dest`` already
    holds this checkpoint."""
    from safetensors.torch import load_file

    from diffmem.pipelines import CXRDiffusionPipeline

    run, step_dir, dest = Path(run), Path(step_dir), Path(dest)
    state = json.loads((step_dir / "state.json").read_text(encoding="utf-8"))
    weights = step_dir / ("ema.safetensors" if (step_dir / "ema.safetensors").is_file()
                          else "model.safetensors")
    stamp = {"run": str(run.resolve()), "step": int(state["step"]), "weights": weights.name,
             "size": weights.stat().st_size, "mtime_ns": weights.stat().st_mtime_ns}
    card_path = dest / "model_card.json"
    if card_path.is_file() and (dest / "model_index.json").is_file():
        if json.loads(card_path.read_text(encoding="utf-8")).get("checkpoint") == stamp:
            return dest
    pipe = CXRDiffusionPipeline.from_pretrained(str(run))
    tensors = load_file(str(weights))
    for part in ("unet", "text_encoder"):
        prefix = f"{part}."
        getattr(pipe, part).load_state_dict(
            {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    pipe.save_pretrained(str(dest))
    card = json.loads((run / "model_card.json").read_text(encoding="utf-8"))
    card.update(steps=int(state["step"]), checkpoint=stamp)
    write_json(card_path, card)
    return dest


def run_losses(run: str | os.PathLike) -> dict[int, float]:
    """Logged training loss by step (the last record of each step wins: a resumed run)."""
    path = Path(run) / "train_log.jsonl"
    out: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out[int(rec["step"])] = float(rec["loss"])
    return out


#: Logged losses averaged by :func:`smoothed_losses` (trailing window).
SMOOTH_WINDOW = 10


def smoothed_losses(losses: Mapping[int, float], *, window: int = SMOOTH_WINDOW,
                    ) -> dict[int, float]:
    """Trailing mean of the last ``window`` logged losses at each logged step.

    The trainer logs one batch's loss every ``log_every`` steps; a diffusion loss of one batch
    swings with the random timesteps and noise drawn for it, so comparing runs by one logged
    value compares noise. A *trailing* mean (only the steps up to the one it stands for) is
    used, not a centred one, so a checkpoint's smoothed loss never looks at training that came
    after it; with the default ``log_every`` = 10 the window spans the last 100 steps.

    Examples
    --------
    >>> smoothed_losses({10: 4.0, 20: 2.0, 30: 0.0}, window=2)
    {10: 4.0, 20: 3.0, 30: 1.0}
    """
    if window < 1:
        raise ConfigError(f"window={window!r}; use a positive number of logged losses, e.g. 10")
    steps = sorted(losses)
    out: dict[int, float] = {}
    for i, step in enumerate(steps):
        recent = [losses[s] for s in steps[max(0, i - window + 1):i + 1]]
        out[step] = sum(recent) / len(recent)
    return out


def loss_at(smoothed: Mapping[int, float], step: int) -> float | None:
    """The smoothed loss of the newest logged step at or before ``step`` (None before the
    first log)."""
    logged = [s for s in smoothed if s <= step]
    return smoothed[max(logged)] if logged else None


def matched_checkpoint(smoothed: Mapping[int, float], steps: Sequence[int],
                       target: float) -> int | None:
    """The first of the checkpoint ``steps`` whose smoothed loss (:func:`loss_at`) is at most
    ``target``; None when none is.

    Examples
    --------
    >>> matched_checkpoint({10: 3.0, 20: 2.0, 30: 1.5, 40: 1.2}, [20, 40], 1.6)
    40
    >>> matched_checkpoint({10: 3.0, 20: 2.0}, [10, 20], 2.0)
    20
    """
    for step in sorted(steps):
        loss = loss_at(smoothed, step)
        if loss is not None and loss <= target:
            return step
    return None


def measure_checkpoint(run: str | os.PathLike, step_dir: str | os.PathLike, data,
                       out: str | os.PathLike, *, name: str, config: MeasureConfig,
                       encoder=None, threads: int | None = None,
                       index: str | os.PathLike | None = None) -> dict[str, Any]:
    """Measure one checkpoint of a run: its model folder ``OUT/models/<name>/``
    (:func:`checkpoint_model`) measured by :func:`~diffmem.study.measure.measure_model` into
    ``OUT/measure/<name>/`` (both reused on a re-run); returns the measurement's fields and
    ``model``."""
    out = Path(out)
    model = checkpoint_model(run, step_dir, out / "models" / name)
    m = measure_model(model, data, out / "measure" / name, config=config, encoder=encoder,
                      threads=threads, index=index)
    return {"model": str(model), **m.to_dict()}


def recommend_stop(records: Sequence[Mapping[str, Any]], *, tolerance: float = 0.0,
                   ) -> dict[str, Any]:
    """The last checkpoint before copying begins.

    Copying begins at the first checkpoint (by step) whose any-image copy rate of planted
    prompts, or copy rate of empty-prompt generations, exceeds ``tolerance``.

    Returns
    -------
    dict
        ``step`` (None when the first checkpoint already copies), ``copying_begins`` (None when
        no checkpoint copies: then ``step`` is the last one) and ``reason``.

    Examples
    --------
    >>> recs = [{"step": 100, "memorization_rate_any": 0.0, "copy_rate_unconditional": 0.0},
    ...         {"step": 200, "memorization_rate_any": 0.0, "copy_rate_unconditional": None},
    ...         {"step": 300, "memorization_rate_any": 0.5, "copy_rate_unconditional": 0.0}]
    >>> recommend_stop(recs)["step"], recommend_stop(recs)["copying_begins"]
    (200, 300)
    """
    rs = sorted(records, key=lambda r: r["step"])
    first = next((r for r in rs if _copies(r, tolerance)), None)
    if first is None:
        last = rs[-1]["step"] if rs else None
        return {"step": last, "copying_begins": None, "tolerance": tolerance,
                "reason": f"no checkpoint copies (any-image copy rate of planted prompts and "
                          f"empty-prompt copy rate at most {tolerance:g}): the last checkpoint"}
    before = [r for r in rs if r["step"] < first["step"]]
    return {"step": before[-1]["step"] if before else None, "copying_begins": first["step"],
            "tolerance": tolerance,
            "reason": f"copying begins at step {first['step']}" + (
                f"; stop at step {before[-1]['step']}, the checkpoint before it" if before else
                ": the first checkpoint already copies; checkpoint more often")}


def _copies(record: Mapping[str, Any], tolerance: float) -> bool:
    values = [record.get("memorization_rate_any"), record.get("copy_rate_unconditional")]
    return any(v is not None and math.isfinite(float(v)) and float(v) > tolerance
               for v in values)


def run_checkpoint_study(data, out: str | os.PathLike, *, run: str | os.PathLike | None = None,
                         preset: str = "demo", steps: int | None = None,
                         checkpoint_every: int | None = None,
                         seeds: Sequence[int] | str | None = None,
                         lr: float | None = None, batch_size: int | None = None,
                         tolerance: float = 0.0, encoder: str | os.PathLike | None = None,
                         measure: MeasureConfig | None = None, threads: int | None = None,
                         command: Sequence[str] | None = None) -> StudyResult:
    """Memorization over training (Liu et al., NeurIPS 2020: memorization is learned late):
    copy rates (own image, any image, empty and unrelated prompts), noise-magnitude AUC,
    skew and in-domain FID at every checkpoint of one run per seed, pooled over the seeds at
    each step, and the recommended stopping step (:func:`recommend_stop` on the pooled mean
    copy rates).

    Parameters
    ----------
    data : path or CXRDataset
        The run's training data, with ``ground_truth.csv`` and validate/test splits.
    out : path
        Study folder: ``models/s<seed>/step-*/``, ``measure/s<seed>/step-*/``,
        ``checkpoints.csv``, ``summary.json``, ``study.json``, ``checkpoints.png`` (and
        ``runs/main-s<seed>/`` when it trains the runs itself; a finished single-seed
        ``runs/main/`` of an older study trained with that seed is reused).
    run : path, optional
        A finished ``diffmem train`` folder that kept its checkpoints (``--keep-checkpoints``).
        Measured alone (one seed; ``seeds`` may name at most one). Without it, the study trains
        one run per seed (``preset``, ``steps``, ``lr``, ``batch_size``; a checkpoint every
        ``checkpoint_every`` steps, default a tenth of the run, all kept; a killed run
        resumes).
    seeds : sequence of int or str, optional
        Training seeds (default 0,1,2; with ``run``, that run alone).
    tolerance : float
        Any-image copy rate (and empty-prompt copy rate) counted as "not copying yet".
    encoder, measure, threads, command
        As in :func:`diffmem.study.cxr.run_lr_study`.

    Returns
    -------
    StudyResult
        ``records``: one row per checkpoint step, the mean and 95% t-interval over the seeds of
        each measured metric (``<metric>_mean``, ``<metric>_ci95``), the per-seed measurements
        under ``runs``.
    """
    t0 = time.perf_counter()
    if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance={tolerance!r}; use a copy rate in [0, 1), e.g. 0")
    if seeds is not None:
        seeds = parse_seeds(seeds)
    elif run is None:
        seeds = list(DEFAULT_SEEDS)
    if run is not None and seeds is not None and len(seeds) > 1:
        raise ConfigError(f"--model-run {run} is one run but --seeds {seeds} names "
                          f"{len(seeds)}; leave --model-run out to train one run per seed, or "
                          "give one seed")
    measure = measure or MeasureConfig()
    dataset = as_dataset(data)
    out = prepare_out_dir(out, inputs=[dataset.root] + ([Path(run)] if run else []))
    enc = resolve_encoder(encoder)
    runs: list[tuple[int | None, Path, str]] = []
    train_info: list[dict[str, Any]] | None = None
    if run is not None:
        runs.append((None if seeds is None else seeds[0], Path(run), ""))
    else:
        train_info = []
        for seed in seeds:
            path, info = _train_run(dataset, out, preset=preset, steps=steps, lr=lr, seed=seed,
                                    batch_size=batch_size, checkpoint_every=checkpoint_every)
            runs.append((seed, path, f"s{seed}/"))
            train_info.append(info)
    per_step: dict[int, list[dict[str, Any]]] = {}
    for seed, path, prefix in runs:
        for rec in _measure_run(path, dataset, out, prefix, measure=measure, encoder=enc,
                                threads=threads):
            per_step.setdefault(rec["step"], []).append({"seed": seed, **rec})
    records = [_pool_step(step, recs, tolerance) for step, recs in sorted(per_step.items())]
    stop = recommend_stop(records, tolerance=tolerance)
    run = runs[0][1]
    from diffmem.study import plots

    fig = plots.plot_metrics_vs_step(records, PLOT_METRICS, out / "checkpoints.png",
                                     stop=stop["step"], title="memorization and utility over "
                                     f"training ({_runs_name(runs)}, mean over seeds)").name
    result = StudyResult(
        study="checkpoints", title=f"Memorization over training ({_runs_name(runs)}, "
                                   f"{len(records)} checkpoints)",
        records=records, figures=[fig], findings=_findings(records, stop),
        config={"run": str(run), "runs": [str(p) for _, p, _ in runs],
                "seeds": [s for s, _, _ in runs], "trained_here": train_info,
                "tolerance": tolerance,
                "recommended_stop": stop, "measure": measure.to_dict(),
                "encoder": None if enc is None else str(enc), "data": str(dataset.root),
                "data_fingerprint": dataset.subset(split="train").fingerprint(),
                "deviations": ["the stopping step is chosen on the mean copy rates over the "
                               "seeds (one run per seed), not per run",
                               "checkpoints are measured with the restricted study detector "
                               "(see config.measure), not a full `diffmem detect`",
                               "copying is judged per checkpoint from a few generations per "
                               "prompt: a rate of 0 bounds copying, it does not exclude it"]},
        machine=machine_info(), seconds=time.perf_counter() - t0,
        command=list(command) if command else [])
    return write_study(result, out, csv_name="checkpoints.csv", columns=RECORD_COLUMNS)


def _measure_run(run: Path, dataset, out: Path, prefix: str, *, measure: MeasureConfig,
                 encoder, threads) -> list[dict[str, Any]]:
    """Every checkpoint of one run measured (``OUT/measure/<prefix>step-*/``), with its step and
    logged loss."""
    checkpoints = run_checkpoints(run)
    if len(checkpoints) < 2:
        log.warning("%s kept only %d checkpoint(s): the curve has one point; train with "
                    "--keep-checkpoints to keep more", run, len(checkpoints))
    losses = run_losses(run)
    return [{"step": step, "train_loss": losses.get(step),
             **measure_checkpoint(run, folder, dataset, out, name=prefix + folder.name,
                                  config=measure, encoder=encoder, threads=threads)}
            for step, folder in progress(checkpoints, desc=f"checkpoints of {run.name}",
                                         unit="checkpoint")]


def _pool_step(step: int, runs: Sequence[Mapping[str, Any]], tolerance: float,
               ) -> dict[str, Any]:
    """One step's row pooled over the seeds' runs, with ``copying`` judged on the means."""
    row = pool_seeds(runs, {"step": step}, metrics=CHECKPOINT_METRICS)
    row["memorization_rate_any"] = row["any_copies_mean"]  # what recommend_stop reads
    row["copy_rate_unconditional"] = row["empty_prompt_copies_mean"]
    row["copying"] = _copies(row, tolerance)
    row["planted_prompts"] = runs[0].get("planted_prompts")
    row["control_prompts"] = runs[0].get("control_prompts")
    return {**{k: row.get(k) for k in RECORD_COLUMNS}, **row}


def _runs_name(runs) -> str:
    return runs[0][1].name if len(runs) == 1 else f"{len(runs)} seeds"


def _train_run(dataset, out: Path, *, preset, steps, lr, seed, batch_size,
               checkpoint_every) -> tuple[Path, dict[str, Any]]:
    """Train (or resume, or reuse) the study's own run, keeping every checkpoint."""
    from diffmem.pipelines import load_preset
    from diffmem.train import TrainConfig

    base = TrainConfig(preset=preset, steps=steps, lr=lr, seed=seed, batch_size=batch_size)
    total = base.resolved(dict(load_preset(preset).training)).steps
    every = checkpoint_every or max(1, total // 10)
    if every < 1 or every > total:
        raise ConfigError(f"checkpoint_every={every!r}; use 1 to the run's {total} steps")
    cfg = TrainConfig(preset=preset, steps=steps, lr=lr, seed=seed, batch_size=batch_size,
                      checkpoint_every=every, keep_checkpoints=math.ceil(total / every) + 1)
    info = train_or_resume(dataset.subset(split="train"),
                           out / "runs" / seed_run_name(out / "runs", "main", seed), cfg)
    return Path(info.model), {**info.to_dict(), "checkpoint_every": every, "preset": preset}


def _findings(records: Sequence[Mapping[str, Any]], stop: Mapping[str, Any]) -> list[str]:
    rs = sorted(records, key=lambda r: r["step"])
    n = rs[0]["seeds"] if rs else 0
    out = [f"Mean ± 95% t-interval over {n} training run(s), one per seed. "
           + "; ".join(f"step {r['step']}: own-image copies {row_ci(r, 'own_copies')}, any-image "
                       f"{row_ci(r, 'any_copies')}, empty prompt {row_ci(r, 'empty_prompt_copies')}, "
                       f"noise AUC {row_ci(r, 'noise_auc', False)}, FID {row_ci(r, 'fid', False)}"
                       for r in rs) + "."]
    out.append(f"Recommended stopping step: {stop['step'] if stop['step'] is not None else 'none'}"
               f" ({stop['reason']}; on the mean copy rates over the seeds).")
    if stop["step"] is not None and rs and stop["step"] != rs[-1]["step"]:
        at = next(r for r in rs if r["step"] == stop["step"])
        out.append(f"Stopping there costs utility: in-domain FID {row_ci(at, 'fid', False)} "
                   f"against {row_ci(rs[-1], 'fid', False)} at the last step {rs[-1]['step']} "
                   "(lower is better).")
    return out

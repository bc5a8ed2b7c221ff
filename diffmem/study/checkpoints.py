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
from diffmem.utils import prepare_out_dir, progress, write_json

log = logging.getLogger(__name__)

__all__ = ["checkpoint_model", "recommend_stop", "run_checkpoint_study", "run_checkpoints"]

RECORD_COLUMNS = ("step", "train_loss", "memorization_rate_own", "memorization_rate_any",
                  "reid_rate", "reid_rate_not_copies", "reid_rate_own",
                  "copy_rate_unconditional",
                  "copy_rate_unrelated", "control_copy_rate", "noise_magnitude_auc",
                  "nn_similarity_auc", "fid_in_domain", "copy_gini", "copy_top10_share",
                  "copy_top1_share", "copy_threshold", "planted_prompts", "control_prompts",
                  "detect_seconds", "fid_seconds", "copying", "model")
PLOT_METRICS = ("memorization_rate_own", "memorization_rate_any", "copy_rate_unconditional",
                "noise_magnitude_auc", "fid_in_domain", "train_loss")


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


def _losses(run: Path) -> dict[int, float]:
    """Logged training loss by step (the last record of each step wins: a resumed run)."""
    path = run / "train_log.jsonl"
    out: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out[int(rec["step"])] = float(rec["loss"])
    return out


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
                         checkpoint_every: int | None = None, seed: int = 0,
                         lr: float | None = None, batch_size: int | None = None,
                         tolerance: float = 0.0, encoder: str | os.PathLike | None = None,
                         measure: MeasureConfig | None = None, threads: int | None = None,
                         command: Sequence[str] | None = None) -> StudyResult:
    """Memorization over training (Liu et al., NeurIPS 2020: memorization is learned late):
    copy rates (own image, any image, empty and unrelated prompts), noise-magnitude AUC,
    skew and in-domain FID at every checkpoint of one run, and the recommended stopping step
    (:func:`recommend_stop`).

    Parameters
    ----------
    data : path or CXRDataset
        The run's training data, with ``ground_truth.csv`` and validate/test splits.
    out : path
        Study folder: ``models/step-*/``, ``measure/step-*/``, ``checkpoints.csv``,
        ``summary.json``, ``study.json``, ``checkpoints.png`` (and ``runs/main/`` when it
        trains the run itself).
    run : path, optional
        A finished ``diffmem train`` folder that kept its checkpoints (``--keep-checkpoints``).
        Without it, the study trains one (``preset``, ``steps``, ``lr``, ``seed``,
        ``batch_size``; a checkpoint every ``checkpoint_every`` steps, default a tenth of the
        run, all kept; a killed run resumes).
    tolerance : float
        Any-image copy rate (and empty-prompt copy rate) counted as "not copying yet".
    encoder, measure, threads, command
        As in :func:`diffmem.study.cxr.run_lr_study`.

    Returns
    -------
    StudyResult
    """
    t0 = time.perf_counter()
    if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance={tolerance!r}; use a copy rate in [0, 1), e.g. 0")
    measure = measure or MeasureConfig()
    dataset = as_dataset(data)
    out = prepare_out_dir(out, inputs=[dataset.root] + ([Path(run)] if run else []))
    enc = resolve_encoder(encoder)
    train_info = None
    if run is None:
        run, train_info = _train_run(dataset, out, preset=preset, steps=steps, lr=lr, seed=seed,
                                     batch_size=batch_size, checkpoint_every=checkpoint_every)
    run = Path(run)
    checkpoints = run_checkpoints(run)
    if len(checkpoints) < 2:
        log.warning("%s kept only %d checkpoint(s): the curve has one point; train with "
                    "--keep-checkpoints to keep more", run, len(checkpoints))
    losses = _losses(run)
    records = []
    for step, folder in progress(checkpoints, desc="checkpoints", unit="checkpoint"):
        name = folder.name
        model = checkpoint_model(run, folder, out / "models" / name)
        m = measure_model(model, dataset, out / "measure" / name, config=measure,
                          encoder=enc, threads=threads)
        rec = {"step": step, "train_loss": losses.get(step), "model": str(model), **m.to_dict()}
        rec["copying"] = _copies(rec, tolerance)
        records.append(rec)
    stop = recommend_stop(records, tolerance=tolerance)
    from diffmem.study import plots

    fig = plots.plot_metrics_vs_step(records, PLOT_METRICS, out / "checkpoints.png",
                                     stop=stop["step"], title="memorization and utility over "
                                     f"training ({run.name})").name
    result = StudyResult(
        study="checkpoints", title=f"Memorization over training ({run.name}, "
                                   f"{len(records)} checkpoints)",
        records=records, figures=[fig], findings=_findings(records, stop),
        config={"run": str(run), "trained_here": train_info, "tolerance": tolerance,
                "recommended_stop": stop, "measure": measure.to_dict(),
                "encoder": None if enc is None else str(enc), "data": str(dataset.root),
                "data_fingerprint": dataset.subset(split="train").fingerprint(),
                "deviations": ["checkpoints are measured with the restricted study detector "
                               "(see config.measure), not a full `diffmem detect`",
                               "copying is judged per checkpoint from a few generations per "
                               "prompt: a rate of 0 bounds copying, it does not exclude it"]},
        machine=machine_info(), seconds=time.perf_counter() - t0,
        command=list(command) if command else [])
    return write_study(result, out, csv_name="checkpoints.csv", columns=RECORD_COLUMNS)


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
    info = train_or_resume(dataset.subset(split="train"), out / "runs" / "main", cfg)
    return Path(info.model), {**info.to_dict(), "checkpoint_every": every, "preset": preset}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.0%}" if pct else f"{v:.3g}"


def _findings(records: Sequence[Mapping[str, Any]], stop: Mapping[str, Any]) -> list[str]:
    rs = sorted(records, key=lambda r: r["step"])
    out = ["; ".join(f"step {r['step']}: own-image copies {_fmt(r['memorization_rate_own'], True)}"
                     f", any-image {_fmt(r['memorization_rate_any'], True)}, empty prompt "
                     f"{_fmt(r['copy_rate_unconditional'], True)}, noise AUC "
                     f"{_fmt(r['noise_magnitude_auc'])}, FID {_fmt(r['fid_in_domain'])}"
                     for r in rs) + "."]
    out.append(f"Recommended stopping step: {stop['step'] if stop['step'] is not None else 'none'}"
               f" ({stop['reason']}).")
    if stop["step"] is not None and rs and stop["step"] != rs[-1]["step"]:
        at = next(r for r in rs if r["step"] == stop["step"])
        out.append(f"Stopping there costs utility: in-domain FID {_fmt(at['fid_in_domain'])} "
                   f"against {_fmt(rs[-1]['fid_in_domain'])} at the last step {rs[-1]['step']} "
                   "(lower is better).")
    return out

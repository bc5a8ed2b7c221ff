"""Resumable training runs of a study: each run is one trainer output folder
(``DIR/runs/<name>/``). A finished run (its pipeline saved with the planned steps) is skipped,
a killed one resumes from its newest checkpoint with the trainer's exact resume."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmem.errors import TrainingError

log = logging.getLogger(__name__)

__all__ = ["RunInfo", "finished_steps", "train_or_resume"]


@dataclass
class RunInfo:
    """One training run of a study.

    Attributes
    ----------
    model : str
        The model folder.
    status : str
        ``"trained"``, ``"resumed"``, ``"skipped"`` (finished earlier) or ``"embedded"`` (the
        packaged default model stands in).
    final_loss : float
        Last logged training loss.
    train_seconds : float
        Wall time of training: this call's plus earlier sessions' (from ``train_log.jsonl``).
    filtered_samples : int
        Samples a loss filter dropped (0 without one).
    steps : int
    """

    model: str
    status: str
    final_loss: float
    train_seconds: float
    filtered_samples: int
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def finished_steps(folder: Path) -> int | None:
    """Steps of the saved pipeline in ``folder`` (from its model card), None when unfinished."""
    card = Path(folder) / "model_card.json"
    if not (Path(folder) / "model_index.json").is_file() or not card.is_file():
        return None
    return int(json.loads(card.read_text(encoding="utf-8")).get("steps", -1))


def _log_stats(folder: Path) -> tuple[float, float, int]:
    """(last loss, elapsed seconds summed over sessions, filtered samples) from the log."""
    path = Path(folder) / "train_log.jsonl"
    loss, seconds, filtered, last_elapsed = float("nan"), 0.0, 0, 0.0
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            loss = float(rec.get("loss", loss))
            filtered = int(rec.get("filtered", filtered))
            el = float(rec.get("elapsed_s", 0.0))
            if el < last_elapsed:  # a resumed session restarted the clock
                seconds += last_elapsed
            last_elapsed = el
        seconds += last_elapsed
    return loss, seconds, filtered


def _check_finished_settings(folder: Path, data, cfg, hooks: dict[str, Any]) -> None:
    """Refuse a finished run trained with other settings, hooks or data than asked for (its
    last checkpoint's ``state.json`` records them)."""
    from diffmem.train import _list_checkpoints

    checkpoints = _list_checkpoints(folder)
    if not checkpoints:
        return
    saved = json.loads((checkpoints[-1][1] / "state.json").read_text(encoding="utf-8"))
    want = {"data_fingerprint": data.subset(split=cfg.split).fingerprint(), "seed": cfg.seed,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "caption_dropout": cfg.caption_dropout,
            "transform": getattr(hooks["caption_transform"], "__name__", None),
            "loss_filter": getattr(hooks["loss_filter"], "__name__", None),
            "init": None if hooks["init"] is None else str(Path(hooks["init"]).resolve()),
            "adapter": getattr(hooks["adapter"], "name", None)}
    diffs = {k: (saved.get(k), v) for k, v in want.items() if k in saved and saved[k] != v}
    if diffs:
        detail = ", ".join(f"{k}: run {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        raise TrainingError(f"{folder} holds a finished run with other settings ({detail}); use "
                            "another --out for these settings")


def train_or_resume(data, folder: str | Path, config, *, caption_transform=None,
                    loss_filter=None, init=None, adapter=None) -> RunInfo:
    """Train ``config`` into ``folder`` unless it is finished; resume a killed run.

    ``caption_transform``, ``loss_filter``, ``init`` and ``adapter`` are passed to
    :func:`diffmem.train.train`. A finished run with other steps, settings, hooks, starting
    model or data than asked for is refused (``TrainingError``): the study folder belongs to
    other settings.
    """
    from diffmem.pipelines import load_preset
    from diffmem.train import _list_checkpoints, train

    folder = Path(folder)
    cfg = config.resolved(dict(load_preset(config.preset).training))
    steps = cfg.steps
    done = finished_steps(folder)
    if done is not None:
        if done != steps:
            raise TrainingError(f"{folder} holds a finished run of {done} steps but this study "
                                f"asks for {steps}; use another --out or the same --steps")
        _check_finished_settings(folder, data, cfg, {
            "caption_transform": caption_transform, "loss_filter": loss_filter, "init": init,
            "adapter": adapter})
        loss, seconds, filtered = _log_stats(folder)
        return RunInfo(str(folder), "skipped", loss, round(seconds, 1), filtered, done)
    resume = bool(_list_checkpoints(folder))
    t0 = time.time()
    result = train(data, folder, config=config, resume=resume,
                   caption_transform=caption_transform, loss_filter=loss_filter, init=init,
                   adapter=adapter)
    loss, seconds, filtered = _log_stats(folder)
    log.info("%s: %s %d steps in %.0f s", folder.name, "resumed" if resume else "trained",
             result.steps, time.time() - t0)
    return RunInfo(str(folder), "resumed" if resume else "trained", result.final_loss,
                   round(seconds, 1), filtered, result.steps)

"""``diffmem demo``: the whole product on the embedded default, end to end.

Stages run in order and each writes into the demo's output folder:

1. ``data``: synthesize the ``demo`` preset (MIMIC-CXR-JPG layout with planted copies);
2. ``inspect``: summarize it (``inspect.json``) and draw a patient grid (``grid.png``);
3. ``model``: locate the embedded default model (trained by ``diffmem train`` on the same data,
   shipped with the package; see :func:`diffmem.pipelines.default_model_dir`);
4. ``scan``: rank risky prompt tokens, model-free and with the model, and attribute every
   distinct training prompt (``scan/tokens.csv``, ``scan/attributions.jsonl``);
5. ``reid``: the embedded patient re-identification model's verification AUC on the demo's
   held-out patients (``reid/reid_eval.json``, as ``diffmem reid eval`` writes it);
6. ``detect``: noise-magnitude and attention scores for every training prompt, copy verdicts
   from seeded generations against the training images, calibrated on the held-out images, and
   re-ID verdicts on the same generations (the most similar training patient;
   ``detect/scores.csv``, ``reidentified.csv``). To fit the demo's budget the verdicts use one
   generation of 20 DDIM steps per prompt (the detector's defaults are 2 x 25; ``diffmem
   detect`` runs those);
7. ``mitigate``: a fast subset of the inference-time mitigations (:data:`DEMO_MITIGATIONS`)
   on the memorized prompts found in stage 5 and a control set, against the plain pipeline
   (``mitigate/mitigations.csv``, ``pareto.png``); ``diffmem mitigate`` compares them all;
8. ``study``: the score-matching toy study of learning rates (Wu et al. 2025) in 2-D
   (``study/toy/``); the CXR learning-rate sweep trains several models and is left to
   ``diffmem study lr``;
9. ``report``: the privacy report from all of the above (``report/report.html``).

:func:`run_demo` returns what each stage produced and how long it took.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.utils import prepare_out_dir, write_json

log = logging.getLogger(__name__)

DEMO_SYNTH_PRESET = "demo"
DEMO_SEED = 0
DEMO_NN_GENERATIONS = 1
DEMO_SAMPLE_STEPS = 20
#: Initial noises per prompt for the scan's attribution (integrated gradients; the CLI default
#: is 4): 2 found the planted trigger as often as 4 on the trigger benchmark, at half the time.
DEMO_ATTRIBUTION_GENERATIONS = 2
#: The mitigations the demo compares (one per family: embedding noise, prompt text,
#: guidance schedule, cross-attention, de-identification markers).
DEMO_MITIGATIONS = ("gaussian_noise_embedding", "random_number_addition", "guidance_delay",
                    "attention_rescaling", "deid_marker_removal")
#: Prompts per set (memorized, control) and images per prompt in the demo's mitigation
#: comparison (``diffmem mitigate`` defaults: 8 and 2).
DEMO_MITIGATION_PROMPTS = 8
DEMO_MITIGATION_GENERATIONS = 2
#: The detection methods the demo runs (``reid`` judges the ``nn`` generations).
DEMO_DETECT_METHODS = ("noise", "attention", "nn", "reid")
STAGES = ("data", "inspect", "model", "scan", "reid", "detect", "mitigate", "study", "report")


@dataclass
class DemoResult:
    """Where the demo wrote things, and how long each stage took (seconds)."""

    out: str
    artifacts: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> str | None:
        """Path of ``report.html``, once the report stage has run."""
        return self.artifacts.get("report")

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "artifacts": self.artifacts, "seconds": self.seconds,
                "facts": self.facts}


@dataclass
class _Context:
    out: Path
    command: list[str]
    result: DemoResult
    overwrite: bool
    data: Path | None = None
    model: Path | None = None
    device: str | None = None
    dtype: str | None = None


def run_demo(out: str | os.PathLike = "demo-out", *, overwrite: bool = True,
             command: list[str] | None = None, device: str | None = None,
             dtype: str | None = None) -> DemoResult:
    """Run every demo stage into ``out`` and return a :class:`DemoResult`.

    Parameters
    ----------
    out : path
        The demo folder. Its ``data/`` sub-folder is regenerated only when missing (the
        synthetic data is deterministic).
    overwrite : bool
        Replace earlier demo outputs in ``out``.
    command : list of str, optional
        The command line recorded in the results (default ``diffmem demo --out OUT``).
    device, dtype : str, optional
        Device and precision every stage opens the model with (see
        :func:`~diffmem.models.load_model`).
    """
    out = prepare_out_dir(out)
    ctx = _Context(out=out, command=command or ["diffmem", "demo", "--out", str(out)],
                   result=DemoResult(out=str(out)), overwrite=overwrite, device=device,
                   dtype=dtype)
    stages: list[tuple[str, Callable[[_Context], None], str]] = [
        ("data", _data, "synthesizing the demo dataset"),
        ("inspect", _inspect, "inspecting the dataset"),
        ("model", _model, "locating the embedded default model"),
        ("scan", _scan, "ranking risky prompt tokens"),
        ("reid", _reid, "evaluating the patient re-identification model"),
        ("detect", _detect, "detecting memorized prompts and re-identified patients"),
        ("mitigate", _mitigate, "comparing inference-time mitigations"),
        ("study", _study, "learning-rate toy study (Wu et al. 2025)"),
        ("report", _report, "writing the privacy report"),
    ]
    for i, (name, stage, what) in enumerate(stages, start=1):
        log.info("stage %d/%d (%s): %s", i, len(stages), name, what)
        t = time.time()
        stage(ctx)
        ctx.result.seconds[name] = round(time.time() - t, 1)
        write_json(out / "demo.json", ctx.result.to_dict())  # progress survives a crash
    return ctx.result


def _data(ctx: _Context) -> None:
    from diffmem.data.synth import synthesize

    ctx.data = ctx.out / "data"
    if not (ctx.data / "dataset_card.json").exists():
        synthesize(ctx.data, preset=DEMO_SYNTH_PRESET, seed=DEMO_SEED, overwrite=ctx.overwrite)
    else:
        log.info("reusing the synthetic dataset in %s", ctx.data)
    ctx.result.artifacts["data"] = str(ctx.data)


def _inspect(ctx: _Context) -> None:
    from diffmem.data.inspect import inspect_dataset

    summary = inspect_dataset(ctx.data, grid=ctx.out / "grid.png")
    write_json(ctx.out / "inspect.json", summary)
    ctx.result.artifacts.update(inspect=str(ctx.out / "inspect.json"),
                                grid=str(ctx.out / "grid.png"))
    ctx.result.facts["dataset"] = {k: summary.get(k) for k in ("studies", "images", "patients")}


def _model(ctx: _Context) -> None:
    from diffmem.pipelines import default_model_dir

    ctx.model = default_model_dir()
    ctx.result.artifacts["model"] = str(ctx.model)


def _scan(ctx: _Context) -> None:
    from diffmem.attribution.scan import run_scan

    scan, _ = run_scan(ctx.data, out=ctx.out / "scan", model=ctx.model, device=ctx.device,
                       dtype=ctx.dtype, generations=DEMO_ATTRIBUTION_GENERATIONS)
    top = scan.tokens[0] if scan.tokens else {}
    ctx.result.artifacts["scan"] = str(ctx.out / "scan" / "tokens.csv")
    ctx.result.facts["top_token"] = {k: top.get(k) for k in ("token", "score", "is_deid_marker")}


def _reid(ctx: _Context) -> None:
    from diffmem.reid import run_reid_eval

    ev = run_reid_eval(None, ctx.data, ctx.out / "reid", seed=DEMO_SEED)
    ctx.result.artifacts["reid"] = str(ctx.out / "reid" / "reid_eval.json")
    ctx.result.facts["reid"] = {"auc": ev.auc, "tpr_at_1pct_fpr": ev.tpr_at_1pct_fpr,
                                "patients": ev.patients}


def _detect(ctx: _Context) -> None:
    from diffmem.detect.detector import DetectionConfig, detect

    det = detect(ctx.model, ctx.data, ctx.out / "detect",
                 config=DetectionConfig(methods=DEMO_DETECT_METHODS,
                                        nn_generations=DEMO_NN_GENERATIONS,
                                        sample_steps=DEMO_SAMPLE_STEPS),
                 command=ctx.command, device=ctx.device, dtype=ctx.dtype)
    ctx.result.artifacts["detect"] = str(ctx.out / "detect" / "scores.csv")
    ctx.result.facts["detection"] = {
        "rates": det.rates, "reid": det.reid_counts(),
        "evaluations": {k: {"auc": v.auc, "tpr_at_1pct_fpr": v.tpr_at_1pct_fpr}
                        for k, v in det.evaluations.items()}}


def _mitigate(ctx: _Context) -> None:
    from diffmem.mitigate import compare_mitigations

    comparison = compare_mitigations(
        ctx.model, ctx.data, ctx.out / "mitigate", methods=DEMO_MITIGATIONS,
        detect_dir=ctx.out / "detect", n_prompts=DEMO_MITIGATION_PROMPTS,
        generations=DEMO_MITIGATION_GENERATIONS, steps=DEMO_SAMPLE_STEPS, command=ctx.command,
        device=ctx.device, dtype=ctx.dtype)
    facts = comparison.to_dict()
    ctx.result.artifacts["mitigate"] = str(ctx.out / "mitigate" / "mitigations.csv")
    ctx.result.facts["mitigation"] = {k: facts.get(k) for k in ("pareto_front", "recommended")}


def _study(ctx: _Context) -> None:
    from diffmem.study import run_toy_study

    toy = run_toy_study(ctx.out / "study" / "toy", dim=2, seed=DEMO_SEED)
    ctx.result.artifacts["study"] = str(ctx.out / "study" / "toy" / "study.json")
    ctx.result.facts["study"] = {"findings": toy.to_dict().get("findings")}


def _report(ctx: _Context) -> None:
    from diffmem.report import build_report

    report = build_report(ctx.out / "report", model=ctx.model, data=ctx.data,
                          results=ctx.out, overwrite=ctx.overwrite, command=ctx.command,
                          dtype=ctx.dtype)
    ctx.result.artifacts["report"] = str(report.html)
    ctx.result.facts["risk"] = report.to_dict().get("risk")

"""``diffmem demo``: the whole product on the embedded default, end to end.

Stages run in order and each writes into the demo's output folder:

1. ``data``: synthesize the ``demo`` preset (MIMIC-CXR-JPG layout with planted copies);
2. ``inspect``: summarize it (``inspect.json``) and draw a patient grid (``grid.png``);
3. ``model``: locate the embedded default model (trained by ``diffmem train`` on the same data,
   shipped with the package; see :func:`diffmem.pipelines.default_model_dir`);
4. ``scan``: rank risky prompt tokens, model-free and with the model (``scan/tokens.csv``);
5. ``detect``: noise-magnitude and attention scores for every training prompt, and copy
   verdicts from seeded generations against the training images, calibrated on the held-out
   images (``detect/scores.csv``). To fit the demo's budget the verdicts use one generation of
   20 DDIM steps per prompt (the detector's defaults are 4 x 50; ``diffmem detect`` runs those).

Later stages (mitigation, training study, report) join this list as they are built;
:func:`run_demo` returns what each stage produced.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.utils import prepare_out_dir, write_json

log = logging.getLogger(__name__)

DEMO_SYNTH_PRESET = "demo"
DEMO_SEED = 0
DEMO_NN_GENERATIONS = 1
DEMO_SAMPLE_STEPS = 20


@dataclass
class DemoResult:
    """Where the demo wrote things, and how long each stage took (seconds)."""

    out: str
    artifacts: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "artifacts": self.artifacts, "seconds": self.seconds,
                "facts": self.facts}


def run_demo(out: str | os.PathLike = "demo-out", *, overwrite: bool = True) -> DemoResult:
    """Run every demo stage into ``out`` and return a :class:`DemoResult`.

    Parameters
    ----------
    out : path
        The demo folder. Its ``data/`` sub-folder is regenerated only when missing (the
        synthetic data is deterministic).
    overwrite : bool
        Replace earlier demo outputs in ``out``.
    """
    from diffmem.data.inspect import inspect_dataset
    from diffmem.data.synth import synthesize

    out = prepare_out_dir(out)
    result = DemoResult(out=str(out))
    data = out / "data"

    t = time.time()
    if not (data / "dataset_card.json").exists():
        log.info("stage 1/5: synthesizing the %r dataset into %s", DEMO_SYNTH_PRESET, data)
        synthesize(data, preset=DEMO_SYNTH_PRESET, seed=DEMO_SEED, overwrite=overwrite)
    else:
        log.info("stage 1/5: reusing the synthetic dataset in %s", data)
    result.artifacts["data"] = str(data)
    result.seconds["data"] = round(time.time() - t, 1)

    t = time.time()
    log.info("stage 2/5: inspecting the dataset")
    summary = inspect_dataset(data, grid=out / "grid.png")
    write_json(out / "inspect.json", summary)
    result.artifacts.update(inspect=str(out / "inspect.json"), grid=str(out / "grid.png"))
    result.facts["dataset"] = {k: summary.get(k) for k in ("studies", "images", "patients")}
    result.seconds["inspect"] = round(time.time() - t, 1)

    t = time.time()
    log.info("stage 3/5: locating the embedded default model")
    from diffmem.pipelines import default_model_dir

    model = default_model_dir()
    result.artifacts["model"] = str(model)
    result.seconds["model"] = round(time.time() - t, 1)

    t = time.time()
    log.info("stage 4/5: ranking risky prompt tokens")
    from diffmem.attribution.scan import run_scan

    scan, _ = run_scan(data, out=out / "scan", model=model)
    top = scan.tokens[0] if scan.tokens else {}
    result.artifacts["scan"] = str(out / "scan" / "tokens.csv")
    result.facts["top_token"] = {k: top.get(k) for k in ("token", "score", "is_deid_marker")}
    result.seconds["scan"] = round(time.time() - t, 1)

    t = time.time()
    log.info("stage 5/5: detecting memorized prompts")
    from diffmem.detect.detector import DetectionConfig, detect

    det = detect(model, data, out / "detect",
                 config=DetectionConfig(nn_generations=DEMO_NN_GENERATIONS,
                                        sample_steps=DEMO_SAMPLE_STEPS),
                 command=["diffmem", "demo", "--out", str(out)])
    result.artifacts["detect"] = str(out / "detect" / "scores.csv")
    result.facts["detection"] = {"rates": det.rates,
                                 "evaluations": {k: {"auc": v.auc, "tpr_at_1pct_fpr":
                                                     v.tpr_at_1pct_fpr}
                                                 for k, v in det.evaluations.items()}}
    result.seconds["detect"] = round(time.time() - t, 1)

    write_json(out / "demo.json", result.to_dict())
    return result

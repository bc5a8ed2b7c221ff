"""``diffmem demo``: the whole product on the embedded default, end to end.

Stages run in order and each writes into the demo's output folder:

1. ``data``: synthesize the ``demo`` preset (MIMIC-CXR-JPG layout with planted copies);
2. ``inspect``: summarize it (``inspect.json``) and draw a patient grid (``grid.png``);
3. ``model``: locate the embedded default model (trained by ``diffmem train`` on the same data,
   shipped with the package; see :func:`diffmem.pipelines.default_model_dir`).

Later stages (detection, attribution, mitigation, report) join this list as they are built;
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
        log.info("stage 1/3: synthesizing the %r dataset into %s", DEMO_SYNTH_PRESET, data)
        synthesize(data, preset=DEMO_SYNTH_PRESET, seed=DEMO_SEED, overwrite=overwrite)
    else:
        log.info("stage 1/3: reusing the synthetic dataset in %s", data)
    result.artifacts["data"] = str(data)
    result.seconds["data"] = round(time.time() - t, 1)

    t = time.time()
    log.info("stage 2/3: inspecting the dataset")
    summary = inspect_dataset(data, grid=out / "grid.png")
    write_json(out / "inspect.json", summary)
    result.artifacts.update(inspect=str(out / "inspect.json"), grid=str(out / "grid.png"))
    result.facts["dataset"] = {k: summary.get(k) for k in ("studies", "images", "patients")}
    result.seconds["inspect"] = round(time.time() - t, 1)

    t = time.time()
    log.info("stage 3/3: locating the embedded default model")
    from diffmem.pipelines import default_model_dir

    model = default_model_dir()
    result.artifacts["model"] = str(model)
    result.seconds["model"] = round(time.time() - t, 1)

    write_json(out / "demo.json", result.to_dict())
    return result

"""Check attribution against planted triggers: a benchmark whose answer is designed into the data.

The synthetic ``triggers`` preset (:mod:`diffmem.data.synth`, plant kind ``trigger``) repeats one
patient's film under many *different* reports that share one span no other report has (an
un-redacted surname after "Dr."); ``ground_truth.csv`` records it. A model trained there copies
the film when the prompt holds the trigger, so a faithful attribution must rank the trigger first,
and removing it must stop the copying:

* :func:`trigger_prompts`: the distinct training prompts of trigger clusters and their triggers;
* :func:`top_unit_rate`: how often a method's top unit is the trigger (chance is about
  1 / units);
* :func:`removal_copy_rates`: the calibrated copy rate (generated image's nearest training image
  above the held-out threshold of :func:`diffmem.detect.verdicts.prepare_verdicts`, as ``diffmem
  detect`` decides copies) of the prompts as written, with the trigger removed, and with one
  random unit removed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.attribution.markers import segment
from diffmem.attribution.result import TokenAttribution
from diffmem.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["remove_span", "removal_copy_rates", "top_unit_rate", "trigger_prompts"]


def trigger_prompts(root: str | os.PathLike) -> list[tuple[str, str]]:
    """``(prompt, trigger)`` of every distinct training prompt of a trigger cluster.

    Parameters
    ----------
    root : path
        A synthetic dataset with trigger clusters (``diffmem synth --preset triggers``).

    Raises
    ------
    DataError
        When the dataset has no trigger (its ``ground_truth.csv`` has no ``trigger`` value).
    """
    from diffmem.data.synth import read_ground_truth

    rows = read_ground_truth(root).values()
    found = sorted({(r["prompt"], r["trigger"]) for r in rows
                    if r["trigger"] and r["split"] == "train"})
    if not found:
        raise DataError("no trigger in ground_truth.csv; synthesize a dataset with trigger "
                        "clusters (diffmem synth --preset triggers)", path=Path(root))
    return found


def remove_span(prompt: str, start: int, end: int) -> str:
    """``prompt`` without the characters ``start:end``, whitespace collapsed.

    Examples
    --------
    >>> remove_span("Dr. Smith was notified.", 4, 9)
    'Dr. was notified.'
    """
    return " ".join((prompt[:start] + " " + prompt[end:]).split())


def top_unit_rate(attributions: Sequence[TokenAttribution], triggers: Sequence[str]) -> float:
    """Fraction of prompts whose top-ranked unit is (or contains) the prompt's trigger."""
    if len(attributions) != len(triggers) or not attributions:
        raise ConfigError(f"{len(attributions)} attributions for {len(triggers)} triggers; give "
                          "one trigger per attribution (and at least one)")
    return float(np.mean([t in a.top().text for a, t in zip(attributions, triggers)]))


def removal_copy_rates(adapter: Any, prompts: Sequence[str], triggers: Sequence[str], data: Any,
                       *, n_per_prompt: int = 2, sample_steps: int = 20,
                       guidance: float | None = None, seed: int = 0, fpr: float = 0.01,
                       backend: str = "pixel", batch_size: int = 32) -> dict[str, Any]:
    """Calibrated copy rates of prompts as written, without their trigger, and without one
    random unit.

    Every variant is generated ``n_per_prompt`` times; a generation is a copy when its top-1
    similarity to the training images exceeds the threshold calibrated on the dataset's
    held-out (validate and test) images at false-positive rate ``fpr``
    (:func:`~diffmem.detect.verdicts.prepare_verdicts`, ``diffmem detect``'s rule). The random unit
    is drawn uniformly among the prompt's units (:func:`~diffmem.attribution.segment`), seeded
    per prompt, so it is the trigger about once in ``units`` draws.

    Returns
    -------
    dict
        ``{"threshold", "n_prompts", "n_per_prompt", "rates": {"original", "trigger_removed",
        "random_removed"}, "cut": {"trigger_removed", "random_removed"}}``, where a cut is
        ``1 - rate / original rate``.
    """
    from diffmem.data import CXRDataset, load
    from diffmem.detect.neighbors import nearest_neighbors
    from diffmem.detect.scores import default_guidance
    from diffmem.detect.verdicts import prepare_verdicts

    dataset = data if isinstance(data, CXRDataset) else load(data)
    if len(prompts) != len(triggers) or not prompts:
        raise ConfigError(f"{len(prompts)} prompts for {len(triggers)} triggers; give one "
                          "trigger per prompt (and at least one)")
    variants: dict[str, list[str]] = {"original": list(prompts), "trigger_removed": [],
                                      "random_removed": []}
    for i, (prompt, trigger) in enumerate(zip(prompts, triggers)):
        at = prompt.find(trigger)
        if at < 0:
            raise DataError(f"trigger {trigger!r} is not in prompt {prompt!r}")
        variants["trigger_removed"].append(remove_span(prompt, at, at + len(trigger)))
        spans = segment(prompt)
        pick = spans[int(np.random.default_rng([int(seed), i]).integers(len(spans)))]
        variants["random_removed"].append(remove_span(prompt, pick.start, pick.end))
    verdicts = prepare_verdicts(dataset, backend=backend, fpr=fpr,
                                heldout=dataset.subset(split=["validate", "test"]))
    g = default_guidance(adapter) if guidance is None else float(guidance)
    rates = {}
    for name, texts in variants.items():
        sample = adapter.sample(texts, n_per_prompt=n_per_prompt, steps=sample_steps,
                                guidance=g, seed=seed, batch_size=batch_size)
        nn = nearest_neighbors(sample.images, verdicts.reference, backend=verdicts.backend, k=1)
        rates[name] = float(np.mean(verdicts.judge(nn.similarities[:, 0])))
    base = rates["original"]
    cut = {k: (1.0 - rates[k] / base) if base > 0 else float("nan")
           for k in ("trigger_removed", "random_removed")}
    return {"threshold": verdicts.threshold.value, "fpr": fpr, "backend": backend,
            "n_prompts": len(prompts), "n_per_prompt": n_per_prompt,
            "sample_steps": sample_steps, "guidance": g, "rates": rates, "cut": cut}

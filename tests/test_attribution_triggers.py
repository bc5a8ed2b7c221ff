"""Must-show of issue 15 (slow): on the ``triggers`` synthetic data, where the answer is designed
in (one patient's film under 30 different reports sharing one un-redacted surname), a demo-preset
model trained there copies the film for prompts with the surname; attribution must find the
surname and removing it must stop the copying.

Trains a demo-preset model for 1,200 steps (~20 min on 2 idle cores; set
``DIFFMEM_TRIGGER_MODEL`` to
a model folder trained with ``diffmem train --preset demo`` (1,200 steps) on
``diffmem synth --preset triggers --seed 0`` to reuse one).

Measured (December, a 1,200-step model on this data with the trigger in a communication sentence
of the ordinary report grammar, ``planted.trigger_sentence = "grammar"``): integrated gradients put
the trigger first in 40 of 40 prompts (chance 3.6%); deleting the surname cut the copy rate from
100% to 15% (85%), deleting a random unit by 1.7%. With the earlier data (five sentences only the
trigger clusters wrote) the cut was 72%: the sentence recalled the film too. A shorter run may not
copy at all: a step-200 checkpoint copied 0 of 24 generations.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from diffmem.attribution import attribute
from diffmem.attribution.scan import run_scan
from diffmem.attribution.triggers import removal_copy_rates, top_unit_rate, trigger_prompts

pytestmark = pytest.mark.slow

STEPS = 1200


@pytest.fixture(scope="module")
def trigger_data(tmp_path_factory):
    from diffmem.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("triggers") / "data", preset="triggers", seed=0)


@pytest.fixture(scope="module")
def trigger_model(trigger_data, tmp_path_factory):
    from diffmem.models import load_model

    folder = os.environ.get("DIFFMEM_TRIGGER_MODEL")
    if not folder:
        from diffmem.train import TrainConfig, train

        folder = tmp_path_factory.mktemp("triggers") / "model"
        train(trigger_data, folder, config=TrainConfig(preset="demo", steps=STEPS, seed=0))
    return load_model(folder)


@pytest.fixture(scope="module")
def sample(trigger_data):
    pairs = trigger_prompts(trigger_data)
    assert len(pairs) == 180
    rng = np.random.default_rng(0)
    return [pairs[i] for i in sorted(rng.choice(len(pairs), 40, replace=False))]


def test_default_method_ranks_the_trigger_first(trigger_model, sample):
    atts = [attribute(trigger_model, p, generations=4, seed=0) for p, _ in sample]
    rate = top_unit_rate(atts, [t for _, t in sample])
    chance = float(np.mean([1 / len(a.units) for a in atts]))
    assert rate >= 0.8, (rate, chance)


def test_scan_puts_the_pooled_trigger_first(trigger_data, trigger_model, tmp_path):
    result, _ = run_scan(trigger_data, out=tmp_path / "scan", model=trigger_model,
                         max_prompts=100, generations=4, seed=0)
    row = next(r for r in result.tokens if r["token"] == "<phi:name>")
    assert row["rank"] == 1 and row["model_rank"] == 1, result.tokens[:5]
    assert not any(r["function_word"] for r in result.tokens[:1])


def test_removing_the_trigger_stops_the_copying(trigger_data, trigger_model, sample):
    prompts, triggers = [p for p, _ in sample[:30]], [t for _, t in sample[:30]]
    out = removal_copy_rates(trigger_model, prompts, triggers, trigger_data, n_per_prompt=2,
                             sample_steps=20, seed=0)
    assert out["rates"]["original"] > 0.5, out
    assert out["cut"]["trigger_removed"] >= 0.8, out
    assert out["cut"]["random_removed"] <= 0.2, out

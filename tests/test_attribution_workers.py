"""``diffmem scan --model --workers N``: the per-prompt attribution over spawned processes gives
the same tokens and attributions as one process."""

from __future__ import annotations

import numpy as np
import pytest

from diffmem.attribution.scan import scan_prompts
from diffmem.attribution.workers import attribute_prompts, shards
from diffmem.errors import ConfigError


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run one thread each: the same reductions
    yield
    torch.set_num_threads(before)


def test_two_workers_give_the_same_scan_as_one(model, dataset, one_thread):
    from diffmem.models import load_model

    adapter = load_model(model, device="cpu")
    prompts = [s.prompt for s in dataset if s.split == "train"] + ["___ ___"]
    options = dict(adapter=adapter, method="gradient", generations=1, steps=1,
                   max_prompts=5, seed=3, batch_size=4)
    one = scan_prompts(prompts, **options)
    two = scan_prompts(prompts, workers=2, threads=1, **options)
    assert one.tokens == two.tokens
    assert one.summary["model"]["attributed"] == two.summary["model"]["attributed"] >= 3
    assert one.summary["model"]["skipped"] == two.summary["model"]["skipped"]
    assert [a.prompt for a in one.attributions] == [a.prompt for a in two.attributions]
    for a, b in zip(one.attributions, two.attributions):
        assert [u.key for u in a.units] == [u.key for u in b.units]
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.memorization == b.memorization


def test_workers_need_a_model_folder_and_a_positive_count():
    from diffmem.models import load_model
    from diffmem.models.tiny import tiny_stable_diffusion

    sd = load_model(tiny_stable_diffusion(seed=0))
    trajectory = {"generations": 1, "steps": 1, "num_inference_steps": 50, "guidance": None,
                  "seed": 0, "batch_size": 4}
    with pytest.raises(ConfigError, match="needs a model opened from a folder"):
        attribute_prompts(sd, ["a b", "c d"], method="attention", trajectory=trajectory,
                          workers=2)
    with pytest.raises(ConfigError, match="workers"):
        attribute_prompts(sd, ["a b"], method="attention", trajectory=trajectory, workers=0)


def test_shards_are_contiguous_and_cover_everything():
    items = list(range(11))
    for workers in (1, 2, 3, 8, 20):
        parts = shards(items, workers=workers)
        assert [x for p in parts for x in p] == items and all(parts)

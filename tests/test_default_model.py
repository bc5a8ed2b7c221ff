"""The embedded default model: present, loadable, and its card matches the preset and the data."""

from __future__ import annotations

import json

import pytest

from diffmem.pipelines import default_model_dir, load_preset


@pytest.fixture(scope="module")
def card():
    return json.loads((default_model_dir() / "model_card.json").read_text())


def test_card_matches_the_demo_preset(card):
    preset = load_preset("demo")
    assert card["preset"] == "demo"
    assert card["preset_config"]["unet"] == dict(preset.unet)
    assert card["preset_config"]["text_encoder"] == dict(preset.text_encoder)
    # trained with the preset's own defaults, so `diffmem train --preset demo` reproduces it
    for key in ("lr", "steps", "batch_size", "caption_dropout"):
        assert card["training"][key] == preset.training[key], key
    assert card["steps"] == preset.training["steps"]


def test_card_matches_the_demo_data(card, tmp_path):
    """The data fingerprint in the card is that of `diffmem synth --preset demo --seed 0`."""
    from diffmem.data import load
    from diffmem.data.synth import synthesize

    data = synthesize(tmp_path / "demo", preset="demo", seed=0)
    assert load(data).subset(split="train").fingerprint() == card["data"]["fingerprint"]


def test_default_model_loads_and_is_small():
    from diffmem.models import load_model

    folder = default_model_dir()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    assert not list(folder.rglob("*.bin"))
    adapter = load_model(folder)
    assert adapter.kind == "cxr" and adapter.image_size in (32, (32, 32))

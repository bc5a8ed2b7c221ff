"""The embedded default in-domain encoder: present, small, loadable, and its recorded settings and
data fingerprint are those of the demo preset on `diffmem synth --preset demo --seed 0`."""

from __future__ import annotations

import json

import pytest

from diffmem.embed import default_encoder_dir, load_preset


@pytest.fixture(scope="module")
def config():
    return json.loads((default_encoder_dir() / "encoder_config.json").read_text())


def test_config_matches_the_demo_preset(config):
    preset = load_preset("demo")
    assert config["preset"]["name"] == "demo"
    assert config["embed_dim"] == preset.model["embed_dim"]
    assert config["image_size"] == preset.image_size
    for key in ("steps", "batch_size", "lr", "weight_decay"):
        assert config["training"][key] == preset.training[key], key
    assert config["training"]["seed"] == 0
    assert config["training"]["final_loss"] < config["training"]["initial_loss"] / 5


def test_trained_on_the_default_models_data(config, tmp_path):
    """Same fingerprint as `diffmem synth --preset demo --seed 0` and as the default model."""
    from diffmem.data import load
    from diffmem.data.synth import synthesize
    from diffmem.pipelines import default_model_dir

    data = synthesize(tmp_path / "demo", preset="demo", seed=0)
    assert load(data).subset(split="train").fingerprint() == config["data"]["fingerprint"]
    card = json.loads((default_model_dir() / "model_card.json").read_text())
    assert card["data"]["fingerprint"] == config["data"]["fingerprint"]


def test_loads_small_and_embeds():
    import numpy as np

    from diffmem.embed import load_encoder

    folder = default_encoder_dir()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 8 * 2**20
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    enc = load_encoder(folder)
    img = enc.embed_images(np.full((2, 32, 32), 0.5, dtype=np.float32))
    txt = enc.embed_texts(["No acute cardiopulmonary process."])
    assert img.shape == (2, 128) and txt.shape == (1, 128)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, rtol=1e-5)

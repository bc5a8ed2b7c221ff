"""The embedded default re-ID model: present, small, loadable, trained with the demo preset on the
data of the embedded default diffusion model (`diffmem synth --preset demo --seed 0`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffmem.reid import default_reid_dir, load_preset, load_reid_model


@pytest.fixture(scope="module")
def config():
    return json.loads((default_reid_dir() / "reid_config.json").read_text())


def test_config_matches_the_demo_preset(config):
    preset = load_preset("demo")
    assert config["preset"]["name"] == "demo"
    assert config["backbone"] == preset.backbone
    assert config["image_size"] == preset.image_size and config["embed_dim"] == preset.embed_dim
    for key in ("steps", "patients_per_batch", "lr", "temperature"):
        assert config["training"][key] == preset.training[key], key
    assert config["training"]["seed"] == 0
    assert config["training"]["final_loss"] < config["training"]["initial_loss"] / 2
    assert config["validation"]["source"] == "validate split"


#: What `diffmem synth --preset demo --seed 0` gives for the train split since the synthetic
#: renderer works in float64 (commit 93fab72); the slow test below checks it against a fresh
#: synthesis. (The embedded diffusion model and encoder are being retrained on this data; once
#: they are, their recorded fingerprints must equal it too.)
DEMO_TRAIN_FINGERPRINT = "7eeaba47942b7bfb"


def test_trained_on_the_demo_data(config):
    assert config["data"]["fingerprint"] == DEMO_TRAIN_FINGERPRINT
    assert config["data"]["split"] == "train" and config["data"]["records"] == 594
    assert f"data fingerprint `{DEMO_TRAIN_FINGERPRINT}`" in \
        (default_reid_dir() / "README.md").read_text()


@pytest.mark.slow
def test_fingerprint_of_freshly_synthesized_demo_data(config, tmp_path):
    from diffmem.data import load
    from diffmem.data.synth import synthesize

    data = synthesize(tmp_path / "demo", preset="demo", seed=0)
    assert load(data).subset(split="train").fingerprint() == config["data"]["fingerprint"]


def test_loads_small_and_embeds():
    folder = default_reid_dir()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 4 * 2**20
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    model = load_reid_model()
    assert model.path == str(folder)
    emb = model.embed_images(np.full((2, 64, 64), 0.5, dtype=np.float32))
    assert emb.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

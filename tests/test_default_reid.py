"""The embedded default re-ID model: present, small, loadable, trained with the demo preset on the
data of the embedded default diffusion model (`diffmem synth --preset demo --seed 0`, its training
split) joined with a four-times-larger population of the same generator (`diffmem synth --preset
reid --seed 5`) by `scripts/reid_default_manifest.py`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from diffmem.reid import default_reid_dir, load_preset, load_reid_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return json.loads((default_reid_dir() / "reid_config.json").read_text())


def test_config_matches_the_demo_preset_trained_longer(config):
    preset = load_preset("demo")
    assert config["preset"]["name"] == "demo"
    assert config["backbone"] == preset.backbone
    assert config["image_size"] == preset.image_size and config["embed_dim"] == preset.embed_dim
    for key in ("patients_per_batch", "lr", "temperature"):
        assert config["training"][key] == preset.training[key], key
    # `--steps 1500`: 331 training patients instead of the demo data's 73 (see the model card)
    assert config["training"]["steps"] == 1500 and "--steps 1500" in \
        (default_reid_dir() / "README.md").read_text()
    assert config["training"]["seed"] == 0
    assert config["training"]["final_loss"] < config["training"]["initial_loss"] / 2
    assert config["validation"]["source"] == "validate split"
    assert config["validation"]["auc"] > 0.99


#: What `diffmem synth --preset demo --seed 0` gives for the train split since the synthetic
#: renderer works in float64 (commit 93fab72).
DEMO_TRAIN_FINGERPRINT = "7eeaba47942b7bfb"
#: The manifest of scripts/reid_default_manifest.py on that data and `diffmem synth --preset reid
#: --seed 5` (its train split); the slow test below rebuilds it from fresh syntheses.
REID_TRAIN_FINGERPRINT = "eeaa869916478041"


def test_trained_on_the_demo_data_and_the_reid_population(config):
    assert config["data"]["fingerprint"] == REID_TRAIN_FINGERPRINT
    assert config["data"]["format"] == "manifest" and config["data"]["records"] == 1783
    assert config["data"]["trained_patients"] == 331
    card = (default_reid_dir() / "README.md").read_text()
    assert f"data fingerprint `{REID_TRAIN_FINGERPRINT}`" in card
    assert "--preset demo --seed 0" in card and "--preset reid --seed 5" in card


@pytest.mark.slow
def test_fingerprint_of_a_freshly_built_training_manifest(config, tmp_path):
    from diffmem.data import load
    from diffmem.data.synth import synthesize

    spec = importlib.util.spec_from_file_location(
        "reid_default_manifest", ROOT / "scripts" / "reid_default_manifest.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    demo = synthesize(tmp_path / "demo", preset="demo", seed=0)
    assert load(demo).subset(split="train").fingerprint() == DEMO_TRAIN_FINGERPRINT
    pop = synthesize(tmp_path / "pop", preset="reid", seed=5)
    manifest, n = script.write_manifest(Path(demo), Path(pop), tmp_path / "m")
    assert n == 1857  # 1783 train + 74 validate records
    assert load(manifest).subset(split="train").fingerprint() == config["data"]["fingerprint"]


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

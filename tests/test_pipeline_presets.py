"""Model presets: found by name, checked for consistency, built into seeded pipelines."""

from __future__ import annotations

import json
import time

import pytest
import torch

from diffmem.errors import ConfigError
from diffmem.pipelines import build_pipeline, list_presets, load_preset, train_tokenizer
from diffmem.pipelines.presets import PRESET_DIR

CORPUS = ["No acute process. Dr. ___ was notified.", "Comparison XXXX. Heart size normal.",
          "Small left pleural effusion."] * 4


def tok_for(preset):
    p = load_preset(preset)
    return train_tokenizer(CORPUS, vocab_size=p.tokenizer["vocab_size"],
                           model_max_length=p.tokenizer["model_max_length"], min_frequency=1)


def count(module):
    return sum(t.numel() for t in module.parameters())


def test_list_and_load():
    assert list_presets() == ["base", "demo", "tiny"]
    for name in list_presets():
        p = load_preset(name)
        assert p.name == name and p.description
        d = p.to_dict()
        assert set(d) >= {"unet", "text_encoder", "tokenizer", "scheduler", "vae", "training"}
        assert {"lr", "batch_size", "steps", "caption_dropout"} <= set(d["training"])
        assert d["scheduler"]["num_train_timesteps"] == 1000
        assert json.loads(json.dumps(d)) == d
    assert load_preset(PRESET_DIR / "demo.json") == load_preset("demo")


def test_unknown_name_lists_known_presets(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model preset 'huge'; known presets: base, demo, tiny"):
        load_preset("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_preset(tmp_path / "missing.json")


def _write_variant(tmp_path, name="demo", **changes):
    data = json.loads((PRESET_DIR / f"{name}.json").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[leaf]
        else:
            node[leaf] = value
    path = tmp_path / "variant.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, match", [
    ({"unet__cross_attention_dim": 64}, r"cross_attention_dim=64 must equal text_encoder.hidden_size=128"),
    ({"unet__sample_size": 64}, r"unet.sample_size=64 .* set unet.sample_size to 32"),
    ({"unet__in_channels": 3}, r"unet.in_channels=3, expected 1 \(one grayscale channel\)"),
    ({"text_encoder__vocab_size": 500}, r"text_encoder sets vocab_size"),
    ({"training__lr": KeyError}, r"training lacks lr"),
    ({"extra": 1}, r"unknown field\(s\) extra"),
    ({"vae": KeyError}, r"missing field\(s\) vae"),
    ({"resolution": 30}, r"resolution=30; use a positive multiple of 8"),
])
def test_inconsistent_presets_are_refused(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        load_preset(_write_variant(tmp_path, **changes))


def test_latent_preset_checks_vae(tmp_path):
    with pytest.raises(ConfigError, match=r"unet.sample_size=32 .* set unet.sample_size to 64"):
        load_preset(_write_variant(tmp_path, name="base", vae__block_out_channels=[128, 256, 512]))


def test_tiny_preset_builds_and_samples_in_seconds():
    start = time.perf_counter()
    pipe = build_pipeline("tiny", tokenizer=tok_for("tiny"), seed=0)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["Small left pleural effusion.", "Dr. ___ was notified."], num_inference_steps=3,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    elapsed = time.perf_counter() - start
    assert images.shape == (2, 32, 32, 1)
    assert elapsed < 30, f"tiny preset took {elapsed:.1f} s"


def test_build_is_seeded_and_leaves_global_rng_alone():
    tok = tok_for("tiny")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_pipeline("tiny", tokenizer=tok, seed=0)
    torch.testing.assert_close(torch.rand(3), expected_next)
    b = build_pipeline("tiny", tokenizer=tok, seed=0)
    c = build_pipeline("tiny", tokenizer=tok, seed=1)
    for x, y, z in zip(a.unet.parameters(), b.unet.parameters(), c.unet.parameters()):
        torch.testing.assert_close(x, y)
    assert any(not torch.equal(x, z) for x, z in zip(a.unet.parameters(), c.unet.parameters()))
    for x, y in zip(a.text_encoder.parameters(), b.text_encoder.parameters()):
        torch.testing.assert_close(x, y)


def test_text_encoder_follows_tokenizer():
    tok = tok_for("tiny")
    pipe = build_pipeline("tiny", tokenizer=tok, seed=0)
    cfg = pipe.text_encoder.config
    assert cfg.vocab_size == len(tok) and cfg.max_position_embeddings == tok.model_max_length == 32
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, 3, 0)
    assert cfg.hidden_size == pipe.unet.config.cross_attention_dim
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.vae is None


def test_demo_preset_size():
    pipe = build_pipeline("demo", tokenizer=tok_for("demo"), seed=0)
    assert pipe.sample_shape == (1, 32, 32) and pipe.image_size == (32, 32)
    assert 1.3e6 < count(pipe.unet) < 1.6e6
    assert [type(b).__name__ for b in pipe.unet.down_blocks] == [
        "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    assert pipe.text_encoder.config.num_hidden_layers == 2
    assert pipe.text_encoder.config.hidden_size == 128


def test_base_preset_builds_without_allocating():
    from accelerate import init_empty_weights

    tok = tok_for("base")
    with init_empty_weights():
        pipe = build_pipeline("base", tokenizer=tok, seed=0)
    assert pipe.unet.device.type == "meta"
    assert pipe.sample_shape == (4, 32, 32) and pipe.image_size == (256, 256)
    assert 1.0e8 < count(pipe.unet) < 2.0e8
    assert 7e7 < count(pipe.vae) < 1e8
    assert pipe.vae.config.in_channels == 3


def test_build_checks_tokenizer_and_vae():
    tok = tok_for("tiny")
    tok.model_max_length = int(1e30)
    with pytest.raises(ConfigError, match="looks unset"):
        build_pipeline("tiny", tokenizer=tok)
    with pytest.raises(ConfigError, match="works in pixel space"):
        build_pipeline("tiny", tokenizer=tok_for("tiny"), vae=object())


def test_training_defaults_are_sane():
    for name in list_presets():
        t = load_preset(name).training
        assert 0 < t["lr"] < 0.01 and t["batch_size"] >= 1 and t["steps"] >= 1
        assert 0 <= t["caption_dropout"] < 1

"""The in-domain open_clip encoder (train, save/load, embed), its presets, the in-domain Fréchet
distance and alignment score, and ``diffmem embed`` in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from diffmem.cli import main
from diffmem.data import load
from diffmem.embed import (alignment_score, feature_stats, frechet_distance,
                           frechet_distance_from_stats, list_presets, load_preset)
from diffmem.errors import ConfigError, DataError, ModelError, OutputError, PromptError

TINY_STEPS = 30


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from diffmem.data.synth import synthesize

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFMEM_NO_PROGRESS", "1")
        return synthesize(tmp_path_factory.mktemp("embed") / "data", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    from diffmem.embed import train_encoder

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFMEM_NO_PROGRESS", "1")
        out = tmp_path_factory.mktemp("embed") / "enc"
        return train_encoder(tiny_data, out, preset="tiny", steps=TINY_STEPS, seed=0)


def _images(n: int, shape=(32, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape)).astype(np.float32)


# ------------------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_writes_a_pickle_free_folder(trained, tiny_data):
    out = Path(trained.out)
    assert trained.steps == TINY_STEPS and len(trained.losses) == TINY_STEPS
    assert np.isfinite(trained.losses).all()
    assert trained.final_loss < 0.8 * trained.initial_loss
    assert sorted(p.name for p in out.iterdir()) == ["encoder.safetensors", "encoder_config.json",
                                                     "tokenizer"]
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    cfg = json.loads((out / "encoder_config.json").read_text())
    assert cfg["format"] == "diffmem-in-domain-encoder"
    assert cfg["preset"]["name"] == "tiny" and cfg["training"]["seed"] == 0
    assert cfg["training"]["steps"] == TINY_STEPS
    assert cfg["data"]["fingerprint"] == load(tiny_data).subset(split="train").fingerprint()
    assert "open_clip_torch" in cfg["versions"] and "torch" in cfg["versions"]
    text_cfg = cfg["open_clip_model_cfg"]["text_cfg"]
    # our tokenizer: [PAD] = 0, [EOS] = 3, pooled at [EOS] (not open_clip's argmax-of-ids)
    assert (text_cfg["pad_id"], text_cfg["eos_id"], text_cfg["pool_type"]) == (0, 3, "eos")
    assert text_cfg["vocab_size"] == len(trained.encoder.tokenizer)
    assert trained.to_dict()["embed_dim"] == 32 and "encoder" not in trained.to_dict()


def test_save_load_round_trip_gives_identical_embeddings(trained):
    from diffmem.embed import load_encoder

    loaded = load_encoder(trained.out)
    x = _images(5, (40, 40))
    prompts = ["No acute cardiopulmonary process.", "Dr. ___ was notified at ___.", ""]
    np.testing.assert_array_equal(loaded.embed_images(x), trained.encoder.embed_images(x))
    np.testing.assert_array_equal(loaded.embed_texts(prompts), trained.encoder.embed_texts(prompts))
    assert loaded.dim == 32 and loaded.image_size == 32 and loaded.path == trained.out
    # the detector keys its feature cache on the fingerprint: same weights, same id
    assert loaded.fingerprint() == trained.encoder.fingerprint()
    assert len(loaded.fingerprint()) == 16


def test_embeddings_are_unit_norm_with_the_preset_dimension_for_any_image_size(trained):
    enc = trained.encoder
    dim = load_preset("tiny").model["embed_dim"]
    for shape in [(32, 32), (64, 64), (50, 60), (16, 16)]:
        e = enc.embed_images(_images(3, shape))
        assert e.shape == (3, dim) and e.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    t = enc.embed_texts(["Small left pleural effusion.", "No pneumothorax."])
    assert t.shape == (2, dim)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    # callable as the detector's embedding function; (N, 1, H, W) accepted; batching is exact
    x = _images(7)
    np.testing.assert_array_equal(enc(x), enc.embed_images(x))
    np.testing.assert_array_equal(enc(x[:, None]), enc(x))
    np.testing.assert_allclose(enc.embed_images(x, batch_size=2), enc(x), atol=1e-6)
    assert enc.embed_images(np.zeros((0, 32, 32), np.float32)).shape == (0, dim)


def test_text_pooling_and_truncation_keep_eos(trained):
    from diffmem.embed.model import _tokenize

    enc = trained.encoder
    tok = enc.tokenizer
    long = " ".join(["small left pleural effusion"] * 40)
    ids = _tokenize(tok, [long, "No effusion."])
    assert ids.shape == (2, tok.model_max_length)
    assert int(ids[0, -1]) == tok.eos_token_id  # truncated, [EOS] still last
    assert int(ids[1, 0]) == tok.bos_token_id and int(ids[1, -1]) == tok.pad_token_id
    # a prompt's embedding does not depend on what else is in the batch
    alone = enc.embed_texts(["No effusion."])
    np.testing.assert_allclose(enc.embed_texts([long, "No effusion."])[1], alone[0], atol=1e-6)
    # the last word changes the pooled embedding (the [EOS] output sees the whole prompt)
    a, b = enc.embed_texts(["Small left pleural effusion.", "Small left pleural effusion ___"])
    assert not np.allclose(a, b)



def test_text_rows_cut_after_eos_train_and_embed_like_full_padding(tiny_data, tmp_path,
                                                                  monkeypatch):
    """encode_tokens (each row cut after its [EOS]) is a speed-up only: the same losses and
    embeddings as open_clip's encode_text over the padded rows."""
    import torch

    from diffmem.embed import train_encoder
    from diffmem.embed.model import _tokenize, encode_tokens

    monkeypatch.setenv("DIFFMEM_NO_PROGRESS", "1")
    cut = train_encoder(tiny_data, tmp_path / "cut", preset="tiny", steps=4, seed=1)
    monkeypatch.setattr("diffmem.embed.training.encode_tokens",
                        lambda model, ids: model.encode_text(ids, normalize=True))
    full = train_encoder(tiny_data, tmp_path / "full", preset="tiny", steps=4, seed=1)
    np.testing.assert_allclose(cut.losses, full.losses, rtol=1e-5)
    # Compare what the encoders compute, not raw weights: a parameter whose true gradient is 0
    # (the attention key bias: softmax ignores a shift shared by a row) gets rounding noise,
    # which Adam scales up to lr-sized steps in both runs alike, without effect on any output.
    probe = load(tiny_data).prompts[:8]
    np.testing.assert_allclose(cut.encoder.embed_texts(probe), full.encoder.embed_texts(probe),
                               atol=1e-4)
    images = _images(6)
    np.testing.assert_allclose(cut.encoder.embed_images(images),
                               full.encoder.embed_images(images), atol=1e-4)
    enc = cut.encoder
    prompts = load(tiny_data).prompts[:6] + [" ".join(["small left pleural effusion"] * 40)]
    ids = _tokenize(enc.tokenizer, prompts[:6])
    with torch.no_grad():
        short = encode_tokens(enc.model, ids)
        assert short.shape[1] == enc.dim
        # the cut was real: the rows end well before the context length
        assert int((ids == enc.tokenizer.eos_token_id).int().argmax(1).max()) + 1 < ids.shape[1]
        np.testing.assert_allclose(short.numpy(), enc.model.encode_text(ids, normalize=True),
                                   atol=1e-6)
    np.testing.assert_allclose(enc.embed_texts(prompts), enc.model.encode_text(
        _tokenize(enc.tokenizer, prompts), normalize=True).detach().numpy(), atol=1e-6)


def test_bad_inputs_get_clear_errors(trained):
    enc = trained.encoder
    with pytest.raises(DataError, match=r"image\[None\]"):
        enc.embed_images(_images(1)[0])
    with pytest.raises(DataError, match="divide 8-bit"):
        enc.embed_images(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(DataError, match="rescale"):
        enc.embed_images(_images(2) * 2 - 1)
    with pytest.raises(DataError, match="NaN"):
        enc.embed_images(np.full((1, 32, 32), np.nan, np.float32))
    with pytest.raises(PromptError, match="wrap it in a list"):
        enc.embed_texts("No effusion.")
    with pytest.raises(ConfigError, match="batch_size=0"):
        enc.embed_images(_images(2), batch_size=0)


def test_load_encoder_refuses_what_is_not_an_encoder_folder(trained, tmp_path):
    from diffmem.embed import load_encoder

    with pytest.raises(ModelError, match="does not exist"):
        load_encoder(tmp_path / "missing")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(ModelError, match="not an in-domain encoder folder.*diffmem embed train"):
        load_encoder(tmp_path / "pipe")
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = json.loads((Path(trained.out) / "encoder_config.json").read_text())
    (broken / "encoder_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="misses encoder.safetensors, tokenizer/tokenizer.json"):
        load_encoder(broken)
    (broken / "encoder_config.json").write_text(json.dumps({**cfg, "format": "other"}))
    with pytest.raises(ModelError, match="not an in-domain encoder config"):
        load_encoder(broken)
    # weights that do not fit the config
    mismatched = tmp_path / "mismatched"
    shutil.copytree(trained.out, mismatched)
    cfg["open_clip_model_cfg"]["embed_dim"] = 16
    (mismatched / "encoder_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="do not fit the model"):
        load_encoder(mismatched)


def test_train_refuses_to_write_into_the_dataset_and_bad_settings(tiny_data):
    from diffmem.embed import train_encoder

    with pytest.raises(OutputError, match="inside the input"):
        train_encoder(tiny_data, tiny_data / "enc", preset="tiny", steps=1)
    with pytest.raises(ConfigError, match="steps=0"):
        train_encoder(tiny_data, tiny_data.parent / "x", preset="tiny", steps=0)
    with pytest.raises(ConfigError, match="multiple of 32"):
        train_encoder(tiny_data, tiny_data.parent / "x", preset="tiny", image_size=48)
    with pytest.raises(ConfigError, match="torch device"):
        train_encoder(tiny_data, tiny_data.parent / "x", preset="tiny", device="gpu0")
    assert not (tiny_data / "enc").exists() and not (tiny_data.parent / "x").exists()


# -------------------------------------------------------------------------------- presets
def test_presets_are_found_by_name_and_checked(tmp_path):
    assert list_presets() == ["demo", "tiny"]
    assert load_preset("demo").model["embed_dim"] == 128
    with pytest.raises(ConfigError, match="unknown encoder preset 'huge'.*demo, tiny"):
        load_preset("huge")
    data = load_preset("tiny").to_dict()
    data["model"]["text_cfg"]["vocab_size"] = 49408
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="sets vocab_size, which is taken from the tokenizer"):
        load_preset(bad)
    data = load_preset("tiny").to_dict()
    data["training"]["lr"] = -1
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"training.lr=-1"):
        load_preset(bad)


# -------------------------------------------------------------------------------- metrics
def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert expected == pytest.approx(5.0 + 4.0 + 1.0)
    got = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, abs=1e-12)
    # singular covariances (zero variance on one axis) still follow the closed form
    got = frechet_distance_from_stats(mu_a, np.diag([1.0, 0.0, 4.0]),
                                      mu_b, np.diag([4.0, 0.0, 0.0]))
    assert got == pytest.approx(5.0 + 1.0 + 0.0 + 4.0, abs=1e-12)


def test_frechet_distance_on_features_agrees_with_scipy_sqrtm_and_is_zero_for_equal_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.3, size=(300, 6)) @ rng.normal(size=(6, 6))
    mu_a, cov_a = a.mean(0), np.cov(a, rowvar=False)
    mu_b, cov_b = b.mean(0), np.cov(b, rowvar=False)
    ref = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b
                                                - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a + 5.0, b + 5.0) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    a_before = a.copy()
    frechet_distance(a, b)
    np.testing.assert_array_equal(a, a_before)  # inputs untouched


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))
    d = frechet_distance(a, b)  # singular covariances: no complex parts, no warnings
    assert np.isfinite(d) and d > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    mu, cov = feature_stats(a)
    assert mu.shape == (64,) and cov.shape == (64, 64)
    with pytest.raises(DataError, match="same encoder"):
        frechet_distance(a, b[:, :32])
    with pytest.raises(DataError, match="at least 2 samples"):
        frechet_distance(a[:1], b)


def test_alignment_score_is_the_rowwise_cosine():
    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    s = alignment_score(img, txt)
    assert s.shape == (5,)
    ref = [np.dot(i, t) / np.linalg.norm(i) / np.linalg.norm(t) for i, t in zip(img, txt)]
    np.testing.assert_allclose(s, ref, rtol=1e-12)
    np.testing.assert_allclose(alignment_score(img, 3 * img), 1.0)
    with pytest.raises(DataError, match="one text embedding per image"):
        alignment_score(img, txt[:4])


# ------------------------------------------------------------------------------------ CLI
def test_cli_embed_train_and_images_in_process(tiny_data, tmp_path, capsys):
    from safetensors.torch import load_file

    from diffmem.embed import train_encoder

    enc = tmp_path / "enc"
    assert main(["embed", "train", "--data", str(tiny_data), "--out", str(enc), "--preset",
                 "tiny", "--steps", "3", "--seed", "1"]) == 0
    assert "encoder folder" in capsys.readouterr().out
    # the CLI is one library call: same preset, steps and seed give the same weights
    lib = train_encoder(tiny_data, tmp_path / "lib", preset="tiny", steps=3, seed=1)
    a, b = load_file(str(enc / "encoder.safetensors")), load_file(f"{lib.out}/encoder.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    from diffmem.embed import load_encoder

    assert load_encoder(enc).fingerprint() == lib.encoder.fingerprint()

    out = tmp_path / "emb" / "test.npy"
    assert main(["embed", "images", "--encoder", str(enc), "--data", str(tiny_data), "--out",
                 str(out), "--split", "test"]) == 0
    emb = np.load(out)
    n_test = load(tiny_data).split_counts()["test"]
    assert emb.shape == (n_test, 32)
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0] == "row,study_id,image_id,split" and len(rows) == n_test + 1
    assert all(r.endswith(",test") for r in rows[1:])

    assert main(["embed", "images", "--encoder", str(enc), "--data", str(tiny_data), "--out",
                 str(tiny_data / "emb.npy")]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert main(["embed", "images", "--encoder", str(tmp_path), "--data", str(tiny_data),
                 "--out", str(out)]) == 2
    assert "not an in-domain encoder folder" in capsys.readouterr().err
    assert main(["embed", "train", "--list-presets"]) == 0
    listed = capsys.readouterr().out
    assert "tiny" in listed and "demo" in listed
    assert main(["embed"]) == 2

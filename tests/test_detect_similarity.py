"""Similarity backends: registry, hand-computed cases, SSIM against scikit-image, tiled L2
against the global L2 it improves on (Carlini et al., 2023), and the embedding interface."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from conftest import xray
from diffmem.data.images import resize_square
from diffmem.detect import similarity
from diffmem.detect.similarity import (
    SimilarityBackend,
    as_image_batch,
    get_backend,
    list_backends,
    register_backend,
)
from diffmem.errors import ConfigError, DataError


def _pair(backend, a, b):
    """Similarity of two single images."""
    return float(backend.similarity(backend.features(a[None]), backend.features(b[None]))[0, 0])


def test_registry_lists_and_rejects_with_names():
    assert list_backends() == ["embedding", "pixel", "ssim", "tiled_l2"]
    with pytest.raises(ConfigError, match="unknown similarity backend 'l3'; known: embedding, "
                                          "pixel, ssim, tiled_l2"):
        get_backend("l3")
    with pytest.raises(ConfigError, match=r"'pixel' takes no option\(s\) \['grid'\].*'size'"):
        get_backend("pixel", grid=4)
    with pytest.raises(ConfigError, match="size=0"):
        get_backend("pixel", size=0)
    with pytest.raises(ConfigError, match="size=30 is not a multiple of grid=4; use for example"):
        get_backend("tiled_l2", size=30)
    with pytest.raises(ConfigError, match="win_size=6"):
        get_backend("ssim", win_size=6)
    built = get_backend("pixel", size=8)
    assert get_backend(built) is built
    with pytest.raises(ConfigError, match="already built"):
        get_backend(built, size=4)


@pytest.mark.parametrize("name", ["pixel", "tiled_l2", "ssim"])
def test_identical_images_score_the_maximum_and_others_less(name):
    backend = get_backend(name, size=32)
    imgs = np.stack([xray(s, (48, 48)) for s in range(4)]).astype(np.float32)
    s = backend.similarity(backend.features(imgs), backend.features(imgs))
    np.testing.assert_allclose(np.diag(s), backend.max_similarity, atol=1e-7)
    off = s[~np.eye(4, dtype=bool)]
    assert (off < backend.max_similarity - 1e-3).all()
    np.testing.assert_allclose(s, s.T, atol=1e-12)  # all three are symmetric
    np.testing.assert_allclose(backend.to_distance(np.diag(s)), 0.0, atol=1e-6)


def test_pixel_normalized_l2_on_a_hand_case():
    # a = [[1, 0], [0, 0]] centred: [.75, -.25, -.25, -.25], norm sqrt(.75)
    # b = [[1, 1], [0, 0]] centred: [.5, .5, -.5, -.5], norm 1; dot = .5
    a = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    b = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)
    backend = get_backend("pixel", size=None)
    s = _pair(backend, a, b)
    assert s == pytest.approx(0.5 / np.sqrt(0.75), abs=1e-6)
    assert backend.to_distance(np.array(s)) == pytest.approx(np.sqrt(2 - 2 * s), abs=1e-9)
    # blind to brightness and contrast, not to the pattern
    assert _pair(backend, a, 0.5 * a + 0.2) == pytest.approx(1.0, abs=1e-6)
    assert _pair(backend, a, 1.0 - a) == pytest.approx(-1.0, abs=1e-6)
    # a constant image has no pattern: similarity 0 with everything, itself included
    flat = np.full((2, 2), 0.3, np.float32)
    assert _pair(backend, flat, flat) == 0.0 and _pair(backend, a, flat) == 0.0


def test_tiled_l2_on_a_hand_case():
    a = np.zeros((4, 4), np.float32)
    b = a.copy()
    b[:2, 2:] = 0.5  # one 2x2 tile of a 2x2 grid differs by 0.5 everywhere
    backend = get_backend("tiled_l2", size=None, grid=2)
    assert _pair(backend, a, b) == pytest.approx(-0.5)  # max over tiles of the tile RMS
    whole = get_backend("tiled_l2", size=None, grid=1)  # one tile = the global RMS difference
    assert _pair(whole, a, b) == pytest.approx(-np.sqrt(4 * 0.25 / 16))
    assert backend.to_distance(np.array([-0.5])) == pytest.approx([0.5])


def test_tiled_l2_rejects_a_partial_copy_that_global_l2_accepts():
    """Carlini et al.'s point: a copy must match in every tile. A near-exact copy with one
    tile replaced is close in global L2 (the rest dominates) but far in tiled L2, while an
    image that differs a little everywhere ranks the other way round."""
    rng = np.random.default_rng(0)
    query = xray(7, (64, 64)).astype(np.float32)
    one_tile = query.copy()
    one_tile[16:32, 32:48] = rng.random((16, 16))  # one of 16 tiles is noise
    everywhere = np.clip(query + rng.normal(0, 0.1, query.shape), 0, 1).astype(np.float32)
    refs = np.stack([one_tile, everywhere])

    def rms(x, y):
        return np.sqrt(np.mean((x.astype(np.float64) - y) ** 2))

    assert rms(query, one_tile) < rms(query, everywhere)  # global L2 prefers the partial copy
    tiled = get_backend("tiled_l2", size=64, grid=4)
    s = tiled.similarity(tiled.features(query[None]), tiled.features(refs))[0]
    assert s[1] > s[0]  # tiled L2 prefers the image that matches everywhere
    # and the distances are exactly the per-tile maxima
    tiles = [rms(query[i:i + 16, j:j + 16], one_tile[i:i + 16, j:j + 16])
             for i in range(0, 64, 16) for j in range(0, 64, 16)]
    assert -s[0] == pytest.approx(max(tiles), rel=1e-6)


def _ssim_pairs():
    rng = np.random.default_rng(1)
    rand = rng.random((3, 24, 24)).astype(np.float32)
    base = xray(3, (24, 24)).astype(np.float32)
    structured = [base, np.roll(base, 2, axis=1), 0.6 * base + 0.2,
                  np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1).astype(np.float32),
                  np.zeros_like(base), np.ones_like(base)]
    return np.stack([*rand, *structured]).astype(np.float32)


@pytest.mark.parametrize("win_size", [7, 5])
def test_ssim_matrix_equals_scikit_image(win_size):
    imgs = _ssim_pairs()
    backend = get_backend("ssim", size=None, win_size=win_size)
    f = backend.features(imgs)
    s = backend.similarity(f, f[::-1])
    ref = np.array([[structural_similarity(x.astype(np.float64), y.astype(np.float64),
                                           data_range=1.0, win_size=win_size)
                     for y in imgs[::-1]] for x in imgs])
    np.testing.assert_allclose(s, ref, atol=1e-6, rtol=0)
    assert np.ptp(ref) > 0.5  # the cases span a real range of SSIM values


def test_ssim_resizes_like_the_loader_then_matches_scikit_image():
    imgs = np.stack([xray(s, (50, 40)) for s in (1, 2)]).astype(np.float32)
    backend = get_backend("ssim", size=16)
    s = backend.similarity(backend.features(imgs[:1]), backend.features(imgs[1:]))[0, 0]
    a, b = (resize_square(im, 16).astype(np.float64) for im in imgs)
    assert s == pytest.approx(structural_similarity(a, b, data_range=1.0), abs=1e-6)
    assert backend.to_distance(np.array(s)) == pytest.approx(1 - s)


def test_ssim_blocks_give_the_same_matrix(monkeypatch):
    import diffmem.detect.similarity as sim

    imgs = _ssim_pairs()
    backend = get_backend("ssim", size=None)
    f = backend.features(imgs)
    whole = backend.similarity(f, f)
    monkeypatch.setattr(sim, "_BLOCK_ELEMENTS", 1)  # one pair per block
    np.testing.assert_allclose(backend.similarity(f, f), whole, atol=1e-12)


class _QuadrantEncoder:
    """A stand-in for the open_clip encoder: means of the four quadrants, minus 0.5."""

    fingerprint = "quadrants-v1"
    image_size = 8

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        n, h, w = images.shape
        q = images.reshape(n, 2, h // 2, 2, w // 2).mean(axis=(2, 4)).reshape(n, 4)
        return q - 0.5


def test_embedding_backend_is_cosine_of_the_encoder_output():
    imgs = np.stack([xray(s, (8, 8)) for s in range(3)]).astype(np.float32)
    enc = _QuadrantEncoder()
    backend = get_backend("embedding", encoder=enc)
    assert backend.params() == {"backend": "embedding", "encoder": "quadrants-v1"}
    assert backend.image_size == 8
    e = enc.embed_images(imgs).astype(np.float64)
    cos = (e @ e.T) / np.outer(np.linalg.norm(e, axis=1), np.linalg.norm(e, axis=1))
    s = backend.similarity(backend.features(imgs), backend.features(imgs))
    np.testing.assert_allclose(s, cos, atol=1e-6)
    np.testing.assert_allclose(backend.to_distance(s), np.sqrt(np.maximum(2 - 2 * cos, 0)),
                               atol=1e-3)

    # a plain callable returning a torch tensor works too; without an id it is not cacheable
    import torch

    fn_backend = get_backend("embedding",
                             encoder=lambda x: torch.from_numpy(enc.embed_images(x)))
    np.testing.assert_allclose(fn_backend.features(imgs), backend.features(imgs), atol=1e-7)
    assert fn_backend.cache_key() is None and backend.cache_key() is not None


def test_embedding_backend_errors_explain_the_fix():
    with pytest.raises(ConfigError, match="needs an encoder"):
        get_backend("embedding")
    with pytest.raises(ConfigError, match="neither callable nor has an embed_images"):
        get_backend("embedding", encoder=42)
    bad = get_backend("embedding", encoder=lambda x: np.zeros(len(x)))
    with pytest.raises(DataError, match=r"returned shape \(2,\) for 2 images"):
        bad.features(np.zeros((2, 8, 8), np.float32))
    nan = get_backend("embedding", encoder=lambda x: np.full((len(x), 3), np.nan))
    with pytest.raises(DataError, match="NaN or infinite embeddings"):
        nan.features(np.zeros((2, 8, 8), np.float32))


def test_image_batches_are_checked_not_fixed():
    good = np.zeros((2, 8, 8), np.float32)
    assert as_image_batch(good) is good
    with pytest.raises(DataError, match=r"\(N, H, W\).*images\[None\]"):
        as_image_batch(good[0])
    with pytest.raises(DataError, match="dtype uint8.*divide 8-bit data by 255"):
        as_image_batch(good.astype(np.uint8))
    with pytest.raises(DataError, match="NaN or infinite"):
        as_image_batch(np.full((1, 4, 4), np.nan, np.float32))
    with pytest.raises(DataError, match=r"values in \[-0.1, 1\].*clip"):
        as_image_batch(np.array([[[-0.1, 1.0]]], np.float32))
    with pytest.raises(DataError, match="is empty"):
        as_image_batch(np.zeros((0, 8, 8), np.float32))
    with pytest.raises(DataError, match="size=None.*needs square images"):
        get_backend("pixel", size=None).features(np.zeros((1, 4, 6), np.float32))
    pix = get_backend("pixel", size=4)
    with pytest.raises(DataError, match="same backend with the same size"):
        pix.similarity(pix.features(good), get_backend("pixel", size=8).features(good))
    untouched = good.copy()
    pix.features(good)
    np.testing.assert_array_equal(good, untouched)


def test_a_user_backend_registers_by_name():
    class MeanBackend(SimilarityBackend):
        """Minus the difference of mean brightness."""

        name = "mean_test"

        def features(self, images):
            return as_image_batch(images).mean(axis=(1, 2))[:, None].astype(np.float32)

        def similarity(self, query, reference):
            return -np.abs(query.astype(np.float64) - reference[:, 0].astype(np.float64))

        def to_distance(self, similarity):
            return -np.asarray(similarity)

        def params(self):
            return {"backend": self.name}

    assert register_backend(MeanBackend) is MeanBackend
    try:
        assert "mean_test" in list_backends()
        backend = get_backend("mean_test")
        s = backend.similarity(backend.features(np.full((2, 4, 4), [[[0.25]], [[0.75]]])),
                               backend.features(np.full((1, 4, 4), 0.5)))
        np.testing.assert_allclose(s, [[-0.25], [-0.25]])
    finally:
        similarity._BACKENDS.unregister("mean_test")
    assert "mean_test" not in list_backends()
    with pytest.raises(ConfigError, match="has no 'name'"):
        register_backend(type("Nameless", (SimilarityBackend,), {}))


def test_params_identify_the_settings():
    assert get_backend("tiled_l2").params() == {"backend": "tiled_l2", "size": 64, "grid": 4}
    assert get_backend("ssim").params() == {"backend": "ssim", "size": 32, "win_size": 7}
    assert get_backend("pixel").params() == {"backend": "pixel", "size": 32}
    built = get_backend("pixel", size=8)
    assert get_backend(built) is built  # a built backend passes through unchanged
    with pytest.raises(ConfigError, match=r"options \['size'\].*already built 'pixel'"):
        get_backend(built, size=4)
    assert repr(get_backend("pixel", size=16)) == "PixelBackend(size=16)"


@pytest.mark.parametrize("name", ["pixel", "tiled_l2", "ssim"])
def test_paired_similarity_is_each_querys_row_of_the_full_matrix(name):
    """An index's candidates are re-scored per query; the scores must be the entries of the
    full similarity matrix (the cosine backends compute them in one product, the others per
    query)."""
    rng = np.random.default_rng(0)
    backend = get_backend(name, size=16)
    feats = backend.features(rng.random((12, 16, 16)))
    query, cand = feats[:3], rng.integers(0, 12, size=(3, 5))
    full = backend.similarity(query, feats)
    got = backend.paired_similarity(query, feats[cand])
    np.testing.assert_allclose(got, np.take_along_axis(full, cand, 1), rtol=0, atol=1e-12)

"""Nearest neighbours: streaming top-k equals brute force, dataset references with split
filtering and study ids, the .npy feature cache, and FAISS equal to brute force."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import listing
from diffmem.data import load
from diffmem.detect.neighbors import ReferenceFeatures, nearest_neighbors
from diffmem.detect.similarity import get_backend
from diffmem.errors import ConfigError, DataError, MissingDependencyError, OutputError


def _images(n, seed, side=16):
    rng = np.random.default_rng(seed)
    return rng.random((n, side, side), dtype=np.float32)


def _brute(backend, query, reference, k):
    """Top-k by sorting the full similarity matrix (ties: lower index first)."""
    s = backend.similarity(backend.features(query), backend.features(reference))
    idx = np.arange(s.shape[1])
    order = np.array([np.lexsort((idx, -row))[:k] for row in s])
    return order, np.take_along_axis(s, order, 1)


@pytest.mark.parametrize("name,opts", [("pixel", {"size": 8}),
                                       ("tiled_l2", {"size": 8, "grid": 2}),
                                       ("ssim", {"size": 8})])
def test_streaming_topk_equals_brute_force(name, opts):
    query, reference = _images(7, 0), _images(53, 1)
    reference[10] = query[2]  # an exact copy among them
    backend = get_backend(name, **opts)
    result = nearest_neighbors(query, reference, backend=backend, k=3, batch_size=10)
    order, sims = _brute(backend, query, reference, 3)
    np.testing.assert_array_equal(result.indices, order)
    np.testing.assert_allclose(result.similarities, sims, atol=1e-12)
    np.testing.assert_allclose(result.distances, backend.to_distance(sims), atol=1e-12)
    assert result.indices[2, 0] == 10
    assert result.similarities[2, 0] == pytest.approx(backend.max_similarity, abs=1e-6)
    assert (np.diff(result.similarities, axis=1) <= 0).all()
    assert result.study_ids is None and result.n_reference == 53 and result.k == 3
    json.dumps(result.to_dict())


def test_ties_keep_the_lower_index_across_chunks():
    query, reference = _images(1, 2), _images(9, 3)
    reference[[1, 6]] = query[0]  # duplicates in different chunks
    result = nearest_neighbors(query, reference, backend="pixel", size=8, k=2, batch_size=4)
    assert result.indices.tolist() == [[1, 6]]
    np.testing.assert_allclose(result.distances, 0.0, atol=1e-7)


def test_bad_arguments_explain_the_fix():
    q, r = _images(2, 0), _images(3, 1)
    with pytest.raises(ConfigError, match="k=4 but the reference has only 3"):
        nearest_neighbors(q, r, k=4)
    with pytest.raises(ConfigError, match="k=0"):
        nearest_neighbors(q, r, k=0)
    with pytest.raises(ConfigError, match="index='annoy'"):
        nearest_neighbors(q, r, index="annoy")
    with pytest.raises(ConfigError, match="batch_size=0"):
        nearest_neighbors(q, r, batch_size=0)
    with pytest.raises(DataError, match="reference images must be a"):
        nearest_neighbors(q, r[0])
    with pytest.raises(ConfigError, match="already built"):
        nearest_neighbors(q, r, backend=get_backend("pixel"), size=8)


def test_dataset_reference_uses_the_training_split_and_names_studies(mimic_jpg):
    ds = load(mimic_jpg)
    splits = [s.split for s in ds]
    train = [i for i, sp in enumerate(splits) if sp == "train"]
    held = [i for i, sp in enumerate(splits) if sp != "train"]
    query = np.stack([ds.load_image(i, size=32) for i in (train[2], held[0])])
    result = nearest_neighbors(query, ds, backend="pixel", size=32, k=2, batch_size=3)
    # the training image finds itself, with its study id
    assert result.indices[0, 0] == train[2]
    assert result.similarities[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert result.study_ids[0, 0] == ds[train[2]].study_id
    # the held-out image is not in the reference: its neighbours are training records
    assert set(result.indices[1].tolist()) <= set(train)
    assert result.n_reference == len(train)
    # split=None searches every record, so the held-out image now finds itself
    every = nearest_neighbors(query, ds, backend="pixel", size=32, k=1, split=None)
    assert every.indices[1, 0] == held[0]
    with pytest.raises(ConfigError, match="unknown split"):
        nearest_neighbors(query, ds, split="training")
    # a dataset as the query: every record is a query
    as_query = nearest_neighbors(ds.subset(split="train"), ds, backend="pixel", size=32, k=1)
    assert len(as_query) == len(train)


def test_reference_features_cache_is_npy_and_reused(mimic_jpg, tmp_path, monkeypatch):
    ds = load(mimic_jpg)
    before = listing(mimic_jpg)
    backend = get_backend("tiled_l2", size=32, grid=4)
    ref = ReferenceFeatures.from_dataset(ds, backend, cache_dir=tmp_path / "cache",
                                         batch_size=2)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    arr = np.load(tmp_path / "cache" / files[1], allow_pickle=False)
    np.testing.assert_array_equal(arr, ref.features)
    assert listing(mimic_jpg) == before  # nothing written into the dataset

    # the second call reads the cache (memory-mapped) and computes nothing
    monkeypatch.setattr(type(backend), "features",
                        lambda self, images: pytest.fail("features recomputed"))
    again = ReferenceFeatures.from_dataset(ds, backend, cache_dir=tmp_path / "cache")
    assert isinstance(again.features, np.memmap)
    np.testing.assert_array_equal(again.features, ref.features)
    assert again.study_ids.tolist() == ref.study_ids.tolist()
    assert again.indices.tolist() == ref.indices.tolist()
    monkeypatch.undo()

    query = np.stack([ds.load_image(int(i), size=32) for i in ref.indices[:2]])
    from_cache = nearest_neighbors(query, again, backend=backend, k=2)
    direct = nearest_neighbors(query, ds, backend=backend, k=2)
    np.testing.assert_array_equal(from_cache.indices, direct.indices)
    np.testing.assert_allclose(from_cache.similarities, direct.similarities, atol=1e-12)
    assert from_cache.study_ids.tolist() == direct.study_ids.tolist()

    with pytest.raises(ConfigError, match="reference features were made with"):
        nearest_neighbors(query, again, backend="tiled_l2", size=64)
    with pytest.raises(OutputError, match="lies inside the input"):
        ReferenceFeatures.from_dataset(ds, backend, cache_dir=mimic_jpg / "cache")
    (tmp_path / "cache" / files[0]).write_text("{}")
    with pytest.raises(DataError, match="not diffmem reference features"):
        ReferenceFeatures.load(tmp_path / "cache" / files[1])


class _Encoder:
    fingerprint = "toy"

    def embed_images(self, images):
        n = len(images)
        return images.reshape(n, 4, -1).mean(axis=2) - 0.5


@pytest.mark.parametrize("name,opts", [("pixel", {"size": 8}),
                                       ("embedding", {"encoder": _Encoder()})])
def test_faiss_equals_brute_force(name, opts):
    pytest.importorskip("faiss")
    query, reference = _images(6, 4), _images(40, 5)
    reference[17] = query[3]
    backend = get_backend(name, **opts)
    brute = nearest_neighbors(query, reference, backend=backend, k=3, batch_size=7)
    feats = ReferenceFeatures.from_images(reference, backend)
    fast = nearest_neighbors(query, feats, backend=backend, k=3, index="faiss")
    np.testing.assert_array_equal(fast.indices, brute.indices)
    np.testing.assert_allclose(fast.similarities, brute.similarities, atol=1e-12)
    assert fast.indices[3, 0] == 17
    assert feats._faiss_index is not None  # built once, kept for the next call
    again = nearest_neighbors(query[:2], feats, backend=backend, k=1, index="faiss")
    np.testing.assert_array_equal(again.indices[:, 0], brute.indices[:2, 0])


def test_faiss_missing_or_unsuitable(monkeypatch):
    q, r = _images(2, 0), _images(3, 1)
    with pytest.raises(ConfigError, match="inner-product backend.*not 'ssim'"):
        nearest_neighbors(q, r, backend="ssim", size=8, index="faiss")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'diffmem\[faiss\]'"):
        nearest_neighbors(q, r, backend="pixel", size=8, index="faiss")


def test_embedding_backend_with_a_dataset(mimic_jpg, tmp_path, caplog):
    ds = load(mimic_jpg)
    plain = get_backend("embedding", encoder=lambda x: _Encoder().embed_images(x))
    with pytest.raises(ConfigError, match="no image size to load dataset images at"):
        nearest_neighbors(np.zeros((1, 8, 8), np.float32), ds, backend=plain)
    sized = get_backend("embedding", encoder=lambda x: _Encoder().embed_images(x),
                        image_size=16)
    with caplog.at_level("WARNING", logger="diffmem"):
        ref = ReferenceFeatures.from_dataset(ds, sized, cache_dir=tmp_path / "cache")
    assert "not cached on disk" in caplog.text and not list((tmp_path / "cache").glob("*"))
    query = np.stack([ds.load_image(int(ref.indices[1]), size=16)])
    result = nearest_neighbors(query, ref, backend=sized, k=1)
    assert result.indices[0, 0] == ref.indices[1]

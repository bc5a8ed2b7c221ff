"""``diffmem inspect --index``: near-duplicate image clusters from a pixel reference index equal
the all-pairs clusters, chain past the ``k`` cap, and a wrong index is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import listing, save_jpeg, write_table, xray
from diffmem.cli import main
from diffmem.data import load
from diffmem.data.inspect import index_near_duplicates, near_duplicate_clusters, summarize
from diffmem.detect.index import build_index
from diffmem.detect.verdicts import build_backend


def _all_pairs_on_train(dataset, size, threshold):
    """The all-pairs clusters of the training images at the index's thumbnail size, as
    positions in ``dataset``."""
    train = np.array([i for i, s in enumerate(dataset) if s.split == "train"])
    thumbs = np.stack([dataset.load_image(int(i), size=size) for i in train])
    return [train[c].tolist() for c in near_duplicate_clusters(thumbs, threshold=threshold)]


@pytest.mark.parametrize("use_faiss", [False, True, "ivf"])
def test_index_clusters_equal_the_all_pairs_clusters(data, dataset, tmp_path, use_faiss):
    if use_faiss:
        pytest.importorskip("faiss")
    options = {"nlist": 4, "target_recall": 1.0} if use_faiss == "ivf" else {}
    card = build_index(data, tmp_path / "idx", build_backend("pixel", {"size": 32}),
                       batch_size=8, use_faiss=use_faiss, **options)
    assert card.faiss == bool(use_faiss)
    clusters, info = index_near_duplicates(dataset, card.path, threshold=0.1, k=4,
                                           batch_size=7)
    expected = _all_pairs_on_train(dataset, 32, 0.1)
    assert clusters == expected
    # the tiny preset plants two exact-duplicate clusters of 5 copies (its near series is
    # jittered beyond this threshold at 32 px)
    assert sum(len(c) >= 5 for c in clusters) >= 2
    assert info["method"] == "index" and info["k"] == 4 and info["backend_size"] == 32
    assert info["rows"] == card.n == dataset.split_counts()["train"]
    assert (info["approximate"] is not None) == (use_faiss == "ivf")
    if use_faiss == "ivf":
        assert info["approximate"]["kind"] == "ivf"


def _identical_set(root, copies, distinct):
    """A manifest dataset: ``copies`` JPEGs of one image, then ``distinct`` different ones."""
    rows = []
    for n in range(copies + distinct):
        name = f"im{n:02d}.jpg"
        save_jpeg(root / name, xray(0 if n < copies else 100 + n))
        rows.append([name, f"finding number {n}", f"p{n}"])
    return write_table(root / "manifest.csv", ["image", "prompt", "patient_id"], rows)


def test_a_cluster_of_3k_identical_images_stays_one_cluster(tmp_path):
    k = 3
    manifest = _identical_set(tmp_path / "same", copies=3 * k, distinct=3)
    idx = tmp_path / "idx"
    build_index(manifest, idx, build_backend("pixel", {"size": 16}), use_faiss=False)
    ds = load(manifest)
    clusters, _ = index_near_duplicates(ds, idx, threshold=0.1, k=k, batch_size=4)
    assert clusters == [list(range(3 * k))]
    assert clusters == _all_pairs_on_train(ds, 16, 0.1)


def test_cli_index_summary_and_refusals(data, mimic_jpg, tmp_path, capsys):
    before = listing(data)
    idx = tmp_path / "pixel"
    build_index(data, idx, build_backend("pixel", {"size": 24}), batch_size=16, use_faiss=False)
    assert main(["inspect", str(data), "--json", "--index", str(idx), "--near-k", "6"]) == 0
    near = json.loads(capsys.readouterr().out)["near_duplicate_images"]
    assert near["method"] == "index" and near["k"] == 6 and near["split"] == "train"
    assert near["backend_size"] == near["thumb_size"] == 24 and near["approximate"] is None
    assert near["clusters"] >= 2 and near["threshold"] == 0.1
    assert main(["inspect", str(data), "--index", str(idx)]) == 0
    assert "24px thumbnails (the index's size)" in capsys.readouterr().out
    plain = summarize(load(data))["near_duplicate_images"]
    assert plain["method"] == "all_pairs" and plain["thumb_size"] == 16
    assert listing(data) == before

    # an index of other data: refused by the index's staleness check, before images are read
    assert main(["inspect", str(mimic_jpg), "--index", str(idx)]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run" in err and "data: the index was built" in err
    assert "Traceback" not in err
    # another backend: the pixel backend is named
    tiled = tmp_path / "tiled"
    build_index(data, tiled, build_backend("tiled_l2", {"size": 16}), batch_size=16)
    assert main(["inspect", str(data), "--index", str(tiled)]) == 2
    err = capsys.readouterr().err
    assert "holds 'tiled_l2' features" in err and "--backend pixel" in err
    # no index there; a bad k
    assert main(["inspect", str(data), "--index", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(data), "--index", str(idx), "--near-k", "0"]) == 2
    assert "near_k" in capsys.readouterr().err
    assert listing(data) == before

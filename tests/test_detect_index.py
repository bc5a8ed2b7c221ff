"""diffmem.detect.index and ``diffmem index build``: the reference index gives the features and
verdicts of the in-process path, is refused when stale or damaged, resumes an interrupted build,
and is taken by detect (``--index``)."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.detect import index as index_mod
from diffmem.detect.detector import DetectionConfig, detect, prompt_labels
from diffmem.detect.index import build_index, open_index, read_card
from diffmem.detect.neighbors import ReferenceFeatures, nearest_neighbors
from diffmem.detect.similarity import get_backend
from diffmem.detect.verdicts import build_backend, prepare_verdicts
from diffmem.errors import DataError, OutputError
from test_detect_run import _CopyingModel


@pytest.fixture(scope="module")
def pixel_index(data, tmp_path_factory):
    """A pixel (32 px) reference index of the tiny data, with FAISS."""
    pytest.importorskip("faiss")
    out = tmp_path_factory.mktemp("index") / "pixel"
    build_index(data, out, build_backend("pixel"), batch_size=8, use_faiss=True)
    return out


def test_index_holds_the_in_process_features(pixel_index, dataset):
    train = dataset.subset(split="train")
    card = read_card(pixel_index)
    assert (card.n, card.dim, card.faiss) == (len(train), 32 * 32, True)
    assert card.data_fingerprint == train.fingerprint()
    assert card.backend == {"backend": "pixel", "size": 32}
    doc = json.loads((pixel_index / "index.json").read_text())
    assert doc["format"] == "diffmem-reference-index" and doc["faiss"] == "faiss.index"
    backend = get_backend("pixel")
    opened = open_index(pixel_index, train, backend)
    fresh = ReferenceFeatures.from_dataset(train, backend, batch_size=5)
    assert isinstance(opened.features, np.memmap)
    np.testing.assert_array_equal(np.asarray(opened.features), fresh.features)
    np.testing.assert_array_equal(opened.indices, fresh.indices)
    np.testing.assert_array_equal(opened.study_ids, fresh.study_ids)
    assert opened._faiss_index is not None and opened._faiss_index.ntotal == len(train)


@pytest.mark.parametrize("faiss_installed", [True, False])
def test_detect_with_the_index_gives_the_same_verdicts(pixel_index, dataset, tmp_path,
                                                       monkeypatch, caplog, faiss_installed):
    planted = [p for p, y in prompt_labels(dataset).items() if y]
    config = DetectionConfig(methods=("nn",), nn_generations=2, unconditional=3, unrelated=2,
                             confirm="all")
    plain = detect(_CopyingModel(dataset, planted), dataset, tmp_path / "plain", config=config)
    if not faiss_installed:
        monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    caplog.set_level(logging.INFO, logger="diffmem")
    indexed = detect(_CopyingModel(dataset, planted), dataset, tmp_path / "indexed",
                     config=config, index=pixel_index)
    search = "FAISS" if faiss_installed else "blocked exact search"
    assert any("reusing the reference index" in r.getMessage() and search in r.getMessage()
               for r in caplog.records)
    assert indexed.threshold.value == plain.threshold.value
    np.testing.assert_allclose(indexed.null_similarities, plain.null_similarities, atol=1e-12)
    assert len(indexed.prompts) == len(plain.prompts)
    n_copies = 0
    for a, b in zip(plain.prompts, indexed.prompts):
        assert (a.prompt, a.kind, a.memorized) == (b.prompt, b.kind, b.memorized)
        for ga, gb in zip(a.generations, b.generations):
            assert (ga.study_id, ga.study_id2, ga.copy, ga.ratio_copy) == \
                (gb.study_id, gb.study_id2, gb.copy, gb.ratio_copy)
            assert ga.similarity == pytest.approx(gb.similarity, abs=1e-12)
            n_copies += ga.copy
    assert n_copies > 0  # the comparison covers copies (of duplicated training images, ties)
    # the verdict setup that mitigate and study share takes the index the same way
    heldout = dataset.subset(split=["validate", "test"])
    train = dataset.subset(split="train")
    v1 = prepare_verdicts(train, heldout=heldout, fpr=0.1)
    v2 = prepare_verdicts(train, heldout=heldout, fpr=0.1, index=pixel_index)
    assert v1.threshold == v2.threshold


def test_auto_faiss_follows_the_cpu_time_probe(data, tmp_path):
    pytest.importorskip("faiss")
    card = build_index(data, tmp_path / "auto", build_backend("pixel", {"size": 16}))
    probe = json.loads((tmp_path / "auto" / "index.json").read_text())["search_probe"]
    assert probe["rows"] == card.n and probe["queries"] == min(64, card.n)
    assert probe["faiss_faster"] == (probe["faiss_cpu_s"] < probe["blocked_cpu_s"])
    assert card.faiss == probe["faiss_faster"] == (tmp_path / "auto" / "faiss.index").exists()
    off = build_index(data, tmp_path / "off", build_backend("pixel", {"size": 16}),
                      use_faiss=False)
    assert not off.faiss and not (tmp_path / "off" / "faiss.index").exists()


def test_a_stale_index_is_refused_naming_the_difference(pixel_index, dataset):
    train = dataset.subset(split="train")
    with pytest.raises(DataError, match="backend size: the index has 32, this run uses 16.*"
                                        "rebuild it: diffmem index build"):
        open_index(pixel_index, train, get_backend("pixel", size=16))
    with pytest.raises(DataError, match="backend: the index has pixel, this run uses tiled_l2"):
        open_index(pixel_index, train, get_backend("tiled_l2"))
    other = train.subset(indices=range(len(train) - 1))  # one training image fewer
    with pytest.raises(DataError, match="data: the index was built from training data "
                                        f"{train.fingerprint()}"):
        open_index(pixel_index, other, get_backend("pixel"))


def test_damaged_or_missing_index_files(pixel_index, tmp_path, dataset):
    import shutil

    train = dataset.subset(split="train")
    bad = tmp_path / "bad"
    shutil.copytree(pixel_index, bad)
    with open(bad / "features.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match="damaged or truncated.*rebuild it"):
        open_index(bad, train, get_backend("pixel"))
    (bad / "index.json").unlink()
    with pytest.raises(DataError, match="not a reference index.*diffmem index build"):
        open_index(bad, train, get_backend("pixel"))
    with pytest.raises(DataError, match="does not exist"):
        read_card(tmp_path / "nowhere")
    shutil.rmtree(bad)
    shutil.copytree(pixel_index, bad)
    (bad / "faiss.index").write_bytes(b"not faiss")
    with pytest.raises(DataError, match="cannot read the FAISS index"):
        open_index(bad, train, get_backend("pixel"))


def test_an_interrupted_build_resumes(data, tmp_path, monkeypatch, caplog, pixel_index):
    real = index_mod.feature_batches

    def dies_after_two(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(index_mod, "feature_batches", dies_after_two)
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_index(data, out, build_backend("pixel"), batch_size=8)
    assert not (out / "index.json").exists()
    assert json.loads((out / "build.json").read_text())["done"] == 16
    with pytest.raises(DataError, match="unfinished build"):
        read_card(out)
    monkeypatch.setattr(index_mod, "feature_batches", real)
    caplog.set_level(logging.INFO, logger="diffmem")
    card = build_index(data, out, build_backend("pixel"), batch_size=8, use_faiss=True)
    assert any("resuming the index build at image 16" in r.getMessage()
               for r in caplog.records)
    assert not (out / "build.json").exists()
    np.testing.assert_array_equal(np.load(out / "features.npy"),
                                  np.load(pixel_index / "features.npy"))
    assert card.key() == read_card(pixel_index).key()
    # built again: up to date; another backend into the same folder: refused
    assert build_index(data, out, build_backend("pixel")).build_seconds == card.build_seconds
    with pytest.raises(OutputError, match="other data or features.*choose another --out"):
        build_index(data, out, build_backend("pixel", {"size": 16}))


def test_build_refuses_a_folder_with_other_files_and_an_out_inside_the_data(data, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds other files.*notes.txt"):
        build_index(data, tmp_path / "busy", build_backend("pixel"))
    with pytest.raises(OutputError, match="inside"):
        build_index(data, data / "idx", build_backend("pixel"))


def test_tiled_l2_index_has_no_faiss_and_matches(data, dataset, tmp_path):
    backend = build_backend("tiled_l2", {"size": 16})
    card = build_index(data, tmp_path / "t", backend)
    assert not card.faiss and not (tmp_path / "t" / "faiss.index").exists()
    train = dataset.subset(split="train")
    opened = open_index(tmp_path / "t", train, backend)
    query = np.stack([dataset.load_image(i, size=16) for i in range(3)])
    a = nearest_neighbors(query, opened, backend=backend, k=2)
    b = nearest_neighbors(query, train, backend=backend, k=2)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.study_ids, b.study_ids)


def test_faiss_ties_come_in_the_streaming_order():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    reference = rng.random((30, 8, 8), dtype=np.float32)
    reference[[4, 11, 20, 27]] = reference[9]  # five identical training images
    backend = get_backend("pixel", size=8)
    feats = ReferenceFeatures.from_images(reference, backend)
    query = reference[[9, 0]]
    brute = nearest_neighbors(query, reference, backend=backend, k=3)
    fast = nearest_neighbors(query, feats, backend=backend, k=3, index="faiss")
    assert brute.indices[0].tolist() == [4, 9, 11]
    np.testing.assert_array_equal(fast.indices, brute.indices)


def test_cli_build_then_detect_with_the_index(data, model, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert main(["-q", "index", "build", "--data", str(data), "--out", str(idx),
                 "--backend-size", "16"]) == 0
    assert "reference index" in capsys.readouterr().out
    fast = ["--methods", "nn", "--nn-generations", "1", "--sample-steps", "2",
            "--unconditional", "0", "--unrelated", "0", "--confirm", "all"]
    code = main(["-q", "detect", "--model", str(model), "--data", str(data), "--out",
                 str(tmp_path / "d"), "--backend-size", "16", "--index", str(idx), *fast])
    assert code == 0
    # another backend size than the index's: exit 2, the difference named
    code = main(["-q", "detect", "--model", str(model), "--data", str(data), "--out",
                 str(tmp_path / "e"), "--index", str(idx), *fast])
    err = capsys.readouterr().err
    assert code == 2 and "backend size: the index has 16, this run uses 32" in err
    assert main(["-q", "detect", "--model", str(model), "--data", str(data), "--out",
                 str(tmp_path / "f"), "--index", str(tmp_path / "none"), *fast]) == 2
    assert "does not exist" in capsys.readouterr().err


class _Encoder:
    """A stand-in encoder with an identity (a fingerprint) and an input size."""

    image_size = 16

    def __init__(self, fingerprint):
        self.fingerprint = fingerprint

    def embed_images(self, images):
        n = len(images)
        return images.reshape(n, 8, -1).mean(axis=2) - 0.5


def test_embedding_index_is_keyed_by_the_encoder(data, dataset, tmp_path):
    from diffmem.errors import ConfigError

    train = dataset.subset(split="train")
    card = build_index(data, tmp_path / "e", get_backend("embedding", encoder=_Encoder("enc-a")))
    assert card.backend == {"backend": "embedding", "encoder": "enc-a"} and card.dim == 8
    opened = open_index(tmp_path / "e", train, get_backend("embedding",
                                                           encoder=_Encoder("enc-a")))
    assert opened.features.shape == (len(train), 8)
    with pytest.raises(DataError, match="backend encoder: the index has enc-a, this run uses "
                                        "enc-b.*--encoder ENC_DIR"):
        open_index(tmp_path / "e", train, get_backend("embedding", encoder=_Encoder("enc-b")))
    with pytest.raises(ConfigError, match="no stable identity"):
        build_index(data, tmp_path / "n", get_backend("embedding", encoder=_Encoder(None)))

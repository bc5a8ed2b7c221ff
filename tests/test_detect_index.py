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
    assert indexed.threshold.value == pytest.approx(plain.threshold.value, abs=1e-12)
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
    # the index re-scores its candidates per query: the same cosines up to float64 rounding
    assert v1.threshold.value == pytest.approx(v2.threshold.value, abs=1e-12)
    assert (v1.threshold.fpr, v1.threshold.n) == (v2.threshold.fpr, v2.threshold.n)


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


# --- the approximate (IVF) index and `diffmem bench index` ---------------------------------

def _clustered_features(folder, n=2000, dim=16, seed=0):
    """Seeded clustered unit vectors written as ``folder/features.npy``; fresh queries back."""
    from diffmem.detect.bench_index import synthetic_features

    folder.mkdir(parents=True, exist_ok=True)
    return synthetic_features(folder / "features.npy", n, dim, seed=seed, clusters=40,
                              extra=300)


def _synthetic_backend():
    return get_backend("embedding", encoder=lambda x: x, encoder_id="synthetic")


def test_ivf_index_records_the_recall_it_measured(tmp_path):
    faiss = pytest.importorskip("faiss")
    from diffmem.detect.index import finish_index, load_index
    from diffmem.detect.neighbors import search_features

    folder = tmp_path / "ivf"
    query = _clustered_features(folder)
    backend = _synthetic_backend()
    card = finish_index(folder, {"data_fingerprint": "synthetic", "backend": backend.params()},
                        backend, study_ids=np.arange(2000).astype(str), use_faiss="ivf",
                        seed=3)
    a = card.approximate
    assert a["kind"] == "ivf" and a["nlist"] == index_mod.default_nlist(2000) == 51
    assert a["target_recall"] == 0.99 and a["probe_queries"] == 1000
    assert read_card(folder).approximate == a  # recorded in index.json
    # the chosen nprobe is the smallest that reaches the target on the probe
    tried = {int(p): r for p, r in a["recall_by_nprobe"].items()}
    assert a["recall_at_1"] == tried[a["nprobe"]] >= 0.99
    assert a["nprobe"] == 1 or tried[a["nprobe"] - 1] < 0.99
    # the recorded recall, recomputed independently: all-pairs leave-one-out on the probe rows
    feats = np.load(folder / "features.npy")
    rows = np.sort(np.random.default_rng([3, 1]).choice(2000, size=1000, replace=False))
    sims = feats[rows] @ feats.T
    sims[np.arange(1000), rows] = -np.inf
    index = faiss.read_index(str(folder / "faiss.index"))
    assert index.nprobe == a["nprobe"]
    found, ids = index.search(feats[rows], 3)
    found = np.where(ids == rows[:, None], -np.inf, found).max(axis=1)
    assert np.mean(found >= sims.max(axis=1) - 1e-5) == pytest.approx(a["recall_at_1"])
    # fresh queries (not indexed rows): the IVF search against the blocked exact one
    opened = load_index(folder, backend)
    assert opened.source["approximate"] == a
    _, approx = search_features(query, opened, backend=backend, k=2)
    _, exact = search_features(query, opened, backend=backend, k=2, index="brute")
    assert np.mean(approx[:, 0] == exact[:, 0]) >= 0.97


@pytest.mark.parametrize("faiss_installed", [True, False])
def test_detect_with_an_ivf_index_gives_the_exact_verdicts(data, dataset, tmp_path,
                                                           monkeypatch, faiss_installed):
    pytest.importorskip("faiss")
    out = tmp_path / "ivf"
    card = build_index(data, out, build_backend("pixel"), batch_size=8, use_faiss="ivf",
                       nlist=4, target_recall=1.0)
    assert card.faiss and card.approximate["nlist"] == 4
    assert card.approximate["recall_at_1"] == 1.0  # a fixture where the probe finds them all
    planted = [p for p, y in prompt_labels(dataset).items() if y]
    config = DetectionConfig(methods=("nn",), nn_generations=2, unconditional=3, unrelated=2,
                             confirm="all")
    plain = detect(_CopyingModel(dataset, planted), dataset, tmp_path / "plain", config=config)
    if not faiss_installed:  # then the folder's features are searched exactly
        monkeypatch.setitem(sys.modules, "faiss", None)
    indexed = detect(_CopyingModel(dataset, planted), dataset, tmp_path / "indexed",
                     config=config, index=out)
    said = [w for w in indexed.warnings if "approximate FAISS IVF" in w]
    assert len(said) == (1 if faiss_installed else 0)
    if said:
        assert "recall@1 1.0000" in said[0] and "nearest training image is missed" in said[0]
    assert indexed.threshold.value == pytest.approx(plain.threshold.value, abs=1e-12)
    n_copies = n_missed = 0
    for a, b in zip(plain.prompts, indexed.prompts, strict=True):
        for ga, gb in zip(a.generations, b.generations, strict=True):
            assert ga.copy == gb.copy  # the verdicts are the exact ones
            n_copies += ga.copy
            if ga.study_id == gb.study_id:
                assert ga.similarity == pytest.approx(gb.similarity, abs=1e-12)
            else:  # a neighbour can differ only where IVF missed the nearest (never a copy
                # here: a copy's nearest training image sits in the generation's own list)
                assert gb.similarity < ga.similarity and not ga.copy and faiss_installed
                n_missed += 1
    assert n_copies > 0
    assert n_missed < sum(len(a.generations) for a in plain.prompts) / 2


def test_ivf_bad_input_is_one_clear_message(data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("faiss")
    base = ["-q", "index", "build", "--data", str(data), "--faiss", "ivf"]
    assert main([*base, "--out", str(tmp_path / "a"), "--backend", "tiled_l2"]) == 2
    err = capsys.readouterr().err
    assert "--faiss ivf needs an inner-product backend" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()  # refused before anything is written
    assert main([*base, "--out", str(tmp_path / "b"), "--nlist", "100000"]) == 2
    err = capsys.readouterr().err
    assert "nlist=100000 but the index has" in err and "Traceback" not in err
    assert main([*base, "--out", str(tmp_path / "c"), "--target-recall", "1.5"]) == 2
    assert "target_recall=1.5; use a recall in (0, 1]" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert main([*base, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--faiss ivf needs faiss: pip install faiss-cpu" in err and "Traceback" not in err


def test_the_block_merge_keeps_exact_ties_in_index_order():
    from diffmem.detect.neighbors import _merge_topk

    rng = np.random.default_rng(0)
    for trial in range(200):
        k, c = int(rng.integers(1, 4)), int(rng.integers(1, 20))
        s = rng.integers(0, int(rng.integers(1, 5)), (5, c)).astype(float)  # many ties
        i = np.arange(c) + 100
        best_s = -np.sort(-rng.integers(0, 3, (5, k)).astype(float), axis=1)
        best_i = rng.integers(0, 1000, (5, k))
        cand_s = np.concatenate([best_s, s], 1)
        cand_i = np.concatenate([best_i, np.broadcast_to(i, s.shape)], 1)
        order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]  # the full sort, by hand
        got_s, got_i = _merge_topk(best_s, best_i, s, i, k)
        np.testing.assert_array_equal(got_s, np.take_along_axis(cand_s, order, 1))
        np.testing.assert_array_equal(got_i, np.take_along_axis(cand_i, order, 1))


def test_bench_index_small(tmp_path, capsys):
    pytest.importorskip("faiss")
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", "index", "--rows", "5000", "--dim", "32", "--queries", "200",
                 "--clusters", "50", "--seed", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "seed 1, 5000 x 32 float32 vectors (Gaussian mixture of 50 clusters" in text
    assert "brute force (NumPy)" in text and "FAISS IVF (approx.)" in text
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["methods"]}
    assert list(rows) == ["brute", "blocked", "faiss_flat", "faiss_ivf"]
    assert rows["brute"]["ratio"] == 1.0 and rows["brute"]["recall_at_1"] == 1.0
    assert rows["blocked"]["recall_at_1"] == rows["faiss_flat"]["recall_at_1"] == 1.0
    assert rows["faiss_ivf"]["recall_at_1"] >= 0.95  # fresh queries; 0.99 targeted on the probe
    build = doc["build"]
    assert build["approximate"]["recall_at_1"] >= 0.99 and build["seconds"] > 0
    assert build["peak_rss_mib"] >= build["start_rss_mib"] > 0
    for r in doc["methods"]:
        assert r["queries_per_second"] > 0 and r["peak_rss_mib"] > 0
        assert r["ratio"] == pytest.approx(r["queries_per_second"]
                                           / rows["brute"]["queries_per_second"], rel=0.02,
                                           abs=0.01)  # both rounded
        assert r["cpu_ratio"] == pytest.approx(rows["brute"]["search_cpu_seconds"]
                                               / r["search_cpu_seconds"], rel=0.05,
                                               abs=0.01)
    assert doc["machine"]["cpus"] and doc["rows"] == 5000 and doc["seed"] == 1


def test_add_exactly_builds_the_lists_faiss_add_builds(tmp_path):
    faiss = pytest.importorskip("faiss")
    from diffmem.detect.index import add_exactly

    feats = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    ours = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 16, faiss.METRIC_INNER_PRODUCT)
    ours.train(feats[:1000])
    theirs = faiss.clone_index(ours)
    add_exactly(faiss, ours, tmp_path / "f.npy")
    theirs.add(feats)
    assert ours.ntotal == theirs.ntotal == 3000
    for list_no in range(16):
        assert faiss.rev_swig_ptr(ours.invlists.get_ids(list_no), ours.invlists.list_size(
            list_no)).tolist() == faiss.rev_swig_ptr(theirs.invlists.get_ids(list_no),
                                                     theirs.invlists.list_size(list_no)).tolist()
    ours.nprobe = theirs.nprobe = 3
    np.testing.assert_array_equal(ours.search(feats[:50], 4)[1], theirs.search(feats[:50], 4)[1])

"""``diffmem scan`` at scale: the MinHash LSH near-duplicate search against the exhaustive one,
sentence pieces that segment like the whole prompt, streamed input and bad prompt files."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from datasketch import MinHash
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from diffmem.attribution import near_duplicate_pairs, prompt_clusters, read_prompts, scan_prompts
from diffmem.attribution.markers import find_markers, segment, split_pieces
from diffmem.attribution.scan import _minhash_signatures, _read_corpus, _tfidf
from diffmem.cli import main
from diffmem.data.synth.prompts import synthetic_prompts, write_synthetic_prompts
from diffmem.errors import ConfigError, DataError


def _tfidf_of(prompts):
    corpus = _read_corpus(prompts)
    return _tfidf(corpus, np.arange(len(corpus.texts)))


def _pair_recall(x, threshold, **lsh):
    """Share of the exhaustive pairs (cosine >= threshold) whose rows the LSH search puts in
    one cluster, and whether every LSH pair is a true one."""
    exact = near_duplicate_pairs(x, threshold, search="exhaustive")
    found = near_duplicate_pairs(x, threshold, **lsh)
    n = x.shape[0]
    graph = coo_matrix((np.ones(len(found)), (found[:, 0], found[:, 1])), shape=(n, n))
    comp = connected_components(graph, directed=False)[1]
    truth = set(map(tuple, exact.tolist()))
    return (comp[exact[:, 0]] == comp[exact[:, 1]]).mean(), \
        all(tuple(p) in truth for p in found.tolist()), len(exact)


def test_minhash_signatures_match_datasketch():
    x = _tfidf_of(["No acute process.", "Dr. ___ was notified at 10:30.", "Small effusion."])
    sig = _minhash_signatures(x, 64, 1, block=2)
    for i in range(x.shape[0]):
        m = MinHash(num_perm=64, seed=1, scheme="legacy", hashfunc=lambda v: v)
        m.update_batch(x.indices[x.indptr[i]:x.indptr[i + 1]].tolist())
        assert sig[i].tolist() == m.hashvalues.tolist()


def test_lsh_finds_the_exhaustive_clusters_and_only_true_pairs():
    x = _tfidf_of(synthetic_prompts(2000, seed=3).prompts)
    recall, exact_only, n_pairs = _pair_recall(x, 0.9)
    assert n_pairs > 50 and exact_only and recall >= 0.95


def planted_found(prompts, exact, near, labels, threshold=0.9):
    """(exact clusters found, near pairs joinable, near pairs joined). Two members of a planted
    near cluster are joinable when a path of cosine >= threshold links them within the cluster
    (computed exactly with the whole corpus's TF-IDF; not every planted edit reaches the
    threshold), and joined when the scan gives them one cluster."""
    corpus = _read_corpus(prompts)
    x = _tfidf(corpus, np.arange(len(corpus.texts)))
    n_exact = sum(labels[g[0]] >= 0 and len(set(labels[g].tolist())) == 1 for g in exact)
    joinable = joined = 0
    for g in near:
        g = np.asarray(g)
        rows, at = np.unique(corpus.inverse[g], return_inverse=True)
        sims = (x[rows] @ x[rows].T).toarray() >= threshold - 1e-9
        part = connected_components(sims, directed=False)[1][at.ravel()]
        i, j = np.triu_indices(len(g), 1)
        linked = part[i] == part[j]
        joinable += int(linked.sum())
        joined += int((linked & (labels[g[i]] == labels[g[j]]) & (labels[g[i]] >= 0)).sum())
    return n_exact, joinable, joined


def test_planted_clusters_are_found():
    planted = synthetic_prompts(6000, seed=1)
    labels = prompt_clusters(planted.prompts).labels
    n_exact, joinable, joined = planted_found(planted.prompts, planted.exact, planted.near, labels)
    assert n_exact == len(planted.exact) == 2 and joinable > 5 and joined == joinable


def test_sentence_pieces_segment_like_the_whole_prompt():
    prompts = synthetic_prompts(600, seed=2).prompts + [
        "Seen by Mrs. Smith today. Dr. Jones agreed. Prof. Brown called. Miss. Green too.",
        "Seen at [** Hospital 1. Name **] today. Then home.", "Called at 10:30 A. M. Then X.",
        "Dated Jan. 5 2150. Then Mar. 6. Fine.", "Lines ok.  Tube ends. ___ was. Xy ab."]
    for text in prompts:
        pieces = [s.key for p in split_pieces(text) for s in segment(p)]
        assert pieces == [s.key for s in segment(text)], text


def test_a_one_megabyte_prompt_is_linear():
    line = "Dr. ___ was called at 10:30 on 3/14/2150 by XXXX. " * 20_000  # ~1 MB, 100k spans
    t0 = time.perf_counter()
    found = find_markers(line)
    result = scan_prompts([line, "No change.", "No change."], min_count=1)
    assert time.perf_counter() - t0 < 120  # all-pairs overlap checks would take hours
    assert len(found) == 80_000
    assert result.summary["markers"]["mimic-cxr"]["occurrences"] == 20_000


def test_bad_prompt_files(tmp_path, capsys):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"No change.\nSmall\x00effusion.\n")
    with pytest.raises(DataError, match=r"nul.txt: line 2 holds a NUL byte"):
        read_prompts(nul)
    out = tmp_path / "out"
    assert main(["scan", str(nul), "--out", str(out)]) == 2
    assert "line 2 holds a NUL byte" in capsys.readouterr().err and not out.exists()
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xd8\xff\xe0")
    with pytest.raises(DataError, match=r"image.txt: line 1 is not valid UTF-8 \(byte 0x89"):
        read_prompts(binary)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt: no prompts found"):
        read_prompts(empty)
    with pytest.raises(DataError, match="prompt 1 holds a NUL byte"):
        scan_prompts(["ok", "a\x00b"])
    with pytest.raises(ConfigError, match="search='kd'"):
        near_duplicate_pairs(_tfidf_of(["a b", "a c"]), 0.9, search="kd")


def test_cli_near_threshold_none(tmp_path, capsys):
    planted = tmp_path / "p.txt"
    write_synthetic_prompts(planted, 400, seed=0, exact_clusters=1, near_clusters=1)
    assert main(["scan", str(planted), "--out", str(tmp_path / "a"),
                 "--near-threshold", "none"]) == 0
    summary = json.loads((tmp_path / "a" / "scan.json").read_text())
    assert summary["duplicates"]["near_threshold"] is None
    assert summary["duplicates"]["near_clusters"] == 0 and summary["input"]["n_prompts"] == 400
    with pytest.raises(SystemExit) as exit_:
        main(["scan", str(planted), "--out", str(tmp_path / "b"), "--near-threshold", "high"])
    assert exit_.value.code == 2
    assert "'high' is not a number" in capsys.readouterr().err


@pytest.mark.slow
def test_lsh_recall_on_20k_prompts():
    """README number: recall of the LSH search against the exhaustive one, 20k prompts."""
    x = _tfidf_of(synthetic_prompts(20_000, seed=0).prompts)
    recall, exact_only, n_pairs = _pair_recall(x, 0.9)
    print(f"20k prompts, {x.shape[0]} distinct: {n_pairs} exhaustive pairs, recall {recall:.4f}")
    assert exact_only and recall >= 0.95


# ---------------------------------------------------------------------------- bench scale
def test_bench_scale_smoke(tmp_path, capsys):
    """`diffmem bench scale` with tiny sizes: one row per size from a fresh process, the
    baseline beside the scan, exponents fitted, seed/sizes/machine printed."""
    out = tmp_path / "scale.json"
    assert main(["bench", "scale", "--sizes", "300", "100", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seed 3, sizes 100, 300" in printed and "machine:" in printed
    assert "growth exponent" in printed
    result = json.loads(out.read_text(encoding="utf-8"))
    assert [r["n"] for r in result["rows"]] == [100, 300]
    for r in result["rows"]:
        assert r["distinct"] <= r["n"] and r["clusters"] >= 1  # planted clusters are found
        assert r["scan_wall_seconds"] > 0 and r["baseline_seconds"] > 0
        assert r["peak_rss_mib"] >= r["start_rss_mib"] > 0
    assert result["exponents"]["scan_wall_seconds"] is not None
    with pytest.raises(ConfigError, match="size=10; use an integer >= 40"):
        from diffmem.attribution.bench_scale import bench_scale

        bench_scale([10, 100])


def test_bucket_pairs_skip_only_pairs_inside_one_component():
    """The bucket search leaves out each bucket's largest component from the left side of its
    product; the edges it returns must be exactly the above-threshold pairs of one bucket
    whose rows are in different components (brute force over the same buckets)."""
    from diffmem.attribution.scan import _bucket_pairs

    rng = np.random.default_rng(0)
    x = _tfidf_of(synthetic_prompts(400, seed=5).prompts)
    n = x.shape[0]
    bucket = rng.integers(0, 12, size=n).astype(np.uint64)
    comp = rng.integers(0, 6, size=n)  # few components: most buckets have a dominant one
    found = _bucket_pairs(x, bucket, 0.3, comp, block=37)
    sims = (x @ x.T).toarray()
    i, j = np.triu_indices(n, k=1)
    want = (bucket[i] == bucket[j]) & (comp[i] != comp[j]) & (sims[i, j] >= 0.3 - 1e-9)
    assert want.sum() > 20
    assert sorted(map(tuple, found.tolist())) == sorted(zip(i[want].tolist(), j[want].tolist()))

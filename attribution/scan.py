"""Scan a prompt dataset for risky tokens, with or without a trained model.

Model-free (before any training): every prompt is cut into units
(:func:`~diffmem.attribution.markers.segment`); de-identification markers of the known
conventions, generic placeholder-like tokens and residual PHI-like text are counted
(:func:`~diffmem.attribution.markers.marker_summary`); exact and near-duplicate prompt clusters
are found (:func:`prompt_clusters`); and every token's enrichment in duplicated prompts against
the rest is measured as a log-odds z-score with an informative Dirichlet prior
(:func:`log_odds_enrichment`; Monroe, Colaresi & Quinn 2008, "Fightin' Words"). Duplicated
training data is what diffusion models copy (Somepalli et al., 2023; Carlini et al., 2023), so a
token over-represented in duplicated prompts is a memorization risk before a model exists.

Model-based (an adapter given): each distinct prompt (all, or a random sample) is attributed
per unit (:func:`~diffmem.attribution.attribute`). With ``s_p`` the prompt's memorization score
(its noise magnitude), ``c_p`` its number of copies and ``a_pu`` unit ``u``'s share of the
prompt's positive attribution, a token's ``model_score`` is its share of the whole
memorization-weighted attribution mass, ``sum_p c_p s_p sum_{u in p: key(u) = token} a_pu /
sum_p c_p s_p`` (the scores of all tokens sum to 1), as Dutt et al. (2025) pool token scores
over memorized prompts: a token that recurs in memorized prompts gathers mass from every
occurrence. ``model_lift`` is the per-occurrence view: the weighted mean over the token's
occurrences of ``a_pu`` times the number of units of the prompt (1 = an average unit's share;
above 1 = each occurrence matters more than an average unit).

The final ranking combines both evidence sources (see :data:`RANKING_NOTE`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.attribution.markers import DEID_KINDS, MarkerTally, Span, segment, split_pieces
from diffmem.checks import as_adapter, check_int
from diffmem.data.prompts import TABLE_SUFFIXES, check_prompt, iter_prompts, table_columns
from diffmem.errors import ConfigError, DataError, OutputError
from diffmem.utils import (check_outside, disk_full_error, is_disk_full, prepare_out_dir, progress,
                           write_json)

log = logging.getLogger(__name__)

__all__ = [
    "NEAR_DUPLICATE_NOTE",
    "RANKING_NOTE",
    "TOKEN_COLUMNS",
    "PromptClusters",
    "ScanResult",
    "iter_source",
    "log_odds_enrichment",
    "near_duplicate_pairs",
    "prompt_clusters",
    "read_prompts",
    "dataset_copy_prone",
    "is_function_word",
    "run_scan",
    "scan_prompts",
    "write_scan",
]

#: Columns of ``tokens.csv``, in order (the first seven are the documented interface).
#: Per-prompt attributions of a scan with a model, one JSON object a line.
ATTRIBUTIONS_JSONL = "attributions.jsonl"
#: Deletion/insertion areas per attribution order (a scan with ``faithfulness=``).
FAITHFULNESS_CSV = "faithfulness.csv"
TOKEN_COLUMNS = ("token", "rank", "score", "count", "prompts_with_token", "enrichment",
                 "is_deid_marker", "kind", "convention", "count_duplicated", "count_rest",
                 "enrichment_rank", "model_score", "model_rank", "model_prompts", "model_lift",
                 "function_word")

#: How the final ranking is made (written into scan.json).
RANKING_NOTE = (
    "score = mean of the available evidence, each scaled to [0, 1]: the enrichment z-score in "
    "duplicated prompts (negative values count as 0) divided by the largest one, and, with a "
    "model, the memorization-weighted attribution share divided by the largest one. "
    "Punctuation and English stop-words (function_word) are ranked after every content token "
    "seen min_count times, whatever their score: they carry no identifying content, and a "
    "report shows first what a person can act on (their model_rank and enrichment_rank still say where the evidence puts "
    "them). Tokens seen fewer than min_count times are ranked after all others. Ties: more "
    "occurrences first, then alphabetical.")

# ---------------------------------------------------------------------------- input
def read_prompts(source: str | os.PathLike, *, split: str | None = "train",
                 prompt_section: str = "impression") -> tuple[list[str], dict[str, Any]]:
    """The prompts of a dataset or a prompts file (read by
    :func:`diffmem.data.prompts.iter_prompts`).

    Parameters
    ----------
    source : path
        A dataset (folder or image manifest, see :func:`diffmem.data.load`), a ``.txt`` file
        with one prompt per line, or a ``.csv``/``.jsonl`` table without an ``image`` column
        whose ``prompt`` (or ``text``, ``caption``) column holds the prompts.
    split : str or None, optional
        For a dataset: the split whose prompts to read (default ``"train"``, what a model is
        trained on); None or ``"all"`` for every record.
    prompt_section : str, optional
        For a dataset: the report section used as the prompt.

    Returns
    -------
    prompts : list of str
        Whitespace-collapsed, blank ones left out.
    info : dict
        ``{"source", "kind", "n_blank", "n_prompts"}``, and for a dataset ``split`` and
        ``data_fingerprint`` (:meth:`~diffmem.data.CXRDataset.fingerprint` of that split, the
        fingerprint ``diffmem detect`` records for the training split).

    Raises
    ------
    DataError
        For a missing or unreadable file, an unsupported suffix, a table without a prompt
        column, a line with a NUL byte or invalid UTF-8 (the message names the line), or no
        prompt at all.
    """
    stream, info = iter_source(source, split=split, prompt_section=prompt_section)
    return list(stream), info


def iter_source(source: str | os.PathLike, *, split: str | None = "train",
                prompt_section: str = "impression") -> tuple[Iterator[str], dict[str, Any]]:
    """:func:`read_prompts` as a stream: the prompts one at a time, the file never held.

    ``info`` gets ``n_blank`` and ``n_prompts`` once the stream is exhausted; the stream raises
    :class:`~diffmem.errors.DataError` (naming the line) where :func:`read_prompts` would.
    """
    from diffmem.data.reports import normalize_whitespace

    path = Path(source)
    if not path.exists():
        raise DataError("no such file or folder; give a dataset folder, a manifest, or a "
                        "prompts file (.txt with one prompt per line, .csv/.jsonl with a "
                        "'prompt' column)", path=path)
    info: dict[str, Any] = {"source": str(path)}
    suffix = path.suffix.lower()
    if path.is_dir() or (suffix in TABLE_SUFFIXES
                         and "image" in [c.strip() for c in table_columns(path)]):
        from diffmem.data import load

        dataset = load(path, prompt_section=prompt_section)
        if split not in (None, "all"):
            dataset = dataset.subset(split=split)
        raw: Iterable[tuple[int, Any]] = enumerate(dataset.prompts, start=1)
        info |= {"kind": f"dataset ({dataset.format})", "split": split or "all",
                 "data_fingerprint": dataset.fingerprint()}
        where = "record"
    elif suffix == ".txt" or suffix in TABLE_SUFFIXES:
        raw = iter_prompts(path)
        info["kind"] = f"prompts file ({suffix[1:]})"
        where = "line"
    else:
        raise DataError(f"unsupported prompts file suffix {path.suffix!r}; use .txt (one prompt "
                        "per line), .csv or .jsonl (a 'prompt' column), or a dataset folder",
                        path=path)

    def stream() -> Iterator[str]:
        n_blank = n_prompts = 0
        for n, text in raw:
            text = normalize_whitespace(text) if isinstance(text, str) else ""
            if not text:
                n_blank += 1
                continue
            check_prompt(text, f"{where} {n}", path=path)
            n_prompts += 1
            yield text
        info["n_blank"], info["n_prompts"] = n_blank, n_prompts
        if not n_prompts:
            in_split = f" in split {split!r}" if "split" in info and split not in (None, "all") \
                else ""
            raise DataError(f"no prompts found{in_split}; the file or dataset is empty (or every "
                            "prompt is blank): give at least one prompt", path=path)

    return stream(), info


# ---------------------------------------------------------------------------- distinct prompts
#: Distinct sentence pieces whose units a scan remembers (:func:`_read_corpus`).
_PIECE_CACHE = 200_000


@dataclass
class _Corpus:
    """The distinct prompts of a scan (one copy of each text) and their units.

    ``inverse[i]`` is prompt ``i``'s distinct text; ``units[indptr[d]:indptr[d + 1]]`` are the
    ids (into ``vocab``, ``kinds``) of the units of ``texts[d]``, in order.
    """

    texts: list[str]
    inverse: np.ndarray
    copies: np.ndarray
    indptr: np.ndarray
    units: np.ndarray
    vocab: list[str]
    kinds: list[tuple[str, str | None]]
    markers: MarkerTally


def _read_corpus(prompts: Iterable[str]) -> _Corpus:
    """Distinct prompts (whitespace collapsed, blanks left out) and the units of each, from a
    stream; every distinct sentence piece (:func:`~diffmem.attribution.markers.split_pieces`)
    is segmented once."""
    index: dict[str, int] = {}
    inverse = array("q")
    for i, p in enumerate(prompts):
        p = " ".join(str(p).split())
        if p:
            check_prompt(p, f"prompt {i}")
            inverse.append(index.setdefault(p, len(index)))
    texts = list(index)
    del index
    inv = np.frombuffer(inverse, dtype=np.int64) if inverse else np.zeros(0, np.int64)
    copies = np.bincount(inv, minlength=len(texts))
    vocab: dict[str, int] = {}
    kinds: list[tuple[str, str | None]] = []
    tally = MarkerTally()
    cache: dict[str, tuple[tuple[int, ...], tuple[Span, ...]]] = {}
    units = array("i")
    indptr = np.zeros(len(texts) + 1, dtype=np.int64)
    for d, text in enumerate(progress(texts, desc="segmenting distinct prompts", unit="prompt")):
        found: list[Span] = []
        for piece in split_pieces(text):
            hit = cache.get(piece)
            if hit is None:
                spans = segment(piece)
                ids = []
                for s in spans:
                    k = vocab.get(s.key)
                    if k is None:
                        k = vocab[s.key] = len(kinds)
                        kinds.append((s.kind, s.convention))
                    ids.append(k)
                hit = (tuple(ids), tuple(s for s in spans if s.convention is not None))
                if len(cache) >= _PIECE_CACHE:
                    cache.clear()
                cache[piece] = hit
            units.extend(hit[0])
            found.extend(hit[1])
        tally.add(found, int(copies[d]))
        indptr[d + 1] = len(units)
    return _Corpus(texts, inv, copies, indptr, np.frombuffer(units, dtype=np.int32)
                   if units else np.zeros(0, np.int32), list(vocab), kinds, tally)


# ---------------------------------------------------------------------------- duplicates
#: How near duplicates are defined and found (written into scan.json).
NEAR_DUPLICATE_NOTE = (
    "near duplicates: cosine similarity >= near_threshold between TF-IDF vectors (sublinear tf) "
    "of unit unigrams and bigrams, every candidate pair checked exactly; candidates from MinHash "
    "LSH (datasketch) over the sets of those terms, tuned to Jaccard lsh_threshold; clusters "
    "are connected components")


@dataclass
class PromptClusters:
    """Exact and near-duplicate prompt clusters.

    Attributes
    ----------
    labels : numpy.ndarray
        int64 ``(N,)``: each prompt's cluster, or -1 for a prompt with no duplicate.
    sizes : list of int
        Prompts per cluster (each at least 2), largest cluster first (label 0).
    kinds : list of str
        ``"exact"`` (every member the same text, up to case and spaces) or ``"near"``.
    """

    labels: np.ndarray
    sizes: list[int]
    kinds: list[str]

    @property
    def duplicated(self) -> np.ndarray:
        """Bool ``(N,)``: the prompt belongs to a cluster."""
        return self.labels >= 0

    def summary(self) -> dict[str, Any]:
        return {"clusters": len(self.sizes),
                "exact_clusters": self.kinds.count("exact"),
                "near_clusters": self.kinds.count("near"),
                "duplicated_prompts": int(self.duplicated.sum()),
                "largest": self.sizes[:10]}


def prompt_clusters(prompts: Iterable[str], *, near_threshold: float | None = 0.9,
                    search: str = "lsh", lsh_threshold: float = 0.6, num_perm: int = 64,
                    seed: int = 1) -> PromptClusters:
    """Group prompts that are exact or near duplicates of each other.

    Exact duplicates have the same text up to case and whitespace (found by hashing). Near
    duplicates have a cosine similarity of at least ``near_threshold`` between their TF-IDF
    vectors of unit unigrams and bigrams (units from
    :func:`~diffmem.attribution.markers.segment`, so all ``___`` are one term and ``10:30``
    and ``10:35`` the same ``<phi:time>``); clusters are the connected components of that
    relation. The pairs are found by :func:`near_duplicate_pairs`: by default MinHash LSH
    proposes candidates and each candidate's cosine is computed exactly, so the definition is
    the cosine one and the index only decides which pairs are looked at (its recall against
    the exhaustive search is measured in the tests and the README).

    Parameters
    ----------
    prompts : iterable of str
        Read once, as a stream.
    near_threshold : float or None, optional
        Cosine similarity in (0, 1] (default 0.9); None finds exact duplicates only.
    search, lsh_threshold, num_perm, seed
        See :func:`near_duplicate_pairs`.

    Returns
    -------
    PromptClusters

    Examples
    --------
    >>> c = prompt_clusters(["No change.", "no  change.", "Dr. ___ called at 10:30.",
    ...                      "Dr. ___ called at 10:35.", "Small effusion."])
    >>> c.labels.tolist(), c.kinds
    ([0, 0, 1, 1, -1], ['exact', 'near'])
    """
    _check_near_threshold(near_threshold)
    return _clusters(_read_corpus(prompts), near_threshold, search=search,
                     lsh_threshold=lsh_threshold, num_perm=num_perm, seed=seed)


def _check_near_threshold(near_threshold: float | None) -> None:
    if near_threshold is not None and (isinstance(near_threshold, bool)
                                       or not 0 < float(near_threshold) <= 1):
        raise ConfigError(f"near_threshold={near_threshold!r}; use a cosine similarity in "
                          "(0, 1] (e.g. 0.9), or None for exact duplicates only")


def _clusters(corpus: _Corpus, near_threshold: float | None, **search: Any) -> PromptClusters:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    # 1. exact duplicates: one group per text up to case
    groups: dict[str, int] = {}
    gid = np.fromiter((groups.setdefault(t.casefold(), len(groups)) for t in corpus.texts),
                      dtype=np.int64, count=len(corpus.texts))
    n_groups = len(groups)
    del groups
    first_text = np.full(n_groups, len(gid), dtype=np.int64)
    np.minimum.at(first_text, gid, np.arange(len(gid)))
    # 2. near duplicates between groups, then connected components
    edges = np.zeros((0, 2), dtype=np.int64)
    if near_threshold is not None and n_groups > 1:
        edges = near_duplicate_pairs(_tfidf(corpus, first_text), float(near_threshold),
                                     **search)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])),
                       shape=(n_groups, n_groups))
    _, comp = connected_components(graph, directed=False)
    # 3. clusters of at least two prompts, largest first (ties: first prompt first)
    comp_of_prompt = comp[gid][corpus.inverse]
    size = np.bincount(comp_of_prompt)
    n_members = np.bincount(comp)  # groups (texts up to case) per component
    first = np.full(len(size), len(comp_of_prompt), dtype=np.int64)
    np.minimum.at(first, comp_of_prompt, np.arange(len(comp_of_prompt)))
    keep = np.flatnonzero(size >= 2)
    keep = keep[np.lexsort((first[keep], -size[keep]))]
    label_of = np.full(len(size), -1, dtype=np.int64)
    label_of[keep] = np.arange(len(keep))
    return PromptClusters(label_of[comp_of_prompt], size[keep].tolist(),
                          ["exact" if n_members[c] == 1 else "near" for c in keep])


def _tfidf(corpus: _Corpus, rows: np.ndarray) -> Any:
    """L2-normalized TF-IDF (sublinear tf) of the unit unigrams and bigrams of the distinct
    texts ``rows``: a CSR matrix, one row each."""
    from scipy.sparse import csr_matrix
    from sklearn.feature_extraction.text import TfidfTransformer

    starts, lengths = corpus.indptr[rows], np.diff(corpus.indptr)[rows]
    offsets = np.cumsum(lengths) - lengths
    at = np.arange(int(lengths.sum())) - np.repeat(offsets - starts, lengths)
    uni = corpus.units[at].astype(np.int64)
    row = np.repeat(np.arange(len(rows)), lengths)
    same = row[1:] == row[:-1]
    bigram, bigram_col = np.unique(uni[:-1][same] * len(corpus.vocab) + uni[1:][same],
                                   return_inverse=True)
    cols = np.concatenate([uni, len(corpus.vocab) + bigram_col.ravel()])
    counts = csr_matrix((np.ones(len(cols)), (np.concatenate([row, row[:-1][same]]), cols)),
                        shape=(len(rows), len(corpus.vocab) + len(bigram)))
    counts.sum_duplicates()
    return TfidfTransformer(sublinear_tf=True).fit_transform(counts).tocsr()


def near_duplicate_pairs(x: Any, threshold: float, *, search: str = "lsh",
                         lsh_threshold: float = 0.6, num_perm: int = 64, seed: int = 1,
                         block: int = 2048) -> np.ndarray:
    """Pairs of rows of ``x`` whose cosine similarity is at least ``threshold``.

    ``search="exhaustive"`` compares all pairs (blocked sparse products; time grows with the
    square of the rows). ``search="lsh"`` (default) finds candidates with MinHash LSH
    (Broder 1997; Indyk & Motwani 1998): each row's set of non-zero terms gets a ``num_perm``
    MinHash signature (datasketch's legacy permutation scheme, vectorized here and checked
    against :class:`datasketch.MinHash` in the tests), cut into the bands datasketch's
    :class:`~datasketch.MinHashLSH` chooses for Jaccard ``lsh_threshold``; rows sharing a band
    are candidates and each candidate's cosine is computed exactly, so no pair below
    ``threshold`` is ever returned. A pair is skipped when earlier pairs already connect its
    rows: the result keeps every connected component of the exhaustive relation that the
    candidates reach, not every pair. Cosine 0.9 between TF-IDF vectors typically means a
    Jaccard similarity of the term sets of about 0.8 (for binary vectors of equal size,
    ``J = c / (2 - c)``); ``lsh_threshold`` 0.6 leaves a margin for the weighting. Memory:
    ``num_perm`` 4-byte values per row.

    Parameters
    ----------
    x : scipy.sparse matrix
        ``(n, terms)``, rows L2-normalized (:func:`_tfidf`).
    threshold : float
        Cosine similarity in (0, 1].
    search : {"lsh", "exhaustive"}
    lsh_threshold : float, optional
        Jaccard similarity the LSH bands are tuned to (datasketch's optimum of false positives
        and negatives).
    num_perm : int, optional
        MinHash permutations.
    seed : int, optional
        Seed of the MinHash permutations.
    block : int, optional
        Rows per block of the sparse products and of the signatures.

    Returns
    -------
    numpy.ndarray
        int64 ``(P, 2)``, ``i < j`` in each row.
    """
    x = x.tocsr()
    if search == "exhaustive":
        pairs = []
        for lo in range(0, x.shape[0], block):
            sims = (x[lo:lo + block] @ x.T).tocoo()
            keep = (sims.data >= threshold - 1e-9) & (sims.row + lo < sims.col)
            pairs.append(np.stack([sims.row[keep] + lo, sims.col[keep]], axis=1))
        return np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)
    if search != "lsh":
        raise ConfigError(f"search={search!r}; use 'lsh' or 'exhaustive'")
    return _lsh_pairs(x, threshold, lsh_threshold=lsh_threshold, num_perm=num_perm, seed=seed,
                      block=block)


def _minhash_signatures(x: Any, num_perm: int, seed: int, block: int) -> np.ndarray:
    """``(n, num_perm)`` uint32 MinHash signatures of the rows' non-zero term ids, the values
    ``datasketch.MinHash(scheme="legacy", hashfunc=int)`` gives for the same ids."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="legacy").permutations
    prime, max_hash = np.uint64((1 << 61) - 1), np.uint64((1 << 32) - 1)
    sig = np.full((x.shape[0], num_perm), max_hash, dtype=np.uint32)
    for lo in range(0, x.shape[0], block):
        sub = x[lo:lo + block]
        filled = np.flatnonzero(np.diff(sub.indptr) > 0)
        if not len(filled):
            continue
        terms, at = np.unique(sub.indices, return_inverse=True)
        phv = (((a[:, None] * terms.astype(np.uint64) + b[:, None]) % prime)
               & max_hash).astype(np.uint32)  # (num_perm, distinct terms of the block)
        at, starts = at.ravel(), sub.indptr[filled]
        for j in range(num_perm):  # 1-d reductions: much faster than one along axis 0
            sig[lo + filled, j] = np.minimum.reduceat(phv[j, at], starts)
    return sig


def _lsh_pairs(x: Any, threshold: float, *, lsh_threshold: float, num_perm: int, seed: int,
               block: int) -> np.ndarray:
    from datasketch import MinHashLSH
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = x.shape[0]
    lsh = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
    sig = _minhash_signatures(x, num_perm, seed, block)
    edges = np.zeros((0, 2), dtype=np.int64)
    comp = np.arange(n)
    mix = np.random.default_rng(seed).integers(1, 2**63, size=lsh.r, dtype=np.uint64) | 1
    for band in progress(range(lsh.b), desc="near-duplicate search (LSH bands)", unit="band"):
        # the band's r values hashed to one 64-bit bucket key (a collision only adds
        # candidates, which the exact check removes)
        bucket = sig[:, band * lsh.r:(band + 1) * lsh.r].astype(np.uint64) @ mix
        found = _bucket_pairs(x, bucket, threshold, comp, block)
        if len(found):
            edges = np.concatenate([edges, found])
            graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
            comp = connected_components(graph, directed=False)[1]
    return edges


def _bucket_pairs(x: Any, bucket: np.ndarray, threshold: float, comp: np.ndarray,
                  block: int) -> np.ndarray:
    """Pairs ``i < j`` of rows in one bucket, not yet in one component, with cosine at least
    ``threshold``. Buckets are taken in chunks of about ``block`` rows; a chunk's cosines are
    one sparse product ``Z Z^T`` where ``Z`` holds each row's terms in columns of its own bucket
    (so rows of different buckets share no column), in row blocks of ``block``."""
    from scipy.sparse import csr_matrix

    order = np.argsort(bucket, kind="stable")
    b = bucket[order]
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    sizes = np.diff(np.r_[starts, len(b)])
    # a bucket of one row, or whose rows are all in one component already, adds no edge
    member = comp[order]
    mixed = np.minimum.reduceat(member, starts) != np.maximum.reduceat(member, starts)
    starts, sizes = starts[mixed], sizes[mixed]
    out = [np.zeros((0, 2), dtype=np.int64)]
    # chunks: consecutive buckets with about `block` rows together
    cut = np.flatnonzero(np.diff(np.cumsum(sizes) // block, prepend=0)) if len(sizes) else []
    for group in np.split(np.arange(len(sizes)), cut):
        if not len(group):
            continue
        rows = np.concatenate([order[s:s + m] for s, m in zip(starts[group], sizes[group])])
        local = np.repeat(np.arange(len(group)), sizes[group])
        sub = x[rows]
        codes = np.repeat(local, np.diff(sub.indptr)) * np.int64(x.shape[1]) + sub.indices
        cols, col = np.unique(codes, return_inverse=True)
        z = csr_matrix((sub.data, col.ravel(), sub.indptr), shape=(len(rows), len(cols)))
        zt = z.T.tocsr()
        dominant = _in_largest_component(local, comp[rows])
        left = np.flatnonzero(~dominant)  # a pair inside one component adds no edge
        for lo in range(0, len(left), block):
            at = left[lo:lo + block]
            sims = (z[at] @ zt).tocoo()
            i, j = rows[at[sims.row]], rows[sims.col]
            # a pair of two non-dominant rows comes twice: keep it once
            keep = ((sims.data >= threshold - 1e-9) & (comp[i] != comp[j])
                    & ((i < j) | dominant[sims.col]))
            out.append(np.sort(np.stack([i[keep], j[keep]], axis=1), axis=1))
    return np.concatenate(out).astype(np.int64)


def _in_largest_component(bucket: np.ndarray, comp: np.ndarray) -> np.ndarray:
    """Whether each row belongs to the largest component of its bucket (one per bucket, the
    smallest component id on a tie).

    >>> _in_largest_component(np.array([0, 0, 0, 1, 1]), np.array([5, 5, 7, 2, 3])).tolist()
    [True, True, False, True, False]
    """
    key = bucket.astype(np.int64) * (int(comp.max()) + 1) + comp
    keys, at, counts = np.unique(key, return_inverse=True, return_counts=True)
    owner = keys // (int(comp.max()) + 1)
    # per bucket, the first key (smallest component) with the largest count
    best = np.lexsort((keys, -counts, owner))
    first = best[np.r_[True, owner[best][1:] != owner[best][:-1]]]
    chosen = np.zeros(len(keys), dtype=bool)
    chosen[first] = True
    return chosen[at.ravel()]


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of ``a`` (by sorting: numpy 2.4's hash-based ``np.unique`` is
    many times slower on large integer arrays)."""
    a = np.sort(a, kind="stable")
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


# ---------------------------------------------------------------------------- enrichment
def log_odds_enrichment(counts_a: Any, counts_b: Any, *, prior: Any | None = None,
                        prior_scale: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Log-odds ratio with an informative Dirichlet prior, and its z-score (Monroe, Colaresi &
    Quinn 2008, "Fightin' Words", eqs. 16-22).

    For word ``w`` with counts ``y_a``, ``y_b`` in corpora of ``n_a``, ``n_b`` words and prior
    pseudo-counts ``alpha_w`` (``alpha_0 = sum_w alpha_w``)::

        delta_w = log((y_a + alpha_w) / (n_a + alpha_0 - y_a - alpha_w))
                - log((y_b + alpha_w) / (n_b + alpha_0 - y_b - alpha_w))
        var_w  ~= 1 / (y_a + alpha_w) + 1 / (y_b + alpha_w)
        z_w     = delta_w / sqrt(var_w)

    Parameters
    ----------
    counts_a, counts_b : array_like
        Word counts ``(K,)`` in the two corpora (here: duplicated prompts, the rest).
    prior : array_like, optional
        Pseudo-counts ``alpha_w`` ``(K,)``. Default: the informative prior of the pooled
        corpus, ``prior_scale * (counts_a + counts_b)`` (the paper uses a background corpus;
        with none at hand the pooled counts stand in for it).
    prior_scale : float, optional
        Strength of the default prior, as a fraction of each word's pooled count.

    Returns
    -------
    delta, z : numpy.ndarray
        float64 ``(K,)``; positive = over-represented in corpus ``a``.

    Examples
    --------
    >>> delta, z = log_odds_enrichment([10, 0], [2, 8], prior=[1, 1])
    >>> round(float(delta[0]), 4), round(float(z[0]), 4)
    (3.4965, 5.3682)
    """
    a = np.asarray(counts_a, dtype=np.float64)
    b = np.asarray(counts_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"counts_a {a.shape} and counts_b {b.shape} must be 1-d of one length")
    if prior is None:
        if not np.isfinite(prior_scale) or prior_scale <= 0:
            raise ConfigError(f"prior_scale={prior_scale!r}; use a positive number (e.g. 0.1)")
        alpha = prior_scale * (a + b)
    else:
        alpha = np.asarray(prior, dtype=np.float64)
        if alpha.shape != a.shape or (alpha < 0).any():
            raise ConfigError(f"prior has shape {alpha.shape}; give one non-negative "
                              f"pseudo-count per word, shape {a.shape}")
    alpha = np.maximum(alpha, 1e-9)  # a word seen in neither corpus
    a0, na, nb = alpha.sum(), a.sum(), b.sum()
    delta = (np.log((a + alpha) / (na + a0 - a - alpha))
             - np.log((b + alpha) / (nb + a0 - b - alpha)))
    z = delta / np.sqrt(1.0 / (a + alpha) + 1.0 / (b + alpha))
    return delta, z


# ---------------------------------------------------------------------------- scan
@dataclass
class ScanResult:
    """The ranked tokens of a prompt dataset and what the scan found.

    Attributes
    ----------
    tokens : list of dict
        One row per token (columns :data:`TOKEN_COLUMNS`), best rank first.
    summary : dict
        Prompt counts, markers by convention, generic placeholders, PHI-like patterns,
        duplicate clusters, enrichment settings, the model part and the ranking rule.
    attributions : list of TokenAttribution
        With a model: the attribution of every attributed distinct prompt, the most memorized
        (highest noise magnitude) first. Empty for a model-free scan.
    faithfulness : FaithfulnessCurves or None
        Deletion/insertion curves of the most memorized prompts, when measured
        (:func:`run_scan` ``faithfulness=``).
    """

    tokens: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    attributions: list[Any] = field(default_factory=list)
    faithfulness: Any = None

    def rank_of(self, token: str) -> int | None:
        """The rank of ``token`` (1 = riskiest), or None when it does not occur."""
        return next((row["rank"] for row in self.tokens if row["token"] == token), None)

    def to_dict(self, *, top: int = 50) -> dict[str, Any]:
        """The summary plus the ``top`` best-ranked token rows."""
        return {**self.summary, "top_tokens": self.tokens[:int(top)]}


def scan_prompts(prompts: Iterable[str], *, adapter: Any = None, method: str | None = None,
                 max_prompts: int | None = None, near_threshold: float | None = 0.9,
                 min_count: int = 3, prior_scale: float = 0.1, generations: int = 4,
                 steps: int = 1, num_inference_steps: int = 50, guidance: float | None = None,
                 seed: int = 0, batch_size: int = 32,
                 copy_prone: Sequence[bool] | None = None, workers: int = 1,
                 threads: int | None = None) -> ScanResult:
    """Rank the tokens of a prompt dataset by memorization risk.

    Parameters
    ----------
    prompts : iterable of str
        The dataset's prompts (duplicates kept: duplication is evidence), read once as a
        stream: only the distinct texts are held.
    adapter : DiffusionModelAdapter, optional
        A trained model: adds the model-based attribution (see the module docstring).
    method : str, optional
        Attribution method for the model part (default
        :data:`~diffmem.attribution.methods.DEFAULT_METHOD`).
    max_prompts : int, optional
        Attribute a random sample (``seed``) of this many distinct prompts instead of all;
        copies of a sampled prompt keep their weight.
    near_threshold : float or None, optional
        Near-duplicate cosine threshold (:func:`prompt_clusters`).
    min_count : int, optional
        Tokens seen fewer times are ranked after all others (their z-scores are noisy).
    prior_scale : float, optional
        Strength of the enrichment prior (:func:`log_odds_enrichment`).
    generations, steps, num_inference_steps, guidance, seed, batch_size
        Passed to the attribution method.
    copy_prone : sequence of bool, optional
        One flag per non-blank prompt, in order: the record's image or patient repeats
        (:func:`~diffmem.attribution.repeats.copy_prone_records`). The enrichment then
        contrasts the prompts of duplicated prompts *and* of these records with the rest: what
        a model copies is the repeated image, whatever its report says.
    workers : int, optional
        Processes for the per-prompt attribution (default 1; more need a model opened from
        a folder; :func:`~diffmem.attribution.workers.attribute_prompts`). The result is the
        same as with one.
    threads : int, optional
        Torch threads per worker (default: the CPUs divided among the workers).

    Returns
    -------
    ScanResult

    Raises
    ------
    DataError
        When ``prompts`` is empty.
    ConfigError
        For an unknown method or a bad option.

    Examples
    --------
    >>> prompts = ["Dr. ___ was notified at ___."] * 5 + ["No acute process.", "Mild edema.",
    ...            "No acute process. Mild edema.", "Small effusion, no edema."]
    >>> result = scan_prompts(prompts, min_count=2)
    >>> result.tokens[0]["token"], result.tokens[0]["is_deid_marker"]
    ('___', True)
    """
    t0 = time.perf_counter()
    # 1. check inputs
    if isinstance(prompts, str):
        prompts = [prompts]
    check_int("min_count", min_count)
    _check_near_threshold(near_threshold)
    if adapter is not None:
        from diffmem.attribution.methods import checked_method

        method = checked_method(method)  # an unknown name fails before any work

    # 2. distinct prompts (the input read once, as a stream) and their units
    corpus = _read_corpus(prompts)
    if not corpus.texts:
        raise DataError("scan got no prompts (empty input or only blank lines); give at least "
                        "one prompt")
    info: dict[str, dict[str, Any]] = {
        k: {"kind": kind, "convention": conv} for k, (kind, conv) in zip(corpus.vocab,
                                                                          corpus.kinds)}

    # 3. duplicates and enrichment
    clusters = _clusters(corpus, near_threshold)
    dup = clusters.duplicated
    if copy_prone is not None:
        copy_prone = np.asarray(copy_prone, dtype=bool)
        if copy_prone.shape != dup.shape:
            raise ConfigError(f"copy_prone has {copy_prone.size} flags for {dup.size} non-blank "
                              "prompts; give one flag per prompt, in order (none for blank "
                              "ones)")
        dup = dup | copy_prone
    count_dup, count_rest, doc_freq = _token_counts(corpus, dup)

    # 4. the model part
    model_part = None
    if adapter is not None:
        model_part = _model_scores(
            adapter, dict(zip(corpus.texts, corpus.copies.tolist())), method=method,
            max_prompts=max_prompts,
            trajectory={"generations": generations, "steps": steps,
                        "num_inference_steps": num_inference_steps, "guidance": guidance,
                        "seed": seed, "batch_size": batch_size},
            workers=workers, threads=threads)
        for key, kind in model_part["kinds"].items():
            info.setdefault(key, {"kind": kind[0], "convention": kind[1]})

    # 5. combine and rank
    rows, vocab, a, b = _combine(info, count_dup, count_rest, doc_freq, dup, model_part,
                                 min_count=min_count, prior_scale=prior_scale)

    summary = {
        "n_prompts": len(corpus.inverse),
        "n_distinct": len(corpus.texts),
        "n_tokens": len(vocab),
        **corpus.markers.summary(len(corpus.inverse)),
        "duplicates": {**clusters.summary(), "near_threshold": near_threshold,
                       "definition": NEAR_DUPLICATE_NOTE},
        "enrichment": {"method": "log-odds z-score with informative Dirichlet prior (Monroe, "
                                 "Colaresi & Quinn 2008)",
                       "groups": "prompts in exact/near-duplicate clusters vs. the rest"
                       if copy_prone is None else "prompts in exact/near-duplicate clusters or "
                       "of records whose image or patient repeats vs. the rest",
                       "copy_prone_prompts": None if copy_prone is None else
                       int(copy_prone.sum()), "group_prompts": int(dup.sum()),
                       "prior_scale": prior_scale, "computed": bool(dup.any() and (~dup).any()),
                       "tokens_duplicated": int(a.sum()), "tokens_rest": int(b.sum())},
        "model": None if model_part is None else {k: v for k, v in model_part.items()
                                                 if k not in ("scores", "prompts", "kinds",
                                                              "lift", "attributions")},
        "ranking": {"rule": RANKING_NOTE, "min_count": int(min_count),
                    "components": ["enrichment"] + (["model"] if model_part else [])},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    markers_ranked = [r for r in rows if r["is_deid_marker"]]
    summary["top_marker"] = None if not markers_ranked else {
        "token": markers_ranked[0]["token"], "rank": markers_ranked[0]["rank"]}
    return ScanResult(rows, summary,
                      [] if model_part is None else model_part["attributions"])


@dataclass
class _Ranking:
    """Per-token arrays of :func:`scan_prompts`, aligned with ``vocab``."""

    vocab: list[str]
    rank: np.ndarray
    score: np.ndarray
    counts: np.ndarray
    z: np.ndarray  # enrichment z-score
    z_rank: np.ndarray
    a: np.ndarray  # occurrences in the duplicated / copy-prone group
    b: np.ndarray  # occurrences in the rest
    model: np.ndarray | None
    m_rank: np.ndarray | None
    function: np.ndarray  # punctuation and stop-words


def _combine(info: dict[str, dict[str, Any]], count_dup: Counter, count_rest: Counter,
             doc_freq: Counter, dup: np.ndarray, model_part: dict[str, Any] | None, *,
             min_count: int, prior_scale: float) -> tuple[list[dict[str, Any]], list[str],
                                                          np.ndarray, np.ndarray]:
    """The ranked token rows from the enrichment counts and the model part (see
    :data:`RANKING_NOTE`), with the vocabulary and the per-group token counts."""
    vocab = sorted(info)
    a = np.array([count_dup.get(k, 0) for k in vocab], dtype=np.float64)
    b = np.array([count_rest.get(k, 0) for k in vocab], dtype=np.float64)
    if dup.any() and (~dup).any():
        _, z = log_odds_enrichment(a, b, prior_scale=prior_scale)
    else:
        z = np.zeros(len(vocab))
    counts = a + b
    eligible = counts >= min_count
    parts = [_scaled(np.clip(z, 0, None), eligible)]
    model = None
    if model_part is not None:
        model = np.array([model_part["scores"].get(k, 0.0) for k in vocab])
        parts.append(_scaled(model, eligible))
    score = np.mean(parts, axis=0)
    function = np.array([is_function_word(k, info[k]["kind"]) for k in vocab], dtype=bool)
    rank = _ranks(score, eligible, counts, vocab, last=function)
    z_rank = _ranks(z, eligible, counts, vocab)
    m_rank = None if model is None else _ranks(model, eligible, counts, vocab)
    ranking = _Ranking(vocab, rank, score, counts, z, z_rank, a, b, model, m_rank, function)
    rows = _token_rows(ranking, info, doc_freq, model_part)
    rows.sort(key=lambda r: r["rank"])
    return rows, vocab, a, b


def _token_rows(r: _Ranking, info: dict[str, dict[str, Any]], doc_freq: dict[str, float],
                model_part: dict[str, Any] | None) -> list[dict]:
    """The rows of ``tokens.csv`` (unsorted) from the ranked arrays of :func:`scan_prompts`."""
    vocab, rank, score, counts, z, z_rank = r.vocab, r.rank, r.score, r.counts, r.z, r.z_rank
    a, b, model, m_rank, function = r.a, r.b, r.model, r.m_rank, r.function
    rows = []
    for i, k in enumerate(vocab):
        rows.append({
            "token": k, "rank": int(rank[i]), "score": float(score[i]), "count": int(counts[i]),
            "prompts_with_token": int(doc_freq.get(k, 0)), "enrichment": float(z[i]),
            "is_deid_marker": info[k]["kind"] in DEID_KINDS, "kind": info[k]["kind"],
            "convention": info[k]["convention"], "count_duplicated": int(a[i]),
            "count_rest": int(b[i]), "enrichment_rank": int(z_rank[i]),
            "model_score": None if model is None else float(model[i]),
            "model_rank": None if m_rank is None else int(m_rank[i]),
            "model_prompts": None if model_part is None else
            int(model_part["prompts"].get(k, 0)),
            "model_lift": None if model_part is None or k not in model_part["lift"] else
            float(model_part["lift"][k]),
            "function_word": bool(function[i]),
        })
    return rows


def _token_counts(corpus: _Corpus, dup: np.ndarray) -> tuple[dict[str, float], ...]:
    """Occurrences of every unit key in duplicated prompts and in the rest, and the number of
    prompts holding it (copies counted), from the distinct prompts."""
    dup_text = np.zeros(len(corpus.texts), dtype=bool)
    dup_text[corpus.inverse[dup]] = True  # copies of one text share their cluster
    per_unit = np.repeat(np.arange(len(corpus.texts)), np.diff(corpus.indptr))
    weight = corpus.copies[per_unit]
    n_keys = len(corpus.vocab)
    count_all = np.bincount(corpus.units, weights=weight, minlength=n_keys)
    count_dup = np.bincount(corpus.units, weights=weight * dup_text[per_unit], minlength=n_keys)
    once = _unique(per_unit.astype(np.int64) * n_keys + corpus.units)  # (text, unit) pairs
    doc_freq = np.bincount(once % n_keys, weights=corpus.copies[once // n_keys],
                           minlength=n_keys)
    return (dict(zip(corpus.vocab, count_dup.tolist())),
            dict(zip(corpus.vocab, (count_all - count_dup).tolist())),
            dict(zip(corpus.vocab, doc_freq.tolist())))


def _scaled(x: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    top = float(x[eligible].max()) if eligible.any() else 0.0
    return x / top if top > 0 else np.zeros_like(x)


def is_function_word(key: str, kind: str) -> bool:
    """True for punctuation and English stop-words (scikit-learn's list), which a risk
    ranking meant for people ranks after content tokens.

    Examples
    --------
    >>> is_function_word(".", "punct"), is_function_word("is", "word")
    (True, True)
    >>> is_function_word("___", "marker"), is_function_word("effusion", "word")
    (False, False)
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return kind == "punct" or (kind == "word" and key in ENGLISH_STOP_WORDS)


def _ranks(score: np.ndarray, eligible: np.ndarray, counts: np.ndarray,
           vocab: list[str], *, last: np.ndarray | None = None) -> np.ndarray:
    """1-based ranks by ``score`` (ineligible tokens, then ``last`` ones, after the rest)."""
    last = np.zeros(len(vocab), dtype=bool) if last is None else last
    order = sorted(range(len(vocab)), key=lambda i: (not eligible[i], bool(last[i]), -score[i],
                                                     -counts[i], vocab[i]))
    ranks = np.empty(len(vocab), dtype=np.int64)
    ranks[order] = np.arange(1, len(vocab) + 1)
    return ranks


def _model_scores(adapter: Any, copies: dict[str, int], *, method: str, max_prompts: int | None,
                  trajectory: dict[str, Any], workers: int = 1,
                  threads: int | None = None) -> dict[str, Any]:
    """Memorization-weighted attribution share of every token key over the prompts.

    ``trajectory`` holds the attribution method's ``generations``, ``steps``,
    ``num_inference_steps``, ``guidance``, ``seed`` and ``batch_size``; ``workers`` and
    ``threads`` go to :func:`~diffmem.attribution.workers.attribute_prompts`.
    """
    from diffmem.attribution.workers import attribute_prompts

    seed = trajectory["seed"]
    distinct = sorted(copies)
    if max_prompts is not None:
        check_int("max_prompts", max_prompts, hint=" or None (all prompts)")
        if max_prompts < len(distinct):
            rng = np.random.default_rng(seed)
            pick = rng.choice(len(distinct), size=int(max_prompts), replace=False)
            distinct = [distinct[i] for i in sorted(pick)]
    t0 = time.perf_counter()
    mass: defaultdict[str, float] = defaultdict(float)
    lift: defaultdict[str, float] = defaultdict(float)
    occurrence_weight: defaultdict[str, float] = defaultdict(float)
    with_key: Counter[str] = Counter()
    kinds: dict[str, tuple[str, str | None]] = {}
    total_weight = 0.0
    skipped: Counter[str] = Counter()
    memorization = []
    attributions = []
    n_truncated = 0
    done = attribute_prompts(adapter, distinct, method=method, trajectory=trajectory,
                             workers=workers, threads=threads)
    for prompt, result, skip, truncated in done:  # in prompt order, however many workers
        if result is None:
            skipped[skip] += 1
            continue
        n_truncated += int(truncated)
        weight = copies[prompt] * max(float(result.memorization), 0.0)
        memorization.append(float(result.memorization))
        attributions.append(result)
        total_weight += weight
        shares = result.shares
        seen = set()
        for unit, share in zip(result.units, shares):
            mass[unit.key] += weight * float(share)
            lift[unit.key] += weight * float(share) * len(result.units)
            occurrence_weight[unit.key] += weight
            kinds.setdefault(unit.key, (unit.kind, unit.convention))
            seen.add(unit.key)
        for key in seen:
            with_key[key] += copies[prompt]
    if skipped:
        log.warning("attribution skipped %d distinct prompt(s): %s", sum(skipped.values()),
                    dict(skipped))
    if n_truncated:
        log.warning("%d distinct prompt(s) exceed the %d tokens the text encoder reads; their "
                    "units beyond it were not attributed (the model never read them either)",
                    n_truncated, adapter.max_length)
    scores = {k: v / total_weight for k, v in mass.items()} if total_weight > 0 else {}
    mem = np.asarray(memorization) if memorization else np.zeros(1)
    return {
        "method": method, "scores": scores, "prompts": dict(with_key), "kinds": kinds,
        "attributions": sorted(attributions, key=lambda r: (-float(r.memorization), r.prompt)),
        "lift": {k: lift[k] / w for k, w in occurrence_weight.items() if w > 0},
        "distinct_prompts": len(copies), "attributed": len(memorization),
        "sampled": max_prompts is not None and len(distinct) < len(copies),
        "skipped": dict(skipped), "truncated": n_truncated,
        "weighting": "copies x noise magnitude of each prompt; per-prompt attribution shares",
        "memorization": {"mean": float(mem.mean()), "max": float(mem.max()),
                         "median": float(np.median(mem))},
        "params": {k: v for k, v in trajectory.items() if k != "batch_size"},
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------------------- output
def write_scan(result: ScanResult, out: str | os.PathLike, *,
               inputs: Sequence[str | os.PathLike] = (), plots: bool = True) -> dict[str, Path]:
    """Write ``tokens.csv``, ``scan.json`` and the plots of a scan into the folder ``out``.

    A scan with a model also writes ``attributions.jsonl``: one
    :meth:`TokenAttribution.to_dict` per attributed distinct prompt, the most memorized first
    (the report draws its heat-coloured prompts from it).

    Parameters
    ----------
    result : ScanResult
    out : path
        Output folder (created; never inside one of ``inputs``).
    inputs : sequence of path, optional
        The scanned dataset or file, which ``out`` must not lie in.
    plots : bool, optional
        Also draw ``tokens.png`` (top tokens) and ``enrichment.png`` (enrichment against
        frequency).

    Returns
    -------
    dict of str to Path
        What was written, by name.
    """
    out = prepare_out_dir(out, inputs=[Path(p) for p in inputs])
    try:
        return _write_scan_files(result, out, plots=plots)
    except OSError as e:  # scan.json itself is written atomically and cleans up after itself
        if is_disk_full(e):
            raise disk_full_error(out) from None
        raise OutputError(f"cannot write the scan into {str(out)!r}: {e.strerror or e}") from None


def _write_scan_files(result: ScanResult, out: Path, *, plots: bool) -> dict[str, Path]:
    paths = {"tokens": out / "tokens.csv", "scan": out / "scan.json"}
    with open(paths["tokens"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(TOKEN_COLUMNS))
        writer.writeheader()
        for row in result.tokens:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in TOKEN_COLUMNS})
    if result.faithfulness is not None:
        from diffmem.attribution.faithfulness import FAITHFULNESS_COLUMNS

        paths["faithfulness"] = out / FAITHFULNESS_CSV
        with open(paths["faithfulness"], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(FAITHFULNESS_COLUMNS))
            writer.writeheader()
            writer.writerows(result.faithfulness.table())
    if result.attributions:
        paths["attributions"] = out / ATTRIBUTIONS_JSONL
        with open(paths["attributions"], "w", encoding="utf-8") as f:
            for attribution in result.attributions:
                f.write(json.dumps(attribution.to_dict(), ensure_ascii=False) + "\n")
    if plots:
        from diffmem.attribution.render import plot_enrichment, plot_token_ranking

        paths["tokens_plot"] = plot_token_ranking(result, out / "tokens.png")
        paths["enrichment_plot"] = plot_enrichment(result, out / "enrichment.png")
    extra = {} if result.faithfulness is None else \
        {"faithfulness": {k: v for k, v in result.faithfulness.to_dict().items()
                          if k != "per_prompt"}}
    write_json(paths["scan"], {**result.to_dict(), **extra,
                               "files": {k: p.name for k, p in paths.items()}})
    return paths


def dataset_copy_prone(source: str | os.PathLike, *, split: str | None = "train",
                       prompt_section: str = "impression", image_threshold: float | None = 0.97,
                       patient_min: int | None = 10) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Copy-prone flags (:func:`~diffmem.attribution.repeats.copy_prone_records`) of a
    dataset's records, one per non-blank prompt in :func:`read_prompts` order; None for a
    prompts file (no images)."""
    from diffmem.attribution.repeats import copy_prone_records
    from diffmem.data.reports import normalize_whitespace

    path = Path(source)
    if not (path.is_dir() or (path.suffix.lower() in TABLE_SUFFIXES
                              and "image" in [c.strip() for c in table_columns(path)])):
        return None
    from diffmem.data import load

    dataset = load(path, prompt_section=prompt_section)
    if split not in (None, "all"):
        dataset = dataset.subset(split=split)
    found = copy_prone_records(dataset, image_threshold=image_threshold, patient_min=patient_min)
    keep = np.array([bool(normalize_whitespace(p)) for p in dataset.prompts], dtype=bool)
    return found.flags[keep], found.summary()


def run_scan(source: str | os.PathLike, *, out: str | os.PathLike,
             model: str | os.PathLike | Any = None, split: str | None = "train",
             prompt_section: str = "impression", device: str | None = None,
             dtype: str | None = None,
             images: bool = True, image_threshold: float | None = 0.97,
             patient_min: int | None = 10, faithfulness: int = 0,
             **options: Any) -> tuple[ScanResult, dict[str, Path]]:
    """What ``diffmem scan`` runs: read the prompts, open the model (if any), scan, write.

    Parameters
    ----------
    source : path
        Dataset or prompts file (see :func:`read_prompts`).
    out : path
        Output folder.
    model : path or DiffusionModelAdapter, optional
        Model folder (or adapter) for the model-based part.
    split, prompt_section
        See :func:`read_prompts`.
    device, dtype : str, optional
        Device and precision to load the model with (see :func:`~diffmem.models.load_model`).
    images : bool, optional
        For a dataset: contrast the prompts of records whose image or patient repeats too
        (:func:`dataset_copy_prone`; default True).
    image_threshold, patient_min
        See :func:`~diffmem.attribution.repeats.copy_prone_records`.
    faithfulness : int, optional
        With a model: measure deletion/insertion curves
        (:func:`~diffmem.attribution.faithfulness_curves`) on this many of the most memorized
        attributed prompts and write ``faithfulness.csv`` (default 0: not measured).
    **options
        Passed to :func:`scan_prompts`.

    Returns
    -------
    result : ScanResult
    paths : dict of str to Path
    """
    from diffmem.data.loader import dataset_root
    from diffmem.models import DiffusionModelAdapter, check_model_folder

    # inputs first, then the output folder: nothing is created for a run that cannot start,
    # and nothing is written into the dataset's folder or the model folder
    prompts, info = iter_source(source, split=split, prompt_section=prompt_section)
    model_folder = None if model is None or isinstance(model, DiffusionModelAdapter) else model
    if model_folder is not None:
        check_model_folder(model_folder)  # reads JSON and file names only
    inputs = [dataset_root(source) if str(info.get("kind", "")).startswith("dataset")
              else source, model_folder]
    check_outside(out, inputs)
    adapter = None
    if model is not None:
        adapter = as_adapter(model, device=device, dtype=dtype)
    found = dataset_copy_prone(source, split=split, prompt_section=prompt_section,
                               image_threshold=image_threshold, patient_min=patient_min) \
        if images else None
    created = not Path(out).exists()
    out = prepare_out_dir(out, inputs=inputs)
    try:
        result = scan_prompts(prompts, adapter=adapter,
                              copy_prone=None if found is None else found[0], **options)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a stream that fails half-way (a NUL byte) leaves no empty folder
        raise
    result.summary["input"] = info
    result.summary["copy_prone"] = None if found is None else found[1]
    if adapter is not None:
        result.summary["model"]["source"] = adapter.source
        result.summary["model"]["fingerprint"] = adapter.fingerprint()
        if faithfulness:
            from diffmem.attribution.faithfulness import faithfulness_curves

            picked = [a.prompt for a in result.attributions[:int(faithfulness)]]
            keys = ("generations", "steps", "num_inference_steps", "guidance", "seed",
                    "batch_size")
            result.faithfulness = faithfulness_curves(
                adapter, picked, **{k: options[k] for k in keys if k in options})
    return result, write_scan(result, out, inputs=[p for p in inputs if p is not None])

"""A reference index: the training images' features under one similarity backend, computed once
by ``diffmem index build`` and reused by ``detect``, ``mitigate`` and ``study`` (``--index DIR``).

The copy verdicts compare every generation with every training image
(:mod:`diffmem.detect.verdicts`); without an index each run reads and featurizes the whole
training split again. The index stores those features once, keyed by what defines them: the
training split's fingerprint (:meth:`CXRDataset.fingerprint`) and the backend's parameters
(:meth:`SimilarityBackend.params`; for ``embedding`` the encoder's fingerprint), so an index of
other data or another feature extractor is refused with the difference named. The features are
computed by the same code as in a run (:func:`~diffmem.detect.neighbors.feature_batches`), so
the verdicts are the same with or without the index.

A folder holds:

================  ==========================================================================
``index.json``    the card: format, data fingerprint, backend parameters, rows, dimension,
                  FAISS file, build seconds. Written last: a folder without it is unfinished.
``features.npy``  float32 ``(N, D)``, memory-mapped when opened (never a pickle)
``positions.npy`` int64 ``(N,)``: each row's position in the training split
``study_ids.npy`` ``(N,)`` study ids (fixed-width unicode)
``faiss.index``   an exact inner-product FAISS index (``IndexFlatIP``) of the features, for the
                  ``pixel`` and ``embedding`` backends when faiss is installed and searches
                  faster than the blocked exact search on a probe at build time (or when
                  asked); or, asked for, an approximate inverted-file index
                  (``IndexIVFFlat``, :func:`write_ivf`) whose measured recall@1 the card
                  records; searched instead of it, candidates re-scored in float64
``build.json``    rows done of an unfinished build: running the build again resumes it
================  ==========================================================================

The build streams the images ``batch_size`` at a time into a memory-mapped file, so its memory
does not grow with the training set (the FAISS index, when built, holds the features in memory:
``N x D x 4`` bytes; the FAISS indexes are filled from chunks read from the file).

Examples
--------
>>> describe_difference({"data_fingerprint": "a", "backend": {"backend": "pixel", "size": 32}},
...                     {"data_fingerprint": "a", "backend": {"backend": "pixel", "size": 16}})
'backend size: the index has 32, this run uses 16'
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import as_dataset, check_int
from diffmem.data.dataset import CXRDataset
from diffmem.detect.neighbors import ReferenceFeatures, feature_batches, one_blas_thread
from diffmem.detect.similarity import SimilarityBackend
from diffmem.errors import ConfigError, DataError, MissingDependencyError, OutputError
from diffmem.lock import LOCK_NAME
from diffmem.utils import prepare_out_dir, progress, shell_command, write_json

log = logging.getLogger(__name__)

__all__ = ["IndexCard", "add_exactly", "build_index", "choose_nprobe", "default_nlist",
           "describe_difference", "finish_index", "index_key", "load_index", "open_index",
           "read_card", "read_chunks", "write_ivf"]

FORMAT = "diffmem-reference-index"
VERSION = 1
CARD, FEATURES, POSITIONS, STUDY_IDS = "index.json", "features.npy", "positions.npy", \
    "study_ids.npy"
FAISS_FILE, PROGRESS, PARTIAL = "faiss.index", "build.json", "features.partial.npy"
_FILES = (CARD, FEATURES, POSITIONS, STUDY_IDS, FAISS_FILE, PROGRESS, PARTIAL)


@dataclass(frozen=True)
class IndexCard:
    """What a reference index holds (its ``index.json``).

    Attributes
    ----------
    path : Path
        The index folder.
    data_fingerprint : str
        Fingerprint of the training split the features come from.
    backend : dict
        Parameters of the similarity backend that made them.
    n, dim : int
        Rows (training images) and feature dimension.
    faiss : bool
        Whether the folder holds a FAISS index.
    build_seconds : float
        Wall time of the build (the feature extraction a run with the index skips).
    approximate : dict or None
        For an approximate (IVF) FAISS index: ``kind``, ``nlist``, ``nprobe`` and the
        ``recall_at_1`` measured at build time (see :func:`choose_nprobe`); None for an exact
        index.
    """

    path: Path
    data_fingerprint: str
    backend: dict[str, Any]
    n: int
    dim: int
    faiss: bool
    build_seconds: float
    approximate: dict[str, Any] | None = None

    def key(self) -> dict[str, Any]:
        return {"data_fingerprint": self.data_fingerprint, "backend": self.backend}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **self.key(), "split": "train",
                "n": self.n, "dim": self.dim, "dtype": "float32",
                "faiss": FAISS_FILE if self.faiss else None,
                "approximate": self.approximate, "build_seconds": self.build_seconds}


def index_key(train_set: CXRDataset, backend: SimilarityBackend) -> dict[str, Any]:
    """What identifies an index: the training split's fingerprint and the backend's parameters.

    Raises
    ------
    ConfigError
        For a backend without a stable identity (an encoder without a fingerprint).
    """
    params = backend.cache_key()
    if params is None:
        raise ConfigError(f"backend {backend.name!r} has no stable identity (an encoder without "
                          "a fingerprint); an index of its features could not be checked "
                          "later: pass an encoder folder from `diffmem embed train`")
    return {"data_fingerprint": train_set.fingerprint(), "backend": params}


def describe_difference(index: dict[str, Any], run: dict[str, Any]) -> str:
    """How an index's key differs from a run's, in words ('' when they match)."""
    parts = []
    if index.get("data_fingerprint") != run.get("data_fingerprint"):
        parts.append(f"data: the index was built from training data "
                     f"{index.get('data_fingerprint')}, this run's training split is "
                     f"{run.get('data_fingerprint')}")
    ib, rb = index.get("backend") or {}, run.get("backend") or {}
    for name in sorted(set(ib) | set(rb), key=lambda n: (n != "backend", n)):
        if ib.get(name) != rb.get(name):
            label = "backend" if name == "backend" else f"backend {name}"
            parts.append(f"{label}: the index has {ib.get(name)}, this run uses {rb.get(name)}")
    return "; ".join(parts)


def read_card(path: str | os.PathLike) -> IndexCard:
    """The card of the index folder ``path``.

    Raises
    ------
    DataError
        A missing folder, an unfinished build, or a folder that is not a reference index.
    """
    folder = Path(path)
    card_path = folder / CARD
    if not card_path.is_file():
        if (folder / PROGRESS).is_file():
            why = "holds an unfinished build; run `diffmem index build` again to finish it"
        elif folder.is_dir():
            why = "is not a reference index (no index.json)"
        else:
            why = "does not exist"
        raise DataError(f"the reference index {why}; build one with `diffmem index build "
                        "--data DATA --out DIR`", path=folder)
    try:
        doc = json.loads(card_path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a diffmem reference index card")
        if doc.get("version") != VERSION:
            raise ValueError(f"index format version {doc.get('version')}, this diffmem reads "
                             f"{VERSION}")
        approx = doc.get("approximate")
        if approx is not None:
            approx = {**approx, "nprobe": int(approx["nprobe"]), "nlist": int(approx["nlist"])}
        return IndexCard(folder, str(doc["data_fingerprint"]), dict(doc["backend"]),
                         int(doc["n"]), int(doc["dim"]), bool(doc.get("faiss")),
                         float(doc.get("build_seconds") or 0.0), approx)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read the reference index card ({e}); rebuild the index with "
                        "`diffmem index build`", path=card_path) from None


def _train_split(data: Any) -> CXRDataset:
    from diffmem.detect.inputs import reference_images

    if not isinstance(data, CXRDataset):
        data = as_dataset(data)
    return reference_images(data)


def _rebuild_hint(folder: Path, backend: dict[str, Any]) -> str:
    cmd = ["diffmem", "index", "build", "--data", "DATA", "--out", str(folder),
           "--backend", str(backend.get("backend"))]
    if backend.get("size") is not None and backend.get("backend") != "embedding":
        cmd += ["--backend-size", str(backend["size"])]
    if backend.get("backend") == "embedding":
        cmd += ["--encoder", "ENC_DIR"]
    return shell_command(cmd)


def build_index(data: Any, out: str | os.PathLike, backend: SimilarityBackend, *,
                batch_size: int = 256, use_faiss: bool | str | None = None,
                nlist: int | None = None, target_recall: float = 0.99,
                seed: int = 0) -> IndexCard:
    """Compute the training split's features under ``backend`` into the index folder ``out``.

    Parameters
    ----------
    data : CXRDataset or path
        The training data (its ``train`` split is indexed).
    out : path
        Index folder (outside the data). An index of the same data and backend there is reused;
        an unfinished build of them is resumed.
    backend : SimilarityBackend
        The similarity backend (see :func:`~diffmem.detect.verdicts.build_backend`).
    batch_size : int, optional
        Images loaded and featurized at a time (memory).
    use_faiss : bool, "ivf" or None, optional
        Also write a FAISS index, which runs then search with: ``None`` (default) an exact one
        when faiss is installed, the backend is an inner product and FAISS's flat search takes
        less CPU time than the blocked exact search on a probe (64 queries against up to
        20,000 of the features; the card's ``search_probe``: both find the same neighbours,
        this only chooses the faster); ``True`` an exact one always (faiss required);
        ``"ivf"`` an approximate inverted-file index (:func:`write_ivf`; faiss required);
        ``False`` never.
    nlist, target_recall, seed : optional
        The IVF index's lists (default :func:`default_nlist`), the recall@1 its ``nprobe`` is
        chosen to reach, and the seed of its training sample and probe (``use_faiss="ivf"``).

    Returns
    -------
    IndexCard

    Raises
    ------
    DataError
        Data without a training split.
    OutputError
        ``out`` inside the data, or a folder holding another index or other files.
    ConfigError, MissingDependencyError
        A backend without a stable identity; ``use_faiss=True`` or ``"ivf"`` with a backend
        that is not an inner product, or without faiss.
    """
    # 1. check inputs
    batch_size = check_int("batch_size", batch_size)
    train_set = _train_split(data)
    key = index_key(train_set, backend)
    _faiss_module(backend, use_faiss)  # fails fast: before any image is read
    if use_faiss == "ivf":
        _ivf_options(len(train_set), nlist, target_recall)
    folder = prepare_out_dir(out, inputs=[train_set.root])
    if (folder / CARD).is_file():
        card = read_card(folder)
        diff = describe_difference(card.key(), key)
        if not diff:
            log.info("the reference index %s is up to date (%d images)", folder, card.n)
            return card
        raise OutputError(f"{folder} holds a reference index of other data or features ({diff});"
                          " choose another --out, or delete that folder to rebuild it there")
    others = sorted(p.name for p in folder.iterdir() if p.name not in _FILES
                    and p.name != LOCK_NAME and not p.name.endswith(".tmp"))
    if others:
        raise OutputError(f"{folder} holds other files ({', '.join(others[:3])}); build the "
                          "index in a new or empty folder")

    # 2. features, streamed into a memory-mapped file (resumable)
    t0 = time.perf_counter()
    with one_blas_thread():
        _, earlier = _stream_features(train_set, backend, folder, key, batch_size)

    # 3. positions, study ids, the FAISS index and the card
    return finish_index(folder, key, backend,
                        study_ids=np.array([s.study_id for s in train_set], dtype=str),
                        use_faiss=use_faiss, nlist=nlist, target_recall=target_recall,
                        seed=seed, seconds=earlier + time.perf_counter() - t0)


def finish_index(folder: str | os.PathLike, key: dict[str, Any], backend: SimilarityBackend, *,
                 study_ids: np.ndarray, use_faiss: bool | str | None = None,
                 nlist: int | None = None, target_recall: float = 0.99, seed: int = 0,
                 seconds: float = 0.0) -> IndexCard:
    """Complete an index folder whose ``features.npy`` is written: positions, study ids, the
    FAISS index (see :func:`build_index` for ``use_faiss``, ``nlist``, ``target_recall`` and
    ``seed``) and, last, the card.

    :func:`build_index` calls it after streaming the images' features; ``diffmem bench index``
    calls it on synthetic features written straight into ``folder`` (``key`` then names
    them). ``seconds`` is the time already spent (added to the card's ``build_seconds``).
    """
    folder = Path(folder)
    t0 = time.perf_counter()
    faiss = _faiss_module(backend, use_faiss)
    n, dim = _npy_shape(folder / FEATURES)
    if len(study_ids) != n:
        raise ConfigError(f"{len(study_ids)} study ids for {n} feature rows; give one per row")
    _save_npy(folder / POSITIONS, np.arange(n, dtype=np.int64))
    _save_npy(folder / STUDY_IDS, np.asarray(study_ids, dtype=str))

    # the FAISS index (auto: only when it searches faster than the blocked exact search)
    probe, approximate = None, None
    with one_blas_thread():
        if faiss is not None and use_faiss is None:
            probe = _probe_faiss(faiss, folder, backend)
            if not probe["faiss_faster"]:
                log.info("FAISS took %.3f s of CPU against %.3f s for the blocked exact search "
                         "on a probe (%d queries, %d rows): no FAISS index; --faiss yes writes "
                         "one", probe["faiss_cpu_s"], probe["blocked_cpu_s"], probe["queries"],
                         probe["rows"])
                faiss = None
        if faiss is not None and use_faiss == "ivf":
            approximate = write_ivf(faiss, folder, nlist=nlist, target_recall=target_recall,
                                    seed=seed)
        elif faiss is not None:
            _write_faiss(faiss, folder, dim)

    # the card, last
    card = IndexCard(folder, key["data_fingerprint"], key["backend"], n, dim,
                     faiss is not None, round(seconds + time.perf_counter() - t0, 2),
                     approximate)
    write_json(folder / CARD, {**card.to_dict(), "search_probe": probe})
    (folder / PROGRESS).unlink(missing_ok=True)
    kind = ("an approximate IVF index (nprobe {nprobe} of {nlist} lists, recall@1 "
            "{recall_at_1:.4f} measured)".format(**approximate) if approximate
            else "an exact FAISS index" if card.faiss else "blocked exact search")
    log.info("reference index %s: %d rows x %d features (%s) in %.1f s, %s", folder, card.n,
             dim, key["backend"].get("backend"), card.build_seconds, kind)
    return card


def _faiss_module(backend: SimilarityBackend, use_faiss: bool | str | None) -> Any:
    """The faiss module when a FAISS index is to be written, else None."""
    if use_faiss not in (None, True, False, "ivf"):
        raise ConfigError(f"use_faiss={use_faiss!r}; use None (auto), True, False or 'ivf'")
    if use_faiss is False:
        return None
    flag = "--faiss ivf" if use_faiss == "ivf" else "--faiss"
    if not backend.inner_product:
        if use_faiss:
            raise ConfigError(f"{flag} needs an inner-product backend (pixel, embedding), not "
                              f"{backend.name!r}; drop {flag} (the index is then searched "
                              "exactly in blocks)")
        return None
    try:
        import faiss
    except ImportError:
        if use_faiss:
            raise MissingDependencyError(f"{flag} needs faiss: pip install faiss-cpu (or "
                                         "'diffmem[faiss]'), or drop the option") from None
        log.info("faiss is not installed: the index will be searched exactly in blocks")
        return None
    return faiss


def _stream_features(train_set: CXRDataset, backend: SimilarityBackend, folder: Path,
                     key: dict[str, Any], batch_size: int) -> tuple[int, float]:
    """Write ``features.npy`` batch by batch; resume an unfinished build of the same key.

    Returns the feature dimension and the seconds an earlier, interrupted session spent.
    """
    n = len(train_set)
    part, progress_file = folder / PARTIAL, folder / PROGRESS
    feats, done, earlier = None, 0, 0.0
    if part.is_file() and progress_file.is_file():
        try:
            state = json.loads(progress_file.read_text(encoding="utf-8"))
            if state.get("key") == key:
                feats = np.load(part, mmap_mode="r+", allow_pickle=False)
                done, earlier = int(state["done"]), float(state.get("seconds", 0.0))
                if feats.shape[0] != n or not 0 <= done <= n:
                    feats, done = None, 0
        except (OSError, ValueError, KeyError, TypeError):
            feats, done = None, 0
        if done:
            log.info("resuming the index build at image %d of %d", done, n)
    t0 = time.perf_counter()
    rest = np.arange(done, n, dtype=np.int64)
    for _, f in feature_batches(train_set, backend, rest, batch_size=batch_size,
                                desc="index features"):
        if feats is None:
            feats = np.lib.format.open_memmap(part, mode="w+", dtype=np.float32,
                                              shape=(n, f.shape[1]))
        feats[done:done + len(f)] = f
        done += len(f)
        feats.flush()  # the rows first, then the count that says they are there
        write_json(progress_file, {"key": key, "done": done,
                                   "seconds": earlier + time.perf_counter() - t0})
    if feats is None:  # nothing left to compute, and no file: an empty split
        raise DataError("the training split has no images to index", path=train_set.root)
    dim = int(feats.shape[1])
    del feats  # close the memory map before renaming the file
    os.replace(part, folder / FEATURES)
    return dim, earlier


def default_nlist(n: int) -> int:
    """Inverted lists of an IVF index of ``n`` vectors: about ``4 sqrt(n)`` (the low end of
    FAISS's guideline of 4 to 16 sqrt(n): fewer, larger lists need fewer probed for a given
    recall), at most ``n // 39`` so that k-means has the 39 training points per list that FAISS
    asks for, and at least 1.

    Examples
    --------
    >>> default_nlist(400_000), default_nlist(100_000), default_nlist(1000)
    (2530, 1265, 25)
    """
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def write_ivf(faiss: Any, folder: str | os.PathLike, *, nlist: int | None = None,
              target_recall: float = 0.99, seed: int = 0, probe_queries: int = 1000,
              train_per_list: int = 40) -> dict[str, Any]:
    """Write an approximate inverted-file FAISS index (``IndexIVFFlat``, inner product) of
    ``folder/features.npy`` as ``folder/faiss.index`` (Jegou et al., "Product quantization for
    nearest neighbor search", TPAMI 2011, the IVF part: vectors assigned to their nearest of
    ``nlist`` k-means centroids; a query searches the lists of its ``nprobe`` nearest).

    The centroids are trained by spherical k-means (10 iterations, FAISS's k-means seeded with
    ``seed``) on ``train_per_list * nlist`` rows drawn with ``seed``; then all rows are added in
    chunks read from the file (memory: the index, ``N x D x 4`` bytes, plus one chunk and the
    training sample). ``nprobe`` is the smallest reaching ``target_recall`` on a probe
    (:func:`choose_nprobe`), and is stored in the index.

    Returns
    -------
    dict
        The card's ``approximate`` entry: ``kind``, ``nlist``, ``nprobe``, ``recall_at_1``,
        ``target_recall``, ``probe_queries``, ``recall_by_nprobe``, ``train_rows``, ``seed``.

    Raises
    ------
    ConfigError
        ``nlist`` not in [1, N] or ``target_recall`` not in (0, 1].
    """
    folder = Path(folder)
    path = folder / FEATURES
    n, dim = _npy_shape(path)
    if n < 2:
        raise ConfigError(f"an IVF index needs at least 2 rows, the features have {n}; drop "
                          "--faiss ivf")
    nlist, target_recall = _ivf_options(n, nlist, target_recall)
    rng = np.random.default_rng(seed)
    train_rows = np.sort(rng.choice(n, size=min(n, train_per_list * nlist), replace=False))
    sample = np.concatenate([c for _, c in read_chunks(path, rows=train_rows)])
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical, index.cp.niter, index.cp.seed = True, 10, int(seed)
    index.cp.max_points_per_centroid = max(train_per_list, 40)
    index.train(sample)
    del sample
    add_exactly(faiss, index, path)
    chosen = choose_nprobe(index, path, target_recall=target_recall, queries=probe_queries,
                           seed=seed)
    index.nprobe = chosen["nprobe"]
    _save_faiss(faiss, index, folder)
    return {"kind": "ivf", "nlist": nlist, **chosen, "train_rows": len(train_rows),
            "seed": int(seed)}


def add_exactly(faiss: Any, index: Any, path: str | os.PathLike) -> None:
    """Add the rows of the ``.npy`` file ``path`` to a trained IVF ``index``, in chunks, with
    each inverted list allocated once at its final size.

    FAISS's own ``add`` appends chunk by chunk to growing lists, whose reallocations left the
    process holding about twice the index's size (measured: 199 MB of growth for 98 MB of
    vectors, 2530 lists). Here a first pass assigns every row to its list (the quantizer's
    nearest centroid, as ``add`` does), each list is reserved at its count, and a second pass
    adds the chunks with those assignments (``add_core``): the same lists, in the same order.
    """
    n = int(_npy_shape(Path(path))[0])
    assign = np.empty(n, dtype=np.int64)
    for start, chunk in read_chunks(path):
        assign[start:start + len(chunk)] = index.quantizer.search(chunk, 1)[1][:, 0]
    counts = np.bincount(assign, minlength=index.nlist)
    for list_no, count in enumerate(counts.tolist()):
        index.invlists.resize(list_no, count)  # allocates the list at its final size ...
        index.invlists.resize(list_no, 0)  # ... and empties it, keeping the allocation
    for start, chunk in progress(read_chunks(path), desc="IVF index", total=-(-n // 16384),
                                 unit="chunk"):
        lists = np.ascontiguousarray(assign[start:start + len(chunk)])
        index.add_core(len(chunk), faiss.swig_ptr(chunk), None, faiss.swig_ptr(lists))


def _ivf_options(n: int, nlist: int | None, target_recall: float) -> tuple[int, float]:
    """Checked IVF settings for ``n`` rows: ``nlist`` (default :func:`default_nlist`) and the
    target recall."""
    nlist = default_nlist(n) if nlist is None else check_int(
        "nlist", nlist, hint=" (inverted lists of the IVF index, e.g. 4 * sqrt(rows))")
    if nlist > n:
        raise ConfigError(f"nlist={nlist} but the index has {n} rows; use at most {n} lists "
                          f"(default {default_nlist(n)})")
    if isinstance(target_recall, bool) or not isinstance(target_recall, (int, float)) \
            or not 0.0 < float(target_recall) <= 1.0:
        raise ConfigError(f"target_recall={target_recall}; use a recall in (0, 1], e.g. 0.99")
    return nlist, float(target_recall)


def choose_nprobe(index: Any, features: str | os.PathLike, *, target_recall: float = 0.99,
                  queries: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The smallest ``nprobe`` of an IVF ``index`` whose recall@1 reaches ``target_recall`` on a
    leave-one-out probe of its own rows.

    ``queries`` rows are drawn at random (``seed``) from ``features`` (the ``.npy`` file the
    index holds). Each one's exact nearest *other* row (float32 inner products with every row,
    in chunks) is compared with the best other row the IVF search returns: a hit when their
    similarities agree within 1e-5 (so a duplicated row found in place of its twin counts, as
    it gives the same verdict). Leaving the row out matters: a row searched for itself is
    always found in its own list. Recall cannot fall as ``nprobe`` grows (the probed lists
    only gain members), so doubling from 1 and then bisecting finds the smallest ``nprobe``.

    Returns
    -------
    dict
        ``nprobe``, ``recall_at_1`` (at that ``nprobe``), ``target_recall``, ``probe_queries``
        and ``recall_by_nprobe`` (every value tried).
    """
    n = int(index.ntotal)
    rng = np.random.default_rng([int(seed), 1])
    rows = np.sort(rng.choice(n, size=min(int(queries), n), replace=False))
    query = np.concatenate([c for _, c in read_chunks(features, rows=rows)])
    best = np.full(len(rows), -np.inf, dtype=np.float32)
    for start, chunk in read_chunks(features, chunk=4096):  # (Q, 4096) products: 16 MB
        s = query @ chunk.T
        mine = (rows >= start) & (rows < start + len(chunk))
        s[np.flatnonzero(mine), rows[mine] - start] = -np.inf
        np.maximum(best, s.max(axis=1), out=best)
    tried: dict[int, float] = {}

    def recall(nprobe: int) -> float:
        index.nprobe = nprobe
        sims, ids = index.search(query, min(3, n))
        sims = np.where((ids == rows[:, None]) | (ids < 0), -np.inf, sims)
        tried[nprobe] = float(np.mean(sims.max(axis=1) >= best - 1e-5))
        return tried[nprobe]

    nlist, lo, hi = int(index.nlist), 0, 1
    while recall(hi) < target_recall and hi < nlist:
        lo, hi = hi, min(2 * hi, nlist)
    while hi - lo > 1 and tried[hi] >= target_recall:
        mid = (lo + hi) // 2
        if recall(mid) >= target_recall:
            hi = mid
        else:
            lo = mid
    if tried[hi] < target_recall:
        log.warning("the IVF index reaches recall@1 %.4f with all %d lists probed, below the "
                    "target %.4f (float32 ties)", tried[hi], nlist, target_recall)
    return {"nprobe": hi, "recall_at_1": round(tried[hi], 6), "target_recall": target_recall,
            "probe_queries": len(rows),
            "recall_by_nprobe": {str(p): round(r, 6) for p, r in sorted(tried.items())}}


def _probe_faiss(faiss: Any, folder: Path, backend: SimilarityBackend, *, rows: int = 20000,
                 queries: int = 64) -> dict[str, Any]:
    """CPU seconds of FAISS's flat search and of the blocked exact search (the backend's
    similarity over 256-row blocks, without the top-k merge) on the first ``rows`` features,
    with ``queries`` of them as queries (seed 0); the least of two runs each."""
    feats = np.load(folder / FEATURES, mmap_mode="r")
    sample = np.ascontiguousarray(feats[:rows], dtype=np.float32)
    pick = np.random.default_rng(0).choice(len(sample), size=min(queries, len(sample)),
                                           replace=False)
    query = sample[np.sort(pick)]
    index = faiss.IndexFlatIP(sample.shape[1])
    index.add(sample)

    def cpu(fn) -> float:
        best = math.inf
        for _ in range(2):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        return best

    with one_blas_thread():
        t_faiss = cpu(lambda: index.search(query, min(10, len(sample))))
        t_block = cpu(lambda: [backend.similarity(query, sample[i:i + 256])
                               for i in range(0, len(sample), 256)])
    return {"rows": len(sample), "queries": len(query), "faiss_cpu_s": round(t_faiss, 4),
            "blocked_cpu_s": round(t_block, 4), "faiss_faster": bool(t_faiss < t_block)}


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _write_faiss(faiss: Any, folder: Path, dim: int) -> None:
    index = faiss.IndexFlatIP(dim)
    for _, chunk in read_chunks(folder / FEATURES):
        index.add(chunk)
    _save_faiss(faiss, index, folder)


def _save_faiss(faiss: Any, index: Any, folder: Path) -> None:
    tmp = folder / (FAISS_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, folder / FAISS_FILE)


def _npy_shape(path: Path) -> tuple[int, int]:
    """Rows and columns of a 2-D ``.npy`` file, from its header."""
    with open(path, "rb") as f:
        shape, _, _ = _npy_header(f)
    return int(shape[0]), int(shape[1])


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of the ``.npy`` file open in ``f`` (left at the data)."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    return read(f)


def read_chunks(path: str | os.PathLike, chunk: int = 16384,
                rows: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows)`` of a float32 ``(N, D)`` ``.npy`` file, ``chunk`` rows at a time, read
    with plain file reads rather than a memory map: pages of a memory map stay in the process's
    resident memory after use, and a pass over 400k x 512 features would add 800 MB to it.
    With ``rows`` (sorted positions), only those rows, in chunks of ``chunk``."""
    with open(path, "rb") as f:
        shape, fortran, dtype = _npy_header(f)
        if fortran or dtype != np.float32 or len(shape) != 2:
            raise DataError("the features file is not a float32 (N, D) array; rebuild the "
                            "index", path=path)
        n, dim = int(shape[0]), int(shape[1])
        offset = f.tell()
        if rows is None:
            for start in range(0, n, chunk):
                count = min(chunk, n - start)
                out = np.fromfile(f, dtype=np.float32, count=count * dim)
                if out.size != count * dim:
                    raise DataError("the features file is truncated; rebuild the index",
                                    path=path)
                yield start, out.reshape(count, dim)
            return
        for start in range(0, len(rows), chunk):
            out = np.empty((len(rows[start:start + chunk]), dim), dtype=np.float32)
            for j, r in enumerate(rows[start:start + chunk]):
                f.seek(offset + int(r) * dim * 4)
                f.readinto(memoryview(out[j]).cast("B"))
            yield start, out


def open_index(path: str | os.PathLike, train_set: CXRDataset,
               backend: SimilarityBackend) -> ReferenceFeatures:
    """The features of a reference index, checked against the run's training split and backend.

    Parameters
    ----------
    path : path
        Index folder written by :func:`build_index`.
    train_set : CXRDataset
        The run's training split (its fingerprint must match the index's).
    backend : SimilarityBackend
        The run's backend (its parameters must match).

    Returns
    -------
    ReferenceFeatures
        Memory-mapped features; carrying the FAISS index when the folder has one and faiss is
        installed (:func:`~diffmem.detect.neighbors.nearest_neighbors` then searches with it).

    Raises
    ------
    DataError
        An index of other data or another backend (the difference named), or damaged or
        truncated files (rebuild suggested).
    """
    card = read_card(path)
    if not isinstance(train_set, CXRDataset):
        raise ConfigError("a reference index holds a dataset's training split; pass the data "
                          "as a dataset (--data or --reference DATA), not a folder of images")
    diff = describe_difference(card.key(), index_key(train_set, backend))
    if diff:
        raise DataError(f"the reference index does not fit this run ({diff}); rebuild it: "
                        f"{_rebuild_hint(card.path, index_key(train_set, backend)['backend'])}",
                        path=card.path)
    return load_index(card, backend)


def load_index(card: IndexCard | str | os.PathLike, backend: SimilarityBackend, *,
               with_faiss: bool = True) -> ReferenceFeatures:
    """The features (memory-mapped) and FAISS index of an index folder, without the check
    against a dataset that :func:`open_index` makes (``diffmem bench index`` opens its
    synthetic indexes with it); the backend must still be the index's. ``with_faiss=False``
    leaves the FAISS index unread (the blocked exact search then runs).

    Raises
    ------
    DataError
        Another backend, or damaged or truncated files (rebuild suggested).
    """
    if not isinstance(card, IndexCard):
        card = read_card(card)
    if card.backend != backend.cache_key():
        raise DataError(f"the reference index holds {card.backend} features, not "
                        f"{backend.cache_key()}", path=card.path)
    rebuild = f"; rebuild it: {_rebuild_hint(card.path, card.backend)}"
    try:
        feats = np.load(card.path / FEATURES, mmap_mode="r", allow_pickle=False)
        positions = np.load(card.path / POSITIONS, allow_pickle=False)
        study_ids = np.load(card.path / STUDY_IDS, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"the reference index files are damaged or truncated ({e}){rebuild}",
                        path=card.path) from None
    if (feats.shape != (card.n, card.dim) or feats.dtype != np.float32
            or positions.shape != (card.n,) or study_ids.shape != (card.n,)):
        raise DataError(f"the reference index files do not match its card (features "
                        f"{feats.shape}, card {card.n} x {card.dim}){rebuild}", path=card.path)
    index = _read_faiss(card, rebuild) if card.faiss and with_faiss else None
    approximate = card.approximate if index is not None else None
    if approximate is not None:
        index.nprobe = approximate["nprobe"]
        search = (f"FAISS IVF, approximate: {approximate['nprobe']} of {approximate['nlist']} "
                  f"lists probed, recall@1 {approximate['recall_at_1']:.4f} measured at build "
                  "time; a copy verdict can differ from the exact search's only where the "
                  "nearest training image is missed")
    else:
        search = "FAISS" if index is not None else "blocked exact search"
    log.info("reusing the reference index %s (%d images, %s): skips about %.1f s of feature "
             "extraction", card.path, card.n, search, card.build_seconds)
    return ReferenceFeatures(feats, positions.astype(np.int64), study_ids, backend.params(),
                             {"kind": "index", "path": str(card.path),
                              "fingerprint": card.data_fingerprint, "split": "train",
                              "n": card.n, "approximate": approximate}, _faiss_index=index)


def _read_faiss(card: IndexCard, rebuild: str) -> Any:
    try:
        import faiss
    except ImportError:
        log.info("faiss is not installed: searching the reference index exactly in blocks")
        return None
    try:
        index = faiss.read_index(str(card.path / FAISS_FILE))
    except RuntimeError as e:
        raise DataError(f"cannot read the FAISS index ({str(e).splitlines()[0]}){rebuild}",
                        path=card.path / FAISS_FILE) from None
    if index.ntotal != card.n or index.d != card.dim:
        raise DataError(f"the FAISS index holds {index.ntotal} x {index.d} vectors, the card "
                        f"says {card.n} x {card.dim}{rebuild}", path=card.path / FAISS_FILE)
    return index

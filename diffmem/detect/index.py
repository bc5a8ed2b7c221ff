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
                  asked); searched instead of it, candidates re-scored in float64
``build.json``    rows done of an unfinished build: running the build again resumes it
================  ==========================================================================

The build streams the images ``batch_size`` at a time into a memory-mapped file, so its memory
does not grow with the training set (the FAISS index, when built, holds the features in memory:
``N x D x 4`` bytes).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import as_dataset, check_int
from diffmem.data.dataset import CXRDataset
from diffmem.detect.neighbors import ReferenceFeatures, feature_batches, one_blas_thread
from diffmem.detect.similarity import SimilarityBackend
from diffmem.errors import ConfigError, DataError, MissingDependencyError, OutputError
from diffmem.utils import prepare_out_dir, shell_command, write_json

log = logging.getLogger(__name__)

__all__ = ["IndexCard", "build_index", "describe_difference", "index_key", "open_index",
           "read_card"]

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
    """

    path: Path
    data_fingerprint: str
    backend: dict[str, Any]
    n: int
    dim: int
    faiss: bool
    build_seconds: float

    def key(self) -> dict[str, Any]:
        return {"data_fingerprint": self.data_fingerprint, "backend": self.backend}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **self.key(), "split": "train",
                "n": self.n, "dim": self.dim, "dtype": "float32",
                "faiss": FAISS_FILE if self.faiss else None,
                "build_seconds": self.build_seconds}


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
        return IndexCard(folder, str(doc["data_fingerprint"]), dict(doc["backend"]),
                         int(doc["n"]), int(doc["dim"]), bool(doc.get("faiss")),
                         float(doc.get("build_seconds") or 0.0))
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
                batch_size: int = 256, use_faiss: bool | None = None) -> IndexCard:
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
    use_faiss : bool or None, optional
        Also write a FAISS index, which runs then search with: ``None`` (default) when faiss
        is installed, the backend is an inner product and FAISS's flat search takes less CPU
        time than the blocked exact search on a probe (64 queries against up to 20,000 of the
        features; the card's ``search_probe``: both find the same neighbours, this only
        chooses the faster); ``True`` always (faiss required); ``False`` never.

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
        A backend without a stable identity; ``use_faiss=True`` with a backend that is not an
        inner product, or without faiss.
    """
    # 1. check inputs
    batch_size = check_int("batch_size", batch_size)
    train_set = _train_split(data)
    key = index_key(train_set, backend)
    faiss = _faiss_module(backend, use_faiss)
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
                    and not p.name.endswith(".tmp"))
    if others:
        raise OutputError(f"{folder} holds other files ({', '.join(others[:3])}); build the "
                          "index in a new or empty folder")

    # 2. features, streamed into a memory-mapped file (resumable)
    t0 = time.perf_counter()
    with one_blas_thread():
        dim, earlier = _stream_features(train_set, backend, folder, key, batch_size)
    positions = np.arange(len(train_set), dtype=np.int64)
    _save_npy(folder / POSITIONS, positions)
    _save_npy(folder / STUDY_IDS, np.array([s.study_id for s in train_set], dtype=str))

    # 3. the FAISS index (auto: only when it searches faster than the blocked exact search)
    probe = None
    if faiss is not None and use_faiss is None:
        probe = _probe_faiss(faiss, folder, backend)
        if not probe["faiss_faster"]:
            log.info("FAISS took %.3f s of CPU against %.3f s for the blocked exact search on a "
                     "probe (%d queries, %d rows): no FAISS index; --faiss yes writes one",
                     probe["faiss_cpu_s"], probe["blocked_cpu_s"], probe["queries"],
                     probe["rows"])
            faiss = None
    if faiss is not None:
        _write_faiss(faiss, folder, dim)

    # 4. the card, last
    card = IndexCard(folder, key["data_fingerprint"], key["backend"], len(train_set), dim,
                     faiss is not None, round(earlier + time.perf_counter() - t0, 2))
    write_json(folder / CARD, {**card.to_dict(), "search_probe": probe})
    (folder / PROGRESS).unlink(missing_ok=True)
    log.info("reference index %s: %d images x %d features (%s) in %.1f s%s", folder, card.n,
             dim, backend.name, card.build_seconds, ", with a FAISS index" if card.faiss else "")
    return card


def _faiss_module(backend: SimilarityBackend, use_faiss: bool | None) -> Any:
    """The faiss module when a FAISS index is to be written, else None."""
    if use_faiss is False:
        return None
    if not backend.inner_product:
        if use_faiss:
            raise ConfigError(f"a FAISS index needs an inner-product backend (pixel, "
                              f"embedding), not {backend.name!r}; drop --faiss")
        return None
    try:
        import faiss
    except ImportError:
        if use_faiss:
            raise MissingDependencyError("--faiss needs faiss: pip install faiss-cpu") from None
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


def _write_faiss(faiss: Any, folder: Path, dim: int, chunk: int = 65536) -> None:
    feats = np.load(folder / FEATURES, mmap_mode="r")
    index = faiss.IndexFlatIP(dim)
    for start in range(0, len(feats), chunk):
        index.add(np.ascontiguousarray(feats[start:start + chunk], dtype=np.float32))
    tmp = folder / (FAISS_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, folder / FAISS_FILE)


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
    index = _read_faiss(card, rebuild) if card.faiss else None
    log.info("reusing the reference index %s (%d images, %s): skips about %.1f s of feature "
             "extraction", card.path, card.n, "FAISS" if index is not None else
             "blocked exact search", card.build_seconds)
    return ReferenceFeatures(feats, positions.astype(np.int64), study_ids, backend.params(),
                             {"kind": "index", "path": str(card.path),
                              "fingerprint": card.data_fingerprint, "split": "train",
                              "n": card.n}, _faiss_index=index)


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

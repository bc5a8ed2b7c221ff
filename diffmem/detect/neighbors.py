"""Nearest training images of generated (or held-out) images, streamed in bounded memory.

:func:`nearest_neighbors` featurizes the queries once, then walks the reference (a dataset's
training split, an image array, or :class:`ReferenceFeatures` computed earlier) in chunks of
``batch_size`` images, scoring each chunk against all queries and keeping a running top-k, so
memory stays at ``Q x (k + batch_size)`` similarities whatever the reference size. With
``index="faiss"`` (inner-product backends only; ``pip install diffmem[faiss]``) an exact FAISS
inner-product index finds the candidates instead, and their similarities are recomputed in
float64 so both paths report the same numbers.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> train = rng.random((10, 16, 16), dtype=np.float32)
>>> result = nearest_neighbors(train[[3, 7]], train, backend="pixel", size=8, k=2)
>>> result.indices[:, 0].tolist()
[3, 7]
>>> bool(np.allclose(result.similarities[:, 0], 1.0))
True
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import check_int
from diffmem.data.dataset import CXRDataset
from diffmem.detect.similarity import (
    SimilarityBackend,
    as_image_batch,
    get_backend,
)
from diffmem.errors import ConfigError, DataError, MissingDependencyError
from diffmem.utils import prepare_out_dir, progress, sha256_text, stable_json

log = logging.getLogger(__name__)

__all__ = ["NeighborResult", "ReferenceFeatures", "feature_batches", "nearest_neighbors",
           "resolve_backend", "search_features"]

INDEXES = (None, "brute", "faiss")

# Extra FAISS candidates re-ranked exactly (ties among duplicated training images)
_FAISS_SPARE = 8
# Queries whose FAISS candidates are gathered and re-scored together (bounds the gather)
_RESCORE_QUERIES = 1024


@dataclass
class NeighborResult:
    """The ``k`` nearest reference images of each query, best first.

    Attributes
    ----------
    indices : numpy.ndarray
        int64 ``(Q, k)``: positions in the reference (for a dataset: positions in the dataset
        that was passed, whatever the split filter).
    similarities : numpy.ndarray
        float64 ``(Q, k)``, non-increasing along each row (ties: lower index first).
    distances : numpy.ndarray
        float64 ``(Q, k)``: the backend's :meth:`~SimilarityBackend.to_distance` of the
        similarities (what :func:`~diffmem.detect.verdicts.ratio_criterion` compares).
    study_ids : numpy.ndarray or None
        ``(Q, k)`` study ids of the neighbours when the reference is a dataset.
    backend : dict
        The backend's parameters.
    n_reference : int
        Number of reference images searched.
    """

    indices: np.ndarray
    similarities: np.ndarray
    distances: np.ndarray
    study_ids: np.ndarray | None
    backend: dict[str, Any]
    n_reference: int

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready lists (one row per query)."""
        return {"backend": dict(self.backend), "n_reference": self.n_reference, "k": self.k,
                "indices": self.indices.tolist(),
                "similarities": self.similarities.tolist(),
                "distances": self.distances.tolist(),
                "study_ids": None if self.study_ids is None else self.study_ids.tolist()}


@dataclass
class ReferenceFeatures:
    """Features of reference images under one backend, computed once and reused.

    Build with :meth:`from_dataset` or :meth:`from_images`; :meth:`save` writes them as
    ``.npy`` (never a pickle) with a JSON sidecar, :meth:`load` reads them back memory-mapped,
    so a large cache does not have to fit in memory.

    Attributes
    ----------
    features : numpy.ndarray
        float32 ``(N, D)``.
    indices : numpy.ndarray
        int64 ``(N,)``: each row's position in the source dataset or image array.
    study_ids : numpy.ndarray or None
        ``(N,)`` study ids when the source is a dataset.
    backend : dict
        Parameters of the backend that made the features.
    source : dict
        What the features were computed from (dataset fingerprint, split, count).
    """

    features: np.ndarray
    indices: np.ndarray
    study_ids: np.ndarray | None
    backend: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    _faiss_index: Any = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def from_images(cls, images: np.ndarray, backend: str | SimilarityBackend = "pixel", *,
                    batch_size: int = 256, **options: Any) -> ReferenceFeatures:
        """Features of an ``(N, H, W)`` image array in [0, 1] (``options`` build the backend)."""
        backend = get_backend(backend, **options)
        images = as_image_batch(images, name="reference images")
        batch_size = _check_batch_size(batch_size)
        chunks = range(0, len(images), batch_size)
        feats = [backend.features(images[i:i + batch_size])
                 for i in progress(chunks, desc="reference features", unit="batch")]
        return cls(np.concatenate(feats), np.arange(len(images), dtype=np.int64), None,
                   backend.params(), {"kind": "images", "n": len(images)})

    @classmethod
    def from_dataset(cls, dataset: CXRDataset, backend: str | SimilarityBackend = "pixel", *,
                     split: str | None = "train", batch_size: int = 256,
                     cache_dir: str | os.PathLike | None = None,
                     **options: Any) -> ReferenceFeatures:
        """Features of a dataset's images (by default its training split).

        Parameters
        ----------
        dataset : CXRDataset
        backend : str or SimilarityBackend, optional
            A backend name (built with ``options``) or instance.
        split : str or None, optional
            Records used (default ``"train"``; ``None`` for all).
        batch_size : int, optional
            Images loaded and featurized at a time.
        cache_dir : path, optional
            Folder for a ``.npy`` cache keyed by the dataset fingerprint, split and backend
            settings: reused when present, written otherwise. Never inside the dataset folder.
        """
        backend = get_backend(backend, **options)
        batch_size = _check_batch_size(batch_size)
        positions = _split_positions(dataset, split)
        source = {"kind": "dataset", "fingerprint": dataset.fingerprint(), "split": split,
                  "n": len(positions)}
        key = backend.cache_key()
        stem = None
        if cache_dir is not None:
            if key is None:
                log.warning("backend %r has no stable identity (pass encoder_id=); its features "
                            "are not cached on disk", backend.name)
            else:
                folder = prepare_out_dir(cache_dir, inputs=[dataset.root])
                stem = folder / _cache_name(key, source)
                if stem.with_suffix(".npy").is_file() and stem.with_suffix(".json").is_file():
                    cached = cls.load(stem.with_suffix(".npy"))
                    log.info("reusing cached reference features %s", stem.with_suffix(".npy"))
                    return cached
        feats = [f for _, f in feature_batches(dataset, backend, positions,
                                                 batch_size=batch_size)]
        study_ids = np.array([dataset[int(i)].study_id for i in positions], dtype=str)
        out = cls(np.concatenate(feats), positions, study_ids, backend.params(), source)
        if stem is not None:
            out.save(stem.parent, name=stem.name)
        return out

    def save(self, folder: str | os.PathLike, *, name: str | None = None) -> Path:
        """Write ``<folder>/<name>.npy`` (features) and ``<name>.json`` (indices, ids, settings).

        Both are written to a temporary name first and renamed, so a killed run never leaves
        a half-written cache. Returns the ``.npy`` path.
        """
        folder = prepare_out_dir(folder)
        name = name or _cache_name(self.backend, self.source)
        npy, meta = folder / f"{name}.npy", folder / f"{name}.json"
        tmp = folder / f"{name}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(self.features, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, npy)
        doc = {"format": "diffmem-reference-features", "version": 1,
               "backend": self.backend, "source": self.source,
               "shape": list(self.features.shape), "indices": self.indices.tolist(),
               "study_ids": None if self.study_ids is None else self.study_ids.tolist()}
        tmp = folder / f"{name}.json.tmp"
        tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
        os.replace(tmp, meta)
        return npy

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> ReferenceFeatures:
        """Read features written by :meth:`save` (``path`` is the ``.npy`` file)."""
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise DataError("reference features need both the .npy file and its .json sidecar "
                            "(written by ReferenceFeatures.save); recompute them", path=path)
        try:
            doc = json.loads(meta_path.read_text(encoding="utf-8"))
            feats = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read reference features ({e}); delete the cache files and "
                            "recompute them", path=path) from None
        if (not isinstance(doc, dict) or doc.get("format") != "diffmem-reference-features"
                or list(feats.shape) != doc.get("shape") or feats.ndim != 2):
            raise DataError("not diffmem reference features, or the .npy and .json do not "
                            "match; delete both and recompute", path=path)
        ids = doc.get("study_ids")
        return cls(feats, np.asarray(doc["indices"], dtype=np.int64),
                   None if ids is None else np.asarray(ids, dtype=str),
                   doc["backend"], doc.get("source", {}))

    def chunks(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, features)`` slices of at most ``batch_size`` rows."""
        for start in range(0, len(self), batch_size):
            rows = np.arange(start, min(len(self), start + batch_size))
            yield rows, np.asarray(self.features[start:start + batch_size])


def resolve_backend(backend: str | SimilarityBackend, size: int | None = None,
                    **options: Any) -> SimilarityBackend:
    """A backend instance from a name (``size`` and ``options`` passed on) or an instance."""
    if isinstance(backend, SimilarityBackend):
        if size is not None or options:
            raise ConfigError(f"size/options given with an already built {backend.name!r} "
                              "backend; set them when building it, or pass its name")
        return backend
    if size is not None:
        options["size"] = size
    return get_backend(backend, **options)


def nearest_neighbors(query_images: np.ndarray | CXRDataset,
                      reference: CXRDataset | np.ndarray | ReferenceFeatures, *,
                      backend: str | SimilarityBackend = "pixel", k: int = 2,
                      size: int | None = None, batch_size: int = 256, index: str | None = None,
                      split: str | None = "train") -> NeighborResult:
    """The ``k`` most similar reference images of each query image.

    Parameters
    ----------
    query_images : numpy.ndarray or CXRDataset
        ``(Q, H, W)`` float images in [0, 1] (generations), or a dataset whose every record is
        a query (held-out images for calibration).
    reference : CXRDataset, numpy.ndarray or ReferenceFeatures
        The training images: a dataset (records of ``split``), an ``(R, H, W)`` array, or
        features computed earlier with the same backend settings.
    backend : str or SimilarityBackend, optional
        Similarity backend (default ``"pixel"``); see
        :func:`~diffmem.detect.similarity.list_backends`.
    k : int, optional
        Neighbours per query (default 2, what the ratio criterion needs).
    size : int, optional
        Image side for a backend given by name (default: the backend's own).
    batch_size : int, optional
        Reference images scored at a time (memory: ``Q x batch_size`` similarities).
    index : {None, "brute", "faiss"}, optional
        ``"brute"``: exact streaming search. ``"faiss"``: exact FAISS inner-product search
        (``pixel`` and ``embedding`` backends; needs ``pip install diffmem[faiss]``).
        ``None`` (default): FAISS when ``reference`` carries a FAISS index (a reference index
        opened with :func:`diffmem.detect.index.open_index`), the streaming search otherwise.
    split : str or None, optional
        Split of a dataset reference (default ``"train"``; ``None`` for every record).

    Returns
    -------
    NeighborResult

    Raises
    ------
    ConfigError
        For ``k`` larger than the reference, a bad ``index`` or ``batch_size``, or features
        made with other backend settings.
    MissingDependencyError
        For ``index="faiss"`` without faiss installed.
    """
    # 1. check inputs
    backend = resolve_backend(backend, size)
    batch_size = _check_batch_size(batch_size)
    if index not in INDEXES:
        raise ConfigError(f"index={index!r}; use one of {list(INDEXES)}")
    k = check_int("k", k, hint=" (2 for the ratio criterion)")
    if isinstance(reference, ReferenceFeatures) and reference.backend != backend.params():
        raise ConfigError(f"reference features were made with {reference.backend}, not "
                          f"{backend.params()}; recompute them with this backend")
    if index == "faiss":
        if not backend.inner_product:
            raise ConfigError(f"index='faiss' needs an inner-product backend (pixel, embedding), "
                              f"not {backend.name!r}; use index=None")
        _import_faiss()
        if isinstance(reference, CXRDataset):
            reference = ReferenceFeatures.from_dataset(reference, backend, split=split,
                                                       batch_size=batch_size)
        elif not isinstance(reference, ReferenceFeatures):
            reference = ReferenceFeatures.from_images(reference, backend, batch_size=batch_size)

    # 2. the reference, as chunks of (positions, features) plus study ids
    if isinstance(reference, ReferenceFeatures):
        n_ref, positions, ref_ids = len(reference), reference.indices, reference.study_ids
        source = None  # searched by search_features
    elif isinstance(reference, CXRDataset):
        positions = _split_positions(reference, split)
        n_ref = len(positions)
        ref_ids = None  # filled below, by position
        source = feature_batches(reference, backend, positions, batch_size=batch_size,
                                 desc=None)
    else:
        ref_images = as_image_batch(reference, name="reference images")
        n_ref, ref_ids = len(ref_images), None
        source = ((np.arange(i, min(n_ref, i + batch_size), dtype=np.int64),
                   backend.features(ref_images[i:i + batch_size]))
                  for i in range(0, n_ref, batch_size))
    if n_ref == 0:
        raise DataError("the reference has no images (is the training split empty?)")
    if k > n_ref:
        raise ConfigError(f"k={k} but the reference has only {n_ref} image(s); lower k")

    # 3. query features
    query = _query_features(query_images, backend, batch_size)

    # 4. search (a reference index's own FAISS index when it carries one)
    if isinstance(reference, ReferenceFeatures):
        sims, idx = search_features(query, reference, backend=backend, k=k,
                                    batch_size=batch_size, index=index)
    else:
        sims, idx = _blocked_search(query, source, -(-n_ref // batch_size), backend, k)

    # 5. result
    if isinstance(reference, CXRDataset):
        study_ids = np.array([[reference[int(i)].study_id for i in row] for row in idx],
                             dtype=str).reshape(idx.shape)
    elif ref_ids is not None:
        where = {int(p): n for n, p in enumerate(positions)}
        study_ids = np.array([[ref_ids[where[int(i)]] for i in row] for row in idx],
                             dtype=str).reshape(idx.shape)
    else:
        study_ids = None
    return NeighborResult(indices=idx, similarities=sims, distances=backend.to_distance(sims),
                          study_ids=study_ids, backend=backend.params(), n_reference=n_ref)


def search_features(query: np.ndarray, reference: ReferenceFeatures, *,
                    backend: SimilarityBackend, k: int = 2, batch_size: int = 256,
                    index: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest reference rows of each query's features: step 4 of
    :func:`nearest_neighbors`, callable with features (``diffmem bench index`` times it).

    Parameters
    ----------
    query : numpy.ndarray
        float32 ``(Q, D)`` features under ``backend``.
    reference : ReferenceFeatures
    backend : SimilarityBackend
    k : int, optional
    batch_size : int, optional
        Reference rows scored at a time by the blocked search.
    index : {None, "brute", "faiss"}, optional
        As in :func:`nearest_neighbors`: ``None`` searches with the reference's FAISS index
        when it carries one (an approximate IVF index too), else blockwise.

    Returns
    -------
    similarities : numpy.ndarray
        float64 ``(Q, k)``, best first.
    indices : numpy.ndarray
        int64 ``(Q, k)`` reference positions (``reference.indices``).
    """
    if index is None and reference._faiss_index is not None and backend.inner_product:
        index = "faiss"
    if index == "faiss":
        return _faiss_search(_import_faiss(), reference, query, k, backend, batch_size)
    source = ((reference.indices[rows], feats) for rows, feats in reference.chunks(batch_size))
    return _blocked_search(query, source, -(-len(reference) // batch_size), backend, k)


def _blocked_search(query: np.ndarray, source: Any, n_chunks: int, backend: SimilarityBackend,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over ``(positions, features)`` chunks, a running merge per chunk."""
    sims = np.full((len(query), k), -np.inf)
    idx = np.full((len(query), k), np.iinfo(np.int64).max, dtype=np.int64)
    for pos, feats in progress(source, desc="nearest neighbours", total=n_chunks,
                               unit="batch"):
        sims, idx = _merge_topk(sims, idx, backend.similarity(query, feats), pos, k)
    return sims, idx


def feature_batches(dataset: CXRDataset, backend: SimilarityBackend, positions: np.ndarray, *,
                    batch_size: int = 256, desc: str | None = "reference features",
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(positions, features)`` of a dataset's images, ``batch_size`` at a time: the one place
    dataset images are loaded (at the backend's size) and featurized for a search.

    Parameters
    ----------
    dataset : CXRDataset
    backend : SimilarityBackend
    positions : numpy.ndarray
        int64 positions of the records to featurize, in order.
    batch_size : int, optional
        Images loaded and featurized at a time.
    desc : str or None, optional
        Progress bar label (``None``: no bar).

    Yields
    ------
    positions : numpy.ndarray
        int64 ``(B,)`` positions of the batch's records.
    features : numpy.ndarray
        float32 ``(B, D)``.
    """
    batch_size = _check_batch_size(batch_size)
    chunks = dataset.iter_images(size=_load_size(backend), batch_size=batch_size,
                                 indices=positions)
    if desc is not None:
        chunks = progress(chunks, desc=desc, total=-(-len(positions) // batch_size),
                          unit="batch")
    for idx, images in chunks:
        yield np.asarray(idx, dtype=np.int64), backend.features(images)


def _merge_topk(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of the running best and a new ``(Q, C)`` block; ties keep the lower index.

    The block's own top ``k`` are picked first (a linear-time partition), so the exact sort
    runs on ``2k`` candidates per query instead of ``k + C``; a query whose ``k``-th best
    value is tied in the block keeps all ``C`` (the partition would pick among the tied
    arbitrarily)."""
    if np.isnan(s).any() or np.isnan(best_s).any():
        raise DataError("the backend produced NaN similarities; check the images and features")
    i = np.broadcast_to(i, s.shape)
    c = s.shape[1]
    if c > 2 * k:
        part = np.argpartition(s, c - k, axis=1)[:, c - k:]
        top_s = np.take_along_axis(s, part, 1)
        tied = (s >= top_s.min(axis=1, keepdims=True)).sum(axis=1) > k
        if not tied.any():
            s, i = top_s, np.take_along_axis(i, part, 1)
        else:  # the tied queries with their whole block, the others with their top k
            fill_s = np.full((len(s), c - k), -np.inf)
            fill_i = np.full((len(s), c - k), np.iinfo(np.int64).max, dtype=np.int64)
            s = np.where(tied[:, None], s, np.concatenate([top_s, fill_s], axis=1))
            i = np.where(tied[:, None], i,
                         np.concatenate([np.take_along_axis(i, part, 1), fill_i], axis=1))
    cand_s = np.concatenate([best_s, s], axis=1)
    cand_i = np.concatenate([best_i, i], axis=1)
    order = np.lexsort((cand_i, -cand_s), axis=1)[:, :k]
    return np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError("index='faiss' needs the faiss extra: "
                                     "pip install 'diffmem[faiss]' (faiss-cpu), or use "
                                     "index=None for the exact streaming search") from None
    return faiss


def _faiss_search(faiss: Any, reference: ReferenceFeatures, query: np.ndarray, k: int,
                  backend: SimilarityBackend, batch_size: int = 256,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """FAISS inner-product search (float32; exact, or the IVF index a reference index carries)
    for candidates, re-scored with the backend's own similarity (float64) and re-ranked as the
    streaming search ranks (ties: lower index first). Queries for which an IVF index returns
    fewer than ``k`` candidates (their probed lists hold too few rows) are searched exactly."""
    if reference._faiss_index is None:
        index = faiss.IndexFlatIP(reference.features.shape[1])
        index.add(np.ascontiguousarray(reference.features, dtype=np.float32))
        reference._faiss_index = index
    # a few candidates more than asked: neighbours whose float32 scores tie (duplicated
    # training images) are re-ranked exactly below
    fetch = min(len(reference), k + _FAISS_SPARE)
    _, rows = reference._faiss_index.search(np.ascontiguousarray(query, dtype=np.float32),
                                            fetch)
    missing = rows < 0  # an IVF index returns -1 past the members of the probed lists
    rows = np.where(missing, 0, rows)
    sims = np.empty(rows.shape)
    for start in range(0, len(query), _RESCORE_QUERIES):  # each query with its own candidates
        block = slice(start, start + _RESCORE_QUERIES)
        cand = np.asarray(reference.features[rows[block].ravel()])
        sims[block] = backend.paired_similarity(query[block],
                                                cand.reshape(*rows[block].shape, -1))
    sims[missing] = -np.inf
    idx = np.where(missing, np.iinfo(np.int64).max, reference.indices[rows])
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    sims, idx = np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
    short = np.flatnonzero((~missing).sum(axis=1) < k)
    if len(short):
        source = ((reference.indices[r], f) for r, f in reference.chunks(batch_size))
        sims[short], idx[short] = _blocked_search(query[short], source,
                                                  -(-len(reference) // batch_size), backend, k)
    return sims, idx


def _query_features(query: np.ndarray | CXRDataset, backend: SimilarityBackend,
                    batch_size: int) -> np.ndarray:
    if isinstance(query, CXRDataset):
        if len(query) == 0:
            raise DataError("the query dataset has no images", path=query.root)
        return np.concatenate([backend.features(images) for _, images in
                               query.iter_images(size=_load_size(backend),
                                                 batch_size=batch_size)])
    images = as_image_batch(query, name="query images")
    return np.concatenate([backend.features(images[i:i + batch_size])
                           for i in range(0, len(images), batch_size)])


def _split_positions(dataset: CXRDataset, split: str | None) -> np.ndarray:
    if not isinstance(dataset, CXRDataset):
        raise ConfigError(f"expected a CXRDataset, got {type(dataset).__name__}")
    if split is None:
        return np.arange(len(dataset), dtype=np.int64)
    dataset.subset(split=split)  # validates the split name
    pos = np.array([i for i, s in enumerate(dataset) if s.split == split], dtype=np.int64)
    if len(pos) == 0:
        raise DataError(f"the dataset has no {split!r} records (splits: "
                        f"{dict(dataset.split_counts())}); pass split=None to use all records",
                        path=dataset.root)
    return pos


def one_blas_thread() -> Any:
    """A context that limits BLAS to one thread per process during a similarity search
    (OpenBLAS with two threads on two busy cores spins and runs many times slower); results do
    not change."""
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    return threadpool_limits(limits=1, user_api="blas")


def _load_size(backend: SimilarityBackend) -> int:
    """Side at which dataset images are loaded for ``backend``."""
    size = getattr(backend, "size", None)
    if size is None:
        size = getattr(backend, "image_size", None)
    if size is None:
        raise ConfigError(f"backend {backend.name!r} has no image size to load dataset images "
                          "at; pass size=N (pixel backends) or an encoder with an image_size")
    return int(size)


def _check_batch_size(batch_size: Any) -> int:
    return check_int("batch_size", batch_size)


def _cache_name(key: dict[str, Any], source: dict[str, Any]) -> str:
    digest = sha256_text(stable_json({"backend": key, "source": source}))[:12]
    return f"reference-{key.get('backend', 'features')}-{digest}"

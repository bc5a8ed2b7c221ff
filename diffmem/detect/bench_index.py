"""``diffmem bench index``: build and query cost of the reference index at scale, on synthetic
feature vectors, against a brute-force NumPy baseline measured in the same run.

The data are synthetic, and their structure is designed in: ``rows`` vectors of dimension
``dim`` drawn from a seeded Gaussian mixture (``clusters`` centres on the unit sphere, each
vector its centre plus isotropic noise of the same expected norm), L2-normalized, like image
embeddings that gather by patient, view and device. IVF search works because such data have
clusters for its k-means lists to follow; ``data="uniform"`` draws uniform vectors on the
sphere instead, the worst case for IVF (no clusters: nprobe must grow towards an exhaustive
search to keep recall@1). The queries are fresh draws from the same distribution (not indexed
rows).

The features are written as an index folder's ``features.npy`` and the index is completed by
the real build code (:func:`~diffmem.detect.index.finish_index` with ``use_faiss="ivf"``: IVF
training, streamed adding, the nprobe choice on a leave-one-out probe, the card). Each
measurement then runs in a fresh process (so its peak RSS is its own,
:func:`~diffmem.attribution.bench_scale.in_fresh_process`), with one BLAS/OpenMP thread:

1. **build**: the IVF index: seconds and peak RSS;
2. **brute force (the baseline)**: plain NumPy, the whole feature matrix loaded in memory,
   ``argmax(Q @ F.T)`` over 256-query blocks;
3. **blocked exact**: the index searched without FAISS
   (:func:`~diffmem.detect.neighbors.search_features`: the backend's float64 cosine over
   256-row blocks of the memory-mapped features, with a running top-k);
4. **FAISS flat**: an exact ``IndexFlatIP`` built in the process from the features, then the
   same search path (candidates re-scored in float64);
5. **FAISS IVF**: the index folder opened as detect opens it
   (:func:`~diffmem.detect.index.load_index`), searched with the nprobe chosen at build.

For each: queries per second (top-1, search only), peak RSS, and recall@1 against the brute
force (a query counts when the top-1 row is the same, or its similarity equal within 1e-6).
The ratio is each method's throughput over the baseline's, so a busy machine slows both.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import check_int
from diffmem.errors import ConfigError

__all__ = ["IndexBench", "bench_index", "format_index_bench", "synthetic_features"]

DATA_KINDS = ("gmm", "uniform")
METHODS = ("brute", "blocked", "faiss_flat", "faiss_ivf")
_LABELS = {"brute": "brute force (NumPy)", "blocked": "blocked exact",
           "faiss_flat": "FAISS flat (exact)", "faiss_ivf": "FAISS IVF (approx.)"}
_CHUNK = 16384
_QUERY_BLOCK = 256


@dataclass
class IndexBench:
    """The numbers of one :func:`bench_index` run.

    Attributes
    ----------
    seed : int
    rows, dim, queries, clusters : int
    data : str
        ``"gmm"`` or ``"uniform"``.
    build : dict
        The IVF build: ``seconds``, ``peak_rss_mib``, ``start_rss_mib`` and the card's
        ``approximate`` entry (nlist, nprobe, recall measured at build).
    methods : list of dict
        Per method: ``method``, ``queries_per_second``, ``search_seconds`` (wall),
        ``search_cpu_seconds``, ``setup_seconds`` (loading, or building the flat index),
        ``peak_rss_mib``, ``recall_at_1`` (vs brute force), ``ratio`` and ``cpu_ratio`` (the
        brute force's search seconds over the method's, wall and CPU).
    machine : dict
    seconds : float
        Wall time of the whole run.
    """

    seed: int
    rows: int
    dim: int
    queries: int
    clusters: int
    data: str
    build: dict[str, Any] = field(default_factory=dict)
    methods: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synthetic_features(path: str | os.PathLike, rows: int, dim: int, *, seed: int = 0,
                       clusters: int = 1000, data: str = "gmm",
                       extra: int = 0) -> np.ndarray:
    """Write ``rows`` synthetic unit vectors to the ``.npy`` file ``path`` (chunk by chunk) and
    return ``extra`` more from the same distribution (the queries).

    ``data="gmm"``: a Gaussian mixture of ``clusters`` centres (see the module docstring);
    ``"uniform"``: uniform on the sphere. The seed fixes both.

    Examples
    --------
    >>> import tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "f.npy")
    >>> q = synthetic_features(f, 100, 8, clusters=4, extra=3)
    >>> np.load(f).shape, q.shape, bool(np.allclose(np.linalg.norm(q, axis=1), 1))
    ((100, 8), (3, 8), True)
    """
    if data not in DATA_KINDS:
        raise ConfigError(f"data={data!r}; use one of {list(DATA_KINDS)}")
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, dim)))
    spread = 1.0 / np.sqrt(dim)  # noise of the centres' norm: ||noise|| ~ 1

    def draw(m: int) -> np.ndarray:
        if data == "uniform":
            return _unit(rng.standard_normal((m, dim))).astype(np.float32)
        x = centres[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, dim))
        return _unit(x).astype(np.float32)

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, _CHUNK):
        out[start:start + _CHUNK] = draw(min(_CHUNK, rows - start))
    out.flush()
    del out
    return draw(extra)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _backend() -> Any:
    from diffmem.detect.similarity import get_backend

    # the features are the "embeddings": the embedding backend's cosine over them
    return get_backend("embedding", encoder=lambda x: x, encoder_id="synthetic-features")


def _limit_threads() -> Any:
    import faiss

    from diffmem.detect.neighbors import one_blas_thread

    faiss.omp_set_num_threads(1)
    return one_blas_thread()


def _build(folder: str, seed: int, queue: Any) -> None:
    """The IVF build by the index code, in its own process."""
    from diffmem.attribution.bench_scale import peak_rss_mib
    from diffmem.detect.index import FEATURES, _npy_shape, finish_index

    os.environ["DIFFMEM_NO_PROGRESS"] = "1"
    backend = _backend()
    n, _ = _npy_shape(Path(folder) / FEATURES)
    start_rss = peak_rss_mib()
    with _limit_threads():
        t0 = time.perf_counter()
        card = finish_index(folder, {"data_fingerprint": "synthetic", "backend":
                                     backend.params()}, backend,
                            study_ids=np.char.add("row", np.arange(n).astype(str)),
                            use_faiss="ivf", seed=seed)
        seconds = time.perf_counter() - t0
    queue.put({"seconds": round(seconds, 3), "peak_rss_mib": round(peak_rss_mib(), 1),
               "start_rss_mib": round(start_rss, 1), "approximate": card.approximate})


def _query(method: str, folder: str, query_file: str, queue: Any) -> None:
    """One method's search of all queries, in its own process."""
    from diffmem.attribution.bench_scale import peak_rss_mib
    from diffmem.detect.index import FEATURES, load_index, read_chunks
    from diffmem.detect.neighbors import search_features

    os.environ["DIFFMEM_NO_PROGRESS"] = "1"
    query = np.load(query_file)
    start_rss = peak_rss_mib()
    backend = _backend()
    with _limit_threads():
        t0 = time.perf_counter()
        if method == "brute":
            feats = np.load(Path(folder) / FEATURES)
        else:
            reference = load_index(folder, backend, with_faiss=method == "faiss_ivf")
            if method == "faiss_flat":
                import faiss

                flat = faiss.IndexFlatIP(query.shape[1])
                for _, chunk in read_chunks(Path(folder) / FEATURES):
                    flat.add(chunk)
                reference._faiss_index = flat
        setup = time.perf_counter() - t0

        def search(q: np.ndarray) -> np.ndarray:
            if method == "brute":
                return np.concatenate([np.argmax(q[i:i + _QUERY_BLOCK] @ feats.T, axis=1)
                                       for i in range(0, len(q), _QUERY_BLOCK)])
            return search_features(q, reference, backend=backend, k=1)[1][:, 0]

        search(query[:8])  # warm-up (lazy imports, first-call costs), not timed
        t0, cpu0 = time.perf_counter(), time.process_time()
        top = search(query)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    queue.put({"method": method, "top": top.astype(np.int64), "search_seconds": seconds,
               "search_cpu_seconds": cpu,
               "setup_seconds": round(setup, 3), "peak_rss_mib": round(peak_rss_mib(), 1),
               "start_rss_mib": round(start_rss, 1)})


def _recall(top: np.ndarray, truth: np.ndarray, query: np.ndarray, folder: Path) -> float:
    """Share of queries whose top-1 row is brute force's, or as similar (within 1e-6)."""
    from diffmem.detect.index import FEATURES

    same = top == truth
    if not same.all():
        feats = np.load(folder / FEATURES, mmap_mode="r")
        rows = np.flatnonzero(~same)
        a = np.einsum("ij,ij->i", query[rows].astype(np.float64), feats[top[rows]])
        b = np.einsum("ij,ij->i", query[rows].astype(np.float64), feats[truth[rows]])
        same[rows] = np.abs(a - b) <= 1e-6
    return float(same.mean())


def bench_index(rows: int = 400_000, dim: int = 512, *, queries: int = 1000, seed: int = 0,
                clusters: int = 1000, data: str = "gmm") -> IndexBench:
    """Measure the reference index's build and search against brute force (module docstring).

    Parameters
    ----------
    rows, dim : int, optional
        Indexed vectors and their dimension (default 400,000 x 512, issue 13's size).
    queries : int, optional
        Query vectors (default 1000).
    seed : int, optional
        Seed of the data, the queries and the IVF build.
    clusters : int, optional
        Gaussian mixture components (``data="gmm"``).
    data : {"gmm", "uniform"}, optional

    Returns
    -------
    IndexBench

    Raises
    ------
    ConfigError
        Sizes that are not positive, fewer rows than 80 (the IVF index needs some per list),
        an unknown ``data``; MissingDependencyError without faiss.
    """
    from diffmem.attribution.bench_scale import in_fresh_process
    from diffmem.detect.bench import machine_info
    from diffmem.detect.neighbors import _import_faiss

    rows = check_int("rows", rows, low=80, hint=" (vectors in the index)")
    dim = check_int("dim", dim, hint=" (feature dimension)")
    queries = check_int("queries", queries)
    clusters = check_int("clusters", clusters)
    check_int("seed", seed, low=0)
    if data not in DATA_KINDS:
        raise ConfigError(f"data={data!r}; use one of {list(DATA_KINDS)}")
    _import_faiss()
    t0 = time.perf_counter()
    bench = IndexBench(seed=int(seed), rows=rows, dim=dim, queries=queries,
                       clusters=clusters if data == "gmm" else 0, data=data)
    with tempfile.TemporaryDirectory(prefix="diffmem-bench-index-") as tmp:
        folder = Path(tmp) / "index"
        folder.mkdir()
        from diffmem.detect.index import FEATURES

        query = synthetic_features(folder / FEATURES, rows, dim, seed=seed, clusters=clusters,
                                   data=data, extra=queries)
        np.save(Path(tmp) / "queries.npy", query)
        bench.build = in_fresh_process(_build, str(folder), int(seed))
        results = [in_fresh_process(_query, m, str(folder), str(Path(tmp) / "queries.npy"))
                   for m in METHODS]
        truth = results[0]["top"]
        base, base_cpu = (max(results[0][k], 1e-9) for k in ("search_seconds",
                                                             "search_cpu_seconds"))
        for r in results:
            wall, cpu, top = r.pop("search_seconds"), r.pop("search_cpu_seconds"), r.pop("top")
            bench.methods.append({**r, "queries_per_second": round(queries / max(wall, 1e-9), 1),
                                  "search_seconds": round(wall, 4),
                                  "search_cpu_seconds": round(cpu, 4),
                                  "recall_at_1": round(_recall(top, truth, query, folder), 4),
                                  "ratio": round(base / max(wall, 1e-9), 2),
                                  "cpu_ratio": round(base_cpu / max(cpu, 1e-9), 2)})
    bench.machine = {**machine_info(), "load_average": [round(x, 2) for x in os.getloadavg()],
                     "threads": 1}
    bench.seconds = round(time.perf_counter() - t0, 2)
    return bench


def format_index_bench(bench: IndexBench) -> str:
    """The table with seed, sizes and machine, for the terminal."""
    m, b = bench.machine, bench.build
    a = b.get("approximate") or {}
    data = (f"Gaussian mixture of {bench.clusters} clusters, L2-normalized (structure designed "
            "in)" if bench.data == "gmm" else "uniform on the sphere (IVF's worst case)")
    lines = [f"diffmem bench index: seed {bench.seed}, {bench.rows} x {bench.dim} float32 "
             f"vectors ({data}), {bench.queries} queries from the same distribution, top-1",
             f"machine: {m.get('platform')}, {m.get('cpus')} CPUs, 1 BLAS/OpenMP thread per "
             f"process, python {m.get('python')}, load average {m.get('load_average')}",
             f"IVF build (index code, fresh process): {b['seconds']:.1f} s, peak RSS "
             f"{b['peak_rss_mib']:.0f} MiB (start {b['start_rss_mib']:.0f}); nlist "
             f"{a.get('nlist')}, nprobe {a.get('nprobe')} (smallest reaching recall@1 "
             f"{a.get('target_recall')} on {a.get('probe_queries')} leave-one-out rows: "
             f"{a.get('recall_at_1')})",
             f"{'method':22s} {'setup s':>8s} {'search s':>9s} {'CPU s':>8s} "
             f"{'queries/s':>10s} {'x brute':>8s} {'x (CPU)':>8s} {'recall@1':>8s} {'peak RSS MiB':>12s}"]
    for r in bench.methods:
        lines.append(f"{_LABELS[r['method']]:22s} {r['setup_seconds']:8.2f} "
                     f"{r['search_seconds']:9.3f} {r['search_cpu_seconds']:8.3f} "
                     f"{r['queries_per_second']:10.1f} {r['ratio']:8.2f} {r['cpu_ratio']:8.2f} "
                     f"{r['recall_at_1']:8.4f} {r['peak_rss_mib']:12.0f}")
    lines.append("baseline: brute force in plain NumPy (features loaded, argmax of Q @ F.T), "
                 "same run, same queries; recall@1 against it; x brute: the baseline's search "
                 "seconds over the method's, wall and CPU (on a busy machine read CPU); each "
                 "row in a fresh process (setup: loading, or building the flat index)")
    lines.append(f"total {bench.seconds:.1f} s")
    return "\n".join(lines)

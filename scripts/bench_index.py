"""Reference index (``diffmem index build``) against the in-process path, measured in one run.

1. Build: the training split's pixel features computed in-process (what every detect, mitigate
   and study run without ``--index`` does) against ``build_index`` (the same features written
   to a memory-mapped file plus a FAISS index), and the seconds to open the index.
2. Verdict setup: :func:`~diffmem.detect.verdicts.prepare_verdicts` (features + threshold
   calibrated on the held-out splits) without and with the index; same threshold checked.
3. Query: the top-2 neighbours of ``--queries`` generations among N reference feature vectors
   (pixel backend, 32 px: 1024 dimensions; random images, seeded) by the exact streaming
   search over in-memory features (the in-process path) and by the index's FAISS search
   (exact ``IndexFlatIP`` + float64 re-ranking); same neighbours checked.

Run niced on a shared machine; the numbers are wall seconds of one repetition each::

    OMP_NUM_THREADS=1 nice -n 19 python scripts/bench_index.py --data DATA --out TMP
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from diffmem.data import load
from diffmem.detect.index import build_index, open_index
from diffmem.detect.neighbors import ReferenceFeatures, nearest_neighbors, one_blas_thread
from diffmem.detect.similarity import get_backend
from diffmem.detect.verdicts import prepare_verdicts


class _Seconds(float):
    """Wall seconds, with the process's CPU seconds (user + system) in ``cpu``."""

    cpu: float = 0.0

    def __format__(self, spec: str) -> str:
        return f"{format(float(self), spec)} wall / {format(self.cpu, spec)} CPU"


def _timed(fn, repeats: int = 1):
    """``fn()`` and its seconds; with repeats, the run with the least CPU time."""
    best = None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        took = _Seconds(time.perf_counter() - t0)
        took.cpu = time.process_time() - c0
        if best is None or took.cpu < best.cpu:
            best = took
    return out, best


def bench_build(data: Path, out: Path) -> None:
    dataset = load(data)
    train = dataset.subset(split="train")
    heldout = dataset.subset(split=["validate", "test"])
    backend = get_backend("pixel")
    with one_blas_thread():
        _, t_inproc = _timed(lambda: ReferenceFeatures.from_dataset(train, backend))
    folder = out / "index"
    shutil.rmtree(folder, ignore_errors=True)
    _, t_build = _timed(lambda: build_index(data, folder, backend))
    _, t_open = _timed(lambda: open_index(folder, train, backend))
    print(f"\n1. build ({len(train)} training images, pixel 32 px), seconds")
    print(f"   in-process features (every run without --index): {t_inproc:8.2f}")
    print(f"   diffmem index build (once):                      {t_build:8.2f}")
    print(f"   open the index (every run with --index):         {t_open:8.3f}")
    a, t_plain = _timed(lambda: prepare_verdicts(train, heldout=heldout, fpr=0.1))
    b, t_index = _timed(lambda: prepare_verdicts(train, heldout=heldout, fpr=0.1, index=folder))
    print(f"2. verdict setup ({len(heldout)} held-out images calibrate the threshold)")
    print(f"   without the index: {t_plain:8.2f}\n   with the index:    {t_index:8.2f}\n"
          f"   same threshold: {a.threshold.value == b.threshold.value}")


def bench_query(sizes: list[int], queries: int, seed: int, chunk: int = 8192) -> None:
    import faiss

    rng = np.random.default_rng(seed)
    backend = get_backend("pixel", size=32)
    query = rng.random((queries, 32, 32), dtype=np.float32)
    print(f"3. query: top-2 of {queries} queries, pixel features (1024-d), seed {seed}; CPU "
          "seconds, least of 3 runs (wall in brackets)")
    print(f"   {'N':>8} {'streaming':>17} {'FAISS':>17} {'CPU ratio':>9} {'FAISS add':>9} "
          f"{'same':>5}")
    for n in sizes:
        feats = np.concatenate([backend.features(rng.random((min(chunk, n - i), 32, 32),
                                                            dtype=np.float32))
                                for i in range(0, n, chunk)])
        ref = ReferenceFeatures(feats, np.arange(n, dtype=np.int64), None, backend.params())
        with one_blas_thread():
            brute, t_brute = _timed(lambda: nearest_neighbors(query, ref, backend=backend,
                                                              k=2, index="brute"), 3)
            index = faiss.IndexFlatIP(feats.shape[1])
            _, t_add = _timed(lambda: index.add(feats))
            ref._faiss_index = index
            fast, t_fast = _timed(lambda: nearest_neighbors(query, ref, backend=backend, k=2),
                                  3)
        same = bool(np.array_equal(brute.indices, fast.indices))
        print(f"   {n:>8} {t_brute.cpu:>8.3f} [{float(t_brute):>6.2f}] {t_fast.cpu:>8.3f} "
              f"[{float(t_fast):>6.2f}] {t_brute.cpu / max(t_fast.cpu, 1e-9):>8.1f}x "
              f"{t_add.cpu:>9.3f} {str(same):>5}")
        del feats, ref, index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a dataset (e.g. diffmem synth --preset demo)")
    p.add_argument("--out", type=Path, required=True, help="scratch folder")
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU(s), load "
          f"{os.getloadavg()[0]:.1f}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"numpy {np.__version__}")
    if args.data is not None:
        bench_build(args.data, args.out)
    bench_query([int(s) for s in args.sizes.split(",")], args.queries, args.seed)


if __name__ == "__main__":
    main()

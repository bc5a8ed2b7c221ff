"""``diffmem bench scale``: how the model-free prompt scan's cost grows with the number of
prompts.

For each size, a prompts file is written by :func:`diffmem.data.synth.prompts.write_synthetic_prompts`
(MIMIC-style prompts with planted exact and near-duplicate clusters; the seed fixes them), then
a fresh process (``multiprocessing`` spawn, so each size's peak RSS is its own) times:

1. the **baseline**, measured in the same run on the same file: one streamed pass that reads
   and counts the prompts (:func:`diffmem.data.prompts.iter_prompts`): the linear floor that
   any scan pays, so the ratio scan / baseline is robust to how busy the machine is;
2. the **scan**: :func:`diffmem.attribution.scan_prompts` without a model (token ranking, exact
   and near-duplicate clusters with MinHash LSH), wall time, CPU time (user + system of the
   process) and the process's peak RSS.

The growth exponent is the slope of a least-squares line through (log size, log seconds): 1
is linear, 2 quadratic. It is fitted on the sizes of one run; small sizes are dominated by
fixed costs, so the exponent says more with sizes that span a factor of 10 or more.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as _queue
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import check_int
from diffmem.errors import ConfigError

__all__ = ["DEFAULT_SIZES", "ScaleBench", "bench_scale", "format_scale_bench",
           "growth_exponent", "in_fresh_process", "peak_rss_mib"]

#: Prompt counts of a default run (``--sizes`` takes others, e.g. 250000).
DEFAULT_SIZES = (2000, 10000, 50000)


@dataclass
class ScaleBench:
    """The numbers of one :func:`bench_scale` run.

    Attributes
    ----------
    seed : int
        Seed of the synthetic prompts.
    sizes : list of int
    rows : list of dict
        Per size: ``n``, ``distinct`` prompts, ``clusters`` found, ``baseline_seconds``,
        ``scan_wall_seconds``, ``scan_cpu_seconds``, ``ratio`` (scan wall / baseline),
        ``peak_rss_mib`` and ``start_rss_mib`` (after imports, before reading).
    exponents : dict
        Growth exponents of ``scan_wall_seconds``, ``scan_cpu_seconds``,
        ``baseline_seconds`` and ``peak_rss_mib`` (None with fewer than 2 sizes).
    machine : dict
    seconds : float
        Wall time of the whole run (file writing included).
    """

    seed: int
    sizes: list[int]
    rows: list[dict[str, Any]] = field(default_factory=list)
    exponents: dict[str, float | None] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def growth_exponent(sizes: Sequence[float], values: Sequence[float]) -> float | None:
    """Slope of the least-squares line through ``(log size, log value)``; None with fewer than
    two sizes or a value that is not positive.

    Examples
    --------
    >>> round(growth_exponent([1000, 10000, 100000], [2.0, 20.0, 200.0]), 6)
    1.0
    >>> round(growth_exponent([10, 20, 40], [1.0, 4.0, 16.0]), 6)
    2.0
    """
    x, y = np.asarray(sizes, dtype=float), np.asarray(values, dtype=float)
    if len(x) < 2 or len(set(x.tolist())) < 2 or not np.all(y > 0):
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(target: Any, *args: Any) -> Any:
    """What ``target(*args, queue)`` puts on ``queue``, run in a fresh (``spawn``) process, so
    that the peak RSS it measures (:func:`peak_rss_mib`) is its own.

    Raises
    ------
    RuntimeError
        When the process ends without a result (its error is on its stderr).
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        while True:
            try:
                return queue.get(timeout=1.0)
            except _queue.Empty:
                if not proc.is_alive() and queue.empty():
                    raise RuntimeError(f"the measuring process {target.__name__} ended "
                                       f"(exit code {proc.exitcode}) without a result") from None
    finally:
        proc.join()


def _measure(path: str, queue: Any) -> None:
    """One size, in its own process: the baseline pass, then the scan."""
    from diffmem.attribution import scan_prompts
    from diffmem.data.prompts import iter_prompts

    start_rss = peak_rss_mib()
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_prompts(path))
    baseline = time.perf_counter() - t0
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = scan_prompts(text for _, text in iter_prompts(path))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    dup = result.summary["duplicates"]
    queue.put({"n": n, "distinct": result.summary["n_distinct"], "clusters": dup["clusters"],
               "baseline_seconds": round(baseline, 4), "scan_wall_seconds": round(wall, 4),
               "scan_cpu_seconds": round(cpu, 4), "ratio": round(wall / max(baseline, 1e-9), 2),
               "peak_rss_mib": round(peak_rss_mib(), 1), "start_rss_mib": round(start_rss, 1)})


def bench_scale(sizes: Sequence[int] = DEFAULT_SIZES, *, seed: int = 0) -> ScaleBench:
    """Time the model-free prompt scan at each size (see the module docstring).

    Parameters
    ----------
    sizes : sequence of int
        Prompt counts, each at least 40 (the synthetic generator plants two clusters of 20).
    seed : int, optional
        Seed of the synthetic prompts.

    Returns
    -------
    ScaleBench

    Raises
    ------
    ConfigError
        For a size below 40, repeated sizes or a bad seed.
    """
    from diffmem.data.synth.prompts import write_synthetic_prompts
    from diffmem.detect.bench import machine_info

    sizes = [check_int("size", n, low=40, hint="the synthetic prompts plant two clusters of 20")
             for n in sizes]
    if not sizes or len(set(sizes)) != len(sizes):
        raise ConfigError(f"sizes={sizes!r}; give distinct prompt counts, e.g. 2000 10000 50000")
    check_int("seed", seed, low=0)
    t0 = time.perf_counter()
    bench = ScaleBench(seed=int(seed), sizes=sorted(sizes))
    with tempfile.TemporaryDirectory(prefix="diffmem-bench-scale-") as tmp:
        for n in bench.sizes:
            path = Path(tmp) / f"prompts-{n}.txt"
            write_synthetic_prompts(path, n, seed=seed)
            bench.rows.append(in_fresh_process(_measure, str(path)))
    for key in ("scan_wall_seconds", "scan_cpu_seconds", "baseline_seconds", "peak_rss_mib"):
        bench.exponents[key] = growth_exponent([r["n"] for r in bench.rows],
                                               [r[key] for r in bench.rows])
    bench.machine = {**machine_info(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    bench.seconds = round(time.perf_counter() - t0, 2)
    return bench


def format_scale_bench(bench: ScaleBench) -> str:
    """The table, the exponents and the machine, for the terminal."""
    m = bench.machine
    lines = [f"diffmem bench scale: model-free prompt scan, seed {bench.seed}, sizes "
             f"{', '.join(map(str, bench.sizes))}",
             f"machine: {m.get('platform')}, {m.get('cpus')} CPUs, python {m.get('python')}, "
             f"load average {m.get('load_average')}",
             f"{'prompts':>9s} {'distinct':>9s} {'clusters':>8s} {'baseline s':>10s} "
             f"{'scan wall s':>11s} {'scan CPU s':>10s} {'scan/base':>9s} {'peak RSS MiB':>12s}"]
    for r in bench.rows:
        lines.append(f"{r['n']:9d} {r['distinct']:9d} {r['clusters'] or 0:8d} "
                     f"{r['baseline_seconds']:10.3f} {r['scan_wall_seconds']:11.3f} "
                     f"{r['scan_cpu_seconds']:10.3f} {r['ratio']:9.1f} {r['peak_rss_mib']:12.1f}")
    e = bench.exponents

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    lines.append(f"growth exponent (log-log slope): scan wall {fmt(e.get('scan_wall_seconds'))}, "
                 f"scan CPU {fmt(e.get('scan_cpu_seconds'))}, baseline (read + count) "
                 f"{fmt(e.get('baseline_seconds'))}, peak RSS {fmt(e.get('peak_rss_mib'))}")
    lines.append("baseline: one streamed read of the same file in the same process, before the "
                 "scan; each size runs in a fresh process (peak RSS includes the imports, "
                 "start RSS in the JSON)")
    lines.append(f"total {bench.seconds:.1f} s")
    return "\n".join(lines)

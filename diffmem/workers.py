"""Per-prompt model work over several processes: the one process pool of ``diffmem scan --model
M --workers N`` and ``diffmem mitigate --workers N``.

Each worker is a fresh (``spawn``) process that opens the model folder once (on the parent
adapter's device and dtype, with ``threads`` torch threads; a bare ``cuda`` device with several
GPUs visible puts the workers on different GPUs, :func:`worker_devices`) and then runs tasks
``fn(adapter, task)``; ``fn`` is a module-level function (it is pickled by name). The caller
decides what a task is (a shard of prompts for scan, one mitigation unit for mitigate) and
keeps everything that must happen once (merging, writing the store) in the parent. Workers
import diffmem afresh: a method registered at run time in the parent (a custom mitigation or
attribution method) is unknown to them; run those with one worker.

A task's result does not depend on which process runs it as long as the task itself is
seeded: generations take their noise from :func:`~diffmem.models.generation_seed` (seed,
prompt, index). With the same number of torch threads per process the numbers are identical to
one process; a different thread count can change the last bits of CPU reductions.

Examples
--------
>>> shards(list("abcdefg"), workers=2)
[['a', 'b'], ['c', 'd'], ['e', 'f'], ['g']]
>>> worker_threads(2, threads=3)
3
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from diffmem.checks import check_int
from diffmem.errors import ConfigError
from diffmem.utils import progress, progress_bar

__all__ = ["WorkerPool", "check_workers", "shards", "worker_devices", "worker_threads"]

# shards per worker: small enough to balance prompts of different lengths, large enough that
# the per-task overhead (pickling a few results) stays small
_SHARDS_PER_WORKER = 2

_worker_adapter: Any = None  # the model, opened once per worker process


def check_workers(workers: Any, adapter: Any = None) -> int:
    """``workers`` as a positive int; with ``workers > 1`` and an ``adapter``, that adapter must
    come from a model folder (each worker opens the folder again).

    Raises
    ------
    ConfigError
        ``workers`` not a positive integer, or a model that was not opened from a folder.
    """
    workers = check_int("workers", workers, hint=" (processes for the per-prompt work)")
    if workers > 1 and adapter is not None and getattr(adapter, "source", None) is None:
        raise ConfigError(f"workers={workers} needs a model opened from a folder (each worker "
                          "opens it again); pass the model folder (save a pipeline with "
                          "save_pretrained first), or workers=1")
    return workers


def worker_threads(workers: int, threads: int | None = None) -> int:
    """Torch threads per worker: ``threads``, or the CPUs divided among the ``workers``."""
    if threads is None:
        return max(1, (os.cpu_count() or 1) // workers)
    return check_int("threads", threads, hint=" (torch threads per worker)")


def shards(items: Sequence[Any], *, workers: int) -> list[list[Any]]:
    """Contiguous pieces of ``items``, ``_SHARDS_PER_WORKER`` per worker (fewer when short)."""
    size = max(1, math.ceil(len(items) / (workers * _SHARDS_PER_WORKER)))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def worker_devices(device: str, workers: int, cuda_devices: int) -> list[str]:
    """The device of each worker: a bare ``cuda`` with several GPUs visible spreads the workers
    over them (worker ``i`` on ``cuda:i mod n``); any other device (``cpu``, ``mps``, an
    explicit ``cuda:N``) is every worker's.

    >>> worker_devices("cuda", 3, cuda_devices=2)
    ['cuda:0', 'cuda:1', 'cuda:0']
    >>> worker_devices("cuda:1", 2, cuda_devices=4), worker_devices("cpu", 2, cuda_devices=0)
    (['cuda:1', 'cuda:1'], ['cpu', 'cpu'])
    """
    if device == "cuda" and cuda_devices > 1:
        return [f"cuda:{i % cuda_devices}" for i in range(workers)]
    return [device] * workers


def _init_worker(source: str, devices: Any, dtype: str | None, threads: int) -> None:
    global _worker_adapter
    import torch

    from diffmem.models import load_model

    os.environ["DIFFMEM_NO_PROGRESS"] = "1"
    torch.set_num_threads(threads)
    # each worker takes the next device of the queue (one entry per worker)
    _worker_adapter = load_model(source, device=devices.get(), dtype=dtype)


def _run_task(fn: Callable[[Any, Any], Any], task: Any) -> Any:
    return fn(_worker_adapter, task)


class WorkerPool:
    """Processes that each open the model once and run tasks ``fn(adapter, task)``; use as a
    context manager, and call :meth:`imap` as often as needed (the workers and their model stay
    up between calls). With ``workers=1`` the tasks run here, with ``adapter``.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
        The model. With ``workers > 1`` it must come from a model folder (``adapter.source``):
        each worker opens that folder on the adapter's device and dtype.
    workers : int
        Processes; 1 runs the tasks in this process, in order.
    threads : int, optional
        Torch threads per worker (default: the CPUs divided among the workers).

    Raises
    ------
    ConfigError
        From :func:`check_workers` and :func:`worker_threads`.
    """

    def __init__(self, adapter: Any, *, workers: int, threads: int | None = None):
        self.adapter = adapter
        self.workers = check_workers(workers, adapter)
        self.threads = worker_threads(self.workers, threads) if self.workers > 1 else None
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:  # started at the first task, so an empty run spawns nothing
            import torch

            a = self.adapter
            dtype = str(a.dtype).replace("torch.", "") if a.dtype is not None else None
            context = multiprocessing.get_context("spawn")
            devices = context.Queue()
            requested = str(a.device)  # a bare "cuda" spreads the workers over the GPUs
            for device in worker_devices(requested, self.workers,
                                         torch.cuda.device_count() if requested == "cuda"
                                         else 0):
                devices.put(device)
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=context, initializer=_init_worker,
                initargs=(str(a.source), devices, dtype, self.threads))
        return self._pool

    def imap(self, fn: Callable[[Any, Any], Any], tasks: Sequence[Any], *, desc: str,
             unit: str = "task") -> Iterator[tuple[int, Any]]:
        """Run ``fn(adapter, task)`` for every task; yield ``(index, result)`` as each finishes.

        Parameters
        ----------
        fn : callable
            A module-level function ``fn(adapter, task)`` (pickled by name for the workers).
        tasks : sequence
            Picklable task descriptions.
        desc, unit : str
            The progress bar's label and unit.

        Yields
        ------
        (int, object)
            A task's index in ``tasks`` and its result: in task order in this process, in order
            of completion with several workers (so the caller can store each as soon as it is
            done).
        """
        if self.workers == 1:
            for i, task in enumerate(progress(tasks, desc=desc, unit=unit)):
                yield i, fn(self.adapter, task)
            return
        if not tasks:
            return
        pool = self._executor()
        bar = progress_bar(total=len(tasks), desc=f"{desc} ({self.workers} workers)", unit=unit)
        pending = {pool.submit(_run_task, fn, task): i for i, task in enumerate(tasks)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=pending.get):
                    i = pending.pop(future)
                    bar.update(1)
                    yield i, future.result()
        finally:
            for future in pending:
                future.cancel()
            bar.close()


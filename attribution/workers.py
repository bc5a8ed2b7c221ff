"""Per-prompt attribution over several processes (``diffmem scan --model M --workers N``).

Each worker is a fresh (``spawn``) process that opens the model folder once and attributes a
contiguous shard of the prompts; the shards come back in order, so the parent sees the same
list as one process computing them one after the other, and everything it derives from that
list (weights, sums, the ranking) is the same. The attribution of one prompt does not depend
on which process runs it: its noises come from
:func:`~diffmem.models.generation_seed` (seed, prompt, index). With the same number of torch
threads per process the numbers are identical; a different thread count can change the last
bits of CPU reductions.

Examples
--------
>>> shards(list("abcdefg"), workers=2)
[['a', 'b'], ['c', 'd'], ['e', 'f'], ['g']]
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

from diffmem.checks import check_int
from diffmem.errors import ConfigError, PromptError
from diffmem.utils import progress

log = logging.getLogger(__name__)

__all__ = ["Attributed", "attribute_prompts", "shards"]

# shards per worker: small enough to balance prompts of different lengths, large enough that
# the per-task overhead (pickling a few results) stays small
_SHARDS_PER_WORKER = 2

_worker_adapter: Any = None  # the model, opened once per worker process


class Attributed(NamedTuple):
    """One prompt's attribution, or why it was skipped."""

    prompt: str
    result: Any  # TokenAttribution, or None when skipped
    skipped: str | None
    truncated: bool


def shards(items: Sequence[Any], *, workers: int) -> list[list[Any]]:
    """Contiguous pieces of ``items``, ``_SHARDS_PER_WORKER`` per worker (fewer when short)."""
    size = max(1, math.ceil(len(items) / (workers * _SHARDS_PER_WORKER)))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _attribute_one(adapter: Any, fn: Any, prompt: str,
                   trajectory: dict[str, Any]) -> Attributed:
    try:
        result = fn(adapter, prompt, **trajectory, truncate=True)
    except PromptError as e:
        log.debug("skipped %r: %s", prompt, e)
        why = "only markers" if "only of de-identification" in str(e) else "unusable"
        return Attributed(prompt, None, why, False)
    return Attributed(prompt, result, None, adapter.count_tokens(prompt) > adapter.max_length)


def _init_worker(source: str, device: str, dtype: str | None, threads: int) -> None:
    global _worker_adapter
    import torch

    from diffmem.models import load_model

    os.environ["DIFFMEM_NO_PROGRESS"] = "1"
    torch.set_num_threads(threads)
    _worker_adapter = load_model(source, device=device, dtype=dtype)


def _attribute_shard(task: tuple[str, list[str], dict[str, Any]]) -> list[Attributed]:
    from diffmem.attribution.methods import get_method

    method, prompts, trajectory = task
    fn = get_method(method)
    return [_attribute_one(_worker_adapter, fn, p, trajectory) for p in prompts]


def attribute_prompts(adapter: Any, prompts: Sequence[str], *, method: str,
                      trajectory: dict[str, Any], workers: int = 1,
                      threads: int | None = None) -> list[Attributed]:
    """Attribute every prompt with ``method``, in one process or several.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
        The model. With ``workers > 1`` it must come from a model folder
        (``adapter.source``): each worker opens that folder on the adapter's device and dtype.
    prompts : sequence of str
    method : str
        Attribution method name (:func:`~diffmem.attribution.list_methods`).
    trajectory : dict
        The method's ``generations``, ``steps``, ``num_inference_steps``, ``guidance``,
        ``seed`` and ``batch_size``.
    workers : int, optional
        Processes (default 1: this one).
    threads : int, optional
        Torch threads per worker (default: the CPUs divided among the workers).

    Returns
    -------
    list of Attributed
        One per prompt, in the order of ``prompts``.

    Raises
    ------
    ConfigError
        ``workers`` not a positive integer, or ``workers > 1`` with a model that was not
        opened from a folder.
    """
    from diffmem.attribution.methods import get_method

    workers = check_int("workers", workers, hint=" (processes for the per-prompt work)")
    fn = get_method(method)
    if workers == 1 or len(prompts) <= 1:
        return [_attribute_one(adapter, fn, p, trajectory)
                for p in progress(prompts, desc=f"attribution ({method})", unit="prompt")]
    source = getattr(adapter, "source", None)
    if source is None:
        raise ConfigError(f"workers={workers} needs a model opened from a folder (each worker "
                          "opens it again); pass the model folder, or workers=1")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
    threads = check_int("threads", threads)
    dtype = str(adapter.dtype).replace("torch.", "") if adapter.dtype is not None else None
    parts = shards(list(prompts), workers=workers)
    tasks = [(method, part, dict(trajectory)) for part in parts]
    out: list[Attributed] = []
    with ProcessPoolExecutor(max_workers=min(workers, len(parts)),
                             mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(str(source), str(adapter.device), dtype, threads)) as pool:
        bar = progress(pool.map(_attribute_shard, tasks), desc=f"attribution ({method}, "
                       f"{workers} workers)", total=len(tasks), unit="shard")
        for part in bar:
            out.extend(part)
    return out

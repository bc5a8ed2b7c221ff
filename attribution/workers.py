"""Per-prompt attribution over several processes (``diffmem scan --model M --workers N``).

The process pool is :class:`diffmem.workers.WorkerPool` (shared with ``diffmem mitigate``):
each worker opens the model folder once and attributes contiguous shards of the prompts
(:func:`diffmem.workers.shards`); the shards are put back in prompt order, so the parent sees
the same list as one process computing them one after the other, and everything it derives from
that list (weights, sums, the ranking) is the same. The attribution of one prompt does not
depend on which process runs it: its noises come from
:func:`~diffmem.models.generation_seed` (seed, prompt, index). With the same number of torch
threads per process the numbers are identical; a different thread count can change the last
bits of CPU reductions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

from diffmem.errors import PromptError
from diffmem.utils import progress
from diffmem.workers import WorkerPool, check_workers, shards

log = logging.getLogger(__name__)

__all__ = ["Attributed", "attribute_prompts", "shards"]


class Attributed(NamedTuple):
    """One prompt's attribution, or why it was skipped."""

    prompt: str
    result: Any  # TokenAttribution, or None when skipped
    skipped: str | None
    truncated: bool


def _attribute_one(adapter: Any, fn: Any, prompt: str,
                   trajectory: dict[str, Any]) -> Attributed:
    try:
        result = fn(adapter, prompt, **trajectory, truncate=True)
    except PromptError as e:
        log.debug("skipped %r: %s", prompt, e)
        why = "only markers" if "only of de-identification" in str(e) else "unusable"
        return Attributed(prompt, None, why, False)
    return Attributed(prompt, result, None, adapter.count_tokens(prompt) > adapter.max_length)


def _attribute_shard(adapter: Any, task: tuple[str, list[str], dict[str, Any]],
                     ) -> list[Attributed]:
    from diffmem.attribution.methods import get_method

    method, prompts, trajectory = task
    fn = get_method(method)
    return [_attribute_one(adapter, fn, p, trajectory) for p in prompts]


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

    workers = check_workers(workers, adapter)
    fn = get_method(method)
    if workers == 1 or len(prompts) <= 1:
        return [_attribute_one(adapter, fn, p, trajectory)
                for p in progress(prompts, desc=f"attribution ({method})", unit="prompt")]
    tasks = [(method, part, dict(trajectory)) for part in shards(list(prompts), workers=workers)]
    parts: list[list[Attributed]] = [[] for _ in tasks]
    with WorkerPool(adapter, workers=workers, threads=threads) as pool:
        for i, part in pool.imap(_attribute_shard, tasks, desc=f"attribution ({method})",
                                 unit="shard"):
            parts[i] = part
    return [a for part in parts for a in part]

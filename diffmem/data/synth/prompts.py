"""A large MIMIC-style prompts file with planted exact and near-duplicate clusters (for scale
tests of ``diffmem scan``).

The sentences come from :func:`~diffmem.data.synth.reports.write_report` impressions (a pool of
``pool_reports`` reports, split into sentences, so ``___`` markers and PHI-like times appear at
MIMIC-like rates). A background prompt joins one to five pool sentences, a third of them
followed by a communication sentence with markers; 15% of the background lines are one of
a few normal impressions ("No acute cardiopulmonary process."), so common prompts repeat as in
MIMIC-CXR. Planted on top, with ground truth:

* **exact clusters**: one long prompt (five to seven sentences and a communication sentence)
  repeated 2-20 times;
* **near clusters**: one long prompt and 3-8 light edits of it (a time changed, one word
  swapped or dropped), each edit one to two times.

The answer is designed into the data: a planted near cluster differs by one edit in a prompt
of about 40-80 units. A changed time is the same ``<phi:time>`` unit (TF-IDF cosine 1 to the
original); a swapped or dropped word changes one unigram and two bigrams, cosine about 0.8-0.95
depending on how rare they are, so not every edit reaches a 0.9 threshold: a test of a
duplicate search should ask for the members the threshold joins (see ``tests/
test_scan_scale.py``), not all of them. Background prompts that share most of their
sentences also form (unplanned) near-duplicate clusters.

Examples
--------
>>> p = synthetic_prompts(500, seed=0)
>>> len(p.prompts), len(p.exact) > 0, len(p.near) > 0
(500, True, True)
>>> len({p.prompts[i] for i in p.exact[0]})
1
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffmem.data.reports import normalize_whitespace
from diffmem.data.synth.findings import (chronic_traits, evolve_findings, initial_icu_findings,
                                         random_outpatient_findings)
from diffmem.data.synth.reports import MARKER, ReportStyle, write_report
from diffmem.errors import ConfigError

__all__ = ["PlantedPrompts", "synthetic_prompts", "write_synthetic_prompts"]

_NORMALS = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
            "No acute intrathoracic process.", "No evidence of acute disease.",
            "No relevant change.", "Stable chest radiograph.")
_SENTENCE_END = re.compile(r"(?<=[.?])\s+(?=[A-Z0-9])")
_ENUM = re.compile(r"^\d+\.\s*")
_TIME = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_SWAPS = (("unchanged", "stable"), ("stable", "unchanged"), ("small", "trace"),
          ("moderate", "mild"), ("right", "left"), ("likely", "probably"),
          ("telephone", "phone"), ("notified", "informed"))


@dataclass
class PlantedPrompts:
    """Prompts with planted duplicate clusters.

    Attributes
    ----------
    prompts : list of str
        One prompt per line of the file, in file order.
    exact, near : list of list of int
        0-based line numbers of every planted exact / near-duplicate cluster.
    seed : int
    """

    prompts: list[str]
    exact: list[list[int]]
    near: list[list[int]]
    seed: int


def _sentence_pool(rng: np.random.Generator, n_reports: int) -> list[str]:
    pool = []
    for i in range(n_reports):
        icu = rng.random() < 0.5
        chronic = chronic_traits(rng, icu=icu)
        if icu:
            prior = initial_icu_findings(rng, chronic)
            findings = evolve_findings(prior, rng)
        else:
            prior = None
            findings = random_outpatient_findings(rng, abnormal_rate=0.5, chronic=chronic)
        report = write_report(rng, sex="F" if i % 2 else "M", view="AP" if icu else "PA",
                              findings=findings, prior=prior, style=ReportStyle())
        for s in _SENTENCE_END.split(normalize_whitespace(report.impression)):
            s = _ENUM.sub("", s).strip()
            if len(s) > 3:
                pool.append(s)
    return pool


def _communication(rng: np.random.Generator) -> str:
    hour, minute = int(rng.integers(1, 13)), int(rng.integers(0, 60))
    when = MARKER if rng.random() < 0.5 else f"{hour}:{minute:02d} {'ap'[int(rng.integers(2))]}.m."
    return (f"Dr. {MARKER} was notified by Dr. {MARKER} by telephone at {when} on {MARKER}, "
            "at the time of discovery.")


def _edit(prompt: str, rng: np.random.Generator) -> str:
    """One light edit of ``prompt`` (a near duplicate of it): a time of day changed, one word
    swapped for a synonym or antonym, or one word dropped."""
    time_of_day = _TIME.search(prompt)
    choice = rng.random()
    if time_of_day and choice < 0.4:
        minute = (int(time_of_day.group(2)) + int(rng.integers(1, 59))) % 60
        return prompt[:time_of_day.start(2)] + f"{minute:02d}" + prompt[time_of_day.end(2):]
    words = prompt.split(" ")
    swaps = [(i, b) for i, w in enumerate(words) for a, b in _SWAPS if w == a]
    if choice < 0.8 and swaps:
        i, new = swaps[int(rng.integers(len(swaps)))]
        return " ".join(words[:i] + [new] + words[i + 1:])
    i = int(rng.integers(len(words)))
    return " ".join(words[:i] + words[i + 1:])


def synthetic_prompts(n: int, *, seed: int = 0, exact_clusters: int | None = None,
                      near_clusters: int | None = None, pool_reports: int = 2000
                      ) -> PlantedPrompts:
    """``n`` MIMIC-style prompts with planted exact and near-duplicate clusters (see the module
    docstring).

    Parameters
    ----------
    n : int
        Number of prompts (lines).
    seed : int, optional
    exact_clusters, near_clusters : int, optional
        Planted clusters of each kind (default ``max(1, n // 2500)`` each).
    pool_reports : int, optional
        Reports written to draw sentences from.

    Returns
    -------
    PlantedPrompts
    """
    n_exact = max(1, n // 2500) if exact_clusters is None else int(exact_clusters)
    n_near = max(1, n // 2500) if near_clusters is None else int(near_clusters)
    if n < 20 * (n_exact + n_near):
        raise ConfigError(f"n={n} is too small for {n_exact} + {n_near} planted clusters; use "
                          f"n >= {20 * (n_exact + n_near)} or fewer clusters")
    rng = np.random.default_rng(seed)
    pool = _sentence_pool(rng, pool_reports)

    def long_prompt() -> str:
        k = int(rng.integers(5, 8))
        picked = [pool[int(j)] for j in rng.integers(len(pool), size=k)]
        return " ".join(picked + [_communication(rng)])

    planted: list[tuple[str, list[str]]] = []
    for _ in range(n_exact):
        planted.append(("exact", [long_prompt()] * int(rng.integers(2, 21))))
    for _ in range(n_near):
        base = long_prompt()
        members = [base]
        for _ in range(int(rng.integers(3, 9))):
            members += [_edit(base, rng)] * int(rng.integers(1, 3))
        planted.append(("near", members))
    lines: list[str] = []
    for _ in range(n - sum(len(m) for _, m in planted)):
        if rng.random() < 0.15:
            lines.append(_NORMALS[int(rng.integers(len(_NORMALS)))])
            continue
        k = 1 + min(int(rng.geometric(0.3)) - 1, 4)
        text = " ".join(pool[int(j)] for j in rng.integers(len(pool), size=k))
        if rng.random() < 0.33:
            text += " " + _communication(rng)
        lines.append(text)
    tags = [-1] * len(lines)
    for c, (_, members) in enumerate(planted):
        lines += members
        tags += [c] * len(members)
    order = rng.permutation(len(lines))
    prompts = [lines[i] for i in order]
    groups: list[list[int]] = [[] for _ in planted]
    for line, i in enumerate(order):
        if tags[i] >= 0:
            groups[tags[i]].append(line)
    return PlantedPrompts(prompts,
                          [g for g, (kind, _) in zip(groups, planted) if kind == "exact"],
                          [g for g, (kind, _) in zip(groups, planted) if kind == "near"], seed)


def write_synthetic_prompts(path: str | os.PathLike, n: int, *, seed: int = 0,
                            **options) -> Path:
    """Write :func:`synthetic_prompts` to ``path`` (one prompt a line) and its ground truth to
    ``path`` + ``.truth.json`` (``{"seed", "n", "exact", "near"}``, 0-based line numbers).

    Returns
    -------
    Path
        The ground-truth file.
    """
    planted = synthetic_prompts(n, seed=seed, **options)
    path = Path(path)
    path.write_text("\n".join(planted.prompts) + "\n", encoding="utf-8")
    truth = path.with_name(path.name + ".truth.json")
    data = asdict(planted)
    del data["prompts"]
    truth.write_text(json.dumps({"n": n, **data}), encoding="utf-8")
    return truth

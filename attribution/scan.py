"""Scan a prompt dataset for risky tokens, with or without a trained model.

Model-free (before any training): every prompt is cut into units
(:func:`~diffmem.attribution.markers.segment`); de-identification markers of the known
conventions, generic placeholder-like tokens and residual PHI-like text are counted
(:func:`~diffmem.attribution.markers.marker_summary`); exact and near-duplicate prompt clusters
are found (:func:`prompt_clusters`); and every token's enrichment in duplicated prompts against
the rest is measured as a log-odds z-score with an informative Dirichlet prior
(:func:`log_odds_enrichment`; Monroe, Colaresi & Quinn 2008, "Fightin' Words"). Duplicated
training data is what diffusion models copy (Somepalli et al., 2023; Carlini et al., 2023), so a
token over-represented in duplicated prompts is a memorization risk before a model exists.

Model-based (an adapter given): each distinct prompt (all, or a random sample) is attributed
per unit (:func:`~diffmem.attribution.attribute`). With ``s_p`` the prompt's memorization score
(its noise magnitude), ``c_p`` its number of copies and ``a_pu`` unit ``u``'s share of the
prompt's positive attribution, a token's ``model_score`` is its share of the whole
memorization-weighted attribution mass, ``sum_p c_p s_p sum_{u in p: key(u) = token} a_pu /
sum_p c_p s_p`` (the scores of all tokens sum to 1), as Dutt et al. (2025) pool token scores
over memorized prompts: a token that recurs in memorized prompts gathers mass from every
occurrence. ``model_lift`` is the per-occurrence view: the weighted mean over the token's
occurrences of ``a_pu`` times the number of units of the prompt (1 = an average unit's share;
above 1 = each occurrence matters more than an average unit).

The final ranking combines both evidence sources (see :data:`RANKING_NOTE`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.attribution.markers import DEID_KINDS, marker_summary, segment
from diffmem.data.prompts import TABLE_SUFFIXES, iter_prompts, table_columns
from diffmem.errors import ConfigError, DataError, PromptError
from diffmem.utils import prepare_out_dir, progress, write_json

log = logging.getLogger(__name__)

__all__ = [
    "RANKING_NOTE",
    "TOKEN_COLUMNS",
    "PromptClusters",
    "ScanResult",
    "log_odds_enrichment",
    "prompt_clusters",
    "read_prompts",
    "run_scan",
    "scan_prompts",
    "write_scan",
]

#: Columns of ``tokens.csv``, in order (the first seven are the documented interface).
#: Per-prompt attributions of a scan with a model, one JSON object a line.
ATTRIBUTIONS_JSONL = "attributions.jsonl"
TOKEN_COLUMNS = ("token", "rank", "score", "count", "prompts_with_token", "enrichment",
                 "is_deid_marker", "kind", "convention", "count_duplicated", "count_rest",
                 "enrichment_rank", "model_score", "model_rank", "model_prompts", "model_lift")

#: How the final ranking is made (written into scan.json).
RANKING_NOTE = (
    "score = mean of the available evidence, each scaled to [0, 1]: the enrichment z-score in "
    "duplicated prompts (negative values count as 0) divided by the largest one, and, with a "
    "model, the memorization-weighted attribution share divided by the largest one. Tokens "
    "seen fewer than min_count times are ranked after all others. Ties: more occurrences "
    "first, then alphabetical.")

# ---------------------------------------------------------------------------- input
def read_prompts(source: str | os.PathLike, *, split: str | None = "train",
                 prompt_section: str = "impression") -> tuple[list[str], dict[str, Any]]:
    """The prompts of a dataset or a prompts file (read by
    :func:`diffmem.data.prompts.iter_prompts`).

    Parameters
    ----------
    source : path
        A dataset (folder or image manifest, see :func:`diffmem.data.load`), a ``.txt`` file
        with one prompt per line, or a ``.csv``/``.jsonl`` table without an ``image`` column
        whose ``prompt`` (or ``text``, ``caption``) column holds the prompts.
    split : str or None, optional
        For a dataset: the split whose prompts to read (default ``"train"``, what a model is
        trained on); None or ``"all"`` for every record.
    prompt_section : str, optional
        For a dataset: the report section used as the prompt.

    Returns
    -------
    prompts : list of str
        Whitespace-collapsed, blank ones left out.
    info : dict
        ``{"source", "kind", "n_blank", "n_prompts"}``, and for a dataset ``split`` and
        ``data_fingerprint`` (:meth:`~diffmem.data.CXRDataset.fingerprint` of that split, the
        fingerprint ``diffmem detect`` records for the training split).

    Raises
    ------
    DataError
        For a missing or unreadable file, an unsupported suffix, a table without a prompt
        column, or no prompt at all.
    """
    from diffmem.data.reports import normalize_whitespace

    path = Path(source)
    if not path.exists():
        raise DataError("no such file or folder; give a dataset folder, a manifest, or a "
                        "prompts file (.txt with one prompt per line, .csv/.jsonl with a "
                        "'prompt' column)", path=path)
    info: dict[str, Any] = {"source": str(path)}
    suffix = path.suffix.lower()
    if path.is_dir() or (suffix in TABLE_SUFFIXES
                         and "image" in [c.strip() for c in table_columns(path)]):
        from diffmem.data import load

        dataset = load(path, prompt_section=prompt_section)
        if split not in (None, "all"):
            dataset = dataset.subset(split=split)
        raw = dataset.prompts
        info |= {"kind": f"dataset ({dataset.format})", "split": split or "all",
                 "data_fingerprint": dataset.fingerprint()}
    elif suffix == ".txt" or suffix in TABLE_SUFFIXES:
        raw = [text for _, text in iter_prompts(path)]
        info["kind"] = f"prompts file ({suffix[1:]})"
    else:
        raise DataError(f"unsupported prompts file suffix {path.suffix!r}; use .txt (one prompt "
                        "per line), .csv or .jsonl (a 'prompt' column), or a dataset folder",
                        path=path)
    prompts = [normalize_whitespace(p) for p in raw if isinstance(p, str)]
    info["n_blank"] = sum(1 for p in prompts if not p)
    prompts = [p for p in prompts if p]
    if not prompts:
        where = f" in split {split!r}" if "split" in info and split not in (None, "all") else ""
        raise DataError(f"no prompts found{where}; the file or dataset is empty (or every "
                        "prompt is blank): give at least one prompt", path=path)
    info["n_prompts"] = len(prompts)
    return prompts, info


# ---------------------------------------------------------------------------- duplicates
@dataclass
class PromptClusters:
    """Exact and near-duplicate prompt clusters.

    Attributes
    ----------
    labels : numpy.ndarray
        int64 ``(N,)``: each prompt's cluster, or -1 for a prompt with no duplicate.
    sizes : list of int
        Prompts per cluster (each at least 2), largest cluster first (label 0).
    kinds : list of str
        ``"exact"`` (every member the same text, up to case and spaces) or ``"near"``.
    """

    labels: np.ndarray
    sizes: list[int]
    kinds: list[str]

    @property
    def duplicated(self) -> np.ndarray:
        """Bool ``(N,)``: the prompt belongs to a cluster."""
        return self.labels >= 0

    def summary(self) -> dict[str, Any]:
        return {"clusters": len(self.sizes),
                "exact_clusters": self.kinds.count("exact"),
                "near_clusters": self.kinds.count("near"),
                "duplicated_prompts": int(self.duplicated.sum()),
                "largest": self.sizes[:10]}


def prompt_clusters(prompts: Sequence[str], *, near_threshold: float | None = 0.9,
                    batch_size: int = 2048) -> PromptClusters:
    """Group prompts that are exact or near duplicates of each other.

    Exact duplicates have the same text up to case and whitespace. Near duplicates have a
    cosine similarity of at least ``near_threshold`` between their TF-IDF vectors of unit
    unigrams and bigrams (units from :func:`~diffmem.attribution.markers.segment`, so all
    ``___`` are one term and ``10:30`` and ``10:35`` the same ``<phi:time>``); clusters are the
    connected components of that relation. The comparison runs on distinct texts in blocks of
    ``batch_size`` rows: time grows with the square of the number of distinct prompts.

    Parameters
    ----------
    prompts : sequence of str
    near_threshold : float or None, optional
        Cosine similarity in (0, 1] (default 0.9); None finds exact duplicates only.
    batch_size : int, optional

    Returns
    -------
    PromptClusters

    Examples
    --------
    >>> c = prompt_clusters(["No change.", "no  change.", "Dr. ___ called at 10:30.",
    ...                      "Dr. ___ called at 10:35.", "Small effusion."])
    >>> c.labels.tolist(), c.kinds
    ([0, 0, 1, 1, -1], ['exact', 'near'])
    """
    if near_threshold is not None and not 0 < float(near_threshold) <= 1:
        raise ConfigError(f"near_threshold={near_threshold!r}; use a cosine similarity in "
                          "(0, 1] (e.g. 0.9), or None for exact duplicates only")
    keys = [" ".join(p.split()).casefold() for p in prompts]
    distinct = sorted(set(keys))
    index = {k: i for i, k in enumerate(distinct)}
    parent = list(range(len(distinct)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if near_threshold is not None and len(distinct) > 1:
        for a, b in _near_pairs(distinct, float(near_threshold), int(batch_size)):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[ra] = rb
    members: dict[int, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        members[find(index[k])].append(i)
    groups = sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0]))
    labels = np.full(len(prompts), -1, dtype=np.int64)
    kinds = []
    for c, m in enumerate(groups):
        labels[m] = c
        kinds.append("exact" if len({keys[i] for i in m}) == 1 else "near")
    return PromptClusters(labels, [len(m) for m in groups], kinds)


def _near_pairs(texts: list[str], threshold: float, batch_size: int) -> list[tuple[int, int]]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    def terms(text: str) -> list[str]:
        units = [s.key for s in segment(text)]
        return units + [f"{a} {b}" for a, b in zip(units, units[1:])]

    if len(texts) > 20_000:
        log.warning("near-duplicate search compares %d distinct prompts pairwise; this takes "
                    "a while (near_threshold=None finds exact duplicates only)", len(texts))
    x = TfidfVectorizer(analyzer=terms, sublinear_tf=True).fit_transform(texts).tocsr()
    pairs = []
    for lo in range(0, x.shape[0], batch_size):
        sims = (x[lo:lo + batch_size] @ x.T).tocoo()
        keep = (sims.data >= threshold - 1e-9) & (sims.row + lo < sims.col)
        pairs.extend(zip((sims.row[keep] + lo).tolist(), sims.col[keep].tolist()))
    return pairs


# ---------------------------------------------------------------------------- enrichment
def log_odds_enrichment(counts_a: Any, counts_b: Any, *, prior: Any | None = None,
                        prior_scale: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Log-odds ratio with an informative Dirichlet prior, and its z-score (Monroe, Colaresi &
    Quinn 2008, "Fightin' Words", eqs. 16-22).

    For word ``w`` with counts ``y_a``, ``y_b`` in corpora of ``n_a``, ``n_b`` words and prior
    pseudo-counts ``alpha_w`` (``alpha_0 = sum_w alpha_w``)::

        delta_w = log((y_a + alpha_w) / (n_a + alpha_0 - y_a - alpha_w))
                - log((y_b + alpha_w) / (n_b + alpha_0 - y_b - alpha_w))
        var_w  ~= 1 / (y_a + alpha_w) + 1 / (y_b + alpha_w)
        z_w     = delta_w / sqrt(var_w)

    Parameters
    ----------
    counts_a, counts_b : array_like
        Word counts ``(K,)`` in the two corpora (here: duplicated prompts, the rest).
    prior : array_like, optional
        Pseudo-counts ``alpha_w`` ``(K,)``. Default: the informative prior of the pooled
        corpus, ``prior_scale * (counts_a + counts_b)`` (the paper uses a background corpus;
        with none at hand the pooled counts stand in for it).
    prior_scale : float, optional
        Strength of the default prior, as a fraction of each word's pooled count.

    Returns
    -------
    delta, z : numpy.ndarray
        float64 ``(K,)``; positive = over-represented in corpus ``a``.

    Examples
    --------
    >>> delta, z = log_odds_enrichment([10, 0], [2, 8], prior=[1, 1])
    >>> round(float(delta[0]), 4), round(float(z[0]), 4)
    (3.4965, 5.3682)
    """
    a = np.asarray(counts_a, dtype=np.float64)
    b = np.asarray(counts_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"counts_a {a.shape} and counts_b {b.shape} must be 1-d of one length")
    if prior is None:
        if not np.isfinite(prior_scale) or prior_scale <= 0:
            raise ConfigError(f"prior_scale={prior_scale!r}; use a positive number (e.g. 0.1)")
        alpha = prior_scale * (a + b)
    else:
        alpha = np.asarray(prior, dtype=np.float64)
        if alpha.shape != a.shape or (alpha < 0).any():
            raise ConfigError(f"prior has shape {alpha.shape}; give one non-negative "
                              f"pseudo-count per word, shape {a.shape}")
    alpha = np.maximum(alpha, 1e-9)  # a word seen in neither corpus
    a0, na, nb = alpha.sum(), a.sum(), b.sum()
    delta = (np.log((a + alpha) / (na + a0 - a - alpha))
             - np.log((b + alpha) / (nb + a0 - b - alpha)))
    z = delta / np.sqrt(1.0 / (a + alpha) + 1.0 / (b + alpha))
    return delta, z


# ---------------------------------------------------------------------------- scan
@dataclass
class ScanResult:
    """The ranked tokens of a prompt dataset and what the scan found.

    Attributes
    ----------
    tokens : list of dict
        One row per token (columns :data:`TOKEN_COLUMNS`), best rank first.
    summary : dict
        Prompt counts, markers by convention, generic placeholders, PHI-like patterns,
        duplicate clusters, enrichment settings, the model part and the ranking rule.
    attributions : list of TokenAttribution
        With a model: the attribution of every attributed distinct prompt, the most memorized
        (highest noise magnitude) first. Empty for a model-free scan.
    """

    tokens: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    attributions: list[Any] = field(default_factory=list)

    def rank_of(self, token: str) -> int | None:
        """The rank of ``token`` (1 = riskiest), or None when it does not occur."""
        return next((row["rank"] for row in self.tokens if row["token"] == token), None)

    def to_dict(self, *, top: int = 50) -> dict[str, Any]:
        """The summary plus the ``top`` best-ranked token rows."""
        return {**self.summary, "top_tokens": self.tokens[:int(top)]}


def scan_prompts(prompts: Sequence[str], *, adapter: Any = None, method: str = "gradient",
                 max_prompts: int | None = None, near_threshold: float | None = 0.9,
                 min_count: int = 3, prior_scale: float = 0.1, generations: int = 4,
                 steps: int = 1, num_inference_steps: int = 50, guidance: float | None = None,
                 seed: int = 0, batch_size: int = 32) -> ScanResult:
    """Rank the tokens of a prompt dataset by memorization risk.

    Parameters
    ----------
    prompts : sequence of str
        The dataset's prompts (duplicates kept: duplication is evidence).
    adapter : DiffusionModelAdapter, optional
        A trained model: adds the model-based attribution (see the module docstring).
    method : str, optional
        Attribution method for the model part (default ``"gradient"``).
    max_prompts : int, optional
        Attribute a random sample (``seed``) of this many distinct prompts instead of all;
        copies of a sampled prompt keep their weight.
    near_threshold : float or None, optional
        Near-duplicate cosine threshold (:func:`prompt_clusters`).
    min_count : int, optional
        Tokens seen fewer times are ranked after all others (their z-scores are noisy).
    prior_scale : float, optional
        Strength of the enrichment prior (:func:`log_odds_enrichment`).
    generations, steps, num_inference_steps, guidance, seed, batch_size
        Passed to the attribution method.

    Returns
    -------
    ScanResult

    Raises
    ------
    DataError
        When ``prompts`` is empty.
    ConfigError
        For an unknown method or a bad option.

    Examples
    --------
    >>> prompts = ["Dr. ___ was notified at ___."] * 5 + ["No acute process.", "Mild edema.",
    ...            "No acute process. Mild edema.", "Small effusion, no edema."]
    >>> result = scan_prompts(prompts, min_count=2)
    >>> result.tokens[0]["token"], result.tokens[0]["is_deid_marker"]
    ('___', True)
    """
    t0 = time.perf_counter()
    # 1. check inputs
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [" ".join(str(p).split()) for p in prompts]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError("scan got no prompts (empty input or only blank lines); give at least "
                        "one prompt")
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) \
            or min_count < 1:
        raise ConfigError(f"min_count={min_count!r}; use a positive integer")
    if adapter is not None:
        from diffmem.attribution.methods import get_method

        get_method(method)  # an unknown name fails before any work

    # 2. units of every distinct prompt
    seg = {p: segment(p) for p in sorted(set(prompts))}
    info: dict[str, dict[str, Any]] = {}
    for spans in seg.values():
        for s in spans:
            info.setdefault(s.key, {"kind": s.kind, "convention": s.convention})

    # 3. duplicates and enrichment
    clusters = prompt_clusters(prompts, near_threshold=near_threshold)
    dup = clusters.duplicated
    count_dup: Counter[str] = Counter()
    count_rest: Counter[str] = Counter()
    doc_freq: Counter[str] = Counter()
    for p, is_dup in zip(prompts, dup):
        keys = [s.key for s in seg[p]]
        (count_dup if is_dup else count_rest).update(keys)
        doc_freq.update(set(keys))

    # 4. the model part
    model_part = None
    if adapter is not None:
        model_part = _model_scores(adapter, prompts, method=method, max_prompts=max_prompts,
                                   generations=generations, steps=steps,
                                   num_inference_steps=num_inference_steps, guidance=guidance,
                                   seed=seed, batch_size=batch_size)
        for key, kind in model_part["kinds"].items():
            info.setdefault(key, {"kind": kind[0], "convention": kind[1]})

    # 5. combine and rank
    vocab = sorted(info)
    a = np.array([count_dup[k] for k in vocab], dtype=np.float64)
    b = np.array([count_rest[k] for k in vocab], dtype=np.float64)
    if dup.any() and (~dup).any():
        _, z = log_odds_enrichment(a, b, prior_scale=prior_scale)
    else:
        z = np.zeros(len(vocab))
    counts = a + b
    eligible = counts >= min_count
    parts = [_scaled(np.clip(z, 0, None), eligible)]
    model = None
    if model_part is not None:
        model = np.array([model_part["scores"].get(k, 0.0) for k in vocab])
        parts.append(_scaled(model, eligible))
    score = np.mean(parts, axis=0)
    rank = _ranks(score, eligible, counts, vocab)
    z_rank = _ranks(z, eligible, counts, vocab)
    m_rank = None if model is None else _ranks(model, eligible, counts, vocab)
    rows = []
    for i, k in enumerate(vocab):
        rows.append({
            "token": k, "rank": int(rank[i]), "score": float(score[i]), "count": int(counts[i]),
            "prompts_with_token": int(doc_freq[k]), "enrichment": float(z[i]),
            "is_deid_marker": info[k]["kind"] in DEID_KINDS, "kind": info[k]["kind"],
            "convention": info[k]["convention"], "count_duplicated": int(a[i]),
            "count_rest": int(b[i]), "enrichment_rank": int(z_rank[i]),
            "model_score": None if model is None else float(model[i]),
            "model_rank": None if m_rank is None else int(m_rank[i]),
            "model_prompts": None if model_part is None else
            int(model_part["prompts"].get(k, 0)),
            "model_lift": None if model_part is None or k not in model_part["lift"] else
            float(model_part["lift"][k]),
        })
    rows.sort(key=lambda r: r["rank"])

    summary = {
        "n_prompts": len(prompts),
        "n_distinct": len(seg),
        "n_tokens": len(vocab),
        **marker_summary(prompts),
        "duplicates": {**clusters.summary(), "near_threshold": near_threshold},
        "enrichment": {"method": "log-odds z-score with informative Dirichlet prior (Monroe, "
                                 "Colaresi & Quinn 2008)",
                       "groups": "prompts in exact/near-duplicate clusters vs. the rest",
                       "prior_scale": prior_scale, "computed": bool(dup.any() and (~dup).any()),
                       "tokens_duplicated": int(a.sum()), "tokens_rest": int(b.sum())},
        "model": None if model_part is None else {k: v for k, v in model_part.items()
                                                 if k not in ("scores", "prompts", "kinds",
                                                              "lift", "attributions")},
        "ranking": {"rule": RANKING_NOTE, "min_count": int(min_count),
                    "components": ["enrichment"] + (["model"] if model_part else [])},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    markers_ranked = [r for r in rows if r["is_deid_marker"]]
    summary["top_marker"] = None if not markers_ranked else {
        "token": markers_ranked[0]["token"], "rank": markers_ranked[0]["rank"]}
    return ScanResult(rows, summary,
                      [] if model_part is None else model_part["attributions"])


def _scaled(x: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    top = float(x[eligible].max()) if eligible.any() else 0.0
    return x / top if top > 0 else np.zeros_like(x)


def _ranks(score: np.ndarray, eligible: np.ndarray, counts: np.ndarray,
           vocab: list[str]) -> np.ndarray:
    order = sorted(range(len(vocab)), key=lambda i: (not eligible[i], -score[i], -counts[i],
                                                     vocab[i]))
    ranks = np.empty(len(vocab), dtype=np.int64)
    ranks[order] = np.arange(1, len(vocab) + 1)
    return ranks


def _model_scores(adapter: Any, prompts: list[str], *, method: str, max_prompts: int | None,
                  generations: int, steps: int, num_inference_steps: int,
                  guidance: float | None, seed: int, batch_size: int) -> dict[str, Any]:
    """Memorization-weighted attribution share of every token key over the prompts."""
    from diffmem.attribution.methods import get_method

    fn = get_method(method)
    copies = Counter(prompts)
    distinct = sorted(copies)
    if max_prompts is not None:
        if isinstance(max_prompts, bool) or not isinstance(max_prompts, (int, np.integer)) \
                or max_prompts < 1:
            raise ConfigError(f"max_prompts={max_prompts!r}; use a positive integer or None "
                              "(all prompts)")
        if max_prompts < len(distinct):
            rng = np.random.default_rng(seed)
            pick = rng.choice(len(distinct), size=int(max_prompts), replace=False)
            distinct = [distinct[i] for i in sorted(pick)]
    t0 = time.perf_counter()
    mass: defaultdict[str, float] = defaultdict(float)
    lift: defaultdict[str, float] = defaultdict(float)
    occurrence_weight: defaultdict[str, float] = defaultdict(float)
    with_key: Counter[str] = Counter()
    kinds: dict[str, tuple[str, str | None]] = {}
    total_weight = 0.0
    skipped: Counter[str] = Counter()
    memorization = []
    attributions = []
    n_truncated = 0
    for prompt in progress(distinct, desc=f"attribution ({method})", unit="prompt"):
        try:
            result = fn(adapter, prompt, generations=generations, steps=steps,
                        num_inference_steps=num_inference_steps, guidance=guidance, seed=seed,
                        batch_size=batch_size, truncate=True)
        except PromptError as e:
            skipped["only markers" if "only of de-identification" in str(e) else "unusable"] += 1
            log.debug("skipped %r: %s", prompt, e)
            continue
        n_truncated += int(adapter.count_tokens(prompt) > adapter.max_length)
        weight = copies[prompt] * max(float(result.memorization), 0.0)
        memorization.append(float(result.memorization))
        attributions.append(result)
        total_weight += weight
        shares = result.shares
        seen = set()
        for unit, share in zip(result.units, shares):
            mass[unit.key] += weight * float(share)
            lift[unit.key] += weight * float(share) * len(result.units)
            occurrence_weight[unit.key] += weight
            kinds.setdefault(unit.key, (unit.kind, unit.convention))
            seen.add(unit.key)
        for key in seen:
            with_key[key] += copies[prompt]
    if skipped:
        log.warning("attribution skipped %d distinct prompt(s): %s", sum(skipped.values()),
                    dict(skipped))
    if n_truncated:
        log.warning("%d distinct prompt(s) exceed the %d tokens the text encoder reads; their "
                    "units beyond it were not attributed (the model never read them either)",
                    n_truncated, adapter.max_length)
    scores = {k: v / total_weight for k, v in mass.items()} if total_weight > 0 else {}
    mem = np.asarray(memorization) if memorization else np.zeros(1)
    return {
        "method": method, "scores": scores, "prompts": dict(with_key), "kinds": kinds,
        "attributions": sorted(attributions, key=lambda r: (-float(r.memorization), r.prompt)),
        "lift": {k: lift[k] / w for k, w in occurrence_weight.items() if w > 0},
        "distinct_prompts": len(copies), "attributed": len(memorization),
        "sampled": max_prompts is not None and len(distinct) < len(copies),
        "skipped": dict(skipped), "truncated": n_truncated,
        "weighting": "copies x noise magnitude of each prompt; per-prompt attribution shares",
        "memorization": {"mean": float(mem.mean()), "max": float(mem.max()),
                         "median": float(np.median(mem))},
        "params": {"generations": generations, "steps": steps,
                   "num_inference_steps": num_inference_steps, "guidance": guidance,
                   "seed": seed},
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ---------------------------------------------------------------------------- output
def write_scan(result: ScanResult, out: str | os.PathLike, *,
               inputs: Sequence[str | os.PathLike] = (), plots: bool = True) -> dict[str, Path]:
    """Write ``tokens.csv``, ``scan.json`` and the plots of a scan into the folder ``out``.

    A scan with a model also writes ``attributions.jsonl``: one
    :meth:`TokenAttribution.to_dict` per attributed distinct prompt, the most memorized first
    (the report draws its heat-coloured prompts from it).

    Parameters
    ----------
    result : ScanResult
    out : path
        Output folder (created; never inside one of ``inputs``).
    inputs : sequence of path, optional
        The scanned dataset or file, which ``out`` must not lie in.
    plots : bool, optional
        Also draw ``tokens.png`` (top tokens) and ``enrichment.png`` (enrichment against
        frequency).

    Returns
    -------
    dict of str to Path
        What was written, by name.
    """
    out = prepare_out_dir(out, inputs=[Path(p) for p in inputs])
    paths = {"tokens": out / "tokens.csv", "scan": out / "scan.json"}
    with open(paths["tokens"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(TOKEN_COLUMNS))
        writer.writeheader()
        for row in result.tokens:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in TOKEN_COLUMNS})
    if result.attributions:
        paths["attributions"] = out / ATTRIBUTIONS_JSONL
        with open(paths["attributions"], "w", encoding="utf-8") as f:
            for attribution in result.attributions:
                f.write(json.dumps(attribution.to_dict(), ensure_ascii=False) + "\n")
    if plots:
        from diffmem.attribution.render import plot_enrichment, plot_token_ranking

        paths["tokens_plot"] = plot_token_ranking(result, out / "tokens.png")
        paths["enrichment_plot"] = plot_enrichment(result, out / "enrichment.png")
    write_json(paths["scan"], {**result.to_dict(),
                               "files": {k: p.name for k, p in paths.items()}})
    return paths


def run_scan(source: str | os.PathLike, *, out: str | os.PathLike,
             model: str | os.PathLike | Any = None, split: str | None = "train",
             prompt_section: str = "impression", device: str | None = None,
             dtype: str | None = None,
             **options: Any) -> tuple[ScanResult, dict[str, Path]]:
    """What ``diffmem scan`` runs: read the prompts, open the model (if any), scan, write.

    Parameters
    ----------
    source : path
        Dataset or prompts file (see :func:`read_prompts`).
    out : path
        Output folder.
    model : path or DiffusionModelAdapter, optional
        Model folder (or adapter) for the model-based part.
    split, prompt_section
        See :func:`read_prompts`.
    device, dtype : str, optional
        Device and precision to load the model with (see :func:`~diffmem.models.load_model`).
    **options
        Passed to :func:`scan_prompts`.

    Returns
    -------
    result : ScanResult
    paths : dict of str to Path
    """
    prompts, info = read_prompts(source, split=split, prompt_section=prompt_section)
    out = prepare_out_dir(out, inputs=[source])
    adapter = None
    if model is not None:
        from diffmem.models import DiffusionModelAdapter, load_model

        adapter = model if isinstance(model, DiffusionModelAdapter) else \
            load_model(model, device=device, dtype=dtype)
    result = scan_prompts(prompts, adapter=adapter, **options)
    result.summary["input"] = info
    if adapter is not None:
        result.summary["model"]["source"] = adapter.source
        result.summary["model"]["fingerprint"] = adapter.fingerprint()
    return result, write_scan(result, out, inputs=[source])

"""Training-time mitigations of memorization, as hooks of :func:`diffmem.train.train` (its
``caption_transform`` and ``loss_filter``) or as a data step before training.

Registered by name (:data:`TRAINING_MITIGATIONS`, :func:`get_training_mitigation`); each
``build(train_set, **options)`` returns a :class:`TrainingMitigation`: the data to train on and
the hooks. ``none`` trains the plain model (the same run as ``diffmem train``).

* ``caption_randomization`` (Somepalli et al., NeurIPS 2023, "Understanding and Mitigating
  Copying in Diffusion Models"): with probability ``p`` (0.1) a caption is replaced by as many
  words drawn at random from the training vocabulary (``mode="replace"``), or ``n_words`` random
  words are inserted at random places (``mode="add"``, the "random word addition" variant).
* ``deid_randomization``: each de-identification marker (``___``, ``XXXX``, ``[** **]``...) of a
  caption is replaced by a random vocabulary word with probability ``p`` (1.0), so the
  marker-heavy prompts Dutt et al. (2025) found memorized lose their constant key.
* ``loss_filter`` (Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in
  Diffusion Models"): drop a sample from the loss when its text-conditional noise prediction
  differs from the unconditional one by ``||eps_c - eps_uncond|| >= tau`` (tau = 2 in their
  code, for SD's 4x64x64 latents; our pixel models have 1x32x32 values, so the same tau is a
  looser bound here: stated as a deviation).
* ``dedup``: near-duplicate training images are removed before training: images whose
  thumbnails correlate at ``>= threshold`` (0.95, the detector's ``pixel`` similarity at 32 px)
  form groups connected by that relation; one record per group is kept (the first in dataset
  order). Somepalli et al. and Carlini et al. (2023) tie copying to duplicated training images.

Every hook is seeded through the trainer's per-step generator, so a run resumes exactly.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffmem.checks import check_fraction, check_int, check_positive
from diffmem.errors import ConfigError
from diffmem.utils import progress

log = logging.getLogger(__name__)

__all__ = [
    "TRAINING_MITIGATIONS",
    "TrainingMitigation",
    "caption_randomization",
    "deduplicate",
    "deid_randomization",
    "get_training_mitigation",
    "list_training_mitigations",
    "noise_gap_filter",
    "vocabulary",
]

_WORD = re.compile(r"[A-Za-z][A-Za-z\-]+")


@dataclass
class TrainingMitigation:
    """What one method changes in a training run.

    Attributes
    ----------
    name : str
    data : CXRDataset
        The records to train on (the input set unless the method removes some).
    caption_transform, loss_filter : callable or None
        Hooks for :func:`diffmem.train.train`.
    options : dict
        The method's settings (recorded in the study).
    info : dict
        Facts about what it did (e.g. records removed).
    """

    name: str
    data: Any
    caption_transform: Callable | None = None
    loss_filter: Callable | None = None
    options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def vocabulary(prompts) -> list[str]:
    """Sorted distinct lower-case words (letters and hyphens, 2+ characters) of ``prompts``.

    Examples
    --------
    >>> vocabulary(["No acute process.", "Small effusion, no change."])
    ['acute', 'change', 'effusion', 'no', 'process', 'small']
    """
    return sorted({w.lower() for p in prompts for w in _WORD.findall(p)})


def _check_p(name: str, p: Any) -> float:
    return check_fraction(name, p, hint=" (a probability)")


def _named(fn: Callable, name: str) -> Callable:
    # the trainer records the hook's __name__ in its checkpoints and refuses to resume a run
    # whose hooks changed, so the name carries the settings
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def caption_randomization(vocab: list[str], *, p: float = 0.1, mode: str = "replace",
                          n_words: int = 2) -> Callable:
    """Caption randomization (Somepalli et al., NeurIPS 2023) as a ``caption_transform``.

    Parameters
    ----------
    vocab : list of str
        Words to draw from (:func:`vocabulary` of the training prompts).
    p : float
        Probability that a caption is changed at a given step.
    mode : {"replace", "add"}
        ``replace``: the caption becomes as many random words as it had (at least one);
        ``add``: ``n_words`` random words are inserted at random word positions.
    n_words : int
        Words added in ``add`` mode.

    Examples
    --------
    >>> import torch
    >>> f = caption_randomization(["alpha", "beta"], p=1.0)
    >>> out = f("No acute process.", None, torch.Generator().manual_seed(0))
    >>> len(out.split()) == 3 and set(out.split()) <= {"alpha", "beta"}
    True
    >>> caption_randomization(["alpha"], p=0.0)("Unchanged.", None, torch.Generator())
    'Unchanged.'
    """
    import torch

    p = _check_p("p", p)
    if mode not in ("replace", "add"):
        raise ConfigError(f"mode={mode!r}; use 'replace' (random caption) or 'add' (random "
                          "words inserted)")
    if not vocab:
        raise ConfigError("caption randomization needs a vocabulary: the training prompts "
                          "have no words")
    check_int("n_words", n_words)

    def transform(prompt: str, study, generator):
        if p == 0 or float(torch.rand((), generator=generator)) >= p:
            return prompt
        words = prompt.split()
        if mode == "replace":
            k = max(1, len(words))
            idx = torch.randint(0, len(vocab), (k,), generator=generator).tolist()
            return " ".join(vocab[i] for i in idx)
        for _ in range(n_words):
            pos = int(torch.randint(0, len(words) + 1, (), generator=generator))
            words.insert(pos, vocab[int(torch.randint(0, len(vocab), (), generator=generator))])
        return " ".join(words)

    return _named(transform, f"caption_randomization(p={p:g},mode={mode}"
                             + (f",n_words={n_words})" if mode == "add" else ")"))


def deid_randomization(vocab: list[str], *, p: float = 1.0) -> Callable:
    """De-identification marker randomization as a ``caption_transform``: each marker span
    (:func:`diffmem.attribution.find_markers`, kinds ``marker`` and ``placeholder``) is replaced
    by a random vocabulary word with probability ``p``.

    Examples
    --------
    >>> import torch
    >>> f = deid_randomization(["left", "right"], p=1.0)
    >>> out = f("Dr. ___ was notified at ___.", None, torch.Generator().manual_seed(0))
    >>> "___" in out
    False
    >>> f("No markers here.", None, torch.Generator())
    'No markers here.'
    """
    import torch

    from diffmem.attribution import find_markers

    p = _check_p("p", p)
    if not vocab:
        raise ConfigError("marker randomization needs a vocabulary: the training prompts have "
                          "no words")

    def transform(prompt: str, study, generator):
        spans = find_markers(prompt, kinds=("marker", "placeholder"))
        if not spans or p == 0:
            return prompt
        pieces, last = [], 0
        for s in spans:
            pieces.append(prompt[last:s.start])
            if float(torch.rand((), generator=generator)) < p:
                pieces.append(vocab[int(torch.randint(0, len(vocab), (), generator=generator))])
            else:
                pieces.append(s.text)
            last = s.end
        pieces.append(prompt[last:])
        return "".join(pieces)

    return _named(transform, f"deid_randomization(p={p:g})")


def noise_gap_filter(*, tau: float = 2.0) -> Callable:
    """Wen et al.'s training-time filter (ICLR 2024) as a ``loss_filter``: keep a sample only
    when ``||eps_theta(x_t, c) - eps_theta(x_t, "")||_2 < tau`` (per sample, over all its
    values). Samples trained unconditionally (caption dropout) have a gap of 0 and are kept.

    Examples
    --------
    >>> import torch
    >>> from types import SimpleNamespace
    >>> batch = SimpleNamespace(eps_pred=torch.zeros(2, 1, 2, 2),
    ...                         eps_uncond=lambda: torch.tensor([0.0, 3.0]).view(2, 1, 1, 1)
    ...                         .expand(2, 1, 2, 2))
    >>> noise_gap_filter(tau=2.0)(batch).tolist()
    [True, False]
    """
    check_positive("tau", tau, hint=" (the noise-magnitude threshold; Wen et al.: 2)")

    from diffmem.models import noise_gap

    def loss_filter(batch):
        return noise_gap(batch.eps_pred, batch.eps_uncond()) < tau

    return _named(loss_filter, f"noise_gap_filter(tau={tau:g})")


def deduplicate(train_set, *, threshold: float = 0.95, size: int = 32,
                ) -> tuple[Any, dict[str, Any]]:
    """Remove near-duplicate images before training: records whose ``pixel`` similarity (the
    thumbnails' correlation at ``size`` px) is ``>= threshold`` are linked, and one record per
    connected group (the first in dataset order) is kept.

    Returns
    -------
    (CXRDataset, dict)
        The kept records (a new dataset; the input is not modified) and ``{"records_before",
        "records_after", "groups_collapsed", "threshold", "size"}``.
    """
    from diffmem.detect.similarity import get_backend

    if not isinstance(threshold, (int, float)) or not -1 < threshold <= 1:
        raise ConfigError(f"threshold={threshold!r}; use a similarity in (-1, 1] (e.g. 0.95)")
    backend = get_backend("pixel", size=size)
    feats = []
    for _, imgs in progress(train_set.iter_images(size=size, batch_size=128),
                            desc="dedup: reading images", unit="chunk",
                            total=math.ceil(len(train_set) / 128)):
        feats.append(backend.features(imgs))
    f = np.concatenate(feats) if feats else np.zeros((0, size * size), np.float32)
    n = len(f)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, n, 256):
        sims = f[start:start + 256] @ f.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows + start, cols):
            if r < c:
                a, b = find(r), find(c)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    roots = [find(i) for i in range(n)]
    keep = sorted({r: i for i, r in reversed(list(enumerate(roots)))}.values())
    groups = sum(1 for r in set(roots) if roots.count(r) > 1)
    info = {"records_before": n, "records_after": len(keep), "groups_collapsed": groups,
            "threshold": float(threshold), "size": int(size)}
    log.info("dedup: kept %d of %d training records (%d duplicate groups collapsed)",
             len(keep), n, groups)
    return train_set.subset(indices=keep), info


# ---------------------------------------------------------------------------- registry
def _build_none(train_set, **options):
    _no_options("none", options)
    return TrainingMitigation("none", train_set)


def _build_caption(train_set, *, p: float = 0.1, mode: str = "replace", n_words: int = 2,
                   **options):
    _no_options("caption_randomization", options)
    f = caption_randomization(vocabulary(train_set.prompts), p=p, mode=mode, n_words=n_words)
    return TrainingMitigation("caption_randomization", train_set, caption_transform=f,
                              options={"p": p, "mode": mode, "n_words": n_words})


def _build_deid(train_set, *, p: float = 1.0, **options):
    _no_options("deid_randomization", options)
    f = deid_randomization(vocabulary(train_set.prompts), p=p)
    return TrainingMitigation("deid_randomization", train_set, caption_transform=f,
                              options={"p": p})


def _build_filter(train_set, *, tau: float = 2.0, **options):
    _no_options("loss_filter", options)
    return TrainingMitigation("loss_filter", train_set, loss_filter=noise_gap_filter(tau=tau),
                              options={"tau": tau})


def _build_dedup(train_set, *, threshold: float = 0.95, size: int = 32, **options):
    _no_options("dedup", options)
    kept, info = deduplicate(train_set, threshold=threshold, size=size)
    return TrainingMitigation("dedup", kept, options={"threshold": threshold, "size": size},
                              info=info)


def _no_options(name: str, options: Mapping[str, Any]) -> None:
    if options:
        raise ConfigError(f"training mitigation {name!r} has no option(s) "
                          f"{', '.join(sorted(options))}")


#: name -> builder ``(train_set, **options) -> TrainingMitigation``
TRAINING_MITIGATIONS: dict[str, Callable[..., TrainingMitigation]] = {
    "none": _build_none,
    "caption_randomization": _build_caption,
    "deid_randomization": _build_deid,
    "loss_filter": _build_filter,
    "dedup": _build_dedup,
}


def list_training_mitigations() -> list[str]:
    """Names of the registered training-time mitigations."""
    return list(TRAINING_MITIGATIONS)


def get_training_mitigation(name: str, train_set, **options) -> TrainingMitigation:
    """Build the mitigation ``name`` for ``train_set`` (its training split).

    Raises
    ------
    ConfigError
        For an unknown name (listing the known ones) or option.
    """
    if name not in TRAINING_MITIGATIONS:
        raise ConfigError(f"unknown training mitigation {name!r}; known: "
                          f"{', '.join(TRAINING_MITIGATIONS)}")
    return TRAINING_MITIGATIONS[name](train_set, **options)

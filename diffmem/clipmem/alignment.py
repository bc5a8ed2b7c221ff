"""Image-report alignment under augmentations and the CLIPMem score (Wang et al., "Captured by
Captions: On Memorization and its Mitigation in CLIP Models", ICLR 2025, arXiv 2502.07830).

Definitions followed
--------------------
*Alignment* of a pair (x, y) under an image-report encoder f (their Eq. 1): the expected cosine
similarity of the image embedding and the text embedding over random augmentations of the
pair,

    A(f, x, y) = E_{x' ~ Aug(x)} cos(f_img(x'), f_txt(y)),

estimated here by the mean over ``views`` augmented views (``views=0``: the plain pair, one
cosine). *CLIPMem* (their Eq. 4): the alignment under the model f that trained on the pair minus
the alignment under the reference g that did not,

    CLIPMem(x, y) = A(f, x, y) - A(g, x, y)       (higher = more memorized).

Deviations, on purpose
----------------------
* **No text augmentation.** The paper also augments captions; a radiology report has no
  label-preserving paraphrase we can draw offline, so y is kept as written.
* **No rescaling.** We report the raw difference of mean cosines (in [-2, 2]) together with
  both alignments. The paper's normalization of Eq. 4 could not be checked against the text
  available offline; any normalization shared by all pairs of one (f, g) pair leaves rankings
  and AUCs unchanged, and the raw values keep the two alignments readable.
* **Image augmentation** is the encoder's own training augmentation
  (:func:`diffmem.embed.training._augment`: small zoom, shift, rotation, brightness/contrast,
  noise, low-resolution round trip) with the strengths of its preset. The views of pair ``k``
  are drawn from a generator seeded with ``(seed, key_k)`` only, so f and g see the *same* views
  and a pair's alignment does not depend on batching.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from diffmem.checks import check_int
from diffmem.data import CXRDataset
from diffmem.embed.metrics import alignment_score
from diffmem.embed.presets import load_preset
from diffmem.errors import DataError
from diffmem.utils import progress

__all__ = ["PairEncoder", "clipmem_score", "dataset_alignment", "dataset_embeddings",
           "default_augment", "models_embeddings", "pair_alignment", "pair_embeddings",
           "views_alignment"]

_SEED_STRIDE = 1_000_003


class PairEncoder(Protocol):
    """What CLIPMem needs of an encoder (an :class:`~diffmem.embed.InDomainEncoder` fits):
    unit-norm embeddings of grayscale images in [0, 1] and of report texts, in one space."""

    image_size: int

    def embed_images(self, images: np.ndarray) -> np.ndarray: ...  # pragma: no cover

    def embed_texts(self, prompts: Sequence[str]) -> np.ndarray: ...  # pragma: no cover


def default_augment(encoder: Any) -> dict[str, float]:
    """The augmentation strengths an encoder was trained with (its config's preset), else the
    ``demo`` encoder preset's.

    Examples
    --------
    >>> default_augment(object())["rotate"]
    3.0
    """
    config = getattr(encoder, "config", None)
    if isinstance(config, Mapping):
        aug = config.get("preset", {}).get("augment")
        if isinstance(aug, Mapping):
            return {k: float(v) for k, v in aug.items()}
    return {k: float(v) for k, v in load_preset("demo").augment.items()}


def _views(image: np.ndarray, n: int, aug: Mapping[str, float], seed: int, key: int):
    """``n`` augmented copies (n, H, W) of one image, from a generator seeded by (seed, key)."""
    import torch

    from diffmem.embed.training import _augment

    gen = torch.Generator().manual_seed(int(seed) * _SEED_STRIDE + int(key))
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return _augment(x.expand(n, -1, -1, -1).contiguous(), aug, gen)[:, 0].numpy()


def pair_embeddings(encoder: PairEncoder, images: np.ndarray, prompts: Sequence[str], *,
                    views: int = 8, augment: Mapping[str, float] | None = None, seed: int = 0,
                    keys: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings :func:`pair_alignment` averages over: each pair's augmented image views
    and its report (see :func:`pair_alignment` for the parameters).

    Returns
    -------
    image_views : ndarray, shape (N, max(views, 1), D), float64
        Unit-norm embeddings of the views (``views=0``: the plain image).
    texts : ndarray, shape (N, D), float64
        Unit-norm report embeddings.

    Raises
    ------
    DataError
        When the numbers of images, prompts and keys differ.
    """
    return _embed_pairs([encoder], images, prompts, views=views, augment=augment, seed=seed,
                        keys=keys)[0]


def _embed_pairs(encoders: Sequence[PairEncoder], images: np.ndarray, prompts: Sequence[str], *,
                 views: int, augment: Mapping[str, float] | None, seed: int,
                 keys: Sequence[int] | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`pair_embeddings` under each of ``encoders`` from one set of views: the views
    are drawn once and embedded by every encoder (they depend only on the image, ``seed``,
    the key and ``augment``, which defaults to the first encoder's)."""
    views = check_int("views", views, low=0)
    images = np.asarray(images)
    prompts = list(prompts)
    keys = list(range(len(images))) if keys is None else [int(k) for k in keys]
    if not (len(images) == len(prompts) == len(keys)):
        raise DataError(f"got {len(images)} images, {len(prompts)} prompts and {len(keys)} "
                        "keys; pass one prompt (and key) per image, in the same order")
    if len(images) == 0:
        return [(np.zeros((0, max(views, 1), 0)), np.zeros((0, 0))) for _ in encoders]
    if views == 0:
        stacked = images.astype(np.float32)
    else:
        aug = default_augment(encoders[0]) if augment is None else dict(augment)
        stacked = np.concatenate([_views(im, views, aug, seed, k) for im, k in zip(images, keys)])
    out = []
    for encoder in encoders:
        text = np.asarray(encoder.embed_texts(prompts), dtype=np.float64)
        emb = np.asarray(encoder.embed_images(stacked), dtype=np.float64)
        out.append((emb.reshape(len(images), max(views, 1), -1), text))
    return out


def views_alignment(image_views: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Mean over views of the cosine of each view with its pair's text (Eq. 1 of Wang et al.,
    ICLR 2025): ``image_views`` (N, V, D) and ``texts`` (N, D), rows need not be unit-norm.

    Examples
    --------
    >>> v = np.array([[[1.0, 0.0], [0.0, 1.0]]])      # one pair, two views
    >>> views_alignment(v, np.array([[1.0, 1.0]])).round(4).tolist()
    [0.7071]
    """
    image_views, texts = np.asarray(image_views), np.asarray(texts)
    n, v = image_views.shape[:2]
    if n == 0:
        return np.zeros(0)
    cos = alignment_score(image_views.reshape(n * v, -1), np.repeat(texts, v, axis=0))
    return cos.reshape(n, v).mean(axis=1)


def pair_alignment(encoder: PairEncoder, images: np.ndarray, prompts: Sequence[str], *,
                   views: int = 8, augment: Mapping[str, float] | None = None, seed: int = 0,
                   keys: Sequence[int] | None = None) -> np.ndarray:
    """Alignment of each (image, prompt) pair: mean cosine over augmented image views (Eq. 1 of
    Wang et al., ICLR 2025; see the module docstring).

    Parameters
    ----------
    encoder : PairEncoder
        E.g. an :class:`~diffmem.embed.InDomainEncoder`.
    images : ndarray, shape (N, H, W)
        Float images in [0, 1].
    prompts : sequence of str
        One per image.
    views : int, optional
        Augmented views per pair; 0 scores the plain pair (no augmentation).
    augment : mapping, optional
        Augmentation strengths (keys of an encoder preset's ``augment``); default
        :func:`default_augment` of the encoder.
    seed : int, optional
    keys : sequence of int, optional
        One integer per pair that, with ``seed``, seeds its views (default ``0..N-1``); pass
        dataset indices so that a pair's views do not depend on which batch it is in.

    Returns
    -------
    ndarray, shape (N,), float64
        Higher = the encoder matches the image and the report more closely.

    Raises
    ------
    DataError
        When the numbers of images, prompts and keys differ.

    Examples
    --------
    >>> class Toy:  # image embedding (mean, 1 - mean), one fixed text direction
    ...     image_size = 8
    ...     def embed_images(self, x):
    ...         e = np.stack([x.mean((1, 2)), 1 - x.mean((1, 2))], 1)
    ...         return e / np.linalg.norm(e, axis=1, keepdims=True)
    ...     def embed_texts(self, p):
    ...         return np.tile([1.0, 0.0], (len(p), 1))
    >>> imgs = np.stack([np.full((8, 8), 0.5), np.ones((8, 8))]).astype(np.float32)
    >>> pair_alignment(Toy(), imgs, ["a", "b"], views=0).round(4).tolist()
    [0.7071, 1.0]
    """
    return views_alignment(*pair_embeddings(encoder, images, prompts, views=views,
                                            augment=augment, seed=seed, keys=keys))


def _batches(encoders: Sequence[PairEncoder], dataset: CXRDataset, indices: list[int], *,
             views: int, augment: Mapping[str, float] | None, seed: int, batch_size: int):
    """Yield the :func:`pair_embeddings` of the records ``indices`` under each of ``encoders``
    (one image side), batch by batch: each image is read and its views drawn once for all
    encoders; the dataset index keys each pair's views."""
    chunks = dataset.iter_images(size=int(encoders[0].image_size), batch_size=batch_size,
                                 indices=indices)
    for idx, imgs in progress(chunks, desc="embedding pairs", unit="batch",
                              total=math.ceil(len(indices) / batch_size)):
        yield _embed_pairs(encoders, imgs.astype(np.float32), [dataset[i].prompt for i in idx],
                           views=views, augment=augment, seed=seed, keys=idx)


def dataset_embeddings(encoder: PairEncoder, dataset: CXRDataset, indices: Sequence[int], *,
                       views: int = 8, augment: Mapping[str, float] | None = None,
                       seed: int = 0, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pair_embeddings` of the records ``indices`` of a dataset, streamed in batches and
    kept (``len(indices) * max(views, 1) * D`` floats: for the scored pairs of one run).

    Returns
    -------
    image_views : ndarray, shape (len(indices), max(views, 1), D)
    texts : ndarray, shape (len(indices), D)
    """
    return models_embeddings([encoder], dataset, indices, views=views, augment=augment,
                             seed=seed, batch_size=batch_size)[0]


def models_embeddings(encoders: Sequence[PairEncoder], dataset: CXRDataset,
                      indices: Sequence[int], *, views: int = 8,
                      augment: Mapping[str, float] | None = None, seed: int = 0,
                      batch_size: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`dataset_embeddings` under several encoders at once (e.g. f and g), the same as
    calling it once per encoder, but every image is read and every view drawn only once
    (encoders of one image side; others are embedded one by one).

    Returns
    -------
    list of (image_views, texts)
        One per encoder, in order.
    """
    batch_size = check_int("batch_size", batch_size)
    encoders = list(encoders)
    if len({int(e.image_size) for e in encoders}) > 1:
        return [models_embeddings([e], dataset, indices, views=views, augment=augment,
                                  seed=seed, batch_size=batch_size)[0] for e in encoders]
    parts = list(_batches(encoders, dataset, [int(i) for i in indices], views=views,
                          augment=augment, seed=seed, batch_size=batch_size))
    if not parts:
        return [(np.zeros((0, max(views, 1), 0)), np.zeros((0, 0))) for _ in encoders]
    return [(np.concatenate([p[k][0] for p in parts]), np.concatenate([p[k][1] for p in parts]))
            for k in range(len(encoders))]


def dataset_alignment(encoder: PairEncoder, dataset: CXRDataset, indices: Sequence[int], *,
                      views: int = 8, augment: Mapping[str, float] | None = None, seed: int = 0,
                      batch_size: int = 32) -> np.ndarray:
    """:func:`pair_alignment` of the records ``indices`` of a dataset, streamed in batches
    (memory bounded by one batch; see :func:`dataset_embeddings`).

    Returns
    -------
    ndarray, shape (len(indices),), float64
    """
    batch_size = check_int("batch_size", batch_size)
    out = [views_alignment(*emb[0]) for emb in _batches(
        [encoder], dataset, [int(i) for i in indices], views=views, augment=augment, seed=seed,
        batch_size=batch_size)]
    return np.concatenate(out) if out else np.zeros(0)


def clipmem_score(alignment_f: np.ndarray, alignment_g: np.ndarray) -> np.ndarray:
    """CLIPMem (Wang et al., ICLR 2025, Eq. 4, without rescaling): alignment under f (trained
    on the pair) minus alignment under g (not trained on it). Higher = more memorized.

    Examples
    --------
    >>> clipmem_score(np.array([0.9, 0.2]), np.array([0.3, 0.2])).round(3).tolist()
    [0.6, 0.0]
    """
    f, g = np.asarray(alignment_f, dtype=np.float64), np.asarray(alignment_g, dtype=np.float64)
    if f.shape != g.shape:
        raise DataError(f"alignment_f has shape {f.shape} and alignment_g {g.shape}; score the "
                        "same pairs, in the same order, under both models")
    return f - g

"""Utility metrics on in-domain embeddings: a Fréchet distance between image sets and
prompt-image alignment. Pure NumPy/SciPy functions; the features come from
:meth:`diffmem.embed.InDomainEncoder.embed_images` / ``embed_texts``.

These are *in-domain* analogues of FID and CLIPScore: they use our own chest X-ray encoder, not
Inception-v3 or OpenAI's CLIP, so their values are comparable only between runs that use the
same encoder folder, never with published FID or CLIPScore numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffmem.errors import DataError


def _features(name: str, feats) -> np.ndarray:
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise DataError(f"{name} must be a 2-D array (N samples, D features), got shape "
                        f"{arr.shape}")
    if arr.size and not np.isfinite(arr).all():
        raise DataError(f"{name} contains NaN or inf values")
    return arr


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``ddof=1``) of a feature set, as used by :func:`frechet_distance`.

    Parameters
    ----------
    feats : array_like, shape (N, D)
        At least two samples.

    Returns
    -------
    mu : ndarray, shape (D,)
    cov : ndarray, shape (D, D)

    Examples
    --------
    >>> mu, cov = feature_stats([[0.0, 1.0], [2.0, 1.0]])
    >>> mu.tolist(), cov.tolist()
    ([1.0, 1.0], [[2.0, 0.0], [0.0, 0.0]])
    """
    arr = _features("feats", feats)
    if len(arr) < 2:
        raise DataError(f"a covariance needs at least 2 samples, got {len(arr)}")
    return arr.mean(axis=0), np.atleast_2d(np.cov(arr, rowvar=False, ddof=1))


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet distance between two Gaussians (the FID formula, Heusel et al., NeurIPS 2017).

    ``d² = ||mu_a - mu_b||² + Tr(cov_a + cov_b - 2 (cov_a cov_b)^{1/2})``.

    The trace of the matrix square root is computed as ``Tr((S cov_b S)^{1/2})`` with
    ``S = cov_a^{1/2}``: ``S cov_b S`` is symmetric positive semi-definite and similar to
    ``cov_a cov_b``, so the trace is the sum of the square roots of its eigenvalues
    (``scipy.linalg.eigh``, tiny negative round-off eigenvalues clipped to 0). This deviates on
    purpose from the usual ``scipy.linalg.sqrtm(cov_a @ cov_b)``: that product is not
    symmetric, and with fewer samples than dimensions (singular covariances, the normal case
    for a few dozen generated images and 128-d features) ``sqrtm`` returns complex parts and
    may fail, which FID code patches by adding ``eps * I``. The symmetric form needs neither
    and is exact for any positive semi-definite inputs. The result is clipped at 0 (round-off
    can make a distance of zero come out as -1e-15).

    Parameters
    ----------
    mu_a, mu_b : array_like, shape (D,)
    cov_a, cov_b : array_like, shape (D, D)
        Symmetric positive semi-definite covariances.

    Returns
    -------
    float
        The squared Fréchet distance (as FID reports it; no square root is taken).

    Examples
    --------
    Two diagonal Gaussians: ``d² = ||mu_a - mu_b||² + sum((sqrt(var_a) - sqrt(var_b))²)``.

    >>> d = frechet_distance_from_stats([0, 0], np.diag([1.0, 4.0]), [3, 0], np.diag([4.0, 1.0]))
    >>> round(d, 10)  # 9 + (1 - 2)**2 + (2 - 1)**2
    11.0
    """
    from scipy.linalg import eigh

    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, float)), np.atleast_1d(np.asarray(mu_b, float))
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, float)), np.atleast_2d(np.asarray(cov_b, float))
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise DataError(f"mismatched statistics: mu_a {mu_a.shape}, cov_a {cov_a.shape}, "
                        f"mu_b {mu_b.shape}, cov_b {cov_b.shape}; both sets need the same "
                        "feature dimension D (mu (D,), cov (D, D))")
    for name, arr in (("mu_a", mu_a), ("mu_b", mu_b), ("cov_a", cov_a), ("cov_b", cov_b)):
        if not np.isfinite(arr).all():
            raise DataError(f"{name} contains NaN or inf values")
    cov_a, cov_b = (cov_a + cov_a.T) / 2, (cov_b + cov_b.T) / 2
    w, v = eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = float(np.sqrt(np.clip(eigh((m + m.T) / 2, eigvals_only=True), 0, None)).sum())
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)
    return max(value, 0.0)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """In-domain FID-like distance between two image sets' features (the FID formula of Heusel
    et al., NeurIPS 2017, on :class:`~diffmem.embed.InDomainEncoder` features; not Inception FID).

    Fits a Gaussian (mean, ``ddof=1`` covariance) to each set and returns the squared Fréchet
    distance between them (see :func:`frechet_distance_from_stats` for the numerics). Lower is
    closer; 0 for identical sets. The estimate is biased upwards for small sets (as FID is), so
    compare values computed with the same sample sizes and the same encoder.

    Parameters
    ----------
    feats_a, feats_b : array_like, shape (N_a, D) and (N_b, D)
        Features of the two sets (e.g. generated and held-out real images), at least 2 rows
        each. The inputs are not modified.

    Returns
    -------
    float

    Raises
    ------
    DataError
        For non 2-D inputs, different feature dimensions, fewer than 2 rows, or NaN/inf.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(500, 4))
    >>> round(frechet_distance(a, a), 10)
    0.0
    >>> frechet_distance(a, a + [2.0, 0, 0, 0]) > 3.9
    True
    """
    a, b = _features("feats_a", feats_a), _features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise DataError(f"feats_a has {a.shape[1]} features per row and feats_b {b.shape[1]}; "
                        "embed both sets with the same encoder")
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


def alignment_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """In-domain prompt-image alignment: cosine similarity of each image with its own prompt
    (CLIPScore-like, Hessel et al., EMNLP 2021, without their ``2.5 * max(cos, 0)`` rescaling).

    Parameters
    ----------
    image_emb, text_emb : array_like, shape (N, D)
        Row ``i`` of each belongs to pair ``i`` (e.g. ``encoder.embed_images(generated)`` and
        ``encoder.embed_texts(prompts)``). Rows need not be normalized.

    Returns
    -------
    ndarray, shape (N,), float64
        Cosines in [-1, 1]; higher = the image fits its prompt better. Meaningful relative to
        the same encoder's cosines for real (image, report) pairs.

    Raises
    ------
    DataError
        For different shapes, non 2-D inputs, NaN/inf, or an all-zero row.

    Examples
    --------
    >>> alignment_score([[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, -1.0]]).round(4).tolist()
    [0.7071, -1.0]
    """
    a, b = _features("image_emb", image_emb), _features("text_emb", text_emb)
    if a.shape != b.shape:
        raise DataError(f"image_emb has shape {a.shape} and text_emb {b.shape}; pass one text "
                        "embedding per image, in the same order")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if (na == 0).any() or (nb == 0).any():
        raise DataError("an embedding row is all zeros; its cosine is undefined")
    return (a * b).sum(axis=1) / (na * nb)


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, *, keys=None,
                     ks=(1, 5, 10), chunk: int = 1024) -> dict[int, float]:
    """Image-to-report retrieval recall@k on held-out pairs: the share of images whose own
    report is among the ``k`` reports most similar to it (cosine), the candidates being the
    distinct reports of the set.

    Parameters
    ----------
    image_emb, text_emb : array_like, shape (N, D)
        Row ``i`` of each belongs to pair ``i``.
    keys : sequence, optional
        One hashable per pair naming its report (e.g. the report text): pairs with the same key
        share one candidate, so an image is not penalized for a different patient's identical
        report. Default: every pair's report is its own candidate.
    ks : sequence of int, optional
    chunk : int, optional
        Images scored at once (memory ``chunk x distinct reports``).

    Returns
    -------
    dict
        ``k -> recall@k`` in [0, 1].

    Examples
    --------
    >>> img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    >>> txt = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> retrieval_recall(img, txt, ks=(1, 2))     # image 3 ranks report 1 above its own
    {1: 0.6666666666666666, 2: 1.0}
    >>> retrieval_recall(img, txt, keys=["a", "b", "b"], ks=(1,))
    {1: 0.6666666666666666}
    """
    a, b = _features("image_emb", image_emb), _features("text_emb", text_emb)
    if a.shape != b.shape or len(a) == 0:
        raise DataError(f"image_emb has shape {a.shape} and text_emb {b.shape}; pass one report "
                        "embedding per image, at least one pair")
    keys = list(range(len(a))) if keys is None else list(keys)
    if len(keys) != len(a):
        raise DataError(f"got {len(keys)} keys for {len(a)} pairs; pass one key per pair")
    first: dict[Any, int] = {}
    rep: list[int] = []                       # the pair whose embedding stands for each report
    own = np.zeros(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        if k not in first:
            first[k] = len(rep)
            rep.append(i)
        own[i] = first[k]
    cand = b[rep]
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    cand = cand / np.linalg.norm(cand, axis=1, keepdims=True)
    ranks = np.zeros(len(a), dtype=np.int64)
    for start in range(0, len(a), chunk):
        sims = a[start:start + chunk] @ cand.T
        mine = sims[np.arange(len(sims)), own[start:start + chunk]]
        ranks[start:start + chunk] = (sims > mine[:, None]).sum(axis=1)
    return {int(k): float(np.mean(ranks < int(k))) for k in ks}

"""Image similarity backends for nearest-neighbour copy detection, found by name.

Every backend turns a batch of grayscale images into features once
(:meth:`SimilarityBackend.features`) and scores a whole query-by-reference block at a time
(:meth:`SimilarityBackend.similarity`), so training images are featurized once and streamed in
chunks. All similarities are "higher = more similar"; :meth:`SimilarityBackend.to_distance`
maps them to the distance that Gu et al.'s ratio criterion compares.

=============  ===========================================  ==============  =====================
name           similarity                                   range           distance
=============  ===========================================  ==============  =====================
``pixel``      cosine of mean-removed, L2-normalized        [-1, 1]         ``sqrt(2 - 2 s)``
               thumbnails ("normalized L2")                                 (L2 of the unit
                                                                            vectors)
``tiled_l2``   minus the largest per-tile RMS difference    [-1, 0]         ``-s``
               (Carlini et al., 2023)
``ssim``       mean SSIM, uniform 7x7 window (scikit-image  [-1, 1]         ``1 - s``
               defaults), on thumbnails
``embedding``  cosine of encoder embeddings                 [-1, 1]         ``sqrt(2 - 2 s)``
=============  ===========================================  ==============  =====================

Images are ``(N, H, W)`` float arrays in [0, 1] (what :meth:`CXRDataset.load_image` and the model
adapter's ``sample`` return). Pixel-based backends centre-crop them to a square and resize them to
``size`` x ``size`` with an area filter (:func:`diffmem.data.images.resize_square`); ``size=None``
keeps square images as they are.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> a = rng.random((3, 16, 16), dtype=np.float32)
>>> backend = get_backend("pixel", size=8)
>>> s = backend.similarity(backend.features(a), backend.features(a))
>>> s.shape, bool(np.allclose(np.diag(s), 1.0))
((3, 3), True)
>>> sorted(list_backends())
['embedding', 'pixel', 'ssim', 'tiled_l2']
"""

from __future__ import annotations

import abc
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from diffmem.errors import ConfigError, DataError
from diffmem.registry import Registry

log = logging.getLogger(__name__)

__all__ = [
    "EmbeddingBackend",
    "PixelBackend",
    "SSIMBackend",
    "SimilarityBackend",
    "TiledL2Backend",
    "as_image_batch",
    "get_backend",
    "list_backends",
    "register_backend",
]

_BACKENDS: Registry[type[SimilarityBackend]] = Registry("similarity backend")

# Elements of the largest float64 temporary a pairwise block may hold (8 MiB per array;
# SSIM peaks near 100 MB, and larger blocks are no faster).
_BLOCK_ELEMENTS = 1 << 20


def register_backend(cls: type[SimilarityBackend]) -> type[SimilarityBackend]:
    """Class decorator: make a :class:`SimilarityBackend` subclass available by its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__name__} has no 'name'; set a class attribute name = '...'")
    return _BACKENDS.add(name, cls)


def list_backends() -> list[str]:
    """Names of the registered similarity backends."""
    return _BACKENDS.names()


def get_backend(name: str | SimilarityBackend, **options: Any) -> SimilarityBackend:
    """The similarity backend ``name`` built with keyword ``options``.

    Parameters
    ----------
    name : str or SimilarityBackend
        A registered name (see :func:`list_backends`); a backend instance is returned as is
        (then ``options`` must be empty).
    **options
        The backend's keyword options (``size=``, ``grid=``, ``encoder=``...).

    Raises
    ------
    ConfigError
        For an unknown name (the message lists the known ones) or an option the backend does
        not take (the message lists those it does).
    """
    if isinstance(name, SimilarityBackend):
        if options:
            raise ConfigError(f"options {sorted(options)} given with an already built "
                              f"{name.name!r} backend; pass the backend's name instead, or set "
                              "them when building it")
        return name
    cls = _BACKENDS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"backend {name!r} takes no option(s) {unknown}; it takes {accepted}")
    return cls(**options)


def as_image_batch(images: Any, *, name: str = "images") -> np.ndarray:
    """Check that ``images`` is a non-empty ``(N, H, W)`` float batch with values in [0, 1].

    Returns it as a NumPy array (a CPU torch tensor is accepted). The input is not modified.

    Raises
    ------
    DataError
        For another shape, an integer dtype, non-finite values or values outside [0, 1]; the
        message says how to fix it.
    """
    if hasattr(images, "detach"):  # a torch tensor, without importing torch
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim != 3:
        fix = " (use images[None] for a single image)" if arr.ndim == 2 else ""
        raise DataError(f"{name} must be a (N, H, W) grayscale batch, got shape "
                        f"{arr.shape}{fix}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(f"{name} is empty (shape {arr.shape}); pass at least one image")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{name} has dtype {arr.dtype}; diffmem compares float images in "
                        "[0, 1]: divide 8-bit data by 255 (or 16-bit by 65535)")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains NaN or infinite values "
                        f"({int(np.sum(~np.isfinite(arr)))} of {arr.size}); fix the generator "
                        "or loader that produced them")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{name} has values in [{lo:.4g}, {hi:.4g}]; images must lie in "
                        "[0, 1]: clip them (np.clip(x, 0, 1)) or rescale them first")
    return arr


def _thumbnails(images: np.ndarray, size: int | None) -> np.ndarray:
    """Square float32 thumbnails ``(N, s, s)``: centre crop + area resize, or as is."""
    if size is None:
        if images.shape[1] != images.shape[2]:
            raise DataError(f"images are {images.shape[1]}x{images.shape[2]} but size=None "
                            "keeps them as they are and needs square images; pass size=N to "
                            "crop and resize them")
        return np.ascontiguousarray(images, dtype=np.float32)
    if images.shape[1:] == (size, size):
        return np.ascontiguousarray(images, dtype=np.float32)
    from diffmem.data.images import resize_square

    return np.stack([resize_square(im, size) for im in images]).astype(np.float32, copy=False)


def _check_size(size: Any, *, minimum: int = 1) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < minimum:
        raise ConfigError(f"size={size!r}; use an integer >= {minimum} (or None to keep square "
                          "images as they are)")
    return int(size)


def _side(features: np.ndarray, name: str) -> int:
    side = math.isqrt(features.shape[1])
    if side * side != features.shape[1]:
        raise DataError(f"{name} features have {features.shape[1]} columns, not a square "
                        "image; build them with this backend's features()")
    return side


def _check_pair(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    query, reference = np.asarray(query), np.asarray(reference)
    if query.ndim != 2 or reference.ndim != 2:
        raise DataError(f"features must be 2-D (N, D); got {query.shape} and {reference.shape}")
    if query.shape[1] != reference.shape[1]:
        raise DataError(f"query features have {query.shape[1]} columns but reference features "
                        f"{reference.shape[1]}: both must come from the same backend with the "
                        "same size")
    return query, reference


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-12)


def _cosine(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine of float32 unit rows, renormalized in float64 (so a self-match is exactly 1)."""
    q, r = _unit_rows(query.astype(np.float64)), _unit_rows(reference.astype(np.float64))
    return np.clip(q @ r.T, -1.0, 1.0)


def _chord(similarity: np.ndarray) -> np.ndarray:
    """L2 distance between unit vectors whose dot product is ``similarity``."""
    return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(similarity, dtype=np.float64), 0.0))


class SimilarityBackend(abc.ABC):
    """Base class of similarity backends (see the module docstring for the registry).

    Subclasses set ``name`` and implement :meth:`features`, :meth:`similarity`,
    :meth:`to_distance` and :meth:`params`, then register with :func:`register_backend`.

    Attributes
    ----------
    name : str
        Registry name.
    inner_product : bool
        True when :meth:`similarity` is the dot product of the features (then an exact FAISS
        inner-product index gives the same neighbours).
    max_similarity : float
        The similarity of an image with itself.
    """

    name: ClassVar[str] = ""
    inner_product: ClassVar[bool] = False
    max_similarity: ClassVar[float] = 1.0

    @abc.abstractmethod
    def features(self, images: np.ndarray) -> np.ndarray:
        """Features ``(N, D)`` float32 of an ``(N, H, W)`` image batch in [0, 1]."""

    @abc.abstractmethod
    def similarity(self, query: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Similarity matrix ``(Q, R)`` float64 between two feature arrays; higher = closer."""

    @abc.abstractmethod
    def to_distance(self, similarity: np.ndarray) -> np.ndarray:
        """The distance (>= 0, 0 for identical images) that a similarity stands for."""

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-ready settings that define the features (for hashing and caching)."""

    def cache_key(self) -> dict[str, Any] | None:
        """What identifies the features for an on-disk cache; ``None`` when unknown."""
        return self.params()

    def paired_similarity(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Similarity ``(Q, C)`` float64 of each query row to its own candidates only
        (``candidates[q]``, ``(Q, C, D)``): how an index's candidates are re-scored. The
        default calls :meth:`similarity` once per query."""
        out = np.empty(candidates.shape[:2])
        for q in range(len(query)):
            out[q] = self.similarity(query[q:q + 1], candidates[q])[0]
        return out

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if k != "backend")
        return f"{type(self).__name__}({opts})"


class CosineBackend(SimilarityBackend):
    """A backend whose features are unit rows and whose similarity is their cosine (the dot
    product, renormalized in float64), with the chord distance ``sqrt(2 - 2 s)``."""

    inner_product = True

    def similarity(self, query: np.ndarray, reference: np.ndarray) -> np.ndarray:
        return _cosine(*_check_pair(query, reference))

    def paired_similarity(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        q = _unit_rows(np.asarray(query, dtype=np.float64))
        c = np.asarray(candidates, dtype=np.float64)
        norm = np.linalg.norm(c, axis=2, keepdims=True)
        c = np.divide(c, norm, out=np.zeros_like(c), where=norm > 1e-12)
        return np.clip(np.einsum("qd,qcd->qc", q, c), -1.0, 1.0)

    def to_distance(self, similarity: np.ndarray) -> np.ndarray:
        return _chord(similarity)


@register_backend
class PixelBackend(CosineBackend):
    """Normalized-L2 pixel similarity of small thumbnails.

    Each image is area-resized to ``size`` x ``size``, flattened, its mean removed and the
    result scaled to unit L2 norm. The similarity of two images is the dot product of these
    vectors (their cosine, i.e. the Pearson correlation of the thumbnails' pixels), in [-1, 1];
    equivalently ``1 - ||a - b||^2 / 2``. The distance is ``||a - b|| = sqrt(2 - 2 s)`` in
    [0, 2]. Removing the mean makes the score blind to a global brightness shift, which in
    chest X-rays says little about identity; scaling blinds it to contrast. A constant image
    has no pattern left: its vector is zero and its similarity to everything (itself too) is 0.

    Parameters
    ----------
    size : int or None, optional
        Thumbnail side (default 32); ``None`` keeps square images as they are.
    """

    name = "pixel"

    def __init__(self, *, size: int | None = 32):
        self.size = _check_size(size)

    def features(self, images: np.ndarray) -> np.ndarray:
        x = _thumbnails(as_image_batch(images), self.size)
        x = x.reshape(len(x), -1).astype(np.float64)
        x -= x.mean(axis=1, keepdims=True)
        return _unit_rows(x).astype(np.float32)

    def params(self) -> dict[str, Any]:
        return {"backend": self.name, "size": self.size}


@register_backend
class TiledL2Backend(SimilarityBackend):
    """Tiled L2 distance (Carlini et al., USENIX Security 2023, "Extracting Training Data from
    Diffusion Models").

    Both images are resized to ``size`` x ``size`` and cut into a ``grid`` x ``grid`` array of
    non-overlapping tiles; for each pair of tiles at the same position the RMS difference
    ``sqrt(mean((a_t - b_t)^2))`` is computed, and the distance is the largest of them, so a
    copy must match everywhere: a generation that shares a large uniform background with a
    training image but differs in one region is far, where the plain L2 over the whole image
    would call it close. The similarity is minus that distance, in [-1, 0] (0 = identical).

    Deviations from the paper: the paper cuts 512 px images into 16 tiles of 128 px; here the
    images are first area-resized (default 64 px, 4 x 4 tiles of 16 px), which smooths pixel
    noise and keeps the cost low. The paper's fixed distance threshold is not used: diffmem
    calibrates the threshold on held-out images (:mod:`diffmem.detect.verdicts`).

    Parameters
    ----------
    size : int or None, optional
        Side of the resized images (default 64); must be a multiple of ``grid``.
    grid : int, optional
        Tiles per side (default 4, i.e. 16 tiles as in the paper).
    """

    name = "tiled_l2"
    max_similarity = 0.0

    def __init__(self, *, size: int | None = 64, grid: int = 4):
        self.size = _check_size(size)
        if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
            raise ConfigError(f"grid={grid!r}; use a positive integer (tiles per side)")
        self.grid = int(grid)
        if self.size is not None and self.size % self.grid:
            near = self.grid * max(1, round(self.size / self.grid))
            raise ConfigError(f"size={self.size} is not a multiple of grid={self.grid}; use "
                              f"for example size={near}")

    def features(self, images: np.ndarray) -> np.ndarray:
        """Resized images, flattened tile by tile (row of tiles, column of tiles, pixels)."""
        x = _thumbnails(as_image_batch(images), self.size)
        n, side, _ = x.shape
        if side % self.grid:
            raise DataError(f"{side}x{side} images do not split into a {self.grid}x{self.grid} "
                            "grid; pass size= a multiple of grid")
        t = side // self.grid
        tiles = x.reshape(n, self.grid, t, self.grid, t).transpose(0, 1, 3, 2, 4)
        return np.ascontiguousarray(tiles.reshape(n, -1), dtype=np.float32)

    def _tiles(self, features: np.ndarray) -> np.ndarray:
        n_tiles = self.grid * self.grid
        if features.shape[1] % n_tiles:
            raise DataError(f"features with {features.shape[1]} columns do not hold "
                            f"{n_tiles} equal tiles; build them with this backend's features()")
        # (tiles, images, pixels), contiguous per tile so each tile's product runs in BLAS
        tiles = features.reshape(len(features), n_tiles, -1).transpose(1, 0, 2)
        return np.ascontiguousarray(tiles, dtype=np.float64)

    def distance_matrix(self, query: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """``(Q, R)`` largest per-tile RMS difference."""
        query, reference = _check_pair(query, reference)
        q, r = self._tiles(query), self._tiles(reference)
        qn, rn = np.einsum("tnp,tnp->tn", q, q), np.einsum("tnp,tnp->tn", r, r)
        worst = np.zeros((q.shape[1], r.shape[1]))
        for t in range(q.shape[0]):
            d2 = q[t] @ r[t].T
            d2 *= -2.0
            d2 += qn[t, :, None]
            d2 += rn[t, None, :]
            np.maximum(worst, d2, out=worst)
        return np.sqrt(np.maximum(worst, 0.0) / q.shape[2])

    def similarity(self, query: np.ndarray, reference: np.ndarray) -> np.ndarray:
        return -self.distance_matrix(query, reference)

    def to_distance(self, similarity: np.ndarray) -> np.ndarray:
        return np.maximum(-np.asarray(similarity, dtype=np.float64), 0.0)

    def params(self) -> dict[str, Any]:
        return {"backend": self.name, "size": self.size, "grid": self.grid}


def _box_mean(x: np.ndarray, win: int) -> np.ndarray:
    """Mean over every full ``win`` x ``win`` window of the last two axes ("valid" positions)."""
    c = np.cumsum(x, axis=-2)
    c = np.concatenate([np.zeros_like(c[..., :1, :]), c], axis=-2)
    rows = c[..., win:, :] - c[..., :-win, :]
    c = np.cumsum(rows, axis=-1)
    c = np.concatenate([np.zeros_like(c[..., :1]), c], axis=-1)
    return (c[..., win:] - c[..., :-win]) / float(win * win)


def _patches(x: np.ndarray, win: int) -> np.ndarray:
    """Every full ``win`` x ``win`` window of ``x`` (N, s, s), as (positions, N, win * win)."""
    from numpy.lib.stride_tricks import sliding_window_view

    v = sliding_window_view(x, (win, win), axis=(1, 2))  # (N, m, m, win, win), a view
    return np.ascontiguousarray(v.reshape(len(x), -1, win * win).transpose(1, 0, 2))


@register_backend
class SSIMBackend(SimilarityBackend):
    """Mean structural similarity (Wang et al., IEEE TIP 2004) of thumbnails, as scikit-image.

    Computes what ``skimage.metrics.structural_similarity(a, b, data_range=1.0)`` returns with
    its defaults (uniform ``win_size`` x ``win_size`` window, sample covariance, K1 = 0.01,
    K2 = 0.03, the mean over the window positions that lie fully inside the image), for every
    query-reference pair at once, in float64: the per-image window means and variances are
    computed once, the cross term ``mean(x * y)`` of every window as one batched matrix
    product of the images' window patches (memory bounded by blocking). The Gaussian-weighted
    variant (``gaussian_weights=True``) is not provided. The similarity is in [-1, 1]
    (1 = identical); the distance used by the ratio criterion is ``1 - s`` (a dissimilarity,
    not a metric). Cost: about 25 microseconds per pair at 32 px on one CPU core (200
    generations against 5,000 training images: ~25 s), four times that at 64 px.

    Parameters
    ----------
    size : int or None, optional
        Thumbnail side (default 32; the cost grows with ``size**2`` per pair).
        ``None`` keeps square images as they are.
    win_size : int, optional
        Odd side of the sliding window (default 7, scikit-image's default).
    """

    name = "ssim"

    def __init__(self, *, size: int | None = 32, win_size: int = 7):
        if (isinstance(win_size, bool) or not isinstance(win_size, (int, np.integer))
                or win_size < 3 or win_size % 2 == 0):
            raise ConfigError(f"win_size={win_size!r}; use an odd integer >= 3 (default 7)")
        self.win_size = int(win_size)
        self.size = _check_size(size, minimum=self.win_size)

    def features(self, images: np.ndarray) -> np.ndarray:
        x = _thumbnails(as_image_batch(images), self.size)
        if x.shape[1] < self.win_size:
            raise DataError(f"images of side {x.shape[1]} are smaller than the SSIM window "
                            f"win_size={self.win_size}; pass a larger size=")
        return x.reshape(len(x), -1)

    def _stats(self, features: np.ndarray, side: int):
        x = features.reshape(len(features), side, side).astype(np.float64)
        w = self.win_size
        cov_norm = w * w / (w * w - 1.0)
        mu = _box_mean(x, w)
        var = cov_norm * (_box_mean(x * x, w) - mu * mu)
        return x, mu.reshape(len(x), -1), var.reshape(len(x), -1)

    def similarity(self, query: np.ndarray, reference: np.ndarray) -> np.ndarray:
        query, reference = _check_pair(query, reference)
        side = _side(query, "ssim")
        w = self.win_size
        if side < w:
            raise DataError(f"features of {side}x{side} images are smaller than the SSIM window "
                            f"win_size={w}; build them with this backend's features()")
        cov_norm = w * w / (w * w - 1.0)
        c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K * data_range)^2 with data_range = 1
        qx, qmu, qvar = self._stats(query, side)
        rx, rmu, rvar = self._stats(reference, side)
        n_pos, n_win = qmu.shape[1], w * w
        # blocks whose (positions, pairs) and (positions, images, window) temporaries stay
        # below _BLOCK_ELEMENTS float64 values
        rb = max(1, min(len(rx), _BLOCK_ELEMENTS // (n_pos * n_win)))
        qb = max(1, min(len(qx), _BLOCK_ELEMENTS // (n_pos * n_win),
                        _BLOCK_ELEMENTS // (n_pos * rb)))
        out = np.empty((len(qx), len(rx)))
        for i in range(0, len(qx), qb):
            qs = slice(i, i + qb)
            qp = _patches(qx[qs], w)  # (P, q, w*w)
            mq, vq = qmu[qs].T[:, :, None], qvar[qs].T[:, :, None]  # (P, q, 1)
            for j in range(0, len(rx), rb):
                rs = slice(j, j + rb)
                # window mean of x*y at every position for every pair: (P, q, w*w) @ (P, w*w, r)
                exy = np.matmul(qp, _patches(rx[rs], w).transpose(0, 2, 1)) / n_win
                mr, vr = rmu[rs].T[:, None, :], rvar[rs].T[:, None, :]  # (P, 1, r)
                mqr = mq * mr
                num = (2.0 * mqr + c1) * (2.0 * cov_norm * (exy - mqr) + c2)
                den = (mq * mq + mr * mr + c1) * (vq + vr + c2)
                out[qs, rs] = (num / den).mean(axis=0)
        return out

    def to_distance(self, similarity: np.ndarray) -> np.ndarray:
        return 1.0 - np.asarray(similarity, dtype=np.float64)

    def params(self) -> dict[str, Any]:
        return {"backend": self.name, "size": self.size, "win_size": self.win_size}


EmbedFn = Callable[[np.ndarray], Any]


def _encoder_id(encoder: Any) -> str | None:
    fp = getattr(encoder, "fingerprint", None)
    if callable(fp):
        fp = fp()
    return fp if isinstance(fp, str) and fp else None


@register_backend
class EmbeddingBackend(CosineBackend):
    """Cosine similarity of image embeddings from an encoder (e.g. diffmem's in-domain
    open_clip model, :mod:`diffmem.embed`).

    The encoder is any callable ``embed(images) -> (N, D)`` taking ``(N, H, W)`` float32 images
    in [0, 1] (NumPy; a torch tensor result is accepted), or an object with such an
    ``embed_images`` method. It is called on each batch as given (it resizes and normalizes as
    it needs). Embeddings are scaled to unit norm; the similarity is their dot product (cosine,
    [-1, 1]) and the distance ``sqrt(2 - 2 s)``, the L2 distance of the unit embeddings.

    Parameters
    ----------
    encoder : callable or object with ``embed_images``
        The image encoder.
    encoder_id : str, optional
        What identifies the encoder's weights (for result hashing and the feature cache);
        default: the encoder's ``fingerprint`` (attribute or method) when it has one. Without
        an id, features are not cached on disk.
    image_size : int, optional
        Side at which dataset images are loaded before they are passed to the encoder
        (default: the encoder's ``image_size`` attribute when it has one). Arrays passed in
        directly are given to the encoder as they are.
    """

    name = "embedding"

    def __init__(self, *, encoder: Any = None, encoder_id: str | None = None,
                 image_size: int | None = None):
        if encoder is None:
            raise ConfigError("the 'embedding' backend needs an encoder: pass encoder= a "
                              "callable embed(images) -> (N, D) or an object with "
                              "embed_images (e.g. the in-domain encoder of `diffmem embed`)")
        fn = getattr(encoder, "embed_images", None)
        if fn is None and callable(encoder):
            fn = encoder
        if not callable(fn):
            raise ConfigError(f"encoder {type(encoder).__name__} is neither callable nor has an "
                              "embed_images method; pass embed(images) -> (N, D)")
        self.encoder = encoder
        self._embed: EmbedFn = fn
        self.encoder_id = encoder_id if encoder_id is not None else _encoder_id(encoder)
        if image_size is None:
            image_size = getattr(encoder, "image_size", None)
        self.image_size = _check_size(image_size)

    def features(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(as_image_batch(images), dtype=np.float32)
        out = self._embed(x)
        if hasattr(out, "detach"):
            out = out.detach().float().cpu().numpy()
        out = np.asarray(out)
        if out.ndim != 2 or out.shape[0] != len(x) or out.shape[1] < 1:
            raise DataError(f"the encoder returned shape {out.shape} for {len(x)} images; "
                            "it must return (N, D) embeddings")
        if not np.all(np.isfinite(out)):
            raise DataError("the encoder returned NaN or infinite embeddings; check its weights")
        return _unit_rows(out.astype(np.float64)).astype(np.float32)

    def params(self) -> dict[str, Any]:
        return {"backend": self.name, "encoder": self.encoder_id}

    def cache_key(self) -> dict[str, Any] | None:
        return self.params() if self.encoder_id else None

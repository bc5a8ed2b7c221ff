"""Copy verdicts: a similarity threshold calibrated on held-out real images, Gu et al.'s ratio
criterion, and the one setup that both ``diffmem detect`` and ``diffmem mitigate`` use.

A generation is a COPY when the similarity to its nearest training image is above a threshold
(:func:`is_copy`, the one place this rule is written). The threshold comes from images that are
*not* in the training set (the validation/test split, or a ``--calibration`` folder): none of
them is a copy, so their nearest-training similarities are the null distribution, and the
threshold that flags at most a fraction ``fpr`` of them is the detector's operating point at
false-positive rate ``fpr``.

:func:`prepare_verdicts` builds everything a verdict needs: the similarity backend (loading an
embedding encoder from its folder), the training images' features (cached, computed once per
machine under ``accelerate launch``) and the threshold (fixed, or calibrated on held-out images
that share no study id with the training records), held in a :class:`CopyVerdicts`.

Examples
--------
>>> import numpy as np
>>> t = calibrate_threshold(np.linspace(0.1, 1.0, 10), fpr=0.1)
>>> round(t.value, 6), t.empirical_fpr
(0.9, 0.1)
>>> copy_verdicts(np.array([0.5, 0.95]), t).tolist()
[False, True]
>>> ratio_criterion(np.array([0.1, 0.5]), np.array([0.6, 0.6])).tolist()
[True, False]
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffmem.data.dataset import CXRDataset
from diffmem.detect.neighbors import (
    ReferenceFeatures,
    _load_size,
    nearest_neighbors,
    one_blas_thread,
)
from diffmem.detect.similarity import SimilarityBackend, get_backend
from diffmem.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["NO_HELDOUT", "CopyVerdicts", "Threshold", "build_backend", "calibrate_on_heldout",
           "calibrate_threshold", "copy_verdicts", "fixed_threshold", "heldout_threshold",
           "is_copy", "is_ratio_copy", "prepare_verdicts", "ratio_criterion",
           "reference_features"]

NO_HELDOUT = ("no held-out images to calibrate the copy threshold on: pass --calibration DIR "
              "(real images that are not in the training set) or a fixed --threshold")


@dataclass(frozen=True)
class Threshold:
    """A similarity threshold: a generation is a copy when its top-1 similarity is above it.

    Attributes
    ----------
    value : float
        Similarities strictly greater than ``value`` are copies.
    fpr : float or None
        Target false-positive rate (``None`` for a fixed threshold).
    n : int
        Held-out images it was calibrated on (0 for a fixed threshold).
    method : str
        ``"heldout-quantile"`` or ``"fixed"``.
    empirical_fpr : float or None
        Fraction of the held-out similarities above ``value`` (at most ``fpr``).
    resolvable : bool
        False when ``n < 1 / fpr``: no held-out image may be flagged, so the threshold is the
        largest held-out similarity and the target FPR is not actually resolved.
    null_summary : dict
        Min, median, 99th percentile and max of the held-out similarities.
    """

    value: float
    fpr: float | None
    n: int
    method: str
    empirical_fpr: float | None = None
    resolvable: bool = True
    null_summary: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "fpr": self.fpr, "n": self.n, "method": self.method,
                "empirical_fpr": self.empirical_fpr, "resolvable": self.resolvable,
                "null_summary": dict(self.null_summary)}


def _check_fpr(fpr: Any) -> float:
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float, np.floating)) \
            or not 0.0 < float(fpr) < 1.0:
        raise ConfigError(f"fpr={fpr!r}; use a false-positive rate strictly between 0 and 1 "
                          "(e.g. 0.01)")
    return float(fpr)


def _finite_1d(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains {int(np.sum(~np.isfinite(arr)))} NaN or infinite "
                        "value(s); recompute them")
    return arr


def calibrate_threshold(null_similarities: Any, *, fpr: float = 0.01) -> Threshold:
    """Smallest similarity threshold whose false-positive rate on held-out real images is at
    most ``fpr``.

    With the ``n`` held-out similarities sorted ascending, ``s_(1) <= ... <= s_(n)``, at most
    ``m = floor(fpr * n)`` of them may lie above the threshold, so the threshold is the order
    statistic ``s_(n - m)`` (that is ``s_(ceil((1 - fpr) n))``): a conservative empirical
    ``1 - fpr`` quantile. Any lower value would flag at least ``m + 1`` held-out images; ties
    can only lower the empirical FPR.

    Parameters
    ----------
    null_similarities : array-like
        Top-1 nearest-training similarity of each held-out real image (same backend and
        settings as the generations').
    fpr : float, optional
        Target false-positive rate (default 0.01).

    Returns
    -------
    Threshold

    Raises
    ------
    DataError
        When there are no held-out similarities (pass ``--calibration DIR`` or
        ``--threshold``) or some are NaN.
    ConfigError
        When ``fpr`` is not in (0, 1).

    Notes
    -----
    When ``n < 1 / fpr`` the rate cannot be resolved: ``m = 0`` and the threshold is the
    largest held-out similarity. A warning says how many held-out images would be needed.

    Examples
    --------
    >>> t = calibrate_threshold([0.2, 0.4, 0.6, 0.8], fpr=0.25)
    >>> t.value, t.empirical_fpr
    (0.6, 0.25)
    """
    fpr = _check_fpr(fpr)
    null = _finite_1d(null_similarities, "null_similarities")
    n = len(null)
    if n == 0:
        raise DataError(NO_HELDOUT)
    allowed = math.floor(round(fpr * n, 9))  # round: 0.29 * 100 must give 29, not 28
    value = float(np.sort(null)[n - allowed - 1])
    needed = math.ceil(round(1.0 / fpr, 9))
    resolvable = n >= needed
    if not resolvable:
        log.warning("only %d held-out image(s) calibrate the copy threshold: an FPR of %g cannot "
                    "be resolved (the smallest non-zero FPR is 1/%d = %.3g), so the threshold is "
                    "the largest held-out similarity; use at least %d held-out images",
                    n, fpr, n, 1.0 / n, needed)
    summary = {"min": float(null.min()), "median": float(np.median(null)),
               "p99": float(np.quantile(null, 0.99)), "max": float(null.max())}
    return Threshold(value=value, fpr=fpr, n=n, method="heldout-quantile",
                     empirical_fpr=float(np.mean(null > value)), resolvable=resolvable,
                     null_summary=summary)


def fixed_threshold(value: float) -> Threshold:
    """A threshold given by the user (``--threshold``), not calibrated."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
            or not math.isfinite(float(value)):
        raise ConfigError(f"threshold={value!r}; use a finite number on the backend's "
                          "similarity scale")
    return Threshold(value=float(value), fpr=None, n=0, method="fixed")


def calibrate_on_heldout(heldout: np.ndarray | CXRDataset | None,
                         reference: Any, *, backend: Any = "pixel", fpr: float = 0.01,
                         size: int | None = None, batch_size: int = 256,
                         index: str | None = None, split: str | None = "train") -> Threshold:
    """Calibrate a copy threshold from held-out real images' nearest-training similarity.

    Parameters
    ----------
    heldout : numpy.ndarray, CXRDataset or None
        Real images that are not in the training set (every record of a dataset is used).
    reference : CXRDataset, numpy.ndarray or ReferenceFeatures
        The training images, as for :func:`~diffmem.detect.neighbors.nearest_neighbors`.
    backend, size, batch_size, index, split
        As for :func:`~diffmem.detect.neighbors.nearest_neighbors`; use the settings the
        generations are scored with.
    fpr : float, optional
        Target false-positive rate.

    Raises
    ------
    DataError
        When there are no held-out images, or held-out records share study ids with the
        reference's training records (they would not be held out).
    """
    train_ids = None
    if isinstance(reference, CXRDataset):
        train_ids = {s.study_id for s in reference if split is None or s.split == split}
    threshold, _ = heldout_threshold(heldout, reference, backend, fpr=fpr, train_ids=train_ids,
                                     size=size, batch_size=batch_size, index=index, split=split)
    return threshold


def heldout_threshold(heldout: np.ndarray | CXRDataset | Sequence[str | os.PathLike] | None,
                      reference: Any, backend: str | SimilarityBackend, *, fpr: float,
                      train_ids: Iterable[str] | None = None,
                      **search: Any) -> tuple[Threshold, np.ndarray]:
    """The copy threshold calibrated on held-out real images, and their similarities.

    Parameters
    ----------
    heldout : numpy.ndarray, CXRDataset, sequence of paths or None
        Real images that are not in the training set: an ``(N, H, W)`` array, a dataset (every
        record) or image files (PNG/JPEG/DICOM, loaded at the backend's size).
    reference : CXRDataset, numpy.ndarray or ReferenceFeatures
        The training images, as for :func:`~diffmem.detect.neighbors.nearest_neighbors`.
    backend : str or SimilarityBackend
    fpr : float
        Target false-positive rate.
    train_ids : iterable of str, optional
        Study ids of the training records; a held-out dataset sharing any is refused.
    **search
        Further options of :func:`~diffmem.detect.neighbors.nearest_neighbors` (``size``,
        ``batch_size``, ``index``, ``split``).

    Returns
    -------
    threshold : Threshold
    null_similarities : numpy.ndarray
        Each held-out image's top-1 similarity to the training images.

    Raises
    ------
    DataError
        No held-out images, or held-out records that share study ids with the training ones.
    """
    _check_fpr(fpr)
    if heldout is None or len(heldout) == 0:
        raise DataError(NO_HELDOUT)
    query = heldout
    if isinstance(heldout, CXRDataset):
        if train_ids is not None:
            _check_held_out(heldout, train_ids)
    elif not isinstance(heldout, np.ndarray):
        from diffmem.data.images import read_image

        size = _load_size(get_backend(backend) if isinstance(backend, str) else backend)
        query = np.stack([read_image(p, size=size) for p in heldout])
    with one_blas_thread():
        nn = nearest_neighbors(query, reference, backend=backend, k=1, **search)
    null = nn.similarities[:, 0]
    threshold = calibrate_threshold(null, fpr=fpr)
    log.info("copy threshold %.4f (%s similarity) calibrated on %d held-out image(s) at FPR %g",
             threshold.value, getattr(backend, "name", backend), threshold.n, fpr)
    return threshold, null


def _check_held_out(heldout: CXRDataset, train_ids: Iterable[str]) -> None:
    shared = sorted({s.study_id for s in heldout} & set(train_ids))
    if shared:
        raise DataError(f"{len(shared)} held-out record(s) share study ids with the training "
                        f"records (e.g. {shared[:3]}); they are not held out: use the "
                        "validate/test split or images from outside the training set",
                        path=heldout.root)


# ---------------------------------------------------------------------------- the rule
def is_copy(similarity: Any, threshold: Threshold | float) -> Any:
    """The copy rule: a generation is a copy when its top-1 similarity to the training images
    is strictly above the threshold.

    Parameters
    ----------
    similarity : float or array-like
        Top-1 nearest-training similarity of one generation or of several.
    threshold : Threshold or float

    Returns
    -------
    numpy.bool_ or numpy.ndarray of bool
        Shaped like ``similarity``; NaN is never a copy. :func:`copy_verdicts` is the checked
        form for user input.

    Examples
    --------
    >>> bool(is_copy(0.61, 0.6)), bool(is_copy(0.6, 0.6))
    (True, False)
    """
    value = threshold.value if isinstance(threshold, Threshold) else float(threshold)
    return np.asarray(similarity, dtype=np.float64) > value


def is_ratio_copy(d1: Any, d2: Any, *, ratio: float = 1 / 3) -> Any:
    """Gu et al.'s ratio rule: the nearest training image is much closer than the second,
    ``d1 < ratio * d2``; never when ``d2`` is 0 (two identical training images).

    :func:`ratio_criterion` is the checked form for user input.

    Examples
    --------
    >>> is_ratio_copy([0.1, 0.0], [0.6, 0.0]).tolist()
    [True, False]
    """
    d1, d2 = np.asarray(d1, dtype=np.float64), np.asarray(d2, dtype=np.float64)
    return (d2 > 0) & (d1 < ratio * d2)


def copy_verdicts(similarities_top1: Any, threshold: Threshold | float) -> np.ndarray:
    """Boolean copy verdicts (:func:`is_copy`) of checked similarities.

    Parameters
    ----------
    similarities_top1 : array-like
        ``(N,)`` similarity of each generation to its nearest training image.
    threshold : Threshold or float

    Returns
    -------
    numpy.ndarray of bool

    Raises
    ------
    DataError
        Similarities that are not 1-D or hold NaN.
    ConfigError
        A threshold that is not a finite number.
    """
    if not isinstance(threshold, Threshold):
        threshold = fixed_threshold(threshold)
    return is_copy(_finite_1d(similarities_top1, "similarities_top1"), threshold)


def ratio_criterion(d1: Any, d2: Any, *, ratio: float = 1 / 3) -> np.ndarray:
    """Memorization by the nearest-neighbour distance ratio (Gu et al., "On Memorization in
    Diffusion Models", 2023).

    A generation is memorized when its distance to the nearest training image is less than
    ``ratio`` times its distance to the second nearest: ``d1 < ratio * d2`` (default 1/3), i.e.
    it is much closer to one training image than to any other. Distances come from the
    backend's :meth:`~diffmem.detect.similarity.SimilarityBackend.to_distance`
    (:attr:`NeighborResult.distances` columns 0 and 1): the L2 distance of the unit vectors
    ``sqrt(2 - 2 s)`` for ``pixel`` and ``embedding`` (Gu et al. use L2), the tiled distance for
    ``tiled_l2`` and ``1 - s`` for ``ssim``.

    Parameters
    ----------
    d1, d2 : array-like
        ``(N,)`` distances (>= 0) to the nearest and second-nearest training images.
    ratio : float, optional
        Threshold on ``d1 / d2`` (default 1/3).

    Returns
    -------
    numpy.ndarray of bool
        When both distances are 0 (two identical training images) the verdict is False.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) \
            or not 0.0 < float(ratio) <= 1.0:
        raise ConfigError(f"ratio={ratio!r}; use a number in (0, 1] (Gu et al. use 1/3)")
    d1, d2 = _finite_1d(d1, "d1"), _finite_1d(d2, "d2")
    if d1.shape != d2.shape:
        raise DataError(f"d1 has {len(d1)} values but d2 has {len(d2)}; pass one pair per "
                        "generation")
    if (d1 < 0).any() or (d2 < 0).any():
        raise DataError("distances must be >= 0; convert similarities with the backend's "
                        "to_distance() (or use NeighborResult.distances)")
    if (d1 > d2 + 1e-12).any():
        raise DataError("d1 is larger than d2 for some generations; d1 must be the nearest "
                        "neighbour's distance and d2 the second nearest's")
    return is_ratio_copy(d1, d2, ratio=float(ratio))


# ---------------------------------------------------------------------------- the setup
@dataclass(frozen=True)
class CopyVerdicts:
    """What copy verdicts need: the backend, the training images' features and the threshold.

    Attributes
    ----------
    backend : SimilarityBackend
    reference : ReferenceFeatures
        Features of the training split's images.
    threshold : Threshold
    null_similarities : numpy.ndarray or None
        Held-out images' top-1 similarities the threshold was calibrated on (None for a given
        threshold).
    """

    backend: SimilarityBackend
    reference: ReferenceFeatures
    threshold: Threshold
    null_similarities: np.ndarray | None = None

    def judge(self, similarities: Any) -> Any:
        """Copy verdicts (:func:`is_copy`) of top-1 similarities at this threshold."""
        return is_copy(similarities, self.threshold)

    @property
    def approximate(self) -> dict[str, Any] | None:
        """The approximate search's settings and measured recall when the training features
        come from an IVF reference index (:func:`diffmem.detect.index.write_ivf`), else None.
        Part of the stored results' keys: exact and approximate verdicts are kept apart."""
        return (self.reference.source or {}).get("approximate")

    def search_note(self) -> str | None:
        """A sentence for summaries when the verdicts come from an approximate search."""
        a = self.approximate
        if a is None:
            return None
        return (f"copy verdicts searched an approximate FAISS IVF index ({a['nprobe']} of "
                f"{a['nlist']} lists probed; recall@1 {a['recall_at_1']:.4f} against the exact "
                f"search, measured at build time on {a['probe_queries']} leave-one-out "
                "queries): a verdict can differ from the exact one only where the nearest "
                "training image is missed")


def build_backend(name: str, options: dict[str, Any] | None = None) -> SimilarityBackend:
    """The similarity backend ``name`` with keyword ``options``; an ``encoder`` option given as
    a folder (written by ``diffmem embed``) is loaded with :func:`diffmem.embed.load_encoder`.

    Examples
    --------
    >>> build_backend("pixel", {"size": 8}).params()["size"]
    8
    """
    options = dict(options or {})
    if name == "embedding" and isinstance(options.get("encoder"), (str, os.PathLike)):
        from diffmem.embed import load_encoder

        options["encoder"] = load_encoder(options["encoder"])
    return get_backend(name, **options)


def reference_features(train_set: CXRDataset, backend: SimilarityBackend, *,
                       cache_dir: str | os.PathLike | None = None,
                       state: Any = None,
                       index: str | os.PathLike | None = None) -> ReferenceFeatures:
    """Features of the training split's images: from a reference index, or computed and
    cached in ``cache_dir``.

    Parameters
    ----------
    train_set : CXRDataset or sequence of paths
        Its ``train`` records are the reference (or the image files, not cached).
    backend : SimilarityBackend
    cache_dir : path, optional
        Where the features are cached (and found again by later runs).
    state : accelerate.PartialState, optional
        Under ``accelerate launch``: the main process computes the features first, the others
        then read them from the cache.
    index : path, optional
        A reference index folder (``diffmem index build``) holding these features: opened
        (checked against the data's fingerprint and the backend) instead of computing them.

    Raises
    ------
    DataError
        When the training split has fewer than 2 images, or ``index`` does not fit the data or
        backend.
    """
    def compute() -> ReferenceFeatures:
        if index is not None:
            from diffmem.detect.index import open_index

            return open_index(index, train_set, backend)
        if not isinstance(train_set, CXRDataset):
            return _file_features(train_set, backend)
        return ReferenceFeatures.from_dataset(train_set, backend, split="train",
                                              cache_dir=cache_dir)

    with one_blas_thread():
        if state is None:
            reference = compute()
        else:
            if state.is_main_process:
                reference = compute()
            state.wait_for_everyone()
            if not state.is_main_process:
                reference = compute()
    if len(reference) < 2:
        raise DataError("the training split has fewer than 2 images; the nearest-neighbour "
                        "verdicts compare each generation with its two nearest training images",
                        path=getattr(train_set, "root", None))
    return reference


def _file_features(files: Sequence[str | os.PathLike], backend: SimilarityBackend,
                   batch_size: int = 256) -> ReferenceFeatures:
    """Features of image files (a ``--reference`` folder); each file's name stands for its
    study id."""
    from diffmem.data.images import read_image
    from diffmem.utils import progress

    size = _load_size(backend)
    feats = []
    for i in progress(range(0, len(files), batch_size), desc="reference features",
                      unit="batch"):
        feats.append(backend.features(np.stack([read_image(p, size=size)
                                                for p in files[i:i + batch_size]])))
    names = np.array([os.path.basename(os.fspath(p)) for p in files], dtype=str)
    return ReferenceFeatures(np.concatenate(feats), np.arange(len(files), dtype=np.int64), names,
                             backend.params(), {"kind": "files", "n": len(files)})


def prepare_verdicts(train_set: CXRDataset, *, backend: str = "pixel",
                     backend_options: dict[str, Any] | None = None,
                     threshold: Threshold | float | None = None,
                     heldout: np.ndarray | CXRDataset | Sequence[str | os.PathLike] | None = None,
                     fpr: float = 0.01, cache_dir: str | os.PathLike | None = None,
                     state: Any = None, index: str | os.PathLike | None = None) -> CopyVerdicts:
    """Backend, training-image features and copy threshold, as ``diffmem detect`` and
    ``diffmem mitigate`` use them.

    Parameters
    ----------
    train_set : CXRDataset or sequence of paths
        The training data (its ``train`` records), or the training images' files.
    backend : str, optional
        Similarity backend name (default ``pixel``).
    backend_options : dict, optional
        Its keyword options (see :func:`build_backend`).
    threshold : Threshold or float, optional
        A threshold given instead of calibrating one (a float becomes
        :func:`fixed_threshold`).
    heldout : numpy.ndarray, CXRDataset or sequence of paths, optional
        Held-out real images to calibrate on (see :func:`heldout_threshold`); needed when no
        ``threshold`` is given.
    fpr : float, optional
        False-positive rate of the calibrated threshold (default 0.01).
    cache_dir : path, optional
        Feature cache folder.
    state : accelerate.PartialState, optional
        See :func:`reference_features`.
    index : path, optional
        A reference index folder holding the training features (see
        :func:`reference_features`).

    Returns
    -------
    CopyVerdicts
    """
    backend_obj = build_backend(backend, backend_options)
    reference = reference_features(train_set, backend_obj, cache_dir=cache_dir, state=state,
                                   index=index)
    if threshold is not None:
        given = threshold if isinstance(threshold, Threshold) else fixed_threshold(threshold)
        return CopyVerdicts(backend_obj, reference, given)
    train_ids = ({s.study_id for s in train_set if s.split == "train"}
                 if isinstance(train_set, CXRDataset) else None)
    calibrated, null = heldout_threshold(heldout, reference, backend_obj, fpr=fpr,
                                         train_ids=train_ids)
    return CopyVerdicts(backend_obj, reference, calibrated, null)

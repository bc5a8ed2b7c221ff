"""Pictures in the report: figures and images as ``data:`` URIs, and the patient-image policy.

Training images are patient data, and so is a generation that copies one (it is, pixel for
pixel, nearly that image). :data:`IMAGE_MODES` says what the report does with both:

* ``include``: shown as they are (down-scaled to :data:`THUMB_SIZE` pixels), with a notice;
* ``blur``: both reduced to a coarse mosaic of their local contrast (:func:`obscure`), with a
  notice: the chest's layout (lung fields, mediastinum, the silhouette every chest X-ray
  shares) is removed and only :data:`BLUR_TILES` x :data:`BLUR_TILES` tiles of what is left
  stay, so a blurred picture correlates weakly with its original (a Gaussian blur kept the
  layout and correlated 0.85-0.91 at 64 px); anatomy and burnt-in text are gone, and a blurred
  generation can still be set beside its blurred training image;
* ``omit``: neither is in the file (no bytes of them); the similarity numbers stay.

Figures (score histograms, ROC curves, bar charts, Pareto plots) hold no images and are
embedded in every mode.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
import numpy as np

from diffmem.errors import ConfigError

__all__ = ["BLUR_LAYOUT_SIGMA", "BLUR_TILES", "IMAGE_MODES", "THUMB_SIZE", "array_png",
           "check_mode", "data_uri", "obscure", "patient_image"]

#: Side, in pixels, of the patient images embedded in the report.
THUMB_SIZE = 160
#: ``blur`` mode: Gaussian sigma, as a fraction of the image side, of the layout removed.
BLUR_LAYOUT_SIGMA = 0.10
#: ``blur`` mode: tiles per side of the mosaic that is shown (3: with 4, the re-ID model trained
#: on 331 patients ranked the own patient first for 23% of the ``tiny`` preset's blurred
#: training pictures, chance being 7%; see :func:`obscure`).
BLUR_TILES = 3

IMAGE_MODES = {
    "include": "training images and the generations that copy them are shown",
    "blur": "training images and the generations that copy them are obscured: their layout "
            f"(Gaussian low-pass, sigma = {BLUR_LAYOUT_SIGMA:.0%} of the side) removed, the rest "
            f"averaged over {BLUR_TILES} x {BLUR_TILES} tiles",
    "omit": "no training image and no generation flagged as a copy is in this file",
}


def check_mode(images: str) -> str:
    """``images`` if it is one of :data:`IMAGE_MODES`, else a :class:`ConfigError`."""
    if images not in IMAGE_MODES:
        raise ConfigError(f"images={images!r}; choose one of {', '.join(map(repr, IMAGE_MODES))}"
                          " (include shows patient images, blur blurs them, omit leaves them "
                          "out)")
    return images


def data_uri(png: bytes | str | os.PathLike) -> str:
    """A ``data:image/png;base64,...`` URI of PNG bytes or of a PNG file."""
    if not isinstance(png, bytes):
        png = Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def array_png(image: np.ndarray) -> bytes:
    """PNG bytes of a grey image in [0, 1]."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buf,
                                                                                 format="PNG")
    return buf.getvalue()


def obscure(image: np.ndarray, *, tiles: int = BLUR_TILES,
            layout_sigma: float = BLUR_LAYOUT_SIGMA) -> np.ndarray:
    """The ``blur`` mode's picture of a grey image: its layout removed, the rest as coarse tiles.

    The image minus its Gaussian low-pass (sigma ``layout_sigma`` of the side) keeps the local
    contrast and drops the silhouette that all chest X-rays share and that dominates their
    correlation; that remainder is averaged over ``tiles`` x ``tiles`` tiles, which drops every
    finer detail, and shown around mid-grey (4 standard deviations span black to white).
    Measured on the 594 training images of the ``demo`` preset (seed 0) at the report's
    160 px with 4 x 4 tiles, the correlation with the original at 64 px is mean 0.12, max 0.47
    (a Gaussian blur of sigma 8% of the side: mean 0.85, max 0.91); fewer tiles keep less. The
    tiles were first chosen (4) on the ``tiny`` preset's images against the first embedded
    re-ID model (73 training patients); its successor (331 patients, AUC 0.998 on new demo
    patients) still recognized 4 x 4 mosaics: on ``tiny`` it ranked the own patient first for
    23% of the blurred training pictures (chance 7%), so the default became 3 x 3 (10%;
    2 x 2: 8%), a choice made on those measurements. With 3 x 3 tiles on ``demo`` the embedded
    model re-identifies all 594 originals above its held-out-calibrated threshold, none of their
    pictures, and ranks the own patient first for 0.3% of them (chance about 1%).

    Parameters
    ----------
    image : ndarray
        2-D grey image in [0, 1]; not modified.
    tiles : int, optional
        Tiles per side.
    layout_sigma : float, optional
        Gaussian sigma of the removed layout, as a fraction of the longer side.

    Returns
    -------
    ndarray
        Same shape, values in [0, 1], constant over each tile.

    Examples
    --------
    >>> x = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    >>> y = obscure(x)
    >>> y.shape, len(np.unique(y)) <= BLUR_TILES ** 2, bool(0 <= y.min() <= y.max() <= 1)
    ((64, 64), True, True)
    """
    from scipy.ndimage import gaussian_filter

    image = np.asarray(image, dtype=np.float64)
    detail = image - gaussian_filter(image, sigma=layout_sigma * max(image.shape),
                                     mode="nearest")
    rows = np.array_split(np.arange(image.shape[0]), tiles)
    cols = np.array_split(np.arange(image.shape[1]), tiles)
    out = np.empty_like(detail)
    for r in rows:
        for c in cols:
            out[np.ix_(r, c)] = detail[np.ix_(r, c)].mean()
    spread = 4.0 * out.std()
    return np.clip(0.5 + (out - out.mean()) / (spread if spread > 0 else 1.0), 0.0, 1.0)


def patient_image(path: str | os.PathLike, mode: str, *, resolution: int | None = None
                  ) -> str | None:
    """A patient image (a training image, or a generation that copies one) as the report shows
    it in ``mode``: a PNG data URI of the image at :data:`THUMB_SIZE` pixels (:func:`obscure`
    in ``blur`` mode), or None in ``omit`` mode, where the file is not even read.

    Parameters
    ----------
    path : path
        An image file (PNG, JPEG or DICOM; :func:`diffmem.data.images.read_image`).
    mode : str
        One of :data:`IMAGE_MODES`.
    resolution : int, optional
        Reduce the image to ``resolution`` pixels first (then enlarge it to the thumbnail size,
        bilinear): a training image shown at the resolution of the generations it is compared
        with, which cannot hold finer detail.
    """
    check_mode(mode)
    if mode == "omit":
        return None
    from diffmem.data.images import read_image, resize_square

    if resolution is not None and int(resolution) < THUMB_SIZE:
        small = read_image(path, size=int(resolution))
        image = np.asarray(resize_square(small, THUMB_SIZE), dtype=np.float64)
    else:
        image = np.asarray(read_image(path, size=THUMB_SIZE), dtype=np.float64)
    if mode == "blur":
        image = obscure(image)
    return data_uri(array_png(image))

"""Pictures in the report: figures and images as ``data:`` URIs, and the patient-image policy.

Training images are patient data, and so is a generation that copies one (it is, pixel for
pixel, nearly that image). :data:`IMAGE_MODES` says what the report does with both:

* ``include``: shown as they are (down-scaled to :data:`THUMB_SIZE` pixels), with a notice;
* ``blur``: both blurred with a strong Gaussian blur (sigma :data:`BLUR_SIGMA` of the side),
  with a notice: the layout stays visible, anatomy and burnt-in text do not;
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

__all__ = ["BLUR_SIGMA", "IMAGE_MODES", "THUMB_SIZE", "array_png", "check_mode", "data_uri",
           "patient_image"]

IMAGE_MODES = {
    "include": "training images and the generations that copy them are shown",
    "blur": "training images and the generations that copy them are blurred (Gaussian, sigma "
            "= 8% of the image side)",
    "omit": "no training image and no generation flagged as a copy is in this file",
}
#: Side, in pixels, of the patient images embedded in the report.
THUMB_SIZE = 160
#: Gaussian sigma of ``blur`` mode, as a fraction of the image side.
BLUR_SIGMA = 0.08


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


def _blur(image: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, sigma=BLUR_SIGMA * max(image.shape), mode="nearest")


def patient_image(path: str | os.PathLike, mode: str, *, resolution: int | None = None
                  ) -> str | None:
    """A patient image (a training image, or a generation that copies one) as the report shows
    it in ``mode``: a PNG data URI of the image at :data:`THUMB_SIZE` pixels (blurred in
    ``blur`` mode), or None in ``omit`` mode, where the file is not even read.

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
        image = _blur(image)
    return data_uri(array_png(image))

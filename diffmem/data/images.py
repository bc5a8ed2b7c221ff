"""Read one chest X-ray image file as a float32 grayscale array in [0, 1].

JPEG and PNG go through Pillow, DICOM through :mod:`diffmem.data.dicom`. Truncated or corrupt
files are errors, never silently padded: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay
``False`` and every image is fully decoded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffmem.data._reading import DICOM_SUFFIXES, RASTER_SUFFIXES
from diffmem.data.dicom import is_dicom_file, read_dicom
from diffmem.errors import ConfigError, DataError

__all__ = ["DICOM_SUFFIXES", "RASTER_SUFFIXES", "center_crop_square", "is_dicom_file",
           "read_image", "resize_square"]

# Largest code value of Pillow's integer modes: 16-bit data is scaled by the format's full
# range, not by the image's own maximum, so brightness means the same across images.
_MODE_MAX = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
             "I": 65535.0}


def read_image(path: str | os.PathLike, *, size: int | None = None) -> np.ndarray:
    """Read a chest X-ray (JPEG, PNG or DICOM) as float32 grayscale in [0, 1].

    Parameters
    ----------
    path : path
        The image file. DICOM is recognised by a ``.dcm``/``.dicom`` suffix or the ``DICM``
        preamble and read with :func:`diffmem.data.dicom.read_dicom`.
    size : int, optional
        Side of a square output. The image is centre-cropped to a square, then resized with
        an area filter (Pillow's ``BOX``, the mean of the covered source pixels) when shrinking
        or ``BILINEAR`` when enlarging. For JPEG the decoder first shrinks by a power of two
        (DCT scaling, Pillow's ``draft``: means of 2x2 to 8x8 blocks) as long as the square
        stays at least ``2 * size`` wide; this is 3-5 times faster on full-size radiographs and
        differs from a full decode followed by the same area filter by about 1/255 on
        radiograph-like images (more on images with detail finer than the output pixels).
        ``None`` keeps the stored size.

    Returns
    -------
    numpy.ndarray
        float32 array of shape (H, W) (or (size, size)) with values in [0, 1]. Colour images
        are converted to luminance (alpha ignored); 8-bit data is divided by 255 and 16-bit
        data by 65535.

    Raises
    ------
    DataError
        When the file is missing, truncated, corrupt or in an unsupported mode; the message
        names the file and what to do.
    ConfigError
        When ``size`` is not a positive integer, or when another library switched on
        ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``.

    Examples
    --------
    >>> import tempfile, os
    >>> from PIL import Image
    >>> tmp = os.path.join(tempfile.mkdtemp(), "x.png")
    >>> Image.fromarray(np.full((40, 60), 255, np.uint8)).save(tmp)
    >>> read_image(tmp, size=16).shape
    (16, 16)
    """
    if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool)
                             or size < 1):
        raise ConfigError(f"size must be a positive integer or None, got {size!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError("image file not found (moved or deleted since the dataset was "
                        "loaded?); restore it or use --on-error skip", path=path)
    if is_dicom_file(path):
        arr, _ = read_dicom(path)
        return arr if size is None else resize_square(arr, size)
    return _read_raster(path, size)


def _read_raster(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image, ImageFile, UnidentifiedImageError

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ConfigError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (another library switched it on); "
            "diffmem refuses to read images whose missing part Pillow would fill with grey. "
            "Set it back to False before using diffmem")
    fix = ("re-export or re-download the file, or use --on-error skip to leave it out")
    try:
        with Image.open(path) as im:
            full = im.size  # (width, height) before any reduced decode
            scale = 1.0
            if size is not None and im.format == "JPEG":
                w, h = full
                side = min(w, h)
                # the decoder keeps at least twice the size, so the cropped square stays
                # >= 2 * size and the final area filter still averages several pixels
                reduced = im.draft(im.mode if im.mode in ("L", "RGB") else None,
                                   (-(-2 * size * w // side), -(-2 * size * h // side)))
                if reduced is not None:
                    scale = w / reduced[1][2]  # the full image spans [0, w / scale)
            im.load()
            arr = _to_gray01(im, path)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DataError(f"not a readable image ({e}); {fix}", path=path) from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot decode image ({e}); the file is truncated or corrupt: {fix}",
                        path=path) from None
    if size is None:
        return arr
    return _resize_box(arr, size, _square_box(full[1], full[0], scale))


def _to_gray01(im, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in _MODE_MAX:
        arr = np.asarray(im).astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > _MODE_MAX[mode]):
            raise DataError(f"{mode} image has values outside 0..65535; diffmem reads 8- and "
                            "16-bit grayscale: convert the file to 16-bit PNG", path=path)
        return arr / np.float32(_MODE_MAX[mode])
    if mode == "F":
        raise DataError("floating-point images are not supported; save the image as 8- or "
                        "16-bit grayscale PNG", path=path)
    if mode != "L":
        im = im.convert("RGB").convert("L") if mode in ("P", "PA") else im.convert("L")
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)


def _square_box(height: int, width: int, scale: float = 1.0) -> tuple[float, ...]:
    """(left, top, right, bottom) of the centred square of a ``height`` x ``width`` image, in
    the coordinates of a copy reduced by ``scale``."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return tuple(v / scale for v in (left, top, left + side, top + side))


def center_crop_square(arr: np.ndarray) -> np.ndarray:
    """The largest centred square of a 2-D array (a view, not a copy)."""
    h, w = arr.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return arr[top:top + side, left:left + side]


def _resize_box(arr: np.ndarray, size: int, box: tuple[float, ...]) -> np.ndarray:
    from PIL import Image

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    src = box[2] - box[0]
    if box == (0.0, 0.0, float(arr.shape[1]), float(arr.shape[0])) and src == size:
        return arr.copy()
    resample = Image.Resampling.BOX if src > size else Image.Resampling.BILINEAR
    out = Image.fromarray(arr).resize((size, size), resample, box=box)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop a 2-D float array to a square and resize it to ``size`` x ``size``.

    Shrinking uses an area filter (Pillow ``BOX``), enlarging ``BILINEAR``; computation is in
    float32, so 16-bit data is not quantised to 8 bits. The input is not modified.
    """
    h, w = np.shape(arr)
    return _resize_box(np.asarray(arr), size, _square_box(h, w))

"""DICOM chest X-rays: read pixels the way a viewer shows them, scan headers for identifying
information, write small valid files (tests, synthetic data); tell DICOM files by name or
preamble (:func:`is_dicom_file`). The MIMIC-CXR DICOM tree loads with
:func:`diffmem.data.mimic.load_dicom_tree`.

Reading follows the DICOM grayscale pipeline (PS3.4 N.2.1): stored values -> Modality LUT or
rescale -> VOI LUT or window -> MONOCHROME1 inversion, then scales to [0, 1].
"""

from __future__ import annotations

import collections.abc
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.data._reading import DICOM_SUFFIXES, RASTER_SUFFIXES
from diffmem.errors import ConfigError, DataError, MissingDependencyError

log = logging.getLogger(__name__)

#: Keywords of header elements that can identify a patient, a clinician or a site (checked by
#: :func:`scan_dicom_phi` when non-empty). Private tags and ``BurnedInAnnotation == "YES"``
#: are reported as well.
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "OtherPatientIDs",
    "OtherPatientIDsSequence", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "AccessionNumber",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "StudyID",
)

_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
_PRIVATE_GROUP = 0x0011
_PRIVATE_CREATOR = "DIFFMEM SYNTH"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a ``.dcm``/``.dicom`` name, or for a file with another suffix (not
    ``.jpg``/``.jpeg``/``.png``) whose bytes 128-131 read ``DICM``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in RASTER_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (3.0 API)
    except ImportError as e:  # pragma: no cover - pydicom is a hard dependency
        raise MissingDependencyError("reading DICOM needs pydicom>=3.0: pip install "
                                     "'pydicom>=3.0'") from e
    return pydicom


def _dcmread(path: Path, **kwargs):
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError as e:
        raise DataError(f"not a DICOM file ({e}); re-export it as DICOM Part 10 or use "
                        "--on-error skip", path=path) from None
    except FileNotFoundError:
        raise DataError("image file not found; restore it or use --on-error skip",
                        path=path) from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise DataError(f"corrupt DICOM file ({type(e).__name__}: {e}); re-export it or use "
                        "--on-error skip", path=path) from None


def _stored_range(ds) -> tuple[float, float]:
    """Smallest and largest value the stored bit depth allows, after the modality transform.

    This mirrors the output range pydicom's windowing uses, so that scaling is consistent.
    """
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**depth - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _first(value) -> float:
    """The first value of a possibly multi-valued DS element."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a DICOM image as float32 grayscale in [0, 1], as a viewer would display it.

    Parameters
    ----------
    path : path
        A DICOM Part 10 file.

    Returns
    -------
    pixels : numpy.ndarray
        float32 (rows, columns) in [0, 1]; bright = dense (bone), whatever the photometric
        interpretation. Multi-frame files give their first frame.
    header : dict
        A non-identifying summary: modality, photometric interpretation, size, bit depth,
        rescale, the VOI transform applied and the value range mapped onto [0, 1].

    Notes
    -----
    The pipeline is: stored values -> Modality LUT or rescale slope/intercept
    (``pydicom.pixels.apply_modality_lut``) -> VOI transform (as ``apply_voi_lut`` with its
    default ``prefer_lut=True``: the first VOI LUT of the VOI LUT Sequence, else the first
    Window Center/Width) -> scaling to [0, 1] -> inversion for MONOCHROME1. The scaling divides
    by the VOI output range: for a window, the range pydicom windows onto (the stored bit depth
    after rescale); for a VOI LUT, the smallest and largest LUT entry. Without a VOI transform,
    the full range of the stored bit depth after the modality transform maps onto [0, 1]
    (not the image's own min and max, so brightness is comparable across images; an image
    using few of its stored bits will look low-contrast). Presentation LUT Shape is not
    applied (for DX it restates MONOCHROME1's inversion). Colour images become luminance
    (0.299 R + 0.587 G + 0.114 B) scaled by their bit depth, without LUTs.

    Raises
    ------
    DataError
        For a file that is not DICOM, is corrupt or truncated, or has no pixel data (a
        structured report, a presentation state...).
    MissingDependencyError
        For compressed pixel data whose decoder plugin is not installed.
    """
    _pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    path = Path(path)
    ds = _dcmread(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = getattr(sop, "name", None) or "no SOP class"
        raise DataError(f"DICOM file has no pixel data ({kind}); it is not an image: remove "
                        "it from the image folder or use --on-error skip", path=path)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        stored = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoders raise many types on bad data
        if tsyntax is not None and tsyntax.is_compressed:
            from pydicom.pixels import get_decoder

            try:
                available = get_decoder(tsyntax).is_available
            except Exception:  # noqa: BLE001
                available = True
            if not available:
                raise MissingDependencyError(
                    f"{path}: pixel data is compressed as {tsyntax.name!r} and no decoder for "
                    "it is installed; install pylibjpeg with pylibjpeg-libjpeg and "
                    "pylibjpeg-openjpeg (or python-gdcm)") from None
        raise DataError(f"cannot decode DICOM pixel data ({type(e).__name__}: {e}); the "
                        "file is truncated or corrupt: re-export it or use --on-error skip",
                        path=path) from None

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        stored = stored[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    bits = int(ds.get("BitsStored", 8 * stored.dtype.itemsize))
    header: dict[str, Any] = {
        "modality": str(ds.get("Modality", "")) or None,
        "sop_class": getattr(ds.get("SOPClassUID"), "name", None),
        "transfer_syntax": getattr(tsyntax, "name", None),
        "photometric": photometric,
        "rows": int(ds.get("Rows", stored.shape[0])),
        "columns": int(ds.get("Columns", stored.shape[1])),
        "frames": frames,
        "bits_stored": bits,
        "pixel_representation": int(ds.get("PixelRepresentation", 0)),
        "view_position": str(ds.get("ViewPosition", "")) or None,
        "rescale": None,
        "voi": "none",
        "window": None,
    }

    if samples == 3:
        rgb = stored.astype(np.float64)
        arr = (rgb @ np.array([0.299, 0.587, 0.114])) / float(2**bits - 1)
        header.update(output_range=[0.0, float(2**bits - 1)])
        return np.clip(arr, 0.0, 1.0).astype(np.float32), header
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"unsupported DICOM image: {samples} samples per pixel, photometric "
                        f"interpretation {photometric!r}; diffmem reads MONOCHROME1/2 and RGB",
                        path=path)

    try:
        values = apply_modality_lut(stored, ds)
        if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
            header["rescale"] = [float(ds.RescaleSlope), float(ds.RescaleIntercept)]
        voi_seq = ds.get("VOILUTSequence")
        has_lut = bool(voi_seq) and None not in (voi_seq[0].get("LUTDescriptor"),
                                                 voi_seq[0].get("LUTData"))
        has_window = None not in (ds.get("WindowCenter"), ds.get("WindowWidth"))
        if has_lut:
            # LUT indices are integers; a rescaled (float) array is rounded first
            if not np.issubdtype(values.dtype, np.integer):
                values = np.rint(values).astype(np.int64)
            out = apply_voi(values, ds, 0)
            desc = voi_seq[0].LUTDescriptor
            n, first = int(desc[0]) or 2**16, int(desc[1])
            lut = apply_voi(np.arange(first, first + n, dtype=np.int64), ds, 0)
            lo, hi = float(lut.min()), float(lut.max())
            header["voi"] = "lut"
        elif has_window:
            out = apply_windowing(values, ds, 0)
            lo, hi = _stored_range(ds)
            header["voi"] = "window"
            header["window"] = [_first(ds.WindowCenter), _first(ds.WindowWidth)]
        else:
            out = values
            lo, hi = _stored_range(ds)
    except (ValueError, NotImplementedError, AttributeError, IndexError, KeyError,
            TypeError) as e:
        raise DataError(f"invalid DICOM grayscale transform ({type(e).__name__}: {e}); fix "
                        "the rescale/window/LUT elements or use --on-error skip",
                        path=path) from None
    if hi == lo:
        raise DataError(f"DICOM output range is a single value ({lo}); the VOI LUT or bit "
                        "depth is invalid", path=path)
    header["output_range"] = [lo, hi]
    arr = (np.asarray(out, dtype=np.float64) - lo) / (hi - lo)
    arr = np.clip(arr, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        arr = 1.0 - arr
    return arr.astype(np.float32), header


# -- PHI scan --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PHIFinding:
    """One header element that may identify a person or a site.

    Attributes
    ----------
    file : str
        The DICOM file.
    tag : str
        ``"(gggg,eeee)"``.
    keyword : str
        The element's keyword (``"PatientName"``), ``"private"`` for private tags.
    value : str
        A preview of the value, at most 40 characters.
    """

    file: str
    tag: str
    keyword: str
    value: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _preview(value: Any, limit: int = 40) -> str:
    text = value.hex() if isinstance(value, bytes) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bytes):
        return not value.strip(b"\x00 ")
    if isinstance(value, collections.abc.Sequence) and not isinstance(value, str):
        return len(value) == 0
    return not str(value).strip()


def _scan_one(path: Path) -> list[PHIFinding]:
    ds = _dcmread(path, stop_before_pixels=True)
    found = []

    def add(elem, keyword):
        found.append(PHIFinding(str(path), f"({elem.tag.group:04X},{elem.tag.element:04X})",
                                keyword, _preview(elem.value)))

    for keyword in PHI_KEYWORDS:
        if keyword in ds and not _is_empty(ds[keyword].value):
            add(ds[keyword], keyword)
    if "BurnedInAnnotation" in ds and str(ds.BurnedInAnnotation).strip().upper() == "YES":
        add(ds["BurnedInAnnotation"], "BurnedInAnnotation")
    for elem in ds.iterall():
        if elem.tag.is_private and not elem.tag.is_private_creator and not _is_empty(elem.value):
            add(elem, "private")
    return sorted(found, key=lambda f: f.tag)


def scan_dicom_phi(path: str | os.PathLike) -> list[PHIFinding]:
    """List header elements of DICOM files that can identify a patient, clinician or site.

    Parameters
    ----------
    path : path
        A DICOM file, or a folder searched recursively for ``*.dcm``/``*.dicom`` files and
        files with the ``DICM`` preamble.

    Returns
    -------
    list of PHIFinding
        Every non-empty element of :data:`PHI_KEYWORDS`, ``BurnedInAnnotation`` equal to
        ``"YES"`` (identifying text in the pixels) and every non-empty private element
        (including those inside sequences), by file, then by tag. An empty list means none were
        found; it does not prove a file is de-identified (text burned into pixels without the
        flag is not detected).

    Raises
    ------
    DataError
        When ``path`` does not exist or a DICOM file cannot be parsed.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_dicom_file(p))
    else:
        raise DataError("no such file or folder to scan for DICOM identifiers", path=path)
    findings: list[PHIFinding] = []
    for f in files:
        findings.extend(_scan_one(f))
    return findings


# -- writer ----------------------------------------------------------------------------------
def _ds_number(value: float) -> Any:
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def write_dicom(path: str | os.PathLike, pixels01: np.ndarray, *,
                photometric: str = "MONOCHROME2",
                window: tuple[float, float] | None = None, bits: int = 12,
                phi: Mapping[str, Any] | None = None,
                rescale: tuple[float, float] | None = None,
                attributes: Mapping[str, Any] | None = None,
                private: Mapping[int, str] | None = None) -> Path:
    """Write a grayscale image as a valid Computed Radiography DICOM file.

    The stored values are chosen so that :func:`read_dicom` gives ``pixels01`` back (up to
    quantisation): stored -> rescale -> window -> MONOCHROME1 inversion undoes what this
    function does.

    Parameters
    ----------
    path : path
        The ``.dcm`` file to write (parent folders are created).
    pixels01 : numpy.ndarray
        2-D array with values in [0, 1] (bright = dense); not modified.
    photometric : {"MONOCHROME2", "MONOCHROME1"}
        MONOCHROME1 stores inverted values (0 = white), as many CR/DX devices do.
    window : (center, width), optional
        A VOI window (LINEAR, width > 1) in rescaled units; the image is stored so that this
        window shows it in full. It must fit inside the stored range after rescale. ``None``
        stores the image over the full bit depth.
    bits : int
        Bits stored, 8 to 16 (unsigned; 8 bits allocated up to 8, else 16). Quantisation step:
        ``1 / (2**bits - 1)`` without a window, ``slope / (width - 1)`` with one.
    phi : mapping, optional
        Header keywords to identifying values to plant (``{"PatientName": "Doe^Jane",
        "InstitutionName": "General"}``), e.g. to test :func:`scan_dicom_phi`. By default
        every identifying element is present but empty.
    rescale : (slope, intercept), optional
        Rescale Slope and Intercept (slope != 0); ``None`` writes none.
    attributes : mapping, optional
        Other header keywords to set (``{"ViewPosition": "PA", "StudyInstanceUID": ...}``).
    private : mapping of int to str, optional
        Private elements to add in group 0011 under creator ``"DIFFMEM SYNTH"``: element
        offset (0x00-0xFF) to a text value (LO).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConfigError
        For an unknown photometric interpretation, keyword, bit depth or a window/rescale that
        the stored range cannot represent.
    DataError
        When ``pixels01`` is not a finite 2-D array in [0, 1].

    Examples
    --------
    >>> import tempfile, os
    >>> x = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    >>> p = write_dicom(os.path.join(tempfile.mkdtemp(), "x.dcm"), x,
    ...                 photometric="MONOCHROME1", window=(2000, 3000), bits=12)
    >>> bool(np.abs(read_dicom(p)[0] - x).max() < 1e-3)
    True
    """
    _pydicom()
    x = _check_write_inputs(pixels01, photometric=photometric, bits=bits, phi=phi,
                            attributes=attributes, private=private)  # 1.
    # 2. header values as DICOM will store them (DS strings), then the stored pixels
    stored, numbers = _stored_pixels(x, photometric=photometric, bits=bits, window=window,
                                     rescale=rescale)
    # 3. the dataset
    ds = _cr_dataset(stored, numbers, photometric=photometric, bits=bits, phi=phi,
                     attributes=attributes, private=private)
    # 4. write
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _check_write_inputs(pixels01: np.ndarray, *, photometric: str, bits: Any,
                        phi: Mapping[str, Any] | None, attributes: Mapping[str, Any] | None,
                        private: Mapping[int, str] | None) -> np.ndarray:
    """Step 1 of :func:`write_dicom`: the pixels as float64, or the error naming the problem."""
    from pydicom.datadict import tag_for_keyword

    x = np.asarray(pixels01, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise DataError(f"pixels01 must be a non-empty 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise DataError(f"pixels01 must be finite with values in [0, 1], got range "
                        f"[{np.nanmin(x):.4g}, {np.nanmax(x):.4g}]")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ConfigError(f"photometric must be 'MONOCHROME1' or 'MONOCHROME2', got "
                          f"{photometric!r}")
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 8 <= bits <= 16:
        raise ConfigError(f"bits must be an integer from 8 to 16, got {bits!r}")
    for name, mapping in (("phi", phi), ("attributes", attributes)):
        for keyword in (mapping or {}):
            if tag_for_keyword(keyword) is None:
                raise ConfigError(f"{name}: {keyword!r} is not a DICOM keyword (e.g. "
                                  "'PatientName', 'ViewPosition')")
    for offset in (private or {}):
        if not 0 <= int(offset) <= 0xFF:
            raise ConfigError(f"private element offsets run 0x00-0xFF, got {offset!r}")
    return x


def _stored_pixels(x: np.ndarray, *, photometric: str, bits: int,
                   window: tuple[float, float] | None, rescale: tuple[float, float] | None,
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """Step 2 of :func:`write_dicom`: the stored pixel values, and the DS header values
    (``slope``, ``intercept``, ``center``, ``width``; ``None`` where not written)."""
    smax = 2**bits - 1
    slope_ds = intercept_ds = center_ds = width_ds = None
    if rescale is not None:
        slope_ds, intercept_ds = _ds_number(rescale[0]), _ds_number(rescale[1])
        if float(slope_ds) == 0.0:
            raise ConfigError(f"rescale slope must be non-zero, got {rescale!r}")
    slope = float(slope_ds) if slope_ds is not None else 1.0
    intercept = float(intercept_ds) if intercept_ds is not None else 0.0
    shown = 1.0 - x if photometric == "MONOCHROME1" else x
    if window is None:
        stored = np.rint(shown * smax)
    else:
        center_ds, width_ds = _ds_number(window[0]), _ds_number(window[1])
        c, w = float(center_ds), float(width_ds)
        if w <= 1.0:
            raise ConfigError(f"window width must be > 1 for a LINEAR window, got {window!r}")
        ends = (np.array([0.0, 1.0]) - 0.5) * (w - 1.0) + (c - 0.5)
        ends_stored = (ends - intercept) / slope
        if ends_stored.min() < -0.5 or ends_stored.max() > smax + 0.5:
            lo, hi = sorted((intercept, smax * slope + intercept))
            raise ConfigError(
                f"window {window!r} spans [{ends[0]:.6g}, {ends[1]:.6g}] but {bits}-bit stored "
                f"values with rescale {rescale!r} cover only [{lo:.6g}, {hi:.6g}]; narrow the "
                "window, move its center, or raise bits")
        stored = np.rint(((shown - 0.5) * (w - 1.0) + (c - 0.5) - intercept) / slope)
    stored = np.clip(stored, 0, smax).astype(np.uint8 if bits <= 8 else np.uint16)
    return stored, {"slope": slope_ds, "intercept": intercept_ds, "center": center_ds,
                    "width": width_ds}


def _cr_dataset(stored: np.ndarray, numbers: Mapping[str, Any], *, photometric: str, bits: int,
                phi: Mapping[str, Any] | None, attributes: Mapping[str, Any] | None,
                private: Mapping[int, str] | None) -> Any:
    """Step 3 of :func:`write_dicom`: the Computed Radiography dataset with its file meta."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = _CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = ""
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, keyword, "")  # type 2: present, empty unless planted below
    for keyword, value in {**(attributes or {}), **(phi or {})}.items():
        setattr(ds, keyword, value)
    ds.set_pixel_data(stored, photometric, bits, generate_instance_uid=False)
    if numbers["slope"] is not None:
        ds.RescaleSlope = numbers["slope"]
        ds.RescaleIntercept = numbers["intercept"]
        ds.RescaleType = "US"
    if numbers["center"] is not None:
        ds.WindowCenter = numbers["center"]
        ds.WindowWidth = numbers["width"]
        ds.VOILUTFunction = "LINEAR"
    if private:
        block = ds.private_block(_PRIVATE_GROUP, _PRIVATE_CREATOR, create=True)
        for offset, value in sorted(private.items()):
            block.add_new(int(offset), "LO", str(value))
    return ds


# -- header ----------------------------------------------------------------------------------
def dicom_view_position(path: str | os.PathLike) -> str | None:
    """The ViewPosition of a DICOM file's header (pixels are not read), or ``None``."""
    ds = _dcmread(Path(path), stop_before_pixels=True, specific_tags=["ViewPosition"])
    view = str(ds.get("ViewPosition", "") or "").strip()
    return view or None

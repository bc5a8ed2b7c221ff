"""The data model: one :class:`Study` record per image, and :class:`CXRDataset`, a sequence of
records whose images load lazily as float32 grayscale arrays in [0, 1]."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validate", "test")


@dataclass(frozen=True)
class Study:
    """One image with its report, as diffmem sees it.

    Attributes
    ----------
    study_id : str
        The study (MIMIC: ``s5xxxxxxx``). Several images may share one study.
    patient_id : str
        The patient (MIMIC: ``p1xxxxxxx``); splits never mix a patient's studies.
    image : str
        Absolute path of the image file (JPEG, PNG or DICOM).
    report : str
        The full report text, as read (de-identification markers kept verbatim).
    prompt : str
        The text the model is conditioned on (by default the IMPRESSION section).
    split : str
        ``"train"``, ``"validate"`` or ``"test"``; held-out splits calibrate detectors.
    view : str or None
        View position (``"PA"``, ``"AP"``, ``"LATERAL"``...) when known.
    image_id : str or None
        The image's own id (MIMIC: ``dicom_id``); defaults to the file stem.
    metadata : mapping
        Anything else the loader knew (row of the metadata CSV, DICOM header summary...).
    """

    study_id: str
    patient_id: str
    image: str
    report: str
    prompt: str
    split: str = "train"
    view: str | None = None
    image_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        d = asdict(self)
        d["metadata"] = dict(self.metadata)
        return d


class CXRDataset(Sequence[Study]):
    """A read-only sequence of :class:`Study` records with lazy image loading.

    Parameters
    ----------
    studies : sequence of Study
        The records, in a stable order.
    root : path
        The dataset folder (never written to).
    format : str
        ``"mimic-cxr-jpg"``, ``"dicom"`` or ``"manifest"``.
    skipped : list of (path, reason), optional
        Records a loader skipped under ``on_error="skip"``.
    info : mapping, optional
        Loader facts worth reporting (prompt section used, view filter...).
    """

    def __init__(self, studies: Sequence[Study], *, root: str | Path, format: str,
                 skipped: Sequence[tuple[str, str]] = (), info: Mapping[str, Any] | None = None):
        self._studies = list(studies)
        self.root = Path(root)
        self.format = format
        self.skipped = list(skipped)
        self.info = dict(info or {})

    # -- sequence ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._studies)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return self._derive(self._studies[index])
        return self._studies[index]

    def __iter__(self) -> Iterator[Study]:
        return iter(self._studies)

    def __repr__(self) -> str:
        return (f"CXRDataset(format={self.format!r}, root={str(self.root)!r}, "
                f"studies={len(self)}, splits={dict(self.split_counts())})")

    def _derive(self, studies: Sequence[Study]) -> CXRDataset:
        return CXRDataset(studies, root=self.root, format=self.format, skipped=self.skipped,
                          info=self.info)

    # -- views of the data ------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        return [s.prompt for s in self._studies]

    def split_counts(self) -> Counter:
        return Counter(s.split for s in self._studies)

    def subset(self, *, split: str | Sequence[str] | None = None,
               indices: Sequence[int] | None = None) -> CXRDataset:
        """Records of the given split(s) and/or at the given indices, as a new dataset."""
        studies = self._studies if indices is None else [self._studies[i] for i in indices]
        if split is not None:
            wanted = {split} if isinstance(split, str) else set(split)
            unknown = wanted - set(SPLITS)
            if unknown:
                raise ConfigError(f"unknown split(s) {sorted(unknown)}; known: {list(SPLITS)}")
            studies = [s for s in studies if s.split in wanted]
        return self._derive(studies)

    def by_study_id(self) -> dict[str, list[int]]:
        """Map study_id to the indices of its records."""
        out: dict[str, list[int]] = {}
        for i, s in enumerate(self._studies):
            out.setdefault(s.study_id, []).append(i)
        return out

    # -- images -----------------------------------------------------------------------------
    def load_image(self, index: int | Study, *, size: int | None = None) -> np.ndarray:
        """The image of record ``index`` as float32 grayscale in [0, 1].

        Parameters
        ----------
        index : int or Study
        size : int, optional
            Side of the square output (centre crop to square, then area resize).
            ``None`` keeps the stored size.
        """
        from diffmem.data.images import read_image

        study = index if isinstance(index, Study) else self._studies[index]
        return read_image(study.image, size=size)

    def iter_images(self, *, size: int, batch_size: int = 64,
                    indices: Sequence[int] | None = None) -> Iterator[tuple[list[int], np.ndarray]]:
        """Yield ``(indices, images)`` chunks with images of shape (B, size, size).

        Memory stays bounded by ``batch_size`` images, so this streams any dataset size.
        """
        idx = list(range(len(self))) if indices is None else list(indices)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            yield chunk, np.stack([self.load_image(i, size=size) for i in chunk])

    # -- identity ---------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of what defines the data: ids, prompts, splits and image file sizes.

        Cheap on large sets (no pixel reads); changes when records or files change.
        """
        h = hashlib.sha256()
        for s in self._studies:
            try:
                nbytes = Path(s.image).stat().st_size
            except OSError:
                nbytes = -1
            h.update(f"{s.study_id}\x1f{s.image_id}\x1f{s.split}\x1f{s.prompt}\x1f{nbytes}\x1e"
                     .encode("utf-8"))
        return h.hexdigest()[:16]

    def require_nonempty(self, what: str = "dataset") -> CXRDataset:
        if not self._studies:
            raise DataError(f"the {what} has no studies", path=self.root)
        return self

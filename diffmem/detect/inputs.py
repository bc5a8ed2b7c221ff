"""Inputs of a detection run, checked before anything expensive runs: the training prompts and
their planted labels, the prompts to scan (:class:`WorkItem`), the held-out images the copy
threshold is calibrated on, the patients of re-ID verdicts, model/data mismatch warnings, and a
writable output folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffmem.data.prompts import read_prompts
from diffmem.detect.labels import Labels, resolve_labels
from diffmem.detect.verdicts import NO_HELDOUT
from diffmem.errors import DataError, OutputError
from diffmem.store import prompt_hash

if TYPE_CHECKING:
    from diffmem.detect.detector import DetectionConfig

log = logging.getLogger(__name__)

__all__ = ["DetectInputs", "WorkItem", "check_inputs", "check_writable", "heldout_images",
           "image_files", "mismatch_warnings", "prompt_labels", "reference_fingerprint",
           "reid_inputs", "training_prompts", "work_items"]

NO_REFERENCE = ("nearest-neighbour verdicts (--methods nn) compare generations with the training "
                "images: pass --reference DATA|IMAGE_DIR (the training data or a folder of its "
                "images), or --data DATA; or leave nn out (--methods noise,attention)")


# ---------------------------------------------------------------------------- prompts
def training_prompts(dataset: Any) -> dict[str, list[str]]:
    """Unique non-empty prompts of the training split, in first-seen order, each with the
    study ids of its training records."""
    out: dict[str, list[str]] = {}
    for s in dataset:
        if s.split == "train" and s.prompt.strip():
            ids = out.setdefault(s.prompt, [])
            if s.study_id not in ids:
                ids.append(s.study_id)
    return out


def prompt_labels(dataset: Any, ground_truth: str | os.PathLike | Mapping | None = None,
                  ) -> dict[str, int] | None:
    """Label of each training prompt: 1 when any of its training images (or studies) is
    labelled memorized (a planted duplicate in ``diffmem synth``'s ground truth).

    Parameters
    ----------
    dataset : CXRDataset or None
    ground_truth : path or mapping, optional
        A labels file (:mod:`diffmem.detect.labels`: ``diffmem synth``'s ``ground_truth.csv``
        or a user's CSV keyed by ``study_id``, ``dicom_id`` or ``prompt`` with a 0/1
        ``memorized``/``label``/``planted`` column), or synth's rows keyed by image id
        (:func:`diffmem.data.synth.read_ground_truth`). Default: the dataset folder's
        ``ground_truth.csv`` when there is one and it fits.

    Returns
    -------
    dict or None
        ``prompt -> 0/1``; None when there is no (fitting) ground truth.
    """
    labels = resolve_labels(dataset, ground_truth)
    return None if labels is None else labels.by_prompt


# ---------------------------------------------------------------------------- work items
@dataclass
class WorkItem:
    prompt: str
    kind: str
    study_ids: list[str]
    label: int | None




def check_writable(out: Path) -> None:
    probe = out / f".diffmem-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output folder {str(out)!r} is not writable ({e.strerror}); choose "
                          "another --out") from None


def work_items(dataset: Any | None, train_map: dict[str, list[str]], labels: dict[str, int] | None,
                prompts: str | os.PathLike | Sequence[str] | None,
                config: DetectionConfig) -> list[WorkItem]:
    if prompts is None:
        if dataset is None:
            raise DataError("nothing to scan: pass --prompts FILE (one prompt per line, or a "
                            ".csv/.jsonl table with a 'prompt' column), or --data DATA to scan "
                            "its training prompts")
        if not train_map:
            raise DataError("the training split has no non-empty prompt to scan; pass "
                            "--prompts FILE", path=dataset.root)
        items = [WorkItem(p, "train", ids, None if labels is None else labels.get(p, 0))
                 for p, ids in train_map.items()]
    else:
        if isinstance(prompts, (str, os.PathLike)):
            listed = read_prompts(prompts)
        else:
            listed = [str(p).strip() for p in prompts]
            listed = [p for p in dict.fromkeys(listed) if p]
            if not listed:
                raise DataError("no prompt to scan (the list is empty or holds only empty "
                                "strings)")
        items = [WorkItem(p, "prompt", list(train_map.get(p, [])),
                       None if labels is None else labels.get(p, 0)) for p in listed]
        outside = sum(1 for p in listed if p not in train_map)
        if outside:
            log.info("%d of %d prompt(s) are not training prompts of the data", outside,
                     len(listed))
    scanned = {it.prompt for it in items}
    if config.unrelated and dataset is not None:
        held = sorted({s.prompt for s in dataset if s.split != "train" and s.prompt.strip()
                       and s.prompt not in train_map and s.prompt not in scanned},
                      key=prompt_hash)
        items += [WorkItem(p, "unrelated", [], None) for p in held[:config.unrelated]]
        if len(held) < config.unrelated:
            log.info("only %d unrelated (held-out, not trained on) prompt(s) available",
                     len(held))
    if config.unconditional and "nn" in config.methods:
        items.append(WorkItem("", "unconditional", [], None))
    return items


def heldout_images(dataset: Any | None, calibration: Any, config: DetectionConfig) -> Any:
    """Held-out real images for the threshold: a dataset, a list of image files, or None."""
    if config.threshold is not None:
        return None
    from diffmem.data import CXRDataset

    if calibration is None:
        if dataset is None:
            raise DataError(f"--methods nn without --data: {NO_HELDOUT}")
        held = dataset.subset(split=["validate", "test"])
        if len(held) == 0:
            raise DataError(f"the data has no validate/test images; {NO_HELDOUT}",
                            path=dataset.root)
        return held
    if isinstance(calibration, CXRDataset):
        return calibration
    return _load_calibration(Path(calibration))


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def _load_calibration(path: Path) -> Any:
    from diffmem.data import load

    if not path.exists():
        raise DataError(f"calibration folder does not exist; {NO_HELDOUT}", path=path)
    try:
        return load(path)
    except DataError:
        pass
    files = image_files(path)
    if not files:
        raise DataError("holds neither a dataset nor image files (PNG/JPEG/DICOM) to calibrate "
                        f"on; {NO_HELDOUT}", path=path)
    return files


def image_files(path: Path) -> list[Path]:
    """PNG/JPEG/DICOM files under a folder, sorted (empty for a file or a missing folder)."""
    return sorted(p for p in (path.rglob("*") if path.is_dir() else [])
                  if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())


def reference_images(reference: Any) -> Any:
    """The training images nearest-neighbour verdicts compare with: the ``train`` split of a
    dataset (a CXRDataset or a folder ``diffmem.data.load`` reads), or the image files of a
    folder.

    Raises
    ------
    DataError
        A path that does not exist, a dataset without a training split, or a folder with
        neither a dataset nor images.
    """
    from diffmem.data import CXRDataset, load

    if isinstance(reference, CXRDataset):
        return _train_split(reference)
    path = Path(reference)
    if not path.exists():
        raise DataError(f"reference does not exist; {NO_REFERENCE}", path=path)
    try:
        return _train_split(load(path))
    except DataError as e:
        if "training split" in str(e):
            raise
    files = image_files(path)
    if not files:
        raise DataError("--reference holds neither a dataset nor image files (PNG/JPEG/DICOM); "
                        "pass the training data or a folder of the images the model was "
                        "trained on", path=path)
    log.info("reference: %d image file(s) under %s", len(files), path)
    return files


def _train_split(dataset: Any) -> Any:
    train_set = dataset.subset(split="train")
    if len(train_set) == 0:
        raise DataError(f"the data has no training split (splits: "
                        f"{dict(dataset.split_counts()) or 'none'}); detection compares "
                        "generations with the images the model was trained on: give the "
                        "dataset with its train split", path=dataset.root)
    return train_set


def reference_fingerprint(reference: Any) -> str:
    """Identity of the reference images (a dataset's fingerprint, or a hash of the files'
    names, sizes and modification times)."""
    if hasattr(reference, "fingerprint"):
        return reference.fingerprint()
    import hashlib

    h = hashlib.sha256()
    for p in reference:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return "files-" + h.hexdigest()[:16]


@dataclass
class DetectInputs:
    """The checked inputs of a run.

    Attributes
    ----------
    dataset : CXRDataset or None
        ``--data`` (training data whose held-out splits calibrate).
    reference : CXRDataset, list of Path or None
        The training images of the nearest-neighbour verdicts (None without ``nn``).
    train_map : dict
        Training prompt -> study ids (empty without data).
    labels : dict or None
        Prompt -> 0/1 labels (:mod:`diffmem.detect.labels`).
    items : list of WorkItem
    heldout : Any
        Held-out images for the threshold (None without ``nn`` or with a fixed threshold).
    roots : list of Path
        Input folders the output must stay out of.
    reid : tuple or None
        The (training, held-out) records of re-ID verdicts with patient ids
        (:func:`reid_inputs`); None without ``reid``.
    """

    dataset: Any
    reference: Any
    train_map: dict[str, list[str]]
    labels: dict[str, int] | None
    items: list[WorkItem]
    heldout: Any
    roots: list[Path]
    label_source: Labels | None = None
    reid: tuple[Any, Any] | None = None


def check_inputs(data: Any, reference: Any, prompts: Any, calibration: Any, ground_truth: Any,
                 config: DetectionConfig) -> DetectInputs:
    """Load and check a run's inputs (cheap: no model, no images read except to list them).

    Without ``data``, the prompts come from ``prompts`` and the model-based scores need nothing
    else; ``nn`` then needs ``reference`` and ``calibration`` or a fixed threshold.

    Raises
    ------
    DataError
        ``nn`` without reference images (naming ``--reference``), nothing to scan, ``reid``
        without patient ids or held-out patients (:func:`reid_inputs`), or any unreadable
        input.
    """
    from diffmem.data import CXRDataset, load

    dataset = None
    if data is not None:
        dataset = data if isinstance(data, CXRDataset) else load(data)
        _train_split(dataset)
    ref = None
    if "nn" in config.methods:
        if reference is None and dataset is None:
            raise DataError(NO_REFERENCE)
        ref = reference_images(reference) if reference is not None else _train_split(dataset)
    train_map = training_prompts(dataset) if dataset is not None else {}
    found = resolve_labels(dataset, ground_truth)
    labels = None if found is None else found.by_prompt
    items = work_items(dataset, train_map, labels, prompts, config)
    if found is not None:
        found.check_scanned([it.prompt for it in items if it.kind in ("train", "prompt")])
    heldout = heldout_images(dataset, calibration, config) if ref is not None else None
    roots = [Path(x.root if isinstance(x, CXRDataset) else x) for x in (data, reference,
                                                                           calibration)
             if x is not None and (isinstance(x, (str, os.PathLike, CXRDataset)))]
    inputs = DetectInputs(dataset, ref, train_map, labels, items, heldout, roots, found)
    if "reid" in config.methods:
        inputs.reid = reid_inputs(inputs, config)
    return inputs


def reid_fix(config: DetectionConfig) -> str:
    """What to do about a dataset without patient ids, in ``diffmem detect``'s words."""
    if config.patient_from:
        return f"the column --patient-from {config.patient_from!r} names did not give them"
    return ("add a patient_id column to the manifest, or pass --patient-from COLUMN naming the "
            "column of the records that holds the patient id")


def reid_inputs(inputs: DetectInputs, config: DetectionConfig) -> tuple[Any, Any]:
    """The training records and held-out records of re-ID verdicts, with patient ids (from
    ``config.patient_from`` when set); cheap (no image is read).

    Returns
    -------
    (train_set, heldout) : CXRDataset, CXRDataset or None
        ``heldout`` is None with a fixed ``config.reid_threshold``.

    Raises
    ------
    DataError
        Reference images without patients (an image folder), no patient ids (naming
        ``--patient-from``), or no held-out records to calibrate on.
    """
    from diffmem.data import CXRDataset
    from diffmem.reid.pairs import patient_records, patients_from_column

    if not isinstance(inputs.reference, CXRDataset):
        raise DataError("re-ID verdicts (--methods ...,reid) need the training records' patient "
                        "ids, but the reference is a folder of image files: pass the training "
                        "data as --data (or --reference a dataset with patient ids)")
    train_set, heldout = inputs.reference, None
    if config.reid_threshold is None:
        heldout = inputs.heldout if isinstance(inputs.heldout, CXRDataset) else (
            inputs.dataset.subset(split=["validate", "test"]) if inputs.dataset is not None
            else None)
        if heldout is None or len(heldout) == 0:
            raise DataError("no held-out patients to calibrate the re-ID threshold on: give "
                            "--data with validate/test splits or --calibration a dataset of "
                            "other patients, or a fixed --reid-threshold")
    if config.patient_from:
        train_set = patients_from_column(train_set, config.patient_from)
        heldout = None if heldout is None else patients_from_column(heldout,
                                                                     config.patient_from)
    for part in (train_set, heldout):
        if part is not None:
            patient_records(part, fix=reid_fix(config))
    return train_set, heldout


def mismatch_warnings(adapter: Any, model_source: Path | None, train_set: Any,
                       train_map: dict[str, list[str]]) -> list[str]:
    """Model/data mismatch checks; each problem is logged as a warning and returned."""
    warnings = []
    folder = model_source or (Path(adapter.source) if adapter.source else None)
    card_path = None if folder is None else folder / "model_card.json"
    if card_path is not None and card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            trained_on = (card.get("data") or {}).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            trained_on = None
        here = train_set.fingerprint()
        if trained_on and trained_on != here:
            warnings.append(
                f"model/data mismatch: {card_path} says the model was trained on data with "
                f"fingerprint {trained_on} ({(card.get('data') or {}).get('root')}), but the "
                f"training split given has fingerprint {here}; verdicts then say whether the "
                "model copies *these* images, not its own training set: pass the data the model "
                "was trained on")
    unk = getattr(adapter.tokenizer, "unk_token_id", None)
    if unk is not None and train_map:
        sample = list(train_map)[:200]
        ids = adapter.tokenizer(sample, truncation=True, max_length=adapter.max_length)[
            "input_ids"]
        total = sum(len(x) for x in ids)
        unknown = sum(sum(1 for i in x if i == unk) for x in ids)
        if total and unknown / total > 0.2:
            warnings.append(
                f"model/data mismatch: {unknown / total:.0%} of the tokens of the data's "
                "prompts are unknown to the model's tokenizer; the model was likely trained on "
                "other text")
    for w in warnings:
        log.warning(w)
    return warnings




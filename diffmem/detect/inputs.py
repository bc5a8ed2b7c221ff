"""Inputs of a detection run, checked before anything expensive runs: the training prompts and
their planted labels, the prompts to scan (:class:`WorkItem`), the held-out images the copy
threshold is calibrated on, model/data mismatch warnings, and a writable output folder.
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
from diffmem.detect.verdicts import NO_HELDOUT
from diffmem.errors import DataError, OutputError
from diffmem.store import prompt_hash

if TYPE_CHECKING:
    from diffmem.detect.detector import DetectionConfig

log = logging.getLogger(__name__)

__all__ = ["WorkItem", "check_writable", "heldout_images", "mismatch_warnings", "prompt_labels",
           "training_prompts", "work_items"]


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
    """Planted label of each training prompt: 1 when any of its training images is a planted
    duplicate.

    Parameters
    ----------
    dataset : CXRDataset
    ground_truth : path or mapping, optional
        A ``ground_truth.csv`` (or its folder) as written by ``diffmem synth``, or its rows
        keyed by image id (:func:`diffmem.data.synth.read_ground_truth`). Default: the
        dataset folder's ``ground_truth.csv`` when there is one.

    Returns
    -------
    dict or None
        ``prompt -> 0/1``; None when there is no ground truth.
    """
    from diffmem.data.synth import read_ground_truth

    if ground_truth is None:
        if not (Path(dataset.root) / "ground_truth.csv").is_file():
            return None
        ground_truth = dataset.root
    truth = ground_truth if isinstance(ground_truth, Mapping) else read_ground_truth(ground_truth)
    labels: dict[str, int] = {}
    missing = 0
    for s in dataset:
        if s.split != "train":
            continue
        row = truth.get(s.image_id)
        if row is None:
            missing += 1
            continue
        labels[s.prompt] = max(labels.get(s.prompt, 0), int(row["planted"]))
    if missing:
        log.warning("ground truth has no row for %d training image(s); their prompts count as "
                    "not planted", missing)
    return labels



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


def work_items(dataset: Any, train_map: dict[str, list[str]], labels: dict[str, int] | None,
                prompts: str | os.PathLike | Sequence[str] | None,
                config: DetectionConfig) -> list[WorkItem]:
    if prompts is None:
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
    if config.unrelated:
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


def heldout_images(dataset: Any, calibration: Any, config: DetectionConfig) -> Any:
    """Held-out real images for the threshold: a dataset, an image array, or None."""
    if config.threshold is not None:
        return None
    from diffmem.data import CXRDataset

    if calibration is None:
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
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [])
                   if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise DataError("holds neither a dataset nor image files (PNG/JPEG/DICOM) to calibrate "
                        f"on; {NO_HELDOUT}", path=path)
    return files


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




"""Re-ID network presets: JSON files found by name (``diffmem/reid/presets/<name>.json``).

A preset file holds:

``description``
    One paragraph for ``diffmem reid train --list-presets``.
``image_size``
    Side in pixels of the (square, grayscale) images the network sees; images of any other
    size are centre-cropped and resized to it (the conversion is logged).
``backbone``
    ``{"arch": "small_resnet", "widths": [...], "blocks": [...], "stem_stride": 1 or 2}``: a
    ResNet of torchvision ``BasicBlock`` stages with the given widths (each stage after the
    first halves the resolution), or ``{"arch": "torchvision", "name": "resnet18"}``: any
    torchvision classification model built by name without pretrained weights, its classifier
    replaced by the embedding layer.
``embed_dim``
    Dimension of the L2-normalized patient embedding.
``training``
    ``steps``, ``patients_per_batch`` (each step draws that many patients and two studies of
    each), ``lr``, ``weight_decay``, ``warmup_steps``, ``temperature`` (of the contrastive
    loss) and ``validation_fraction`` (of the training patients held out when the dataset's
    ``validate`` split has no patient with two studies).
``augment``
    As for the in-domain encoder (:mod:`diffmem.embed.presets`): ``scale`` (zoom, so with
    ``shift`` a random crop), ``shift``, ``rotate`` (degrees), ``brightness``, ``contrast``,
    ``noise`` and ``lowres_prob``. Nothing here copies an image: the two images of a positive
    pair are *different studies*, so the network cannot win by matching pixels.

Built-in presets: ``tiny`` (tests), ``demo`` (CPU, minutes on the synthetic demo set) and
``resnet18`` (real data on a GPU). Any JSON file of the same shape loads by path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.errors import ConfigError
from diffmem.presets import preset_dict, preset_names, read_preset_json

PRESET_DIR = Path(__file__).resolve().parent / "presets"
_KEYS = ("description", "image_size", "backbone", "embed_dim", "training", "augment")
_TRAINING_KEYS = ("steps", "patients_per_batch", "lr", "weight_decay", "warmup_steps",
                  "temperature", "validation_fraction")
_AUGMENT_KEYS = ("scale", "shift", "rotate", "brightness", "contrast", "noise", "lowres_prob")
ARCHS = ("small_resnet", "torchvision")


@dataclass(frozen=True)
class ReIDPreset:
    """A re-ID network preset, as read from its JSON file (fields: see the module docstring).

    Attributes
    ----------
    name : str
        The preset's name (the file stem).
    description, image_size, backbone, embed_dim, training, augment
        The file's fields.
    source : str
        The file the preset was read from.
    """

    name: str
    description: str
    image_size: int
    backbone: Mapping[str, Any]
    embed_dim: int
    training: Mapping[str, Any]
    augment: Mapping[str, Any]
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The preset as a JSON-ready dict (the file's fields plus ``name``)."""
        return preset_dict(self, _KEYS)


def list_presets() -> list[str]:
    """Names of the built-in re-ID presets, sorted.

    Examples
    --------
    >>> list_presets()
    ['demo', 'resnet18', 'tiny']
    """
    return preset_names(PRESET_DIR)


def load_preset(name_or_path: str | os.PathLike | ReIDPreset) -> ReIDPreset:
    """Read a re-ID preset by built-in name or from a JSON file, and check it.

    Parameters
    ----------
    name_or_path : str, path or ReIDPreset
        A name from :func:`list_presets` or the path of a JSON file of the same shape; a
        :class:`ReIDPreset` is returned unchanged.

    Returns
    -------
    ReIDPreset

    Raises
    ------
    ConfigError
        For an unknown name (the message lists the known ones), an unreadable file, a missing
        or unknown field, or a bad value.

    Examples
    --------
    >>> p = load_preset("demo")
    >>> p.image_size, p.embed_dim, p.backbone["arch"]
    (64, 64, 'small_resnet')
    """
    if isinstance(name_or_path, ReIDPreset):
        return name_or_path
    _, path, data = read_preset_json(name_or_path, PRESET_DIR, kind="re-ID")
    missing = [k for k in _KEYS if k not in data]
    unknown = sorted(set(data) - set(_KEYS) - {"name"})
    if missing or unknown:
        raise ConfigError(f"re-ID preset {str(path)!r}: missing {missing or 'nothing'}, unknown "
                          f"{unknown or 'nothing'}; a preset has exactly the fields "
                          f"{', '.join(_KEYS)} (see diffmem.reid.presets)")
    preset = ReIDPreset(name=str(data.get("name", path.stem)), source=str(path),
                        **{k: data[k] for k in _KEYS})
    _validate(preset)
    return preset


def _number(where: str, key: str, value: Any, *, integer: bool = False, low: float = 0.0) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < low:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: {key}={value!r}; expected {kind} >= {low:g}")


def _validate(p: ReIDPreset) -> None:
    where = f"re-ID preset {p.name!r} ({p.source})"
    _number(where, "image_size", p.image_size, integer=True, low=16)
    _number(where, "embed_dim", p.embed_dim, integer=True, low=2)
    for key in ("backbone", "training", "augment"):
        if not isinstance(getattr(p, key), Mapping):
            raise ConfigError(f"{where}: field {key!r} must be a JSON object")
    check_backbone(p.backbone, where=where)
    for group, keys in (("training", _TRAINING_KEYS), ("augment", _AUGMENT_KEYS)):
        values = getattr(p, group)
        missing = [k for k in keys if k not in values]
        unknown = sorted(set(values) - set(keys))
        if missing or unknown:
            raise ConfigError(f"{where}: {group} must have exactly the keys {', '.join(keys)}"
                              f" (missing: {missing or 'none'}, unknown: {unknown or 'none'})")
        for k in keys:
            _number(where, f"{group}.{k}", values[k])
    tr = p.training
    _number(where, "training.steps", tr["steps"], integer=True, low=1)
    _number(where, "training.patients_per_batch", tr["patients_per_batch"], integer=True, low=2)
    if not 0 < tr["temperature"] or not 0 <= tr["validation_fraction"] < 1:
        raise ConfigError(f"{where}: training.temperature must be > 0 and "
                          "training.validation_fraction in [0, 1)")
    if p.augment["scale"] >= 1 or p.augment["lowres_prob"] > 1:
        raise ConfigError(f"{where}: augment.scale must be in [0, 1) and augment.lowres_prob "
                          "in [0, 1]")


def check_backbone(backbone: Mapping[str, Any], *, where: str) -> None:
    """Refuse a backbone config that :func:`diffmem.reid.network.build_network` cannot build."""
    arch = backbone.get("arch")
    if arch not in ARCHS:
        raise ConfigError(f"{where}: backbone.arch={arch!r}; known: {', '.join(ARCHS)}")
    if arch == "torchvision":
        if not isinstance(backbone.get("name"), str) or set(backbone) - {"arch", "name"}:
            raise ConfigError(f"{where}: a torchvision backbone is {{'arch': 'torchvision', "
                              "'name': MODEL}} (e.g. 'resnet18'), nothing else")
        return
    widths, blocks = backbone.get("widths"), backbone.get("blocks")
    ok = (isinstance(widths, list) and isinstance(blocks, list) and len(widths) == len(blocks)
          and len(widths) >= 1 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                       for v in widths + blocks))
    if not ok or backbone.get("stem_stride") not in (1, 2) \
            or set(backbone) - {"arch", "widths", "blocks", "stem_stride"}:
        raise ConfigError(f"{where}: a small_resnet backbone is {{'arch': 'small_resnet', "
                          "'widths': [16, 32, ...], 'blocks': [1, 1, ...] (same length, "
                          f"positive integers), 'stem_stride': 1 or 2}}; got {dict(backbone)!r}")

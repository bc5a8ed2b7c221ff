"""Encoder presets: JSON files found by name (``diffmem/embed/presets/<name>.json``).

A preset file holds:

``description``
    One paragraph for ``diffmem embed train --list-presets`` and the report.
``image_size``
    Side in pixels of the (square, grayscale) images the encoder sees. Images of any other
    size are centre-cropped and resized to it by :meth:`InDomainEncoder.embed_images`.
``model``
    An open_clip ``CLIP`` model config: ``embed_dim``, ``vision_cfg``, ``text_cfg`` (and
    optionally ``quick_gelu``). ``vision_cfg`` must not set ``image_size`` (taken from the
    preset's ``image_size``); ``text_cfg`` must not set ``vocab_size``, ``context_length``,
    ``pad_id``, ``eos_id`` or ``pool_type``: those come from the tokenizer (see
    :mod:`diffmem.embed.model`).
``tokenizer``
    ``vocab_size`` and ``model_max_length`` for :func:`diffmem.pipelines.train_tokenizer`.
``training``
    ``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``warmup_steps``, ``grad_clip``,
    ``text_loss_weight`` (image-report CLIP loss) and ``image_loss_weight`` (image-image loss
    between two augmented views).
``augment``
    Strength of the training augmentation: ``scale``, ``shift`` (fraction of the side),
    ``rotate`` (degrees), ``brightness``, ``contrast``, ``noise`` (largest Gaussian noise
    standard deviation) and ``lowres_prob`` (probability of a down- and up-sampling round trip,
    so that low-resolution generated images embed near their sources).

Built-in presets: ``tiny`` (tests: trains in seconds, learns little) and ``demo`` (CPU, a few
minutes on the synthetic demo set). Any JSON file of the same shape loads by path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.checks import check_int
from diffmem.errors import ConfigError
from diffmem.presets import preset_dict, preset_names, read_preset_json

PRESET_DIR = Path(__file__).resolve().parent / "presets"
_KEYS = ("description", "image_size", "model", "tokenizer", "training", "augment")
_TRAINING_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip",
                  "text_loss_weight", "image_loss_weight")
_AUGMENT_KEYS = ("scale", "shift", "rotate", "brightness", "contrast", "noise", "lowres_prob")
# Set from the tokenizer (text) or the preset's image_size (vision) when the model is built.
_TEXT_OWNED = ("vocab_size", "context_length", "pad_id", "eos_id", "pool_type")
_VISION_OWNED = ("image_size",)


@dataclass(frozen=True)
class EncoderPreset:
    """An encoder preset, as read from its JSON file (fields: see the module docstring).

    Attributes
    ----------
    name : str
        The preset's name (the file stem).
    description, image_size, model, tokenizer, training, augment
        The file's fields.
    source : str
        The file the preset was read from.
    """

    name: str
    description: str
    image_size: int
    model: Mapping[str, Any]
    tokenizer: Mapping[str, Any]
    training: Mapping[str, Any]
    augment: Mapping[str, Any]
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The preset as a JSON-ready dict (the file's fields plus ``name``)."""
        return preset_dict(self, _KEYS)


def list_presets() -> list[str]:
    """Names of the built-in encoder presets, sorted.

    Examples
    --------
    >>> list_presets()
    ['demo', 'tiny']
    """
    return preset_names(PRESET_DIR)


def load_preset(name_or_path: str | os.PathLike | EncoderPreset) -> EncoderPreset:
    """Read an encoder preset by built-in name or from a JSON file, and check it.

    Parameters
    ----------
    name_or_path : str, path or EncoderPreset
        A name from :func:`list_presets`, or the path of a JSON file of the same shape. An
        :class:`EncoderPreset` is returned unchanged.

    Returns
    -------
    EncoderPreset

    Raises
    ------
    ConfigError
        For an unknown name (the message lists the known ones), an unreadable file, a missing
        or unknown field, or values that do not fit together.

    Examples
    --------
    >>> preset = load_preset("demo")
    >>> preset.image_size, preset.model["embed_dim"]
    (64, 128)
    """
    if isinstance(name_or_path, EncoderPreset):
        return name_or_path
    _, path, data = read_preset_json(name_or_path, PRESET_DIR, kind="encoder")
    missing = [k for k in _KEYS if k not in data]
    unknown = sorted(set(data) - set(_KEYS) - {"name"})
    if missing or unknown:
        parts = [f"missing field(s) {', '.join(missing)}"] if missing else []
        if unknown:
            parts.append(f"unknown field(s) {', '.join(unknown)}")
        raise ConfigError(f"encoder preset {str(path)!r}: {'; '.join(parts)}; a preset has "
                          f"exactly the fields {', '.join(_KEYS)} (see diffmem.embed.presets)")
    preset = EncoderPreset(name=str(data.get("name", path.stem)), source=str(path),
                           **{k: data[k] for k in _KEYS})
    _validate(preset)
    return preset


def _validate(p: EncoderPreset) -> None:
    where = f"encoder preset {p.name!r} ({p.source})"
    for key in ("model", "tokenizer", "training", "augment"):
        if not isinstance(getattr(p, key), Mapping):
            raise ConfigError(f"{where}: field {key!r} must be a JSON object")
    check_int(f"{where}: image_size", p.image_size, low=8)
    model = p.model
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model:
            raise ConfigError(f"{where}: model lacks {key!r} (an open_clip CLIP config has "
                              "embed_dim, vision_cfg and text_cfg)")
    if not isinstance(model["vision_cfg"], Mapping) or not isinstance(model["text_cfg"], Mapping):
        raise ConfigError(f"{where}: model.vision_cfg and model.text_cfg must be JSON objects")
    for sub, owned, source in (("text_cfg", _TEXT_OWNED, "the tokenizer"),
                               ("vision_cfg", _VISION_OWNED, "the preset's image_size")):
        clash = sorted(set(model[sub]) & set(owned))
        if clash:
            raise ConfigError(f"{where}: model.{sub} sets {', '.join(clash)}, which is taken "
                              f"from {source}; remove it from the preset")
    if "timm_model_name" in model["vision_cfg"] or "hf_model_name" in model["text_cfg"]:
        raise ConfigError(f"{where}: timm / Hugging Face towers need pretrained weights or "
                          "downloads; use open_clip's own ViT or ModifiedResNet and "
                          "TextTransformer")
    check_patch_size(model["vision_cfg"], p.image_size, where=where)
    for key in ("vocab_size", "model_max_length"):
        if not isinstance(p.tokenizer.get(key), int):
            raise ConfigError(f"{where}: tokenizer.{key} must be an integer")
    for group, keys in (("training", _TRAINING_KEYS), ("augment", _AUGMENT_KEYS)):
        values = getattr(p, group)
        missing = [k for k in keys if k not in values]
        unknown = sorted(set(values) - set(keys))
        if missing or unknown:
            raise ConfigError(f"{where}: {group} must have exactly the keys {', '.join(keys)}"
                              f" (missing: {missing or 'none'}, unknown: {unknown or 'none'})")
        for k in keys:
            v = values[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{where}: {group}.{k}={v!r}; expected a number >= 0")
    if p.augment["scale"] >= 1:
        raise ConfigError(f"{where}: augment.scale={p.augment['scale']!r}; use a value in "
                          "[0, 1) (0.1 zooms by up to +-10 %)")
    if p.augment["lowres_prob"] > 1:
        raise ConfigError(f"{where}: augment.lowres_prob={p.augment['lowres_prob']!r}; "
                          "use a probability in [0, 1]")


def check_patch_size(vision_cfg: Mapping[str, Any], image_size: int, *, where: str) -> None:
    """Refuse an image size that a ViT's patches or a ModifiedResNet's strides do not divide."""
    if isinstance(vision_cfg.get("layers"), (list, tuple)):  # ModifiedResNet: stride 32 overall
        if image_size % 32:
            raise ConfigError(f"{where}: image_size={image_size} is not a multiple of 32, which "
                              "a ModifiedResNet vision tower needs")
        return
    patch = vision_cfg.get("patch_size", 16)
    if image_size % patch:
        raise ConfigError(f"{where}: image_size={image_size} is not a multiple of the ViT "
                          f"patch_size={patch}; use a multiple of {patch}")

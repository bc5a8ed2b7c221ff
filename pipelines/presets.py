"""Model presets: JSON files found by name, and :func:`build_pipeline`, which builds every module
of a :class:`~diffmem.pipelines.CXRDiffusionPipeline` from one (randomly initialized, seeded).

A preset file (``pipelines/presets/<name>.json``) holds:

``description``
    One paragraph for ``diffmem train --help`` and the report.
``resolution`` and ``latent``
    Output image side in pixels, and whether the UNet works on VAE latents (``true``) or on
    pixels (``false``, then ``vae`` is ``null``).
``unet``
    Keyword arguments of :class:`diffusers.UNet2DConditionModel`.
``text_encoder``
    Keyword arguments of :class:`transformers.CLIPTextConfig`, *without* ``vocab_size``,
    ``max_position_embeddings`` and the special token ids: those come from the tokenizer.
``tokenizer``
    ``vocab_size`` and ``model_max_length`` for :func:`~diffmem.pipelines.train_tokenizer`.
``scheduler``
    Keyword arguments of :class:`diffusers.DDPMScheduler` (the training noise schedule).
``vae``
    Keyword arguments of :class:`diffusers.AutoencoderKL`, or ``null`` in pixel space.
``training``
    Default trainer settings: ``lr``, ``batch_size``, ``steps``, ``caption_dropout``,
    ``warmup_steps``, ``weight_decay``, ``grad_clip``.

Built-in presets: ``tiny`` (tests), ``demo`` (CPU, 32 px pixel space) and ``base`` (GPU,
256 px latent diffusion). Any other JSON file of the same shape loads by path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.errors import ConfigError, ModelError
from diffmem.presets import preset_dict, preset_names, read_preset_json

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "presets"
_KEYS = ("description", "resolution", "latent", "unet", "text_encoder", "tokenizer", "scheduler",
         "vae", "training")
_TRAINING_KEYS = ("lr", "batch_size", "steps", "caption_dropout")
# Set from the tokenizer by build_pipeline; a preset that sets them would be silently overruled.
_TOKENIZER_OWNED = ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id",
                    "pad_token_id")


@dataclass(frozen=True)
class PipelinePreset:
    """A model preset, as read from its JSON file (see the module docstring for the fields).

    Attributes
    ----------
    name : str
        The preset's name (the file stem).
    description, resolution, latent, unet, text_encoder, tokenizer, scheduler, vae, training
        The file's fields; ``vae`` is ``None`` in pixel space.
    source : str
        The file the preset was read from.
    """

    name: str
    description: str
    resolution: int
    latent: bool
    unet: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    tokenizer: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    vae: Mapping[str, Any] | None
    training: Mapping[str, Any]
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The preset as a JSON-ready dict (the file's fields plus ``name``)."""
        return preset_dict(self, _KEYS)


def list_presets() -> list[str]:
    """Names of the built-in presets, sorted.

    Examples
    --------
    >>> list_presets()
    ['base', 'demo', 'tiny']
    """
    return preset_names(PRESET_DIR)


def load_preset(name_or_path: str | os.PathLike | PipelinePreset) -> PipelinePreset:
    """Read a preset by built-in name or from a JSON file, and check it is consistent.

    Parameters
    ----------
    name_or_path : str, path or PipelinePreset
        A name from :func:`list_presets`, or the path of a JSON file of the same shape. A
        :class:`PipelinePreset` is returned unchanged.

    Returns
    -------
    PipelinePreset

    Raises
    ------
    ConfigError
        For an unknown name (the message lists the known ones), an unreadable file, a missing
        or unknown field, or fields that do not fit together (channels, sizes, widths).

    Examples
    --------
    >>> preset = load_preset("demo")
    >>> preset.resolution, preset.latent, preset.unet["block_out_channels"]
    (32, False, [32, 64, 64])
    """
    if isinstance(name_or_path, PipelinePreset):
        return name_or_path
    _, path, data = read_preset_json(name_or_path, PRESET_DIR, kind="model")
    preset = _from_dict(data, name=path.stem, source=str(path))
    _validate(preset)
    return preset


def _from_dict(data: Mapping[str, Any], *, name: str, source: str) -> PipelinePreset:
    missing = [k for k in _KEYS if k not in data]
    unknown = sorted(set(data) - set(_KEYS) - {"name"})
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing field(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown field(s) {', '.join(unknown)}")
        raise ConfigError(f"preset {source!r}: {'; '.join(parts)}; a preset has exactly the "
                          f"fields {', '.join(_KEYS)} (see diffmem.pipelines.presets)")
    return PipelinePreset(name=str(data.get("name", name)), source=source,
                          **{k: data[k] for k in _KEYS})


def _validate(p: PipelinePreset) -> None:
    where = f"preset {p.name!r} ({p.source})"
    for key in ("unet", "text_encoder", "tokenizer", "scheduler", "training"):
        if not isinstance(getattr(p, key), Mapping):
            raise ConfigError(f"{where}: field {key!r} must be a JSON object")
    if not isinstance(p.resolution, int) or p.resolution < 8 or p.resolution % 8:
        raise ConfigError(f"{where}: resolution={p.resolution!r}; use a positive multiple of 8")
    if not isinstance(p.latent, bool):
        raise ConfigError(f"{where}: latent={p.latent!r}; use true or false")
    owned = sorted(set(p.text_encoder) & set(_TOKENIZER_OWNED))
    if owned:
        raise ConfigError(f"{where}: text_encoder sets {', '.join(owned)}, which build_pipeline "
                          "takes from the tokenizer; remove them from the preset")
    for key in ("vocab_size", "model_max_length"):
        if not isinstance(p.tokenizer.get(key), int):
            raise ConfigError(f"{where}: tokenizer.{key} must be an integer")
    missing = [k for k in _TRAINING_KEYS if k not in p.training]
    if missing:
        raise ConfigError(f"{where}: training lacks {', '.join(missing)}")
    width = p.text_encoder.get("hidden_size")
    if p.unet.get("cross_attention_dim") != width:
        raise ConfigError(f"{where}: unet.cross_attention_dim={p.unet.get('cross_attention_dim')!r}"
                          f" must equal text_encoder.hidden_size={width!r}")
    sample = p.unet.get("sample_size")
    if p.latent:
        if not isinstance(p.vae, Mapping):
            raise ConfigError(f"{where}: latent=true needs a vae object")
        factor = 2 ** (len(p.vae.get("block_out_channels", [0] * 4)) - 1)
        expected = p.resolution // factor
        channels = p.vae.get("latent_channels", 4)
    else:
        if p.vae is not None:
            raise ConfigError(f"{where}: latent=false (pixel space) needs vae=null")
        expected, channels = p.resolution, 1
    if sample != expected:
        raise ConfigError(f"{where}: unet.sample_size={sample!r} but the model denoises "
                          f"{expected}x{expected} samples at resolution {p.resolution}; "
                          f"set unet.sample_size to {expected}")
    for key in ("in_channels", "out_channels"):
        if p.unet.get(key) != channels:
            raise ConfigError(f"{where}: unet.{key}={p.unet.get(key)!r}, expected {channels} "
                              f"({'VAE latent channels' if p.latent else 'one grayscale channel'})")


def build_pipeline(preset: str | os.PathLike | PipelinePreset, *, tokenizer, seed: int = 0,
                   vae=None):
    """Build a freshly initialized :class:`CXRDiffusionPipeline` from a preset.

    Every module is built from the preset's config with weights drawn from a generator seeded
    by ``seed`` (the global torch RNG is left as it was), so the same preset, tokenizer and
    seed give the same weights.

    Parameters
    ----------
    preset : str, path or PipelinePreset
        A preset name (``"tiny"``, ``"demo"``, ``"base"``), a preset JSON path, or a loaded preset.
    tokenizer : transformers.PreTrainedTokenizerFast
        The tokenizer, normally from :func:`~diffmem.pipelines.train_tokenizer` with the preset's
        ``tokenizer`` settings. The text encoder's vocabulary size, number of positions and
        special token ids are taken from it.
    seed : int, optional
        Seed of the weight initialization.
    vae : diffusers.AutoencoderKL, optional
        Latent presets only: a (pretrained) autoencoder used instead of a randomly initialized
        one built from the preset; its ``latent_channels`` must match the UNet.

    Returns
    -------
    CXRDiffusionPipeline
        With a :class:`diffusers.DDPMScheduler` (the training schedule); for sampling swap in
        ``DDIMScheduler.from_config(pipe.scheduler.config)``.

    Raises
    ------
    ConfigError
        For a bad preset, a tokenizer without ``[BOS]``/``[EOS]``/``[PAD]`` or without a set
        ``model_max_length``, or a ``vae`` that does not fit.

    Examples
    --------
    >>> from diffmem.pipelines import train_tokenizer
    >>> tok = train_tokenizer(["No acute process. Dr. ___ notified."] * 4, vocab_size=100,
    ...                       model_max_length=32)
    >>> pipe = build_pipeline("tiny", tokenizer=tok, seed=0)
    >>> pipe.sample_shape
    (1, 32, 32)
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffmem.pipelines.pipeline_cxr import CXRDiffusionPipeline
    from diffmem.pipelines.tokenizer import MARKER_TOKENS

    # 1. check inputs
    p = load_preset(preset)
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ConfigError(f"tokenizer has no {'/'.join(missing)} token; build it with "
                          "diffmem.pipelines.train_tokenizer")
    max_length = int(tokenizer.model_max_length)
    if max_length > 4096:
        raise ConfigError(f"tokenizer.model_max_length={max_length} looks unset; train the "
                          f"tokenizer with model_max_length={p.tokenizer['model_max_length']}")
    if max_length != p.tokenizer["model_max_length"] \
            or len(tokenizer) > p.tokenizer["vocab_size"] + len(MARKER_TOKENS):
        log.info("tokenizer (%d tokens, max length %d) differs from preset %r (%d, %d); "
                 "the text encoder follows the tokenizer", len(tokenizer), max_length, p.name,
                 p.tokenizer["vocab_size"], p.tokenizer["model_max_length"])
    if vae is not None:
        if not p.latent:
            raise ConfigError(f"preset {p.name!r} works in pixel space; pass vae=None or use a "
                              "latent preset such as 'base'")
        if vae.config.latent_channels != p.unet["in_channels"]:
            raise ConfigError(f"vae has {vae.config.latent_channels} latent channels but preset "
                              f"{p.name!r} expects {p.unet['in_channels']}")
        if vae.config.in_channels not in (1, 3) or vae.config.out_channels not in (1, 3):
            raise ConfigError("vae must take and give 1 (grayscale) or 3 (RGB) channels, got "
                              f"{vae.config.in_channels} in / {vae.config.out_channels} out")

    # 2. build the modules under a private, seeded RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        text_config = CLIPTextConfig(**p.text_encoder, vocab_size=len(tokenizer),
                                     max_position_embeddings=max_length,
                                     bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                     pad_token_id=ids["pad"])
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel(**p.unet)
        if p.latent and vae is None:
            vae = AutoencoderKL(**p.vae)
    scheduler = DDPMScheduler(**p.scheduler)

    pipe = CXRDiffusionPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                scheduler=scheduler, vae=vae)
    log.info("built preset %r: unet %.2fM, text encoder %.2fM parameters%s", p.name,
             _count(unet) / 1e6, _count(text_encoder) / 1e6,
             f", vae {_count(vae) / 1e6:.2f}M" if vae is not None else "")
    return pipe


def _count(module) -> int:
    return sum(t.numel() for t in module.parameters())


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def default_model_dir() -> Path:
    """The embedded default model: a ``demo``-preset pipeline folder shipped with diffmem.

    It was produced by ``diffmem train --preset demo`` on ``diffmem synth --preset demo
    --seed 0`` (its ``model_card.json`` records the exact settings and the data fingerprint),
    so it memorizes that dataset's planted duplicates: it exists to be probed.

    Raises
    ------
    ModelError
        When the package was installed without it.
    """
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise ModelError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                         "reinstall diffmem, or train one with `diffmem synth --out D --preset "
                         "demo && diffmem train --data D --out M --preset demo` and pass --model M")
    return DEFAULT_MODEL_DIR

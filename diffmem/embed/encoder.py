"""An in-domain image-report encoder: a small open_clip CLIP model trained from scratch on a
dataset's own (image, prompt) pairs (CLIP: Radford et al., ICML 2021; open_clip: Cherti et al.,
CVPR 2023), with no pretrained weights and nothing downloaded.

It serves two purposes:

* the ``embedding`` similarity backend of the detector: nearest-training-image retrieval at
  scale, where pixel-space metrics are too slow and too sensitive to small shifts;
* utility metrics of generated images: an in-domain Fréchet distance and prompt-image
  alignment (see :mod:`diffmem.embed.metrics`).

Model
-----
The preset's ``model`` field is an open_clip ``CLIP`` config (``embed_dim``, ``vision_cfg``,
``text_cfg``). The text tower is open_clip's ``TextTransformer`` over *our* WordPiece tokenizer
(:func:`diffmem.pipelines.train_tokenizer`, trained on the training prompts so that
de-identification markers such as ``___`` stay single tokens), not open_clip's BPE. So the
builder sets, from the tokenizer:

* ``vocab_size = len(tokenizer)`` and ``context_length = tokenizer.model_max_length``;
* ``pad_id = 0`` (``[PAD]``) and ``eos_id = 3`` (``[EOS]``);
* ``pool_type = "eos"``: the sentence embedding is the output at the ``[EOS]`` token. open_clip's
  default ``"argmax"`` takes the position of the *largest token id*, which is the end-of-text
  token only in OpenAI's BPE vocabulary (where it is the last id); in ours ``[EOS]`` is id 3, so
  ``"argmax"`` would pool an arbitrary word. ``"last"`` would pool a ``[PAD]`` position.
  With the causal attention mask (kept on), the ``[EOS]`` output sees every real token and no
  padding, so padding never changes an embedding. Prompts longer than ``context_length`` are
  truncated with ``[EOS]`` kept at the end.

The vision tower is open_clip's ``ModifiedResNet`` in the built-in presets (a
``VisionTransformer`` config works too). On the synthetic demo set a small ResNet retrieved
perturbed training images far better than a ViT of similar cost (top-1 0.93 vs 0.21 for a
3-layer ViT with 8 px patches after the same 300 steps). It has batch norm, so the encoder
embeds in eval mode, with the running statistics saved with the weights. Its first layer takes
three channels: grayscale images are normalized (``(x - 0.5) / 0.25``) and the one
channel is repeated three times. The model is built with ``open_clip.CLIP(**config)``, the class
``open_clip.create_model`` instantiates for such a config; we do not register the config in
open_clip's process-wide registry (``add_model_config`` takes files and changes global state, and
``create_model`` adds nothing for a random initialization but a warning on the root logger).

Training
--------
The loss is open_clip's :class:`~open_clip.ClipLoss` (symmetric InfoNCE with the model's learnable
logit scale, clamped at 100 as in open_clip's trainer) on (augmented image, prompt) pairs,
*plus* the same loss between two independently augmented views of each image (SimCLR: Chen et
al., ICML 2020), weighted by the preset's ``text_loss_weight`` and ``image_loss_weight``. This
is a deviation from plain CLIP, made on purpose: many different radiographs share one prompt
("No acute cardiopulmonary process."), so the image-report loss alone cannot tell two patients
with the same report apart, while the detector needs exactly that. The augmentation (small
zoom, shift, rotation, brightness and contrast changes, Gaussian noise, a low-resolution round
trip) makes near-copies of an image embed close to it.

A batch never holds two pixel-identical images (planted duplicates are grouped; each step
draws distinct groups and one member of each), and the image-report loss only uses the first
of several samples with the same tokenized prompt: otherwise identical positives would be
scored as negatives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.data import CXRDataset
from diffmem.embed.presets import EncoderPreset, check_patch_size, load_preset
from diffmem.errors import ConfigError, DataError, ModelError, PromptError, TrainingError
from diffmem.utils import (prepare_out_dir, progress, progress_bar, weights_fingerprint,
                           write_json)

log = logging.getLogger(__name__)

CONFIG_NAME = "encoder_config.json"
WEIGHTS_NAME = "encoder.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "diffmem-in-domain-encoder"
FORMAT_VERSION = 1
#: Grayscale in [0, 1] is mapped to ``(x - MEAN) / STD`` before the vision tower.
INPUT_MEAN, INPUT_STD = 0.5, 0.25
_LOGIT_SCALE_MAX = math.log(100.0)
_IN_MEMORY_LIMIT = 1 << 30  # bytes of training images kept in RAM; beyond that they stream
_SEED_STRIDE = 1_000_003


# --------------------------------------------------------------------------------- results
@dataclass
class EncoderResult:
    """What :func:`train_encoder` produced.

    Attributes
    ----------
    out : str
        The encoder folder (load it with :func:`load_encoder`).
    steps : int
        Optimizer steps taken.
    initial_loss, final_loss : float
        Mean loss over the first and the last ``min(10, steps)`` steps.
    losses : list of float
        The loss of every step.
    wall_seconds : float
        Training time, image loading included.
    embed_dim, image_size : int
        Embedding dimension and input side of the encoder.
    encoder : InDomainEncoder
        The trained encoder, in memory (not part of :meth:`to_dict`).
    """

    out: str
    steps: int
    initial_loss: float
    final_loss: float
    losses: list[float]
    wall_seconds: float
    embed_dim: int
    image_size: int
    encoder: InDomainEncoder | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything but the in-memory encoder."""
        d = asdict(self)
        d.pop("encoder")
        return d


# ------------------------------------------------------------------------------- the model
def open_clip_config(preset: str | os.PathLike | EncoderPreset, *, tokenizer,
                     image_size: int | None = None) -> dict[str, Any]:
    """The full open_clip ``CLIP`` config for a preset and a trained tokenizer.

    Parameters
    ----------
    preset : str, path or EncoderPreset
    tokenizer : transformers.PreTrainedTokenizerFast
        From :func:`diffmem.pipelines.train_tokenizer`; gives ``vocab_size``,
        ``context_length``, ``pad_id`` and ``eos_id``.
    image_size : int, optional
        Overrides the preset's image side.

    Returns
    -------
    dict
        ``{"embed_dim", "vision_cfg", "text_cfg", ...}``, ready for ``open_clip.CLIP(**cfg)``.

    Examples
    --------
    >>> from diffmem.pipelines import train_tokenizer
    >>> tok = train_tokenizer(["No acute process."] * 3, vocab_size=100, model_max_length=16)
    >>> cfg = open_clip_config("tiny", tokenizer=tok)
    >>> cfg["text_cfg"]["pool_type"], cfg["text_cfg"]["eos_id"], cfg["vision_cfg"]["image_size"]
    ('eos', 3, 32)
    """
    p = load_preset(preset)
    size = p.image_size if image_size is None else _positive_int("image_size", image_size)
    check_patch_size(p.model["vision_cfg"], size, where=f"image_size={size} with preset {p.name!r}")
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "eos")}
    if None in ids.values():
        raise ConfigError("the tokenizer has no [PAD]/[EOS] token; build it with "
                          "diffmem.pipelines.train_tokenizer")
    context = int(tokenizer.model_max_length)
    if context > 4096:
        raise ConfigError(f"tokenizer.model_max_length={context} looks unset; train the "
                          f"tokenizer with model_max_length={p.tokenizer['model_max_length']}")
    cfg = {k: _plain(v) for k, v in p.model.items()}
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": size}
    cfg["text_cfg"] = {**cfg["text_cfg"], "vocab_size": len(tokenizer), "context_length": context,
                       "pad_id": int(ids["pad"]), "eos_id": int(ids["eos"]), "pool_type": "eos"}
    return cfg


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build_model(cfg: Mapping[str, Any], *, seed: int):
    """``open_clip.CLIP(**cfg)`` with weights drawn under a private RNG seeded by ``seed``."""
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            model = open_clip.CLIP(**_plain(cfg))
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"open_clip cannot build a CLIP model from this config: {e}; "
                              "check the preset's model field against open_clip's "
                              "CLIPVisionCfg / CLIPTextCfg") from e
    return model


def _prepare_images(images, size: int):
    """(N, H, W) or (N, 1, H, W) float in [0, 1] -> normalized (N, 3, size, size) tensor.

    Non-square images are centre-cropped to a square first (as :func:`diffmem.data.read_image`
    does); other sides are resized (area-like antialiased bilinear when shrinking).
    """
    import torch
    import torch.nn.functional as F

    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    x = x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    h, w = x.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top:top + s, left:left + s]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > size)
    x = (x - INPUT_MEAN) / INPUT_STD
    return x.expand(-1, 3, -1, -1)


def _check_images(images) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise DataError(f"images must have shape (N, H, W) (grayscale, one image per row), got "
                        f"shape {arr.shape}; for one image pass image[None]")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"images must be float in [0, 1], got dtype {arr.dtype}; divide 8-bit "
                        "images by 255")
    if arr.size and not np.isfinite(arr).all():
        raise DataError("images contain NaN or inf values")
    if arr.size and (arr.min() < -1e-3 or arr.max() > 1 + 1e-3):
        raise DataError(f"images must lie in [0, 1], got values in [{arr.min():.3g}, "
                        f"{arr.max():.3g}]; rescale them (e.g. (x + 1) / 2 for [-1, 1] output) "
                        "or clip them first")
    return arr


# ------------------------------------------------------------------------------ the encoder
class InDomainEncoder:
    """A trained in-domain encoder: embeds grayscale images and prompts into one space.

    Build it with :func:`load_encoder` (or take ``train_encoder(...).encoder``). Calling the
    encoder embeds images, so it can be passed wherever an embedding function
    ``images (N, H, W) -> (N, D)`` is expected (the detector's ``embedding`` backend).

    Attributes
    ----------
    config : dict
        The folder's ``encoder_config.json``.
    dim : int
        Embedding dimension ``D``.
    image_size : int
        Side the images are resized to.
    path : str or None
        The folder it was loaded from.
    """

    def __init__(self, model, tokenizer, config: Mapping[str, Any], *, path: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = dict(config)
        self.dim = int(self.config["embed_dim"])
        self.image_size = int(self.config["image_size"])
        self.path = path
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return (f"InDomainEncoder(dim={self.dim}, image_size={self.image_size}, "
                f"path={self.path!r})")

    def fingerprint(self) -> str:
        """A short hash of the weights and the model config (the detector keys its feature
        cache on it); the same for a trained encoder and its saved-and-loaded copy."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.config["open_clip_model_cfg"],
                                                    self.model)
        return self._fingerprint

    @property
    def device(self):
        return next(self.model.parameters()).device

    def to(self, device) -> InDomainEncoder:
        """Move the model to ``device`` (``"cpu"``, ``"cuda"``); returns ``self``."""
        self.model.to(device)
        return self

    def embed_images(self, images: np.ndarray, *, batch_size: int = 128) -> np.ndarray:
        """L2-normalized embeddings of grayscale images.

        Parameters
        ----------
        images : ndarray, shape (N, H, W)
            Float images in [0, 1] (``(N, 1, H, W)`` is accepted too). Any side: images are
            centre-cropped to square and resized to :attr:`image_size`.
        batch_size : int, optional
            Images per forward pass.

        Returns
        -------
        ndarray, shape (N, dim), float32
            Unit-norm rows; the cosine similarity of two images is their dot product.

        Raises
        ------
        DataError
            For a wrong shape or dtype, NaN, or values outside [0, 1].
        """
        import torch

        arr = _check_images(images)
        batch_size = _positive_int("batch_size", batch_size)
        out = np.zeros((len(arr), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(arr), batch_size):
                x = _prepare_images(arr[start:start + batch_size], self.image_size)
                feats = self.model.encode_image(x.to(self.device), normalize=True)
                out[start:start + len(x)] = feats.float().cpu().numpy()
        return out

    __call__ = embed_images

    def embed_texts(self, prompts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """L2-normalized embeddings of prompts (longer ones are truncated to the context length).

        Parameters
        ----------
        prompts : sequence of str
        batch_size : int, optional

        Returns
        -------
        ndarray, shape (N, dim), float32

        Raises
        ------
        PromptError
            When ``prompts`` is a single string or holds a non-string.
        """
        import torch

        ids = _tokenize(self.tokenizer, prompts)
        batch_size = _positive_int("batch_size", batch_size)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size].to(self.device)
                out[start:start + len(chunk)] = \
                    self.model.encode_text(chunk, normalize=True).float().cpu().numpy()
        return out


def _tokenize(tokenizer, prompts: Sequence[str]):
    import torch

    if isinstance(prompts, str):
        raise PromptError("prompts must be a list of strings, got one string; wrap it in a "
                          "list: embed_texts([prompt])")
    prompts = list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise PromptError(f"prompt #{bad[0]} is {type(prompts[bad[0]]).__name__}, not a string")
    if not prompts:
        return torch.zeros((0, int(tokenizer.model_max_length)), dtype=torch.long)
    enc = tokenizer(prompts, padding="max_length", truncation=True,
                    max_length=int(tokenizer.model_max_length), return_tensors="pt")
    return enc["input_ids"]


def load_encoder(path: str | os.PathLike, *, device: str = "cpu") -> InDomainEncoder:
    """Load an encoder folder written by :func:`train_encoder`.

    Parameters
    ----------
    path : path
        The folder holding ``encoder_config.json``, ``encoder.safetensors`` and ``tokenizer/``.
    device : str, optional
        Where to put the model.

    Returns
    -------
    InDomainEncoder

    Raises
    ------
    ModelError
        When the folder does not exist, is not an encoder folder, misses a file, or its weights
        do not fit its config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    folder = Path(path)
    hint = ("train one with `diffmem embed train --data DATA --out DIR` "
            "(diffmem.embed.train_encoder)")
    if not folder.is_dir():
        raise ModelError(f"encoder folder {str(folder)!r} does not exist or is not a folder; "
                         f"{hint}")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelError(f"{str(folder)!r} is not an in-domain encoder folder (no {CONFIG_NAME}); "
                         f"pass the --out folder of `diffmem embed train`, or {hint}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {str(cfg_path)!r}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelError(f"{str(cfg_path)!r} is not an in-domain encoder config (format "
                         f"{config.get('format') if isinstance(config, dict) else None!r}, "
                         f"expected {FORMAT!r}); {hint}")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(f"{str(cfg_path)!r} has format_version {config.get('format_version')}, "
                         f"newer than this diffmem reads ({FORMAT_VERSION}); upgrade diffmem")
    absent = [k for k in ("open_clip_model_cfg", "embed_dim", "image_size") if k not in config]
    if absent:
        raise ModelError(f"{str(cfg_path)!r} lacks {', '.join(absent)}; the config is damaged: "
                         f"copy the folder again or {hint}")
    missing = [name for name in (WEIGHTS_NAME, f"{TOKENIZER_DIR}/tokenizer.json")
               if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"encoder folder {str(folder)!r} misses {', '.join(missing)}; the "
                         f"folder is incomplete: copy it again or {hint}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder / TOKENIZER_DIR))
    model = _build_model(config["open_clip_model_cfg"], seed=0)
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"cannot read {str(folder / WEIGHTS_NAME)!r} as safetensors: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"the weights in {str(folder / WEIGHTS_NAME)!r} do not fit the model "
                         f"in {CONFIG_NAME}: {str(e).splitlines()[0]}") from e
    model.to(device)
    return InDomainEncoder(model, tokenizer, config, path=str(folder))


# ---------------------------------------------------------------------------- augmentation
def _augment(x, aug: Mapping[str, float], gen):
    """Random near-copies of a batch ``x`` (B, 1, S, S) in [0, 1], drawn from ``gen``."""
    import torch
    import torch.nn.functional as F

    b, _, s, _ = x.shape

    def uniform(low=-1.0, high=1.0):
        return low + (high - low) * torch.rand(b, generator=gen)

    # 1. low-resolution round trip (generated images may be smaller than the training ones)
    if aug["lowres_prob"] > 0:
        pick = torch.rand(b, generator=gen) < aug["lowres_prob"]
        if pick.any():
            small = max(8, s // 2)
            lo = F.interpolate(x[pick], size=(small, small), mode="bilinear",
                               align_corners=False, antialias=True)
            x = x.clone()
            x[pick] = F.interpolate(lo, size=(s, s), mode="bilinear", align_corners=False)
    # 2. small zoom, shift and rotation (border pixels repeat at the edges)
    angle = uniform() * math.radians(aug["rotate"])
    zoom = 1.0 + uniform() * aug["scale"]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = uniform() * 2 * aug["shift"], uniform() * 2 * aug["shift"]
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # 3. contrast around the image mean, brightness, Gaussian noise of a random level
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (1.0 + uniform() * aug["contrast"]).view(b, 1, 1, 1)
    bright = (uniform() * aug["brightness"]).view(b, 1, 1, 1)
    x = (x - mean) * contrast + mean + bright
    level = (uniform(0.0, 1.0) * aug["noise"]).view(b, 1, 1, 1)
    x = x + level * torch.randn(x.shape, generator=gen)
    return x.clamp(0.0, 1.0)


# -------------------------------------------------------------------------------- training
class _TrainingImages:
    """Training images at the encoder's side, in RAM when they fit, grouped by pixel identity."""

    def __init__(self, data: CXRDataset, size: int):
        self.data, self.size = data, size
        self._cache: np.ndarray | None = None
        keep = len(data) * size * size * 4 <= _IN_MEMORY_LIMIT
        chunks, digests = [], []
        for _, imgs in progress(data.iter_images(size=size, batch_size=64),
                                desc="reading images", total=math.ceil(len(data) / 64),
                                unit="chunk"):
            imgs = imgs.astype(np.float32)
            digests.extend(hashlib.sha1(im.tobytes()).hexdigest() for im in imgs)
            if keep:
                chunks.append(imgs)
        if keep:
            self._cache = np.concatenate(chunks)
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(digests):
            groups.setdefault(d, []).append(i)
        self.groups = list(groups.values())

    def get(self, indices: Sequence[int]):
        import torch

        if self._cache is not None:
            arr = self._cache[list(indices)]
        else:
            arr = np.stack([self.data.load_image(i, size=self.size) for i in indices])
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).unsqueeze(1)


def _batch(groups: list[list[int]], batch_size: int, seed: int, step: int) -> list[int]:
    """Step ``step``'s batch: ``batch_size`` distinct groups (epochs are seeded permutations of
    the groups), one random member of each."""
    import torch

    n = len(groups)
    gen = torch.Generator().manual_seed(seed * _SEED_STRIDE + step)
    picked: list[int] = []
    pos = step * batch_size
    while len(picked) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(
            seed * _SEED_STRIDE + 7919 * (epoch + 1))).tolist()
        take = perm[offset:offset + min(batch_size - len(picked), n - offset)]
        picked.extend(t for t in take if t not in picked)
        pos += len(take)
    out = []
    for g in picked:
        members = groups[g]
        out.append(members[int(torch.randint(len(members), (1,), generator=gen))])
    return out


def _lr_factor(step: int, *, steps: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress_frac = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_frac)))


def _package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("diffmem", "torch", "open_clip_torch", "transformers", "tokenizers",
                 "safetensors", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r}; expected a positive integer")
    return int(value)


def _positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigError(f"{name}={value!r}; expected a positive number")
    return float(value)


def train_encoder(data: CXRDataset | str | os.PathLike, out: str | os.PathLike, *,
                  preset: str | os.PathLike | EncoderPreset = "demo", steps: int | None = None,
                  batch_size: int | None = None, lr: float | None = None, seed: int = 0,
                  image_size: int | None = None, split: str = "train",
                  device: str = "cpu") -> EncoderResult:
    """Train an in-domain open_clip encoder on a dataset's (image, prompt) pairs (CLIP, Radford
    et al., ICML 2021, plus a SimCLR image-image term, Chen et al., ICML 2020; see the module
    docstring for the deviation).

    Parameters
    ----------
    data : CXRDataset or path
        The dataset (a path is read with :func:`diffmem.data.load`); its ``split`` records
        are trained on.
    out : path
        The encoder folder to write (``encoder.safetensors``, ``encoder_config.json``,
        ``tokenizer/``). It must not lie inside the data; existing files of an earlier encoder
        there are replaced.
    preset : str, path or EncoderPreset, optional
        ``"demo"`` (default), ``"tiny"`` or a preset JSON path; see
        :func:`diffmem.embed.list_presets`.
    steps, batch_size, lr, image_size : optional
        Override the preset's values. ``batch_size`` is capped at the number of distinct
        training images.
    seed : int, optional
        Seeds the weights, the batch order and the augmentation.
    split : str, optional
        Which split to train on.
    device : str, optional
        ``"cpu"`` (default) or a torch device such as ``"cuda"``. Batches and augmentation are
        drawn on the CPU either way; results on different devices agree only up to
        floating-point differences.

    Returns
    -------
    EncoderResult
        With the trained encoder in ``.encoder``.

    Raises
    ------
    DataError
        When the split has fewer than two distinct images.
    ConfigError
        For a bad preset or override.
    OutputError
        When ``out`` lies inside the dataset.
    TrainingError
        When the loss becomes NaN or infinite.

    Examples
    --------
    >>> from diffmem.data.synth import synthesize
    >>> import tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> data = synthesize(pathlib.Path(tmp.name) / "data", preset="tiny", seed=0)
    >>> result = train_encoder(data, pathlib.Path(tmp.name) / "enc", preset="tiny", steps=3)
    >>> result.encoder.embed_texts(["No acute process."]).shape
    (1, 32)
    >>> tmp.cleanup()
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    from diffmem.data import load
    from diffmem.pipelines import train_tokenizer

    t_start = time.time()
    # 1. check inputs
    p = load_preset(preset)
    tr = dict(p.training)
    steps = _positive_int("steps", tr["steps"] if steps is None else steps)
    batch_size = _positive_int("batch_size", tr["batch_size"] if batch_size is None else batch_size)
    lr = _positive_float("lr", tr["lr"] if lr is None else lr)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r}; expected an integer >= 0")
    seed = int(seed)
    size = p.image_size if image_size is None else _positive_int("image_size", image_size)
    check_patch_size(p.model["vision_cfg"], size, where=f"image_size={size} with preset {p.name!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but torch sees no CUDA GPU; use device='cpu'")
    dataset = data if isinstance(data, CXRDataset) else load(data)
    out = prepare_out_dir(out, inputs=[dataset.root])
    train_set = dataset.subset(split=split)
    if len(train_set) == 0:
        raise DataError(f"no {split!r} records to train the encoder on (splits present: "
                        f"{dict(dataset.split_counts())})", path=dataset.root)

    # 2. tokenizer and model
    tokenizer = train_tokenizer(train_set.prompts, vocab_size=p.tokenizer["vocab_size"],
                                model_max_length=p.tokenizer["model_max_length"])
    cfg = open_clip_config(p, tokenizer=tokenizer, image_size=size)
    model = _build_model(cfg, seed=seed).to(device)
    n_params = sum(t.numel() for t in model.parameters())
    texts = _tokenize(tokenizer, train_set.prompts)
    lengths = [len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(train_set.prompts)]
    n_long = sum(n > texts.shape[1] for n in lengths)
    if n_long:
        log.info("%d of %d prompts are longer than the context length %d and are truncated",
                 n_long, len(lengths), texts.shape[1])

    # 3. images, grouped so that a batch never holds two pixel-identical images
    images = _TrainingImages(train_set, size)
    if len(images.groups) < 2:
        raise DataError(f"the {split!r} split has {len(images.groups)} distinct image(s); "
                        "contrastive training needs at least 2", path=dataset.root)
    if batch_size > len(images.groups):
        log.info("batch_size=%d exceeds the %d distinct training images; using %d", batch_size,
                 len(images.groups), len(images.groups))
        batch_size = len(images.groups)
    log.info("training a %.2fM-parameter in-domain encoder (preset %r, %d px, %d-d) on %d "
             "records (%d distinct images) for %d steps of batch %d", n_params / 1e6, p.name,
             size, cfg["embed_dim"], len(train_set), len(images.groups), steps, batch_size)

    # 4. optimizer: AdamW, no weight decay on gains, biases and the logit scale; warm-up + cosine
    decay = [t for t in model.parameters() if t.ndim >= 2]
    no_decay = [t for t in model.parameters() if t.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(tr["weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    clip_loss = open_clip.ClipLoss()
    w_text, w_image = float(tr["text_loss_weight"]), float(tr["image_loss_weight"])
    warmup = int(tr["warmup_steps"])
    grad_clip = float(tr["grad_clip"])

    # 5. training loop
    losses: list[float] = []
    model.train()
    bar = progress_bar(total=steps, desc="training encoder", unit="step")
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(step, steps=steps, warmup=warmup)
            idx = _batch(images.groups, batch_size, seed, step)
            gen = torch.Generator().manual_seed((seed * _SEED_STRIDE + step) * 4 + 1)
            x = images.get(idx)
            view_a = _prepare_images(_augment(x, p.augment, gen), size).to(device)
            view_b = _prepare_images(_augment(x, p.augment, gen), size).to(device)
            scale = model.logit_scale.exp()
            feats = model.encode_image(torch.cat([view_a, view_b]), normalize=True)
            feat_a, feat_b = feats[:len(idx)], feats[len(idx):]
            loss = w_image * clip_loss(feat_a, feat_b, scale) if w_image else 0.0
            if w_text:
                rows = texts[idx]
                first = _first_occurrences(rows)
                if len(first) >= 2:
                    text_feats = model.encode_text(rows[first].to(device), normalize=True)
                    loss = loss + w_text * clip_loss(feat_a[first], text_feats, scale)
            if not isinstance(loss, torch.Tensor):
                raise ConfigError("text_loss_weight and image_loss_weight are both 0; nothing "
                                  "to train")
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"the encoder loss became {value} at step {step}; lower the "
                                    f"learning rate (lr={lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, _LOGIT_SCALE_MAX)
            losses.append(value)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    model.eval()

    # 6. save: safetensors weights, JSON config, tokenizer folder
    k = min(10, steps)
    initial, final = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    wall = time.time() - t_start
    save_file({name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()},
              str(out / WEIGHTS_NAME))
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "description": "In-domain open_clip image-report encoder trained from scratch by "
                       "diffmem.embed.train_encoder; embeddings are L2-normalized.",
        "embed_dim": int(cfg["embed_dim"]),
        "image_size": size,
        "input": {"range": [0.0, 1.0], "channels": "grayscale repeated to 3 channels",
                  "mean": INPUT_MEAN, "std": INPUT_STD,
                  "resize": "centre crop to square, bilinear resize (antialiased when shrinking)"},
        "open_clip_model_cfg": cfg,
        "text_pooling": "eos: output at the [EOS] token (causal mask; padding does not matter)",
        "weights": WEIGHTS_NAME,
        "tokenizer": TOKENIZER_DIR,
        "preset": p.to_dict(),
        "data": {"root": str(dataset.root), "format": dataset.format, "split": split,
                 "fingerprint": train_set.fingerprint(), "records": len(train_set),
                 "distinct_images": len(images.groups),
                 "distinct_prompts": len(set(train_set.prompts))},
        "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                     "weight_decay": tr["weight_decay"], "warmup_steps": warmup,
                     "grad_clip": grad_clip, "text_loss_weight": w_text,
                     "image_loss_weight": w_image, "augment": dict(p.augment),
                     "initial_loss": initial, "final_loss": final,
                     "loss_every_10_steps": [round(float(np.mean(losses[i:i + 10])), 4)
                                             for i in range(0, steps, 10)],
                     "wall_seconds": round(wall, 1), "parameters": n_params,
                     "device": str(device)},
        "versions": _package_versions(),
    }
    write_json(out / CONFIG_NAME, config)
    log.info("encoder trained in %.0f s: loss %.3f -> %.3f; saved to %s", wall, initial, final,
             out)
    encoder = InDomainEncoder(model, tokenizer, config, path=str(out))
    return EncoderResult(out=str(out), steps=steps, initial_loss=initial, final_loss=final,
                         losses=losses, wall_seconds=wall, embed_dim=encoder.dim,
                         image_size=size, encoder=encoder)


def _first_occurrences(rows) -> list[int]:
    """Positions of the first row of each distinct token sequence in a (B, L) tensor."""
    seen: set[bytes] = set()
    keep = []
    for i, row in enumerate(rows.numpy()):
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def embed_dataset(encoder: InDomainEncoder | str | os.PathLike,
                  data: CXRDataset | str | os.PathLike, *,
                  split: str | Sequence[str] | None = None, batch_size: int = 128) -> np.ndarray:
    """Embeddings of every image of a dataset (or of some splits), streamed in batches.

    Parameters
    ----------
    encoder : InDomainEncoder or path
        An encoder, or its folder (read with :func:`load_encoder`).
    data : CXRDataset or path
    split : str or sequence of str, optional
        Only these splits (default: all records, in dataset order).
    batch_size : int, optional

    Returns
    -------
    ndarray, shape (N, encoder.dim), float32
        Row ``i`` belongs to record ``i`` of ``data.subset(split=split)``.
    """
    from diffmem.data import load

    if not isinstance(encoder, InDomainEncoder):
        encoder = load_encoder(encoder)
    dataset = data if isinstance(data, CXRDataset) else load(data)
    records = dataset.subset(split=split) if split is not None else dataset
    batch_size = _positive_int("batch_size", batch_size)
    out = np.zeros((len(records), encoder.dim), dtype=np.float32)
    for idx, imgs in progress(records.iter_images(size=encoder.image_size, batch_size=batch_size),
                              desc="embedding images", total=math.ceil(len(records) / batch_size),
                              unit="batch"):
        out[idx[0]:idx[-1] + 1] = encoder.embed_images(imgs.astype(np.float32),
                                                       batch_size=batch_size)
    return out

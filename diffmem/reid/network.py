"""The patient-verification network: a siamese image encoder whose cosine similarity answers
"same patient?" (Packhäuser et al., Sci. Rep. 2022), and its folder on disk.

Both images of a pair go through one shared backbone (the siamese twin) and an L2-normalized
linear embedding; the verification score of two images is the cosine of their embeddings.
Packhäuser et al. merge the twin features with ``|f1 - f2|`` and a learned classifier head
trained with binary cross-entropy; we score with the plain cosine instead (a deviation): it
makes "the most similar training patient" a nearest-neighbour search over embeddings, and lets
one generation be compared with every training study without running a head per pair.

A folder written by :func:`diffmem.reid.train_reid` holds ``reid.safetensors`` (weights,
batch-norm running statistics included), ``reid_config.json`` (the backbone config, the input
convention, the training data's fingerprint, the validation metrics) and ``README.md`` (the
model card).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import ConfigError, ModelError
from diffmem.reid.presets import check_backbone
from diffmem.utils import weights_fingerprint

log = logging.getLogger(__name__)

CONFIG_NAME = "reid_config.json"
WEIGHTS_NAME = "reid.safetensors"
CARD_NAME = "README.md"
FORMAT = "diffmem-reid-model"
FORMAT_VERSION = 1


def build_network(backbone: Mapping[str, Any], *, embed_dim: int, seed: int = 0):
    """A siamese twin: backbone + linear embedding, weights drawn under a private seeded RNG.

    Parameters
    ----------
    backbone : mapping
        ``{"arch": "small_resnet", "widths", "blocks", "stem_stride"}`` or
        ``{"arch": "torchvision", "name"}`` (see :mod:`diffmem.reid.presets`).
    embed_dim : int
        Output dimension (the forward pass returns unnormalized embeddings).
    seed : int, optional

    Returns
    -------
    torch.nn.Module
        Takes ``(N, 3, S, S)`` normalized images (grayscale repeated), returns ``(N, embed_dim)``.

    Examples
    --------
    >>> import torch
    >>> net = build_network({"arch": "small_resnet", "widths": [4, 8], "blocks": [1, 1],
    ...                      "stem_stride": 1}, embed_dim=6)
    >>> net(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 6])
    """
    import torch

    check_backbone(backbone, where="backbone")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if backbone["arch"] == "torchvision":
            return _torchvision_net(str(backbone["name"]), int(embed_dim))
        return _small_resnet(list(backbone["widths"]), list(backbone["blocks"]),
                             int(backbone["stem_stride"]), int(embed_dim))


def _small_resnet(widths: list[int], blocks: list[int], stem_stride: int, embed_dim: int):
    """A narrow ResNet made of torchvision's ``BasicBlock`` (He et al., CVPR 2016)."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock, conv1x1

    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1,
                                         bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    inplanes = widths[0]
    for stage, (width, n) in enumerate(zip(widths, blocks)):
        stride = 1 if stage == 0 else 2
        for b in range(n):
            down = None
            if b == 0 and (stride != 1 or inplanes != width):
                down = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
            layers.append(BasicBlock(inplanes, width, stride if b == 0 else 1, down))
            inplanes = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, embed_dim)]
    return nn.Sequential(*layers)


def _torchvision_net(name: str, embed_dim: int):
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, num_classes=embed_dim)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"torchvision cannot build model {name!r} with num_classes="
                          f"{embed_dim}: {e}; use a classification model such as 'resnet18'"
                          ) from e


class PatientVerifier:
    """A trained re-ID network: embeds grayscale images so that studies of one patient are
    close (cosine similarity near 1) and different patients are not.

    Build it with :func:`load_reid_model` (or take ``train_reid(...).model``). Calling it
    embeds images, like the in-domain encoder, so it fits the detector's ``embedding``
    similarity backend too.

    Attributes
    ----------
    config : dict
        The folder's ``reid_config.json``.
    dim, image_size : int
    path : str or None
    """

    def __init__(self, network, config: Mapping[str, Any], *, path: str | None = None):
        self.network = network.eval()
        self.config = dict(config)
        self.dim = int(self.config["embed_dim"])
        self.image_size = int(self.config["image_size"])
        self.path = path
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"PatientVerifier(dim={self.dim}, image_size={self.image_size}, path={self.path!r})"

    def fingerprint(self) -> str:
        """A short hash of the weights and the backbone config (same after save and load)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.config["backbone"], self.network)
        return self._fingerprint

    @property
    def device(self):
        return next(self.network.parameters()).device

    def to(self, device) -> PatientVerifier:
        """Move the network to ``device``; returns ``self``."""
        self.network.to(device)
        return self

    def embed_images(self, images: np.ndarray, *, batch_size: int = 128) -> np.ndarray:
        """L2-normalized patient embeddings of grayscale images.

        Parameters
        ----------
        images : ndarray, shape (N, H, W)
            Float in [0, 1]. Images of another side than :attr:`image_size` are centre-cropped
            and resized to it, and the conversion is logged (a model trained at 64 px sees a
            32 px generation upsampled, which costs accuracy).
        batch_size : int, optional

        Returns
        -------
        ndarray, shape (N, dim), float32
        """
        import torch

        from diffmem.embed.model import _check_images, _prepare_images

        arr = _check_images(images)
        if len(arr) and arr.shape[1:] != (self.image_size, self.image_size):
            log.info("re-ID model %s expects %d x %d px images; converting %d image(s) of %d x "
                     "%d px (centre crop to square, bilinear resize)", self.path or "(in memory)",
                     self.image_size, self.image_size, len(arr), arr.shape[1], arr.shape[2])
        out = np.zeros((len(arr), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(arr), int(batch_size)):
                x = _prepare_images(arr[start:start + batch_size], self.image_size)
                feats = torch.nn.functional.normalize(self.network(x.to(self.device)), dim=1)
                out[start:start + len(x)] = feats.float().cpu().numpy()
        return out

    __call__ = embed_images


def model_config(backbone: Mapping[str, Any], *, embed_dim: int, image_size: int,
                 **extra: Any) -> dict[str, Any]:
    """The head of ``reid_config.json``: what :func:`load_reid_model` needs, plus ``extra``."""
    from diffmem.embed.model import INPUT_MEAN, INPUT_STD

    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "description": "Patient-verification network (siamese, cosine of L2-normalized "
                           "embeddings) trained by diffmem.reid.train_reid",
            "backbone": json.loads(json.dumps(dict(backbone))), "embed_dim": int(embed_dim),
            "image_size": int(image_size),
            "input": {"range": [0.0, 1.0], "channels": "grayscale repeated to 3 channels",
                      "mean": INPUT_MEAN, "std": INPUT_STD,
                      "resize": "centre crop to square, bilinear resize (antialiased when "
                                "shrinking)"},
            "weights": WEIGHTS_NAME, **extra}


def save_reid_model(model: PatientVerifier, out: str | os.PathLike, card: str) -> None:
    """Write ``reid.safetensors``, ``reid_config.json`` and the model card into ``out``."""
    from safetensors.torch import save_file

    from diffmem.utils import write_json

    out = Path(out)
    save_file({k: t.detach().contiguous().cpu() for k, t in model.network.state_dict().items()},
              str(out / WEIGHTS_NAME))
    write_json(out / CONFIG_NAME, model.config)
    (out / CARD_NAME).write_text(card, encoding="utf-8")


def load_reid_model(path: str | os.PathLike | None = None, *,
                    device: str = "cpu") -> PatientVerifier:
    """Load a re-ID model folder written by :func:`diffmem.reid.train_reid`.

    Parameters
    ----------
    path : path, optional
        The folder; ``None`` loads the embedded default (:func:`diffmem.reid.default_reid_dir`).
    device : str, optional

    Returns
    -------
    PatientVerifier

    Raises
    ------
    ModelError
        When the folder does not exist, is not a re-ID model folder, misses its weights, or the
        weights do not fit the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path is None:
        from diffmem.reid import default_reid_dir

        path = default_reid_dir()
    folder = Path(path)
    hint = "train one with `diffmem reid train --data DATA --out DIR` (diffmem.reid.train_reid)"
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelError(f"{str(folder)!r} is not a re-ID model folder (no {CONFIG_NAME}); "
                         f"pass the --out folder of `diffmem reid train`, or {hint}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {str(cfg_path)!r}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelError(f"{str(cfg_path)!r} is not a re-ID model config (expected format "
                         f"{FORMAT!r}); {hint}")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(f"{str(cfg_path)!r} has format_version {config.get('format_version')}, "
                         f"newer than this diffmem reads ({FORMAT_VERSION}); upgrade diffmem")
    absent = [k for k in ("backbone", "embed_dim", "image_size") if k not in config]
    if absent or not (folder / WEIGHTS_NAME).is_file():
        raise ModelError(f"re-ID model folder {str(folder)!r} is incomplete (missing "
                         f"{absent or WEIGHTS_NAME}); copy it again or {hint}")
    try:
        network = build_network(config["backbone"], embed_dim=int(config["embed_dim"]))
    except ConfigError as e:
        raise ModelError(f"{str(cfg_path)!r}: {e}") from e
    try:
        network.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelError(f"the weights in {str(folder / WEIGHTS_NAME)!r} do not load into the "
                         f"network of {CONFIG_NAME}: {str(e).splitlines()[0]}") from e
    network.to(device)
    return PatientVerifier(network, config, path=str(folder))

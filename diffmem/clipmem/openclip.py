"""A user's own open_clip image-text model as a CLIPMem encoder (open_clip: Cherti et al., CVPR
2023), and the one resolver from a path to an encoder.

An open_clip model is given either as

* a folder in open_clip's own export layout (``open_clip_config.json`` holding ``model_cfg`` and
  ``preprocess_cfg``, plus ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``),
  read with ``open_clip.create_model("local-dir:FOLDER")``; or
* a built-in architecture name (``open_clip.list_models()``) plus a checkpoint file
  (``.safetensors``, or a ``.pt`` written by open_clip's trainer), read with
  ``open_clip.create_model(NAME, pretrained=FILE)``.

Either way open_clip loads the weights with ``torch.load(weights_only=True)`` or safetensors;
nothing is downloaded (a name without a checkpoint file is refused: random weights would measure
nothing). Grayscale radiographs are repeated to three channels and normalized with the model's
own mean and std.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import check_int
from diffmem.errors import ModelError, PromptError

__all__ = ["OpenClipEncoder", "as_pair_encoder", "load_open_clip"]

CONFIG_NAME = "open_clip_config.json"
#: Weight file names open_clip looks for in a local-dir folder.
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


class OpenClipEncoder:
    """An open_clip model (any tower types) behind the :class:`~diffmem.clipmem.PairEncoder`
    interface: ``embed_images`` of grayscale [0, 1] images and ``embed_texts`` of reports.

    Attributes
    ----------
    image_size : int
    mean, std : tuple of float
        The model's per-channel input normalization.
    path : str or None
    """

    def __init__(self, model, tokenizer, *, image_size: int, mean: Sequence[float],
                 std: Sequence[float], path: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.path = path

    def __repr__(self) -> str:
        return f"OpenClipEncoder(image_size={self.image_size}, path={self.path!r})"

    def embed_images(self, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Unit-norm image embeddings (N, D) of grayscale images (N, H, W) in [0, 1]."""
        import torch

        from diffmem.embed.model import _check_images, _prepare_images

        arr = _check_images(images)
        batch_size = check_int("batch_size", batch_size)
        out = []
        with torch.inference_mode():
            for start in range(0, len(arr), batch_size):
                x = _prepare_images(arr[start:start + batch_size], self.image_size,
                                    mean=self.mean, std=self.std)
                out.append(self.model.encode_image(x, normalize=True).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
        """Unit-norm text embeddings (N, D) with the model's own tokenizer."""
        import torch

        if isinstance(prompts, str):
            raise PromptError("prompts must be a list of strings, got one string; wrap it in a "
                              "list: embed_texts([prompt])")
        prompts = list(prompts)
        with torch.inference_mode():
            return self.model.encode_text(self.tokenizer(prompts), normalize=True).float().numpy()


def load_open_clip(model: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                   device: str = "cpu") -> OpenClipEncoder:
    """Read a user's open_clip model: an export folder, or a built-in name plus a checkpoint.

    Parameters
    ----------
    model : str or path
        A folder holding ``open_clip_config.json`` and weights, or an ``open_clip.list_models()``
        name (then ``checkpoint`` is required).
    checkpoint : path, optional
        The weights for a named architecture (``.safetensors``, ``.pt``, ``.bin``).
    device : str, optional

    Returns
    -------
    OpenClipEncoder

    Raises
    ------
    ModelError
        For a folder without config or weights, an unknown name, a missing checkpoint, or
        weights that do not fit the architecture.
    """
    import open_clip

    folder = Path(model)
    try:
        if folder.is_dir():
            if not (folder / CONFIG_NAME).is_file():
                raise ModelError(f"{str(folder)!r} has no {CONFIG_NAME}; pass an open_clip export "
                                 "folder (open_clip_config.json + open_clip_model.safetensors), "
                                 "a diffmem encoder folder, or an architecture name with "
                                 "--open-clip-model and a checkpoint file")
            if not any((folder / n).is_file() for n in WEIGHT_NAMES):
                raise ModelError(f"{str(folder)!r} has {CONFIG_NAME} but no weights (one of "
                                 f"{', '.join(WEIGHT_NAMES)}); copy the weights next to it")
            net = open_clip.create_model(f"local-dir:{folder}", device=device)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
            path = str(folder)
        else:
            name = str(model)
            if name not in open_clip.list_models():
                raise ModelError(f"open_clip model {name!r} is neither a folder nor a built-in "
                                 "architecture; see open_clip.list_models() (e.g. 'RN50', "
                                 "'ViT-B-32')")
            if checkpoint is None or not Path(checkpoint).is_file():
                raise ModelError(f"open_clip architecture {name!r} needs its trained weights: "
                                 f"checkpoint={None if checkpoint is None else str(checkpoint)!r}"
                                 " is not a file (nothing is downloaded)")
            net = open_clip.create_model(name, pretrained=str(checkpoint), device=device)
            tokenizer = open_clip.get_tokenizer(name)
            path = str(checkpoint)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"open_clip cannot load {str(model)!r}"
                         f"{'' if checkpoint is None else f' with {str(checkpoint)!r}'}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    cfg = open_clip.get_model_preprocess_cfg(net)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return OpenClipEncoder(net, tokenizer, image_size=int(size),
                           mean=cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
                           std=cfg.get("std", open_clip.OPENAI_DATASET_STD), path=path)


def as_pair_encoder(value: Any, *, open_clip_model: str | None = None) -> Any:
    """An encoder object as given, or read from a path: a diffmem encoder folder
    (:func:`diffmem.embed.load_encoder`), an open_clip export folder, or - with
    ``open_clip_model`` - a checkpoint file of that open_clip architecture."""
    if not isinstance(value, (str, os.PathLike)):
        return value
    from diffmem.embed import load_encoder
    from diffmem.embed.model import CONFIG_NAME as DIFFMEM_CONFIG

    path = Path(value)
    if open_clip_model is not None:
        return load_open_clip(open_clip_model, checkpoint=path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return load_open_clip(path)
    if path.is_dir() and not (path / DIFFMEM_CONFIG).is_file():
        raise ModelError(f"{str(path)!r} is neither a diffmem encoder folder ({DIFFMEM_CONFIG}) "
                         f"nor an open_clip export folder ({CONFIG_NAME}); for a bare open_clip "
                         "checkpoint file also pass --open-clip-model NAME")
    return load_encoder(path)

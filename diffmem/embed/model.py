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

Training lives apart, in :mod:`diffmem.embed.training` (:func:`~diffmem.embed.train_encoder`),
as in open_clip's library/trainer split.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.checks import as_dataset, check_int
from diffmem.data import CXRDataset
from diffmem.embed.presets import EncoderPreset, check_patch_size, load_preset
from diffmem.errors import ConfigError, DataError, ModelError, PromptError
from diffmem.utils import progress, weights_fingerprint

log = logging.getLogger(__name__)

CONFIG_NAME = "encoder_config.json"
WEIGHTS_NAME = "encoder.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "diffmem-in-domain-encoder"
FORMAT_VERSION = 1
#: Grayscale in [0, 1] is mapped to ``(x - MEAN) / STD`` before the vision tower.
INPUT_MEAN, INPUT_STD = 0.5, 0.25


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
    size = p.image_size if image_size is None else check_int("image_size", image_size)
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


def _prepare_images(images, size: int, *, mean=INPUT_MEAN, std=INPUT_STD):
    """(N, H, W) or (N, 1, H, W) float in [0, 1] -> normalized (N, 3, size, size) tensor.

    Non-square images are centre-cropped to a square first (as :func:`diffmem.data.read_image`
    does); other sides are resized (area-like antialiased bilinear when shrinking). ``mean`` and
    ``std`` are one number (our encoders) or one per RGB channel (an open_clip model trained on
    colour images, which sees the gray value in all three channels).
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
    if np.ndim(mean) == 0 and np.ndim(std) == 0:
        return ((x - mean) / std).expand(-1, 3, -1, -1)
    x = x.expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)


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
        batch_size = check_int("batch_size", batch_size)
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
        batch_size = check_int("batch_size", batch_size)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size].to(self.device)
                out[start:start + len(chunk)] = \
                    encode_tokens(self.model, chunk).float().cpu().numpy()
        return out


def encode_tokens(model, ids, *, normalize: bool = True, groups: int = 4):
    """open_clip ``CLIP.encode_text`` of token rows (B, L), each computed only up to its
    ``[EOS]``: the same embeddings, and the same gradients, for less work.

    Rows are padded to the context length (96 for the ``demo`` preset), while most radiology
    impressions fill a fraction of it (on the demo data 17 tokens on average, the longest 92).
    With our text tower (causal mask, ``[EOS]`` pooling; see the module docstring) no position
    after a row's ``[EOS]`` reaches its embedding. So the rows are sorted by where their
    ``[EOS]`` sits, split into ``groups`` runs of about equal size, and each run is encoded cut
    to its longest row (positional embedding and causal mask cut to match); the embeddings are
    put back in the input order. Rows never interact in the text tower, so this changes only
    the floating-point rounding. A model of another kind (no causal mask, other pooling) or
    rows without ``[EOS]`` go through ``model.encode_text`` unchanged.

    Examples
    --------
    >>> import torch
    >>> from diffmem.pipelines import train_tokenizer
    >>> prompts = ["No acute process.", "Small left effusion, unchanged since the prior study."]
    >>> tok = train_tokenizer(prompts * 3, vocab_size=100, model_max_length=32)
    >>> model = _build_model(open_clip_config("tiny", tokenizer=tok), seed=0).eval()
    >>> ids = _tokenize(tok, prompts)
    >>> with torch.no_grad():
    ...     full, cut = model.encode_text(ids, normalize=True), encode_tokens(model, ids)
    >>> bool(torch.allclose(full, cut, atol=1e-6))
    True
    """
    import torch

    eos = getattr(model, "text_eos_id", None)
    is_eos = ids == eos
    if (getattr(model, "text_pool_type", None) != "eos" or eos is None
            or getattr(model, "attn_mask", None) is None or ids.shape[0] == 0
            or not bool(is_eos.any(dim=1).all())):
        return model.encode_text(ids, normalize=normalize)
    ends = is_eos.int().argmax(dim=1) + 1
    order = torch.argsort(ends, stable=True)
    parts = [_encode_cut(model, ids[run], int(ends[run].max()), normalize=normalize)
             for run in order.tensor_split(min(int(groups), len(order)))]
    return torch.cat(parts)[torch.argsort(order)]


def _encode_cut(model, ids, n: int, *, normalize: bool):
    """``CLIP.encode_text`` of the first ``n`` columns of ``ids`` (every row's [EOS] in them)."""
    import torch
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool

    ids = ids[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, ids, "eos", eos_token_id=model.text_eos_id)
    if model.text_projection is not None:
        x = (model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear)
             else x @ model.text_projection)
    return F.normalize(x, dim=-1) if normalize else x


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
    """Load an encoder folder written by :func:`~diffmem.embed.train_encoder`.

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
    if not isinstance(encoder, InDomainEncoder):
        encoder = load_encoder(encoder)
    dataset = as_dataset(data)
    records = dataset.subset(split=split) if split is not None else dataset
    batch_size = check_int("batch_size", batch_size)
    out = np.zeros((len(records), encoder.dim), dtype=np.float32)
    for idx, imgs in progress(records.iter_images(size=encoder.image_size, batch_size=batch_size),
                              desc="embedding images", total=math.ceil(len(records) / batch_size),
                              unit="batch"):
        out[idx[0]:idx[-1] + 1] = encoder.embed_images(imgs.astype(np.float32),
                                                       batch_size=batch_size)
    return out

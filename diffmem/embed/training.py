"""Training of the in-domain image-report encoder (:func:`train_encoder`); the model, its
folder format and loading live in :mod:`diffmem.embed.model`.

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
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from diffmem.checks import as_dataset, check_int, check_positive, package_versions
from diffmem.data import CXRDataset
from diffmem.embed.model import (CONFIG_NAME, FORMAT, FORMAT_VERSION, INPUT_MEAN, INPUT_STD,
                                 TOKENIZER_DIR, WEIGHTS_NAME, InDomainEncoder, _build_model,
                                 _prepare_images, _tokenize, encode_tokens, open_clip_config)
from diffmem.embed.presets import EncoderPreset, check_patch_size, load_preset
from diffmem.errors import ConfigError, DataError, TrainingError
from diffmem.utils import prepare_out_dir, progress, progress_bar, write_json

log = logging.getLogger(__name__)

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


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class CaptionAugment:
    """Text-side augmentation of a report during training (a CLIPMem mitigation, Wang et al.,
    ICLR 2025, Sec. 6: caption augmentation): its sentences are shuffled and each is dropped
    with probability ``drop`` (at least one is kept). Reports are split after ``.``, ``!``
    or ``?`` followed by white space.

    Examples
    --------
    >>> aug = CaptionAugment(shuffle=True, drop=0.0)
    >>> out = aug.apply("A. B. C.", np.random.default_rng(0))
    >>> sorted(out.split(" ")), out != "A. B. C."
    (['A.', 'B.', 'C.'], True)
    >>> CaptionAugment(shuffle=False, drop=0.99).apply("A. B.", np.random.default_rng(0))
    'A.'
    """

    shuffle: bool = True
    drop: float = 0.3

    def __post_init__(self):
        if not 0.0 <= float(self.drop) < 1.0:
            raise ConfigError(f"caption augmentation drop={self.drop!r}; use a probability in "
                              "[0, 1)")

    @staticmethod
    def sentences(text: str) -> list[str]:
        """The sentences of a report as :meth:`apply` splits it."""
        return [p for p in _SENTENCE_END.split(text.strip()) if p]

    def apply(self, text: str, rng: np.random.Generator) -> str:
        """One augmented copy of ``text``, drawn from ``rng``."""
        parts = self.sentences(text)
        if len(parts) < 2:
            return text
        keep = [p for p in parts if rng.random() >= self.drop]
        if not keep:
            keep = [parts[int(rng.integers(len(parts)))]]
        if self.shuffle:
            keep = [keep[i] for i in rng.permutation(len(keep))]
        return " ".join(keep)

    def to_dict(self) -> dict[str, Any]:
        return {"shuffle": bool(self.shuffle), "drop": float(self.drop)}


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


class _Texts:
    """The training reports as token rows (B, L); with a caption augmentation the batch's
    reports are re-drawn and tokenized at every step (seeded by the training seed and step)."""

    def __init__(self, tokenizer, prompts: Sequence[str], tokens, *,
                 augment: CaptionAugment | None, seed: int):
        self.tokenizer, self.prompts, self.tokens = tokenizer, list(prompts), tokens
        self.augment, self.seed = augment, seed

    def batch(self, idx: Sequence[int], step: int):
        if self.augment is None:
            return self.tokens[idx]
        rng = np.random.default_rng([self.seed, step, 0xCA9])
        return _tokenize(self.tokenizer, [self.augment.apply(self.prompts[i], rng) for i in idx])


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


#: The packages an encoder's config records (``versions``).
_VERSIONED = ("diffmem", "torch", "open_clip_torch", "transformers", "tokenizers", "safetensors",
              "numpy")


@dataclass
class _Settings:
    """The checked training settings: the preset's values with the call's overrides."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    size: int
    device: Any
    training: dict[str, Any]
    caption_augment: CaptionAugment | None = None
    text_noise: float = 0.0

    @property
    def warmup(self) -> int:
        return int(self.training["warmup_steps"])

    @property
    def grad_clip(self) -> float:
        return float(self.training["grad_clip"])

    @property
    def weights(self) -> tuple[float, float]:
        """(text_loss_weight, image_loss_weight)."""
        return float(self.training["text_loss_weight"]), float(self.training["image_loss_weight"])


def _settings(p: EncoderPreset, *, steps: Any, batch_size: Any, lr: Any, seed: Any,
              image_size: Any, device: Any) -> _Settings:
    """Check the overrides of preset ``p``; ConfigError names the bad one."""
    import torch

    tr = dict(p.training)
    steps = check_int("steps", tr["steps"] if steps is None else steps)
    batch_size = check_int("batch_size", tr["batch_size"] if batch_size is None else batch_size)
    lr = check_positive("lr", tr["lr"] if lr is None else lr)
    seed = check_int("seed", seed, low=0)
    size = p.image_size if image_size is None else check_int("image_size", image_size)
    check_patch_size(p.model["vision_cfg"], size, where=f"image_size={size} with preset {p.name!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but torch sees no CUDA GPU; use device='cpu'")
    return _Settings(steps=steps, batch_size=batch_size, lr=lr, seed=seed, size=size,
                     device=device, training=tr)


def _optimize(model, images: _TrainingImages, texts: _Texts, augment: Mapping[str, float],
              s: _Settings) -> list[float]:
    """Steps 4 and 5 of :func:`train_encoder`: AdamW (no weight decay on gains, biases and the
    logit scale), warm-up + cosine schedule, the two contrastive losses; the loss of each step."""
    import open_clip
    import torch

    decay = [t for t in model.parameters() if t.ndim >= 2]
    no_decay = [t for t in model.parameters() if t.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(s.training["weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr)
    clip_loss = open_clip.ClipLoss()
    w_text, w_image = s.weights
    losses: list[float] = []
    model.train()
    bar = progress_bar(total=s.steps, desc="training encoder", unit="step")
    try:
        for step in range(s.steps):
            for group in opt.param_groups:
                group["lr"] = s.lr * _lr_factor(step, steps=s.steps, warmup=s.warmup)
            idx = _batch(images.groups, s.batch_size, s.seed, step)
            gen = torch.Generator().manual_seed((s.seed * _SEED_STRIDE + step) * 4 + 1)
            x = images.get(idx)
            view_a = _prepare_images(_augment(x, augment, gen), s.size).to(s.device)
            view_b = _prepare_images(_augment(x, augment, gen), s.size).to(s.device)
            scale = model.logit_scale.exp()
            feats = model.encode_image(torch.cat([view_a, view_b]), normalize=True)
            feat_a, feat_b = feats[:len(idx)], feats[len(idx):]
            loss = w_image * clip_loss(feat_a, feat_b, scale) if w_image else 0.0
            if w_text:
                rows = texts.batch(idx, step)
                first = _first_occurrences(rows)
                if len(first) >= 2:
                    text_feats = encode_tokens(model, rows[first].to(s.device))
                    if s.text_noise > 0:
                        text_feats = _noisy(text_feats, s.text_noise, gen)
                    loss = loss + w_text * clip_loss(feat_a[first], text_feats, scale)
            if not isinstance(loss, torch.Tensor):
                raise ConfigError("text_loss_weight and image_loss_weight are both 0; nothing "
                                  "to train")
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"the encoder loss became {value} at step {step}; lower the "
                                    f"learning rate (lr={s.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, _LOGIT_SCALE_MAX)
            losses.append(value)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    model.eval()
    return losses


def _noisy(feats, level: float, gen):
    """Unit-norm text embeddings plus Gaussian noise of expected norm about ``level`` (per
    coordinate std ``level / sqrt(D)``), renormalized: the CLIPMem mitigation "noise on text
    embeddings during training" (Wang et al., ICLR 2025, Sec. 6)."""
    import torch

    noise = torch.randn(feats.shape, generator=gen).to(feats.device)
    return torch.nn.functional.normalize(feats + noise * (level / math.sqrt(feats.shape[1])),
                                         dim=-1)


def _encoder_config(cfg: Mapping[str, Any], p: EncoderPreset, s: _Settings,
                    data: Mapping[str, Any], losses: list[float], *, wall: float,
                    n_params: int) -> dict[str, Any]:
    """The ``encoder_config.json`` of a trained encoder (``data`` describes its training data)."""
    k = min(10, s.steps)
    w_text, w_image = s.weights
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "description": "In-domain open_clip image-report encoder trained from scratch by "
                       "diffmem.embed.train_encoder; embeddings are L2-normalized.",
        "embed_dim": int(cfg["embed_dim"]),
        "image_size": s.size,
        "input": {"range": [0.0, 1.0], "channels": "grayscale repeated to 3 channels",
                  "mean": INPUT_MEAN, "std": INPUT_STD,
                  "resize": "centre crop to square, bilinear resize (antialiased when shrinking)"},
        "open_clip_model_cfg": cfg,
        "text_pooling": "eos: output at the [EOS] token (causal mask; padding does not matter)",
        "weights": WEIGHTS_NAME,
        "tokenizer": TOKENIZER_DIR,
        "preset": p.to_dict(),
        "data": dict(data),
        "training": {"steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "seed": s.seed,
                     "weight_decay": s.training["weight_decay"], "warmup_steps": s.warmup,
                     "grad_clip": s.grad_clip, "text_loss_weight": w_text,
                     "image_loss_weight": w_image, "augment": dict(p.augment),
                     "caption_augment": (None if s.caption_augment is None
                                         else s.caption_augment.to_dict()),
                     "text_noise": s.text_noise,
                     "initial_loss": float(np.mean(losses[:k])),
                     "final_loss": float(np.mean(losses[-k:])),
                     "loss_every_10_steps": [round(float(np.mean(losses[i:i + 10])), 4)
                                             for i in range(0, s.steps, 10)],
                     "wall_seconds": round(wall, 1), "parameters": n_params,
                     "device": str(s.device)},
        "versions": package_versions(*_VERSIONED),
    }


def train_encoder(data: CXRDataset | str | os.PathLike, out: str | os.PathLike, *,
                  preset: str | os.PathLike | EncoderPreset = "demo", steps: int | None = None,
                  batch_size: int | None = None, lr: float | None = None, seed: int = 0,
                  image_size: int | None = None, split: str = "train",
                  device: str = "cpu", caption_augment: CaptionAugment | None = None,
                  text_noise: float = 0.0) -> EncoderResult:
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
    caption_augment : CaptionAugment, optional
        Text-side augmentation: shuffle / drop the sentences of each report at every step.
    text_noise : float, optional
        Gaussian noise (expected norm) added to the unit-norm text embeddings in the
        image-report loss during training (0: none). Both are CLIPMem mitigations (Wang et al.,
        ICLR 2025) and are recorded in ``encoder_config.json`` (``training``).

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
    from safetensors.torch import save_file

    from diffmem.pipelines import train_tokenizer

    t_start = time.time()
    # 1. check inputs
    p = load_preset(preset)
    s = _settings(p, steps=steps, batch_size=batch_size, lr=lr, seed=seed, image_size=image_size,
                  device=device)
    if caption_augment is not None and not isinstance(caption_augment, CaptionAugment):
        raise ConfigError(f"caption_augment={caption_augment!r}; pass a CaptionAugment(shuffle, "
                          "drop) or None")
    s.caption_augment = caption_augment
    s.text_noise = 0.0 if text_noise == 0 else check_positive("text_noise", text_noise)
    dataset = as_dataset(data)
    out = prepare_out_dir(out, inputs=[dataset.root])
    train_set = dataset.subset(split=split)
    if len(train_set) == 0:
        raise DataError(f"no {split!r} records to train the encoder on (splits present: "
                        f"{dict(dataset.split_counts())})", path=dataset.root)

    # 2. tokenizer and model
    tokenizer = train_tokenizer(train_set.prompts, vocab_size=p.tokenizer["vocab_size"],
                                model_max_length=p.tokenizer["model_max_length"])
    cfg = open_clip_config(p, tokenizer=tokenizer, image_size=s.size)
    model = _build_model(cfg, seed=s.seed).to(s.device)
    n_params = sum(t.numel() for t in model.parameters())
    texts = _tokenize(tokenizer, train_set.prompts)
    lengths = [len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(train_set.prompts)]
    n_long = sum(n > texts.shape[1] for n in lengths)
    if n_long:
        log.info("%d of %d prompts are longer than the context length %d and are truncated",
                 n_long, len(lengths), texts.shape[1])

    # 3. images, grouped so that a batch never holds two pixel-identical images
    images = _TrainingImages(train_set, s.size)
    if len(images.groups) < 2:
        raise DataError(f"the {split!r} split has {len(images.groups)} distinct image(s); "
                        "contrastive training needs at least 2", path=dataset.root)
    if s.batch_size > len(images.groups):
        log.info("batch_size=%d exceeds the %d distinct training images; using %d", s.batch_size,
                 len(images.groups), len(images.groups))
        s.batch_size = len(images.groups)
    log.info("training a %.2fM-parameter in-domain encoder (preset %r, %d px, %d-d) on %d "
             "records (%d distinct images) for %d steps of batch %d", n_params / 1e6, p.name,
             s.size, cfg["embed_dim"], len(train_set), len(images.groups), s.steps, s.batch_size)

    # 4-5. optimizer and training loop
    text_batches = _Texts(tokenizer, train_set.prompts, texts, augment=s.caption_augment,
                          seed=s.seed)
    losses = _optimize(model, images, text_batches, p.augment, s)

    # 6. save: safetensors weights, JSON config, tokenizer folder
    wall = time.time() - t_start
    save_file({name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()},
              str(out / WEIGHTS_NAME))
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    data_info = {"root": str(dataset.root), "format": dataset.format, "split": split,
                 "fingerprint": train_set.fingerprint(), "records": len(train_set),
                 "distinct_images": len(images.groups),
                 "distinct_prompts": len(set(train_set.prompts))}
    config = _encoder_config(cfg, p, s, data_info, losses, wall=wall, n_params=n_params)
    write_json(out / CONFIG_NAME, config)
    initial, final = config["training"]["initial_loss"], config["training"]["final_loss"]
    log.info("encoder trained in %.0f s: loss %.3f -> %.3f; saved to %s", wall, initial, final,
             out)
    encoder = InDomainEncoder(model, tokenizer, config, path=str(out))
    return EncoderResult(out=str(out), steps=s.steps, initial_loss=initial, final_loss=final,
                         losses=losses, wall_seconds=wall, embed_dim=encoder.dim,
                         image_size=s.size, encoder=encoder)


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

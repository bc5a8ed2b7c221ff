"""Train a :class:`~diffmem.pipelines.CXRDiffusionPipeline` from scratch on a chest X-ray dataset.

Epsilon-prediction DDPM loss (Ho et al., NeurIPS 2020) with caption dropout for classifier-free
guidance (Ho & Salimans, 2022), built on :mod:`accelerate` so that the same code runs in one
process here and in several (``accelerate launch --num_processes N -m diffmem train ...``).

Determinism and resuming
------------------------
Nothing random is drawn from a global generator. Step ``k`` draws its batch order, its noise,
its timesteps and its caption-dropout decisions from generators seeded by ``(seed, k)``, for the
*global* batch; each process then takes its slice. So

* a run killed at any point and resumed from its last checkpoint (``resume=True``) ends at the
  same weights as an uninterrupted run (checkpoints hold weights, optimizer and learning-rate
  scheduler state, all as safetensors/JSON: nothing is unpickled), and
* N processes with a global batch of B compute the same gradient as one process with batch B
  (up to floating-point reduction order).

Output folder
-------------
``OUT/`` becomes a diffusers pipeline folder (``model_index.json``, ``unet/``, ...) when training
ends, plus ``OUT/checkpoints/step-XXXXXXX/``, ``OUT/train_log.jsonl`` (one JSON record every
``log_every`` steps), ``OUT/model_card.json`` and ``OUT/README.md`` (the model card: data
fingerprint, preset, steps, seed, package versions).

Hooks
-----
Two hooks let training-time mitigations plug in without touching the loop:

``caption_transform(prompt, study, generator) -> str``
    Applied to each sample's prompt before tokenization (caption randomization, de-id marker
    randomization). ``generator`` is a seeded ``torch.Generator`` for that step.
``loss_filter(batch) -> torch.BoolTensor``
    Receives a :class:`LossFilterBatch` with per-sample losses and can drop samples from the
    loss (Wen et al.'s filter uses ``batch.eps_uncond()``).

Fine-tuning
-----------
``init`` starts from a trained model folder (its weights and its tokenizer) instead of a fresh
initialization; an ``adapter`` (:class:`TrainAdapter`, e.g. LoRA in :mod:`diffmem.study.lora`)
then chooses what trains: ``adapter.prepare(pipe)`` wraps modules and leaves only its own
parameters with ``requires_grad``; ``adapter.merge(pipe)`` folds them back into plain weights
before the pipeline is saved, so the saved folder is an ordinary diffusers pipeline.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from diffmem.checks import as_dataset, package_versions
from diffmem.data import CXRDataset, Study
from diffmem.errors import ConfigError, DataError, TrainingError
from diffmem.utils import disk_full_error, is_disk_full, prepare_out_dir, progress, write_json

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_STEP_PREFIX = "step-"
_SEED_STRIDE = 1_000_003
_IN_MEMORY_LIMIT = 512 * 2**20  # bytes of images kept in RAM; beyond that they stream from disk


@dataclass
class TrainConfig:
    """Trainer settings. ``None`` means "the preset's ``training`` default".

    Attributes
    ----------
    preset : str
        Model preset name or JSON path (see :func:`diffmem.pipelines.list_presets`).
    lr, steps, batch_size, caption_dropout : optional
        Peak learning rate (AdamW), optimizer steps, *global* batch size, and the probability
        of replacing a caption by ``""`` (trains the unconditional branch for CFG).
    warmup_steps, weight_decay, grad_clip : optional
        Linear warm-up length, AdamW weight decay, gradient-norm clip (0 disables).
    seed : int
        Seeds the weights' initialization and every random draw of training.
    checkpoint_every : int
        Steps between checkpoints (the last step is always checkpointed).
    keep_checkpoints : int
        How many checkpoints to keep (older ones are deleted).
    ema : float
        EMA decay of the weights (0 disables); with EMA the saved pipeline has the EMA weights.
    log_every : int
        Steps between training-log records.
    split : str
        Which split to train on.
    """

    preset: str = "demo"
    lr: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    caption_dropout: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    ema: float = 0.0
    log_every: int = 10
    split: str = "train"

    def resolved(self, training_defaults: dict[str, Any]) -> TrainConfig:
        """A copy with every ``None`` replaced by the preset default (validated)."""
        values = asdict(self)
        defaults = {"warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.0, **training_defaults}
        for key in ("lr", "steps", "batch_size", "caption_dropout", "warmup_steps",
                    "weight_decay", "grad_clip"):
            if values[key] is None:
                values[key] = defaults.get(key)
        cfg = TrainConfig(**values)
        _check_range("lr", cfg.lr, 0, None, strict_low=True)
        _check_range("steps", cfg.steps, 1, None)
        _check_range("batch_size", cfg.batch_size, 1, None)
        _check_range("caption_dropout", cfg.caption_dropout, 0, 1)
        _check_range("warmup_steps", cfg.warmup_steps, 0, None)
        _check_range("weight_decay", cfg.weight_decay, 0, None)
        _check_range("grad_clip", cfg.grad_clip, 0, None)
        _check_range("checkpoint_every", cfg.checkpoint_every, 1, None)
        _check_range("keep_checkpoints", cfg.keep_checkpoints, 1, None)
        _check_range("ema", cfg.ema, 0, 1, strict_high=True)
        _check_range("log_every", cfg.log_every, 1, None)
        cfg.steps, cfg.batch_size = int(cfg.steps), int(cfg.batch_size)
        cfg.warmup_steps = int(cfg.warmup_steps)
        return cfg


def _check_range(name, value, low, high, *, strict_low=False, strict_high=False):
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r}; expected a number")
    if (value <= low if strict_low else value < low) or \
            (high is not None and (value >= high if strict_high else value > high)):
        lo = f"> {low}" if strict_low else f">= {low}"
        hi = "" if high is None else (f" and < {high}" if strict_high else f" and <= {high}")
        raise ConfigError(f"{name}={value!r} is out of range; use a value {lo}{hi}")


@dataclass
class LossFilterBatch:
    """What a ``loss_filter`` hook sees for one (local) batch.

    Attributes
    ----------
    losses : torch.Tensor
        ``(B,)`` per-sample MSE between predicted and true noise.
    x_t, timesteps, noise, eps_pred, cond : torch.Tensor
        Noisy inputs, their timesteps, the true noise, the prediction and the text embeddings.
    prompts : list of str
        The (transformed, possibly dropped) prompts of the batch.
    studies : list of Study
    step : int
    """

    losses: torch.Tensor
    x_t: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    eps_pred: torch.Tensor
    cond: torch.Tensor
    prompts: list[str]
    studies: list[Study]
    step: int
    _eps_uncond_fn: Callable[[], torch.Tensor] = field(repr=False, default=None)

    def eps_uncond(self) -> torch.Tensor:
        """The model's unconditional noise prediction at the same ``(x_t, t)`` (no gradient)."""
        return self._eps_uncond_fn()


class TrainAdapter(Protocol):
    """What :func:`train` asks of a fine-tuning adapter (see the module docstring).

    Attributes
    ----------
    name : str
        Identifies the adapter's settings; recorded in checkpoints (a run is resumed only
        with the same adapter) and in the model card.
    """

    name: str

    def prepare(self, pipe) -> None:
        """Wrap ``pipe``'s modules in place; only the parameters to train keep
        ``requires_grad``."""

    def merge(self, pipe) -> None:
        """Fold the trained parameters into ``pipe``'s plain modules (before saving)."""


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    out: str
    steps: int
    final_loss: float
    wall_seconds: float
    resumed_from: int | None
    filtered_samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Denoiser(torch.nn.Module):
    """Text encoder + UNet as one module, so that one DDP wrapper syncs both."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]

    def forward(self, x_t, timesteps, input_ids):
        cond = self.encode(input_ids)
        return self.unet(x_t, timesteps, encoder_hidden_states=cond, return_dict=False)[0], cond


class _ImageSource:
    """Training images at the model's resolution, kept in memory when they fit."""

    def __init__(self, dataset: CXRDataset, size: int):
        self.dataset, self.size = dataset, size
        self._cache: np.ndarray | None = None
        if len(dataset) * size * size * 4 <= _IN_MEMORY_LIMIT:
            chunks = []
            for _, imgs in progress(dataset.iter_images(size=size, batch_size=64),
                                    desc="loading images", total=math.ceil(len(dataset) / 64),
                                    unit="chunk"):
                chunks.append(imgs.astype(np.float32))
            self._cache = np.concatenate(chunks) if chunks else np.zeros((0, size, size), np.float32)

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        if self._cache is not None:
            arr = self._cache[list(indices)]
        else:
            arr = np.stack([self.dataset.load_image(i, size=self.size) for i in indices])
        return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1)


def _read_images(dataset: CXRDataset, size: int) -> _ImageSource:
    """:class:`_ImageSource` of ``dataset``; an unreadable image is a DataError that does not
    suggest ``--on-error skip``, which ``train`` does not take."""
    from diffmem.data._reading import without_skip_hint

    try:
        return _ImageSource(dataset, size)
    except DataError as e:
        raise DataError(f"{without_skip_hint(str(e))}; `diffmem train` trains on every record "
                        "and skips none: fix or remove the file (`diffmem inspect DATA "
                        "--on-error skip` lists every unreadable one)") from None


def _note_conversion(dataset: CXRDataset, size: int) -> None:
    """Log once when stored images are not already ``size`` x ``size`` grayscale."""
    from PIL import Image

    path = dataset[0].image
    if path.lower().endswith(".dcm"):
        log.info("DICOM images are windowed, converted to grayscale in [0, 1] and resized to "
                 "%d x %d px for training", size, size)
        return
    try:
        with Image.open(path) as im:
            w, h, mode = im.width, im.height, im.mode
    except OSError:
        return  # read_image will raise a clear error when the image is read
    if (w, h) != (size, size) or mode not in ("L", "I;16", "I"):
        log.info("images are stored at %d x %d px (mode %s); converted to %d x %d grayscale "
                 "(centre crop, area resize) for training", w, h, mode, size, size)


def _step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + step) * 8 + stream)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * _SEED_STRIDE
                                                                    + 7919 * (epoch + 1)))


def _batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The global batch of ``step``: epochs are seeded permutations of the training set."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = _epoch_permutation(n, seed, epoch)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return out


#: The packages a model card records (``versions``).
_VERSIONED = ("diffmem", "torch", "diffusers", "transformers", "tokenizers", "accelerate",
              "safetensors", "numpy")


# ---------------------------------------------------------------------------- checkpoints
def _list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(_STEP_PREFIX) and (p / "state.json").exists():
                try:
                    found.append((int(p.name[len(_STEP_PREFIX):]), p))
                except ValueError:
                    continue
    return sorted(found)


def _optimizer_to_safetensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_safetensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                                meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _save_checkpoint(out: Path, step: int, model: _Denoiser, ema: dict[str, torch.Tensor] | None,
                     opt: torch.optim.Optimizer, sched, run_meta: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    root = out / CHECKPOINT_DIR
    root.mkdir(exist_ok=True)
    final = root / f"{_STEP_PREFIX}{step:07d}"
    tmp = root / f".tmp-{_STEP_PREFIX}{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_safetensors(opt)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", opt_meta)
        write_json(tmp / "state.json", {"step": step, "lr_scheduler": sched.state_dict(),
                                        **run_meta})
    except Exception as e:  # SafetensorError, OSError, OutputError: the half checkpoint goes
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(root) from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in _list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None: a JSON file that does
    not parse, a safetensors file that is missing or truncated (its header and size are checked;
    no tensor is read)."""
    from safetensors import safe_open

    for name in ("state.json", "optimizer.json"):
        try:
            json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"{name}: {e}"
    names = ["model.safetensors", "optimizer.safetensors"]
    if (path / "ema.safetensors").exists():
        names.append("ema.safetensors")
    for name in names:
        try:
            with safe_open(str(path / name), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: both mean unreadable
            return f"{name}: {e}"
    return None


def _resumable(checkpoints: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """``checkpoints`` without the unreadable newest ones, each named in a warning (nothing is
    deleted); a TrainingError when none can be read."""
    bad = []
    while checkpoints and (problem := _checkpoint_problem(checkpoints[-1][1])) is not None:
        bad.append(f"{checkpoints[-1][1]} ({problem})")
        checkpoints = checkpoints[:-1]
        log.warning("checkpoint %s cannot be read; %s", bad[-1],
                    f"resuming from the one before it, {checkpoints[-1][1]} (nothing is deleted)"
                    if checkpoints else "no older checkpoint")
    if bad and not checkpoints:
        raise TrainingError(f"cannot resume: no checkpoint can be read ({'; '.join(bad)}); "
                            "train into a new --out (nothing was deleted)")
    return checkpoints


def _load_checkpoint(path: Path, model: _Denoiser, opt, sched) -> tuple[int, dict | None, dict]:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    _optimizer_from_safetensors(opt, load_file(str(path / "optimizer.safetensors")),
                                json.loads((path / "optimizer.json").read_text()))
    sched.load_state_dict(state["lr_scheduler"])
    ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").exists() else None
    return int(state["step"]), ema, state


# ---------------------------------------------------------------------------- training
def _make_tokenizer(out: Path, prompts: list[str], preset, *, resume: bool, is_main: bool, acc):
    from transformers import PreTrainedTokenizerFast

    from diffmem.pipelines import train_tokenizer

    tok_dir = out / CHECKPOINT_DIR / "tokenizer"
    if resume and tok_dir.is_dir():
        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    if is_main:
        tok = train_tokenizer(prompts, vocab_size=int(preset.tokenizer["vocab_size"]),
                              model_max_length=int(preset.tokenizer["model_max_length"]))
        tok_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(tok_dir))
    acc.wait_for_everyone()
    return PreTrainedTokenizerFast.from_pretrained(str(tok_dir))


def _check_init(init: str | os.PathLike, preset: str) -> Path:
    """The ``init`` model folder, checked: a saved :class:`CXRDiffusionPipeline` whose model
    card (when it has one) names the same preset."""
    path = Path(init)
    if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
        raise ConfigError(f"init={str(path)!r} is not a CXR pipeline folder (no model_index.json "
                          "and unet/); give a model folder written by `diffmem train`")
    card = path / "model_card.json"
    if card.is_file():
        trained = json.loads(card.read_text(encoding="utf-8")).get("preset")
        if trained is not None and trained != preset:
            raise ConfigError(f"init={str(path)!r} was trained with preset {trained!r}, not "
                              f"{preset!r}; fine-tune it with preset={trained!r}")
    return path


def _build_model(out: Path, train_set: CXRDataset, preset, seed: int, acc, *, resume: bool,
                 init: Path | None, adapter: TrainAdapter | None):
    """``(pipeline, tokenizer)`` to train: built from ``preset`` (weights seeded by ``seed``,
    a tokenizer trained on the training prompts) or loaded from ``init``; then prepared by the
    ``adapter``."""
    from diffmem.pipelines import CXRDiffusionPipeline, build_pipeline

    if init is None:
        tokenizer = _make_tokenizer(out, train_set.prompts, preset, resume=resume,
                                    is_main=acc.is_main_process, acc=acc)
        pipe = build_pipeline(preset, tokenizer=tokenizer, seed=seed)
    else:
        pipe = CXRDiffusionPipeline.from_pretrained(str(init))
        tokenizer = pipe.tokenizer
    if pipe.vae is not None:
        pipe.vae.requires_grad_(False)
    if adapter is not None:
        adapter.prepare(pipe)
    return pipe, tokenizer


def train(data: CXRDataset | str | os.PathLike, out: str | os.PathLike, *,
          config: TrainConfig | None = None, resume: bool = False,
          caption_transform: Callable[[str, Study, torch.Generator], str] | None = None,
          loss_filter: Callable[[LossFilterBatch], torch.Tensor] | None = None,
          stop_after: int | None = None, init: str | os.PathLike | None = None,
          adapter: TrainAdapter | None = None) -> TrainResult:
    """Train a CXR diffusion pipeline (from scratch, or fine-tune one) and save it as a
    diffusers folder.

    Parameters
    ----------
    data : CXRDataset or path
        The dataset (a path is read with :func:`diffmem.data.load`); its ``config.split``
        records are trained on.
    out : path
        The model folder to write (see the module docstring). It must not lie inside the data.
    config : TrainConfig, optional
        Settings; defaults are the preset's.
    resume : bool
        Continue from the newest checkpoint in ``out`` (the run's settings and data must match).
        Without it, a folder that already holds checkpoints is refused.
    caption_transform, loss_filter : callable, optional
        Training-time hooks (see the module docstring).
    stop_after : int, optional
        Stop (after checkpointing) once this step is reached, without finishing; the run can
        be resumed later. Used to run a long schedule in pieces.
    init : path, optional
        A model folder saved by :func:`train` (same preset) to start from: its weights and its
        tokenizer (not retrained on ``data``'s prompts). Default: a fresh initialization.
    adapter : TrainAdapter, optional
        Trains only the adapter's parameters (e.g. LoRA) and merges them before saving; see
        the module docstring. Default: every UNet and text-encoder parameter trains.

    Returns
    -------
    TrainResult
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from diffmem.pipelines import load_preset

    t_start = time.time()
    config = config or TrainConfig()
    preset = load_preset(config.preset)
    cfg = config.resolved(dict(preset.training))

    dataset = as_dataset(data)
    init = None if init is None else _check_init(init, preset.name)
    out = Path(out)
    prepare_out_dir(out, inputs=[dataset.root] + ([init] if init is not None else []))
    train_set = dataset.subset(split=cfg.split)
    if len(train_set) == 0:
        raise DataError(f"no {cfg.split!r} records to train on (splits present: "
                        f"{dict(dataset.split_counts())})", path=dataset.root)
    fingerprint = train_set.fingerprint()

    acc = Accelerator(cpu=not torch.cuda.is_available())
    world = acc.num_processes
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {world} "
                          "processes; use a multiple of the process count")

    checkpoints = _list_checkpoints(out)
    if resume and checkpoints:
        checkpoints = _resumable(checkpoints)  # skips (and names) unreadable newest ones
    run_meta = _run_meta(preset.name, fingerprint, cfg, {
        "transform": caption_transform, "loss_filter": loss_filter, "init": init,
        "adapter": adapter})
    _check_resume(out, checkpoints, resume, run_meta)

    size = preset.resolution
    _note_conversion(train_set, size)
    images = _read_images(train_set, size)  # before the tokenizer is written into out
    set_seed(cfg.seed)
    pipe, tokenizer = _build_model(out, train_set, preset, cfg.seed, acc, resume=resume,
                                   init=init, adapter=adapter)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    model = _Denoiser(pipe.unet, pipe.text_encoder)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = get_scheduler("constant_with_warmup", optimizer=opt,
                          num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)

    start_step, ema_state, resumed_from = 0, None, None
    if checkpoints and resume:
        start_step, ema_state, _ = _load_checkpoint(checkpoints[-1][1], model, opt, sched)
        resumed_from = start_step
        log.info("resuming %s from step %d", out, start_step)
    if cfg.ema and ema_state is None:
        ema_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    ddp_model, opt = acc.prepare(model, opt)
    log_path = out / "train_log.jsonl"
    if acc.is_main_process and log_path.exists():
        # a fresh run starts a new log; a resumed one drops what the killed run logged after
        # its last checkpoint (those steps are trained again)
        kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                if resume and line.strip() and json.loads(line).get("step", 0) <= start_step]
        log_path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    run = _Run(cfg=cfg, acc=acc, pipe=pipe, tokenizer=tokenizer, noise_sched=noise_sched,
               images=images, train_set=train_set, ddp_model=ddp_model, opt=opt, sched=sched,
               ema_state=ema_state, out=out, caption_transform=caption_transform,
               loss_filter=loss_filter)
    end_step = cfg.steps if stop_after is None else min(cfg.steps, int(stop_after))
    last_loss = float("nan")
    bar = progress(range(start_step, end_step), desc="training", total=end_step - start_step,
                   unit="step", disable=None if acc.is_main_process else True)
    ddp_model.train()
    for step in bar:
        loss = _batch_loss(run, step)  # 1.-2. the batch, the forward process and the loss
        _optimizer_step(run, loss, step)  # 3.
        # 4. logging and checkpoints
        done = step + 1
        last_loss = float(acc.reduce(loss.detach(), reduction="mean"))
        if acc.is_main_process:
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if done % cfg.log_every == 0 or done == end_step:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": done, "loss": last_loss,
                                        "lr": sched.get_last_lr()[0],
                                        "filtered": run.filtered_total,
                                        "elapsed_s": round(time.time() - t_start, 2)}) + "\n")
        if done % cfg.checkpoint_every == 0 or done == end_step:
            acc.wait_for_everyone()
            if acc.is_main_process:
                _save_checkpoint(out, done, acc.unwrap_model(ddp_model), ema_state, opt, sched,
                                 {**run_meta, "num_processes": world}, cfg.keep_checkpoints)
            acc.wait_for_everyone()

    final_step = max(start_step, end_step)
    if end_step == cfg.steps and acc.is_main_process:
        _save_pipeline(run, preset, fingerprint, adapter, {
            "steps": final_step, "final_loss": last_loss,
            "wall_seconds_last_session": round(time.time() - t_start, 1),
            "resumed_from": resumed_from, "init": run_meta["init"],
            "adapter": run_meta["adapter"]})
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(out=str(out), steps=final_step, final_loss=last_loss,
                       wall_seconds=round(time.time() - t_start, 2), resumed_from=resumed_from,
                       filtered_samples=run.filtered_total)


def _run_meta(preset: str, fingerprint: str, cfg: TrainConfig,
              hooks: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run (saved in every checkpoint; a resume must match it): preset, data,
    settings, and the names of its hooks, starting model and adapter."""
    init, adapter = hooks["init"], hooks["adapter"]
    return {"preset": preset, "data_fingerprint": fingerprint, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "steps": cfg.steps,
            "caption_dropout": cfg.caption_dropout, "ema": cfg.ema,
            "transform": getattr(hooks["transform"], "__name__", None)
            if hooks["transform"] else None,
            "loss_filter": getattr(hooks["loss_filter"], "__name__", None)
            if hooks["loss_filter"] else None,
            "init": None if init is None else str(Path(init).resolve()),
            "adapter": None if adapter is None else adapter.name}


def _save_pipeline(run: _Run, preset, fingerprint: str, adapter: TrainAdapter | None,
                   result: dict[str, Any]) -> None:
    """The end of training: the final (EMA) weights into the pipeline, the adapter merged into
    them, the pipeline folder and its model card (``result``, see :func:`_write_model_card`)
    saved."""
    inner = run.acc.unwrap_model(run.ddp_model)
    if run.ema_state is not None:
        inner.load_state_dict(run.ema_state)
    run.pipe.unet, run.pipe.text_encoder = inner.unet, inner.text_encoder
    if adapter is not None:
        adapter.merge(run.pipe)
    run.pipe.save_pretrained(str(run.out))
    _write_model_card(run.out, preset, run.cfg, run.train_set, fingerprint, result)


def _check_resume(out: Path, checkpoints: list[tuple[int, Path]], resume: bool,
                  run_meta: dict[str, Any]) -> None:
    """Refuse to overwrite checkpoints without ``resume``, or to resume a different run."""
    if checkpoints and not resume:
        raise TrainingError(f"{out} already holds checkpoints (newest: step "
                            f"{checkpoints[-1][0]}); pass --resume to continue that run or "
                            "choose a new --out")
    if resume and not checkpoints:
        log.warning("--resume given but %s has no checkpoint yet: starting from step 0", out)
    if checkpoints and resume:
        saved = json.loads((checkpoints[-1][1] / "state.json").read_text())
        diffs = {k: (saved.get(k), v) for k, v in run_meta.items() if saved.get(k) != v}
        if diffs:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
            raise TrainingError(f"cannot resume {out}: the run's settings or data changed "
                                f"({detail}); resume with the same settings or use a new --out")


@dataclass
class _Run:
    """What every training step uses (built once by :func:`train`)."""

    cfg: TrainConfig
    acc: Any
    pipe: Any
    tokenizer: Any
    noise_sched: Any
    images: _ImageSource
    train_set: CXRDataset
    ddp_model: Any
    opt: Any
    sched: Any
    ema_state: dict[str, torch.Tensor] | None
    out: Path
    caption_transform: Callable | None
    loss_filter: Callable | None
    filtered_total: int = 0

    @property
    def local_bs(self) -> int:
        return self.cfg.batch_size // self.acc.num_processes


def _batch_loss(run: _Run, step: int) -> torch.Tensor:
    """Steps 1-2 of a training step: this process's share of the global batch (noise,
    timesteps and caption decisions all seeded by ``step``), the forward process and the loss
    (after the loss filter)."""
    cfg, acc, pipe, tokenizer, ddp_model = run.cfg, run.acc, run.pipe, run.tokenizer, run.ddp_model
    local_bs, rank = run.local_bs, acc.process_index
    # 1. the global batch, its noise, timesteps and caption decisions (all seeded by step)
    idx = _batch_indices(len(run.train_set), cfg.batch_size, cfg.seed, step)
    g = _step_generator(cfg.seed, step, 0)
    x0_all = run.images.get(idx)
    noise_all = torch.randn((len(idx), *pipe.sample_shape), generator=g)
    t_all = torch.randint(0, run.noise_sched.config.num_train_timesteps, (len(idx),), generator=g)
    drop_all = torch.rand(len(idx), generator=g) < cfg.caption_dropout
    sl = slice(rank * local_bs, (rank + 1) * local_bs)
    studies = [run.train_set[i] for i in idx[sl]]
    prompts = []
    tg = _step_generator(cfg.seed, step, 1)
    for study, drop in zip(studies, drop_all[sl].tolist()):
        text = run.caption_transform(study.prompt, study, tg) if run.caption_transform \
            else study.prompt
        prompts.append("" if drop else text)

    # 2. forward process and loss
    with torch.no_grad():
        x0 = pipe.encode_images(x0_all[sl], generator=_step_generator(cfg.seed, step, 2))
    noise, t = noise_all[sl].to(x0.dtype), t_all[sl]
    x_t = run.noise_sched.add_noise(x0, noise, t)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    eps_pred, cond = ddp_model(x_t.to(acc.device), t.to(acc.device), ids.to(acc.device))
    losses = F.mse_loss(eps_pred.float(), noise.to(acc.device).float(),
                        reduction="none").mean(dim=(1, 2, 3))
    keep = torch.ones_like(losses, dtype=torch.bool)
    if run.loss_filter is not None:
        def _uncond(x_t=x_t, t=t):
            with torch.no_grad():
                empty = tokenizer([""] * len(prompts), padding="max_length",
                                  max_length=tokenizer.model_max_length, truncation=True,
                                  return_tensors="pt").input_ids.to(acc.device)
                inner = acc.unwrap_model(ddp_model)
                return inner.unet(x_t.to(acc.device), t.to(acc.device),
                                  encoder_hidden_states=inner.encode(empty),
                                  return_dict=False)[0]
        keep = run.loss_filter(LossFilterBatch(
            losses=losses.detach(), x_t=x_t, timesteps=t, noise=noise, eps_pred=eps_pred.detach(),
            cond=cond.detach(), prompts=prompts, studies=studies, step=step,
            _eps_uncond_fn=_uncond)).to(losses.device).bool()
        run.filtered_total += int((~keep).sum())
    # mean over the kept samples of the *global* batch size keeps processes consistent
    return (losses * keep).sum() / local_bs


def _optimizer_step(run: _Run, loss: torch.Tensor, step: int) -> None:
    """Step 3: backward, gradient clipping, optimizer and schedule steps, EMA update."""
    cfg, acc, ddp_model, opt, ema_state = run.cfg, run.acc, run.ddp_model, run.opt, run.ema_state
    if not torch.isfinite(loss.detach()):
        good = _list_checkpoints(run.out)
        where = f"the last good checkpoint is {good[-1][1]}" if good else "no checkpoint was written yet"
        raise TrainingError(f"the loss became {float(loss.detach())} at step {step}; training stopped "
                            f"and nothing further was saved ({where}); lower --lr or check the data")
    acc.backward(loss)
    if cfg.grad_clip:
        acc.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip)
    opt.step()
    run.sched.step()
    opt.zero_grad(set_to_none=True)
    if ema_state is not None:
        with torch.no_grad():
            for k, v in acc.unwrap_model(ddp_model).state_dict().items():
                if v.dtype.is_floating_point:
                    ema_state[k].mul_(cfg.ema).add_(v.detach(), alpha=1 - cfg.ema)
                else:
                    ema_state[k].copy_(v)


def _write_model_card(out: Path, preset, cfg: TrainConfig, train_set: CXRDataset,
                      fingerprint: str, result: dict[str, Any]) -> None:
    """``model_card.json`` and ``README.md``; ``result`` holds ``steps``, ``final_loss``,
    ``wall_seconds_last_session`` and ``resumed_from``."""
    card = {
        "model": "CXRDiffusionPipeline",
        "preset": preset.name,
        "preset_config": preset.to_dict(),
        "training": asdict(cfg),
        "steps": result["steps"],
        "final_loss": result["final_loss"],
        "wall_seconds_last_session": result["wall_seconds_last_session"],
        "resumed_from": result["resumed_from"],
        **({"fine_tuned_from": result["init"], "adapter": result.get("adapter")}
           if result.get("init") else {}),
        "data": {"root": str(train_set.root), "format": train_set.format,
                 "fingerprint": fingerprint, "records": len(train_set),
                 "patients": len({s.patient_id for s in train_set})},
        "versions": package_versions(*_VERSIONED),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()},
    }
    write_json(out / "model_card.json", card)
    lines = [
        "# Model card: CXRDiffusionPipeline trained by diffmem", "",
        f"- preset: `{preset.name}` — {preset.description}",
        f"- steps: {result['steps']}, global batch {cfg.batch_size}, lr {cfg.lr}, caption dropout "
        f"{cfg.caption_dropout}, seed {cfg.seed}, EMA {cfg.ema or 'off'}",
        f"- data: {len(train_set)} `{cfg.split}` records from `{train_set.root}` "
        f"({train_set.format}), fingerprint `{fingerprint}`",
        f"- final training loss: {result['final_loss']:.4f}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()), "",
        "This model was trained on patient images and may reproduce them: run `diffmem detect` "
        "before sharing it or its samples.", "",
        "Load it with `diffmem.models.load_model(folder)` or "
        "`CXRDiffusionPipeline.from_pretrained(folder)`.",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

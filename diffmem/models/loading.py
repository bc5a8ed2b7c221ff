"""Open a model for diffmem: :func:`load_model` turns a pipeline folder or object into a
:class:`~diffmem.models.DiffusionModelAdapter`, checking the folder first so that a wrong or
unsafe one fails with an error that says what would work."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch

from diffmem.errors import ConfigError, ModelError
from diffmem.models.adapter import DiffusionModelAdapter
from diffmem.models.device import resolve_device, resolve_dtype
from diffmem.pipelines.folder import (WEIGHTED_COMPONENTS, IndexProblem, read_model_index,
                                      weight_files)

log = logging.getLogger(__name__)

#: model_index.json ``_class_name`` -> adapter kind. The Stable Diffusion classes listed share
#: the text-to-image component layout (4-channel UNet on VAE latents, CLIP-style text encoder).
PIPELINE_CLASSES = {
    "CXRDiffusionPipeline": "cxr",
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionImg2ImgPipeline": "stable-diffusion",
}
#: Inference schedulers by name (``None`` keeps the pipeline's own).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
}
_IGNORED = ("safety_checker", "feature_extractor", "image_encoder")


def load_model(path_or_pipeline: str | os.PathLike | Any, *,
               device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None,
               scheduler: str | None = "ddim", variant: str | None = None,
               ) -> DiffusionModelAdapter:
    """Open a diffusion model as a :class:`~diffmem.models.DiffusionModelAdapter`.

    Parameters
    ----------
    path_or_pipeline : path or pipeline object
        A folder written by ``save_pretrained`` (a ``model_index.json`` whose ``_class_name`` is
        ``CXRDiffusionPipeline``, ``StableDiffusionPipeline`` or
        ``StableDiffusionImg2ImgPipeline``; weights as ``.safetensors``), or such a pipeline
        object (used as is: its modules are moved to ``device``/``dtype`` only when these are
        given).
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (checked by
        :func:`~diffmem.models.device.resolve_device`). Default: CUDA when available, else the
        CPU, for a folder; the pipeline's own device for an object.
    dtype : str or torch.dtype, optional
        ``"float32"``, ``"float16"`` (not on the CPU) or ``"bfloat16"`` (checked by
        :func:`~diffmem.models.device.resolve_dtype`). Default: float32 for a folder, the
        pipeline's own dtype for an object. Scores are accumulated in float32 whatever the
        model's dtype.
    scheduler : str or None, optional
        Inference scheduler built from the pipeline's noise schedule: ``"ddim"`` (default,
        deterministic with ``eta=0``), ``"dpm"`` (DPM-Solver++ multistep), ``"ddpm"`` or
        ``"pndm"``; None keeps the pipeline's own scheduler.
    variant : str, optional
        Weight file variant to read (``"fp16"`` for ``*.fp16.safetensors``).

    Returns
    -------
    DiffusionModelAdapter

    Raises
    ------
    ModelError
        For a path that is not a pipeline folder, an unsupported pipeline class, missing
        component files, weights saved only as pickles (never unpickled: convert them to
        safetensors), or components that do not fit together.
    ConfigError
        For an unknown ``scheduler`` name, an unknown or absent device, an unknown dtype or
        float16 on the CPU.

    Examples
    --------
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> adapter = load_model(tiny_stable_diffusion(seed=0))
    >>> adapter.kind, adapter.latent_shape, adapter.image_size
    ('stable-diffusion', (4, 8, 8), 16)
    """
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)} "
                          "(or None to keep the pipeline's own)")
    if isinstance(path_or_pipeline, (str, os.PathLike)):
        # device and precision first: a wrong flag fails before the weights are read
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device=device)
        folder = Path(path_or_pipeline)
        kind = check_model_folder(folder, variant=variant)
        pipeline = _from_folder(folder, kind, variant=variant, dtype=dtype)
        source = str(folder)
        pipeline.to(device)
        for name in WEIGHTED_COMPONENTS:
            module = getattr(pipeline, name, None)
            if module is not None:
                module.eval().requires_grad_(False)
    else:
        pipeline = path_or_pipeline
        kind = _kind_of(pipeline)
        source = None
        device = None if device is None else resolve_device(device)
        if dtype is not None:
            dtype = resolve_dtype(dtype, device=device or pipeline.unet.device)
        if device is not None or dtype is not None:
            moves = {"device": device, "dtype": dtype}
            pipeline.to(**{k: v for k, v in moves.items() if v is not None})
        device = pipeline.unet.device if device is None else torch.device(device)
        dtype = pipeline.unet.dtype if dtype is None else dtype
    _check_components(pipeline, kind, source or type(pipeline).__name__)
    inference = _make_scheduler(pipeline, scheduler)
    adapter = DiffusionModelAdapter(pipeline, kind=kind, scheduler=inference, device=device,
                                    dtype=dtype, source=source)
    log.info("loaded %r", adapter)
    return adapter


def check_model_folder(folder: str | os.PathLike, *, variant: str | None = None) -> str:
    """Check that ``folder`` is a pipeline folder diffmem can open safely; return its kind.

    Reads only JSON and file names (no weights). See :func:`load_model` for what passes.

    Raises
    ------
    ModelError
        Naming the folder, what was found and what would work.
    """
    folder = Path(folder)
    index = read_model_index(folder)
    if isinstance(index, IndexProblem):
        _raise_index_problem(folder, index)
    index_path = folder / "model_index.json"
    if not isinstance(index, dict):
        raise ModelError(f"{str(index_path)!r} holds a JSON {type(index).__name__}, not an "
                         "object; pass the folder written by pipeline.save_pretrained(folder)")
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelError(f"{str(index_path)!r}: '_class_name' is {class_name!r}, not a pipeline "
                         f"class name; diffmem supports {', '.join(PIPELINE_CLASSES)} (write the "
                         "folder with pipeline.save_pretrained(folder))")
    if class_name not in PIPELINE_CLASSES:
        raise ModelError(f"{str(folder)!r} holds a {class_name!r} pipeline; diffmem supports "
                         f"{', '.join(PIPELINE_CLASSES)} (text-to-image models whose UNet "
                         "denoises one image from a prompt)")
    problems = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or name in _IGNORED:
            continue
        if len(spec) != 2 or spec[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            problems.append(f"component {name!r} ({spec[1]}) has no subfolder {name}/")
            continue
        if name in WEIGHTED_COMPONENTS:
            problems.extend(_weight_problems(sub, name, variant))
        elif name == "scheduler" and not (sub / "scheduler_config.json").is_file():
            problems.append("scheduler/ lacks scheduler_config.json")
        elif name == "tokenizer" and not any(sub.iterdir()):
            problems.append("tokenizer/ is empty")
    required = ("unet", "text_encoder", "tokenizer", "scheduler") + \
        (("vae",) if PIPELINE_CLASSES[class_name] == "stable-diffusion" else ())
    for name in required:
        spec = index.get(name)
        if not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            problems.append(f"model_index.json lists no {name!r} component")
    if problems:
        raise ModelError(f"{str(folder)!r} ({class_name}) cannot be opened: " + "; ".join(problems))
    return PIPELINE_CLASSES[class_name]


def _raise_index_problem(folder: Path, problem: IndexProblem) -> None:
    if problem.kind == "missing":
        raise ModelError(f"model folder {str(folder)!r} does not exist; pass a folder written "
                         "by pipeline.save_pretrained(folder) or `diffmem train`")
    if problem.kind == "file":
        hint = ("convert it to a diffusers folder first: StableDiffusionPipeline."
                "from_single_file(path).save_pretrained(folder, safe_serialization=True)"
                if folder.suffix == ".safetensors" else
                "it is a single file; diffmem opens diffusers pipeline folders (model_index.json "
                "plus one subfolder per component) with safetensors weights")
        raise ModelError(f"{str(folder)!r} is a file, not a model folder; {hint}")
    if problem.kind == "no_index":
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise ModelError(f"{str(folder)!r} has no model_index.json (found: "
                         f"{', '.join(found) or 'nothing'}); it is not a diffusers pipeline "
                         "folder: pass the folder written by pipeline.save_pretrained(folder)")
    raise ModelError(f"cannot read {str(folder / 'model_index.json')!r}: {problem.detail}")


def _weight_problems(sub: Path, name: str, variant: str | None) -> list[str]:
    if not (sub / "config.json").is_file():
        return [f"{name}/ lacks config.json"]
    tensors, pickles = weight_files(sub)
    if variant is not None:
        wanted = [t for t in tensors if f".{variant}." in t]
    else:
        wanted = [t for t in tensors if t.count(".") == 1 or "-of-" in t]
    if wanted:
        return []
    if pickles:
        return [(f"{name}/ has weights only as pickles ({', '.join(pickles)}), which diffmem "
                 "never unpickles (they can run code); convert them once in a trusted "
                 "environment: load the pipeline and call save_pretrained(folder, "
                 "safe_serialization=True)")]
    if tensors:
        return [(f"{name}/ has only {', '.join(tensors)}; pass variant= the matching variant "
                 "(e.g. 'fp16') or save without one")]
    return [f"{name}/ has no weight file (*.safetensors)"]


def _hide_loading_bars() -> None:
    """diffusers and transformers draw their own loading bars; ``--quiet`` hides them too."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _from_folder(folder: Path, kind: str, *, variant: str | None, dtype: torch.dtype) -> Any:
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True}
    if dtype != torch.float32:  # read into the precision (diffusers keeps what must stay fp32)
        from diffusers.pipelines import pipeline_utils

        # diffusers renamed torch_dtype to dtype (and resolves both) in recent releases
        kwargs["dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"] = dtype
    if os.environ.get("DIFFMEM_NO_PROGRESS"):
        _hide_loading_bars()
    if variant is not None:
        kwargs["variant"] = variant
    try:
        if kind == "cxr":
            from diffmem.pipelines import CXRDiffusionPipeline

            return CXRDiffusionPipeline.from_pretrained(folder, **kwargs)
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ModelError(f"{str(folder)!r}: the pipeline could not be loaded "
                         f"({type(e).__name__}: {e})") from e


def _kind_of(pipeline: Any) -> str:
    from diffmem.pipelines import CXRDiffusionPipeline

    if isinstance(pipeline, CXRDiffusionPipeline):
        return "cxr"
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    if isinstance(pipeline, (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)):
        return "stable-diffusion"
    raise ModelError(f"cannot use a {type(pipeline).__name__} object; diffmem supports "
                     f"{', '.join(PIPELINE_CLASSES)} objects or their saved folders")


def _check_components(pipeline: Any, kind: str, where: str) -> None:
    from diffusers import UNet2DConditionModel

    unet = getattr(pipeline, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise ModelError(f"{where}: the UNet is a {type(unet).__name__}; diffmem needs a "
                         "UNet2DConditionModel (text-conditioned through cross-attention)")
    for name in ("text_encoder", "tokenizer", "scheduler"):
        if getattr(pipeline, name, None) is None:
            raise ModelError(f"{where}: the pipeline has no {name}")
    config = unet.config
    if config.get("time_cond_proj_dim") is not None or config.get("addition_embed_type"):
        raise ModelError(f"{where}: the UNet needs extra conditioning (time_cond_proj_dim / "
                         "addition_embed_type: an LCM or SDXL-style model), which diffmem does not "
                         "pass; use a plain text-to-image UNet")
    vae = getattr(pipeline, "vae", None)
    if kind == "stable-diffusion" and vae is None:
        raise ModelError(f"{where}: a Stable Diffusion pipeline needs its vae")
    channels = int(config.in_channels)
    if vae is not None and channels != int(vae.config.latent_channels):
        raise ModelError(f"{where}: the UNet takes {channels} input channels but the VAE makes "
                         f"{vae.config.latent_channels}-channel latents (an inpainting or "
                         "image-conditioned UNet?); diffmem needs a text-to-image UNet")
    if int(config.out_channels) != channels:
        raise ModelError(f"{where}: the UNet maps {channels} channels to {config.out_channels}; "
                         "diffmem needs a UNet whose output has its input's channels")


def _make_scheduler(pipeline: Any, name: str | None) -> Any:
    """The inference scheduler: ``name``'s class built from the pipeline's noise schedule."""
    import diffusers

    if name is None:
        return type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    config = dict(pipeline.scheduler.config)
    cls = getattr(diffusers, SCHEDULERS[name])
    overrides = {}
    defaulted = set(config.get("_use_default_values", []))
    accepts = inspect.signature(cls.__init__).parameters
    if "clip_sample" in accepts and ("clip_sample" not in config or "clip_sample" in defaulted):
        # DDIM/DDPM clip the predicted sample to [-1, 1] by default: right for pixels, wrong
        # for VAE latents. A schedule that never said decides by the model's space.
        overrides["clip_sample"] = getattr(pipeline, "vae", None) is None
    scheduler = cls.from_config(config, **overrides)
    if getattr(pipeline, "vae", None) is not None and scheduler.config.get("clip_sample"):
        log.warning("the %s scheduler clips predicted samples to [-1, 1] (clip_sample=True) but "
                    "this model denoises VAE latents, which range wider; set clip_sample false in "
                    "scheduler/scheduler_config.json unless the model was trained that way",
                    name)
    return scheduler

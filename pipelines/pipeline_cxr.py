"""Text-to-image diffusion for chest X-rays: DDPM (Ho et al., NeurIPS 2020) with classifier-free
guidance (Ho & Salimans, 2022), in pixel space or in the latent space of an autoencoder (Rombach
et al., CVPR 2022).

:class:`CXRDiffusionPipeline` is a diffusers pipeline: a UNet2DConditionModel that denoises
one-channel images (or VAE latents), a CLIP text encoder trained from scratch on report text, a
WordPiece tokenizer that keeps de-identification markers whole (:mod:`.tokenizer`) and a noise
scheduler. Build a fresh one with :func:`~diffmem.pipelines.build_pipeline`.

Sampling
--------
The pipeline is saved with the :class:`~diffusers.DDPMScheduler` it was trained with; any
diffusers scheduler built from the same config samples with fewer steps::

    from diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    images = pipe("Small left pleural effusion.", num_inference_steps=50,
                  generator=torch.Generator().manual_seed(0)).images

Saving and loading
------------------
``pipe.save_pretrained(folder)`` writes a standard diffusers folder (``model_index.json``, one
sub-folder per module, weights as safetensors only) plus a short ``pipeline.py`` that imports
this class. :meth:`CXRDiffusionPipeline.from_pretrained` reads it back after checking that the
folder is complete, holds a ``CXRDiffusionPipeline`` and has safetensors weights (pickled
``.bin`` weights are refused, never unpickled). Plain diffusers loads the same folder through
the ``pipeline.py`` file::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder,
                                             trust_remote_code=True, use_safetensors=True)

``pipeline.py`` only imports :mod:`diffmem.pipelines`, so diffmem must be installed where the
folder is loaded. Recent diffusers (0.42 here) run a folder's ``pipeline.py`` only with
``trust_remote_code=True``; the class it returns is this very class, not a copy. Without
``custom_pipeline`` plain diffusers cannot find ``CXRDiffusionPipeline`` and fails.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffmem.checks import check_int
from diffmem.errors import ConfigError, DataError, ModelError, PromptError
from diffmem.pipelines.folder import (WEIGHTED_COMPONENTS, IndexProblem, read_model_index,
                                      weight_files)

log = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# Written next to model_index.json by save_pretrained so that plain diffusers can load the
# folder (DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)).
LOADER_SHIM = '''\
"""Written by diffmem: lets plain diffusers load this folder with
DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True).
Needs the diffmem package installed (pip install diffmem)."""
from diffmem.pipelines.pipeline_cxr import CXRDiffusionPipeline

__all__ = ["CXRDiffusionPipeline"]
'''

# What from_pretrained requires of each component's sub-folder: config file(s), and whether
# weights (safetensors) must be present.
_REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILES = {
    "unet": ("config.json",),
    "text_encoder": ("config.json",),
    "vae": ("config.json",),
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
}


@dataclass
class CXRPipelineOutput(BaseOutput):
    """Output of :class:`CXRDiffusionPipeline`.

    Attributes
    ----------
    images : list of PIL.Image.Image, np.ndarray or torch.Tensor
        Grayscale images in [0, 1]: PIL images of mode ``"L"``, a float32 array of shape
        ``(B, H, W, 1)`` or a float32 tensor of shape ``(B, 1, H, W)``; or the final latents
        for ``output_type="latent"``.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class CXRDiffusionPipeline(DiffusionPipeline):
    r"""Text-to-image pipeline for chest X-rays (DDPM/DDIM sampling with classifier-free guidance).

    Parameters
    ----------
    unet : diffusers.UNet2DConditionModel
        Denoises ``(B, C, h, w)`` samples given text hidden states; ``C = 1`` in pixel space,
        the VAE's latent channels otherwise.
    text_encoder : transformers.CLIPTextModel
        Turns token ids into the hidden states the UNet cross-attends to.
    tokenizer : transformers.PreTrainedTokenizerFast
        From :func:`~diffmem.pipelines.train_tokenizer`; pads and truncates to
        ``tokenizer.model_max_length``.
    scheduler : diffusers.SchedulerMixin
        Noise schedule; ``DDPMScheduler`` for training, any compatible scheduler for sampling.
    vae : diffusers.AutoencoderKL, optional
        Present for latent diffusion; ``None`` (the default) means pixel space.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, vae=vae)

    # ------------------------------------------------------------------ shapes
    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one sample element spans per side (1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one sample the UNet denoises (pixels or latents)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the images the pipeline outputs."""
        _, h, w = self.sample_shape
        return (h * self.vae_scale_factor, w * self.vae_scale_factor)

    # ------------------------------------------------------------------ text
    def tokenize(self, prompt: str | Sequence[str], *, warn_truncation: bool = True) -> torch.Tensor:
        """Token ids ``(B, L)`` padded to ``tokenizer.model_max_length``.

        Prompts longer than that are cut (keeping ``[EOS]`` last); with ``warn_truncation`` each
        cut prompt is logged with its index, the number of tokens dropped and the dropped text.
        """
        return self._tokenize(prompt, name="prompt" if warn_truncation else None)

    def _tokenize(self, prompt: str | Sequence[str], *, name: str | None) -> torch.Tensor:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        max_length = int(self.tokenizer.model_max_length)
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_length,
                             truncation=True, return_tensors="pt").input_ids
        if name is not None:
            full = self.tokenizer(prompts, truncation=False, padding=False, verbose=False).input_ids
            for i, row in enumerate(full):
                dropped = len(row) - max_length
                if dropped > 0:
                    label = name if isinstance(prompt, str) else f"{name}[{i}]"
                    lost = self.tokenizer.decode(row[max_length - 1:-1], skip_special_tokens=True)
                    log.warning("%s has %d tokens, more than the tokenizer's model_max_length=%d: "
                                "%d token(s) were dropped (%r)", label, len(row), max_length,
                                dropped, lost)
        return ids

    def encode_prompt(self, prompt: str | Sequence[str], device: torch.device | str,
                      num_images_per_prompt: int, do_classifier_free_guidance: bool,
                      negative_prompt: str | Sequence[str] | None = None, *,
                      prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder hidden states for the prompts (and the unconditional branch).

        Not wrapped in ``torch.no_grad``: the trainer calls it to train the text encoder. An
        empty string ``""`` is the unconditional prompt (the trainer's caption dropout).

        Parameters
        ----------
        prompt : str or list of str
            One prompt per image batch entry (``None`` when ``prompt_embeds`` is given).
        device : torch.device or str
            Where the embeddings go.
        num_images_per_prompt : int
            Each prompt's embedding is repeated this many times (``repeat_interleave``).
        do_classifier_free_guidance : bool
            Whether to also encode the unconditional branch.
        negative_prompt : str or list of str, optional
            The unconditional branch's text; ``""`` when ``None``.
        prompt_embeds, negative_prompt_embeds : torch.Tensor, optional
            Precomputed ``(B, L, D)`` embeddings, used instead of encoding the text.

        Returns
        -------
        (torch.Tensor, torch.Tensor or None)
            ``(cond, uncond)`` of shape ``(B * num_images_per_prompt, L, D)``; ``uncond`` is
            ``None`` without classifier-free guidance.
        """
        device = torch.device(device)
        if prompt_embeds is None:
            ids = self._tokenize(prompt, name="prompt")
            prompt_embeds = self.text_encoder(ids.to(device), return_dict=False)[0]
        batch_size = prompt_embeds.shape[0]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        cond = prompt_embeds.to(device=device, dtype=dtype)
        cond = cond.repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return cond, None

        if negative_prompt_embeds is None:
            if negative_prompt is None:
                negatives = [""] * batch_size
            elif isinstance(negative_prompt, str):
                negatives = [negative_prompt] * batch_size
            else:
                negatives = list(negative_prompt)
                if len(negatives) != batch_size:
                    raise PromptError(f"negative_prompt has {len(negatives)} entries but prompt "
                                      f"has {batch_size}; pass one negative prompt per prompt or "
                                      "one string")
            ids = self._tokenize(negatives, name="negative_prompt")
            negative_prompt_embeds = self.text_encoder(ids.to(device), return_dict=False)[0]
        uncond = negative_prompt_embeds.to(device=device, dtype=dtype)
        uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)
        return cond, uncond

    # ------------------------------------------------------------------ samples
    def prepare_latents(self, batch_size: int, dtype: torch.dtype, device: torch.device | str,
                        generator: torch.Generator | list[torch.Generator] | None,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """Initial noise ``(batch_size, *sample_shape)`` times the scheduler's ``init_noise_sigma``.

        A list of generators draws each batch entry from its own generator, so an image does
        not depend on what else is in the batch. ``latents`` replaces the drawn noise.
        """
        shape = (batch_size, *self.sample_shape)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ConfigError(f"generator is a list of {len(generator)} generators but "
                              f"{batch_size} images are generated (prompts x "
                              "num_images_per_prompt); pass one generator per image")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=torch.device(device),
                                   dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ConfigError(f"latents has shape {tuple(latents.shape)}, expected {shape} "
                                  "(images x sample_shape)")
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def encode_images(self, images: torch.Tensor, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Map images in [0, 1] to the space the UNet denoises (the inverse of :meth:`decode_latents`).

        Pixel space: ``2 x - 1``. Latent space: a sample of the VAE posterior of ``2 x - 1``
        (grayscale repeated to RGB for a 3-channel VAE), times ``vae.config.scaling_factor``.

        Parameters
        ----------
        images : torch.Tensor
            ``(B, 1, H, W)`` with ``(H, W) == image_size``, values in [0, 1].
        generator : torch.Generator, optional
            For the VAE posterior sample.
        """
        if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) != self.image_size:
            raise DataError(f"images has shape {tuple(images.shape)}, expected "
                            f"(B, 1, {self.image_size[0]}, {self.image_size[1]}) grayscale in [0, 1]")
        x = images * 2.0 - 1.0
        if self.vae is None:
            return x.to(device=self.unet.device, dtype=self.unet.dtype)
        x = x.to(device=self.vae.device, dtype=self.vae.dtype)
        if self.vae.config.in_channels == 3:
            x = x.repeat(1, 3, 1, 1)
        z = self.vae.encode(x).latent_dist.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map denoised samples to grayscale images ``(B, 1, H, W)`` float32 in [0, 1].

        Pixel space: ``(x + 1) / 2`` clamped. Latent space: the VAE decodes
        ``latents / scaling_factor`` (RGB output is averaged to gray).
        """
        if self.vae is None:
            images = latents
        else:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
            images = self.vae.decode(z, return_dict=False)[0]
            if images.shape[1] != 1:
                images = images.mean(dim=1, keepdim=True)
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ checks
    def check_inputs(self, prompt, negative_prompt, num_inference_steps, guidance_scale,
                     num_images_per_prompt, output_type, *, prompt_embeds=None,
                     negative_prompt_embeds=None, callback_on_step_end_tensor_inputs=None) -> None:
        """Raise :class:`PromptError` or :class:`ConfigError` naming the first bad argument."""
        if prompt is None and prompt_embeds is None:
            raise PromptError("pass a prompt (str or list of str) or prompt_embeds")
        if prompt is not None and prompt_embeds is not None:
            raise PromptError("pass either prompt or prompt_embeds, not both")
        if prompt is not None:
            if isinstance(prompt, str):
                named = [("prompt", prompt)]
            elif isinstance(prompt, (list, tuple)) and prompt:
                named = [(f"prompt[{i}]", p) for i, p in enumerate(prompt)]
            else:
                raise PromptError(f"prompt must be a non-empty string or a non-empty list of "
                                  f"strings, got {prompt!r}")
            for label, text in named:
                if not isinstance(text, str):
                    raise PromptError(f"{label} must be a string, got {type(text).__name__}")
                if not text.strip():
                    raise PromptError(f"{label} is empty ({text!r}); give the report text to "
                                      "condition on (the unconditional branch uses '' by itself; "
                                      "change it with negative_prompt)")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            n = len(prompt) if isinstance(prompt, (list, tuple)) else (
                1 if isinstance(prompt, str) else prompt_embeds.shape[0])
            if not isinstance(negative_prompt, (list, tuple)) or len(negative_prompt) != n:
                raise PromptError(f"negative_prompt must be a string or a list of {n} strings "
                                  f"(one per prompt), got {negative_prompt!r}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise PromptError("pass either negative_prompt or negative_prompt_embeds, not both")
        check_int("num_inference_steps", num_inference_steps)
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ConfigError(f"guidance_scale={guidance_scale!r}; use a finite number "
                              "(1 turns classifier-free guidance off)")
        check_int("num_images_per_prompt", num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type={output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
        unknown = [k for k in (callback_on_step_end_tensor_inputs or [])
                   if k not in self._callback_tensor_inputs]
        if unknown:
            raise ConfigError(f"callback_on_step_end_tensor_inputs has {unknown}; allowed: "
                              f"{', '.join(self._callback_tensor_inputs)}")

    def progress_bar(self, iterable=None, total=None):
        """diffusers' progress bar, hidden when ``DIFFMEM_NO_PROGRESS`` is set."""
        config = getattr(self, "_progress_bar_config", {})
        if os.environ.get("DIFFMEM_NO_PROGRESS") and isinstance(config, dict) \
                and "disable" not in config:
            self._progress_bar_config = {**config, "disable": True}
        return super().progress_bar(iterable=iterable, total=total)

    # ------------------------------------------------------------------ sampling
    # Nine positional-or-keyword parameters on purpose: the argument order of diffusers'
    # pipelines (pipe(prompt, num_inference_steps, ...)); the rest are keyword-only.
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        eta: float = 0.0,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> CXRPipelineOutput | tuple:
        """Generate chest X-rays from report text.

        Parameters
        ----------
        prompt : str or list of str
            The report text(s) to condition on; each must be non-empty.
        num_inference_steps : int, optional
            Denoising steps (the scheduler spreads them over its training timesteps).
        guidance_scale : float, optional
            Classifier-free guidance weight ``w`` in ``eps_u + w (eps_c - eps_u)``; ``w <= 1``
            runs the conditional model alone. 4 is RoentGen's choice (Chambon et al., 2022).
        negative_prompt : str or list of str, optional
            Text of the unconditional branch (default ``""``).
        num_images_per_prompt : int, optional
            Images per prompt; outputs are ordered prompt by prompt.
        generator : torch.Generator or list of torch.Generator, optional
            Seeds the noise; a list gives one generator per output image, which makes each
            image independent of the batch it was generated in.
        latents : torch.Tensor, optional
            Initial noise ``(B * num_images_per_prompt, *sample_shape)`` instead of drawing it.
        output_type : {"pil", "np", "pt", "latent"}, optional
            PIL images of mode ``"L"``; float32 ``(B, H, W, 1)`` array; float32 ``(B, 1, H, W)``
            tensor; or the final samples before decoding. Images are in [0, 1].
        return_dict : bool, optional
            Return a :class:`CXRPipelineOutput` (default) or a one-element tuple.
        eta : float, optional
            DDIM's ``eta`` (0 is deterministic DDIM); ignored by schedulers without it.
        prompt_embeds, negative_prompt_embeds : torch.Tensor, optional
            Precomputed text embeddings, e.g. perturbed by a mitigation.
        callback_on_step_end : callable, optional
            ``fn(pipe, step, timestep, tensors) -> dict`` after each step; returned tensors
            (names from ``callback_on_step_end_tensor_inputs``) replace the current ones.
        callback_on_step_end_tensor_inputs : sequence of str, optional
            Which of ``latents``, ``prompt_embeds``, ``negative_prompt_embeds`` the callback gets.

        Returns
        -------
        CXRPipelineOutput or tuple
            ``.images`` as described under ``output_type``; ``(images,)`` without ``return_dict``.

        Raises
        ------
        PromptError
            An empty or whitespace-only prompt (naming its index), or mismatched negative prompts.
        ConfigError
            A bad option value (steps, guidance, output type, generator count, latents shape).
        """
        # 1. check inputs
        self.check_inputs(prompt, negative_prompt, num_inference_steps, guidance_scale,
                          num_images_per_prompt, output_type, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)

        # 2. define call parameters
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        # 3. encode the prompt (and the unconditional branch)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, do_cfg, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)

        # 4. prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. prepare the initial noise
        latents = self.prepare_latents(batch_size * num_images_per_prompt, self.unet.dtype,
                                       device, generator, latents)

        # 6. extra scheduler step arguments (DDIM's eta, the generator of stochastic samplers)
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs = {}
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator

        # 7. denoising loop
        for i, t in enumerate(self.progress_bar(timesteps)):
            # 7.1 predict the noise, conditional and unconditional in one batch
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            text = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
            noise_pred = self.unet(model_input, t, encoder_hidden_states=text, return_dict=False)[0]

            # 7.2 classifier-free guidance
            if do_cfg:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)

            # 7.3 x_t -> x_{t-1}
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

            # 7.4 let a callback inspect or replace tensors
            if callback_on_step_end is not None:
                current = {"latents": latents, "prompt_embeds": prompt_embeds,
                           "negative_prompt_embeds": negative_prompt_embeds}
                out = callback_on_step_end(
                    self, i, t, {k: current[k] for k in callback_on_step_end_tensor_inputs}) or {}
                latents = out.get("latents", latents)
                prompt_embeds = out.get("prompt_embeds", prompt_embeds)
                negative_prompt_embeds = out.get("negative_prompt_embeds", negative_prompt_embeds)

        # 8. decode and convert
        if output_type == "latent":
            images = latents
        else:
            images = self.to_output(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return CXRPipelineOutput(images=images)

    @staticmethod
    def to_output(images: torch.Tensor, output_type: str):
        """Convert ``(B, 1, H, W)`` images in [0, 1] to ``"pt"``, ``"np"`` or ``"pil"`` output."""
        if output_type == "pt":
            return images.float()
        array = images.float().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)
        if output_type == "np":
            return array
        if output_type == "pil":
            pixels = (array[..., 0] * 255.0).round().astype(np.uint8)
            return [PIL.Image.fromarray(p) for p in pixels]
        raise ConfigError(f"output_type={output_type!r}; use one of pil, np, pt")

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        **kwargs) -> None:
        """Write a diffusers folder (safetensors weights) plus the ``pipeline.py`` loader shim.

        ``safe_serialization=False`` (pickled weights) is refused: :meth:`from_pretrained` would
        not read them back.
        """
        if not safe_serialization:
            raise ConfigError("safe_serialization=False would write pickled .bin weights, which "
                              "diffmem refuses to load; keep the default safe_serialization=True")
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        Path(save_directory, "pipeline.py").write_text(LOADER_SHIM, encoding="utf-8")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a folder written by :meth:`save_pretrained`, after checking it.

        Parameters
        ----------
        pretrained_model_name_or_path : path
            A local folder (no hub downloads).
        **kwargs
            Passed to :meth:`diffusers.DiffusionPipeline.from_pretrained` (``torch_dtype``,
            component overrides such as ``scheduler=...``); ``use_safetensors`` is forced on.

        Raises
        ------
        ModelError
            When the folder does not exist, lacks ``model_index.json``, holds another pipeline
            class, misses a component's files, or has pickled weights without safetensors.
        """
        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("use_safetensors") is False:
            raise ModelError(f"{folder}: use_safetensors=False would unpickle weights; diffmem "
                             "only loads safetensors")
        check_pipeline_folder(folder, passed=[k for k in kwargs if k in _CONFIG_FILES])
        kwargs["use_safetensors"] = True
        return super().from_pretrained(str(folder), **kwargs)


def check_pipeline_folder(folder: str | os.PathLike, *, passed: Sequence[str] = ()) -> dict:
    """Check that ``folder`` is a complete, safetensors-only ``CXRDiffusionPipeline`` folder.

    Parameters
    ----------
    folder : path
        The pipeline folder.
    passed : sequence of str, optional
        Components the caller supplies itself (not checked on disk).

    Returns
    -------
    dict
        The parsed ``model_index.json``.

    Raises
    ------
    ModelError
        Naming the folder and what is missing or wrong, and how to fix it.
    """
    folder = Path(folder)
    index = read_model_index(folder)
    if isinstance(index, IndexProblem):
        if index.kind in ("missing", "file"):
            raise ModelError(f"{folder}: not a folder; CXRDiffusionPipeline.from_pretrained "
                             "loads a local folder written by save_pretrained or `diffmem train`")
        if index.kind == "no_index":
            raise ModelError(f"{folder}: no model_index.json, so this is not a saved diffusers "
                             "pipeline; point to the folder that `diffmem train` wrote")
        raise ModelError(f"{folder / 'model_index.json'}: cannot be read as JSON "
                         f"({index.detail})")
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if class_name != CXRDiffusionPipeline.__name__:
        raise ModelError(f"{folder}: holds a {class_name!r} pipeline, not a "
                         f"{CXRDiffusionPipeline.__name__}; load other diffusers pipelines with "
                         "diffmem.models.load_model or diffusers.DiffusionPipeline.from_pretrained")
    for name in (*_REQUIRED_COMPONENTS, "vae"):
        if name in passed:
            continue
        entry = index.get(name)
        if entry is None or not isinstance(entry, list) or entry[0] is None:
            if name == "vae":
                continue
            raise ModelError(f"{folder}: model_index.json names no {name!r} component; the folder "
                             "is incomplete: save the whole pipeline again with save_pretrained")
        sub = folder / name
        if not sub.is_dir():
            raise ModelError(f"{folder}: component folder {name}/ is missing; copy the whole "
                             "pipeline folder, not parts of it")
        if not any((sub / f).is_file() for f in _CONFIG_FILES[name]):
            raise ModelError(f"{sub}: missing {' or '.join(_CONFIG_FILES[name])}; the {name} "
                             "component cannot be built")
        if name in WEIGHTED_COMPONENTS:
            safe, pickled = weight_files(sub)
            safe += [p.name for p in sub.glob("*.safetensors.index.json")]
            if not safe and pickled:
                raise ModelError(f"{sub}: weights only as pickle ({', '.join(pickled)}); "
                                 "diffmem never unpickles model files. Convert them to safetensors "
                                 "(load in a trusted session and save_pretrained with "
                                 "safe_serialization=True)")
            if not safe:
                raise ModelError(f"{sub}: no .safetensors weights; the {name} component was "
                                 "not saved completely")
    return index

"""The one door to a model: :class:`DiffusionModelAdapter` wraps our CXR pipeline or a diffusers
Stable Diffusion pipeline behind encode prompt / predict noise / sample (with hooks) / decode.

Detection, attribution and mitigation code talks to this adapter only; nothing else in diffmem
knows a pipeline class.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffmem.errors import ConfigError, DataError, ModelError, PromptError
from diffmem.models.attention import (
    AttentionContext,
    AttentionState,
    cross_attention_hooks,
)
from diffmem.utils import progress, stable_json

log = logging.getLogger(__name__)

#: ITU-R BT.601 luma weights, used to turn an RGB decoder's output into one grayscale channel.
LUMA_601 = (0.299, 0.587, 0.114)


def generation_seed(seed: int, prompt: str, index: int) -> int:
    """Seed of generation ``index`` of ``prompt`` in a :meth:`DiffusionModelAdapter.sample` call.

    A hash of ``(seed, prompt, index)``, so a prompt's generations do not depend on which other
    prompts are sampled with it, nor in what order.

    Examples
    --------
    >>> generation_seed(0, "No acute process.", 0) == generation_seed(0, "No acute process.", 0)
    True
    >>> generation_seed(0, "No acute process.", 0) == generation_seed(0, "No acute process.", 1)
    False
    """
    digest = hashlib.sha256(stable_json(["diffmem.sample", int(seed), str(prompt), int(index)])
                            .encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass
class SamplingHooks:
    """Optional callbacks that change or observe :meth:`DiffusionModelAdapter.sample`.

    Every field is optional; an unset field leaves sampling exactly as without hooks. Hooks run
    under ``torch.no_grad()``; one that needs gradients (prompt-embedding optimization) opens
    ``torch.enable_grad()`` itself. Combine several with :func:`combine_hooks`.

    Attributes
    ----------
    prompt_embeds : callable, optional
        ``prompt_embeds(cond, uncond, prompts) -> (cond, uncond)``, called once per batch before
        the denoising loop with ``(B, L, D)`` embeddings, one row per generation, and the list of
        each row's prompt. If the callable has a parameter named ``generators`` it also gets the
        rows' ``torch.Generator`` objects (seeded per generation, already used for the initial
        noise), for randomness that does not depend on batch composition; a parameter named
        ``latents`` gets the batch's initial noise ``(B, C, h, w)`` (standard normal scale, as
        drawn or as ``initial_latents`` gave it) and one named ``timesteps`` the 1-D tensor of
        the call's sampling timesteps (what prompt-embedding optimization needs: ``x_T`` and
        the first ``t``). A ``**kwargs`` parameter receives all three.
    guidance_scale : callable, optional
        ``guidance_scale(step_index, t, default) -> float``: the classifier-free guidance scale
        of step ``step_index`` (timestep ``t``), given the call's ``guidance``. A scale of 0
        skips the conditional branch at that step (the update uses ``eps_uncond`` exactly).
    initial_latents : callable or torch.Tensor, optional
        ``initial_latents(shape, generators) -> tensor`` for each batch (standard normal scale:
        the scheduler's ``init_noise_sigma`` is applied afterwards), or a fixed tensor of shape
        ``(N, C, h, w)`` for all ``N`` generations of the call, or ``(C, h, w)`` for each.
    on_step : callable, optional
        ``on_step(step_index, t, latents, eps_uncond, eps_cond) -> None``, read-only, called at
        every step with the step's input latents ``x_t`` and both noise predictions (converted
        to epsilon for v- or sample-prediction models, before guidance); ``eps_cond`` is None at
        steps whose guidance scale is 0. Rows are the batch's generations.
    attention_logits : callable, optional
        ``attention_logits(logits, ctx) -> logits`` on the pre-softmax scores ``(B*heads, Q, K)``
        of every cross-attention layer (see :class:`~diffmem.models.AttentionContext`).
    attention_probs : callable, optional
        ``attention_probs(probs, ctx) -> None``, read-only, on the probabilities
        ``(B*heads, Q, K)`` (each row sums to 1 over the K keys).
    module_hooks : mapping of str to callable, optional
        PyTorch forward hooks by UNet submodule name (``unet.named_modules()``, e.g.
        ``"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"``):
        ``hook(module, inputs, output) -> output or None``, registered for the duration of
        each UNet pass of :meth:`~DiffusionModelAdapter.sample` and
        :meth:`~DiffusionModelAdapter.predict_noise`, removed afterwards (what neuron
        deactivation and weight pruning need; the weights are never changed). Rows of the
        output are the pass's rows: ``[uncond; cond]`` (2B) at guided steps, B otherwise.
    """

    prompt_embeds: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    guidance_scale: Callable[[int, int, float], float] | None = None
    initial_latents: Callable[..., torch.Tensor] | torch.Tensor | None = None
    on_step: Callable[..., None] | None = None
    attention_logits: Callable[[torch.Tensor, AttentionContext], torch.Tensor] | None = None
    attention_probs: Callable[[torch.Tensor, AttentionContext], None] | None = None
    module_hooks: Mapping[str, Callable[..., Any]] | None = None

    @property
    def uses_attention(self) -> bool:
        """True when an attention callback is set (the UNet's cross-attention gets hooked)."""
        return self.attention_logits is not None or self.attention_probs is not None

    @property
    def plain(self) -> bool:
        """True when no callback is set except ``initial_latents`` (the plain pipeline)."""
        return all(getattr(self, name) is None for name in (
            "prompt_embeds", "guidance_scale", "on_step", "attention_logits", "attention_probs",
            "module_hooks"))


def combine_hooks(*hooks: SamplingHooks | None) -> SamplingHooks:
    """Chain several :class:`SamplingHooks` into one, applied in the order given.

    Editing hooks compose (``prompt_embeds`` and ``attention_logits`` feed each output to the
    next; ``guidance_scale`` passes each result as the next one's ``default``); read-only hooks
    (``on_step``, ``attention_probs``) are all called. Only one may set ``initial_latents``.

    Raises
    ------
    ConfigError
        When more than one of them sets ``initial_latents``.
    """
    hooks = tuple(h for h in hooks if h is not None)
    latents = [h.initial_latents for h in hooks if h.initial_latents is not None]
    if len(latents) > 1:
        raise ConfigError(f"{len(latents)} hooks set initial_latents; only one can choose the "
                          "initial noise: drop all but one")

    def pick(name: str) -> list[Callable]:
        return [getattr(h, name) for h in hooks if getattr(h, name) is not None]

    embeds, scales, steps = pick("prompt_embeds"), pick("guidance_scale"), pick("on_step")
    logits, probs = pick("attention_logits"), pick("attention_probs")

    def prompt_embeds(cond, uncond, prompts, generators=None, **extra):
        for fn in embeds:
            cond, uncond = _call_prompt_embeds(fn, cond, uncond, prompts, generators, **extra)
        return cond, uncond

    def guidance_scale(step_index, t, default):
        for fn in scales:
            default = fn(step_index, t, default)
        return default

    def on_step(*args):
        for fn in steps:
            fn(*args)

    def attention_logits(x, ctx):
        for fn in logits:
            x = fn(x, ctx)
        return x

    def attention_probs(x, ctx):
        for fn in probs:
            fn(x, ctx)

    modules: dict[str, list[Callable]] = {}
    for h in hooks:
        for name, fn in (h.module_hooks or {}).items():
            modules.setdefault(name, []).append(fn)

    return SamplingHooks(
        prompt_embeds=prompt_embeds if embeds else None,
        guidance_scale=guidance_scale if scales else None,
        initial_latents=latents[0] if latents else None,
        on_step=on_step if steps else None,
        attention_logits=attention_logits if logits else None,
        attention_probs=attention_probs if probs else None,
        module_hooks={name: _chain_forward_hooks(fns) for name, fns in modules.items()}
        if modules else None)


def _chain_forward_hooks(fns: list[Callable]) -> Callable:
    """One forward hook applying ``fns`` in order, each on the previous one's output."""
    if len(fns) == 1:
        return fns[0]

    def hook(module, inputs, output):
        for fn in fns:
            new = fn(module, inputs, output)
            output = output if new is None else new
        return output

    return hook


@contextmanager
def module_hooks(unet: torch.nn.Module, hooks: SamplingHooks | None) -> Iterator[None]:
    """Register ``hooks.module_hooks`` as forward hooks on ``unet``'s submodules, then remove
    them (nothing when unset).

    Raises
    ------
    ModelError
        When a name is not a submodule of the UNet (listing a few that are).
    """
    wanted = (hooks.module_hooks if hooks is not None else None) or {}
    if not wanted:
        yield
        return
    named = dict(unet.named_modules())
    missing = [n for n in wanted if n not in named]
    if missing:
        examples = ", ".join(n for n, _ in list(named.items())[1:4])
        raise ModelError(f"module hooks name {', '.join(map(repr, missing))}, not a submodule "
                         f"of this UNet; use names from unet.named_modules() (e.g. {examples})")
    handles = [named[n].register_forward_hook(fn) for n, fn in wanted.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _call_prompt_embeds(fn: Callable, cond, uncond, prompts, generators, **extra):
    offered = {"generators": generators, **extra}
    try:
        params = inspect.signature(fn).parameters
        any_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in offered.items() if any_kw or k in params}
    except (TypeError, ValueError):  # builtins without a signature
        kwargs = {}
    out = fn(cond, uncond, prompts, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(x, torch.Tensor)
                                                              for x in out)):
        raise ModelError("the prompt_embeds hook must return a (cond, uncond) pair of tensors; "
                         f"got {type(out).__name__}")
    if out[0].shape != cond.shape or out[1].shape != uncond.shape:
        raise ModelError(f"the prompt_embeds hook changed the embedding shapes from "
                         f"{tuple(cond.shape)}/{tuple(uncond.shape)} to "
                         f"{tuple(out[0].shape)}/{tuple(out[1].shape)}; keep them")
    return out


@dataclass
class SampleResult:
    """Images generated by :meth:`DiffusionModelAdapter.sample`, one row per generation.

    Attributes
    ----------
    images : numpy.ndarray
        float32 ``(N, H, W)`` grayscale in [0, 1].
    prompt_index : numpy.ndarray
        int64 ``(N,)``: index into ``prompts`` of each image's prompt.
    generation_index : numpy.ndarray
        int64 ``(N,)``: which generation of its prompt the image is (0 ... n_per_prompt - 1).
    seeds : numpy.ndarray
        int64 ``(N,)``: seed of each image's initial-noise generator
        (:func:`generation_seed`).
    prompts : list of str
        The prompts of the call.
    latents : torch.Tensor or None
        Final latents ``(N, C, h, w)`` on the CPU, when asked for.
    """

    images: np.ndarray
    prompt_index: np.ndarray
    generation_index: np.ndarray
    seeds: np.ndarray
    prompts: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata of the generations (the images themselves are left out)."""
        return {"n": len(self), "image_shape": list(self.images.shape[1:]),
                "prompts": list(self.prompts),
                "prompt_index": self.prompt_index.tolist(),
                "generation_index": self.generation_index.tolist(),
                "seeds": self.seeds.tolist()}


class DiffusionModelAdapter:
    """One interface to a text-to-image diffusion model (our CXR pipeline or Stable Diffusion).

    Build it with :func:`~diffmem.models.load_model`. All tensors it returns are on
    :attr:`device`; images are grayscale in [0, 1] whatever the model's channels.

    Attributes
    ----------
    kind : str
        ``"cxr"`` (:class:`diffmem.pipelines.CXRDiffusionPipeline`) or ``"stable-diffusion"``.
    pipeline : object
        The wrapped pipeline, for the rare caller that needs it.
    device : torch.device
    dtype : torch.dtype
    latent_shape : tuple of int
        ``(C, h, w)`` of what the UNet denoises (pixel models: the image itself).
    image_size : int
        Side of the generated images in pixels.
    tokenizer : transformers tokenizer
    max_length : int
        Tokens the text encoder reads (longer prompts are truncated, with a warning).
    num_train_timesteps : int
        Number of timesteps of the training noise schedule.
    scheduler : diffusers scheduler
        The inference scheduler template; each :meth:`sample` call works on a fresh copy (the
        pipeline's own ``scheduler`` is never replaced).
    train_scheduler : diffusers.DDPMScheduler
        The training noise schedule (:meth:`add_noise`, epsilon conversion).
    prediction_type : str
        What the UNet predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
    unet, text_encoder, vae
        The pipeline's modules (``vae`` is None for pixel-space models).
    source : str or None
        The folder the model was loaded from.

    Examples
    --------
    >>> from diffmem.models import load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> model = load_model(tiny_stable_diffusion(seed=0))
    >>> result = model.sample(["No acute process."], n_per_prompt=2, steps=2, seed=0)
    >>> result.images.shape, result.prompt_index.tolist()
    ((2, 16, 16), [0, 0])
    >>> cond, uncond = model.encode_prompt(["No acute process."])
    >>> x_t = model.add_noise(model.encode_images(result.images), torch.randn(2, 4, 8, 8), 500)
    >>> model.predict_noise(x_t, 500, cond).shape
    torch.Size([2, 4, 8, 8])
    """

    def __init__(self, pipeline: Any, *, kind: str, scheduler: Any, device: torch.device,
                 dtype: torch.dtype, source: str | None = None):
        from diffusers import DDPMScheduler

        self.pipeline = pipeline
        self.kind = kind
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.unet = pipeline.unet
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.vae = getattr(pipeline, "vae", None)
        self.scheduler = scheduler
        self.train_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.num_train_timesteps = int(self.train_scheduler.config.num_train_timesteps)
        self.prediction_type = str(self.train_scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ModelError(f"{source or kind}: unsupported prediction_type="
                             f"{self.prediction_type!r}; diffmem handles epsilon, v_prediction "
                             "and sample")
        sample_size = self.unet.config.sample_size
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        self.latent_shape = (int(self.unet.config.in_channels), int(h), int(w))
        factor = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_size = int(h) * factor
        self.max_length = _max_length(self.tokenizer, self.text_encoder)
        self._mask_text = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return (f"DiffusionModelAdapter(kind={self.kind!r}, source={self.source!r}, "
                f"latent_shape={self.latent_shape}, image_size={self.image_size}, "
                f"device={str(self.device)!r}, dtype={self.dtype})")

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A short hash of the weights (UNet, text encoder, VAE) and the tokenizer's vocabulary.

        Tensors are hashed by name, dtype, shape and bytes in sorted name order, so the same
        weights give the same fingerprint on any device. Computed once and cached: the adapter
        assumes its weights do not change.

        Returns
        -------
        str
            16 hex characters.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.kind.encode())
            for name, module in (("unet", self.unet), ("text_encoder", self.text_encoder),
                                 ("vae", self.vae)):
                h.update(f"|{name}|".encode())
                if module is None:
                    continue
                state = module.state_dict()
                for key in sorted(state):
                    tensor = state[key].detach()
                    h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                    flat = tensor.to("cpu").contiguous().reshape(-1)
                    h.update(flat.view(torch.uint8).numpy().tobytes())
            h.update(stable_json(sorted(self.tokenizer.get_vocab().items())).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to :attr:`max_length` and truncated to it.

        Logs a warning naming how many tokens were dropped when a prompt is too long.

        Parameters
        ----------
        prompts : str or sequence of str

        Returns
        -------
        dict
            ``input_ids`` and ``attention_mask``, int64 ``(B, max_length)`` on :attr:`device`.
        """
        prompts = _as_prompt_list(prompts)
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        full = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        over = [(p, len(ids) - self.max_length) for p, ids in zip(prompts, full)
                if len(ids) > self.max_length]
        if over:
            worst = max(over, key=lambda x: x[1])
            log.warning("%d of %d prompt(s) exceed the %d tokens the text encoder reads and were "
                        "truncated (up to %d tokens dropped, e.g. %r)", len(over), len(prompts),
                        self.max_length, worst[1], _shorten(worst[0]))
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def count_tokens(self, prompt: str) -> int:
        """Number of tokens of ``prompt`` before truncation, special tokens included."""
        return len(self.tokenizer(str(prompt), truncation=False, verbose=False)["input_ids"])

    def token_strings(self, prompt: str) -> list[str]:
        """The tokens the encoder reads for ``prompt``, special tokens included.

        Position ``i`` of the list is position ``i`` of :meth:`encode_prompt`'s output (and key
        ``i`` of cross-attention); padding positions after the end token are left out.

        Examples
        --------
        The tokens of a CLIP tokenizer look like ``['<|startoftext|>', 'no</w>', 'acute</w>',
        ..., '<|endoftext|>']``; our CXR tokenizer's like ``['[BOS]', 'no', 'acute', ...,
        '[EOS]']``.
        """
        enc = self.tokenize([prompt])
        n = int(enc["attention_mask"][0].sum())
        return self.tokenizer.convert_ids_to_tokens(enc["input_ids"][0, :n].tolist())

    def token_offsets(self, prompt: str) -> list[tuple[int, int] | None]:
        """Character span ``(start, end)`` in ``prompt`` of each token of :meth:`token_strings`.

        None for special tokens. Lets callers pool subword tokens into words or spans of the
        prompt (for example a ``___`` de-identification marker) whatever the tokenizer.

        Raises
        ------
        ModelError
            When the tokenizer is a slow (pure Python) one, which has no offsets.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            raise ModelError(f"tokenizer {type(self.tokenizer).__name__} cannot report character "
                             "offsets; save the model with a fast (tokenizers-backed) tokenizer")
        enc = self.tokenizer([str(prompt)], padding="max_length", max_length=self.max_length,
                             truncation=True, return_offsets_mapping=True,
                             return_special_tokens_mask=True)
        n = int(sum(enc["attention_mask"][0]))
        return [None if special else (int(a), int(b)) for (a, b), special in
                zip(enc["offset_mapping"][0][:n], enc["special_tokens_mask"][0][:n])]

    def encode_tokens(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text-encoder output ``(B, L, D)`` for token ids, as the pipeline computes it."""
        mask = attention_mask.to(self.device) if (self._mask_text and attention_mask is not None) \
            else None
        out = self.text_encoder(input_ids.to(self.device), attention_mask=mask)[0]
        return out.to(dtype=self.dtype)

    def encode_prompt(self, prompts: str | Sequence[str], *,
                      negative_prompt: str | Sequence[str] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional text embeddings (as the pipeline's own code makes them).

        Differentiable under ``torch.enable_grad()``; no gradient mode is forced here.

        Parameters
        ----------
        prompts : str or sequence of str
        negative_prompt : str or sequence of str, optional
            Text of the unconditional branch: one for all prompts or one per prompt. Default:
            the empty prompt ``""``.

        Returns
        -------
        cond, uncond : torch.Tensor
            ``(B, max_length, D)`` each, in :attr:`dtype` on :attr:`device`.
        """
        prompts = _as_prompt_list(prompts)
        cond = self.encode_tokens(**self.tokenize(prompts))
        negatives = _negatives(negative_prompt, len(prompts))
        if len(set(negatives)) == 1:
            uncond = self.encode_tokens(**self.tokenize(negatives[:1])).expand_as(cond).contiguous()
        else:
            uncond = self.encode_tokens(**self.tokenize(negatives))
        return cond, uncond

    # ------------------------------------------------------------------ noise
    def _timesteps(self, t: int | torch.Tensor, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ConfigError(f"timestep t must be an int, a 0-dim tensor or one per row "
                              f"({batch},); got shape {tuple(t.shape)}")
        return t.long()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor,
                  t: int | torch.Tensor) -> torch.Tensor:
        """The DDPM forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

        Uses the training schedule's cumulative alphas (Ho et al., NeurIPS 2020, eq. 4).

        Parameters
        ----------
        x0 : torch.Tensor
            Clean latents ``(B, C, h, w)`` (from :meth:`encode_images`).
        noise : torch.Tensor
            Standard normal noise, same shape.
        t : int or torch.Tensor
            One timestep for all rows or one per row, in ``[0, num_train_timesteps)``.
        """
        x0 = x0.to(self.device, self.dtype)
        timesteps = self._timesteps(t, x0.shape[0])
        if int(timesteps.min()) < 0 or int(timesteps.max()) >= self.num_train_timesteps:
            raise ConfigError(f"timestep t={t} outside [0, {self.num_train_timesteps})")
        return self.train_scheduler.add_noise(x0, noise.to(x0), timesteps)

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        abar = self.train_scheduler.alphas_cumprod.to(like.device)[t.to(like.device)]
        return abar.to(torch.float32).view(-1, *([1] * (like.ndim - 1)))

    def _to_epsilon(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert a v- or x0-prediction to the noise it implies (identity for epsilon models)."""
        if self.prediction_type == "epsilon":
            return out
        abar = self._alpha_bar(t, x_t)
        if self.prediction_type == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
            eps = abar.sqrt() * out.float() + (1 - abar).sqrt() * x_t.float()
        else:  # sample: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
            eps = (x_t.float() - abar.sqrt() * out.float()) / (1 - abar).sqrt()
        return eps.to(out.dtype)

    def _unet(self, x: torch.Tensor, t: int | torch.Tensor, enc: torch.Tensor,
              state: AttentionState | None) -> torch.Tensor:
        if state is not None:
            tt = torch.as_tensor(t)
            state.timestep = int(tt.reshape(-1)[0]) if tt.numel() else 0
        return self.unet(x, t, encoder_hidden_states=enc, return_dict=False)[0]

    def _attention_state(self, hooks: SamplingHooks | None) -> AttentionState | None:
        if hooks is None or not hooks.uses_attention:
            return None
        return AttentionState(logits_hook=hooks.attention_logits, probs_hook=hooks.attention_probs,
                              latent_hw=self.latent_shape[1:])

    def predict_noise(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: torch.Tensor, *,
                      hooks: SamplingHooks | None = None,
                      conditional: bool | torch.Tensor = True,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's noise prediction ``eps_theta(x_t, t, c)`` (no guidance).

        v- and sample-prediction models are converted to the epsilon they imply, so callers
        always get noise. Not wrapped in ``no_grad``: gradients flow to ``x_t`` and ``cond``.

        Parameters
        ----------
        x_t : torch.Tensor
            Noisy latents ``(B, C, h, w)``.
        t : int or torch.Tensor
            Timestep: an int, a 0-dim tensor or ``(B,)``.
        cond : torch.Tensor
            Text embeddings ``(B, L, D)`` or ``(1, L, D)`` (shared by all rows): the conditional
            or the unconditional ones from :meth:`encode_prompt`.
        hooks : SamplingHooks, optional
            Only the attention callbacks apply here (``step_index`` is None in their context).
        conditional : bool or torch.Tensor, optional
            Whether the rows are the conditional branch (a bool for all rows or ``(B,)``);
            reported to attention hooks as ``ctx.is_conditional``.
        token_mask : torch.Tensor, optional
            ``(B, L)`` attention mask of the tokens (from :meth:`tokenize`), reported to
            attention hooks as ``ctx.token_mask``.

        Returns
        -------
        torch.Tensor
            ``(B, C, h, w)``, same dtype as the model.
        """
        x_t = x_t.to(self.device, self.dtype)
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != self.latent_shape:
            raise ConfigError(f"x_t has shape {tuple(x_t.shape)}; this model denoises "
                              f"(B, {', '.join(map(str, self.latent_shape))}) latents")
        batch = x_t.shape[0]
        cond = cond.to(self.device, self.dtype)
        if cond.ndim != 3 or cond.shape[0] not in (1, batch):
            raise ConfigError(f"cond has shape {tuple(cond.shape)}; expected (B, L, D) with B=1 "
                              f"or B={batch} (the rows of x_t)")
        cond = cond.expand(batch, -1, -1)
        timesteps = self._timesteps(t, batch)
        state = self._attention_state(hooks)
        if state is None:
            with module_hooks(self.unet, hooks):
                out = self._unet(x_t, t, cond, None)
        else:
            state.is_conditional = _row_flags(conditional, batch, self.device)
            state.token_mask = None if token_mask is None else token_mask.to(self.device)
            with cross_attention_hooks(self.unet, state), module_hooks(self.unet, hooks):
                out = self._unet(x_t, t, cond, state)
        return self._to_epsilon(out, x_t, timesteps)

    # ------------------------------------------------------------------ images
    def encode_images(self, images: np.ndarray | torch.Tensor, *,
                      batch_size: int = 16) -> torch.Tensor:
        """Latents of images in [0, 1], the space :meth:`add_noise` and :meth:`predict_noise` use.

        Pixel models: ``2 x - 1``. Latent models: the VAE posterior mean times its scaling
        factor (grayscale repeated to RGB for a 3-channel VAE). Deterministic.

        Parameters
        ----------
        images : numpy.ndarray or torch.Tensor
            ``(N, H, W)`` grayscale, or ``(N, 1, H, W)`` / ``(N, 3, H, W)``, values in [0, 1],
            with ``H = W = image_size``.
        batch_size : int, optional
            Images per VAE call.

        Returns
        -------
        torch.Tensor
            ``(N, C, h, w)`` on :attr:`device`.
        """
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (self.image_size,) * 2:
            raise DataError(f"images of shape {tuple(x.shape)} do not fit this model; give (N, H, W)"
                            f" or (N, 1|3, H, W) with H = W = {self.image_size} (load them with "
                            f"size={self.image_size})")
        x = x.to(self.device, self.dtype) * 2 - 1
        if self.vae is None:
            if x.shape[1] != self.latent_shape[0]:
                x = x.mean(dim=1, keepdim=True).expand(-1, self.latent_shape[0], -1, -1)
            return x
        channels = int(self.vae.config.in_channels)
        if x.shape[1] != channels:
            x = x.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
        scale = float(self.vae.config.scaling_factor)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        out = []
        for i in range(0, x.shape[0], int(batch_size)):
            mean = self.vae.encode(x[i:i + int(batch_size)]).latent_dist.mean
            out.append((mean - shift) * scale)
        return torch.cat(out)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images of latents: float32 ``(N, 1, H, W)`` grayscale in [0, 1] on :attr:`device`.

        Pixel models: ``(x + 1) / 2`` clamped. Latent models: the VAE decoder's output mapped the
        same way; Stable Diffusion's RGB output is turned to gray with ITU-R BT.601 luma weights
        (CXR models decode with their pipeline's ``decode_latents``, which averages channels).
        """
        latents = latents.to(self.device, self.dtype)
        if self.kind == "cxr":  # the pipeline's own decoding (it averages RGB to gray)
            return self.pipeline.decode_latents(latents).float()
        if self.vae is None:
            x = latents
        else:
            scale = float(self.vae.config.scaling_factor)
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            x = self.vae.decode(latents / scale + shift, return_dict=False)[0]
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        if x.shape[1] == 3:
            weights = torch.tensor(LUMA_601, device=x.device).view(1, 3, 1, 1)
            x = (x * weights).sum(dim=1, keepdim=True)
        elif x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        return x

    # ------------------------------------------------------------------ sampling
    def initial_noise(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Standard normal latents ``(len(generators), C, h, w)``, one row per CPU generator.

        Drawn in float32 (float64 for a float64 model) and then cast to :attr:`dtype`, so a seed
        gives the same noise (up to rounding) in float32, float16 and bfloat16: runs of one prompt
        in different precisions start alike.
        """
        if not generators:
            return torch.zeros((0, *self.latent_shape), dtype=self.dtype)
        drawn = torch.promote_types(self.dtype, torch.float32)
        return torch.cat([torch.randn((1, *self.latent_shape), generator=g, dtype=drawn)
                          for g in generators]).to(self.dtype)

    def new_scheduler(self) -> Any:
        """A fresh copy of the inference scheduler (schedulers keep per-run state)."""
        return type(self.scheduler).from_config(self.scheduler.config)

    @torch.no_grad()
    def sample(self, prompts: str | Sequence[str], *, n_per_prompt: int = 1, steps: int = 50,
               guidance: float = 7.5, seed: int = 0, hooks: SamplingHooks | None = None,
               batch_size: int = 16, negative_prompt: str | Sequence[str] | None = None,
               eta: float = 0.0, return_latents: bool = False) -> SampleResult:
        """Generate images with classifier-free guidance (Ho & Salimans, 2022).

        Each step computes ``eps = eps_u + s (eps_c - eps_u)`` from one batched UNet call on
        ``[uncond, cond]`` (as diffusers' pipelines do), then the scheduler's update. The initial
        noise of generation ``j`` of prompt ``p`` comes from a generator seeded with
        :func:`generation_seed` ``(seed, prompts[p], j)``, so it does not depend on batching.

        Parameters
        ----------
        prompts : str or sequence of str
        n_per_prompt : int, optional
            Generations per prompt.
        steps : int, optional
            Denoising steps of the inference scheduler.
        guidance : float, optional
            Classifier-free guidance scale ``s`` (1 = conditional prediction; 0 = unconditional).
        seed : int, optional
        hooks : SamplingHooks, optional
            Mitigation or measurement callbacks; without them, the plain pipeline.
        batch_size : int, optional
            Generations per UNet call (the call batches twice as many rows for guidance).
        negative_prompt : str or sequence of str, optional
            Text of the unconditional branch (default ``""``): one for all or one per prompt.
        eta : float, optional
            DDIM noise (0 = deterministic DDIM); ignored by schedulers without it.
        return_latents : bool, optional
            Keep the final latents in the result.

        Returns
        -------
        SampleResult
            Rows ordered by prompt, then generation.
        """
        prompts = _as_prompt_list(prompts)
        for name, value in (("n_per_prompt", n_per_prompt), ("steps", steps),
                            ("batch_size", batch_size)):
            if int(value) < 1:
                raise ConfigError(f"{name}={value}; use a positive integer")
        hooks = hooks or SamplingHooks()
        negatives = _negatives(negative_prompt, len(prompts))
        rows = [(p, j) for p in range(len(prompts)) for j in range(int(n_per_prompt))]
        seeds = [generation_seed(seed, prompts[p], j) for p, j in rows]
        fixed = _fixed_latents(hooks.initial_latents, len(rows), self.latent_shape)

        # 1. encode each distinct prompt (and negative prompt) once
        texts = sorted(set(prompts) | set(negatives))
        index = {text: i for i, text in enumerate(texts)}
        tokens = self.tokenize(texts)
        masks = tokens["attention_mask"]
        table = torch.cat([self.encode_tokens(tokens["input_ids"][i:i + int(batch_size)],
                                              masks[i:i + int(batch_size)])
                           for i in range(0, len(texts), int(batch_size))])

        images, latents_out = [], []
        n_batches = (len(rows) + int(batch_size) - 1) // int(batch_size)
        for b in range(n_batches):
            part = list(range(b * int(batch_size), min(len(rows), (b + 1) * int(batch_size))))
            cond_ids = [index[prompts[rows[i][0]]] for i in part]
            uncond_ids = [index[negatives[rows[i][0]]] for i in part]
            generators = [torch.Generator("cpu").manual_seed(seeds[i]) for i in part]
            shape = (len(part), *self.latent_shape)

            # 2. initial noise, one generator per generation
            if fixed is not None:
                noise = fixed[part[0]:part[-1] + 1]
            elif callable(hooks.initial_latents):
                noise = hooks.initial_latents(shape, generators)
            else:
                noise = self.initial_noise(generators)
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
                raise ModelError(f"initial_latents gave {type(noise).__name__} "
                                 f"{tuple(getattr(noise, 'shape', ()))}; expected shape {shape}")

            # 3. embeddings (the hook may edit them)
            cond, uncond = table[cond_ids], table[uncond_ids]
            if hooks.prompt_embeds is not None:
                cond, uncond = _call_prompt_embeds(hooks.prompt_embeds, cond, uncond,
                                                   [prompts[rows[i][0]] for i in part], generators,
                                                   latents=noise,
                                                   timesteps=self._sampling_timesteps(int(steps)))
            token_mask = torch.cat([masks[uncond_ids], masks[cond_ids]])

            # 4. denoising loop; where every row's prompt is its own negative prompt (the empty
            #    prompt's generations), eps_c == eps_u and the guided update is eps_u exactly:
            #    the unconditional branch alone gives it at half the cost
            scale = float(guidance)
            if hooks.plain and cond_ids == uncond_ids:
                scale = 0.0
            latents = self._denoise(noise, (cond, uncond, token_mask), generators,
                                    steps=int(steps), guidance=scale, hooks=hooks,
                                    eta=float(eta), desc=f"sampling {b + 1}/{n_batches}")
            images.append(self.decode(latents)[:, 0].cpu().numpy())
            if return_latents:
                latents_out.append(latents.float().cpu())

        return SampleResult(
            images=np.concatenate(images).astype(np.float32, copy=False),
            prompt_index=np.array([p for p, _ in rows], dtype=np.int64),
            generation_index=np.array([j for _, j in rows], dtype=np.int64),
            seeds=np.array(seeds, dtype=np.int64), prompts=prompts,
            latents=torch.cat(latents_out) if return_latents else None)

    def _sampling_timesteps(self, steps: int) -> torch.Tensor:
        """The timesteps a ``steps``-step :meth:`sample` call visits, in order."""
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler.timesteps.clone()

    def _denoise(self, noise: torch.Tensor,
                 embeds: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 generators: list[torch.Generator], *, steps: int, guidance: float,
                 hooks: SamplingHooks, eta: float, desc: str) -> torch.Tensor:
        """The guided denoising loop from ``noise``; ``embeds`` is (cond, uncond, token_mask)
        with the mask over ``[uncond; cond]`` rows."""
        cond, uncond, token_mask = embeds
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(steps, device=self.device)
        step_params = inspect.signature(scheduler.step).parameters
        extra: dict[str, Any] = {}
        if "eta" in step_params:
            extra["eta"] = eta
        if "generator" in step_params:
            extra["generator"] = generators
        latents = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma
        batch = latents.shape[0]
        both = torch.cat([uncond, cond]).to(self.device, self.dtype)
        flags_both = torch.tensor([False] * batch + [True] * batch, device=self.device)
        state = self._attention_state(hooks)
        if state is not None:
            state.token_mask = token_mask
        with cross_attention_hooks(self.unet, state) if state is not None else nullcontext(), \
                module_hooks(self.unet, hooks):
            for i, t in enumerate(progress(scheduler.timesteps, desc=desc, unit="step")):
                scale = guidance if hooks.guidance_scale is None else float(
                    hooks.guidance_scale(i, int(t), guidance))
                if state is not None:
                    state.step_index = i
                if scale == 0:  # unconditional only: the update is eps_uncond exactly
                    model_in = scheduler.scale_model_input(latents, t)
                    if state is not None:
                        state.is_conditional = flags_both[:batch]
                        state.token_mask = token_mask[:batch]
                    out_u = self._unet(model_in, t, both[:batch], state)
                    out_c, noise_pred = None, out_u
                    if state is not None:
                        state.token_mask = token_mask
                else:
                    model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    if state is not None:
                        state.is_conditional = flags_both
                    out_u, out_c = self._unet(model_in, t, both, state).chunk(2)
                    noise_pred = out_u + scale * (out_c - out_u)
                if hooks.on_step is not None:
                    tt = self._timesteps(t, batch)
                    hooks.on_step(i, int(t), latents, self._to_epsilon(out_u, latents, tt),
                                  None if out_c is None else self._to_epsilon(out_c, latents, tt))
                latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        return latents


def _max_length(tokenizer: Any, text_encoder: Any) -> int:
    length = int(getattr(tokenizer, "model_max_length", 0) or 0)
    positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    if positions is not None and (length <= 0 or length > int(positions)):
        length = int(positions)
    if length <= 0 or length > 100_000:
        raise ModelError(f"cannot tell how many tokens the text encoder reads: tokenizer "
                         f"model_max_length={getattr(tokenizer, 'model_max_length', None)!r}; set "
                         "model_max_length in the tokenizer's tokenizer_config.json")
    return length


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise PromptError(f"prompts must be a string or a sequence of strings; got "
                          f"{type(prompts).__name__}")
    if not prompts:
        raise PromptError("prompts is empty; give at least one prompt")
    return list(prompts)


def _negatives(negative_prompt: str | Sequence[str] | None, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    negatives = list(negative_prompt)
    if len(negatives) != n or not all(isinstance(x, str) for x in negatives):
        raise PromptError(f"negative_prompt has {len(negatives)} entries for {n} prompts; give one "
                          "string for all prompts or one per prompt")
    return negatives


def _row_flags(conditional: bool | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    flags = torch.as_tensor(conditional, dtype=torch.bool, device=device)
    if flags.ndim == 0:
        flags = flags.expand(batch)
    if flags.shape != (batch,):
        raise ConfigError(f"conditional must be a bool or one flag per row ({batch},); got shape "
                          f"{tuple(flags.shape)}")
    return flags


def _fixed_latents(value: Any, n: int, latent_shape: tuple[int, ...]) -> torch.Tensor | None:
    if not isinstance(value, torch.Tensor):
        return None
    if tuple(value.shape) == latent_shape:
        return value.unsqueeze(0).expand(n, *latent_shape)
    if tuple(value.shape) == (n, *latent_shape):
        return value
    raise ModelError(f"initial_latents tensor has shape {tuple(value.shape)}; give "
                     f"{latent_shape} (same noise for every generation) or "
                     f"({n}, {', '.join(map(str, latent_shape))}) (one per generation)")


def _shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."

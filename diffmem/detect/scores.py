"""Per-prompt memorization scores computed from the model alone (no training images needed).

Every score is a function ``score(adapter, prompts, ...) -> numpy.ndarray`` of shape
``(len(prompts),)`` where **higher = more memorized**. Thresholds, AUC and TPR at low FPR live
in :mod:`diffmem.detect.evaluate` and :mod:`diffmem.detect.verdicts`; nothing here writes files.

Both scores follow the guided sampling trajectory of the adapter's inference scheduler (DDIM by
default) from a seeded initial noise ``x_T``: generation ``j`` of prompt ``p`` starts from the
same noise as :meth:`~diffmem.models.DiffusionModelAdapter.sample` would use
(:func:`~diffmem.models.generation_seed`), so scores do not depend on batching and a prompt's
score matches the images sampled for it.

=====================  =================================================  ===================
function               what                                               paper
=====================  =================================================  ===================
:func:`noise_magnitude`    mean ``||eps(x_t, c) - eps(x_t, "")||_2`` over     Wen et al., ICLR 2024
                           the first ``steps`` steps and the generations
:func:`attention_entropy`  entropy of the cross-attention over text tokens    Ren et al., ECCV 2024
                           at the first step(s)
=====================  =================================================  ===================
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from diffmem.errors import ConfigError, PromptError
from diffmem.models import (
    AttentionContext,
    DiffusionModelAdapter,
    SamplingHooks,
    generation_seed,
)
from diffmem.utils import progress

log = logging.getLogger(__name__)

__all__ = [
    "attention_entropy",
    "default_guidance",
    "noise_magnitude",
    "noise_magnitude_from_embeddings",
    "noise_magnitude_per_step",
]

#: Guidance used when the pipeline class gives no default (Stable Diffusion's 7.5).
FALLBACK_GUIDANCE = 7.5


def default_guidance(adapter: DiffusionModelAdapter) -> float:
    """The classifier-free guidance scale the model's own pipeline samples with by default.

    Read from the default of the pipeline's ``__call__(guidance_scale=...)``: 4.0 for
    :class:`~diffmem.pipelines.CXRDiffusionPipeline`, 7.5 for diffusers' Stable Diffusion
    pipelines; 7.5 when the pipeline does not say.

    Examples
    --------
    >>> from diffmem.models import load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> default_guidance(load_model(tiny_stable_diffusion(seed=0)))
    7.5
    """
    try:
        param = inspect.signature(adapter.pipeline).parameters.get("guidance_scale") \
            if callable(adapter.pipeline) else None
    except (TypeError, ValueError):
        param = None
    if param is None or not isinstance(param.default, (int, float)) \
            or isinstance(param.default, bool):
        return FALLBACK_GUIDANCE
    return float(param.default)


# ---------------------------------------------------------------------------- shared walk
def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise PromptError(f"prompts must be a string or a sequence of strings; got "
                          f"{type(prompts).__name__}")
    return list(prompts)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}={value!r}; use a positive integer")
    return int(value)


def check_trajectory(adapter: DiffusionModelAdapter, *, generations: Any, steps: Any,
                     num_inference_steps: Any, batch_size: Any, guidance: Any,
                     ) -> tuple[int, int, int, int, float]:
    """Validate the settings of a scored trajectory (shared by scores and attribution).

    Returns ``(generations, steps, num_inference_steps, batch_size, guidance)`` with the
    guidance defaulted by :func:`default_guidance`; raises :class:`ConfigError` naming the bad
    setting.
    """
    generations = _positive("generations", generations)
    steps = _positive("steps", steps)
    num_inference_steps = _positive("num_inference_steps", num_inference_steps)
    batch_size = _positive("batch_size", batch_size)
    if steps > num_inference_steps:
        raise ConfigError(f"steps={steps} but num_inference_steps={num_inference_steps}; a "
                          "score can only average over steps the sampler takes: lower steps or "
                          "raise num_inference_steps")
    guidance = default_guidance(adapter) if guidance is None else float(guidance)
    if not np.isfinite(guidance):
        raise ConfigError(f"guidance={guidance!r}; use a finite number (e.g. 7.5 for Stable "
                          "Diffusion, 4 for diffmem's CXR models)")
    return generations, steps, num_inference_steps, batch_size, guidance


def _epsilon_scheduler(adapter: DiffusionModelAdapter, num_inference_steps: int) -> Any:
    """A fresh copy of the adapter's inference scheduler that takes epsilon predictions.

    :meth:`~diffmem.models.DiffusionModelAdapter.predict_noise` always returns epsilon (v- and
    x0-predictions converted), so the scheduler is told so; the update is the same.
    """
    scheduler = type(adapter.scheduler).from_config(adapter.scheduler.config,
                                                    prediction_type="epsilon")
    scheduler.set_timesteps(num_inference_steps, device=adapter.device)
    return scheduler


def _guided_pair(adapter: DiffusionModelAdapter, x_t: torch.Tensor, t: Any, cond: torch.Tensor,
                 uncond: torch.Tensor, *, hooks: SamplingHooks | None = None,
                 token_mask: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps(x_t, uncond), eps(x_t, cond))`` from one UNet call on ``[uncond rows, cond rows]``
    (the batching of :meth:`~diffmem.models.DiffusionModelAdapter.sample`)."""
    batch = x_t.shape[0]
    cond = cond.to(adapter.device, adapter.dtype).expand(batch, -1, -1)
    uncond = uncond.to(adapter.device, adapter.dtype).expand(batch, -1, -1)
    flags = torch.tensor([False] * batch + [True] * batch, device=adapter.device)
    mask = None if token_mask is None else torch.cat(token_mask)
    eps = adapter.predict_noise(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond]),
                                hooks=hooks, conditional=flags, token_mask=mask)
    eps_u, eps_c = eps.chunk(2)
    return eps_u, eps_c


def _walk(adapter: DiffusionModelAdapter, prompts: list[str], *, generations: int, steps: int,
          num_inference_steps: int, seed: int, batch_size: int, guidance: float | None,
          visit: Callable[..., None],
          hooks_for: Callable[[list[int], torch.Tensor], SamplingHooks] | None = None,
          desc: str) -> float:
    """Follow the guided trajectory of every (prompt, generation) for ``steps`` steps.

    ``visit(rows, step_index, eps_u, eps_c)`` is called at each step with the flat row indices
    ``p * generations + j`` of the batch. ``hooks_for(rows, token_mask)`` may give hooks for a
    batch's UNet calls (attention); ``token_mask`` is the ``(B, L)`` mask of the rows' prompts.
    Returns the guidance scale used.
    """
    generations, steps, num_inference_steps, batch_size, guidance = check_trajectory(
        adapter, generations=generations, steps=steps, num_inference_steps=num_inference_steps,
        batch_size=batch_size, guidance=guidance)
    rows = [(p, j) for p in range(len(prompts)) for j in range(generations)]
    batches = [list(range(i, min(len(rows), i + batch_size)))
               for i in range(0, len(rows), batch_size)]
    with torch.no_grad():
        uncond_tokens = adapter.tokenize([""])
        uncond = adapter.encode_tokens(uncond_tokens["input_ids"],
                                       uncond_tokens["attention_mask"])
        for part in progress(batches, desc=desc, unit="batch"):
            texts = [prompts[rows[i][0]] for i in part]
            tokens = adapter.tokenize(texts)
            cond = adapter.encode_tokens(tokens["input_ids"], tokens["attention_mask"])
            masks = (uncond_tokens["attention_mask"].expand(len(part), -1),
                     tokens["attention_mask"])
            generators = [torch.Generator("cpu").manual_seed(
                generation_seed(seed, prompts[rows[i][0]], rows[i][1])) for i in part]
            noise = torch.cat([torch.randn((1, *adapter.latent_shape), generator=g,
                                           dtype=adapter.dtype) for g in generators])
            scheduler = _epsilon_scheduler(adapter, num_inference_steps)
            step_params = inspect.signature(scheduler.step).parameters
            extra: dict[str, Any] = {}
            if "eta" in step_params:
                extra["eta"] = 0.0
            if "generator" in step_params:
                extra["generator"] = generators
            latents = noise.to(adapter.device) * scheduler.init_noise_sigma
            hooks = None if hooks_for is None else hooks_for(part, tokens["attention_mask"])
            for i, t in enumerate(scheduler.timesteps[:steps]):
                model_in = scheduler.scale_model_input(latents, t)
                eps_u, eps_c = _guided_pair(adapter, model_in, t, cond, uncond, hooks=hooks,
                                            token_mask=masks)
                visit(part, i, eps_u, eps_c)
                if i + 1 < steps:
                    eps = eps_u + guidance * (eps_c - eps_u)
                    latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
    return guidance


# ---------------------------------------------------------------------------- noise magnitude
def noise_magnitude_from_embeddings(adapter: DiffusionModelAdapter, cond: torch.Tensor,
                                    uncond: torch.Tensor, x_t: torch.Tensor,
                                    t: int | torch.Tensor) -> torch.Tensor:
    """Text-conditional noise magnitude ``||eps(x_t, c) - eps(x_t, uncond)||_2`` of each row
    (Wen et al., ICLR 2024).

    The building block of :func:`noise_magnitude`, differentiable with respect to ``cond``
    (and ``uncond``, ``x_t``): token attribution takes its gradient with respect to the prompt
    embeddings and inference-time mitigation minimizes it. No gradient mode is forced: call it
    under ``torch.enable_grad()`` for gradients.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    cond : torch.Tensor
        Prompt embeddings ``(B, L, D)`` (or ``(1, L, D)`` for all rows), from
        :meth:`~diffmem.models.DiffusionModelAdapter.encode_prompt`.
    uncond : torch.Tensor
        Embeddings of the empty prompt, ``(B, L, D)`` or ``(1, L, D)``.
    x_t : torch.Tensor
        Noisy latents ``(B, C, h, w)`` at timestep ``t``, already scaled as the UNet takes them
        (for the first step: ``x_T * init_noise_sigma``, which is ``x_T`` for DDIM).
    t : int or torch.Tensor
        Timestep(s).

    Returns
    -------
    torch.Tensor
        float32 ``(B,)``: the L2 norm over all latent elements of each row's difference.

    Examples
    --------
    >>> from diffmem.models import load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> model = load_model(tiny_stable_diffusion(seed=0))
    >>> cond, uncond = model.encode_prompt(["No acute process."])
    >>> d = noise_magnitude_from_embeddings(model, cond, uncond, torch.randn(1, 4, 8, 8), 981)
    >>> d.shape
    torch.Size([1])
    """
    x_t = x_t.to(adapter.device, adapter.dtype)
    eps_u, eps_c = _guided_pair(adapter, x_t, t, cond, uncond)
    return (eps_c.float() - eps_u.float()).flatten(1).norm(dim=1)


def noise_magnitude_per_step(adapter: DiffusionModelAdapter, prompts: str | Sequence[str], *,
                             generations: int = 1, steps: int = 1, num_inference_steps: int = 50,
                             seed: int = 0, batch_size: int = 32,
                             guidance: float | None = None) -> np.ndarray:
    """Noise magnitude of every prompt, generation and step, before averaging (Wen et al.,
    ICLR 2024).

    Same parameters as :func:`noise_magnitude`.

    Returns
    -------
    numpy.ndarray
        float64 ``(len(prompts), generations, steps)``.
    """
    prompts = _check_prompts(prompts)
    if not prompts:
        return np.zeros((0, int(generations), int(steps)))
    out = np.zeros((len(prompts) * int(generations), int(steps)), dtype=np.float64)

    def visit(rows, step, eps_u, eps_c):
        d = (eps_c.float() - eps_u.float()).flatten(1).norm(dim=1)
        out[rows, step] = d.cpu().numpy()

    _walk(adapter, prompts, generations=generations, steps=steps,
          num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size,
          guidance=guidance, visit=visit, desc="noise magnitude")
    return out.reshape(len(prompts), int(generations), int(steps))


def noise_magnitude(adapter: DiffusionModelAdapter, prompts: str | Sequence[str], *,
                    generations: int = 1, steps: int = 1, num_inference_steps: int = 50,
                    seed: int = 0, batch_size: int = 32,
                    guidance: float | None = None) -> np.ndarray:
    """Noise-magnitude memorization score (Wen et al., ICLR 2024, "Detecting, Explaining, and
    Mitigating Memorization in Diffusion Models").

    For each prompt ``c``: draw ``x_T ~ N(0, I)`` per generation (seeded with
    :func:`~diffmem.models.generation_seed` ``(seed, prompt, j)``, as sampling does), and at
    each of the first ``steps`` steps ``t`` of a ``num_inference_steps``-step run of the
    adapter's inference scheduler (DDIM by default) compute

    .. math:: d_t = \\lVert \\epsilon_\\theta(x_t, t, c) - \\epsilon_\\theta(x_t, t, \\varnothing)
              \\rVert_2

    (the L2 norm over all latent elements of one sample), then move to the next step along the
    classifier-free-guided trajectory ``eps_u + guidance (eps_c - eps_u)``. The score is the mean
    of ``d_t`` over the steps and generations. Memorized prompts pull the prediction far from
    the unconditional one from the very first step, so higher = more memorized.

    Prompts are batched (one UNet call on ``2 x batch_size`` rows per step); a prompt's score
    does not depend on the batch it is in (up to float rounding).

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    prompts : str or sequence of str
    generations : int, optional
        Initial noises per prompt (default 1; the paper's strongest setting uses 4).
    steps : int, optional
        Steps averaged over, from the first (default 1: only ``x_T``; the paper's reference
        protocol uses all 50).
    num_inference_steps : int, optional
        Steps of the sampling schedule the trajectory follows (default 50); sets the timesteps.
    seed : int, optional
    batch_size : int, optional
        Generations per UNet call.
    guidance : float, optional
        Guidance scale of the trajectory; default :func:`default_guidance` (7.5 for Stable
        Diffusion as in the paper, 4.0 for diffmem's CXR pipeline). Irrelevant when
        ``steps=1``.

    Returns
    -------
    numpy.ndarray
        float64 ``(len(prompts),)``; higher = more memorized. An empty prompt scores 0.

    Examples
    --------
    >>> from diffmem.models import load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> model = load_model(tiny_stable_diffusion(seed=0))
    >>> s = noise_magnitude(model, ["No acute process.", "Small left effusion."])
    >>> s.shape, bool((s > 0).all())
    ((2,), True)
    """
    return noise_magnitude_per_step(
        adapter, prompts, generations=generations, steps=steps,
        num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size,
        guidance=guidance).mean(axis=(1, 2))


# ---------------------------------------------------------------------------- attention
def attention_entropy(adapter: DiffusionModelAdapter, prompts: str | Sequence[str], *,
                      steps: int = 1, generations: int = 1, num_inference_steps: int = 50,
                      seed: int = 0, batch_size: int = 32, guidance: float | None = None,
                      layers: Sequence[str] | Callable[[str], bool] | None = None,
                      include_padding: bool = True) -> np.ndarray:
    """Cross-attention entropy memorization score (Ren et al., ECCV 2024, "Unveiling and
    Mitigating Memorization in Text-to-Image Diffusion Models through Cross Attention").

    At each of the first ``steps`` steps of the same guided trajectory as
    :func:`noise_magnitude`, the conditional branch's cross-attention probabilities are
    averaged over the chosen layers, the heads and the image positions (queries) into one
    distribution ``a`` over the text tokens, and its entropy ``E = -sum_i a_i log a_i`` is
    taken; the score is the mean of ``E`` over the steps and generations.

    Direction: Ren et al. find that a non-memorized prompt puts most of its attention on the
    beginning token, while a memorized prompt spreads it over the trigger tokens of the prompt,
    so its entropy is *higher*; their detector ranks prompts by the entropy itself (their
    metric ``E_t`` at the first step). This function returns the entropy unchanged, so higher =
    more memorized, as for every diffmem score.

    Deviations from the paper: Ren et al. read one hand-picked UNet layer of Stable Diffusion
    (an up-block layer); by default every cross-attention layer is averaged here, because
    which layer separates best depends on the architecture (``layers=`` selects some). Their
    second metric (the change of attention on the padding "summary" tokens over the last
    steps) is not implemented.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    prompts : str or sequence of str
    steps : int, optional
        Steps averaged over, from the first (default 1, the paper's first-step metric).
    generations, num_inference_steps, seed, batch_size, guidance
        As in :func:`noise_magnitude`.
    layers : sequence of str or callable, optional
        Cross-attention layers to average (module names as in
        :attr:`~diffmem.models.AttentionContext.layer`, or a predicate on the name). Default:
        all.
    include_padding : bool, optional
        Keep the padding positions after the end token in the distribution (default True: the
        paper counts all 77 positions of Stable Diffusion's text encoder, whose padding tokens
        carry summary information). False renormalizes over the real tokens only.

    Returns
    -------
    numpy.ndarray
        float64 ``(len(prompts),)`` entropies in nats; higher = more memorized.

    Examples
    --------
    >>> from diffmem.models import load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> model = load_model(tiny_stable_diffusion(seed=0))
    >>> e = attention_entropy(model, ["No acute process."])
    >>> e.shape, bool(0 < e[0] <= np.log(model.max_length))
    ((1,), True)
    """
    prompts = _check_prompts(prompts)
    if not prompts:
        return np.zeros(0)
    if layers is None:
        keep: Callable[[str], bool] = lambda name: True
    elif callable(layers):
        keep = layers
    else:
        wanted = set(layers)
        keep = wanted.__contains__
    n_rows = len(prompts) * int(generations)
    entropy = np.zeros((n_rows, int(steps)), dtype=np.float64)
    # running sums of the attention distribution over tokens, per row of the current batch
    acc: dict[str, Any] = {"sum": None, "count": 0, "layers": set()}

    def on_probs(probs: torch.Tensor, ctx: AttentionContext) -> None:
        if not keep(ctx.layer):
            return
        acc["layers"].add(ctx.layer)
        cond_rows = ctx.conditional_rows
        p = probs[cond_rows].float()  # (b * heads, Q, K)
        b = int(ctx.is_conditional.sum())
        per_row = p.view(b, ctx.heads, p.shape[1], p.shape[2]).mean(dim=(1, 2))  # (b, K)
        acc["sum"] = per_row if acc["sum"] is None else acc["sum"] + per_row
        acc["count"] += 1

    masks: dict[str, torch.Tensor] = {}

    def hooks_for(part: list[int], token_mask: torch.Tensor) -> SamplingHooks:
        masks["cond"] = token_mask
        return SamplingHooks(attention_probs=on_probs)

    def visit(rows, step, eps_u, eps_c):
        if acc["count"] == 0:
            raise ConfigError(f"layers={layers!r} selects no cross-attention layer of this "
                              "model; give names as reported in AttentionContext.layer")
        a = (acc["sum"] / acc["count"]).double()
        if not include_padding:
            a = a * masks["cond"].to(a)
            a = a / a.sum(dim=1, keepdim=True)
        a = a.clamp_min(1e-30)
        entropy[rows, step] = (-(a * a.log()).sum(dim=1)).cpu().numpy()
        acc["sum"], acc["count"] = None, 0

    _walk(adapter, prompts, generations=generations, steps=steps,
          num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size,
          guidance=guidance, visit=visit, hooks_for=hooks_for, desc="attention entropy")
    log.debug("attention entropy averaged over %d layer(s)", len(acc["layers"]))
    return entropy.reshape(len(prompts), int(generations), int(steps)).mean(axis=(1, 2))

"""Per-prompt memorization scores computed from the model alone (no training images needed).

Every score is a function ``score(adapter, prompts, ...) -> numpy.ndarray`` of shape
``(len(prompts),)`` where **higher = more memorized**. Thresholds, AUC and TPR at low FPR live
in :mod:`diffmem.detect.evaluate` and :mod:`diffmem.detect.verdicts`; nothing here writes files.

Both scores follow the guided sampling trajectory of the adapter's inference scheduler (DDIM by
default) from a seeded initial noise ``x_T``, walked by :func:`diffmem.models.walk_trajectory`
(the walker token attribution uses too): generation ``j`` of prompt ``p`` starts from the same
noise as :meth:`~diffmem.models.DiffusionModelAdapter.sample` would use
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
    guided_pair,
    noise_gap,
    trajectory_noise_gaps,
    walk_trajectory,
)

# re-exported for older imports; their home is diffmem.models.trajectory
from diffmem.models.trajectory import check_trajectory, default_guidance

log = logging.getLogger(__name__)

__all__ = [
    "attention_entropy",
    "default_guidance",
    "noise_magnitude",
    "noise_magnitude_from_embeddings",
    "noise_magnitude_per_step",
]

# ---------------------------------------------------------------------------- shared walk
def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise PromptError(f"prompts must be a string or a sequence of strings; got "
                          f"{type(prompts).__name__}")
    return list(prompts)


def _prompt_rows(adapter: DiffusionModelAdapter, prompts: list[str], *, generations: int,
                 seed: int) -> tuple[list[int], Callable[[list[int]], Any]]:
    """Seeds and a batch encoder of the rows ``p * generations + j`` of every (prompt,
    generation), for :func:`~diffmem.models.walk_trajectory`: row seeds are
    :func:`~diffmem.models.generation_seed` ``(seed, prompt, j)``, as sampling's; prompts are
    encoded batch by batch, so memory does not grow with the number of prompts."""
    rows = [(p, j) for p in range(len(prompts)) for j in range(generations)]
    seeds = [generation_seed(seed, prompts[p], j) for p, j in rows]

    def encode(part: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            tokens = adapter.tokenize([prompts[rows[i][0]] for i in part])
            return (adapter.encode_tokens(tokens["input_ids"], tokens["attention_mask"]),
                    tokens["attention_mask"])

    return seeds, encode


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
    eps_u, eps_c = guided_pair(adapter, x_t, t, cond, uncond)
    return noise_gap(eps_c, eps_u)


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
    generations, steps, num_inference_steps, batch_size, guidance = check_trajectory(
        adapter, generations=generations, steps=steps, num_inference_steps=num_inference_steps,
        batch_size=batch_size, guidance=guidance)
    seeds, encode = _prompt_rows(adapter, prompts, generations=generations, seed=seed)
    out = trajectory_noise_gaps(adapter, encode, seeds, steps=steps,
                                num_inference_steps=num_inference_steps, guidance=guidance,
                                batch_size=batch_size, desc="noise magnitude")
    return out.reshape(len(prompts), generations, steps)


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
    generations, steps, num_inference_steps, batch_size, guidance = check_trajectory(
        adapter, generations=generations, steps=steps, num_inference_steps=num_inference_steps,
        batch_size=batch_size, guidance=guidance)
    entropy = np.zeros((len(prompts) * generations, steps), dtype=np.float64)
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

    seeds, encode = _prompt_rows(adapter, prompts, generations=generations, seed=seed)
    walk = walk_trajectory(adapter, encode, seeds, steps=steps,
                           num_inference_steps=num_inference_steps, guidance=guidance,
                           batch_size=batch_size, hooks=SamplingHooks(attention_probs=on_probs),
                           desc="attention entropy")
    for step in walk:
        if acc["count"] == 0:
            raise ConfigError(f"layers={layers!r} selects no cross-attention layer of this "
                              "model; give names as reported in AttentionContext.layer")
        a = (acc["sum"] / acc["count"]).double()
        if not include_padding:
            a = a * step.token_mask.to(a)
            a = a / a.sum(dim=1, keepdim=True)
        a = a.clamp_min(1e-30)
        entropy[step.rows, step.index] = (-(a * a.log()).sum(dim=1)).cpu().numpy()
        acc["sum"], acc["count"] = None, 0
    log.debug("attention entropy averaged over %d layer(s)", len(acc["layers"]))
    return entropy.reshape(len(prompts), generations, steps).mean(axis=(1, 2))

"""The guided sampling trajectory that memorization scores and token attribution follow, and the
text-conditional noise gap ``||eps_c - eps_u||`` measured on it (Wen et al., ICLR 2024).

One home for what :mod:`diffmem.detect.scores` (noise magnitude, attention entropy) and
:mod:`diffmem.attribution` (gradient, occlusion, attention) walk, so an attribution explains the
very numbers a score gave:

===============================  ====================================================
:func:`check_trajectory`         validate ``generations``, ``steps``,
                                 ``num_inference_steps``, ``batch_size``, ``guidance``
:func:`epsilon_scheduler`        a fresh copy of the adapter's inference scheduler that
                                 takes epsilon predictions
:func:`seeded_noise`             the initial noise ``x_T`` of rows, seeded like
                                 :meth:`~diffmem.models.DiffusionModelAdapter.sample`
:func:`guided_pair`              ``(eps_u, eps_c)`` from one UNet call on
                                 ``[uncond, cond]``
:func:`walk_trajectory`          the first ``steps`` steps of the guided trajectory of
                                 many rows, batched: one :class:`TrajectoryStep` per
                                 batch and step
:func:`trajectory_noise_gaps`    the noise gap of every row at every step of that walk
:func:`noise_gap`                ``||eps_c - eps_u||_2`` per row (Wen et al., ICLR 2024)
===============================  ====================================================

A *row* is one (conditional embedding, seed) pair. Row ``r`` starts from the noise of a
``torch.Generator`` seeded with ``seeds[r]``, and the same generator then feeds the scheduler's
own randomness (DDPM's posterior noise, ancestral and SDE solvers), exactly as
:meth:`~diffmem.models.DiffusionModelAdapter.sample` does. Scores pass
:func:`~diffmem.models.generation_seed` ``(seed, prompt, j)`` for generation ``j`` of each
prompt; attribution passes the same seeds for every embedding variant of one prompt, so the
variants are compared on the prompt's own trajectory noise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffmem.checks import check_int
from diffmem.errors import ConfigError
from diffmem.models.adapter import DiffusionModelAdapter, SamplingHooks
from diffmem.utils import progress

__all__ = [
    "FALLBACK_GUIDANCE",
    "TrajectoryStep",
    "check_trajectory",
    "default_guidance",
    "epsilon_scheduler",
    "guided_pair",
    "noise_gap",
    "seeded_noise",
    "trajectory_noise_gaps",
    "walk_trajectory",
]

#: Guidance used when the pipeline class gives no default (Stable Diffusion's 7.5).
FALLBACK_GUIDANCE = 7.5

#: What :func:`walk_trajectory` takes as the rows' conditional embeddings: a ``(R, L, D)``
#: tensor, or a function of a batch's row indices returning ``(cond (b, L, D), mask (b, L))``.
RowEmbeddings = torch.Tensor | Callable[[list[int]], tuple[torch.Tensor, torch.Tensor | None]]


def noise_gap(eps_c: torch.Tensor, eps_u: torch.Tensor) -> torch.Tensor:
    """Text-conditional noise gap ``||eps_c - eps_u||_2`` of each row (Wen et al., ICLR 2024,
    "Detecting, Explaining, and Mitigating Memorization in Diffusion Models").

    The L2 norm over all latent elements of the difference between the conditional and the
    unconditional noise prediction of one sample; Wen et al.'s memorization signal. Computed in
    float32 whatever the model's dtype; differentiable (no gradient mode is forced).

    Parameters
    ----------
    eps_c, eps_u : torch.Tensor
        Conditional and unconditional predictions ``(B, ...)``.

    Returns
    -------
    torch.Tensor
        float32 ``(B,)``.

    Examples
    --------
    >>> noise_gap(torch.tensor([[3.0, 4.0], [1.0, 1.0]]), torch.zeros(2, 2)).tolist()
    [5.0, 1.4142135381698608]
    """
    return (eps_c.float() - eps_u.float()).flatten(1).norm(dim=1)


def default_guidance(adapter: DiffusionModelAdapter) -> float:
    """The classifier-free guidance scale the model's own pipeline samples with by default.

    Read from the default of the pipeline's ``__call__(guidance_scale=...)``: 4.0 for
    :class:`~diffmem.pipelines.CXRDiffusionPipeline`, 7.5 for diffusers' Stable Diffusion
    pipelines; :data:`FALLBACK_GUIDANCE` (7.5) when the pipeline does not say.

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


def check_trajectory(adapter: DiffusionModelAdapter, *, generations: Any, steps: Any,
                     num_inference_steps: Any, batch_size: Any, guidance: Any,
                     ) -> tuple[int, int, int, int, float]:
    """Validate the settings of a scored trajectory (shared by scores and attribution).

    Returns
    -------
    tuple
        ``(generations, steps, num_inference_steps, batch_size, guidance)`` as ints and a float,
        the guidance defaulted by :func:`default_guidance` when None.

    Raises
    ------
    ConfigError
        Naming the bad setting: a count that is not a positive integer, ``steps`` above
        ``num_inference_steps``, a guidance that is not finite.

    Examples
    --------
    >>> from diffmem.models import load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> model = load_model(tiny_stable_diffusion(seed=0))
    >>> check_trajectory(model, generations=2, steps=1, num_inference_steps=50, batch_size=8,
    ...                  guidance=None)
    (2, 1, 50, 8, 7.5)
    """
    generations = check_int("generations", generations)
    steps = check_int("steps", steps)
    num_inference_steps = check_int("num_inference_steps", num_inference_steps)
    batch_size = check_int("batch_size", batch_size)
    if steps > num_inference_steps:
        raise ConfigError(f"steps={steps} but num_inference_steps={num_inference_steps}; a "
                          "score can only average over steps the sampler takes: lower steps or "
                          "raise num_inference_steps")
    guidance = default_guidance(adapter) if guidance is None else float(guidance)
    if not np.isfinite(guidance):
        raise ConfigError(f"guidance={guidance!r}; use a finite number (e.g. 7.5 for Stable "
                          "Diffusion, 4 for diffmem's CXR models)")
    return generations, steps, num_inference_steps, batch_size, guidance


def epsilon_scheduler(adapter: DiffusionModelAdapter, num_inference_steps: int) -> Any:
    """A fresh copy of the adapter's inference scheduler, set to ``num_inference_steps`` steps,
    that takes epsilon predictions.

    :meth:`~diffmem.models.DiffusionModelAdapter.predict_noise` always returns epsilon (v- and
    x0-predictions converted), so the scheduler is told so; the update is the same as the one
    :meth:`~diffmem.models.DiffusionModelAdapter.sample` makes from the raw prediction.
    """
    scheduler = type(adapter.scheduler).from_config(adapter.scheduler.config,
                                                    prediction_type="epsilon")
    scheduler.set_timesteps(int(num_inference_steps), device=adapter.device)
    return scheduler


def seeded_noise(adapter: DiffusionModelAdapter, seeds: Sequence[int],
                 ) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial noise ``x_T`` of rows seeded one generator each, as
    :meth:`~diffmem.models.DiffusionModelAdapter.sample` draws it.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    seeds : sequence of int
        One seed per row (for sampling's rows: :func:`~diffmem.models.generation_seed`).

    Returns
    -------
    noise : torch.Tensor
        ``(len(seeds), C, h, w)`` standard normal, in the adapter's dtype, on the CPU.
    generators : list of torch.Generator
        The rows' CPU generators, advanced past the noise: the scheduler's own randomness comes
        from them next.
    """
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return adapter.initial_noise(generators), generators


def guided_pair(adapter: DiffusionModelAdapter, x_t: torch.Tensor, t: Any, cond: torch.Tensor,
                uncond: torch.Tensor, *, hooks: SamplingHooks | None = None,
                cond_mask: torch.Tensor | None = None, uncond_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eps(x_t, uncond), eps(x_t, cond))`` from one UNet call on ``[uncond rows, cond rows]``
    (the batching of classifier-free guidance in
    :meth:`~diffmem.models.DiffusionModelAdapter.sample`).

    Differentiable with respect to ``cond``, ``uncond`` and ``x_t``; no gradient mode is forced.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    x_t : torch.Tensor
        UNet input ``(B, C, h, w)`` (already scaled by the scheduler's ``scale_model_input``).
    t : int or torch.Tensor
        Timestep.
    cond, uncond : torch.Tensor
        ``(B, L, D)`` or ``(1, L, D)`` text embeddings of the conditional and unconditional
        branch.
    hooks : SamplingHooks, optional
        Attention hooks; they see the uncond rows as ``ctx.is_conditional == False``.
    cond_mask, uncond_mask : torch.Tensor, optional
        ``(B, L)`` or ``(1, L)`` token masks of the two branches, reported to attention hooks
        as ``ctx.token_mask`` (a branch without one counts every position as a token).

    Returns
    -------
    eps_u, eps_c : torch.Tensor
        ``(B, C, h, w)`` each, epsilon predictions in the model's dtype.
    """
    batch = x_t.shape[0]
    cond = cond.to(adapter.device, adapter.dtype).expand(batch, -1, -1)
    uncond = uncond.to(adapter.device, adapter.dtype).expand(batch, -1, -1)
    flags = torch.tensor([False] * batch + [True] * batch, device=adapter.device)
    mask = None
    if cond_mask is not None or uncond_mask is not None:
        ones = torch.ones((batch, cond.shape[1]), dtype=torch.long, device=adapter.device)
        parts = [ones if m is None else m.to(adapter.device).expand(batch, -1)
                 for m in (uncond_mask, cond_mask)]
        mask = torch.cat(parts)
    eps = adapter.predict_noise(torch.cat([x_t, x_t]), t, torch.cat([uncond, cond]),
                                hooks=hooks, conditional=flags, token_mask=mask)
    eps_u, eps_c = eps.chunk(2)
    return eps_u, eps_c


@dataclass
class TrajectoryStep:
    """One batch at one step of :func:`walk_trajectory`.

    Attributes
    ----------
    rows : list of int
        Indices of the batch's rows (into the walk's ``seeds``).
    index : int
        Step index, 0 for the first step (``x_T``).
    t : torch.Tensor
        The step's timestep.
    latents : torch.Tensor
        ``x_t`` ``(b, C, h, w)`` before the scheduler's input scaling.
    model_input : torch.Tensor
        ``scale_model_input(x_t, t)``, what the UNet took (equal to ``latents`` for DDIM/DDPM).
    eps_u, eps_c : torch.Tensor
        Unconditional and conditional epsilon predictions ``(b, C, h, w)``; with
        ``grad=True`` they carry the autograd graph back to the walk's ``cond``.
    cond : torch.Tensor
        The rows' conditional embeddings ``(b, L, D)`` as given to the UNet.
    token_mask : torch.Tensor or None
        The rows' token mask ``(b, L)`` (1 = token, 0 = padding), when known.
    """

    rows: list[int]
    index: int
    t: torch.Tensor
    latents: torch.Tensor
    model_input: torch.Tensor
    eps_u: torch.Tensor
    eps_c: torch.Tensor
    cond: torch.Tensor
    token_mask: torch.Tensor | None


def _batch_cond(cond: RowEmbeddings, part: list[int], token_mask: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if callable(cond) and not isinstance(cond, torch.Tensor):
        out, mask = cond(part)
        if out.ndim != 3 or out.shape[0] != len(part):
            raise ConfigError(f"the row-embedding function gave shape {tuple(out.shape)} for "
                              f"{len(part)} row(s); return (rows, L, D) embeddings")
        return out, mask
    mask = None if token_mask is None else token_mask[part]
    return cond[part], mask


def _check_rows(cond: RowEmbeddings, seeds: Sequence[int],
                token_mask: torch.Tensor | None) -> None:
    if isinstance(cond, torch.Tensor):
        if cond.ndim != 3 or cond.shape[0] != len(seeds):
            raise ConfigError(f"cond has shape {tuple(cond.shape)} for {len(seeds)} seed(s); "
                              "give one (L, D) embedding per row: (len(seeds), L, D)")
    elif not callable(cond):
        raise ConfigError(f"cond must be a (rows, L, D) tensor or a function of row indices; "
                          f"got {type(cond).__name__}")
    if token_mask is not None and (token_mask.ndim != 2 or token_mask.shape[0] != len(seeds)):
        raise ConfigError(f"token_mask has shape {tuple(token_mask.shape)} for {len(seeds)} "
                          "seed(s); give one (L,) mask per row")


def walk_trajectory(adapter: DiffusionModelAdapter, cond: RowEmbeddings, seeds: Sequence[int],
                    *, steps: int, num_inference_steps: int = 50, guidance: float | None = None,
                    batch_size: int = 32, token_mask: torch.Tensor | None = None,
                    hooks: SamplingHooks | None = None, grad: bool = False,
                    desc: str = "trajectory") -> Iterator[TrajectoryStep]:
    """Walk the first ``steps`` steps of the classifier-free-guided sampling trajectory of each
    row (Ho & Salimans, 2022), yielding the noise predictions along it (the trajectory on which
    Wen et al., ICLR 2024, measure memorization).

    Rows are processed in batches of ``batch_size`` (one UNet call on ``2 x batch`` rows per
    step). For each batch: draw ``x_T`` with :func:`seeded_noise` ``(seeds[rows])``, scale by
    the scheduler's ``init_noise_sigma``, and at step ``i`` with timestep ``t``: predict
    ``(eps_u, eps_c)`` with :func:`guided_pair` against the empty prompt, **yield** a
    :class:`TrajectoryStep`, then (if another step follows) update the latents with the
    :func:`epsilon_scheduler`'s step on ``eps_u + guidance (eps_c - eps_u)``, passing the rows'
    generators to schedulers that take a ``generator`` (DDPM, ancestral, SDE) and ``eta=0`` to
    those that take ``eta`` (deterministic DDIM). A row's trajectory therefore equals the one
    :meth:`~diffmem.models.DiffusionModelAdapter.sample` follows for the same seed and settings
    and does not depend on the batch it is in (up to float rounding).

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    cond : torch.Tensor or callable
        The rows' conditional embeddings: a ``(len(seeds), L, D)`` tensor (indexing keeps any
        autograd graph), or ``cond(rows) -> (embeddings (b, L, D), token_mask (b, L) or None)``
        called once per batch, for callers with many rows (memory stays bounded by the batch).
    seeds : sequence of int
        One seed per row.
    steps : int
        Steps walked, from the first.
    num_inference_steps : int, optional
        Steps of the sampling schedule (sets the timesteps; default 50).
    guidance : float, optional
        Guidance scale of the trajectory; default :func:`default_guidance`.
    batch_size : int, optional
        Rows per UNet call.
    token_mask : torch.Tensor, optional
        ``(len(seeds), L)`` token masks of a tensor ``cond`` (a callable gives its own), passed
        to attention hooks as ``ctx.token_mask`` with the empty prompt's mask for the
        unconditional rows.
    hooks : SamplingHooks, optional
        Attention hooks for every UNet call (``attention_probs``, ``attention_logits``); the
        other fields are ignored.
    grad : bool, optional
        Run the UNet calls with gradients enabled, so ``eps_c`` (and the yielded ``cond``) carry
        the graph back to a ``cond`` that requires grad; take the gradient (with respect to the
        step's ``cond`` or the whole ``cond``) before asking for the next step. Each step
        indexes ``cond`` (or calls it) anew, so each step has its own graph. The walk itself
        is always detached (``x_t`` is a constant, as in Wen et al.'s token significance).
    desc : str, optional
        Progress-bar label.

    Yields
    ------
    TrajectoryStep
        Batch by batch, step by step within a batch. The walk holds no gradient mode while the
        caller handles a step.

    Raises
    ------
    ConfigError
        For bad settings (see :func:`check_trajectory`) or embeddings that do not match the seeds.

    Examples
    --------
    >>> from diffmem.models import generation_seed, load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> model = load_model(tiny_stable_diffusion(seed=0))
    >>> cond, _ = model.encode_prompt(["No acute process."])
    >>> seeds = [generation_seed(0, "No acute process.", j) for j in range(2)]
    >>> walk = walk_trajectory(model, cond.expand(2, -1, -1), seeds, steps=2,
    ...                        num_inference_steps=10)
    >>> [(s.rows, s.index, noise_gap(s.eps_c, s.eps_u).shape) for s in walk]
    [([0, 1], 0, torch.Size([2])), ([0, 1], 1, torch.Size([2]))]
    """
    # checked here, at the call, not at the first step of the generator below
    _, steps, num_inference_steps, batch_size, guidance = check_trajectory(
        adapter, generations=1, steps=steps, num_inference_steps=num_inference_steps,
        batch_size=batch_size, guidance=guidance)
    seeds = [int(s) for s in seeds]
    _check_rows(cond, seeds, token_mask)
    plan = _Plan(steps=steps, num_inference_steps=num_inference_steps, guidance=guidance,
                 batch_size=batch_size, hooks=hooks, grad=bool(grad), desc=str(desc))
    return _walk(adapter, cond, seeds, token_mask, plan)


@dataclass(frozen=True)
class _Plan:
    """The checked settings of one walk."""

    steps: int
    num_inference_steps: int
    guidance: float
    batch_size: int
    hooks: SamplingHooks | None
    grad: bool
    desc: str


def _walk(adapter: DiffusionModelAdapter, cond: RowEmbeddings, seeds: list[int],
          token_mask: torch.Tensor | None, plan: _Plan) -> Iterator[TrajectoryStep]:
    batches = [list(range(i, min(len(seeds), i + plan.batch_size)))
               for i in range(0, len(seeds), plan.batch_size)]
    with torch.no_grad():
        empty = adapter.tokenize([""])
        uncond = adapter.encode_tokens(empty["input_ids"], empty["attention_mask"])
    for part in progress(batches, desc=plan.desc, unit="batch"):
        with torch.set_grad_enabled(plan.grad):  # indexing keeps a graph to cond
            rows_cond, rows_mask = _batch_cond(cond, part, token_mask)
        noise, generators = seeded_noise(adapter, [seeds[r] for r in part])
        scheduler = epsilon_scheduler(adapter, plan.num_inference_steps)
        step_params = inspect.signature(scheduler.step).parameters
        extra: dict[str, Any] = {}
        if "eta" in step_params:
            extra["eta"] = 0.0
        if "generator" in step_params:
            extra["generator"] = generators
        latents = noise.to(adapter.device) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps[:plan.steps]):
            with torch.set_grad_enabled(plan.grad):
                if plan.grad and i > 0:  # each step its own graph back to the given cond
                    rows_cond, rows_mask = _batch_cond(cond, part, token_mask)
                model_in = scheduler.scale_model_input(latents, t)
                eps_u, eps_c = guided_pair(adapter, model_in, t, rows_cond, uncond,
                                           hooks=plan.hooks, cond_mask=rows_mask,
                                           uncond_mask=empty["attention_mask"])
            yield TrajectoryStep(rows=part, index=i, t=t, latents=latents, model_input=model_in,
                                 eps_u=eps_u, eps_c=eps_c, cond=rows_cond, token_mask=rows_mask)
            if i + 1 < plan.steps:
                with torch.no_grad():
                    eps_u, eps_c = eps_u.detach(), eps_c.detach()
                    eps = eps_u + plan.guidance * (eps_c - eps_u)
                    latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]


def trajectory_noise_gaps(adapter: DiffusionModelAdapter, cond: RowEmbeddings,
                          seeds: Sequence[int], *, steps: int, num_inference_steps: int = 50,
                          guidance: float | None = None, batch_size: int = 32,
                          token_mask: torch.Tensor | None = None,
                          hooks: SamplingHooks | None = None,
                          desc: str = "noise magnitude") -> np.ndarray:
    """Noise gap :func:`noise_gap` of every row at every step of :func:`walk_trajectory`
    (Wen et al., ICLR 2024's memorization signal along the guided trajectory).

    Parameters
    ----------
    adapter, cond, seeds, steps, num_inference_steps, guidance, batch_size, token_mask, hooks, desc
        As for :func:`walk_trajectory` (no gradients are kept).

    Returns
    -------
    numpy.ndarray
        float64 ``(len(seeds), steps)``.
    """
    walk = walk_trajectory(adapter, cond, seeds, steps=steps,
                           num_inference_steps=num_inference_steps, guidance=guidance,
                           batch_size=batch_size, token_mask=token_mask, hooks=hooks, desc=desc)
    out = np.zeros((len(seeds), int(steps)), dtype=np.float64)
    for step in walk:
        out[step.rows, step.index] = noise_gap(step.eps_c, step.eps_u).cpu().numpy()
    return out

"""Per-prompt token attribution: which units of a prompt drive a model's memorization signal.

Every method is a function with one signature,
``method(adapter, prompt, *, generations, steps, num_inference_steps, guidance, seed,
batch_size, truncate) -> TokenAttribution`` (occlusion takes a few more options), registered by
name; :func:`attribute` calls one by name and an unknown name raises an error listing them.

=============  ==============================================================  ================
method         score of unit ``u``                                              after
=============  ==============================================================  ================
``gradient``   ``|| d/de_i  ||eps(x_t, e) - eps(x_t, "")||_2 ||``: the norm     Wen et al.,
               of the gradient of the noise magnitude with respect to the      ICLR 2024
               text encoder's output embedding of token ``i``, averaged over   (token
               the unit's tokens                                               significance)
``occlusion``  drop of the noise magnitude when the unit's tokens are          Zeiler & Fergus,
               removed (or replaced by padding); optionally the drop of the    ECCV 2014
               generated images' similarity to their nearest training image    (occlusion)
``attention``  cross-attention probability mass on the unit's tokens,         Hertz et al.,
               averaged over image positions, heads, layers, steps and         ICLR 2023
               generations                                                     (attention maps)
=============  ==============================================================  ================

All three follow the same guided DDIM trajectory from the same seeded initial noises as
:func:`diffmem.detect.scores.noise_magnitude` (generation ``j`` of a prompt starts from
:func:`~diffmem.models.generation_seed` ``(seed, prompt, j)``), and average over the first
``steps`` steps and the ``generations``; each result carries the prompt's noise magnitude as
``memorization``. Tokens are pooled into units by :func:`~diffmem.attribution.pool_tokens`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffmem.attribution.result import TokenAttribution
from diffmem.attribution.units import Unit, pool_tokens
from diffmem.errors import ConfigError, PromptError
from diffmem.models import AttentionContext, DiffusionModelAdapter, SamplingHooks, generation_seed

log = logging.getLogger(__name__)

__all__ = [
    "OCCLUSION_MODES",
    "attention",
    "attribute",
    "get_method",
    "gradient",
    "list_methods",
    "occlusion",
    "register_method",
]

_METHODS: dict[str, Callable[..., TokenAttribution]] = {}

#: How occlusion takes a unit out: delete its tokens (the rest shift left, as if the words were
#: not written) or overwrite them with the padding token (positions kept).
OCCLUSION_MODES = ("remove", "pad")
OCCLUSION_TARGETS = ("magnitude", "similarity")


def register_method(name: str) -> Callable[[Callable[..., TokenAttribution]],
                                           Callable[..., TokenAttribution]]:
    """Decorator: make an attribution function available to :func:`attribute` as ``name``."""
    def wrap(fn: Callable[..., TokenAttribution]) -> Callable[..., TokenAttribution]:
        _METHODS[name] = fn
        return fn
    return wrap


def list_methods() -> list[str]:
    """Names of the registered attribution methods.

    Examples
    --------
    >>> list_methods()
    ['attention', 'gradient', 'occlusion']
    """
    return sorted(_METHODS)


def get_method(name: str) -> Callable[..., TokenAttribution]:
    """The attribution function registered as ``name``.

    Raises
    ------
    ConfigError
        For an unknown name; the message lists the known ones.
    """
    if name not in _METHODS:
        raise ConfigError(f"unknown attribution method {name!r}; known methods: "
                          f"{', '.join(list_methods())}")
    return _METHODS[name]


def attribute(adapter: DiffusionModelAdapter, prompt: str, *, method: str = "gradient",
              **options: Any) -> TokenAttribution:
    """Attribute ``prompt``'s memorization signal to its units with the method named ``method``.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    prompt : str
    method : str, optional
        One of :func:`list_methods` (default ``"gradient"``).
    **options
        The method's keyword options (``generations``, ``steps``, ``seed``...).

    Returns
    -------
    TokenAttribution

    Raises
    ------
    ConfigError
        For an unknown method or an option it does not take (the message lists those it does).
    PromptError
        For an empty prompt, a prompt made only of de-identification markers, or one longer
        than the text encoder reads (unless ``truncate=True``).

    Examples
    --------
    >>> from diffmem.models import load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> model = load_model(tiny_stable_diffusion(seed=0))
    >>> result = attribute(model, "Dr. ___ was notified.", method="gradient", generations=2)
    >>> result.texts, result.scores.shape
    (['Dr', '.', '___', 'was', 'notified', '.'], (6,))
    """
    fn = get_method(method)
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("adapter", "prompt")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"attribution method {method!r} takes no option(s) {unknown}; it takes "
                          f"{accepted}")
    return fn(adapter, prompt, **options)


# ---------------------------------------------------------------------------- shared parts
@dataclass
class _Prepared:
    """A prompt ready for attribution: units, token ids, embeddings and initial noises."""

    prompt: str
    units: list[Unit]
    tokens: list[str]
    input_ids: torch.Tensor  # (1, L)
    mask: torch.Tensor  # (1, L)
    cond: torch.Tensor  # (1, L, D)
    uncond: torch.Tensor  # (1, L, D)
    noise: torch.Tensor  # (G, C, h, w)
    guidance: float
    params: dict[str, Any]


def _prepare(adapter: DiffusionModelAdapter, prompt: str, *, generations: int, steps: int,
             num_inference_steps: int, guidance: float | None, seed: int, batch_size: int,
             truncate: bool) -> _Prepared:
    from diffmem.detect.scores import check_trajectory

    # 1. check inputs
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string; got {type(prompt).__name__}")
    generations, steps, num_inference_steps, batch_size, guidance = check_trajectory(
        adapter, generations=generations, steps=steps, num_inference_steps=num_inference_steps,
        batch_size=batch_size, guidance=guidance)

    # 2. units
    units, tokens = pool_tokens(prompt, adapter.tokenizer, max_length=adapter.max_length,
                                truncate=truncate)
    if not units:
        raise PromptError(f"prompt {prompt!r} has no token the text encoder reads; give a prompt "
                          "with words")
    if not any(u.kind in ("word", "phi") for u in units):
        raise PromptError(
            f"prompt {prompt!r} is made only of de-identification markers and punctuation "
            f"({', '.join(sorted({u.text for u in units}))}); attribution ranks the units of a "
            "prompt against each other, so give a prompt with words too (a dataset scan counts "
            "such prompts in its marker statistics)")

    # 3. embeddings and initial noises (as diffmem.detect.scores draws them)
    with torch.no_grad():
        # the ids adapter.tokenize gives, without its truncation warning (pool_tokens has
        # already refused an over-long prompt unless truncate=True)
        enc = adapter.tokenizer([prompt], padding="max_length", max_length=adapter.max_length,
                                truncation=True, return_tensors="pt")
        enc = {k: enc[k].to(adapter.device) for k in ("input_ids", "attention_mask")}
        cond = adapter.encode_tokens(enc["input_ids"], enc["attention_mask"])
        empty = adapter.tokenize([""])
        uncond = adapter.encode_tokens(empty["input_ids"], empty["attention_mask"])
    noise = torch.cat([
        torch.randn((1, *adapter.latent_shape), dtype=adapter.dtype,
                    generator=torch.Generator("cpu").manual_seed(generation_seed(seed, prompt, j)))
        for j in range(generations)])
    params = {"generations": generations, "steps": steps,
              "num_inference_steps": num_inference_steps, "guidance": guidance,
              "seed": int(seed), "truncate": bool(truncate)}
    return _Prepared(prompt, units, tokens, enc["input_ids"], enc["attention_mask"], cond, uncond,
                     noise, guidance, params | {"batch_size": batch_size})


def _scheduler(adapter: DiffusionModelAdapter, num_inference_steps: int) -> Any:
    # Same construction as diffmem.detect.scores' trajectory (copied on purpose, so attribution
    # and the noise-magnitude score walk the same steps): the adapter's inference scheduler,
    # told that predictions are epsilon (predict_noise converts v/x0 predictions).
    scheduler = type(adapter.scheduler).from_config(adapter.scheduler.config,
                                                    prediction_type="epsilon")
    scheduler.set_timesteps(num_inference_steps, device=adapter.device)
    return scheduler


def _rollout(adapter: DiffusionModelAdapter, conds: torch.Tensor, prep: _Prepared, *,
             hooks: SamplingHooks | None = None, keep_inputs: bool = False,
             ) -> tuple[np.ndarray, list[tuple[torch.Tensor, Any]] | None]:
    """Noise magnitudes of ``V`` prompt embeddings ``conds`` on the guided trajectory.

    Every embedding starts from the same ``G`` initial noises (those of ``prep.prompt``), so
    variants of a prompt are compared pairwise. Returns float64 ``(V, G, S)`` magnitudes and,
    with ``keep_inputs`` (``V == 1``), the UNet inputs ``(G, C, h, w)`` and timestep of each step.
    """
    p = prep.params
    n_var, n_gen, n_steps = conds.shape[0], prep.noise.shape[0], p["steps"]
    rows = [(v, g) for v in range(n_var) for g in range(n_gen)]
    out = np.zeros((n_var * n_gen, n_steps), dtype=np.float64)
    inputs: list[list[torch.Tensor]] = [[] for _ in range(n_steps)]
    timesteps: list[Any] = [None] * n_steps
    size = p["batch_size"]
    with torch.no_grad():
        for lo in range(0, len(rows), size):
            part = rows[lo:lo + size]
            b = len(part)
            cond = conds[[v for v, _ in part]].to(adapter.device, adapter.dtype)
            uncond = prep.uncond.to(adapter.device, adapter.dtype).expand(b, -1, -1)
            scheduler = _scheduler(adapter, p["num_inference_steps"])
            step_params = inspect.signature(scheduler.step).parameters
            extra = {"eta": 0.0} if "eta" in step_params else {}
            latents = prep.noise[[g for _, g in part]].to(adapter.device) \
                * scheduler.init_noise_sigma
            flags = torch.tensor([False] * b + [True] * b, device=adapter.device)
            for s, t in enumerate(scheduler.timesteps[:n_steps]):
                model_in = scheduler.scale_model_input(latents, t)
                eps = adapter.predict_noise(torch.cat([model_in, model_in]), t,
                                            torch.cat([uncond, cond]), hooks=hooks,
                                            conditional=flags)
                eps_u, eps_c = eps.chunk(2)
                out[lo:lo + b, s] = (eps_c.float() - eps_u.float()).flatten(1).norm(dim=1) \
                    .cpu().numpy()
                if keep_inputs:
                    inputs[s].append(model_in)
                    timesteps[s] = t
                if s + 1 < n_steps:
                    guided = eps_u + prep.guidance * (eps_c - eps_u)
                    latents = scheduler.step(guided, t, latents, **extra, return_dict=False)[0]
    kept = [(torch.cat(x), t) for x, t in zip(inputs, timesteps)] if keep_inputs else None
    return out.reshape(n_var, n_gen, n_steps), kept


def _pool_mean(units: list[Unit], per_token: np.ndarray) -> np.ndarray:
    return np.array([float(per_token[list(u.tokens)].mean()) for u in units], dtype=np.float64)


def _pool_sum(units: list[Unit], per_token: np.ndarray) -> np.ndarray:
    return np.array([float(per_token[list(u.tokens)].sum()) for u in units], dtype=np.float64)


def _variant_ids(prep: _Prepared, unit: Unit | Sequence[Unit], mode: str, pad_id: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask of the prompt with ``unit`` (or every unit of a sequence) occluded."""
    ids, mask = prep.input_ids[0].clone(), prep.mask[0].clone()
    drop = torch.zeros_like(mask, dtype=torch.bool)
    units = [unit] if isinstance(unit, Unit) else list(unit)
    drop[[i for u in units for i in u.tokens]] = True
    if mode == "pad":
        ids[drop] = pad_id
        return ids, mask
    keep = (mask.bool() & ~drop).nonzero().flatten()
    new_ids = torch.full_like(ids, pad_id)
    new_mask = torch.zeros_like(mask)
    new_ids[:len(keep)] = ids[keep]
    new_mask[:len(keep)] = 1
    return new_ids, new_mask


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _variant_embeddings(adapter: DiffusionModelAdapter, prep: _Prepared, mode: str,
                        ) -> torch.Tensor:
    """Text embeddings ``(len(units), L, D)`` of the prompt with each unit occluded."""
    pad = _pad_id(adapter.tokenizer)
    pairs = [_variant_ids(prep, u, mode, pad) for u in prep.units]
    ids = torch.stack([a for a, _ in pairs])
    masks = torch.stack([m for _, m in pairs])
    size = prep.params["batch_size"]
    with torch.no_grad():
        return torch.cat([adapter.encode_tokens(ids[i:i + size], masks[i:i + size])
                          for i in range(0, len(pairs), size)])


def _result(prep: _Prepared, scores: np.ndarray, method: str, memorization: float,
            token_scores: np.ndarray | None = None, *, extra: dict[str, Any] | None = None,
            details: dict[str, Any] | None = None) -> TokenAttribution:
    params = {k: v for k, v in prep.params.items() if k != "batch_size"} | (extra or {})
    return TokenAttribution(prompt=prep.prompt, units=prep.units, scores=scores, method=method,
                            memorization=float(memorization), tokens=prep.tokens,
                            token_scores=token_scores, params=params, details=details or {})


# ---------------------------------------------------------------------------- methods
@register_method("gradient")
def gradient(adapter: DiffusionModelAdapter, prompt: str, *, generations: int = 4,
             steps: int = 1, num_inference_steps: int = 50, guidance: float | None = None,
             seed: int = 0, batch_size: int = 32, truncate: bool = False) -> TokenAttribution:
    """Token significance by the gradient of the noise magnitude (Wen et al., ICLR 2024).

    For each generation and each of the first ``steps`` steps of the guided trajectory, with
    ``e`` the text encoder's output embeddings of the prompt, the unit score is

    .. math:: \\lVert \\nabla_{e_u} \\lVert \\epsilon_\\theta(x_t, t, e)
              - \\epsilon_\\theta(x_t, t, \\varnothing) \\rVert_2 \\rVert_2

    averaged over steps and generations. Wen et al. score single tokens; a unit cut into
    several tokens (``___`` read as ``_ _ _``, a rare word spelled in pieces) gets the *mean* of
    its tokens' gradient norms, so a unit's score does not grow with the number of pieces the
    tokenizer makes of it. (Pooling by the norm over all the unit's tokens together favoured
    long multi-token units such as times of day; on the demo model their deletion lowered the
    memorization score less than a random unit's, while mean pooling passed the deletion test.)
    ``x_t`` is held fixed (the trajectory of the unperturbed prompt), as in the paper, which
    differentiates the first step's magnitude only.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    prompt : str
    generations : int, optional
        Initial noises averaged over (default 4).
    steps : int, optional
        Trajectory steps averaged over, from the first (default 1, as Wen et al.).
    num_inference_steps : int, optional
        Steps of the sampling schedule (sets the timesteps; default 50).
    guidance : float, optional
        Guidance scale of the trajectory (default: the pipeline's own,
        :func:`~diffmem.detect.scores.default_guidance`); irrelevant when ``steps=1``.
    seed : int, optional
    batch_size : int, optional
        Rows per UNet call.
    truncate : bool, optional
        Attribute the part of an over-long prompt the encoder reads instead of raising.

    Returns
    -------
    TokenAttribution
        ``token_scores`` holds each token's gradient norm (0 for special tokens).
    """
    from diffmem.detect.scores import noise_magnitude_from_embeddings

    prep = _prepare(adapter, prompt, generations=generations, steps=steps,
                    num_inference_steps=num_inference_steps, guidance=guidance, seed=seed,
                    batch_size=batch_size, truncate=truncate)
    if prep.params["steps"] == 1:  # the first step's input is the initial noise itself
        scheduler = _scheduler(adapter, prep.params["num_inference_steps"])
        t0 = scheduler.timesteps[0]
        kept = [(scheduler.scale_model_input(prep.noise.to(adapter.device)
                                             * scheduler.init_noise_sigma, t0), t0)]
    else:
        _, kept = _rollout(adapter, prep.cond, prep, keep_inputs=True)
    token_sum = np.zeros(prep.cond.shape[1])
    magnitude = 0.0
    n_rows = 0
    size = prep.params["batch_size"]
    for x_t, t in kept:
        for lo in range(0, x_t.shape[0], size):
            x = x_t[lo:lo + size]
            e = prep.cond.detach().expand(x.shape[0], -1, -1).clone().requires_grad_(True)
            with torch.enable_grad():
                d = noise_magnitude_from_embeddings(adapter, e, prep.uncond, x, t)
                (grad,) = torch.autograd.grad(d.sum(), e)
            token_sum += grad.double().norm(dim=2).sum(dim=0).cpu().numpy()  # (L,) per token
            magnitude += float(d.detach().double().sum())
            n_rows += x.shape[0]
    token_scores = token_sum / n_rows
    owned = np.zeros_like(token_scores, dtype=bool)
    owned[[i for u in prep.units for i in u.tokens]] = True
    token_scores[~owned] = 0.0
    return _result(prep, _pool_mean(prep.units, token_scores), "gradient", magnitude / n_rows,
                   token_scores)


@register_method("occlusion")
def occlusion(adapter: DiffusionModelAdapter, prompt: str, *, generations: int = 4,
              steps: int = 1, num_inference_steps: int = 50, guidance: float | None = None,
              seed: int = 0, batch_size: int = 32, truncate: bool = False, mode: str = "remove",
              target: str = "magnitude", reference: Any = None, backend: Any = "pixel",
              ) -> TokenAttribution:
    """Occlusion attribution: how much the memorization signal drops without each unit (after
    Zeiler & Fergus, ECCV 2014, applied to prompt tokens).

    The score of unit ``u`` is ``M(prompt) - M(prompt without u)``, with ``M`` the noise
    magnitude of Wen et al. (2024) averaged over the same initial noises, steps and generations
    for every variant (a paired comparison). Negative scores mean the prompt is *more*
    memorization-prone without the unit.

    Optionally (``reference`` given) images are generated for the prompt and every variant from
    the same initial noises (the full ``num_inference_steps``-step sampler) and the drop of
    their mean similarity to the nearest reference (training) image is measured as well; with
    ``target="similarity"`` that drop becomes the score. This costs one full sampling run per
    unit and generation.

    Parameters
    ----------
    adapter, prompt, generations, steps, num_inference_steps, guidance, seed, batch_size, truncate
        As for :func:`gradient`.
    mode : {"remove", "pad"}, optional
        ``"remove"`` (default) deletes the unit's tokens, the rest shifting left;
        ``"pad"`` overwrites them with the padding token, keeping positions.
    target : {"magnitude", "similarity"}, optional
        Which drop is the score (default the noise magnitude's).
    reference : CXRDataset, numpy.ndarray or ReferenceFeatures, optional
        Training images for the similarity drop (see
        :func:`~diffmem.detect.nearest_neighbors`).
    backend : str or SimilarityBackend, optional
        Similarity backend for the similarity drop (default ``"pixel"``).

    Returns
    -------
    TokenAttribution
        ``details`` holds ``magnitude_drop`` (always) and, with a reference,
        ``similarity`` (prompt's mean top-1 similarity) and ``similarity_drop``.
    """
    if mode not in OCCLUSION_MODES:
        raise ConfigError(f"occlusion mode={mode!r}; use one of {list(OCCLUSION_MODES)}")
    if target not in OCCLUSION_TARGETS:
        raise ConfigError(f"occlusion target={target!r}; use one of {list(OCCLUSION_TARGETS)}")
    if target == "similarity" and reference is None:
        raise ConfigError("occlusion target='similarity' needs reference= the training images "
                          "(a CXRDataset, an image array or ReferenceFeatures)")
    prep = _prepare(adapter, prompt, generations=generations, steps=steps,
                    num_inference_steps=num_inference_steps, guidance=guidance, seed=seed,
                    batch_size=batch_size, truncate=truncate)
    variants = _variant_embeddings(adapter, prep, mode)
    mags, _ = _rollout(adapter, torch.cat([prep.cond.to(variants), variants]), prep)
    per_variant = mags.mean(axis=(1, 2))
    drop = per_variant[0] - per_variant[1:]
    details: dict[str, Any] = {"magnitude_drop": drop.tolist()}
    scores = drop
    if reference is not None:
        sims = _similarities(adapter, torch.cat([prep.cond.to(variants), variants]), prep,
                             reference, backend)
        details["similarity"] = float(sims[0])
        details["similarity_drop"] = (sims[0] - sims[1:]).tolist()
        if target == "similarity":
            scores = sims[0] - sims[1:]
    return _result(prep, scores, "occlusion", float(per_variant[0]),
                   extra={"mode": mode, "target": target}, details=details)


def _similarities(adapter: DiffusionModelAdapter, conds: torch.Tensor, prep: _Prepared,
                  reference: Any, backend: Any) -> np.ndarray:
    """Mean top-1 similarity to ``reference`` of images generated from each embedding."""
    from diffmem.detect.neighbors import nearest_neighbors

    n_var, n_gen = conds.shape[0], prep.noise.shape[0]
    # sample() encodes prompt strings; give each variant a name and swap in its embeddings
    names = [f"diffmem occlusion variant {v}" for v in range(n_var)]
    table = dict(zip(names, conds))

    def swap(cond: torch.Tensor, uncond: torch.Tensor, prompts: list[str]):
        return torch.stack([table[p] for p in prompts]).to(cond), uncond

    result = adapter.sample(names, n_per_prompt=n_gen, steps=prep.params["num_inference_steps"],
                            guidance=prep.guidance, seed=prep.params["seed"],
                            batch_size=prep.params["batch_size"],
                            hooks=SamplingHooks(prompt_embeds=swap,
                                                initial_latents=prep.noise.repeat(n_var, 1, 1, 1)))
    nn = nearest_neighbors(result.images, reference, backend=backend, k=1)
    return nn.similarities[:, 0].reshape(n_var, n_gen).mean(axis=1)


@register_method("attention")
def attention(adapter: DiffusionModelAdapter, prompt: str, *, generations: int = 4,
              steps: int = 1, num_inference_steps: int = 50, guidance: float | None = None,
              seed: int = 0, batch_size: int = 32, truncate: bool = False) -> TokenAttribution:
    """Cross-attention mass of each unit (attention maps as in Hertz et al., ICLR 2023).

    The conditional branch's cross-attention probabilities are averaged over image positions
    and heads in every cross-attention layer, then over layers (each layer counts once), steps
    and generations; a unit's score is the sum over its tokens, i.e. the share of attention it
    receives. The start token, which takes most attention in CLIP-style encoders, and padding
    belong to no unit, so unit scores sum to less than 1.

    Parameters
    ----------
    adapter, prompt, generations, steps, num_inference_steps, guidance, seed, batch_size, truncate
        As for :func:`gradient`.

    Returns
    -------
    TokenAttribution
        ``token_scores`` holds the mean attention on every token position.
    """
    prep = _prepare(adapter, prompt, generations=generations, steps=steps,
                    num_inference_steps=num_inference_steps, guidance=guidance, seed=seed,
                    batch_size=batch_size, truncate=truncate)
    acc: dict[str, Any] = {"sum": torch.zeros(prep.cond.shape[1], dtype=torch.float64),
                           "count": 0}

    def on_probs(probs: torch.Tensor, ctx: AttentionContext) -> None:
        b = int(ctx.is_conditional.sum())
        p = probs[ctx.conditional_rows].double()
        per_row = p.view(b, ctx.heads, p.shape[1], p.shape[2]).mean(dim=(1, 2))  # (b, K)
        acc["sum"] += per_row.sum(dim=0).cpu()
        acc["count"] += b

    mags, _ = _rollout(adapter, prep.cond, prep, hooks=SamplingHooks(attention_probs=on_probs))
    n_layers = max(acc["count"] // (prep.noise.shape[0] * prep.params["steps"]), 1)
    token_scores = (acc["sum"] / max(acc["count"], 1)).numpy()
    log.debug("attention averaged over %d layer(s)", n_layers)
    return _result(prep, _pool_sum(prep.units, token_scores), "attention", float(mags.mean()),
                   token_scores)

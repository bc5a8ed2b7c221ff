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

All three walk the guided trajectory with the walker
:func:`diffmem.models.walk_trajectory` that :func:`diffmem.detect.scores.noise_magnitude`
uses, from the same seeds (generation ``j`` of a prompt: :func:`~diffmem.models.generation_seed`
``(seed, prompt, j)``, for the initial noise and the scheduler's own randomness), and average
over the first ``steps`` steps and the ``generations``; each result carries the prompt's noise
magnitude as ``memorization``, equal to the score ``noise_magnitude`` gives it with the same
settings. Tokens are pooled into units by :func:`~diffmem.attribution.pool_tokens`.
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
from diffmem.models import (
    AttentionContext,
    DiffusionModelAdapter,
    SamplingHooks,
    check_trajectory,
    generation_seed,
    noise_gap,
    seeded_noise,
    trajectory_noise_gaps,
    walk_trajectory,
)
from diffmem.registry import Registry

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METHOD",
    "OCCLUSION_MODES",
    "attention",
    "attribute",
    "checked_method",
    "get_method",
    "gradient",
    "integrated_gradients",
    "list_methods",
    "occlusion",
    "register_method",
]

_METHODS: Registry[Callable[..., TokenAttribution]] = Registry("attribution method",
                                                              known="known methods")

#: The method :func:`attribute`, ``diffmem attribute`` and ``diffmem scan`` use unless told
#: otherwise. Integrated gradients won on the planted-trigger benchmark (README, "Planted
#: triggers"): the trigger was the top unit of 39 of 40 trigger prompts, against 1 of 40 for Wen
#: et al.'s output-embedding gradient and 0 of 40 for attention (chance 2 of 40).
DEFAULT_METHOD = "integrated_gradients"

#: How occlusion takes a unit out: delete its tokens (the rest shift left, as if the words were
#: not written) or overwrite them with the padding token (positions kept).
OCCLUSION_MODES = ("remove", "pad")
OCCLUSION_TARGETS = ("magnitude", "similarity")


def register_method(name: str) -> Callable[[Callable[..., TokenAttribution]],
                                           Callable[..., TokenAttribution]]:
    """Decorator: make an attribution function available to :func:`attribute` as ``name``."""
    return _METHODS.register(name)


def list_methods() -> list[str]:
    """Names of the registered attribution methods.

    Examples
    --------
    >>> list_methods()
    ['attention', 'gradient', 'integrated_gradients', 'occlusion']
    """
    return _METHODS.names()


def get_method(name: str) -> Callable[..., TokenAttribution]:
    """The attribution function registered as ``name``.

    Raises
    ------
    ConfigError
        For an unknown name; the message lists the known ones.
    """
    return _METHODS.get(name)


def checked_method(name: str | None) -> str:
    """``name``, or :data:`DEFAULT_METHOD` for None, checked against the registry.

    Raises
    ------
    ConfigError
        For an unknown name; the message lists the known ones.
    """
    name = DEFAULT_METHOD if name is None else name
    get_method(name)
    return name


def attribute(adapter: DiffusionModelAdapter, prompt: str, *, method: str = DEFAULT_METHOD,
              **options: Any) -> TokenAttribution:
    """Attribute ``prompt``'s memorization signal to its units with the method named ``method``.

    Parameters
    ----------
    adapter : DiffusionModelAdapter
    prompt : str
    method : str, optional
        One of :func:`list_methods` (default :data:`DEFAULT_METHOD`,
        ``"integrated_gradients"``).
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
    """A prompt ready for attribution: units, token ids, embeddings and the seeds of its
    generations (the trajectory noise of :func:`diffmem.models.walk_trajectory`)."""

    prompt: str
    units: list[Unit]
    tokens: list[str]
    input_ids: torch.Tensor  # (1, L)
    mask: torch.Tensor  # (1, L)
    cond: torch.Tensor  # (1, L, D)
    seeds: list[int]  # (G,): generation_seed(seed, prompt, j)
    guidance: float
    params: dict[str, Any]

    def walk_options(self) -> dict[str, Any]:
        """The keyword options of :func:`~diffmem.models.walk_trajectory` for this prompt."""
        p = self.params
        return {"steps": p["steps"], "num_inference_steps": p["num_inference_steps"],
                "guidance": self.guidance, "batch_size": p["batch_size"]}


# Nine keyword-only parameters on purpose: the trajectory settings of the public methods'
# signatures, passed through by name (a settings object would hide them from their docstrings).
def _prepare(adapter: DiffusionModelAdapter, prompt: str, *, generations: int, steps: int,
             num_inference_steps: int, guidance: float | None, seed: int, batch_size: int,
             truncate: bool) -> _Prepared:
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

    # 3. embeddings; the generations' seeds are those of diffmem.detect.scores
    with torch.no_grad():
        # the ids adapter.tokenize gives, without its truncation warning (pool_tokens has
        # already refused an over-long prompt unless truncate=True)
        enc = adapter.tokenizer([prompt], padding="max_length", max_length=adapter.max_length,
                                truncation=True, return_tensors="pt")
        enc = {k: enc[k].to(adapter.device) for k in ("input_ids", "attention_mask")}
        cond = adapter.encode_tokens(enc["input_ids"], enc["attention_mask"])
    seeds = [generation_seed(seed, prompt, j) for j in range(generations)]
    params = {"generations": generations, "steps": steps,
              "num_inference_steps": num_inference_steps, "guidance": guidance,
              "seed": int(seed), "truncate": bool(truncate)}
    return _Prepared(prompt, units, tokens, enc["input_ids"], enc["attention_mask"], cond, seeds,
                     guidance, params | {"batch_size": batch_size})


def _magnitudes(adapter: DiffusionModelAdapter, conds: torch.Tensor, masks: torch.Tensor,
                prep: _Prepared, *, hooks: SamplingHooks | None = None) -> np.ndarray:
    """Noise magnitudes of ``V`` prompt embeddings ``conds`` (token masks ``masks``, ``(V, L)``)
    on the guided trajectory, float64 ``(V, G, S)``.

    Every embedding walks from the prompt's own ``G`` seeds (initial noise and scheduler
    randomness), so variants of a prompt are compared pairwise, on the trajectory
    :func:`diffmem.detect.scores.noise_magnitude` scores the prompt on.
    """
    n_var, n_gen = conds.shape[0], len(prep.seeds)

    def rows(part: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        variants = [r // n_gen for r in part]  # row r = (variant r // G, generation r % G)
        return conds[variants], masks[variants]

    gaps = trajectory_noise_gaps(adapter, rows, prep.seeds * n_var, hooks=hooks,
                                 desc="attribution", **prep.walk_options())
    return gaps.reshape(n_var, n_gen, -1)


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
                        drops: Sequence[Sequence[Unit]] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings ``(V, L, D)`` of the prompt with each unit occluded (or, given
    ``drops``, with each listed set of units occluded together), and their token masks
    ``(V, L)``."""
    pad = _pad_id(adapter.tokenizer)
    pairs = [_variant_ids(prep, u, mode, pad)
             for u in (prep.units if drops is None else drops)]
    ids = torch.stack([a for a, _ in pairs])
    masks = torch.stack([m for _, m in pairs])
    size = prep.params["batch_size"]
    with torch.no_grad():
        embeds = torch.cat([adapter.encode_tokens(ids[i:i + size], masks[i:i + size])
                            for i in range(0, len(pairs), size)])
    return embeds, masks


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
    prep = _prepare(adapter, prompt, generations=generations, steps=steps,
                    num_inference_steps=num_inference_steps, guidance=guidance, seed=seed,
                    batch_size=batch_size, truncate=truncate)
    n_gen = len(prep.seeds)
    # one leaf per generation; x_t follows the unperturbed prompt's trajectory, held constant
    e = prep.cond.detach().expand(n_gen, -1, -1).clone().requires_grad_(True)
    token_sum = np.zeros(prep.cond.shape[1])
    magnitude = 0.0
    n_rows = 0
    for step in walk_trajectory(adapter, e, prep.seeds, token_mask=prep.mask.expand(n_gen, -1),
                                grad=True, desc="gradient", **prep.walk_options()):
        with torch.enable_grad():
            d = noise_gap(step.eps_c, step.eps_u)
            (grad,) = torch.autograd.grad(d.sum(), step.cond)  # (b, L, D): the batch's rows
        token_sum += grad.double().norm(dim=2).sum(dim=0).cpu().numpy()  # (L,) per token
        magnitude += float(d.detach().double().sum())
        n_rows += len(step.rows)
    token_scores = token_sum / n_rows
    owned = np.zeros_like(token_scores, dtype=bool)
    owned[[i for u in prep.units for i in u.tokens]] = True
    token_scores[~owned] = 0.0
    return _result(prep, _pool_mean(prep.units, token_scores), "gradient", magnitude / n_rows,
                   token_scores)


def _encode_from_token_embeddings(adapter: DiffusionModelAdapter, prep: _Prepared,
                                  token_embeds: torch.Tensor) -> torch.Tensor:
    """Text-encoder output ``(1, L, D)`` with the token-embedding lookup's output replaced by
    ``token_embeds`` ``(1, L, D_in)`` (position embeddings and the rest of the encoder as is),
    differentiable with respect to ``token_embeds``."""
    lookup = adapter.text_encoder.get_input_embeddings()
    handle = lookup.register_forward_hook(lambda _m, _i, out: token_embeds.to(out.dtype))
    try:
        with torch.enable_grad():
            return adapter.encode_tokens(prep.input_ids, prep.mask)
    finally:
        handle.remove()


@register_method("integrated_gradients")
def integrated_gradients(adapter: DiffusionModelAdapter, prompt: str, *, generations: int = 4,
                         steps: int = 1, num_inference_steps: int = 50,
                         guidance: float | None = None, seed: int = 0, batch_size: int = 32,
                         truncate: bool = False, ig_steps: int = 4) -> TokenAttribution:
    r"""Integrated gradients of the noise magnitude at the token embeddings (Sundararajan, Taly &
    Yan, ICML 2017).

    With ``x`` the text encoder's *input* token embeddings of the prompt and ``x'`` the same
    with every unit's tokens replaced by the padding token's embedding (special tokens and
    positions kept), token ``i`` gets

    .. math:: (x_i - x'_i) \cdot \frac{1}{m} \sum_{k=1}^{m}
              \nabla_{x_i} M\big(x' + \tfrac{k - 1/2}{m} (x - x')\big)

    summed over the embedding dimensions (a midpoint Riemann sum with ``m = ig_steps``), where
    ``M`` is the noise magnitude of Wen et al. (2024) on the trajectory of
    :func:`diffmem.models.walk_trajectory`, averaged over the ``generations`` and ``steps``; a
    unit's score is the sum over its tokens, so the scores add up to about
    ``M(x) - M(x')`` (the completeness axiom). Unlike :func:`gradient`, which differentiates
    at the encoder's *output* positions, the gradient here flows through the text encoder: a
    causal encoder carries an early word into every later position, and that influence is
    credited to the word. ``ig_steps=1`` is gradient x input at the path's midpoint.

    Parameters
    ----------
    adapter, prompt, generations, steps, num_inference_steps, guidance, seed, batch_size, truncate
        As for :func:`gradient`.
    ig_steps : int, optional
        Points on the path from ``x'`` to ``x`` (default 4: on the planted-trigger benchmark 4
        points and 2 generations found the trigger as often as 8 points and 4 generations,
        in a quarter of the time; the completeness gap shrinks with more points).

    Returns
    -------
    TokenAttribution
        ``token_scores`` holds each token's integrated gradient (0 for special tokens);
        ``details["baseline"]`` the noise magnitude at ``x'``.
    """
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ConfigError(f"ig_steps={ig_steps!r}; use a positive integer (e.g. 8)")
    prep = _prepare(adapter, prompt, generations=generations, steps=steps,
                    num_inference_steps=num_inference_steps, guidance=guidance, seed=seed,
                    batch_size=batch_size, truncate=truncate)
    lookup = adapter.text_encoder.get_input_embeddings()
    owned = torch.zeros(prep.input_ids.shape[1], dtype=torch.bool, device=adapter.device)
    owned[[i for u in prep.units for i in u.tokens]] = True
    with torch.no_grad():
        ids = prep.input_ids.to(adapter.device)
        x = lookup(ids)
        start = torch.where(owned[None, :, None],
                            lookup(torch.full_like(ids, _pad_id(adapter.tokenizer))), x)
    total = torch.zeros_like(x, dtype=torch.float64)
    n_rows = 0
    for k in range(ig_steps):
        leaf = (start + (k + 0.5) / ig_steps * (x - start)).detach().requires_grad_(True)

        def cond(rows: list[int], leaf: torch.Tensor = leaf):
            out = _encode_from_token_embeddings(adapter, prep, leaf)
            return out.expand(len(rows), -1, -1), prep.mask.expand(len(rows), -1)

        for step in walk_trajectory(adapter, cond, prep.seeds, grad=True,
                                    desc="integrated gradients", **prep.walk_options()):
            with torch.enable_grad():
                d = noise_gap(step.eps_c, step.eps_u)
                (grad,) = torch.autograd.grad(d.sum(), leaf)
            total += grad.double()
            n_rows += len(step.rows)
    token_scores = ((x - start).double() * total / n_rows).sum(dim=2)[0].cpu().numpy()
    token_scores[~owned.cpu().numpy()] = 0.0
    with torch.no_grad():
        ends = torch.cat([prep.cond, _encode_from_token_embeddings(adapter, prep, start)])
    mags = _magnitudes(adapter, ends.detach(), prep.mask.expand(2, -1), prep).mean(axis=(1, 2))
    return _result(prep, _pool_sum(prep.units, token_scores), "integrated_gradients",
                   float(mags[0]), token_scores, extra={"ig_steps": ig_steps},
                   details={"baseline": float(mags[1])})


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
    variants, variant_masks = _variant_embeddings(adapter, prep, mode)
    conds = torch.cat([prep.cond.to(variants), variants])
    mags = _magnitudes(adapter, conds, torch.cat([prep.mask.to(variant_masks), variant_masks]),
                       prep)
    per_variant = mags.mean(axis=(1, 2))
    drop = per_variant[0] - per_variant[1:]
    details: dict[str, Any] = {"magnitude_drop": drop.tolist()}
    scores = drop
    if reference is not None:
        sims = _similarities(adapter, conds, prep, reference, backend)
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

    n_var, n_gen = conds.shape[0], len(prep.seeds)
    # sample() encodes prompt strings; give each variant a name and swap in its embeddings
    names = [f"diffmem occlusion variant {v}" for v in range(n_var)]
    table = dict(zip(names, conds))
    # ... and walk every variant from the prompt's own seeds: sample() seeds generation j of a
    # name with generation_seed(seed, name, j); reseed that generator with the prompt's seed of
    # generation j, so both the initial noise and the scheduler's randomness are the prompt's
    seed = prep.params["seed"]
    own = {generation_seed(seed, name, j): prep.seeds[j] for name in names for j in range(n_gen)}

    def swap(cond: torch.Tensor, uncond: torch.Tensor, prompts: list[str]):
        return torch.stack([table[p] for p in prompts]).to(cond), uncond

    def prompt_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
        noise, fresh = seeded_noise(adapter, [own[g.initial_seed()] for g in generators])
        for g, f in zip(generators, fresh):
            g.set_state(f.get_state())  # the scheduler's randomness continues the prompt's
        return noise

    result = adapter.sample(names, n_per_prompt=n_gen, steps=prep.params["num_inference_steps"],
                            guidance=prep.guidance, seed=seed,
                            batch_size=prep.params["batch_size"],
                            hooks=SamplingHooks(prompt_embeds=swap, initial_latents=prompt_noise))
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

    mags = _magnitudes(adapter, prep.cond, prep.mask, prep,
                       hooks=SamplingHooks(attention_probs=on_probs))
    n_layers = max(acc["count"] // (len(prep.seeds) * prep.params["steps"]), 1)
    token_scores = (acc["sum"] / max(acc["count"], 1)).numpy()
    log.debug("attention averaged over %d layer(s)", n_layers)
    return _result(prep, _pool_sum(prep.units, token_scores), "attention", float(mags.mean()),
                   token_scores)

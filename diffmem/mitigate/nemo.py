"""NeMo: memorization neurons in the cross-attention value projections (Hintersdorf et al.,
NeurIPS 2024, "Finding NeMo: Localizing Neurons Responsible for Memorization in Diffusion
Models").

A memorized prompt makes the model predict nearly the same first-step noise whatever the seed.
NeMo measures that as the *memorization strength*: the first-step noise difference
``delta = eps_theta(x_T, T, c) - x_T`` (conditional prediction, no guidance), min-max scaled per
channel, compared between generations of different seeds by SSIM; the prompt is memorized when
the highest pairwise SSIM exceeds ``tau`` (mean + 1 std of the same value over non-memorized
prompts). Neurons are the output channels of each cross-attention value projection ``to_v``.

1. **statistics**: the activation of neuron ``i`` for a prompt is ``mean_tokens |to_v(c)_i|``;
   its mean and standard deviation over non-memorized reference prompts are the
   in-distribution statistics (:func:`reference_statistics`);
2. **initial selection**: a neuron is a candidate when its activation for the memorized prompt
   is out of distribution, ``|a_i - mu_i| / sigma_i > theta``, or among the ``k`` largest
   absolute activations of its layer. Starting at ``theta = 5, k = 0``, ``theta`` falls by 0.25
   (down to 1) and ``k`` grows by 1 until deactivating the candidates brings the memorization
   strength below ``tau``;
3. **refinement**: layers whose candidates can be re-activated (all of them together) with the
   strength staying below ``tau`` are dropped, then single neurons the same way
   (:func:`localize_neurons`).

Deactivation multiplies the neurons' outputs by ``1 - strength`` with forward hooks on the
``to_v`` layers (strength 1 = the paper's deactivation; the weights are never changed).

Deviations from the paper: single-scale SSIM (:func:`skimage.metrics.structural_similarity`,
window 7) rather than multi-scale SSIM, because our pixel models are 32 px; every cross-attention
layer of the UNet is searched (the paper: the seven down and mid layers of Stable Diffusion);
the strength compares seeds with each other (the paper's memorization criterion) where the
reference code compares blocked with unblocked predictions; 4 seeds by default (paper: 10).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.errors import ConfigError
from diffmem.models import SamplingHooks
from diffmem.models.adapter import generation_seed
from diffmem.models.attention import cross_attention_layers
from diffmem.utils import progress

__all__ = ["ReferenceStatistics", "build", "candidate_neurons", "deactivation_hooks",
           "localize_all", "localize_neurons", "memorization_strength", "neurons_summary",
           "reference_statistics", "select_neurons", "value_activations", "value_layers"]

#: Neurons per layer, by the ``to_v`` module's name in the UNet.
Neurons = dict[str, list[int]]


def value_layers(adapter: Any) -> list[str]:
    """Names (in ``adapter.unet``) of the value projections ``to_v`` of every cross-attention
    layer, in the UNet's order."""
    return [f"{name}.to_v" for name, _ in cross_attention_layers(adapter.unet)]


def _first_step(adapter: Any, n: int, seeds: Sequence[int], steps: int):
    scheduler = adapter.new_scheduler()
    scheduler.set_timesteps(steps, device=adapter.device)
    t0 = scheduler.timesteps[0]
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[:n]]
    noise = adapter.initial_noise(gens).to(adapter.device, adapter.dtype)
    return noise, scheduler.scale_model_input(noise * scheduler.init_noise_sigma, t0), t0


@torch.no_grad()
def value_activations(adapter: Any, prompts: Sequence[str], *, steps: int = 50,
                      batch_size: int = 16) -> dict[str, np.ndarray]:
    """``mean_tokens |to_v(c)|`` of each prompt at the first sampling step, per layer.

    Returns
    -------
    dict of str to numpy.ndarray
        ``layer -> (len(prompts), neurons)``.
    """
    layers = value_layers(adapter)
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}

    def collector(name):
        def hook(module, inputs, output):
            out[name].append(output.detach().abs().mean(dim=1).float().cpu().numpy())
        return hook

    hooks = SamplingHooks(module_hooks={name: collector(name) for name in layers})
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        cond, _ = adapter.encode_prompt(chunk)
        _, x, t0 = _first_step(adapter, len(chunk), [0] * len(chunk), steps)
        adapter.predict_noise(x, t0, cond, hooks=hooks)
    return {name: np.concatenate(v) for name, v in out.items()}


def deactivation_hooks(neurons: Mapping[str, Sequence[int]], *,
                       factor: float = 0.0) -> SamplingHooks:
    """Forward hooks that multiply the outputs of ``neurons`` (``to_v`` name -> channel indices)
    by ``factor`` (0 = deactivated) in every row; plain sampling where ``neurons`` is empty.

    Examples
    --------
    >>> import torch
    >>> hooks = deactivation_hooks({"a.to_v": [1]})
    >>> hooks.module_hooks["a.to_v"](None, (), torch.ones(1, 2, 3)).tolist()
    [[[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]]
    """
    chosen = {name: sorted({int(i) for i in idx}) for name, idx in neurons.items() if len(idx)}
    if not chosen:
        return SamplingHooks()

    def make(indices: list[int]):
        def hook(module, inputs, output):
            scale = torch.ones(output.shape[-1], dtype=output.dtype, device=output.device)
            scale[indices] = factor
            return output * scale
        return hook

    return SamplingHooks(module_hooks={name: make(idx) for name, idx in chosen.items()})


def _noise_diffs(adapter: Any, prompt: str, neurons: Mapping[str, Sequence[int]], *,
                 n_seeds: int, seed: int, steps: int) -> np.ndarray:
    """First-step ``eps(x_T, T, c) - x_T`` of ``n_seeds`` generations, min-max scaled per
    channel: ``(n_seeds, C, h, w)`` in [0, 1]."""
    seeds = [generation_seed(seed, prompt, i) for i in range(n_seeds)]
    noise, x, t0 = _first_step(adapter, n_seeds, seeds, steps)
    cond, _ = adapter.encode_prompt([prompt] * n_seeds)
    with torch.no_grad():
        eps = adapter.predict_noise(x, t0, cond, hooks=deactivation_hooks(neurons))
    d = (eps - noise).float().cpu().numpy()
    lo, hi = d.min(axis=(2, 3), keepdims=True), d.max(axis=(2, 3), keepdims=True)
    return (d - lo) / np.maximum(hi - lo, 1e-12)


def memorization_strength(adapter: Any, prompt: str,
                          neurons: Mapping[str, Sequence[int]] | None = None, *,
                          n_seeds: int = 4, seed: int = 0, steps: int = 50) -> float:
    """NeMo's memorization strength: the highest SSIM between the first-step noise
    differences of ``n_seeds`` seeds (Hintersdorf et al., NeurIPS 2024), with ``neurons``
    deactivated. Higher = more memorized (the same prediction whatever the seed)."""
    from skimage.metrics import structural_similarity

    d = _noise_diffs(adapter, prompt, neurons or {}, n_seeds=n_seeds, seed=seed, steps=steps)
    win = min(7, d.shape[-1] - (1 - d.shape[-1] % 2), d.shape[-2] - (1 - d.shape[-2] % 2))
    return max(float(structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=win))
               for a, b in itertools.combinations(d, 2))


@dataclass
class ReferenceStatistics:
    """In-distribution statistics of non-memorized prompts: per-neuron activation mean and
    standard deviation per layer, and the memorization threshold ``tau`` (mean + 1 std of
    their memorization strengths)."""

    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    tau: float
    prompts: int


def reference_statistics(adapter: Any, prompts: Sequence[str], *, n_seeds: int = 4,
                         seed: int = 0, steps: int = 50) -> ReferenceStatistics:
    """:class:`ReferenceStatistics` from ``prompts`` (non-memorized; at least two)."""
    prompts = list(dict.fromkeys(prompts))
    if len(prompts) < 2:
        raise ConfigError(f"NeMo needs at least 2 distinct non-memorized reference prompts for "
                          f"its activation statistics; got {len(prompts)}: pass "
                          "reference_prompts=[...] (e.g. held-out or control prompts)")
    acts = value_activations(adapter, prompts, steps=steps)
    strengths = [memorization_strength(adapter, p, n_seeds=n_seeds, seed=seed, steps=steps)
                 for p in prompts]
    return ReferenceStatistics(
        mean={k: v.mean(axis=0) for k, v in acts.items()},
        std={k: np.maximum(v.std(axis=0), 1e-8) for k, v in acts.items()},
        tau=float(np.mean(strengths) + np.std(strengths)), prompts=len(prompts))


def candidate_neurons(activations: Mapping[str, np.ndarray], stats: ReferenceStatistics,
                      theta: float, k: int) -> Neurons:
    """NeMo's initial selection: per layer, neurons with ``|a - mu| / sigma > theta`` plus the
    ``k`` largest ``|a|``.

    Examples
    --------
    >>> import numpy as np
    >>> s = ReferenceStatistics({"v": np.zeros(4)}, {"v": np.ones(4)}, tau=0.5, prompts=2)
    >>> candidate_neurons({"v": np.array([0.5, -3.0, 2.0, 9.0])}, s, theta=2.5, k=1)
    {'v': [1, 3]}
    """
    out = {}
    for name, a in activations.items():
        z = np.abs(a - stats.mean[name]) / stats.std[name]
        chosen = set(np.flatnonzero(z > theta).tolist())
        if k > 0:
            chosen |= set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
        out[name] = sorted(int(i) for i in chosen)
    return out


def localize_neurons(adapter: Any, prompt: str, stats: ReferenceStatistics, *,
                     theta: float = 5.0, theta_step: float = 0.25, theta_min: float = 1.0,
                     max_k: int | None = None, n_seeds: int = 4, seed: int = 0,
                     steps: int = 50) -> tuple[Neurons, dict]:
    """The memorization neurons of ``prompt`` (Hintersdorf et al., NeurIPS 2024): its
    first-step value activations and :func:`memorization_strength`, searched by
    :func:`select_neurons`."""
    def strength(neurons):
        return memorization_strength(adapter, prompt, neurons, n_seeds=n_seeds, seed=seed,
                                     steps=steps)

    acts = {k: v[0] for k, v in value_activations(adapter, [prompt], steps=steps).items()}
    return select_neurons(acts, stats, strength, theta=theta, theta_step=theta_step,
                          theta_min=theta_min, max_k=max_k)


def select_neurons(activations: Mapping[str, np.ndarray], stats: ReferenceStatistics,
                   strength: Callable[[Neurons], float], *, theta: float = 5.0,
                   theta_step: float = 0.25, theta_min: float = 1.0,
                   max_k: int | None = None) -> tuple[Neurons, dict]:
    """NeMo's search (Hintersdorf et al., NeurIPS 2024) given one prompt's activations and its
    memorization strength as a function of the deactivated neurons.

    1. initial selection: :func:`candidate_neurons` at ``theta`` (lowered by ``theta_step``
       down to ``theta_min``) and ``k`` (0, 1, ...; at most ``max_k``, default the widest
       layer; 0 = no top-k), together, until ``strength(candidates) <= tau`` or either
       reaches its bound (the paper's loop; its reference code bounds ``k`` by 1280, an SD
       layer's width);
    2. refinement: layers, then single neurons, whose re-activation keeps the strength at most
       ``tau`` are dropped.

    Returns
    -------
    (dict, dict)
        ``to_v`` name -> neuron indices (empty when the prompt is not memorized: strength at
        most ``tau``), and facts: ``strength`` before and ``strength_after`` deactivation,
        ``tau``, the final ``theta`` and ``k``, ``initial`` and ``refined`` neuron counts,
        ``mitigated`` (the strength fell to ``tau`` or below).
    """
    tau = stats.tau
    before = strength({})
    info: dict[str, Any] = {"strength": before, "tau": tau, "theta": None, "k": None}
    if before <= tau:
        return {}, {**info, "strength_after": before, "initial": 0, "refined": 0,
                    "mitigated": True}
    widest = max(len(v) for v in activations.values())
    max_k = widest if max_k is None else min(int(max_k), widest)
    k = 0
    while True:  # 1. initial selection: widen until deactivation mitigates
        blocked = candidate_neurons(activations, stats, theta, k)
        after = strength(blocked)
        if after <= tau or theta <= theta_min or (max_k > 0 and k >= max_k):
            break
        theta, k = max(theta_min, theta - theta_step), min(max_k, k + 1)
    info.update(theta=theta, k=k, initial=sum(map(len, blocked.values())))
    if after <= tau:  # 2. refinement: drop layers, then neurons, not needed
        for name in reversed(list(blocked)):
            trial = {**blocked, name: []}
            if blocked[name] and strength(trial) <= tau:
                blocked = trial
        for name in reversed(list(blocked)):
            for i in list(blocked[name]):
                trial = {**blocked, name: [j for j in blocked[name] if j != i]}
                if strength(trial) <= tau:
                    blocked = trial
        after = strength(blocked)
    blocked = {name: idx for name, idx in blocked.items() if idx}
    info.update(refined=sum(map(len, blocked.values())), strength_after=after,
                mitigated=after <= tau)
    return blocked, info


def localize_all(adapter: Any, prompts: Sequence[str], reference_prompts: Sequence[str], *,
                 theta: float = 5.0, max_k: int | None = None, n_seeds: int = 4, seed: int = 0,
                 steps: int = 50) -> tuple[Neurons, dict[str, Any]]:
    """The memorization neurons of all ``prompts`` together (Hintersdorf et al., NeurIPS 2024,
    who deactivate the neurons found for every memorized prompt at once): the union of
    :func:`localize_neurons` over ``prompts`` (a prompt that is not memorized, strength at most
    ``tau``, adds none), statistics from ``reference_prompts`` (:func:`reference_statistics`).

    Returns
    -------
    (dict, dict)
        ``to_v`` name -> neuron indices, for :func:`deactivation_hooks` or the ``neurons``
        parameter of :func:`build`; and facts: ``tau``, ``reference_prompts`` (count) and per
        prompt its search facts (``strength``, ``strength_after``, ``mitigated``, neurons).
    """
    stats = reference_statistics(adapter, reference_prompts, n_seeds=n_seeds, seed=seed,
                                 steps=steps)
    union: dict[str, set[int]] = {}
    facts: dict[str, Any] = {}
    for prompt in progress(list(dict.fromkeys(prompts)), desc="NeMo localization",
                           unit="prompt"):
        found, info = localize_neurons(adapter, prompt, stats, theta=theta, max_k=max_k,
                                       n_seeds=n_seeds, seed=seed, steps=steps)
        facts[prompt] = {**info, "neurons": sum(len(v) for v in found.values())}
        for name, idx in found.items():
            union.setdefault(name, set()).update(idx)
    return ({name: sorted(idx) for name, idx in union.items()},
            {"tau": stats.tau, "reference_prompts": stats.prompts, "prompts": facts})


def _read_neurons(value: Any) -> Neurons:
    if isinstance(value, (str, Path)):
        path = Path(value)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"neurons={str(path)!r} is not a readable JSON file of "
                              f"{{layer: [neuron, ...]}} ({e})") from None
        value = value.get("neurons", value) if isinstance(value, dict) else value
    if not isinstance(value, Mapping) or not all(
            isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v)
            for v in value.values()):
        raise ConfigError("neurons must map each to_v layer name to a list of neuron indices, "
                          f"e.g. {{\"mid_block.attentions.0.transformer_blocks.0.attn2.to_v\": "
                          f"[3, 17]}}; got {value!r:.80}")
    return {str(k): [int(i) for i in v] for k, v in value.items()}


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """NeMo neuron deactivation (Hintersdorf et al., NeurIPS 2024): the outputs of the
    memorization neurons are multiplied by ``1 - strength`` (1 = deactivated, the paper's).

    With ``params["neurons"]`` (a mapping or a JSON file of ``{to_v layer: [indices]}``) those
    neurons are deactivated for every generation, the paper's "all memorization neurons at
    once". Otherwise each sampled prompt's own neurons are localized the first time it is
    sampled (:func:`localize_neurons`, statistics from ``params["reference_prompts"]``,
    non-memorized prompts) and deactivated in its generations only. Strength 0 installs no hook.
    """
    if strength == 0:
        return SamplingHooks()
    factor = 1.0 - float(strength)
    if params.get("neurons") is not None:
        return deactivation_hooks(_read_neurons(params["neurons"]), factor=factor)
    if not params.get("reference_prompts"):
        raise ConfigError("nemo_deactivation needs either neurons (a {to_v layer: [indices]} "
                          "mapping or JSON file) or reference_prompts (non-memorized prompts "
                          "for the activation statistics) to localize each prompt's neurons")
    opts = {k: params[k] for k in ("n_seeds", "steps")}
    found: dict[str, Neurons] = {}
    state: dict[str, Any] = {"stats": None, "prompts": None}
    layers = value_layers(adapter)

    def prompt_embeds(cond, uncond, prompts):
        if state["stats"] is None:
            state["stats"] = reference_statistics(adapter, params["reference_prompts"],
                                                  seed=seed, **opts)
        for p in dict.fromkeys(prompts):
            if p not in found:
                found[p] = localize_neurons(adapter, p, state["stats"], seed=seed,
                                            theta=params["theta"], max_k=params["max_k"],
                                            **opts)[0]
        state["prompts"] = list(prompts)
        return cond, uncond

    def per_row(name):
        def hook(module, inputs, output):
            if state["prompts"] is None:
                return output
            batch = len(state["prompts"])
            scale = torch.ones(batch, output.shape[-1], dtype=output.dtype, device=output.device)
            for r, p in enumerate(state["prompts"]):
                scale[r, found[p].get(name, [])] = factor
            if output.shape[0] == 2 * batch:
                scale = torch.cat([scale, scale])
            return output * scale.view(output.shape[0], *([1] * (output.ndim - 2)), -1)
        return hook

    return SamplingHooks(prompt_embeds=prompt_embeds,
                         module_hooks={name: per_row(name) for name in layers})


def neurons_summary(neurons: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """Counts of neurons per layer (JSON-ready).

    Examples
    --------
    >>> neurons_summary({"a.to_v": [1, 2], "b.to_v": []})
    {'neurons': 2, 'layers': {'a.to_v': 2}}
    """
    return {"neurons": int(sum(len(v) for v in neurons.values())),
            "layers": {k: len(v) for k, v in neurons.items() if len(v)}}


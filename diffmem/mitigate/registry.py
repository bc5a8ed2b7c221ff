"""The registry of inference-time mitigations: every method is one small module exposing
``build(adapter, strength, *, params, seed) -> SamplingHooks``, registered by name with its
strength semantics, and its defaults (the papers' values) in ``presets/<name>.json``.

A method acts on sampling *only* through :class:`~diffmem.models.SamplingHooks`; strength 0 is
the plain pipeline, bit for bit, with the same seed (each method's tests check it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.errors import ConfigError
from diffmem.presets import read_preset_json
from diffmem.registry import Registry

__all__ = ["Mitigation", "get_mitigation", "list_mitigations", "mitigation_hooks",
           "register_mitigation", "row_generator", "row_seed"]

PRESET_DIR = Path(__file__).parent / "presets"

#: Builders have this signature: ``build(adapter, strength, *, params, seed) -> SamplingHooks``.
Builder = Callable[..., Any]


@dataclass(frozen=True)
class Mitigation:
    """A registered mitigation.

    Attributes
    ----------
    name : str
        Registry name (``--methods`` value).
    build : callable
        ``build(adapter, strength, *, params, seed) -> SamplingHooks``.
    default_strength : float
        The papers' setting.
    strength_range : tuple of float
        Closed interval of accepted strengths; 0 (off) is always in it.
    strength : str
        What the strength means, in words.
    paper : str
        Citation.
    integer : bool
        Strength must be a whole number (counts of tokens, words, iterations).
    params : dict
        Other settings of the method (preset defaults; overridable per call).
    description : str
    """

    name: str
    build: Builder
    default_strength: float
    strength_range: tuple[float, float]
    strength: str
    paper: str
    integer: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def check_strength(self, strength: Any) -> float:
        """The strength as a float, or :class:`ConfigError` giving the range."""
        lo, hi = self.strength_range
        what = "a whole number" if self.integer else "a number"
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or \
                not math.isfinite(float(strength)):
            raise ConfigError(f"strength={strength!r} for {self.name}; use {what} in "
                              f"[{lo:g}, {hi:g}] ({self.strength}; 0 = off, default "
                              f"{self.default_strength:g})")
        value = float(strength)
        if not lo <= value <= hi or (self.integer and value != int(value)):
            raise ConfigError(f"strength={strength!r} is outside the range of {self.name}: use "
                              f"{what} in [{lo:g}, {hi:g}] ({self.strength}; 0 = off, default "
                              f"{self.default_strength:g})")
        return value

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "default_strength": self.default_strength,
                "strength_range": list(self.strength_range), "strength": self.strength,
                "integer": self.integer, "paper": self.paper, "params": dict(self.params),
                "description": self.description}


def _load_builtins() -> None:
    """Register the built-in methods (their modules are imported on the first look-up)."""
    import importlib

    for name, module in _BUILTINS.items():
        if name not in _REGISTRY:  # a user's registration of the same name wins
            mod = importlib.import_module(f"diffmem.mitigate.{module}")
            register_mitigation(name, getattr(mod, "BUILDERS", {}).get(name,
                                                                       getattr(mod, "build", None)))


_REGISTRY: Registry[Mitigation] = Registry("mitigation", known="registered", load=_load_builtins)


def register_mitigation(name: str, build: Builder, *, preset: str | Path | Mapping | None = None,
                        ) -> Mitigation:
    """Register a mitigation under ``name`` (replacing one of the same name).

    Parameters
    ----------
    name : str
    build : callable
        ``build(adapter, strength, *, params, seed) -> SamplingHooks``; strength 0 must give
        hooks that sample exactly like no hooks.
    preset : str, path or mapping, optional
        Its defaults: a preset name in ``diffmem/mitigate/presets`` (default: ``name``), a JSON
        path, or the mapping itself, with ``default_strength``, ``strength_range`` ``[lo, hi]``,
        ``strength`` (meaning), ``paper`` and optionally ``integer``, ``params``,
        ``description``.

    Returns
    -------
    Mitigation
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"mitigation name {name!r}: use an identifier such as 'my_method'")
    if not callable(build):
        raise ConfigError(f"build for {name!r} must be callable, got {type(build).__name__}")
    data = preset if isinstance(preset, Mapping) else \
        read_preset_json(preset or name, PRESET_DIR, kind="mitigation")[2]
    try:
        lo, hi = (float(x) for x in data["strength_range"])
        entry = Mitigation(
            name=name, build=build, default_strength=float(data["default_strength"]),
            strength_range=(lo, hi), strength=str(data["strength"]), paper=str(data["paper"]),
            integer=bool(data.get("integer", False)), params=dict(data.get("params", {})),
            description=str(data.get("description", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"mitigation preset of {name!r} is incomplete or malformed ({e}); it "
                          "needs default_strength, strength_range [lo, hi], strength, paper") \
            from None
    if not lo <= 0 <= hi or not lo <= entry.default_strength <= hi:
        raise ConfigError(f"mitigation {name!r}: strength_range [{lo:g}, {hi:g}] must hold 0 "
                          f"(off) and the default {entry.default_strength:g}")
    return _REGISTRY.add(name, entry)


def list_mitigations() -> list[str]:
    """Names of the registered mitigations, sorted.

    Examples
    --------
    >>> "attention_rescaling" in list_mitigations()
    True
    """
    return _REGISTRY.names()


def get_mitigation(name: str) -> Mitigation:
    """The registered mitigation ``name``.

    Raises
    ------
    ConfigError
        For an unknown name, listing the registered ones.

    Examples
    --------
    >>> get_mitigation("gaussian_noise_embedding").default_strength
    0.1
    """
    return _REGISTRY.get(name)


def mitigation_hooks(name: str, adapter: Any, strength: float | None = None, *, seed: int = 0,
                     **params: Any) -> Any:
    """The :class:`~diffmem.models.SamplingHooks` that apply mitigation ``name`` at ``strength``.

    Pass them to :meth:`~diffmem.models.DiffusionModelAdapter.sample` (``hooks=...``); combine
    with others through :func:`~diffmem.models.combine_hooks`.

    Parameters
    ----------
    name : str
        A name from :func:`list_mitigations`.
    adapter : DiffusionModelAdapter
    strength : float, optional
        Default: the method's preset value (the paper's). 0 = the plain pipeline, bit for bit.
    seed : int, optional
        Seeds the method's own randomness (noise, inserted tokens); combined with each
        generation's seed, so results do not depend on batching.
    **params
        Overrides of the preset's other settings (``get_mitigation(name).params``).

    Raises
    ------
    ConfigError
        Unknown name (lists the registered ones), strength out of range (gives the range),
        unknown parameter.

    Examples
    --------
    >>> from diffmem.models import load_model
    >>> from diffmem.models.tiny import tiny_stable_diffusion
    >>> model = load_model(tiny_stable_diffusion(seed=0))
    >>> hooks = mitigation_hooks("guidance_delay", model)
    >>> hooks.guidance_scale(0, 981, 7.5), hooks.guidance_scale(40, 181, 7.5)
    (0.0, 7.5)
    """
    method = get_mitigation(name)
    value = method.check_strength(method.default_strength if strength is None else strength)
    unknown = sorted(set(params) - set(method.params))
    if unknown:
        raise ConfigError(f"{name} has no parameter {', '.join(unknown)}; its parameters: "
                          f"{', '.join(sorted(method.params)) or '(none)'}")
    return method.build(adapter, value, params={**method.params, **params}, seed=int(seed))


def row_seed(seed: int, name: str, generator: Any) -> int:
    """Seed of one generation's mitigation randomness.

    Derived from the mitigation seed, the method name and the generation's own seed
    (``generator.initial_seed()``), so the draw does not depend on batching, on the order of
    prompts, or on how much of the generation's generator sampling has used.
    """
    digest = hashlib.sha256(f"diffmem.mitigate|{int(seed)}|{name}|{generator.initial_seed()}"
                            .encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def row_generator(seed: int, name: str, generator: Any) -> Any:
    """A CPU ``torch.Generator`` seeded with :func:`row_seed`."""
    import torch

    return torch.Generator("cpu").manual_seed(row_seed(seed, name, generator))


_BUILTINS = {
    "prompt_embedding_optimization": "embedding_optimization",
    "gaussian_noise_embedding": "gaussian_noise",
    "random_token_insertion": "token_insertion",
    "caption_word_repetition": "word_repetition",
    "random_number_addition": "number_addition",
    "attention_rescaling": "attention_rescaling",
    "guidance_delay": "guidance_delay",
    "opposite_guidance": "opposite_guidance",
    "dynamic_opposite_guidance": "dynamic_guidance",
    "deid_marker_removal": "deid_markers",
    "deid_marker_randomization": "deid_markers",
    "nemo_deactivation": "nemo",
    "magnitude_pruning": "pruning",
}

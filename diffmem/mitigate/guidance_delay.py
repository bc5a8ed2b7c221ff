"""Guidance delay: no classifier-free guidance early in sampling (the static schedule studied by
Jain et al., 2025, "Classifier-Free Guidance inside the Attraction Basin May Cause
Memorization")."""

from __future__ import annotations

from typing import Any

from diffmem.models import SamplingHooks


def switch_timestep(adapter: Any, strength: float) -> float:
    """The timestep ``(1 - strength) * T`` above which a static schedule changes guidance."""
    return (1.0 - float(strength)) * adapter.num_train_timesteps


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """Guidance delay (Jain et al., 2025): scale 0 (the unconditional prediction alone, the
    conditional branch is skipped) while ``t > (1 - strength) * T``, then the call's scale.

    Default strength 0.5: no guidance until t = 500 of T = 1000. Strength 0 never changes the
    scale.
    """
    t_switch = switch_timestep(adapter, strength)

    def guidance_scale(step_index, t, default):
        return 0.0 if strength > 0 and t > t_switch else default

    return SamplingHooks(guidance_scale=guidance_scale)

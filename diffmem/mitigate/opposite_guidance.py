"""Static opposite guidance (Jain et al., 2025, "Classifier-Free Guidance inside the Attraction
Basin May Cause Memorization"): guide *away* from the prompt while the trajectory is inside the
memorization attraction basin."""

from __future__ import annotations

from typing import Any

from diffmem.mitigate.guidance_delay import switch_timestep
from diffmem.models import SamplingHooks


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """Opposite guidance (Jain et al., 2025): scale ``params["scale"]`` (default -2) while
    ``t > (1 - strength) * T``, then the call's scale.

    Default strength 0.35: -2 until t = 650 of T = 1000. Strength 0 never changes the scale.
    """
    t_switch, scale = switch_timestep(adapter, strength), float(params["scale"])

    def guidance_scale(step_index, t, default):
        return scale if strength > 0 and t > t_switch else default

    return SamplingHooks(guidance_scale=guidance_scale)

"""Dynamic opposite guidance (Jain et al., 2025, "Classifier-Free Guidance inside the Attraction
Basin May Cause Memorization"): opposite guidance until the trajectory is seen to leave the
attraction basin, detected from the text-conditional noise magnitude."""

from __future__ import annotations

from typing import Any

from diffmem.mitigate.guidance_delay import switch_timestep
from diffmem.models import SamplingHooks, noise_gap


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """Dynamic opposite guidance (Jain et al., 2025).

    From the first step the guidance scale is ``params["scale"]`` (default -2). At every step
    the hook reads each generation's ``d_t = ||eps_c - eps_u||``; once ``d_t`` has dropped
    below ``params["drop"]`` times its first-step value for every generation of the batch
    (the trajectory left the basin, where the conditional pull is strong), the rest of the run
    uses the call's scale. The switch happens at the latest at ``t = (1 - strength) * T``.
    Strength 0 never changes the scale.

    This is our reading of the paper's transition-point detection, adapted to one scale per
    batch and step (what :class:`~diffmem.models.SamplingHooks` can set).
    """
    t_latest = switch_timestep(adapter, strength)
    scale, drop = float(params["scale"]), float(params["drop"])
    state: dict[str, Any] = {"first": None, "left": False}

    def on_step(step_index, t, latents, eps_u, eps_c):
        if eps_c is None:
            return
        d = noise_gap(eps_c, eps_u)
        if step_index == 0:
            state["first"], state["left"] = d, False
        elif state["first"] is not None and bool((d < drop * state["first"]).all()):
            state["left"] = True

    def guidance_scale(step_index, t, default):
        if step_index == 0:
            state["first"], state["left"] = None, False  # a new batch starts
        if strength == 0 or state["left"] or t <= t_latest:
            state["left"] = state["left"] or (strength > 0 and t <= t_latest)
            return default
        return scale

    return SamplingHooks(guidance_scale=guidance_scale, on_step=on_step)

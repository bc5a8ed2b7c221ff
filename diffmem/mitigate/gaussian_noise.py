"""Gaussian noise injection on the text embedding, GNI (Somepalli et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any

import torch

from diffmem.mitigate.registry import row_generator
from diffmem.models import SamplingHooks

NAME = "gaussian_noise_embedding"


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """GNI (Somepalli et al., NeurIPS 2023): ``e' = e + strength * N(0, I)`` on the conditional
    embedding, one draw per generation; the unconditional branch is untouched.

    Strength 0 leaves the embedding as it is (no noise is added).
    """
    lam = float(strength)

    def prompt_embeds(cond, uncond, prompts, generators):
        if lam == 0:
            return cond, uncond
        noise = torch.stack([torch.randn(tuple(cond.shape[1:]), generator=row_generator(
            seed, NAME, g), dtype=torch.float32) for g in generators])
        return cond + lam * noise.to(cond), uncond

    return SamplingHooks(prompt_embeds=prompt_embeds)

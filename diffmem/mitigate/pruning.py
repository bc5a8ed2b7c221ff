"""Magnitude pruning of the cross-attention projections (after Gupta et al., 2024, who find
that pruning reduces memorization in language models; applied where NeMo, Hintersdorf et al.,
NeurIPS 2024, localizes memorization in diffusion models: the projections that read the text)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils import prune

from diffmem.errors import ConfigError
from diffmem.models import SamplingHooks
from diffmem.models.attention import cross_attention_layers

__all__ = ["build", "pruning_masks"]

PROJECTIONS = ("to_q", "to_k", "to_v")


def pruning_masks(adapter: Any, ratio: float,
                  projections: Sequence[str] = ("to_k", "to_v")) -> dict[str, torch.Tensor]:
    """Per projection (its name in ``adapter.unet``), the keep-mask of unstructured L1
    magnitude pruning at ``ratio``: the ``round(ratio x n)`` smallest ``|w|`` are 0
    (:class:`torch.nn.utils.prune.L1Unstructured`, computed on a copy; the module is not
    changed)."""
    unknown = sorted(set(projections) - set(PROJECTIONS))
    if unknown or not projections:
        raise ConfigError(f"projections={list(projections)!r}; choose from "
                          f"{', '.join(PROJECTIONS)}")
    method = prune.L1Unstructured(amount=float(ratio))
    masks = {}
    for name, attn in cross_attention_layers(adapter.unet):
        for proj in projections:
            w = getattr(attn, proj).weight.detach()
            masks[f"{name}.{proj}"] = method.compute_mask(w, default_mask=torch.ones_like(w))
    return masks


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """Magnitude pruning of the cross-attention projections at ratio ``strength``: each
    hooked projection's output is recomputed as ``x (W * mask)^T + b`` (:func:`pruning_masks`).
    Strength 0 installs no hook (the plain pipeline, bit for bit)."""
    if strength == 0:
        return SamplingHooks()
    masks = pruning_masks(adapter, strength, list(params["projections"]))

    def make(mask: torch.Tensor):
        def hook(module, inputs, output):
            w = module.weight * mask.to(module.weight.device, module.weight.dtype)
            return F.linear(inputs[0], w, module.bias)
        return hook

    return SamplingHooks(module_hooks={name: make(m) for name, m in masks.items()})

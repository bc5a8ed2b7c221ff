"""Cross-attention rescaling (Ren et al., ECCV 2024, "Unveiling and Mitigating Memorization in
Text-to-image Diffusion Models through Cross Attention")."""

from __future__ import annotations

from typing import Any

import torch

from diffmem.models import AttentionContext, SamplingHooks


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """Attention rescaling (Ren et al., ECCV 2024): in the conditional rows of every
    cross-attention layer, mask the keys beyond the prompt (padding after the end token:
    logit ``-inf``) and multiply the BOS logit (key 0) by ``c1 = 1 + strength`` (paper:
    1.25), before the softmax. The unconditional rows are untouched.

    Strength 0 installs no hook (the layers keep their own attention processor, so sampling is
    the plain pipeline bit for bit).

    The prompt length comes from the sampled prompt's attention mask; combined with a
    text-level mitigation that lengthens the prompt, masking uses the original length.
    """
    if strength == 0:
        return SamplingHooks()
    c1, mask = 1.0 + float(strength), bool(params["mask_beyond_prompt"])

    def attention_logits(logits: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        rows = ctx.conditional_rows
        if not bool(rows.any()):
            return logits
        out = logits.clone()
        bos = out[:, :, 0]
        out[:, :, 0] = torch.where(rows[:, None], bos * c1, bos)
        if mask and ctx.token_mask is not None:
            beyond = (ctx.per_head(ctx.token_mask) == 0) & rows[:, None]  # (B*heads, K)
            out = out.masked_fill(beyond[:, None, :], float("-inf"))
        return out

    return SamplingHooks(attention_logits=attention_logits)

"""Prompt-embedding optimization against the text-conditional noise magnitude (Wen et al.,
ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models")."""

from __future__ import annotations

from typing import Any

import torch

from diffmem.models import SamplingHooks


def build(adapter: Any, strength: float, *, params: dict, seed: int) -> SamplingHooks:
    """Prompt-embedding optimization (Wen et al., ICLR 2024).

    For each generation, before sampling: starting from its prompt embedding ``e``, AdamW
    (``lr = params["lr"]``, default 0.05, torch's default weight decay) minimizes
    ``d(e) = ||eps(x_T, T_0, e) - eps(x_T, T_0, "")||_2`` at the first sampling step ``T_0``,
    with ``x_T`` that generation's own initial noise, for at most ``strength`` iterations
    (default 10). A generation stops as soon as ``d`` falls below ``params["target"]`` (None:
    no early stop) and keeps the embedding that reached it. The gradient at the BOS position
    is zeroed (and the position reset after each step, which AdamW's weight decay would
    otherwise shrink), so the start token's embedding is never changed. Sampling then runs normally
    with the optimized embeddings (the unconditional branch is untouched).

    Strength 0 leaves the embedding as it is. The method needs gradients through the UNet and
    text embedding (it opens ``torch.enable_grad()`` itself; the model's weights are never
    changed and no ``.grad`` is accumulated on them).
    """
    from diffmem.detect.scores import noise_magnitude_from_embeddings

    iterations, lr = int(strength), float(params["lr"])
    target = None if params.get("target") is None else float(params["target"])

    def prompt_embeds(cond, uncond, prompts, latents, timesteps):
        if iterations == 0:
            return cond, uncond
        scheduler = adapter.new_scheduler()
        scheduler.set_timesteps(len(timesteps), device=adapter.device)
        t0 = timesteps[0]
        x = scheduler.scale_model_input(latents.to(adapter.device, adapter.dtype)
                                        * scheduler.init_noise_sigma, t0)
        result = cond.detach().clone()
        done = torch.zeros(cond.shape[0], dtype=torch.bool, device=cond.device)
        with torch.enable_grad():
            e = cond.detach().float().clone().requires_grad_(True)
            opt = torch.optim.AdamW([e], lr=lr)
            for it in range(iterations + 1):
                d = noise_magnitude_from_embeddings(adapter, e.to(cond.dtype), uncond, x, t0)
                if target is not None:
                    reached = (d.detach() < target) & ~done
                    result[reached] = e.detach()[reached].to(cond.dtype)
                    done |= reached
                if it == iterations or bool(done.all()):
                    break
                (grad,) = torch.autograd.grad(d[~done].sum(), e)
                grad[:, 0] = 0  # the BOS position keeps its embedding (Wen et al.)
                e.grad = grad
                opt.step()
                with torch.no_grad():  # weight decay would still shrink it: hold BOS fixed
                    e[:, 0] = cond[:, 0].float()
        result[~done] = e.detach()[~done].to(cond.dtype)
        return result, uncond

    return SamplingHooks(prompt_embeds=prompt_embeds)

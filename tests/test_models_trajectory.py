"""diffmem.models.trajectory: the one guided-trajectory walker and noise gap (Wen et al., ICLR
2024) shared by scores and attribution, on the tiny Stable Diffusion and tiny CXR models, with a
scheduler that draws noise from the rows' generators (DDPM) as well as deterministic DDIM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.attribution import attribute, list_methods
from diffmem.detect.scores import noise_magnitude, noise_magnitude_per_step
from diffmem.errors import ConfigError
from diffmem.models import (
    SamplingHooks,
    generation_seed,
    load_model,
    noise_gap,
    trajectory_noise_gaps,
    walk_trajectory,
)
from diffmem.models.tiny import tiny_stable_diffusion

PROMPT = "Dr. ___ was notified of the right lower lobe pneumonia."
# short enough that both tokenizers pad it: the token masks have zeros
SHORT = "No acute process."
SETTINGS = {"generations": 2, "steps": 3, "num_inference_steps": 8, "guidance": 3.0, "seed": 7}


@pytest.fixture(scope="module", params=["sd-ddim", "sd-ddpm", "cxr-ddpm"])
def adapter(request, model):
    kind, scheduler = request.param.split("-")
    source = tiny_stable_diffusion(seed=0) if kind == "sd" else model
    return load_model(source, scheduler=scheduler)


def _seeds(prompt: str, n: int, seed: int = 7) -> list[int]:
    return [generation_seed(seed, prompt, j) for j in range(n)]


def test_noise_gap_is_the_per_row_l2_norm():
    eps_c = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 2.0], [2.0, 4.0]]], dtype=torch.float64)
    eps_u = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    gap = noise_gap(eps_c, eps_u)
    assert gap.dtype == torch.float32 and gap.tolist() == pytest.approx([5.0, 4.898979485566356])


def test_walk_follows_the_sampling_trajectory(adapter):
    """Latents and predictions at every step equal those adapter.sample sees for the same seeds,
    also when the scheduler draws noise from the generators (DDPM)."""
    seen = []

    def on_step(i, t, latents, eps_u, eps_c):
        seen.append((latents.clone(), eps_u.clone(), eps_c.clone()))

    adapter.sample([PROMPT, SHORT], n_per_prompt=2, steps=4, guidance=3.0, seed=7,
                   hooks=SamplingHooks(on_step=on_step))
    cond, _ = adapter.encode_prompt([PROMPT, SHORT])
    rows = [0, 0, 1, 1]
    seeds = _seeds(PROMPT, 2) + _seeds(SHORT, 2)
    walked = {}
    for step in walk_trajectory(adapter, cond[rows].detach(), seeds, steps=4,
                                num_inference_steps=4, guidance=3.0, batch_size=3):
        for k, r in enumerate(step.rows):
            walked[(r, step.index)] = (step.latents[k], step.eps_u[k], step.eps_c[k])
    assert len(walked) == 4 * 4
    for i, (latents, eps_u, eps_c) in enumerate(seen):
        for r in range(4):
            for got, want in zip(walked[(r, i)], (latents[r], eps_u[r], eps_c[r])):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ddpm_walk_is_deterministic_and_batch_independent(model):
    """DDPM draws fresh noise at every step from the rows' generators: the same seeds give the
    same trajectory whatever the batching, and the steps after the first differ from DDIM's."""
    ddpm, ddim = load_model(model, scheduler="ddpm"), load_model(model, scheduler="ddim")
    cond = ddpm.encode_prompt([SHORT])[0].expand(3, -1, -1)
    seeds = _seeds(SHORT, 3)
    a = trajectory_noise_gaps(ddpm, cond, seeds, steps=3, num_inference_steps=8)
    b = trajectory_noise_gaps(ddpm, cond, seeds[::-1], steps=3, num_inference_steps=8,
                              batch_size=2)[::-1]
    np.testing.assert_allclose(a, b, rtol=1e-5)
    c = trajectory_noise_gaps(ddim, cond, seeds, steps=3, num_inference_steps=8)
    np.testing.assert_allclose(a[:, 0], c[:, 0], rtol=1e-5)  # same x_T and timestep
    assert not np.allclose(a[:, 2], c[:, 2])


def test_attribution_memorization_equals_the_score(adapter):
    """Every attribution method explains the very score noise_magnitude gives the prompt."""
    expected = float(noise_magnitude(adapter, [PROMPT], batch_size=3, **SETTINGS)[0])
    for method in list_methods():
        result = attribute(adapter, PROMPT, method=method, batch_size=3, **SETTINGS)
        assert result.memorization == pytest.approx(expected, rel=1e-5), method


def test_token_masks_reach_the_attention_hooks(adapter):
    """Both branches report their padding to attention hooks (the empty prompt's mask for the
    unconditional rows, each row's own for the conditional ones)."""
    seen = []

    def on_probs(probs, ctx):
        seen.append((ctx.is_conditional.clone(), ctx.token_mask.clone()))

    tokens = adapter.tokenize([PROMPT, SHORT])
    empty = adapter.tokenize([""])["attention_mask"][0]
    cond = adapter.encode_tokens(tokens["input_ids"], tokens["attention_mask"]).detach()
    mask = tokens["attention_mask"]
    assert int(mask[1].sum()) < mask.shape[1]  # SHORT is padded
    steps = list(walk_trajectory(adapter, cond, _seeds(PROMPT, 2), token_mask=mask, steps=1,
                                 num_inference_steps=4,
                                 hooks=SamplingHooks(attention_probs=on_probs)))
    assert seen and torch.equal(steps[0].token_mask, mask)
    for flags, token_mask in seen:
        assert flags.tolist() == [False, False, True, True]
        torch.testing.assert_close(token_mask, torch.stack([empty, empty, mask[0], mask[1]]))


def test_gradient_walk_keeps_the_autograd_path(adapter):
    """grad=True: eps_c carries the graph to the embeddings, the trajectory does not."""
    cond = adapter.encode_prompt([PROMPT])[0].detach().expand(2, -1, -1).clone()
    cond.requires_grad_(True)
    plain = trajectory_noise_gaps(adapter, cond.detach(), _seeds(PROMPT, 2), steps=2,
                                  num_inference_steps=8)
    for step in walk_trajectory(adapter, cond, _seeds(PROMPT, 2), steps=2,
                                num_inference_steps=8, grad=True, batch_size=1):
        assert not step.latents.requires_grad
        d = noise_gap(step.eps_c, step.eps_u)
        (grad,) = torch.autograd.grad(d.sum(), cond)
        assert float(grad[step.rows].abs().sum()) > 0
        others = [r for r in range(2) if r not in step.rows]
        assert float(grad[others].abs().sum()) == 0
        assert float(d.detach()[0]) == pytest.approx(plain[step.rows[0], step.index], rel=1e-5)
    assert torch.is_grad_enabled()


def test_walk_rejects_bad_rows(adapter):
    cond = adapter.encode_prompt([PROMPT])[0]
    with pytest.raises(ConfigError, match=r"give one \(L, D\) embedding per row"):
        walk_trajectory(adapter, cond, [1, 2], steps=1)
    with pytest.raises(ConfigError, match="steps=3 but num_inference_steps=2"):
        walk_trajectory(adapter, cond, [1], steps=3, num_inference_steps=2)
    with pytest.raises(ConfigError, match="token_mask has shape"):
        walk_trajectory(adapter, cond, [1], steps=1, token_mask=torch.ones(2, 3))


def test_per_step_scores_use_the_walker(adapter):
    per_step = noise_magnitude_per_step(adapter, [PROMPT], generations=2, steps=3,
                                        num_inference_steps=8, guidance=3.0, seed=7)
    cond = adapter.encode_prompt([PROMPT])[0].expand(2, -1, -1)
    gaps = trajectory_noise_gaps(adapter, cond, _seeds(PROMPT, 2), steps=3,
                                 num_inference_steps=8, guidance=3.0)
    np.testing.assert_allclose(per_step[0], gaps, rtol=1e-5)


def test_occlusion_images_start_from_the_prompts_seeds():
    """The similarity target samples every variant from the prompt's own seeds (initial noise
    and DDPM's step noise): the prompt's row reproduces adapter.sample of the prompt."""
    from diffmem.detect.neighbors import nearest_neighbors

    ddpm = load_model(tiny_stable_diffusion(seed=0), scheduler="ddpm")
    reference = np.random.default_rng(0).random((5, 16, 16), dtype=np.float32)
    prompt = "Dr. ___ was notified."
    result = attribute(ddpm, prompt, method="occlusion", generations=2, num_inference_steps=3,
                       guidance=3.0, seed=7, reference=reference)
    images = ddpm.sample([prompt], n_per_prompt=2, steps=3, guidance=3.0, seed=7).images
    expected = nearest_neighbors(images, reference, backend="pixel", k=1).similarities[:, 0]
    assert result.details["similarity"] == pytest.approx(float(expected.mean()), rel=1e-5)

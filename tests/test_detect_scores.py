"""diffmem.detect.scores: noise magnitude (Wen et al.) and attention entropy (Ren et al.) on the
tiny Stable Diffusion and tiny CXR models, checked against hand computations via the adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.detect.scores import (
    attention_entropy,
    default_guidance,
    noise_magnitude,
    noise_magnitude_from_embeddings,
    noise_magnitude_per_step,
)
from diffmem.errors import ConfigError, PromptError
from diffmem.models import SamplingHooks, generation_seed, load_model
from diffmem.models.tiny import tiny_stable_diffusion

PROMPTS = ["No acute cardiopulmonary process.",
           "Dr. ___ was notified of the right lower lobe pneumonia.",
           "Small left pleural effusion.",
           "Moderate pulmonary edema."]


@pytest.fixture(scope="module")
def sd():
    return load_model(tiny_stable_diffusion(seed=0))


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    from diffmem.pipelines import build_pipeline, train_tokenizer

    tokenizer = train_tokenizer(PROMPTS * 4, vocab_size=120, model_max_length=32)
    folder = tmp_path_factory.mktemp("cxr") / "model"
    build_pipeline("tiny", tokenizer=tokenizer, seed=0).save_pretrained(folder)
    return load_model(folder)


@pytest.fixture(scope="module", params=["sd", "cxr"])
def adapter(request):
    return request.getfixturevalue(request.param)


def _first_step_by_hand(adapter, prompt, seed=0, generation=0, num_inference_steps=50):
    """||eps(x_T, c) - eps(x_T, "")|| from two separate predict_noise calls."""
    scheduler = adapter.new_scheduler()
    scheduler.set_timesteps(num_inference_steps)
    g = torch.Generator("cpu").manual_seed(generation_seed(seed, prompt, generation))
    x = torch.randn((1, *adapter.latent_shape), generator=g) * scheduler.init_noise_sigma
    t = scheduler.timesteps[0]
    cond, uncond = adapter.encode_prompt([prompt])
    with torch.no_grad():
        diff = adapter.predict_noise(x, t, cond) - adapter.predict_noise(x, t, uncond)
    return float(diff.double().flatten().norm())


# ---------------------------------------------------------------------------- noise magnitude
def test_default_guidance_is_the_pipeline_default(sd, cxr):
    assert default_guidance(sd) == 7.5
    assert default_guidance(cxr) == 4.0


def test_noise_magnitude_equals_hand_computation(adapter):
    scores = noise_magnitude(adapter, PROMPTS[:2])
    assert scores.shape == (2,) and scores.dtype == np.float64
    for prompt, score in zip(PROMPTS[:2], scores):
        assert score == pytest.approx(_first_step_by_hand(adapter, prompt), rel=1e-5)


def test_noise_magnitude_is_deterministic_and_batch_independent(adapter):
    a = noise_magnitude(adapter, PROMPTS, batch_size=4)
    b = noise_magnitude(adapter, PROMPTS, batch_size=4)
    np.testing.assert_array_equal(a, b)
    alone = np.array([noise_magnitude(adapter, [p])[0] for p in PROMPTS])
    np.testing.assert_allclose(alone, a, rtol=1e-5, atol=1e-6)
    reordered = noise_magnitude(adapter, PROMPTS[::-1], batch_size=3)[::-1]
    np.testing.assert_allclose(reordered, a, rtol=1e-5, atol=1e-6)
    # a different seed draws different noise
    assert not np.allclose(noise_magnitude(adapter, PROMPTS, seed=1), a)


def test_noise_magnitude_of_the_empty_prompt_is_zero(sd):
    assert noise_magnitude(sd, [""])[0] == 0.0
    assert noise_magnitude(sd, []).shape == (0,)


def test_steps_follow_the_guided_sampling_trajectory(adapter):
    # the per-step values must be what adapter.sample sees at its first steps
    seen = []

    def on_step(i, t, latents, eps_u, eps_c):
        seen.append((eps_c - eps_u).double().flatten(1).norm(dim=1).numpy())

    adapter.sample(PROMPTS[:2], n_per_prompt=2, steps=6, guidance=3.0, seed=5,
                   hooks=SamplingHooks(on_step=on_step))
    expected = np.stack(seen[:3], axis=1).reshape(2, 2, 3)  # rows are (prompt, generation)
    per_step = noise_magnitude_per_step(adapter, PROMPTS[:2], generations=2, steps=3,
                                        num_inference_steps=6, guidance=3.0, seed=5,
                                        batch_size=3)
    assert per_step.shape == (2, 2, 3)
    np.testing.assert_allclose(per_step, expected, rtol=1e-4, atol=1e-6)
    mean = noise_magnitude(adapter, PROMPTS[:2], generations=2, steps=3, num_inference_steps=6,
                           guidance=3.0, seed=5)
    np.testing.assert_allclose(mean, expected.mean(axis=(1, 2)), rtol=1e-4)


def test_first_generation_does_not_depend_on_how_many(sd):
    one = noise_magnitude_per_step(sd, PROMPTS[:2], generations=1)
    three = noise_magnitude_per_step(sd, PROMPTS[:2], generations=3)
    np.testing.assert_allclose(three[:, :1], one, rtol=1e-5)
    assert not np.allclose(three[:, 1], three[:, 0])


def test_noise_magnitude_from_embeddings_is_differentiable(sd):
    cond, uncond = sd.encode_prompt([PROMPTS[1]])
    scheduler = sd.new_scheduler()
    scheduler.set_timesteps(50)
    g = torch.Generator("cpu").manual_seed(generation_seed(0, PROMPTS[1], 0))
    x = torch.randn((1, *sd.latent_shape), generator=g)
    cond = cond.detach().requires_grad_(True)
    with torch.enable_grad():
        d = noise_magnitude_from_embeddings(sd, cond, uncond, x, scheduler.timesteps[0])
        d.sum().backward()
    assert d.shape == (1,)
    assert float(d.detach()) == pytest.approx(noise_magnitude(sd, [PROMPTS[1]])[0], rel=1e-5)
    assert cond.grad is not None and float(cond.grad.abs().sum()) > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 5, "num_inference_steps": 4}, "steps=5 but num_inference_steps=4"),
    ({"generations": 0}, "generations=0"),
    ({"batch_size": -1}, "batch_size=-1"),
    ({"guidance": float("nan")}, "guidance=nan"),
])
def test_bad_options_are_refused(sd, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        noise_magnitude(sd, PROMPTS[:1], **kwargs)


def test_bad_prompts_are_refused(sd):
    with pytest.raises(PromptError, match="sequence of strings"):
        noise_magnitude(sd, [PROMPTS[0], 3])


# ---------------------------------------------------------------------------- attention
def _entropy_by_hand(adapter, prompt, include_padding=True):
    """Average the conditional branch's cross-attention over layers, heads and queries at the
    first step, then take the entropy over tokens."""
    scheduler = adapter.new_scheduler()
    scheduler.set_timesteps(50)
    g = torch.Generator("cpu").manual_seed(generation_seed(0, prompt, 0))
    x = torch.randn((1, *adapter.latent_shape), generator=g) * scheduler.init_noise_sigma
    cond, _ = adapter.encode_prompt([prompt])
    maps = []
    hooks = SamplingHooks(attention_probs=lambda probs, ctx: maps.append(
        probs.double().mean(dim=(0, 1))))
    with torch.no_grad():
        adapter.predict_noise(x, scheduler.timesteps[0], cond, hooks=hooks)
    a = torch.stack(maps).mean(dim=0)
    if not include_padding:
        n = len(adapter.token_strings(prompt))
        a = a[:n] / a[:n].sum()
    return float(-(a * a.log()).sum())


def test_attention_entropy_equals_hand_computation(adapter):
    e = attention_entropy(adapter, PROMPTS[:2])
    assert e.shape == (2,) and e.dtype == np.float64
    for prompt, value in zip(PROMPTS[:2], e):
        assert value == pytest.approx(_entropy_by_hand(adapter, prompt), rel=1e-5)
        assert 0 < value <= np.log(adapter.max_length) + 1e-9
    real = attention_entropy(adapter, PROMPTS[:2], include_padding=False)
    for prompt, value in zip(PROMPTS[:2], real):
        assert value == pytest.approx(_entropy_by_hand(adapter, prompt, False), rel=1e-5)
        assert value <= np.log(len(adapter.token_strings(prompt))) + 1e-9


def test_attention_entropy_is_deterministic_and_batch_independent(adapter):
    a = attention_entropy(adapter, PROMPTS, batch_size=4, steps=2)
    np.testing.assert_array_equal(a, attention_entropy(adapter, PROMPTS, batch_size=4, steps=2))
    alone = np.array([attention_entropy(adapter, [p], steps=2)[0] for p in PROMPTS])
    np.testing.assert_allclose(alone, a, rtol=1e-5)


def test_attention_entropy_layer_selection(sd):
    from diffmem.models.attention import cross_attention_layers

    names = [name for name, _ in cross_attention_layers(sd.unet)]
    assert len(names) >= 2
    first = attention_entropy(sd, PROMPTS[:1], layers=names[:1])
    both = attention_entropy(sd, PROMPTS[:1], layers=lambda name: True)
    assert first[0] != pytest.approx(both[0], rel=1e-9)
    np.testing.assert_allclose(both, attention_entropy(sd, PROMPTS[:1]))
    with pytest.raises(ConfigError, match="selects no cross-attention layer"):
        attention_entropy(sd, PROMPTS[:1], layers=["no.such.layer"])

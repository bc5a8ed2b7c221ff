"""diffmem.models: the adapter over a tiny Stable Diffusion pipeline and our tiny CXR pipeline."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from diffmem.errors import ConfigError, DiffMemError, ModelError
from diffmem.models import SamplingHooks, combine_hooks, generation_seed, load_model
from diffmem.models.attention import HookedCrossAttnProcessor, cross_attention_layers
from diffmem.models.tiny import tiny_stable_diffusion

PROMPTS = ["No acute cardiopulmonary process.",
           "Dr. ___ was notified of the right lower lobe pneumonia."]
STEPS = 3


@pytest.fixture(scope="module")
def cxr_folder(tmp_path_factory):
    from diffmem.pipelines import build_pipeline, train_tokenizer

    tokenizer = train_tokenizer(PROMPTS * 4 + ["Small left pleural effusion."] * 4,
                                vocab_size=120, model_max_length=32)
    folder = tmp_path_factory.mktemp("cxr") / "model"
    build_pipeline("tiny", tokenizer=tokenizer, seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd(sd_folder):
    return load_model(sd_folder)


@pytest.fixture(scope="module")
def cxr(cxr_folder):
    return load_model(cxr_folder)


@pytest.fixture(scope="module", params=["sd", "cxr"])
def adapter(request):
    return request.getfixturevalue(request.param)


def _sample(adapter, prompts=PROMPTS, **kwargs):
    kwargs.setdefault("steps", STEPS)
    kwargs.setdefault("seed", 3)
    return adapter.sample(prompts, **kwargs)


_BASE: dict[int, object] = {}


def _base(adapter):
    """The plain sample of PROMPTS (no hooks), computed once per adapter."""
    if id(adapter) not in _BASE:
        _BASE[id(adapter)] = _sample(adapter)
    return _BASE[id(adapter)]


# ---------------------------------------------------------------------------- loading
def test_load_sd_folder_attributes(sd):
    assert sd.kind == "stable-diffusion"
    assert sd.latent_shape == (4, 8, 8) and sd.image_size == 16
    assert sd.max_length == 32 and sd.num_train_timesteps == 1000
    assert type(sd.scheduler).__name__ == "DDIMScheduler"
    assert sd.scheduler.config.clip_sample is False  # latents must not be clipped to [-1, 1]
    assert sd.device == torch.device("cpu") and sd.dtype == torch.float32


def test_load_cxr_folder_attributes(cxr):
    assert cxr.kind == "cxr"
    assert cxr.latent_shape == (1, 32, 32) and cxr.image_size == 32
    assert cxr.max_length == 32
    assert cxr.scheduler.config.clip_sample is True  # as the CXR preset trains it


def test_fingerprint_stable_and_weight_sensitive(sd, sd_folder):
    fp = sd.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert load_model(sd_folder).fingerprint() == fp
    assert load_model(tiny_stable_diffusion(seed=0)).fingerprint() == fp
    assert load_model(tiny_stable_diffusion(seed=1)).fingerprint() != fp


@pytest.mark.parametrize("name", ["dpm", "ddpm", "pndm", None])
def test_scheduler_swap(sd, name):
    other = load_model(sd.pipeline, scheduler=name)
    expected = {"dpm": "DPMSolverMultistepScheduler", "ddpm": "DDPMScheduler",
                "pndm": "PNDMScheduler", None: "PNDMScheduler"}[name]
    assert type(other.scheduler).__name__ == expected
    res = _sample(other, PROMPTS[:1], n_per_prompt=2)
    again = _sample(other, PROMPTS[:1], n_per_prompt=2, batch_size=1)
    assert res.images.shape == (2, 16, 16)
    np.testing.assert_allclose(res.images, again.images, atol=1e-5)


def test_unknown_scheduler(sd_folder):
    with pytest.raises(ConfigError, match="unknown scheduler 'euler'.*ddim"):
        load_model(sd_folder, scheduler="euler")


def _copy(folder, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def test_error_no_model_index(sd_folder, tmp_path):
    dest = _copy(sd_folder, tmp_path)
    (dest / "model_index.json").unlink()
    with pytest.raises(ModelError, match="no model_index.json.*save_pretrained"):
        load_model(dest)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="is a file, not a model folder"):
        load_model(dest / "unet" / "config.json")


def test_error_wrong_class(sd_folder, tmp_path):
    dest = _copy(sd_folder, tmp_path)
    index = json.loads((dest / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (dest / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="'StableDiffusionXLPipeline'.*supports "
                                         "CXRDiffusionPipeline, StableDiffusionPipeline"):
        load_model(dest)


def test_error_class_name_not_a_string(sd_folder, tmp_path):
    """A '_class_name' that is a list (or an index that is not an object) is a ModelError naming
    model_index.json, not a TypeError."""
    dest = _copy(sd_folder, tmp_path)
    index = json.loads((dest / "model_index.json").read_text())
    index["_class_name"] = ["StableDiffusionPipeline"]
    (dest / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"model_index.json': '_class_name' is "
                                         r"\['StableDiffusionPipeline'\], not a pipeline class"):
        load_model(dest)
    (dest / "model_index.json").write_text(json.dumps([index]))
    with pytest.raises(ModelError, match="model_index.json' holds a JSON list, not an object"):
        load_model(dest)


def test_error_pickle_only_weights(sd_folder, tmp_path):
    dest = _copy(sd_folder, tmp_path)
    weights = dest / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(dest / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match=r"unet/ has weights only as pickles "
                                         r"\(diffusion_pytorch_model.bin\).*safe_serialization"):
        load_model(dest)


def test_error_missing_component(sd_folder, tmp_path):
    dest = _copy(sd_folder, tmp_path)
    shutil.rmtree(dest / "text_encoder")
    with pytest.raises(ModelError, match="component 'text_encoder'.*no subfolder"):
        load_model(dest)
    index = json.loads((dest / "model_index.json").read_text())
    del index["text_encoder"]
    (dest / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="lists no 'text_encoder'"):
        load_model(dest)


def test_error_not_a_pipeline_object():
    with pytest.raises(ModelError, match="cannot use a dict object"):
        load_model({"unet": None})


# ---------------------------------------------------------------------------- text
def test_tokenize_and_token_strings(adapter, caplog):
    enc = adapter.tokenize(PROMPTS)
    assert enc["input_ids"].shape == (2, adapter.max_length)
    assert enc["attention_mask"].shape == (2, adapter.max_length)
    tokens = adapter.token_strings(PROMPTS[1])
    assert len(tokens) == int(enc["attention_mask"][1].sum())
    assert tokens[0] == adapter.tokenizer.bos_token and tokens[-1] == adapter.tokenizer.eos_token
    assert any("___" in t for t in tokens)
    offsets = adapter.token_offsets(PROMPTS[1])
    assert len(offsets) == len(tokens) and offsets[0] is None and offsets[-1] is None
    start, end = offsets[1]
    assert PROMPTS[1][start:end].lower() == "dr"

    long = " ".join(["effusion"] * 40)
    n = adapter.count_tokens(long)
    assert n > adapter.max_length
    with caplog.at_level(logging.WARNING, logger="diffmem.models.adapter"):
        adapter.tokenize([long, PROMPTS[0]])
    assert f"up to {n - adapter.max_length} tokens dropped" in caplog.text
    assert "1 of 2 prompt(s)" in caplog.text


def test_encode_prompt_matches_pipeline(adapter):
    cond, uncond = adapter.encode_prompt(PROMPTS)
    assert cond.shape == uncond.shape == (2, adapter.max_length, 32)
    ref_cond, ref_uncond = adapter.pipeline.encode_prompt(PROMPTS, adapter.device, 1, True)
    torch.testing.assert_close(cond, ref_cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond, ref_uncond, rtol=0, atol=1e-6)
    _, neg = adapter.encode_prompt(PROMPTS, negative_prompt=["pneumonia", "effusion"])
    assert not torch.allclose(neg[0], neg[1])


# ---------------------------------------------------------------------------- noise
def test_predict_noise_matches_unet_and_is_deterministic(adapter):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *adapter.latent_shape), generator=g)
    cond, _ = adapter.encode_prompt(PROMPTS)
    with torch.no_grad():
        eps = adapter.predict_noise(x, 500, cond)
        ref = adapter.unet(x, 500, encoder_hidden_states=cond).sample
        again = adapter.predict_noise(x, torch.tensor(500), cond)
        per_row = adapter.predict_noise(x, torch.tensor([500, 500]), cond)
        shared = adapter.predict_noise(x, 500, cond[:1])
    assert eps.shape == x.shape
    assert torch.equal(eps, ref) and torch.equal(eps, again)
    torch.testing.assert_close(per_row, eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(shared[1], adapter.predict_noise(x[1:], 500, cond[:1])[0].detach(),
                               rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="x_t has shape"):
        adapter.predict_noise(x[:, :, :4], 500, cond)


def test_predict_noise_differentiable_in_cond(adapter):
    x = torch.randn((1, *adapter.latent_shape), generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        cond, _ = adapter.encode_prompt(PROMPTS[:1])
        cond = cond.detach().requires_grad_(True)
        adapter.predict_noise(x, 400, cond).pow(2).sum().backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0


def test_add_noise_and_encode_decode(adapter):
    rng = np.random.default_rng(0)
    images = rng.random((2, adapter.image_size, adapter.image_size)).astype(np.float32)
    x0 = adapter.encode_images(images)
    assert x0.shape == (2, *adapter.latent_shape)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    abar = adapter.train_scheduler.alphas_cumprod[300]
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(adapter.add_noise(x0, noise, 300), expected, rtol=0, atol=1e-6)
    decoded = adapter.decode(x0)
    assert decoded.shape == (2, 1, adapter.image_size, adapter.image_size)
    assert decoded.dtype == torch.float32 and 0 <= decoded.min() and decoded.max() <= 1
    if adapter.vae is None:  # pixel space round-trips exactly
        torch.testing.assert_close(decoded[:, 0], torch.from_numpy(images), rtol=0, atol=1e-6)
    with pytest.raises(DiffMemError, match="do not fit this model"):
        adapter.encode_images(images[:, :8, :8])


def test_v_prediction_is_converted_to_epsilon():
    adapter = load_model(tiny_stable_diffusion(seed=0, prediction_type="v_prediction"))
    x = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(0))
    cond, _ = adapter.encode_prompt(PROMPTS)
    with torch.no_grad():
        v = adapter.unet(x, 700, encoder_hidden_states=cond).sample
        eps = adapter.predict_noise(x, 700, cond)
    abar = adapter.train_scheduler.alphas_cumprod[700]
    torch.testing.assert_close(eps, abar.sqrt() * v + (1 - abar).sqrt() * x, rtol=0, atol=1e-6)
    # and sampling still matches the pipeline's own loop (guidance applied to v there)
    res = _sample(adapter, PROMPTS[:1], guidance=5.0)
    _assert_matches_pipeline(adapter, res, guidance=5.0)


# ---------------------------------------------------------------------------- sampling
def _pipeline_images(adapter, result, guidance):
    from diffusers import DDIMScheduler

    pipe = adapter.pipeline
    own = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(adapter.scheduler.config)
    try:
        generators = [torch.Generator().manual_seed(int(s)) for s in result.seeds]
        prompts = [result.prompts[i] for i in result.prompt_index]
        out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=guidance,
                   generator=generators, output_type="np").images
    finally:
        pipe.scheduler = own
    if out.shape[-1] == 3:
        return out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return out[..., 0]


def _assert_matches_pipeline(adapter, result, guidance):
    ref = _pipeline_images(adapter, result, guidance)
    np.testing.assert_allclose(result.images, ref, rtol=0, atol=1e-5)


def test_sample_matches_pipeline_call(adapter):
    res = _sample(adapter, n_per_prompt=2, guidance=4.0)
    assert res.images.shape == (4, adapter.image_size, adapter.image_size)
    assert res.images.dtype == np.float32 and 0 <= res.images.min() <= res.images.max() <= 1
    assert res.prompt_index.tolist() == [0, 0, 1, 1]
    assert res.generation_index.tolist() == [0, 1, 0, 1]
    assert res.seeds[3] == generation_seed(3, PROMPTS[1], 1)
    assert json.loads(json.dumps(res.to_dict()))["n"] == 4
    _assert_matches_pipeline(adapter, res, 4.0)


def test_sample_reproducible_and_batch_independent(adapter):
    base = _base(adapter)
    np.testing.assert_array_equal(_sample(adapter).images, base.images)
    # other order, other batching, more generations: generation j of a prompt stays the same
    c = _sample(adapter, PROMPTS[::-1] + ["Small left pleural effusion."], n_per_prompt=2,
                batch_size=4, return_latents=True)
    assert c.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(c.images[[2, 0]], base.images, rtol=0, atol=1e-5)
    assert c.latents.shape == (6, *adapter.latent_shape) and c.latents.dtype == torch.float32
    assert base.latents is None
    d = _sample(adapter, seed=4)
    assert np.abs(d.images - base.images).max() > 1e-2


def test_empty_prompt_skips_the_conditional_branch_with_the_same_images(adapter):
    rows = []
    handle = adapter.unet.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    try:
        res = _sample(adapter, [""], n_per_prompt=2, guidance=4.0)
    finally:
        handle.remove()
    assert set(rows) == {2}                 # B rows per step, not [uncond; cond] = 2B
    # a read-only hook keeps the guided [uncond; cond] pass: the same images
    guided = _sample(adapter, [""], n_per_prompt=2, guidance=4.0,
                     hooks=SamplingHooks(on_step=lambda *a: None))
    np.testing.assert_allclose(res.images, guided.images, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- hooks
def test_hook_prompt_embeds(adapter):
    base = _base(adapter)
    seen = {}

    def identity(cond, uncond, prompts, generators):
        seen.update(prompts=prompts, n=len(generators), shape=tuple(cond.shape))
        return cond, uncond

    same = _sample(adapter, hooks=SamplingHooks(prompt_embeds=identity))
    np.testing.assert_array_equal(same.images, base.images)
    assert seen == {"prompts": PROMPTS, "n": 2, "shape": (2, adapter.max_length, 32)}
    zero_edit = _sample(adapter, hooks=SamplingHooks(
        prompt_embeds=lambda c, u, p: (c + torch.zeros_like(c), u)))
    np.testing.assert_array_equal(zero_edit.images, base.images)
    big = _sample(adapter, hooks=SamplingHooks(
        prompt_embeds=lambda c, u, p: (c + 5 * torch.randn(c.shape, generator=torch.Generator()
                                                              .manual_seed(0)), u)))
    assert np.abs(big.images - base.images).max() > 1e-3


def _unconditional_reference(adapter, result):
    """DDIM on eps_uncond alone, written out with predict_noise."""
    scheduler = adapter.new_scheduler()
    scheduler.set_timesteps(STEPS)
    _, uncond = adapter.encode_prompt(result.prompts)
    images = []
    for k, seed in enumerate(result.seeds):
        x = torch.randn((1, *adapter.latent_shape), generator=torch.Generator().manual_seed(
            int(seed))) * scheduler.init_noise_sigma
        s = adapter.new_scheduler()
        s.set_timesteps(STEPS)
        for t in s.timesteps:
            with torch.no_grad():
                eps = adapter.predict_noise(x, t, uncond[result.prompt_index[k]][None],
                                            conditional=False)
            x = s.step(eps, t, x, eta=0.0).prev_sample
        images.append(adapter.decode(x)[0, 0].numpy())
    return np.stack(images)


def test_hook_guidance_scale(adapter):
    base = _base(adapter)
    calls = []

    def default(step_index, t, scale):
        calls.append((step_index, t, scale))
        return scale

    same = _sample(adapter, hooks=SamplingHooks(guidance_scale=default))
    np.testing.assert_array_equal(same.images, base.images)
    assert [c[0] for c in calls] == list(range(STEPS)) and calls[0][2] == 7.5
    assert calls[0][1] > calls[-1][1]  # noisiest first

    uncond_only = _sample(adapter, hooks=SamplingHooks(guidance_scale=lambda i, t, s: 0.0))
    np.testing.assert_allclose(uncond_only.images, _unconditional_reference(adapter, base),
                               rtol=0, atol=1e-5)
    # with scale 0 the prompt no longer matters, even a wildly edited one
    edited = _sample(adapter, hooks=SamplingHooks(
        guidance_scale=lambda i, t, s: 0.0, prompt_embeds=lambda c, u, p: (c * 100, u)))
    np.testing.assert_array_equal(edited.images, uncond_only.images)
    delayed = _sample(adapter, hooks=SamplingHooks(
        guidance_scale=lambda i, t, s: 0.0 if i == 0 else s))
    assert not np.array_equal(delayed.images, base.images)


def test_hook_initial_latents(adapter):
    shape = (2, *adapter.latent_shape)
    fixed = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    seen = []

    def draw(sh, generators):
        seen.append((tuple(sh), len(generators)))
        return fixed[: sh[0]]

    by_fn = _sample(adapter, hooks=SamplingHooks(initial_latents=draw))
    by_tensor = _sample(adapter, hooks=SamplingHooks(initial_latents=fixed))
    np.testing.assert_array_equal(by_fn.images, by_tensor.images)
    assert seen == [(shape, 2)]
    assert not np.allclose(by_fn.images, _base(adapter).images)
    with pytest.raises(ModelError, match="initial_latents tensor has shape"):
        _sample(adapter, hooks=SamplingHooks(initial_latents=fixed[:, :, :2]))


def test_hook_on_step(adapter):
    calls = []

    def record(i, t, latents, eps_u, eps_c):
        calls.append((i, t, tuple(latents.shape), tuple(eps_u.shape),
                      None if eps_c is None else tuple(eps_c.shape)))

    _sample(adapter, hooks=SamplingHooks(on_step=record), batch_size=2)
    shape = (2, *adapter.latent_shape)
    assert len(calls) == STEPS and [c[0] for c in calls] == list(range(STEPS))
    assert all(c[2:] == (shape, shape, shape) for c in calls)
    calls.clear()
    _sample(adapter, hooks=SamplingHooks(on_step=record, guidance_scale=lambda i, t, s: 0.0))
    assert all(c[4] is None for c in calls)


def test_attention_logits_identity_matches_default_processor(adapter):
    x = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(2))
    cond, _ = adapter.encode_prompt(PROMPTS)
    identity = SamplingHooks(attention_logits=lambda logits, ctx: logits)
    with torch.no_grad():
        plain = adapter.predict_noise(x, 600, cond)
        hooked = adapter.predict_noise(x, 600, cond, hooks=identity)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=1e-5)
    base = _base(adapter)
    np.testing.assert_allclose(_sample(adapter, hooks=identity).images, base.images,
                               rtol=0, atol=1e-5)
    # the default processors are back afterwards
    assert not any(isinstance(m.processor, HookedCrossAttnProcessor)
                   for _, m in cross_attention_layers(adapter.unet))

    def only_first(logits, ctx):
        masked = torch.full_like(logits, float("-inf"))
        masked[..., 0] = logits[..., 0]
        return masked

    with torch.no_grad():
        masked = adapter.predict_noise(x, 600, cond, hooks=SamplingHooks(
            attention_logits=only_first))
    assert (masked - plain).abs().max() > 1e-4


def test_attention_probs_and_context(adapter):
    records = []

    def record(probs, ctx):
        records.append((ctx, tuple(probs.shape), probs.sum(-1)))

    _sample(adapter, hooks=SamplingHooks(attention_probs=record))
    layers = {name for name, _ in cross_attention_layers(adapter.unet)}
    assert layers and all(name.endswith("attn2") for name in layers)
    assert {ctx.layer for ctx, _, _ in records} == layers
    assert len(records) == STEPS * len(layers)
    assert sorted({ctx.step_index for ctx, _, _ in records}) == list(range(STEPS))
    for ctx, shape, sums in records:
        assert shape[0] == 2 * len(PROMPTS) * ctx.heads and shape[2] == adapter.max_length
        assert ctx.query_shape[0] * ctx.query_shape[1] == shape[1]
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)
        assert ctx.is_conditional.tolist() == [False, False, True, True]
        assert ctx.conditional_rows.sum() == 2 * ctx.heads and not ctx.conditional_rows[0]
        lengths = ctx.prompt_lengths.tolist()
        assert lengths[:2] == [2, 2]  # the empty prompt: BOS, EOS
        assert lengths[2:] == [len(adapter.token_strings(p)) for p in PROMPTS]
    # a bare predict_noise call: no step index, flags as declared
    records.clear()
    x = torch.randn((1, *adapter.latent_shape))
    cond, _ = adapter.encode_prompt(PROMPTS[:1])
    with torch.no_grad():
        adapter.predict_noise(x, 10, cond, conditional=False,
                              hooks=SamplingHooks(attention_probs=record))
    assert records and all(ctx.step_index is None and ctx.timestep == 10
                           and ctx.is_conditional.tolist() == [False] for ctx, _, _ in records)


def test_combine_hooks(adapter):
    order = []
    a = SamplingHooks(guidance_scale=lambda i, t, s: order.append("a") or s + 1)
    b = SamplingHooks(guidance_scale=lambda i, t, s: order.append("b") or s * 2,
                      initial_latents=torch.zeros(adapter.latent_shape))
    both = combine_hooks(a, None, b)
    assert both.guidance_scale(0, 999, 1.0) == 4.0 and order == ["a", "b"]
    assert both.initial_latents is b.initial_latents and both.on_step is None
    with pytest.raises(ConfigError, match="2 hooks set initial_latents"):
        combine_hooks(b, b)


# ---------------------------------------------------------------------------- CXR latent mode
def test_cxr_latent_preset(tmp_path):
    from diffmem.pipelines import build_pipeline, train_tokenizer
    from diffmem.pipelines.presets import PRESET_DIR

    preset = json.loads((PRESET_DIR / "tiny.json").read_text())
    preset.update(resolution=16, latent=True, vae={
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16})
    preset["unet"].update(sample_size=8, in_channels=4, out_channels=4)
    preset["scheduler"]["clip_sample"] = False  # latents must not be clipped to [-1, 1]
    path = tmp_path / "tiny_latent.json"
    path.write_text(json.dumps(preset))
    tokenizer = train_tokenizer(PROMPTS * 4, vocab_size=100, model_max_length=32)
    build_pipeline(path, tokenizer=tokenizer, seed=0).save_pretrained(tmp_path / "model")
    adapter = load_model(tmp_path / "model")
    assert adapter.kind == "cxr" and adapter.vae is not None
    assert adapter.latent_shape == (4, 8, 8) and adapter.image_size == 16
    assert adapter.scheduler.config.clip_sample is False
    res = _sample(adapter, guidance=4.0)
    _assert_matches_pipeline(adapter, res, 4.0)
    x0 = adapter.encode_images(np.full((1, 16, 16), 0.5, dtype=np.float32))
    assert x0.shape == (1, 4, 8, 8)
    torch.testing.assert_close(adapter.decode(x0), adapter.pipeline.decode_latents(x0))

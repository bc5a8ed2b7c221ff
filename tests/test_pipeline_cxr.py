"""CXRDiffusionPipeline: outputs, guidance, batching, save/load round trips and refusals.

Tiny parts (UNet channels (8, 16), a 2-layer 32-wide text encoder, 32 px, 2-3 steps) are built
by :func:`get_dummy_components`, in the manner of diffusers' pipeline tests.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch

from diffmem.errors import ConfigError, DataError, ModelError, PromptError
from diffmem.pipelines import CXRDiffusionPipeline, CXRPipelineOutput, train_tokenizer

CORPUS = [
    "No acute cardiopulmonary process. Dr. ___ was notified by ___ at ___ on ___.",
    "Comparison XXXX. Heart size is normal. The lungs are clear.",
    "Mild cardiomegaly with small bilateral pleural effusions and bibasilar atelectasis.",
    "Left lower lobe opacity concerning for pneumonia. No pneumothorax.",
] * 5
PROMPT = "Mild cardiomegaly. No pneumothorax."
PROMPT2 = "Left lower lobe opacity, Dr. ___ notified."


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=200, model_max_length=16, min_frequency=1)


def get_dummy_components(tokenizer, *, latent: bool = False, vae_channels: int = 1):
    """Tiny, seeded modules: pixel space by default, or a 2x-downsampling VAE with 4 latents."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16 if latent else 32, in_channels=4 if latent else 1,
        out_channels=4 if latent else 1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=4)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = None
    if latent:
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=vae_channels, out_channels=vae_channels, latent_channels=4,
                            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler, "vae": vae}


def make_pipe(tokenizer, **kwargs) -> CXRDiffusionPipeline:
    pipe = CXRDiffusionPipeline(**get_dummy_components(tokenizer, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def pipe(tokenizer):
    return make_pipe(tokenizer)


def run(pipe, prompt=PROMPT, *, seed=0, steps=2, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                **kwargs)


# ---------------------------------------------------------------- outputs

def test_output_types_and_shapes(pipe):
    arr = run(pipe, [PROMPT, PROMPT2], output_type="np").images
    assert arr.shape == (2, 32, 32, 1) and arr.dtype == np.float32
    assert arr.min() >= 0.0 and arr.max() <= 1.0 and arr.std() > 0
    pt = run(pipe, [PROMPT, PROMPT2], output_type="pt").images
    assert pt.shape == (2, 1, 32, 32) and pt.dtype == torch.float32
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    pil = run(pipe, [PROMPT, PROMPT2], output_type="pil").images
    assert [im.mode for im in pil] == ["L", "L"] and pil[0].size == (32, 32)
    np.testing.assert_array_equal(np.asarray(pil[1]), np.round(arr[1, ..., 0] * 255).astype(np.uint8))
    lat = run(pipe, PROMPT, output_type="latent").images
    assert lat.shape == (1, *pipe.sample_shape)
    np.testing.assert_allclose(pipe.decode_latents(lat).numpy(), run(pipe, output_type="pt").images,
                               atol=1e-6)


def test_dict_and_tuple_outputs_agree(pipe):
    out = run(pipe)
    assert isinstance(out, CXRPipelineOutput)
    tup = run(pipe, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    np.testing.assert_array_equal(out.images, tup[0])


def test_fixed_generator_is_reproducible_and_seed_matters(pipe):
    np.testing.assert_array_equal(run(pipe, seed=3).images, run(pipe, seed=3).images)
    assert np.abs(run(pipe, seed=3).images - run(pipe, seed=4).images).max() > 1e-3


def test_batch_equals_single_calls(pipe):
    """With one generator per image, an image does not depend on its batch-mates."""
    both = pipe([PROMPT, PROMPT2], num_inference_steps=3, generator=gens(0, 1), output_type="np",
                guidance_scale=3.0).images
    one = pipe(PROMPT, num_inference_steps=3, generator=gens(0), output_type="np",
               guidance_scale=3.0).images
    two = pipe(PROMPT2, num_inference_steps=3, generator=gens(1), output_type="np",
               guidance_scale=3.0).images
    np.testing.assert_allclose(both[0], one[0], atol=1e-5)
    np.testing.assert_allclose(both[1], two[0], atol=1e-5)
    assert np.abs(both[0] - both[1]).max() > 1e-3


def test_num_images_per_prompt_orders_prompt_by_prompt(pipe):
    out = pipe([PROMPT, PROMPT2], num_inference_steps=2, num_images_per_prompt=2,
               generator=gens(0, 1, 2, 3), output_type="np").images
    assert out.shape == (4, 32, 32, 1)
    second = pipe(PROMPT2, num_inference_steps=2, num_images_per_prompt=2, generator=gens(2, 3),
                  output_type="np").images
    np.testing.assert_allclose(out[2:], second, atol=1e-5)


def test_guidance_paths(pipe):
    batches = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        plain = run(pipe, guidance_scale=1.0).images
        guided = run(pipe, guidance_scale=5.0).images
        # negative prompt == prompt: eps_u + w (eps_c - eps_u) == eps_c, the unguided result
        same = run(pipe, guidance_scale=5.0, negative_prompt=PROMPT).images
    finally:
        hook.remove()
    assert batches == [1, 1, 2, 2, 2, 2]  # guidance runs both branches in one batch
    assert np.abs(plain - guided).max() > 1e-3
    np.testing.assert_allclose(same, plain, atol=1e-5)
    other = run(pipe, guidance_scale=5.0, negative_prompt="no pneumothorax").images
    assert np.abs(other - guided).max() > 1e-4


def test_guided_step_matches_hand_computed_reference(pipe):
    """One DDIM step equals scheduler.step(eps_u + w (eps_c - eps_u)) computed by hand."""
    from diffusers import DDIMScheduler

    ddim = CXRDiffusionPipeline(**{**pipe.components,
                                   "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    ddim.set_progress_bar_config(disable=True)
    w = 4.0
    out = run(ddim, steps=1, guidance_scale=w, negative_prompt=PROMPT2, output_type="latent").images

    with torch.no_grad():
        x = torch.randn((1, *ddim.sample_shape), generator=torch.Generator().manual_seed(0))
        ddim.scheduler.set_timesteps(1)
        t = ddim.scheduler.timesteps[0]
        ids = ddim.tokenizer([PROMPT, PROMPT2], padding="max_length", max_length=16,
                             return_tensors="pt").input_ids
        cond, uncond = ddim.text_encoder(ids)[0].chunk(2)
        eps_c = ddim.unet(x, t, encoder_hidden_states=cond).sample
        eps_u = ddim.unet(x, t, encoder_hidden_states=uncond).sample
        expected = ddim.scheduler.step(eps_u + w * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_prompt_embeds_match_prompt(pipe):
    cond, uncond = pipe.encode_prompt([PROMPT], "cpu", 1, True)
    assert cond.shape == uncond.shape == (1, 16, 32)
    via_text = run(pipe, guidance_scale=3.0).images
    via_embeds = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=2,
                      generator=torch.Generator().manual_seed(0), output_type="np",
                      guidance_scale=3.0).images
    np.testing.assert_array_equal(via_text, via_embeds)
    cond3, none = pipe.encode_prompt(PROMPT, "cpu", 3, False)
    assert none is None and cond3.shape == (3, 16, 32)
    torch.testing.assert_close(cond3[2], cond[0])


def test_encode_prompt_keeps_gradients_for_training(pipe):
    cond, _ = pipe.encode_prompt(["", PROMPT], "cpu", 1, False)  # "" = caption dropout
    assert cond.requires_grad


def test_callback_can_replace_latents(pipe):
    seen = []

    def zero_at_end(p, step, t, tensors):
        seen.append((step, sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    out = run(pipe, steps=3, callback_on_step_end=zero_at_end).images
    assert seen == [(0, ["latents"]), (1, ["latents"]), (2, ["latents"])]
    np.testing.assert_allclose(out, 0.5)  # zero pixels decode to mid gray


def test_progress_bar_hidden_by_environment(tokenizer, monkeypatch):
    fresh = CXRDiffusionPipeline(**get_dummy_components(tokenizer))
    monkeypatch.delenv("DIFFMEM_NO_PROGRESS", raising=False)
    assert not fresh.progress_bar(range(2)).disable
    monkeypatch.setenv("DIFFMEM_NO_PROGRESS", "1")
    assert fresh.progress_bar(range(2)).disable


def test_pixel_encode_decode_round_trip(pipe):
    images = torch.rand(2, 1, 32, 32)
    x = pipe.encode_images(images)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(pipe.decode_latents(x), images)
    with pytest.raises(DataError, match=r"expected \(B, 1, 32, 32\)"):
        pipe.encode_images(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("vae_channels", [1, 3])
def test_latent_mode(tokenizer, vae_channels):
    pipe = make_pipe(tokenizer, latent=True, vae_channels=vae_channels)
    assert pipe.sample_shape == (4, 16, 16) and pipe.image_size == (32, 32)
    arr = run(pipe, [PROMPT, PROMPT2], guidance_scale=2.0).images
    assert arr.shape == (2, 32, 32, 1) and 0 <= arr.min() and arr.max() <= 1
    z = pipe.encode_images(torch.rand(2, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 16, 16)
    assert pipe.decode_latents(z).shape == (2, 1, 32, 32)


def test_ddim_scheduler_swap(pipe):
    from diffusers import DDIMScheduler, DDPMScheduler

    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(original.config)
        a = run(pipe, steps=3, seed=0).images
        b = run(pipe, steps=3, seed=1).images
        assert a.shape == (1, 32, 32, 1) and np.abs(a - b).max() > 1e-3
        assert pipe.config.scheduler == ("diffusers", "DDIMScheduler")
    finally:
        pipe.scheduler = original
    assert isinstance(pipe.scheduler, DDPMScheduler)


# ---------------------------------------------------------------- input checks

@pytest.mark.parametrize("prompt, match", [
    ("", r"prompt is empty \(''\)"),
    ("   \n", r"prompt is empty"),
    ([PROMPT, "  "], r"prompt\[1\] is empty"),
    ([], r"non-empty list"),
    ([PROMPT, 3], r"prompt\[1\] must be a string"),
])
def test_empty_prompts_are_refused(pipe, prompt, match):
    with pytest.raises(PromptError, match=match):
        pipe(prompt, num_inference_steps=1)


def test_bad_options_are_refused(pipe):
    with pytest.raises(ConfigError, match="output_type='png'"):
        run(pipe, output_type="png")
    with pytest.raises(ConfigError, match="num_inference_steps=0"):
        run(pipe, steps=0)
    with pytest.raises(ConfigError, match="list of 1 generators but 2 images"):
        pipe([PROMPT, PROMPT2], num_inference_steps=1, generator=gens(0))
    with pytest.raises(ConfigError, match=r"latents has shape \(1, 1, 8, 8\)"):
        run(pipe, latents=torch.zeros(1, 1, 8, 8))
    with pytest.raises(PromptError, match="negative_prompt must be a string or a list of 2"):
        pipe([PROMPT, PROMPT2], num_inference_steps=1, negative_prompt=["a"])
    with pytest.raises(ConfigError, match="callback_on_step_end_tensor_inputs"):
        run(pipe, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    long = "heart size is normal and the lungs are clear " * 4
    n_tokens = len(pipe.tokenizer(long, verbose=False).input_ids)
    assert n_tokens > 16
    with caplog.at_level(logging.WARNING, logger="diffmem.pipelines.pipeline_cxr"):
        ids = pipe.tokenize([PROMPT, long])
        run(pipe, [PROMPT, long])
    assert ids.shape == (2, 16) and ids[1, -1] == pipe.tokenizer.eos_token_id
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # once from tokenize, once from the call; never for prompt[0]
    assert all(f"prompt[1] has {n_tokens} tokens" in m for m in messages)
    assert all(f"{n_tokens - 16} token(s) were dropped" in m for m in messages)
    caplog.clear()
    pipe.tokenize(long, warn_truncation=False)
    assert not caplog.records


# ---------------------------------------------------------------- save / load

@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(folder)
    return folder


def test_save_load_round_trip(pipe, saved):
    assert (saved / "pipeline.py").is_file()
    files = {p.name for p in saved.rglob("*") if p.is_file()}
    assert "diffusion_pytorch_model.safetensors" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "CXRDiffusionPipeline" and index["vae"] == [None, None]

    loaded = CXRDiffusionPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and loaded.sample_shape == pipe.sample_shape
    for prompt in (PROMPT, [PROMPT, PROMPT2]):
        np.testing.assert_array_equal(run(loaded, prompt, guidance_scale=3.0).images,
                                      run(pipe, prompt, guidance_scale=3.0).images)
    assert loaded.tokenizer.tokenize("Dr. ___ XXXX [** Name **]") == ["dr", ".", "___", "XXXX", "[****]"]


def test_latent_pipeline_round_trip(tokenizer, tmp_path):
    pipe = make_pipe(tokenizer, latent=True, vae_channels=3)
    pipe.save_pretrained(tmp_path)
    loaded = CXRDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(loaded).images, run(pipe).images)


def test_plain_diffusers_loads_via_custom_pipeline(saved, pipe, tmp_path, monkeypatch):
    """DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder) gives our class back."""
    import diffusers.utils.dynamic_modules_utils as dyn
    from diffusers import DiffusionPipeline

    # diffusers copies pipeline.py into its modules cache; keep that inside tmp_path
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    loaded = DiffusionPipeline.from_pretrained(str(saved), custom_pipeline=str(saved),
                                               trust_remote_code=True, use_safetensors=True)
    assert type(loaded) is CXRDiffusionPipeline
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(loaded).images, run(pipe).images)


def _copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_refuses_missing_folder_and_index(saved, tmp_path):
    with pytest.raises(ModelError, match="not a folder"):
        CXRDiffusionPipeline.from_pretrained(tmp_path / "nope")
    folder = _copy(saved, tmp_path)
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelError, match=r"copy: no model_index\.json"):
        CXRDiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("remove, match", [
    ("unet", r"component folder unet/ is missing"),
    ("text_encoder/config.json", r"text_encoder: missing config\.json"),
    ("scheduler/scheduler_config.json", r"scheduler: missing scheduler_config\.json"),
    ("unet/diffusion_pytorch_model.safetensors", r"unet: no \.safetensors weights"),
])
def test_refuses_incomplete_folder(saved, tmp_path, remove, match):
    folder = _copy(saved, tmp_path)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelError, match=match):
        CXRDiffusionPipeline.from_pretrained(folder)


def test_refuses_another_pipeline_class(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="holds a 'StableDiffusionPipeline' pipeline"):
        CXRDiffusionPipeline.from_pretrained(folder)


def test_refuses_pickled_weights_without_reading_them(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "text_encoder" / "model.safetensors").unlink()
    # not a valid pickle: the check must refuse by file name, before anything reads it
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ModelError, match=r"text_encoder: weights only as pickle \(pytorch_model\.bin\)"):
        CXRDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(ModelError, match="use_safetensors=False"):
        CXRDiffusionPipeline.from_pretrained(saved, use_safetensors=False)


def test_refuses_to_save_pickles(pipe, tmp_path):
    with pytest.raises(ConfigError, match="safe_serialization=False"):
        pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert not any(tmp_path.iterdir())

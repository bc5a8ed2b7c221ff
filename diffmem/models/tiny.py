"""Test-sized Stable Diffusion pipelines built from configs (random weights, seeded), so tests of
code that needs "a diffusers SD model" run in seconds without downloading one.

The parts follow the real layout (CLIP BPE tokenizer with ``</w>`` word ends, CLIPTextModel,
UNet2DConditionModel with cross-attention, AutoencoderKL with 3 channels, PNDM schedule of
SD 1.x) at a tiny size. They generate noise, not X-rays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

#: Folder of the named topologies read by :func:`sd_topology`.
PRESET_DIR = Path(__file__).with_name("presets")
#: Sentences the tiny tokenizer is trained on (report-like, with de-identification markers).
TINY_CORPUS = (
    "No acute cardiopulmonary process.",
    "Right lower lobe pneumonia. Dr. ___ was notified by phone at 10:30 on ___.",
    "Stable small left pleural effusion; no pneumothorax.",
    "Interval removal of the endotracheal tube and nasogastric tube.",
    "The lungs are clear. Heart size is normal. Mild atelectasis at the bases.",
    "Moderate pulmonary edema, increased compared to the prior study.",
)
# The pre-tokenizer of CLIP: special tokens, contractions, letter runs, single digits, symbols.
_CLIP_SPLIT = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
               r"[^\s\p{L}\p{N}]+")


def tiny_clip_tokenizer(texts: Sequence[str] = TINY_CORPUS, *, vocab_size: int = 400,
                        model_max_length: int = 32):
    """A :class:`transformers.CLIPTokenizer` whose BPE was trained on ``texts`` here.

    Byte-level BPE with CLIP's normalizer, pre-tokenizer and ``</w>`` end-of-word suffix,
    ``<|startoftext|>``/``<|endoftext|>`` specials (the end token also pads, as in SD 1.x).
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(),
                                           normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    model = json.loads(tok.to_str())["model"]
    # The trainer breaks ties between equally frequent merges in no fixed order; rank merges
    # and number tokens canonically (shorter first, then alphabetically) so that the same
    # texts always give the same tokenizer.
    merges = sorted((tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                     for m in model["merges"]), key=lambda m: (len(m[0] + m[1]), m))
    tokens = sorted(set(model["vocab"]) - {bos, eos}, key=lambda t: (len(t), t))
    vocab = {token: i for i, token in enumerate([bos, eos, *tokens])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_stable_diffusion(*, seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny :class:`diffusers.StableDiffusionPipeline` (16 px images, 4x8x8 latents).

    Parameters
    ----------
    seed : int, optional
        Seed of the weight initialization (the global torch RNG is restored afterwards).
    prediction_type : str, optional
        ``"epsilon"`` (SD 1.x) or ``"v_prediction"`` (SD 2.x style).

    Returns
    -------
    diffusers.StableDiffusionPipeline
        Without safety checker; scheduler PNDM as in SD 1.x.
    """
    from diffusers import PNDMScheduler

    unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
               down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32,
               sample_size=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                              prediction_type=prediction_type)
    return stable_diffusion_from_configs(unet, vae, text, scheduler=scheduler, seed=seed)


def stable_diffusion_from_configs(unet: dict, vae: dict, text_encoder: dict, *,
                                  scheduler=None, seed: int = 0, model_max_length: int = 32):
    """A :class:`diffusers.StableDiffusionPipeline` with random weights built from component
    configs (no download): ``UNet2DConditionModel(**unet)``, ``AutoencoderKL(**vae)``,
    ``CLIPTextModel(CLIPTextConfig(**text_encoder))`` and :func:`tiny_clip_tokenizer`.

    Parameters
    ----------
    unet, vae, text_encoder : dict
        Constructor arguments; the text encoder's vocabulary defaults to the tokenizer's, its
        positions to ``model_max_length`` and its special token ids to the tokenizer's.
    scheduler : diffusers scheduler, optional
        Default: DDIM with SD 1.x's schedule (scaled linear betas 0.00085 to 0.012).
    seed : int, optional
        Seed of the weight initialization (the global torch RNG is restored afterwards).
    model_max_length : int, optional
        Tokens the tokenizer pads and truncates to (77 in SD 1.x).

    Returns
    -------
    diffusers.StableDiffusionPipeline
        Without safety checker, modules in eval mode, progress bar off.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer(model_max_length=model_max_length)
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": model_max_length,
            **text_encoder, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_model = UNet2DConditionModel(**unet)
        vae_model = AutoencoderKL(**vae)
        text_model = CLIPTextModel(CLIPTextConfig(**text))
    if scheduler is None:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet_model, vae=vae_model, text_encoder=text_model,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    for module in (unet_model, vae_model, text_model):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_topology(name: str) -> dict:
    """Component configs of a named Stable Diffusion topology (``sd15``, ``small``: the files
    ``diffmem/models/presets/<name>.json``), for :func:`stable_diffusion_from_configs`.

    Raises
    ------
    ConfigError
        For an unknown name (the message lists the known ones).

    Examples
    --------
    >>> sd_topology("sd15")["unet"]["block_out_channels"]
    [320, 640, 1280, 1280]
    """
    from diffmem.presets import read_preset_json

    return read_preset_json(name, PRESET_DIR, kind="model size")[2]

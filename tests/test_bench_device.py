"""``diffmem bench device``: the CPU smoke test of the GPU check (issue 12, item 5)."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.cli import main
from diffmem.detect.bench_device import bench_device
from diffmem.errors import ConfigError
from diffmem.models.tiny import sd_topology, stable_diffusion_from_configs


@pytest.mark.slow
def test_sd15_topology_has_sd15_parameter_counts():
    """The sd15 preset builds SD 1.5's UNet (859.5M parameters) and VAE (83.7M) (about a
    minute of weight initialization on two CPU cores)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    topo = sd_topology("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**topo["unet"])
        vae = AutoencoderKL(**topo["vae"])
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 859.5
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 83.7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_sd15_on_cpu_is_refused(capsys):
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*--size small"):
        bench_device(size="sd15")
    assert main(["bench", "device"]) == 2
    assert "--size small" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown model size preset 'xl'"):
        bench_device(size="xl", device="cpu")
    with pytest.raises(ConfigError, match="prompts=0; use an integer >= 1"):
        bench_device(size="small", device="cpu", prompts=0)
    with pytest.raises(ConfigError, match="float16 does not run on the CPU"):
        bench_device(size="small", device="cpu", dtype="float16")


def test_small_smoke_run(tmp_path, capsys):
    """The small model end to end on the CPU in float32 (no baseline: it is float32)."""
    out = tmp_path / "device.json"
    code = main(["-q", "--threads", "1", "bench", "device", "--size", "small", "--device", "cpu",
                 "--prompts", "2", "--batch-size", "2", "--images", "1", "--steps", "2",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    for words in ("prompts/s", "images/s", "peak resident memory", "seed 0",
                  "run on cpu in float32"):
        assert words in printed
    facts = json.loads(out.read_text(encoding="utf-8"))
    assert facts["stage1"]["prompts"] == 2 and facts["stage1"]["prompts_per_second"] > 0
    assert facts["stage2"]["image_shape"] == [64, 64] and facts["stage2"]["images_per_second"] > 0
    assert facts["sizes"]["latent_shape"] == [4, 16, 16] and facts["baseline"] is None
    assert facts["memory"]["peak_rss_gib"] > 0


@pytest.mark.slow
def test_small_smoke_run_with_float32_baseline(tmp_path, capsys):
    """bfloat16 with the float32 baseline (bfloat16 convolutions are slow on CPUs)."""
    out = tmp_path / "device.json"
    code = main(["-q", "--threads", "1", "bench", "device", "--size", "small", "--device", "cpu",
                 "--dtype", "bfloat16", "--prompts", "2", "--batch-size", "2", "--images", "1",
                 "--steps", "2", "--baseline-prompts", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    for words in ("prompts/s", "images/s", "peak resident memory", "seed 0", "run on cpu in "
                  "bfloat16", "baseline stage 1 in float32"):
        assert words in printed
    facts = json.loads(out.read_text(encoding="utf-8"))
    assert facts["stage1"]["prompts"] == 2 and facts["stage1"]["prompts_per_second"] > 0
    assert facts["stage2"]["image_shape"] == [64, 64] and facts["stage2"]["images_per_second"] > 0
    assert facts["sizes"]["latent_shape"] == [4, 16, 16]
    assert 0 < facts["baseline"]["max_relative_difference"] < 0.05  # bfloat16 vs float32
    assert facts["memory"]["peak_rss_gib"] > 0


def test_from_configs_is_seeded():
    topo = sd_topology("small")
    a = stable_diffusion_from_configs(topo["unet"], topo["vae"], topo["text_encoder"], seed=1)
    b = stable_diffusion_from_configs(topo["unet"], topo["vae"], topo["text_encoder"], seed=1)
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)

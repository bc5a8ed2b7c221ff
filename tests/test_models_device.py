"""Device and precision: the resolvers, load_model in bfloat16, and the --device/--dtype flags of
the commands that open a model (CPU only: CUDA paths are checked where CUDA is absent)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from diffmem.cli import main
from diffmem.detect.scores import attention_entropy, noise_magnitude
from diffmem.errors import ConfigError
from diffmem.models import load_model
from diffmem.models.device import resolve_device, resolve_dtype

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less error")
PROMPTS = ["No acute process.", "Left lower lobe opacity, ___ notified.",
           "Cardiomegaly with small bilateral effusions.", "Normal chest radiograph.", ""]
#: bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 per operation); over a tiny UNet's
#: few dozen layers the noise magnitudes measured here differ from float32 by at most ~3%.
BF16_RTOL = 0.05


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "cpu:3", ""):
        with pytest.raises(ConfigError, match="is not a device; use cpu, cuda, cuda:N or mps"):
            resolve_device(bad)


@no_cuda
def test_resolve_device_without_cuda():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="CUDA is not available on this machine.*"
                                              "--device cpu"):
            resolve_device(name)
    # under accelerate a process's CPU device does not turn a CUDA request into CPU silently
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda", process_device=torch.device("cpu"))
    assert resolve_device(None, process_device=torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the MPS-less error")
def test_resolve_device_without_mps():
    with pytest.raises(ConfigError, match="MPS backend is not available"):
        resolve_device("mps")


def test_resolve_device_process_device():
    """Under ``accelerate launch`` the default and a bare "cuda" mean this process's GPU; an
    explicit index is kept (and checked)."""
    gpu = torch.device("cuda", 2)
    if torch.cuda.is_available():  # pragma: no cover - no GPU on the test machines
        assert resolve_device(None, process_device=gpu) == gpu
    else:
        assert resolve_device(None, process_device=gpu) == gpu
        assert resolve_device("cuda", process_device=gpu) == gpu
        assert resolve_device("cpu", process_device=gpu) == torch.device("cpu")


def test_resolve_dtype():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16", device="cuda") is torch.float16
    assert resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ConfigError, match="'fp8' is not known; use float32, float16 or bfloat16"):
        resolve_dtype("fp8")
    with pytest.raises(ConfigError, match="float16 does not run on the CPU.*--dtype bfloat16"):
        resolve_dtype("float16", device="cpu")
    with pytest.raises(ConfigError, match="not a floating-point type"):
        resolve_dtype(torch.int8)


def test_load_model_precision_errors(sd_folder):
    with pytest.raises(ConfigError, match="--dtype bfloat16"):
        load_model(sd_folder, device="cpu", dtype="float16")
    with pytest.raises(ConfigError, match="'half' is not known"):
        load_model(sd_folder, dtype="half")


@pytest.fixture(scope="module")
def sd_both(sd_folder):
    return (load_model(sd_folder, device="cpu"),
            load_model(sd_folder, device="cpu", dtype="bfloat16"))


def test_load_model_bfloat16_folder(sd_both):
    f32, bf16 = sd_both
    assert bf16.dtype is torch.bfloat16 and bf16.device == torch.device("cpu")
    for module in (bf16.unet, bf16.text_encoder, bf16.vae):
        assert next(module.parameters()).dtype is torch.bfloat16
    # the same weights in another precision are another model for resumable stores
    assert bf16.fingerprint() != f32.fingerprint()
    # a seed draws the same initial noise in every precision (drawn in float32, then cast)
    g32, g16 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    n32, n16 = f32.initial_noise([g32]), bf16.initial_noise([g16])
    assert n16.dtype is torch.bfloat16
    torch.testing.assert_close(n16.float(), n32, rtol=2**-8, atol=0)


def test_bfloat16_scores_close_to_float32(sd_both):
    """Scores of a bfloat16 model are float64 arrays within BF16_RTOL of float32's."""
    f32, bf16 = sd_both
    kw = {"generations": 2, "steps": 2, "num_inference_steps": 10, "seed": 0}
    n32, n16 = noise_magnitude(f32, PROMPTS, **kw), noise_magnitude(bf16, PROMPTS, **kw)
    assert n16.dtype == np.float64 and n16[-1] == 0 and n32[-1] == 0
    assert np.all(n32[:-1] > 0)
    np.testing.assert_allclose(n16, n32, rtol=BF16_RTOL)
    assert not np.array_equal(n16, n32)  # it did run in another precision
    e32 = attention_entropy(f32, PROMPTS, generations=2, seed=0)
    e16 = attention_entropy(bf16, PROMPTS, generations=2, seed=0)
    np.testing.assert_allclose(e16, e32, rtol=1e-3)


def test_bfloat16_cxr_model(model):
    """The CXR pipeline (pixel space, no VAE) also opens and scores in bfloat16."""
    f32 = load_model(model, device="cpu")
    bf16 = load_model(model, device="cpu", dtype="bfloat16")
    kw = {"generations": 2, "seed": 0}
    np.testing.assert_allclose(noise_magnitude(bf16, PROMPTS[:3], **kw),
                               noise_magnitude(f32, PROMPTS[:3], **kw), rtol=BF16_RTOL)
    images = bf16.sample(PROMPTS[:1], steps=2, seed=0).images
    assert images.dtype == np.float32 and np.isfinite(images).all()


@no_cuda
@pytest.mark.parametrize("argv", [
    ["scan", "{prompts}", "--out", "{out}", "--model", "{model}"],
    ["attribute", "--model", "{model}", "No acute process."],
    ["detect", "--model", "{model}", "--data", "{data}", "--out", "{out}"],
    ["mitigate", "--model", "{model}", "--data", "{data}", "--out", "{out}"],
    ["demo", "--out", "{out}"],
    ["bench", "detect", "--model", "{model}", "--data", "{data}", "--out", "{out}"],
    ["study", "lr", "--data", "{data}", "--out", "{out}", "--lrs", "0.1"],
])
def test_cli_device_and_dtype_errors(argv, sd_folder, data, tmp_path, capsys):
    """Every command that opens a model refuses --device cuda without CUDA and float16 on the
    CPU, with exit code 2, before it reads data or creates its output folder."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("No acute process.\n")
    out = tmp_path / "out"
    args = [a.format(prompts=prompts, out=out, model=sd_folder, data=data) for a in argv]
    assert main(args + ["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(args + ["--device", "cpu", "--dtype", "float16"]) == 2
    assert "use --dtype bfloat16" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as e:  # argparse lists the choices
        main(args + ["--dtype", "half"])
    assert e.value.code == 2
    assert re.search("invalid choice: 'half'.*float32.*float16.*bfloat16",
                     capsys.readouterr().err)


def test_cli_scan_bfloat16(sd_folder, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("No acute process.\nLeft lower lobe opacity, ___ notified.\n")
    code = main(["-q", "scan", str(prompts), "--out", str(tmp_path / "o"), "--model",
                 str(sd_folder), "--generations", "1", "--device", "cpu", "--dtype", "bfloat16"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "tokens.csv").is_file()

"""``diffmem bench device``: throughput and memory of the two detection stages on a GPU.

Builds a Stable Diffusion model from configs (:func:`~diffmem.models.tiny.sd_topology`:
``sd15`` is SD 1.5's topology, about 1.07 B parameters; ``small`` a CPU-sized smoke test) with
random weights (speed and memory do not depend on them; nothing is downloaded), opens it with
:func:`~diffmem.models.load_model` on the device and in the precision asked (float16 on CUDA by
default), and measures

1. stage 1, the screen: Wen et al.'s first-step noise magnitude of every prompt, batched, as
   ``diffmem detect`` computes it (prompts/s);
2. stage 2, the confirmation: full DDIM generations of a few prompts, decoded through the VAE
   (images/s);

plus the peak GPU memory (CUDA) or the process's peak resident memory (CPU). The baseline,
measured in the same run, is stage 1 in float32 on the same prompts (speed ratio and largest
relative difference of the scores), skipped when the run is already float32. One warm-up batch
per stage runs before the clock starts.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from diffmem.checks import check_int
from diffmem.detect.bench import machine_info
from diffmem.detect.scores import noise_magnitude
from diffmem.errors import ConfigError
from diffmem.models import load_model
from diffmem.models.device import resolve_device, resolve_dtype
from diffmem.models.tiny import TINY_CORPUS, sd_topology, stable_diffusion_from_configs

__all__ = ["DeviceBench", "bench_device", "format_device_bench"]


@dataclass
class DeviceBench:
    """What :func:`bench_device` measured."""

    size: str
    device: str
    dtype: str
    seed: int
    sizes: dict[str, Any]
    machine: dict[str, Any]
    stage1: dict[str, Any]
    stage2: dict[str, Any]
    baseline: dict[str, Any] | None = None
    memory: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompts(n: int) -> list[str]:
    """``n`` distinct report-like prompts (throughput does not depend on their words)."""
    return [f"{TINY_CORPUS[i % len(TINY_CORPUS)]} Comparison {i}." for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stage1(adapter, prompts: list[str], *, batch_size: int, seed: int) -> tuple[np.ndarray,
                                                                                  float]:
    noise_magnitude(adapter, prompts[:batch_size], seed=seed, batch_size=batch_size)  # warm-up
    _sync(adapter.device)
    t0 = time.perf_counter()
    scores = noise_magnitude(adapter, prompts, seed=seed, batch_size=batch_size)
    _sync(adapter.device)
    return scores, time.perf_counter() - t0


def bench_device(*, size: str = "sd15", device: str | None = None, dtype: str | None = None,
                 prompts: int = 256, images: int = 8, steps: int = 50, batch_size: int = 16,
                 baseline_prompts: int = 32, seed: int = 0) -> DeviceBench:
    """Measure the two detection stages on ``device`` (see the module docstring).

    Parameters
    ----------
    size : str
        ``"sd15"`` (needs CUDA) or ``"small"`` (any device).
    device, dtype : str, optional
        Default: CUDA when available, else the CPU; float16 on CUDA, else float32.
    prompts, images : int
        Prompts scored in stage 1; images generated in stage 2 (one per prompt).
    steps : int
        DDIM steps of each stage-2 generation.
    batch_size : int
        Prompts per UNet call (stage 1) and generations per call (stage 2).
    baseline_prompts : int
        Prompts of the float32 stage-1 baseline (0 skips it).
    seed : int
        Seed of the weights and of the noises.

    Raises
    ------
    ConfigError
        ``sd15`` without CUDA, an unknown size, device or dtype, non-positive counts.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype if dtype is not None else
                       ("float16" if dev.type == "cuda" else "float32"), device=dev)
    topology = sd_topology(size)
    if size == "sd15" and dev.type != "cuda":
        raise ConfigError(f"--size sd15 builds a 1.07 B-parameter, 512 px model: it needs a CUDA "
                          f"GPU and this run is on {dev.type}; pass --size small for a CPU "
                          "smoke test of the same code")
    for name, value in (("prompts", prompts), ("images", images), ("steps", steps),
                        ("batch_size", batch_size)):
        check_int(name, value)
    check_int("baseline_prompts", baseline_prompts, low=0)
    pipe = stable_diffusion_from_configs(topology["unet"], topology["vae"],
                                         topology["text_encoder"], seed=seed,
                                         model_max_length=77)
    words = _prompts(prompts)
    params = {name: int(sum(p.numel() for p in getattr(pipe, name).parameters()))
              for name in ("unet", "vae", "text_encoder")}

    baseline = None
    if baseline_prompts > 0 and dt != torch.float32:
        ref = load_model(pipe, device=dev, dtype=torch.float32)
        n = min(baseline_prompts, prompts)
        ref_scores, ref_s = _stage1(ref, words[:n], batch_size=batch_size, seed=seed)
        baseline = {"dtype": "float32", "prompts": n, "seconds": round(ref_s, 3),
                    "prompts_per_second": round(n / ref_s, 3)}
        del ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    adapter = load_model(pipe, device=dev, dtype=dt)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    scores, s1 = _stage1(adapter, words, batch_size=batch_size, seed=seed)
    stage1 = {"prompts": prompts, "seconds": round(s1, 3),
              "prompts_per_second": round(prompts / s1, 3),
              "settings": f"1 generation x first of 50 DDIM steps, batch {batch_size}, guided pair"}
    if baseline is not None:
        n = baseline["prompts"]
        rel = np.abs(scores[:n] - ref_scores) / np.maximum(np.abs(ref_scores), 1e-12)
        baseline.update(speedup=round(stage1["prompts_per_second"] /
                                      baseline["prompts_per_second"], 2),
                        max_relative_difference=float(rel.max()))

    adapter.sample(words[:1], steps=2, seed=seed, batch_size=batch_size)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    out = adapter.sample(words[:images], steps=steps, seed=seed, batch_size=batch_size)
    _sync(dev)
    s2 = time.perf_counter() - t0
    stage2 = {"images": images, "steps": steps, "seconds": round(s2, 3),
              "images_per_second": round(images / s2, 4),
              "image_shape": list(out.images.shape[1:])}

    if dev.type == "cuda":
        memory = {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3),
                  "kind": "torch.cuda.max_memory_allocated over stages 1 and 2"}
        gpu = torch.cuda.get_device_name(dev)
    else:
        memory = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 2**20, 3),
                  "kind": "process peak resident memory (no GPU)"}
        gpu = None
    sizes = {"parameters": params, "total_parameters": sum(params.values()),
             "image_size": adapter.image_size, "latent_shape": list(adapter.latent_shape),
             "text_tokens": adapter.max_length, "description": topology["description"]}
    return DeviceBench(size=size, device=str(dev), dtype=str(dt).replace("torch.", ""),
                       seed=seed, sizes=sizes, machine={**machine_info(), "gpu": gpu},
                       stage1=stage1, stage2=stage2, baseline=baseline, memory=memory)


def format_device_bench(b: DeviceBench) -> str:
    """The measurement as a few lines (what ``diffmem bench device`` prints)."""
    m, s = b.machine, b.sizes
    lines = [
        f"model: {b.size} ({s['total_parameters'] / 1e6:.1f}M parameters: UNet "
        f"{s['parameters']['unet'] / 1e6:.1f}M, VAE {s['parameters']['vae'] / 1e6:.1f}M, text "
        f"{s['parameters']['text_encoder'] / 1e6:.1f}M; {s['image_size']} px, latents "
        f"{'x'.join(map(str, s['latent_shape']))}), random weights, seed {b.seed}",
        f"machine: {m['platform']}, {m['cpus']} CPU(s), {m['torch_threads']} torch thread(s), "
        f"GPU {m['gpu'] or 'none'}, torch {m['torch']}; run on {b.device} in {b.dtype}",
        f"stage 1 (noise magnitude): {b.stage1['prompts']} prompts in "
        f"{b.stage1['seconds']:.2f} s = {b.stage1['prompts_per_second']:.2f} prompts/s "
        f"({b.stage1['settings']})",
        f"stage 2 (generation): {b.stage2['images']} images x {b.stage2['steps']} DDIM steps in "
        f"{b.stage2['seconds']:.2f} s = {b.stage2['images_per_second']:.3f} images/s",
    ]
    if b.baseline is not None:
        r = b.baseline
        lines.append(f"baseline stage 1 in float32 on {r['prompts']} prompts: "
                     f"{r['prompts_per_second']:.2f} prompts/s ({b.dtype} is {r['speedup']:.2f}x); "
                     f"largest relative difference of the scores {r['max_relative_difference']:.4f}")
    mem = b.memory
    lines.append(f"peak GPU memory: {mem['peak_gpu_memory_gib']:.2f} GiB" if "peak_gpu_memory_gib"
                 in mem else f"peak resident memory: {mem['peak_rss_gib']:.2f} GiB (no GPU)")
    return "\n".join(lines)

"""The one door to a model: load a CXR or Stable Diffusion pipeline as a
:class:`DiffusionModelAdapter` (encode prompt, predict noise, sample with hooks, decode)."""

from diffmem.models.adapter import (
    DiffusionModelAdapter,
    SampleResult,
    SamplingHooks,
    combine_hooks,
    generation_seed,
)
from diffmem.models.attention import AttentionContext
from diffmem.models.loading import (
    PIPELINE_CLASSES,
    SCHEDULERS,
    check_model_folder,
    load_model,
)

__all__ = [
    "PIPELINE_CLASSES",
    "SCHEDULERS",
    "AttentionContext",
    "DiffusionModelAdapter",
    "SampleResult",
    "SamplingHooks",
    "check_model_folder",
    "combine_hooks",
    "generation_seed",
    "load_model",
]

"""The one door to a model: load a CXR or Stable Diffusion pipeline as a
:class:`DiffusionModelAdapter` (encode prompt, predict noise, sample with hooks, decode), and the
guided trajectory that scores and attribution walk on it (:mod:`diffmem.models.trajectory`)."""

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
from diffmem.models.trajectory import (
    TrajectoryStep,
    check_trajectory,
    default_guidance,
    epsilon_scheduler,
    guided_pair,
    noise_gap,
    seeded_noise,
    trajectory_noise_gaps,
    walk_trajectory,
)

__all__ = [
    "PIPELINE_CLASSES",
    "SCHEDULERS",
    "AttentionContext",
    "DiffusionModelAdapter",
    "SampleResult",
    "SamplingHooks",
    "TrajectoryStep",
    "check_model_folder",
    "check_trajectory",
    "combine_hooks",
    "default_guidance",
    "epsilon_scheduler",
    "generation_seed",
    "guided_pair",
    "load_model",
    "noise_gap",
    "seeded_noise",
    "trajectory_noise_gaps",
    "walk_trajectory",
]

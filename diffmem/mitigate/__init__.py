"""Inference-time mitigations of memorization and their memorization-vs-utility comparison.

Every mitigation is one small module with one signature, ``build(adapter, strength, *, params,
seed) -> SamplingHooks``, registered by name; it changes sampling only through the adapter's
:class:`~diffmem.models.SamplingHooks`, and strength 0 reproduces the plain pipeline bit for
bit. Defaults (the papers' values) live in ``presets/<name>.json``.

===============================  ===========================================  =================
name                             strength                                     paper
===============================  ===========================================  =================
prompt_embedding_optimization    AdamW iterations on the prompt embedding      Wen et al. 2024
gaussian_noise_embedding         lambda of lambda * N(0, I) on the embedding   Somepalli 2023
random_token_insertion           random vocabulary tokens inserted             Somepalli 2023
caption_word_repetition          prompt words repeated                         Somepalli 2023
random_number_addition           random numbers inserted                       Somepalli 2023
attention_rescaling              c1 - 1 (BOS logit x c1, padding masked)       Ren et al. 2024
guidance_delay                   fraction of time from T with guidance 0       Jain et al. 2025
opposite_guidance                fraction of time from T with guidance -2      Jain et al. 2025
dynamic_opposite_guidance        max fraction; switch when the pull drops      Jain et al. 2025
deid_marker_removal              probability each ___ marker is deleted        Dutt et al. 2025
deid_marker_randomization        probability each marker becomes a random word Dutt et al. 2025
nemo_deactivation                1 - scale of each memorization neuron (to_v)  Hintersdorf 2024
magnitude_pruning                fraction of cross-attention k/v weights zeroed Gupta et al. 2024
===============================  ===========================================  =================

* :func:`list_mitigations`, :func:`get_mitigation`, :func:`register_mitigation`,
  :func:`mitigation_hooks` (the registry);
* :func:`compare_mitigations` -> :class:`MitigationComparison`: memorization rate, nearest
  similarity and noise magnitude against in-domain FID-like distance, alignment and seconds
  per image, for detected-memorized and control prompts (``diffmem mitigate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffmem._lazy import lazy_getattr

from diffmem.mitigate.registry import (
    Mitigation,
    get_mitigation,
    list_mitigations,
    mitigation_hooks,
    register_mitigation,
)

if TYPE_CHECKING:  # pragma: no cover
    from diffmem.mitigate.compare import (ComparisonConfig, MitigationComparison,
                                          compare_mitigations)

_LAZY = {name: "diffmem.mitigate.compare"
         for name in ("ComparisonConfig", "MitigationComparison", "compare_mitigations")}

__all__ = ["ComparisonConfig", "Mitigation", "MitigationComparison", "compare_mitigations",
           "get_mitigation", "list_mitigations", "mitigation_hooks", "register_mitigation"]


__getattr__ = lazy_getattr(__name__, _LAZY)

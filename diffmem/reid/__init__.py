"""Patient re-identification: a patient-verification network (Packhäuser et al., Sci. Rep.
2022) trained on a dataset's own patients, its evaluation, and re-ID verdicts for generations.

In medical imaging the privacy harm is a recognisable *patient*, not only a pixel-identical
image: a generation that reproduces a training patient's anatomy with new findings or a new
pose passes every copy verdict. This package answers "same patient?" for two chest radiographs.

* :func:`train_reid` -> a model folder (``reid.safetensors``, ``reid_config.json``, model card);
* :func:`load_reid_model` -> :class:`PatientVerifier` (calling it embeds images; the cosine of
  two embeddings is the verification score);
* :func:`evaluate_reid` / :func:`run_reid_eval` -> AUC and TPR at 1 % FPR on seeded pairs, also
  on same-patient pairs that are not pixel near-duplicates, beside a pixel baseline;
* :func:`default_reid_dir` -> the embedded model trained on the synthetic demo data;
* :func:`list_presets` / :func:`load_preset` -> network sizes as JSON presets.

Importing this package is cheap: torch loads on first use of a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from diffmem.errors import ModelError
from diffmem.reid.pairs import (NEAR_DUPLICATE_PIXEL, NO_TWO_STUDIES, PairSample,
                                patient_records, patients_with_two_studies, sample_pairs)
from diffmem.reid.presets import ReIDPreset, list_presets, load_preset

if TYPE_CHECKING:  # pragma: no cover
    from diffmem.reid.evaluation import (ReIDEvaluation, evaluate_reid, run_reid_eval,
                                         write_reid_eval)
    from diffmem.reid.network import PatientVerifier, build_network, load_reid_model
    from diffmem.reid.training import ReIDTrainResult, train_reid

_LAZY = {
    "ReIDEvaluation": "evaluation", "evaluate_reid": "evaluation", "run_reid_eval": "evaluation",
    "write_reid_eval": "evaluation", "PatientVerifier": "network", "build_network": "network",
    "load_reid_model": "network", "ReIDTrainResult": "training", "train_reid": "training",
}

__all__ = sorted([*_LAZY, "NEAR_DUPLICATE_PIXEL", "NO_TWO_STUDIES", "PairSample", "ReIDPreset",
                  "default_reid_dir", "list_presets", "load_preset", "patient_records",
                  "patients_with_two_studies", "sample_pairs"])


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"diffmem.reid.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'diffmem.reid' has no attribute {name!r}")


def default_reid_dir() -> Path:
    """The embedded default re-ID model: a ``demo``-preset model folder shipped with diffmem,
    trained with ``diffmem reid train --preset demo --seed 0`` on ``diffmem synth --preset demo
    --seed 0`` (the data of the embedded default diffusion model; its ``reid_config.json``
    records the data fingerprint).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ModelError
        When the package was installed without it.
    """
    folder = Path(__file__).parent / "default_model"
    if not (folder / "reid_config.json").is_file():
        raise ModelError(f"the embedded default re-ID model is missing from {folder}; reinstall "
                         "diffmem, or train one with `diffmem reid train --data DATA --out DIR` "
                         "and pass --model DIR")
    return folder

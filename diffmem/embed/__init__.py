"""In-domain image-report encoder (open_clip, trained from scratch on a dataset's pairs) and the
utility metrics built on it.

* :func:`train_encoder` / :func:`load_encoder` -> :class:`InDomainEncoder` (``embed_images``,
  ``embed_texts``; calling it embeds images, so it plugs into the detector's ``embedding``
  similarity backend);
* :func:`embed_dataset` - embeddings of a dataset's images;
* :func:`frechet_distance` (in-domain FID-like) and :func:`alignment_score` (in-domain
  CLIPScore-like), pure NumPy/SciPy;
* :func:`list_presets` / :func:`load_preset` - encoder sizes as JSON presets (``tiny``, ``demo``).

Importing this package is cheap: torch and open_clip load on first use of the encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from diffmem._lazy import lazy_getattr

from diffmem.embed.metrics import (alignment_score, feature_stats, frechet_distance,
                                   frechet_distance_from_stats)
from diffmem.embed.presets import EncoderPreset, list_presets, load_preset
from diffmem.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from diffmem.embed.model import InDomainEncoder, embed_dataset, load_encoder, open_clip_config
    from diffmem.embed.training import EncoderResult, train_encoder

#: Names loaded on first use (torch and open_clip come with them), and their modules.
_LAZY = {**{name: "diffmem.embed.model" for name in ("InDomainEncoder", "embed_dataset",
                                                     "load_encoder", "open_clip_config")},
         **{name: "diffmem.embed.training" for name in ("EncoderResult", "train_encoder")}}

__all__ = ["EncoderPreset", "EncoderResult", "InDomainEncoder", "alignment_score",
           "default_encoder_dir", "embed_dataset", "feature_stats", "frechet_distance",
           "frechet_distance_from_stats", "list_presets", "load_encoder", "load_preset",
           "open_clip_config", "train_encoder"]


__getattr__ = lazy_getattr(__name__, _LAZY)


def default_encoder_dir():
    """The embedded default in-domain encoder: a ``demo``-preset encoder folder shipped with
    diffmem.

    It was trained with ``diffmem embed train --preset demo --seed 0`` on ``diffmem synth
    --preset demo --seed 0`` (its ``encoder_config.json`` records the settings and the data
    fingerprint), the data the embedded default model was trained on, so it measures utility for
    that model (:func:`diffmem.mitigate.compare_mitigations`).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ModelError
        When the package was installed without it.
    """
    folder = Path(__file__).parent / "default_encoder"
    if not (folder / "encoder_config.json").is_file():
        raise ModelError(f"the embedded default encoder is missing from {folder}; reinstall "
                         "diffmem, or train one with `diffmem embed train --data DATA --out ENC` "
                         "and pass --encoder ENC")
    return folder

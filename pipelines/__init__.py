"""CXR text-to-image diffusion pipelines (installed as ``diffmem.pipelines``).

* :class:`CXRDiffusionPipeline` - the diffusers pipeline (pixel or latent space), saved and loaded
  as a standard diffusers folder;
* :func:`build_pipeline`, :func:`load_preset`, :func:`list_presets` - model sizes as JSON presets
  (``tiny``, ``demo``, ``base``);
* :func:`train_tokenizer` - a WordPiece tokenizer that keeps de-identification markers
  (``___``, ``XXXX``, ``[** ... **]``) as single tokens.

Importing this package is cheap: torch and diffusers load on first use of the pipeline class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffmem._lazy import lazy_getattr

from diffmem.pipelines.presets import (PipelinePreset, build_pipeline, default_model_dir,
                                       list_presets, load_preset)
from diffmem.pipelines.tokenizer import MARKER_TOKENS, train_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from diffmem.pipelines.pipeline_cxr import (CXRDiffusionPipeline, CXRPipelineOutput,
                                                check_pipeline_folder)

_LAZY = {name: "diffmem.pipelines.pipeline_cxr"
         for name in ("CXRDiffusionPipeline", "CXRPipelineOutput", "check_pipeline_folder")}

__all__ = ["CXRDiffusionPipeline", "CXRPipelineOutput", "MARKER_TOKENS", "PipelinePreset",
           "build_pipeline", "check_pipeline_folder", "default_model_dir", "list_presets", "load_preset",
           "train_tokenizer"]


__getattr__ = lazy_getattr(__name__, _LAZY)

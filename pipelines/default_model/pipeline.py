"""Written by diffmem: lets plain diffusers load this folder with
DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True).
Needs the diffmem package installed (pip install diffmem)."""
from diffmem.pipelines.pipeline_cxr import CXRDiffusionPipeline

__all__ = ["CXRDiffusionPipeline"]

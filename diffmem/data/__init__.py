"""Chest X-ray datasets: loaders for MIMIC-CXR-JPG, DICOM and manifests, and a synthetic
MIMIC-CXR-style generator with planted memorization."""

from diffmem.data.study import SPLITS, CXRDataset, Study

__all__ = ["SPLITS", "CXRDataset", "Study"]

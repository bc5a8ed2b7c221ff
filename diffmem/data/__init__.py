"""Chest X-ray datasets: loaders for MIMIC-CXR-JPG, DICOM and manifests, and a synthetic
MIMIC-CXR-style generator with planted memorization."""

from diffmem.data.dicom import PHIFinding, read_dicom, scan_dicom_phi, write_dicom
from diffmem.data.images import read_image
from diffmem.data.loader import detect_format, load, verify_images
from diffmem.data.reports import count_deid_markers, extract_prompt, parse_sections, read_report
from diffmem.data.dataset import SPLITS, CXRDataset, Study

__all__ = [
    "SPLITS",
    "CXRDataset",
    "PHIFinding",
    "Study",
    "count_deid_markers",
    "detect_format",
    "extract_prompt",
    "load",
    "parse_sections",
    "read_dicom",
    "read_image",
    "read_report",
    "scan_dicom_phi",
    "verify_images",
    "write_dicom",
]

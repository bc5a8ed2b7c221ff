"""Synthetic MIMIC-CXR-style data with planted memorization and ground truth.

:func:`synthesize` writes a folder in the exact MIMIC-CXR-JPG layout (procedural radiographs,
MIMIC-style reports, metadata and split tables) plus ``ground_truth.csv`` (which records are
planted duplicates) and ``dataset_card.json`` (how the set was made, and its counts). Presets
are JSON files found by name: :func:`list_presets`, :func:`load_preset`.

Examples
--------
>>> import tempfile
>>> from diffmem.data.synth import synthesize, list_presets
>>> list_presets()
['benchmark', 'clipmem', 'demo', 'patients', 'reid', 'tiny', 'triggers']
>>> root = synthesize(tempfile.mkdtemp() + "/tiny", preset="tiny", seed=0)
>>> (root / "ground_truth.csv").is_file()
True
"""

from diffmem.data.synth.anatomy import Anatomy, Pose, random_anatomy, random_pose, render_chest
from diffmem.data.synth.config import SynthConfig, config_from_dict, list_presets, load_preset
from diffmem.data.synth.findings import Findings
from diffmem.data.synth.generator import GENERATOR_VERSION, read_ground_truth, synthesize
from diffmem.data.synth.reports import Report, ReportStyle, write_report

__all__ = ["GENERATOR_VERSION", "Anatomy", "Findings", "Pose", "Report", "ReportStyle",
           "SynthConfig", "config_from_dict", "list_presets", "load_preset", "random_anatomy",
           "random_pose", "read_ground_truth", "render_chest", "synthesize", "write_report"]

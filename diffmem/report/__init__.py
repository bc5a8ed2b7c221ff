"""The privacy report: ``report.html`` and ``report.json`` from the results of the other commands.

:func:`build_report` (what ``diffmem report`` runs) reads the ``--out`` folders of ``diffmem
detect``, ``scan``, ``mitigate`` and ``study`` (:mod:`diffmem.report.inputs`), checks that they
were computed on the given model and data, sets a risk level from explicit criteria
(:mod:`diffmem.report.risk`) and writes one self-contained HTML file (figures embedded, no
network requests) and the same facts as JSON. Patient images follow the image mode
(:mod:`diffmem.report.images`: include, blur or omit).
"""

from __future__ import annotations

from diffmem.report.build import FORMAT_VERSION, REFERENCES, ReportResult, build_report
from diffmem.report.images import IMAGE_MODES
from diffmem.report.risk import RISK_CRITERIA, RiskAssessment, assess_risk

__all__ = ["FORMAT_VERSION", "IMAGE_MODES", "REFERENCES", "RISK_CRITERIA", "ReportResult",
           "RiskAssessment", "assess_risk", "build_report"]

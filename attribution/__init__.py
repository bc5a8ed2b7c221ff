"""Token attribution and risky-token scanning (installed as ``diffmem.attribution``).

Which words of a prompt make a model copy its training image, and which tokens of a prompt
dataset are risky before a model exists (Dutt et al., 2025: MIMIC-CXR's ``___`` marker).

* per prompt: :func:`attribute` with a registered method (:func:`gradient`, :func:`occlusion`,
  :func:`attention`, :func:`integrated_gradients`; :func:`list_methods`) returns a
  :class:`TokenAttribution` over units (words, de-identification markers, PHI-like spans;
  subword tokens pooled by :func:`pool_tokens`); :func:`render_html`, :func:`render_png`,
  :func:`save_attribution` draw it;
* faithfulness: :func:`deletion_test` (top-ranked unit vs a random unit),
  :func:`faithfulness_curves` (deletion/insertion curves and their areas, RISE-style);
* repeats: :func:`copy_prone_records` (records whose image or patient repeats, the groups the
  scan's enrichment contrasts);
* dataset: :func:`scan_prompts` (model-free markers, PHI-like text, duplicate clusters,
  log-odds enrichment; plus model-based attribution when given a model), :func:`write_scan`,
  :func:`run_scan` (what ``diffmem scan`` runs); :func:`find_markers`, :func:`segment`;
* :func:`run_attribute` (what ``diffmem attribute`` runs), :func:`format_ranking`.

Importing this package is cheap; torch loads with the attribution methods on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffmem._lazy import lazy_getattr

from diffmem.attribution.markers import (
    MARKER_CONVENTIONS,
    PHI_PATTERNS,
    PLACEHOLDER_DETECTORS,
    Span,
    find_markers,
    marker_summary,
    segment,
)
from diffmem.attribution.units import Unit, pool_tokens

if TYPE_CHECKING:  # pragma: no cover
    from diffmem.attribution.commands import format_ranking, run_attribute
    from diffmem.attribution.faithfulness import (DeletionResult, FaithfulnessCurves,
                                                  deletion_test, faithfulness_curves,
                                                  format_faithfulness)
    from diffmem.attribution.repeats import CopyProne, copy_prone_records
    from diffmem.attribution.methods import (attention, attribute, get_method, gradient,
                                             integrated_gradients, list_methods, occlusion,
                                             register_method)
    from diffmem.attribution.render import (html_page, render_html, render_png,
                                            save_attribution)
    from diffmem.attribution.result import TokenAttribution
    from diffmem.attribution.scan import (PromptClusters, ScanResult, log_odds_enrichment,
                                          near_duplicate_pairs, prompt_clusters, read_prompts,
                                          run_scan, scan_prompts, write_scan)

_LAZY = {
    "diffmem.attribution.commands": ("format_ranking", "run_attribute"),
    "diffmem.attribution.faithfulness": ("DeletionResult", "FaithfulnessCurves", "deletion_test",
                                         "faithfulness_curves", "format_faithfulness"),
    "diffmem.attribution.repeats": ("CopyProne", "copy_prone_records"),
    "diffmem.attribution.methods": ("attention", "attribute", "get_method", "gradient",
                                    "integrated_gradients", "list_methods", "occlusion",
                                    "register_method"),
    "diffmem.attribution.render": ("html_page", "render_html", "render_png", "save_attribution"),
    "diffmem.attribution.result": ("TokenAttribution",),
    "diffmem.attribution.scan": ("PromptClusters", "ScanResult", "log_odds_enrichment",
                                 "near_duplicate_pairs", "prompt_clusters", "read_prompts", "run_scan", "scan_prompts",
                                 "write_scan"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = sorted(["MARKER_CONVENTIONS", "PHI_PATTERNS", "PLACEHOLDER_DETECTORS", "Span", "Unit",
                  "find_markers", "marker_summary", "pool_tokens", "segment", *_WHERE])


__getattr__ = lazy_getattr(__name__, _WHERE)

"""CLIPMem: memorization in CLIP-style image-report encoders (Wang, Dziedzic, Kim, Backes and
Boenisch, "Captured by Captions: On Memorization and its Mitigation in CLIP Models", ICLR 2025,
arXiv 2502.07830).

A pair (x, y) is memorized when an encoder f that trained on it aligns its image and report much
more than a reference g that did not. Pieces:

* :func:`split_pairs` (:mod:`~diffmem.clipmem.splits`) - S_S / S_C / S_I / S_E, by patient;
* :func:`pair_alignment`, :func:`dataset_alignment`, :func:`clipmem_score`
  (:mod:`~diffmem.clipmem.alignment`) - Eq. 1 and Eq. 4, and where we deviate;
* :func:`run_clipmem` (:mod:`~diffmem.clipmem.run`) - train f and g with the in-domain open_clip
  recipe (:func:`diffmem.embed.train_encoder`), score, write ``clipmem.csv``; resumable;
* :func:`tower_alignments` (:mod:`~diffmem.clipmem.towers`) - which tower memorizes: CLIPMem
  with f's text or image tower swapped into g, with a space check;
* :func:`run_mitigations` (:mod:`~diffmem.clipmem.mitigate`) - text-side mitigations retrained
  on the same split, CLIPMem against held-out retrieval recall@k;
* :func:`score_pairs` - the same score for a given (f, g) pair of encoders: diffmem encoder
  folders or a user's own open_clip models (:func:`load_open_clip`).

Importing this package is cheap: torch and open_clip load on first use.
"""

from diffmem._lazy import lazy_getattr
from diffmem.clipmem.splits import ClipMemSplit, split_pairs

_LAZY = {
    **{name: "diffmem.clipmem.alignment" for name in (
        "PairEncoder", "clipmem_score", "dataset_alignment", "default_augment",
        "pair_alignment")},
    **{name: "diffmem.clipmem.run" for name in (
        "ClipMemResult", "RunSettings", "run_clipmem", "score_pairs", "summarize",
        "train_or_load", "train_pair")},
    **{name: "diffmem.clipmem.towers" for name in (
        "fit_space_map", "space_check", "tower_alignments", "tower_finding", "tower_table")},
    **{name: "diffmem.clipmem.mitigate" for name in ("MITIGATIONS", "run_mitigations",
                                                     "utility_of")},
    **{name: "diffmem.clipmem.openclip" for name in (
        "OpenClipEncoder", "as_pair_encoder", "load_open_clip")},
}

__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = sorted(["ClipMemSplit", "split_pairs", *_LAZY])

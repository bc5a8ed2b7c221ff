"""Which tower memorizes: CLIPMem with one tower of f swapped in for g's (Wang et al., "Captured
by Captions: On Memorization and its Mitigation in CLIP Models", ICLR 2025, arXiv 2502.07830).

The paper reports that the *text* encoder contributes more to CLIPMem than the image encoder.
The passage describing how it separates the two could not be read offline (only the abstract's
claim was available), so this module measures the split with a **tower swap** between the
two models it already has, f (trained on the pair) and g (not), and does not retrain anything:

* ``full``:        A(f_img, f_txt) - A(g_img, g_txt)   (ordinary CLIPMem);
* ``text_from_f``: A(g_img, f_txt) - A(g_img, g_txt)   (only the text tower saw the pair);
* ``image_from_f``: A(f_img, g_txt) - A(g_img, g_txt)  (only the image tower saw the pair).

A is the alignment of Eq. 1 (:func:`~diffmem.clipmem.alignment.views_alignment`), over the same
augmented views for every model. An S_I pair is scored with the roles of f and g swapped, as in
:mod:`diffmem.clipmem.run`.

Are the two models' spaces comparable?
--------------------------------------
A tower swap assumes that f's and g's embedding spaces agree. They train from the same
initialization (same seed) on mostly the same data (S_S), but contrastive training fixes a
space only up to a rotation. So every variant is scored twice:

* ``space_map="none"``: the towers are combined as they are;
* ``space_map="procrustes"``: the swapped-in text embeddings are first rotated into the host
  model's space by the orthogonal map that best matches f's embeddings to g's on the *shared*
  pairs S_S (images and reports stacked; :func:`scipy.linalg.orthogonal_procrustes`). Both
  models trained on S_S, so the map is fitted on pairs neither model holds out, never on the
  pairs being scored.

:func:`space_check` reports how well the spaces agree on S_S (mean cosine between f's and g's
embedding of the same image / report, before and after the map); the summary carries it so a
reader can see whether the swap was meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["TOWER_VARIANTS", "fit_space_map", "space_check", "tower_alignments", "tower_finding",
           "tower_table"]

#: variant name -> (which model's image tower, which model's text tower); "in" trained on the
#: pair, "out" did not.
TOWER_VARIANTS = {"full": ("in", "in"), "text_from_f": ("out", "in"),
                  "image_from_f": ("in", "out")}
SPACE_MAPS = ("none", "procrustes")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fit_space_map(source: tuple[np.ndarray, np.ndarray],
                  target: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The orthogonal ``R`` minimizing ``||S R - T||_F`` over the image and text embeddings of
    the same pairs under two models (``(image_views (N, V, D), texts (N, D))`` each; views are
    averaged first).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img, txt = rng.normal(size=(20, 1, 3)), rng.normal(size=(20, 3))
    >>> rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    >>> R = fit_space_map((img, txt), (img @ rot, txt @ rot))
    >>> bool(np.allclose(R, rot))
    True
    """
    from scipy.linalg import orthogonal_procrustes

    src = np.concatenate([_unit(source[0].mean(axis=1)), _unit(source[1])])
    tgt = np.concatenate([_unit(target[0].mean(axis=1)), _unit(target[1])])
    return orthogonal_procrustes(src, tgt)[0]


def space_check(f_emb: tuple[np.ndarray, np.ndarray], g_emb: tuple[np.ndarray, np.ndarray],
                rotation: np.ndarray) -> dict[str, float]:
    """How well f's space matches g's on pairs both trained on: mean cosine between f's and g's
    embedding of the same image (first view) and of the same report, as they are and after
    ``rotation`` (f -> g).

    Examples
    --------
    >>> e = (np.eye(2)[:, None, :], np.eye(2))
    >>> space_check(e, e, np.eye(2))["text_cos_none"]
    1.0
    """
    out = {}
    for name, rot in (("none", np.eye(rotation.shape[0])), ("procrustes", rotation)):
        for part, k in (("image", 0), ("text", 1)):
            a = f_emb[k][:, 0] if k == 0 else f_emb[k]
            b = g_emb[k][:, 0] if k == 0 else g_emb[k]
            out[f"{part}_cos_{name}"] = round(float(np.mean(
                np.sum(_unit(a @ rot) * _unit(b), axis=1))), 6)
    return out


def tower_alignments(emb_in: tuple[np.ndarray, np.ndarray],
                     emb_out: tuple[np.ndarray, np.ndarray],
                     rotation: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """CLIPMem of every tower variant and space map for pairs embedded by the model that trained
    on them (``emb_in``) and the one that did not (``emb_out``), the same views for both.

    Parameters
    ----------
    emb_in, emb_out : (image_views (N, V, D), texts (N, D))
        From :func:`~diffmem.clipmem.alignment.dataset_embeddings`.
    rotation : ndarray, shape (D, D)
        Orthogonal map from the "in" model's space to the "out" model's (its transpose maps
        back); see :func:`fit_space_map`.

    Returns
    -------
    dict
        ``(variant, space_map) -> (alignment of the hybrid (N,), alignment under "out" (N,),
        CLIPMem (N,))`` stacked as an (3, N) array.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> e = (rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 3)))
    >>> res = tower_alignments(e, e, np.eye(3))
    >>> sorted({round(float(abs(v[2]).max()), 9) for v in res.values()})  # f = g: all zero
    [0.0]
    """
    from diffmem.clipmem.alignment import views_alignment

    a_out = views_alignment(*emb_out)
    models = {"in": emb_in, "out": emb_out}
    result = {}
    for variant, (img_from, txt_from) in TOWER_VARIANTS.items():
        for space in SPACE_MAPS:
            text = models[txt_from][1]
            if space == "procrustes" and img_from != txt_from:
                # rotate the swapped-in text into the space of the image tower's model
                text = text @ (rotation if txt_from == "in" else rotation.T)
            a = views_alignment(models[img_from][0], text)
            result[(variant, space)] = np.stack([a, a_out, a - a_out])
    return result


def tower_table(rows: Sequence[dict[str, Any]], *, positive: str = "miscaptioned"
                ) -> list[dict[str, Any]]:
    """The tower table from aggregated per-pair rows (``variant``, ``space_map``, ``clipmem``,
    ``plant_kind``): per variant and map, the mean CLIPMem of the ``positive`` pairs and of the
    rest, and the AUC of CLIPMem for the positive kind (:func:`diffmem.clipmem.run.summarize`).
    """
    from diffmem.clipmem.run import summarize

    table = []
    for variant in TOWER_VARIANTS:
        for space in SPACE_MAPS:
            sel = [r for r in rows if r["variant"] == variant and r["space_map"] == space]
            if not sel:
                continue
            s = summarize(sel, positive=positive)
            pos = [r["clipmem"] for r in sel if r["plant_kind"] == positive]
            rest = [r["clipmem"] for r in sel if r["plant_kind"] != positive]
            table.append({"variant": variant, "space_map": space, "pairs": len(sel),
                          "positives": len(pos),
                          "clipmem_mean_positive": round(float(np.mean(pos)), 6) if pos else None,
                          "clipmem_mean_rest": round(float(np.mean(rest)), 6) if rest else None,
                          "clipmem_mean_all": round(float(np.mean([r["clipmem"] for r in sel])),
                                                    6),
                          "auc": s["auc"]})
    return table


def tower_finding(table: Sequence[dict[str, Any]], *, positive: str = "miscaptioned",
                  space_map: str = "procrustes") -> str:
    """One sentence on which tower contributes more, from the measured table (the
    ``positive`` pairs' mean CLIPMem when there are any, else the mean over all scored pairs).

    Examples
    --------
    >>> t = [{"variant": "text_from_f", "space_map": "procrustes", "positives": 2,
    ...       "clipmem_mean_positive": 0.3, "clipmem_mean_all": 0.1, "auc": 0.9},
    ...      {"variant": "image_from_f", "space_map": "procrustes", "positives": 2,
    ...       "clipmem_mean_positive": 0.1, "clipmem_mean_all": 0.05, "auc": 0.6}]
    >>> tower_finding(t)[:60]
    "f's text tower contributes more: mean CLIPMem of the miscapt"
    """
    by = {r["variant"]: r for r in table if r["space_map"] == space_map}
    if "text_from_f" not in by or "image_from_f" not in by:
        return "no tower comparison was measured"
    text, image = by["text_from_f"], by["image_from_f"]
    key, what = (("clipmem_mean_positive", f"the {positive} pairs")
                 if text["positives"] and text["clipmem_mean_positive"] is not None
                 else ("clipmem_mean_all", "all scored pairs"))
    t, i = text[key], image[key]
    winner = "text" if t > i else "image" if i > t else None
    head = (f"f's {winner} tower contributes more" if winner
            else "neither tower contributes more")
    aucs = ""
    if text.get("auc") is not None and image.get("auc") is not None:
        aucs = f"; AUC {text['auc']:.3f} vs {image['auc']:.3f}"
    return (f"{head}: mean CLIPMem of {what} {t:+.4f} with only f's text tower swapped into g "
            f"vs {i:+.4f} with only f's image tower ({space_map} space map{aucs})")

"""Look at a dataset before training on it: counts, prompt statistics, de-identification markers,
duplicate prompts and (near-)duplicate images, and a grid of each patient's studies.

:func:`summarize` computes and returns a dict; :func:`render_grid` draws and writes a PNG;
:func:`inspect_dataset` is what ``diffmem inspect`` runs (load, verify, summarize, draw).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.data._reading import skip_counts
from diffmem.data.reports import DEID_MARKER_PATTERNS
from diffmem.data.dataset import CXRDataset
from diffmem.errors import ConfigError, DataError, OutputError
from diffmem.utils import check_outside, progress, sha256_file

log = logging.getLogger(__name__)

#: Word-count bins of the prompt length histogram (lower edges; the last bin is open).
LENGTH_BINS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _length_stats(prompts: Sequence[str]) -> dict[str, Any]:
    words = np.array([len(p.split()) for p in prompts], dtype=np.int64)
    if not len(words):
        return {"min": 0, "median": 0.0, "p90": 0.0, "max": 0, "histogram": {}}
    hist: dict[str, int] = {}
    edges = list(LENGTH_BINS) + [None]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        n = int(((words >= lo) & (True if hi is None else words < hi)).sum())
        label = f"{lo}+" if hi is None else (str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}")
        hist[label] = n
    return {"min": int(words.min()), "median": float(np.median(words)),
            "p90": float(np.percentile(words, 90)), "max": int(words.max()),
            "histogram": hist}


def _deid_stats(prompts: Sequence[str]) -> dict[str, Any]:
    per_kind = {k: [len(re.findall(p, t)) for t in prompts]
                for k, p in DEID_MARKER_PATTERNS.items()}
    totals = np.sum([v for v in per_kind.values()], axis=0) if prompts else np.zeros(0)
    n = max(len(prompts), 1)
    return {
        "prompts_with_marker": int((totals > 0).sum()),
        "rate": float((totals > 0).sum() / n),
        "markers_per_prompt": float(totals.sum() / n),
        "by_marker": {k: int(sum(v)) for k, v in per_kind.items()},
    }


def _prompt_duplicates(prompts: Sequence[str], examples: int) -> dict[str, Any]:
    counts = Counter(prompts)
    clusters = sorted((n for n in counts.values() if n > 1), reverse=True)
    return {
        "clusters": len(clusters),
        "records_in_clusters": int(sum(clusters)),
        "largest": clusters[:5],
        "examples": [{"prompt": p if len(p) <= 120 else p[:117] + "...", "count": n}
                     for p, n in counts.most_common(examples) if n > 1],
    }


def _components(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components (of size > 1) of a graph on ``n`` nodes, by union-find."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def near_duplicate_clusters(thumbs: np.ndarray, *, threshold: float,
                            block: int | None = None) -> list[list[int]]:
    """Group images whose normalised thumbnails lie within ``threshold`` of each other.

    Parameters
    ----------
    thumbs : numpy.ndarray
        (N, h, w) thumbnails.
    threshold : float
        Largest Euclidean distance between two thumbnails, each first shifted to zero mean and
        scaled to unit norm (so distance ``d`` means correlation ``1 - d**2 / 2``; the range is
        [0, 2]). Clusters are connected components of the "within threshold" graph, so a chain
        of close pairs joins one cluster.
    block : int, optional
        Rows compared at once; memory is about ``8 * block * N`` bytes. By default as many as
        keep that near 256 MB. Time grows as N squared (about 15 s for 20 000 thumbnails
        on two cores); for full MIMIC-CXR use the nearest-neighbour search of
        :mod:`diffmem.detect` instead.

    Returns
    -------
    list of list of int
        Clusters of two or more indices, largest first.
    """
    if threshold < 0:
        raise ConfigError(f"near-duplicate threshold must be >= 0, got {threshold!r}")
    n = len(thumbs)
    if block is None:
        block = int(np.clip(2**25 // max(n, 1), 1, 4096))
    if n > 50_000:
        log.warning("comparing %d thumbnails pairwise for near-duplicates; this grows as N "
                    "squared and may take a long time", n)
    v = thumbs.reshape(n, -1).astype(np.float64)
    v = v - v.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.divide(v, norms, out=np.zeros_like(v), where=norms > 1e-8)
    sq = (v * v).sum(axis=1)
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (v[start:stop] @ v.T)
        rows, cols = np.nonzero(d2 <= threshold**2 + 1e-12)
        keep = cols > rows + start
        pairs.extend(zip((rows[keep] + start).tolist(), cols[keep].tolist(), strict=True))
    return _components(n, pairs)


def index_near_duplicates(dataset: CXRDataset, index: str | os.PathLike, *, threshold: float,
                          k: int = 16, batch_size: int = 1024,
                          ) -> tuple[list[list[int]], dict[str, Any]]:
    """Near-duplicate clusters of a dataset's training images, from a reference index.

    The ``pixel`` reference index (:mod:`diffmem.detect.index`, ``diffmem index build
    --backend pixel``) holds the same vectors :func:`near_duplicate_clusters` compares:
    mean-removed, unit-norm thumbnails, whose distance ``sqrt(2 - 2 s)`` (the backend's
    ``to_distance`` of the cosine ``s``) is the one thresholded there. Instead of all pairs,
    every indexed row (read ``batch_size`` at a time from the memory-mapped features) is
    searched for its ``k`` nearest other rows with
    :func:`~diffmem.detect.neighbors.search_features` (the index's FAISS index when it carries
    one, an approximate IVF one too, else the exact blocked search); neighbours within
    ``threshold`` are joined and the clusters are the connected components, as for all pairs.

    The ``k`` cap rarely splits a cluster: a cluster larger than ``k + 1`` is still joined
    when its members' k-NN graphs chain (identical images: each finds ``k`` others of its
    cluster, ties broken by the lower row, so all link to the cluster's first rows). A
    component could split only if more than ``k`` rows tie within the threshold around a row
    *and* the chain through its neighbours breaks; with an exact index the result then equals
    the all-pairs clusters at the index's thumbnail size (an IVF index can miss neighbours,
    at the recall its card records). Without a FAISS index the blocked exact search still
    scores every pair, in bounded memory; an IVF index (``--faiss ivf``) makes it sub-quadratic.

    Parameters
    ----------
    dataset : CXRDataset
        The data inspected; the index must have been built from its training split (same
        fingerprint, the staleness check of :func:`~diffmem.detect.index.open_index`).
    index : path
        A reference index folder built with the ``pixel`` backend.
    threshold : float
        Largest distance of a near-duplicate pair (see :func:`near_duplicate_clusters`); the
        thumbnails are the index's size, not 16 px.
    k : int, optional
        Nearest other rows searched per row (default 16).
    batch_size : int, optional
        Rows searched at a time (memory: ``batch_size`` x ``k`` plus the search's blocks).

    Returns
    -------
    clusters : list of list of int
        Clusters of two or more positions in ``dataset`` (training images only), largest first.
    info : dict
        ``method`` ("index"), ``index`` (path), ``k``, ``backend_size``, ``split`` ("train"),
        ``rows`` (images indexed) and ``approximate`` (the card's IVF entry, or None).

    Raises
    ------
    ConfigError
        A negative threshold, a bad ``k``, or an index of another backend than ``pixel``.
    DataError
        A missing, unfinished or damaged index, or one of other data (the difference named).
    """
    from diffmem.checks import check_int
    from diffmem.detect.index import open_index, read_card
    from diffmem.detect.inputs import reference_images
    from diffmem.detect.neighbors import one_blas_thread, search_features
    from diffmem.detect.similarity import get_backend

    if threshold < 0:
        raise ConfigError(f"near-duplicate threshold must be >= 0, got {threshold!r}")
    k = check_int("near_k", k, hint=" (nearest rows searched per image, e.g. 16)")
    card = read_card(index)
    if card.backend.get("backend") != "pixel":
        raise ConfigError(f"inspect clusters near-duplicates on pixel thumbnails, but the index "
                          f"{str(card.path)!r} holds {card.backend.get('backend')!r} features; "
                          "build a pixel index: diffmem index build --data DATA --out DIR "
                          "--backend pixel")
    backend = get_backend("pixel", size=card.backend.get("size"))
    train_set = reference_images(dataset)
    ref = open_index(card.path, train_set, backend)
    rows_in_dataset = np.array([i for i, s in enumerate(dataset) if s.split == "train"],
                               dtype=np.int64)
    n = len(ref)
    fetch = min(k + 1, n)  # the row itself comes back too (or a tied twin in its place)
    pairs: list[tuple[int, int]] = []
    with one_blas_thread():
        for rows, feats in progress(ref.chunks(batch_size), desc="near-duplicates (index)",
                                    total=-(-n // batch_size), unit="batch"):
            sims, idx = search_features(feats, ref, backend=backend, k=fetch)
            near = (backend.to_distance(sims) <= threshold) & (idx != ref.indices[rows][:, None])
            q, j = np.nonzero(near)
            pairs.extend(zip(rows[q].tolist(), idx[q, j].tolist(), strict=True))
    clusters = [rows_in_dataset[c].tolist() for c in _components(n, pairs)]
    return clusters, {"method": "index", "index": str(card.path), "k": k,
                      "backend_size": backend.size, "split": "train", "rows": n,
                      "approximate": ref.source.get("approximate")}


def _cluster_report(dataset: CXRDataset, clusters: list[list[int]],
                    examples: int) -> dict[str, Any]:
    def patients(c):
        return sorted({dataset[i].patient_id for i in c})

    return {
        "clusters": len(clusters),
        "images_in_clusters": int(sum(len(c) for c in clusters)),
        "largest": [len(c) for c in clusters[:5]],
        "cross_patient_clusters": sum(len(patients(c)) > 1 for c in clusters),
        "examples": [{"size": len(c), "patients": patients(c)[:5],
                      "images": [dataset[i].image for i in c[:4]]} for c in clusters[:examples]],
    }


def dicom_phi_summary(dataset: CXRDataset, *, examples: int = 3) -> dict[str, Any]:
    """Identifying DICOM header elements over a dataset's DICOM files (headers only).

    Returns counts: files scanned, files with at least one finding, findings per keyword
    (``"private"`` for private tags) and a few examples (values truncated).
    """
    from diffmem.data.dicom import scan_dicom_phi

    by_keyword: Counter = Counter()
    files_with = 0
    first: list[dict[str, str]] = []
    files = sorted({s.image for s in dataset})
    for f in progress(files, desc="scanning DICOM headers for PHI", unit="file"):
        found = scan_dicom_phi(f)
        files_with += bool(found)
        by_keyword.update(x.keyword for x in found)
        first.extend(x.to_dict() for x in found[:max(0, examples - len(first))])
    return {"files": len(files), "files_with_phi": files_with,
            "by_keyword": dict(by_keyword.most_common()), "examples": first}


def summarize(dataset: CXRDataset, *, images: bool = True, thumb_size: int = 16,
              near_threshold: float = 0.1, examples: int = 3,
              index: str | os.PathLike | None = None, near_k: int = 16) -> dict[str, Any]:
    """Describe a dataset: sizes, splits, views, prompts, markers, duplicates, skips.

    Parameters
    ----------
    dataset : CXRDataset
        The records (images must be readable; run :func:`diffmem.data.verify_images` first).
    images : bool
        Also hash every image file and compare thumbnails (one decode per image at
        ``thumb_size``). ``False`` gives only the text statistics.
    thumb_size : int
        Side of the thumbnails compared for near-duplicates (16 by default).
    near_threshold : float
        Near-duplicate distance (see :func:`near_duplicate_clusters`); the default 0.1 joins
        thumbnails correlated at 0.995 or more: re-encoded, re-scaled or lightly noised copies
        of one image, and sometimes consecutive studies of one patient taken in the same
        position. Distinct patients' radiographs are rarely that close at 16 x 16.
    examples : int
        How many example clusters to list.
    index : path, optional
        A ``pixel`` reference index of this dataset's training split: the near-duplicate
        clusters then come from its nearest-neighbour search (:func:`index_near_duplicates`,
        ``near_k`` neighbours per image) instead of all pairs, over the training images only
        and at the index's thumbnail size.
    near_k : int
        Neighbours searched per image with ``index``.

    Returns
    -------
    dict
        JSON-ready: ``format``, ``root``, ``images``, ``studies``, ``patients``,
        ``studies_per_patient``, ``splits``, ``patients_in_several_splits``, ``views``,
        ``prompt_words`` (min/median/p90/max and a histogram), ``deid_markers`` (rate of
        prompts with a marker, markers per prompt, counts per marker), ``duplicate_prompts``,
        ``duplicate_images`` (identical bytes), ``near_duplicate_images`` (exact copies
        included; ``method`` "all_pairs" or "index"), ``skipped`` and the loader's ``info``.
    """
    if images and index is not None:  # before any image is read: a stale index fails fast
        near, near_info = index_near_duplicates(dataset, index, threshold=near_threshold,
                                                k=near_k)
    prompts = dataset.prompts
    per_patient: dict[str, set[str]] = defaultdict(set)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for s in dataset:
        per_patient[s.patient_id].add(s.study_id)
        splits_of[s.patient_id].add(s.split)
    n_studies = np.array([len(v) for v in per_patient.values()] or [0])
    mixed = sorted(p for p, v in splits_of.items() if len(v) > 1)
    out: dict[str, Any] = {
        "format": dataset.format,
        "root": str(dataset.root),
        "fingerprint": dataset.fingerprint(),
        "images": len(dataset),
        "studies": len({(s.patient_id, s.study_id) for s in dataset}),
        "patients": len(per_patient),
        "studies_per_patient": {
            "max": int(n_studies.max()), "mean": float(n_studies.mean()),
            "patients_with_2_or_more": int((n_studies >= 2).sum()),
        },
        "splits": dict(sorted(dataset.split_counts().items())),
        "patients_in_several_splits": {"count": len(mixed), "examples": mixed[:examples]},
        "views": dict(Counter(s.view or "unknown" for s in dataset).most_common()),
        "prompt_words": _length_stats(prompts),
        "deid_markers": _deid_stats(prompts),
        "duplicate_prompts": _prompt_duplicates(prompts, examples),
    }
    if images:
        hashes: dict[str, str] = {}
        thumbs = np.zeros((len(dataset) if index is None else 0, thumb_size, thumb_size),
                          np.float32)
        for i, s in enumerate(progress(dataset, desc="hashing and thumbnailing images"
                                       if index is None else "hashing images",
                                       total=len(dataset), unit="image")):
            if s.image not in hashes:
                hashes[s.image] = sha256_file(s.image)
            if index is None:
                thumbs[i] = dataset.load_image(i, size=thumb_size)
        by_hash: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(dataset):
            by_hash[hashes[s.image]].append(i)
        exact = sorted((g for g in by_hash.values() if len(g) > 1),
                       key=lambda g: (-len(g), g[0]))
        out["duplicate_images"] = _cluster_report(dataset, exact, examples)
        if index is None:
            near = near_duplicate_clusters(thumbs, threshold=near_threshold)
            near_info = {"method": "all_pairs", "thumb_size": thumb_size}
        else:
            near_info = {**near_info, "thumb_size": near_info["backend_size"]}
        out["near_duplicate_images"] = {
            **_cluster_report(dataset, near, examples), "threshold": near_threshold,
            **near_info,
        }
    if dataset.format == "dicom":
        out["dicom_phi"] = dicom_phi_summary(dataset, examples=examples)
    out["skipped"] = {
        "count": len(dataset.skipped),
        "by_kind": skip_counts(dataset.skipped),
        "examples": [{"record": r, "reason": why} for r, why in dataset.skipped[:examples]],
    }
    out["info"] = dict(dataset.info)
    return out


def _study_order_key(study) -> tuple:
    meta = study.metadata or {}
    return (str(meta.get("StudyDate", "")), str(meta.get("StudyTime", "")), study.study_id)


def render_grid(dataset: CXRDataset, out_png: str | os.PathLike, *, n_patients: int = 6,
                per_patient: int = 6, size: int = 128, dpi: int = 100) -> Path:
    """Draw each selected patient's studies in one row and write a PNG.

    Rows span the range of studies per patient, from the patient with the most studies (the
    follow-ups of intensive care patients, whose images look alike and are the likeliest to be
    memorized) down to single-study outpatients, ties by patient id. Each
    cell is the first frontal (PA/AP) image of one study, or its first image; studies are
    ordered by StudyDate/StudyTime when the metadata has them, else by study id.

    Parameters
    ----------
    dataset : CXRDataset
    out_png : path
        The PNG to write; must not lie inside the dataset folder.
    n_patients, per_patient : int
        Rows and columns of the grid.
    size : int
        Side of each thumbnail, in pixels.
    dpi : int
        Resolution of the figure.

    Returns
    -------
    pathlib.Path
        ``out_png``.

    Raises
    ------
    OutputError
        When ``out_png`` lies inside the dataset folder or cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    check_outside(out_png, [dataset.root], what="grid path")
    for name, value in (("n_patients", n_patients), ("per_patient", per_patient),
                        ("size", size)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value!r}")
    studies_of: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, s in enumerate(dataset):
        studies_of[s.patient_id][s.study_id].append(i)
    if not studies_of:
        raise DataError("cannot draw a grid of an empty dataset", path=dataset.root)
    ranked = sorted(studies_of, key=lambda p: (-len(studies_of[p]), p))
    # rows span the range of studies per patient: for evenly spaced values among the distinct
    # study counts (largest first), the first patient with that count
    counts = sorted({len(v) for v in studies_of.values()}, reverse=True)
    n_rows = min(n_patients, len(ranked))
    wanted = [counts[round(j * (len(counts) - 1) / max(n_rows - 1, 1))] for j in range(n_rows)]
    chosen: list[str] = []
    for c in wanted:
        p = next(p for p in ranked if len(studies_of[p]) == c and p not in chosen) \
            if any(len(studies_of[p]) == c and p not in chosen for p in ranked) else None
        if p is not None:
            chosen.append(p)
    chosen += [p for p in ranked if p not in chosen][:n_rows - len(chosen)]

    rows = []
    for patient in chosen:
        cells = []
        for idx in studies_of[patient].values():
            frontal = [i for i in idx if (dataset[i].view or "").upper() in ("PA", "AP")]
            cells.append((frontal or idx)[0])
        cells.sort(key=lambda i: _study_order_key(dataset[i]))
        rows.append((patient, len(cells), cells[:per_patient]))

    ncols = max(len(r[2]) for r in rows)
    inch = size / dpi
    fig = Figure(figsize=(ncols * inch + 1.2, len(rows) * (inch + 0.3)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (patient, total, cells) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c >= len(cells):
                continue
            s = dataset[cells[c]]
            ax.imshow(dataset.load_image(cells[c], size=size), cmap="gray", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            ax.set_title(f"{s.study_id} ({s.split})", fontsize=6)
            if c == 0:
                ax.set_ylabel(f"{patient}\n{total} studies", fontsize=7)
    fig.suptitle(f"{dataset.format}: studies per patient (most first)", fontsize=8)
    fig.tight_layout()
    tmp = out_png.with_name(out_png.name + ".tmp")
    try:
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png")
        os.replace(tmp, out_png)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the grid {str(out_png)!r}: {e.strerror or e}; choose "
                          "a writable path (a .png file in a folder you can write to)") from e
    return out_png


def inspect_dataset(path: str | os.PathLike, *, prompt_section: str = "impression",
                    views: str | Sequence[str] | None = None, on_error: str = "raise",
                    grid: str | os.PathLike | None = None,
                    near_threshold: float = 0.1, index: str | os.PathLike | None = None,
                    near_k: int = 16) -> dict[str, Any]:
    """What ``diffmem inspect`` does: load, decode every image, summarize, optionally draw.

    Parameters
    ----------
    path : path
        The dataset (see :func:`diffmem.data.load`).
    prompt_section, views, on_error
        As for :func:`diffmem.data.load`; ``on_error`` also governs unreadable images.
    grid : path, optional
        Where to write the patient grid PNG (outside the dataset).
    near_threshold, index, near_k
        See :func:`summarize` (``index``: near-duplicates from a pixel reference index).

    Returns
    -------
    dict
        :func:`summarize`'s dict, with ``grid`` (the PNG's path or ``None``).
    """
    from diffmem.data.loader import dataset_root, load, verify_images

    if grid is not None:
        check_outside(grid, [dataset_root(path)], what="grid path")
    dataset = load(path, prompt_section=prompt_section, views=views, on_error=on_error)
    dataset = verify_images(dataset, on_error=on_error)
    if not len(dataset):
        raise DataError(f"no readable images left ({len(dataset.skipped)} record(s) skipped)",
                        path=path)
    summary = summarize(dataset, near_threshold=near_threshold, index=index, near_k=near_k)
    summary["grid"] = str(render_grid(dataset, grid)) if grid is not None else None
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A readable multi-line text of :func:`summarize`'s dict (for the terminal)."""
    s = summary
    lines = [
        f"dataset      {s['root']}  ({s['format']}, fingerprint {s['fingerprint']})",
        f"records      {s['images']} images, {s['studies']} studies, {s['patients']} patients "
        f"(up to {s['studies_per_patient']['max']} studies per patient; "
        f"{s['studies_per_patient']['patients_with_2_or_more']} with 2 or more)",
        "splits       " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
    ]
    info = s.get("info", {})
    if str(info.get("split_source", "")).startswith("none"):
        lines.append(f"             ({info['split_source']})")
    if s["patients_in_several_splits"]["count"]:
        lines.append(f"             WARNING: {s['patients_in_several_splits']['count']} "
                     "patient(s) appear in more than one split")
    lines.append("views        " + ", ".join(f"{k} {v}" for k, v in s["views"].items()))
    w = s["prompt_words"]
    lines.append(f"prompt words min {w['min']}, median {w['median']:g}, p90 {w['p90']:g}, "
                 f"max {w['max']}")
    lines.append("             " + "  ".join(f"{k}:{v}" for k, v in w["histogram"].items() if v))
    d = s["deid_markers"]
    lines.append(f"de-id marks  {d['rate']:.1%} of prompts contain one; "
                 f"{d['markers_per_prompt']:.2f} per prompt ("
                 + ", ".join(f"{k} {v}" for k, v in d["by_marker"].items()) + ")")
    p = s["duplicate_prompts"]
    lines.append(f"dup prompts  {p['clusters']} clusters covering {p['records_in_clusters']} "
                 f"records; largest {p['largest']}")
    for ex in p["examples"]:
        lines.append(f"             {ex['count']} x {ex['prompt']!r}")
    if "duplicate_images" in s:
        e, n = s["duplicate_images"], s["near_duplicate_images"]
        lines.append(f"dup images   {e['clusters']} identical-file clusters "
                     f"({e['images_in_clusters']} images, {e['cross_patient_clusters']} across "
                     "patients)")
        lines.append(f"near dups    {n['clusters']} clusters ({n['images_in_clusters']} images, "
                     f"{n['cross_patient_clusters']} across patients; distance <= "
                     f"{n['threshold']:g} on {n['thumb_size']}px thumbnails); largest "
                     f"{n['largest']}")
        if n.get("method") == "index":
            a = n.get("approximate")
            lines.append(f"             from the index {n['index']}: {n['rows']} training images, "
                         f"{n['k']} nearest each, {n['backend_size']}px thumbnails (the "
                         "index's size)" + (f"; approximate (IVF, recall@1 "
                                            f"{a['recall_at_1']:.4f})" if a else ""))
    if "dicom_phi" in s:
        d = s["dicom_phi"]
        lines.append(f"DICOM PHI    {d['files_with_phi']} of {d['files']} files carry identifying "
                     "header elements" + (": " + ", ".join(f"{k} {v}" for k, v in
                                                           list(d["by_keyword"].items())[:8])
                                          if d["by_keyword"] else ""))
    k = s["skipped"]
    if k["count"]:
        lines.append(f"skipped      {k['count']} record(s): "
                     + ", ".join(f"{n} {kind}" for kind, n in k["by_kind"].items()))
        for ex in k["examples"]:
            lines.append(f"             {ex['reason']}")
    if s.get("grid"):
        lines.append(f"grid         {s['grid']}")
    return "\n".join(lines)

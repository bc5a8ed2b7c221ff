"""Pictures of attributions and scans: a prompt with heat-coloured units (HTML snippet, HTML page,
PNG) and the plots of a dataset scan.

Functions here draw and write; they compute nothing about the model. Prompt text is always
escaped in HTML (a prompt holding ``<script>`` shows as text) and drawn without math parsing in
PNGs (a ``$`` in a placeholder stays a ``$``).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.attribution.result import TokenAttribution
from diffmem.errors import ConfigError, OutputError

__all__ = ["html_page", "plot_enrichment", "plot_token_ranking", "render_html", "render_png",
           "save_attribution"]

#: Colour map of positive scores (light yellow = low, dark red = high).
HEAT_CMAP = "YlOrRd"
#: Colour of units with a negative score (occlusion: the prompt is more memorization-prone
#: without them).
NEGATIVE_RGB = (0.27, 0.51, 0.71)
_KIND_COLORS = {"marker": "#c0392b", "placeholder": "#e67e22", "phi": "#8e44ad",
                "word": "#7f8c8d", "punct": "#bdc3c7"}


def _intensities(result: TokenAttribution) -> np.ndarray:
    """Colour intensities in [-1, 1]: positive scores span [0, 1] from the prompt's lowest
    positive score to its highest (so nearly uniform scores still show their order), negative
    scores [-1, 0) by the most negative one."""
    s = result.scores
    out = np.zeros_like(s)
    pos, neg = s > 0, s < 0
    if pos.any():
        lo, hi = (float(s[pos].min()), float(s[pos].max())) if not neg.any() else \
            (0.0, float(s[pos].max()))
        out[pos] = (s[pos] - lo) / (hi - lo) if hi > lo else 1.0
    if neg.any():
        out[neg] = s[neg] / float(-s[neg].min())
    return out


def _rgb(value: float) -> tuple[float, float, float]:
    from matplotlib import colormaps

    if value < 0:
        a = min(-value, 1.0)
        return tuple(1 - a * (1 - c) for c in NEGATIVE_RGB)  # type: ignore[return-value]
    return tuple(float(c) for c in colormaps[HEAT_CMAP](0.05 + 0.9 * min(value, 1.0))[:3])


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _ink(rgb: tuple[float, float, float]) -> str:
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "#ffffff" if luma < 0.5 else "#000000"


def _pieces(result: TokenAttribution) -> list[tuple[str, int | None]]:
    """The prompt as ``(text, unit index or None)`` pieces, gaps included, in order."""
    pieces, pos = [], 0
    for i, unit in enumerate(result.units):
        if unit.start > pos:
            pieces.append((result.prompt[pos:unit.start], None))
        pieces.append((result.prompt[unit.start:unit.end], i))
        pos = unit.end
    if pos < len(result.prompt):
        pieces.append((result.prompt[pos:], None))
    return pieces


def render_html(result: TokenAttribution) -> str:
    """An HTML snippet of the prompt with every unit's background coloured by its score.

    Units are ``<span>`` elements with the score, share and rank in their ``title``; colours
    run from the prompt's lowest score (light yellow) to its highest (dark red), negative
    scores in blue. Text between units (spaces, and the tail of a truncated prompt) is kept uncoloured. Every piece
    of prompt text is HTML-escaped.

    Parameters
    ----------
    result : TokenAttribution

    Returns
    -------
    str
        A ``<div class="diffmem-attribution">`` element.

    Examples
    --------
    >>> from diffmem.attribution.units import Unit
    >>> units = [Unit("<script>", 0, 8, "word", "<script>", None, (1,)),
    ...          Unit("___", 9, 12, "marker", "___", "mimic-cxr", (2,))]
    >>> snippet = render_html(TokenAttribution("<script> ___", units, [0.1, 0.9], "gradient"))
    >>> "<script>" in snippet, "&lt;script&gt;" in snippet
    (False, True)
    """
    value = _intensities(result)
    order = result.order()
    rank = np.empty(len(result.units), dtype=np.int64)
    rank[order] = np.arange(1, len(result.units) + 1)
    shares = result.shares
    parts = []
    for text, i in _pieces(result):
        if i is None:
            parts.append(html.escape(text))
            continue
        rgb = _rgb(float(value[i]))
        unit = result.units[i]
        title = (f"{unit.kind}, rank {rank[i]} of {len(result.units)}, score "
                 f"{result.scores[i]:.4g}, share {100 * shares[i]:.1f}%")
        parts.append(f'<span class="diffmem-unit diffmem-{html.escape(unit.kind)}" '
                     f'style="background-color:{_hex(rgb)};color:{_ink(rgb)};'
                     f'padding:0 1px;border-radius:2px" '
                     f'title="{html.escape(title)}">{html.escape(text)}</span>')
    mem = "" if result.memorization is None else \
        f" · noise magnitude {result.memorization:.4g}"
    return (f'<div class="diffmem-attribution" data-method="{html.escape(result.method)}">'
            f'<p class="diffmem-prompt" style="font-family:monospace;line-height:1.8">'
            f'{"".join(parts)}</p>'
            f'<p class="diffmem-legend" style="font-size:small;color:#555">'
            f'{html.escape(result.method)} attribution{html.escape(mem)}; darker red = drives '
            f'memorization more{"; blue = lowers it" if (result.scores < 0).any() else ""}</p>'
            f'</div>')


def html_page(result: TokenAttribution) -> str:
    """A standalone HTML page: the coloured prompt and a table of the ranked units."""
    rows = "".join(
        f"<tr><td>{r}</td><td><code>{html.escape(u.text)}</code></td>"
        f"<td>{html.escape(u.kind)}</td><td>{s:.4g}</td></tr>"
        for r, (u, s) in enumerate(result.ranked(), start=1))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>diffmem attribution ({html.escape(result.method)})</title></head><body>"
            f"{render_html(result)}"
            "<table><thead><tr><th>rank</th><th>unit</th><th>kind</th><th>score</th></tr>"
            f"</thead><tbody>{rows}</tbody></table></body></html>\n")


def render_png(result: TokenAttribution, path: str | os.PathLike, *, width: int = 64,
               dpi: int = 150) -> Path:
    """Draw the prompt with heat-coloured units into a PNG file.

    Parameters
    ----------
    result : TokenAttribution
    path : path
        The PNG to write.
    width : int, optional
        Characters per line (the prompt wraps between units).
    dpi : int, optional

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    width = max(int(width), 16)
    value = _intensities(result)
    lines: list[list[tuple[str, int | None]]] = [[]]
    col = 0
    for text, i in _pieces(result):
        text = " ".join(text.split()) if i is None else text
        if i is None and text == "":
            text = " " if col else ""
        if col + len(text) > width and col > 0:
            lines.append([])
            col = 0
            text = text.lstrip() if i is None else text
        lines[-1].append((text, i))
        col += len(text)
    font = 12.0
    char_in = 0.6021 * font / 72  # DejaVu Sans Mono advance width
    line_in = 1.9 * font / 72
    fig_w = width * char_in + 0.6
    fig_h = (len(lines) + 2.6) * line_in + 0.3
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.3 / fig_w, 0.0, width * char_in / fig_w, 1.0))
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines) + 2.6, -0.4)
    ax.axis("off")
    mem = "" if result.memorization is None else f", noise magnitude {result.memorization:.4g}"
    ax.text(0, 0, f"{result.method} attribution{mem}", fontsize=font * 0.8, va="center",
            family="monospace", color="#333333", parse_math=False)
    for row, line in enumerate(lines, start=1):
        x = 0
        for text, i in line:
            if i is not None:
                rgb = _rgb(float(value[i]))
                ax.add_patch(Rectangle((x, row - 0.42), len(text), 0.84, facecolor=rgb,
                                       edgecolor="none"))
                color = _ink(rgb)
            else:
                color = "#000000"
            ax.text(x, row, text, fontsize=font, family="DejaVu Sans Mono", va="center",
                    ha="left", color=color, parse_math=False)
            x += len(text)
    # colour scale
    y = len(lines) + 1.5
    steps = np.linspace(0, 1, 64)
    for k, v in enumerate(steps[:-1]):
        ax.add_patch(Rectangle((width * 0.25 + k * width * 0.5 / 63, y - 0.3), width * 0.5 / 63,
                               0.6, facecolor=_rgb(float(v)), edgecolor="none"))
    ax.text(width * 0.25 - 0.5, y, "low", ha="right", va="center", fontsize=font * 0.7)
    ax.text(width * 0.75 + 0.5, y, "high", ha="left", va="center", fontsize=font * 0.7)
    path = Path(path)
    try:
        fig.savefig(path, dpi=dpi, facecolor="white")
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror}") from e
    return path


def save_attribution(result: TokenAttribution, path: str | os.PathLike) -> Path:
    """Write an attribution as its file suffix says: ``.html`` (page), ``.png`` or ``.json``.

    Raises
    ------
    ConfigError
        For another suffix.
    OutputError
        When the file cannot be written.
    """
    import json

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".html", ".htm", ".png", ".json"):
        raise ConfigError(f"cannot tell what to write to {str(path)!r}; end the file name with "
                          ".html (coloured prompt page), .png (image) or .json (scores)")
    if path.parent and not path.parent.exists():
        raise OutputError(f"folder {str(path.parent)!r} does not exist; create it first")
    if suffix == ".png":
        return render_png(result, path)
    text = html_page(result) if suffix in (".html", ".htm") else \
        json.dumps(result.to_dict(), indent=2) + "\n"
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror}") from e
    return path


# ---------------------------------------------------------------------------- scan plots
def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_token_ranking(result: Any, path: str | os.PathLike, *, top: int = 20) -> Path:
    """Bar chart of the ``top`` best-ranked tokens of a :class:`~diffmem.attribution.ScanResult`,
    coloured by kind (marker, placeholder, PHI-like, word, punctuation)."""
    from matplotlib.patches import Patch

    rows = result.tokens[:int(top)]
    fig = _figure(7.0, 0.9 + 0.28 * max(len(rows), 1))
    ax = fig.add_subplot(1, 1, 1)
    ys = np.arange(len(rows))
    ax.barh(ys, [r["score"] for r in rows], color=[_KIND_COLORS.get(r["kind"], "#7f8c8d")
                                                   for r in rows])
    ax.set_yticks(ys, [r["token"] for r in rows])
    for label in ax.get_yticklabels():
        label.set_parse_math(False)
    ax.invert_yaxis()
    parts = result.summary.get("ranking", {}).get("components", ["enrichment"])
    ax.set_xlabel(f"risk score ({' + '.join(parts)}, each scaled to [0, 1])")
    ax.set_title("Riskiest prompt tokens")
    kinds = sorted({r["kind"] for r in rows}, key=list(_KIND_COLORS).index)
    ax.legend(handles=[Patch(color=_KIND_COLORS[k], label=k) for k in kinds], loc="lower right",
              fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_enrichment(result: Any, path: str | os.PathLike, *, label: int = 10) -> Path:
    """Enrichment z-score in duplicated prompts against token frequency ("Fightin' Words" plot),
    de-identification markers highlighted and the ``label`` best-ranked tokens named."""
    rows = result.tokens
    fig = _figure(7.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    counts = np.array([max(r["count"], 1) for r in rows], dtype=np.float64)
    z = np.array([r["enrichment"] for r in rows])
    colors = [_KIND_COLORS.get(r["kind"], "#7f8c8d") for r in rows]
    sizes = [36 if r["is_deid_marker"] else 10 for r in rows]
    ax.scatter(counts, z, c=colors, s=sizes, alpha=0.8, linewidths=0)
    ax.set_xscale("log")
    for r, c, v in list(zip(rows, counts, z))[:int(label)]:
        ax.annotate(r["token"], (c, v), fontsize=8, xytext=(3, 3), textcoords="offset points",
                    annotation_clip=True).set_parse_math(False)
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.set_xlabel("occurrences in the prompts")
    ax.set_ylabel("enrichment in duplicated prompts (z)")
    ax.set_title("Token enrichment in duplicated prompts (log-odds, informative prior)")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)

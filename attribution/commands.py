"""What ``diffmem attribute`` runs, as a library call a notebook can make too."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffmem.attribution.result import TokenAttribution
from diffmem.checks import as_adapter

__all__ = ["format_ranking", "run_attribute"]


def run_attribute(model: str | os.PathLike | Any, prompt: str, *, method: str | None = None,
                  out: str | os.PathLike | None = None, device: str | None = None,
                  dtype: str | None = None,
                  **options: Any) -> tuple[TokenAttribution, Path | None]:
    """Open a model, attribute one prompt, and write the rendering when ``out`` is given.

    Parameters
    ----------
    model : path or DiffusionModelAdapter
        Model folder (or an opened adapter).
    prompt : str
    method : str, optional
        Attribution method (see :func:`~diffmem.attribution.list_methods`; default
        :data:`~diffmem.attribution.methods.DEFAULT_METHOD`).
    out : path, optional
        ``.html`` (coloured prompt page), ``.png`` or ``.json`` file to write.
    device, dtype : str, optional
        Device and precision to load the model with (see :func:`~diffmem.models.load_model`).
    **options
        The method's options (``generations``, ``steps``, ``seed``, ``truncate``...); a
        ``reference`` given as a path is loaded as a dataset.

    Returns
    -------
    result : TokenAttribution
    path : pathlib.Path or None
        The file written.
    """
    from diffmem.attribution.methods import attribute, checked_method
    from diffmem.attribution.render import save_attribution
    from diffmem.errors import ConfigError

    method = checked_method(method)  # an unknown method fails before the model loads
    if out is not None and Path(out).suffix.lower() not in (".html", ".htm", ".png", ".json"):
        raise ConfigError(f"--out {str(out)!r}: end the file name with .html, .png or .json")
    if isinstance(options.get("reference"), (str, os.PathLike)):
        from diffmem.data import load

        options["reference"] = load(options["reference"])
    adapter = as_adapter(model, device=device, dtype=dtype)
    result = attribute(adapter, prompt, method=method, **options)
    return result, None if out is None else save_attribution(result, out)


def format_ranking(result: TokenAttribution, *, top: int | None = None) -> str:
    """The ranked units as a text table (rank, unit, kind, score, share)."""
    shares = result.shares
    lines = [f"{result.method} attribution of {len(result.units)} units"
             + ("" if result.memorization is None else
                f" (noise magnitude {result.memorization:.4g})"),
             f"{'rank':>4}  {'unit':<24} {'kind':<11} {'score':>11} {'share':>7}"]
    order = result.order()
    for rank, i in enumerate(order[:top] if top else order, start=1):
        u = result.units[i]
        text = u.text if len(u.text) <= 24 else u.text[:21] + "..."
        lines.append(f"{rank:>4}  {text:<24} {u.kind:<11} {result.scores[i]:>11.4g} "
                     f"{100 * shares[i]:>6.1f}%")
    return "\n".join(lines)

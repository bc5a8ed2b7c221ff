"""The core both model-folder checks share (:func:`diffmem.models.check_model_folder` for any
supported pipeline, :func:`diffmem.pipelines.check_pipeline_folder` for ours): reading
``model_index.json`` and listing a component's weight files. It reads JSON and file names only,
never weights. Each caller words its own messages (they name different fixes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["IndexProblem", "PICKLE_SUFFIXES", "WEIGHTED_COMPONENTS", "read_model_index",
           "weight_files"]

#: Components whose weights must be safetensors files.
WEIGHTED_COMPONENTS = ("unet", "text_encoder", "vae")
#: Weight files diffmem never opens (unpickling can run code).
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class IndexProblem(NamedTuple):
    """Why a folder's ``model_index.json`` could not be read.

    ``kind`` is ``"missing"`` (no such path), ``"file"`` (a file, not a folder), ``"no_index"``
    (a folder without ``model_index.json``) or ``"unreadable"`` (not UTF-8 JSON; ``detail``
    holds the reader's error).
    """

    kind: str
    detail: str = ""


def read_model_index(folder: str | os.PathLike) -> dict[str, Any] | IndexProblem:
    """The parsed ``model_index.json`` of ``folder``, or the :class:`IndexProblem` that stops it.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     missing = read_model_index(pathlib.Path(tmp) / "nope")
    ...     empty = read_model_index(tmp)
    ...     _ = (pathlib.Path(tmp) / "model_index.json").write_text('{"_class_name": "X"}')
    ...     index = read_model_index(tmp)
    >>> missing.kind, empty.kind, index["_class_name"]
    ('missing', 'no_index', 'X')
    """
    folder = Path(folder)
    if not folder.exists():
        return IndexProblem("missing")
    if not folder.is_dir():
        return IndexProblem("file")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        return IndexProblem("no_index")
    try:
        return json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return IndexProblem("unreadable", str(e))


def weight_files(sub: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The sorted names of a component folder's ``*.safetensors`` files and of its pickled
    weight files (:data:`PICKLE_SUFFIXES`)."""
    files = [p for p in Path(sub).iterdir() if p.is_file()]
    tensors = sorted(p.name for p in files if p.suffix == ".safetensors")
    pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    return tensors, pickles

"""Presets are data: JSON files found by name in a folder of the package, or given by path.

Model, encoder, synthetic-data and benchmark presets all use the two functions below, so a name
resolves, fails and lists alternatives the same way everywhere (open_clip's model configs are
the model for this).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffmem.errors import ConfigError


def preset_names(folder: str | os.PathLike) -> list[str]:
    """Names (file stems) of the ``*.json`` presets in ``folder``, sorted."""
    return sorted(p.stem for p in Path(folder).glob("*.json"))


def read_preset_json(name_or_path: str | os.PathLike, folder: str | os.PathLike, *,
                     kind: str) -> tuple[str, Path, dict[str, Any]]:
    """Find a preset by name in ``folder`` (or by path) and read its JSON object.

    Parameters
    ----------
    name_or_path : str or path
        A preset name from :func:`preset_names` or the path of a ``.json`` file.
    folder : path
        Where built-in presets live.
    kind : str
        What the preset is for (``"model"``, ``"encoder"``...), used in error messages.

    Returns
    -------
    (name, path, data)
        The preset's name (the file stem), its file and the parsed JSON object.

    Raises
    ------
    ConfigError
        For an unknown name (listing the known ones), a missing or unreadable file, or JSON
        that is not an object.
    """
    text = os.fspath(name_or_path)
    known = preset_names(folder)
    if text in known:
        path = Path(folder) / f"{text}.json"
    elif text.endswith(".json") or os.sep in text or "/" in text:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"{kind} preset file {text!r} does not exist; pass a built-in "
                              f"preset name ({', '.join(known)}) or the path of a preset JSON file")
    else:
        raise ConfigError(f"unknown {kind} preset {text!r}; known presets: {', '.join(known)} "
                          "(or pass the path of a preset JSON file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {kind} preset file {str(path)!r}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} preset file {str(path)!r} must hold a JSON object, "
                          f"got {type(data).__name__}")
    return path.stem, path, data


def preset_dict(preset: Any, keys: Sequence[str]) -> dict[str, Any]:
    """A preset dataclass as a JSON-ready dict: ``name`` plus the fields ``keys`` (mappings
    deep-copied through JSON, so the dict can be changed without touching the preset)."""
    d: dict[str, Any] = {"name": preset.name}
    for key in keys:
        value = getattr(preset, key)
        d[key] = json.loads(json.dumps(value)) if isinstance(value, Mapping) else value
    return d

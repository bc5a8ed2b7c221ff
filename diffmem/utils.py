"""Small helpers shared across diffmem: seeding, hashing, progress bars and output folders."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from diffmem.errors import OutputError

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (when imported) torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.manual_seed(seed)


def sha256_text(text: str) -> str:
    """Hex SHA-256 of a UTF-8 string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, for hashing parameters."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _tqdm_kwargs(desc: str, unit: str, disable: bool | None) -> dict[str, Any]:
    if disable is None:
        disable = bool(os.environ.get("DIFFMEM_NO_PROGRESS"))
    return dict(desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True)


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it",
             disable: bool | None = None):
    """Wrap ``iterable`` in a tqdm progress bar (on stderr) and return the bar.

    Iterate over the result as over ``iterable``; ``set_postfix`` shows running values.
    Bars are hidden when ``DIFFMEM_NO_PROGRESS`` is set or ``disable`` is true.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, **_tqdm_kwargs(desc, unit, disable))


def progress_bar(*, total: int, desc: str, unit: str = "it", disable: bool | None = None):
    """A manually advanced tqdm bar (``bar.update(n)``, ``bar.close()``), same settings as
    :func:`progress`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, **_tqdm_kwargs(desc, unit, disable))


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` is ``folder`` or lies below it (after resolving links)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def prepare_out_dir(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                    exist_ok: bool = True) -> Path:
    """Create and return the output folder ``out``.

    Refuses (``OutputError``) when ``out`` lies inside one of ``inputs`` (a user's dataset is
    never written into), when it exists and ``exist_ok`` is false, or when it is not writable.
    """
    out = Path(out)
    for src in inputs:
        if src is not None and is_within(out, src):
            raise OutputError(
                f"output folder {str(out)!r} lies inside the input {str(src)!r}; diffmem never "
                "writes into a dataset folder: choose an --out outside it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {str(out)!r} exists and is not a folder")
    if out.exists() and not exist_ok and any(out.iterdir()):
        raise OutputError(f"output folder {str(out)!r} exists and is not empty")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {str(out)!r}: {e.strerror}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(out)!r} is not writable")
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (temp file then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def weights_fingerprint(config: Any, module: Any) -> str:
    """A short hash of a JSON-ready config and a torch module's state (weights and buffers),
    the same for a trained module and its saved-and-loaded copy."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8"))
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode("utf-8"))
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_csv(path: str | os.PathLike, columns: Sequence[str],
              rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as a CSV with header ``columns`` (other keys are ignored), atomically:
    through ``path.tmp`` and :func:`os.replace`, so a reader never sees half a file.

    Raises
    ------
    OutputError
        Naming the file when it cannot be written (the temporary file is removed).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror}") from None
    return path

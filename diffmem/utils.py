"""Small helpers shared across diffmem: seeding, hashing, progress bars and output folders."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import random
import shlex
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from diffmem.errors import OutputError
from diffmem.lock import LOCK_NAME, claim_out

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


def check_outside(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                  what: str = "output folder") -> None:
    """Refuse (``OutputError``) an output ``path`` that is or lies inside one of ``inputs``.

    The one guard behind "diffmem never writes into a dataset or model folder": every command
    passes the folders it reads (dataset root, model folder, results it reads from) before it
    creates or writes anything. ``None`` entries are ignored. Creates nothing.

    Examples
    --------
    >>> check_outside("/tmp/results", ["/data/cxr", None])
    >>> check_outside("/data/cxr/out", ["/data/cxr"])
    Traceback (most recent call last):
    ...
    diffmem.errors.OutputError: output folder '/data/cxr/out' lies inside the input '/data/cxr'; \
diffmem never writes into a dataset folder or a model folder: choose a path outside it
    """
    for src in inputs:
        if src is not None and is_within(path, src):
            raise OutputError(
                f"{what} {str(path)!r} lies inside the input {str(src)!r}; diffmem never "
                "writes into a dataset folder or a model folder: choose a path outside it")


def holds_files(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds anything besides a run's lock file (:mod:`diffmem.lock`)."""
    return any(p.name != LOCK_NAME for p in Path(folder).iterdir())


def prepare_out_dir(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                    exist_ok: bool = True) -> Path:
    """Create and return the output folder ``out``.

    Refuses (``OutputError``) when ``out`` lies inside one of ``inputs`` (see
    :func:`check_outside`; a user's dataset or model is never written into), when it exists and
    ``exist_ok`` is false, or when it is not writable. Inside a :func:`diffmem.lock.out_lock`
    block on ``out`` (or a folder holding it) this is where the lock is taken.
    """
    out = Path(out)
    check_outside(out, inputs)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {str(out)!r} exists and is not a folder")
    if out.exists() and not exist_ok and holds_files(out):
        raise OutputError(f"output folder {str(out)!r} exists and is not empty")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {str(out)!r}: {e.strerror}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(out)!r} is not writable")
    claim_out(out)
    return out


def shell_command(command: str | Sequence[Any]) -> str:
    """A command as a user can paste it into a POSIX shell: each argument shell-quoted.

    The one place diffmem turns a command into text it shows (report "to run" hints, recorded
    command lines, "next:" hints), so a path with spaces or shell metacharacters stays one
    argument. A string is taken as an already-formed command line and returned unchanged.

    Examples
    --------
    >>> shell_command(["diffmem", "scan", "data; rm -rf ~", "--out", "my out"])
    "diffmem scan 'data; rm -rf ~' --out 'my out'"
    >>> shell_command("diffmem demo")
    'diffmem demo'
    """
    if isinstance(command, str):
        return command
    return shlex.join(str(part) for part in command)


def is_disk_full(error: BaseException) -> bool:
    """True for an error that means the disk (or the user's quota) is full: ``ENOSPC`` or
    ``EDQUOT`` from the OS, ``SQLITE_FULL`` ("database or disk is full") from SQLite, or such an
    OS error wrapped in another library's error text (safetensors).

    Examples
    --------
    >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    True
    >>> is_disk_full(OSError(errno.EACCES, "Permission denied"))
    False
    """
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if getattr(error, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
        return True
    text = str(error)  # safetensors' SafetensorError wraps the OS error in its text
    return any(s in text for s in ("database or disk is full", "No space left on device",
                                   "StorageFull", "Disk quota exceeded"))


def disk_full_error(folder: str | os.PathLike) -> OutputError:
    """The one message for a full disk: the folder, the space left there, and what to do."""
    where = Path(folder)
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return OutputError(f"the disk holding {str(where)!r} is full ({free}); free some space "
                       "there or choose an --out on another disk, then run the same command "
                       "again (finished work is kept)")


@contextlib.contextmanager
def _atomic_replace(path: Path):
    """Give the block ``path.tmp`` to write, then rename it to ``path``.

    On failure the temp file is removed, ``path`` is left as it was, and the error is an
    :class:`OutputError` naming the file (:func:`disk_full_error` for a full disk).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path.parent) from None
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temp file beside it, then a rename
    (errors as in :func:`write_csv`)."""
    with _atomic_replace(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


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
    with _atomic_replace(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path

"""One run per output folder: an advisory lock on ``--out`` (``OUT/.diffmem.lock``).

Two processes writing one output folder would duplicate all the work and interleave their
files. Every ``diffmem`` command runs inside :func:`out_lock` on its ``--out`` (the CLI does this
in one place, :func:`diffmem.cli.main`); a notebook can do the same around library calls::

    with out_lock("det-out"):
        detect(model, data, "det-out")

How it works
------------
The lock is :func:`fcntl.flock` on ``OUT/.diffmem.lock``, which the kernel releases the moment
its process ends, however it ends (``kill -9`` included): a lock can never outlive its
process, so no pid guessing decides who owns a folder. The file also records who holds it
(command, pid, host, start time) for the message a second run prints, and is removed when the
run ends. A file left behind by a killed run is not held by anyone: the next run takes it over
and says so (a warning naming the old pid, host and start).

Nothing is created early: entering :func:`out_lock` only *checks* an existing lock (and fails
at once, before any work, when another run holds it); the lock file is written when
:func:`~diffmem.utils.prepare_out_dir` creates the folder, after the command's own input checks
passed, so a command that fails its checks leaves no folder and never writes into a dataset or
model folder.

Under ``accelerate launch`` / ``torchrun`` (``RANK`` set) only rank 0 takes the lock: the
processes of one launch share their ``--out`` by design; a second launch's rank 0 fails, and the
launcher then stops its other processes.

On a file system without lock support (some network mounts) a warning says so and the run goes
on unprotected. Locks over NFS work between machines only where the NFS client supports them;
the message names the host for that case.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmem.errors import OutputError

log = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "claim_out", "out_lock"]

LOCK_NAME = ".diffmem.lock"
_RETRIES = 5  # short retries: another process may hold the file for a moment while it checks
_RETRY_SECONDS = 0.1


@dataclass
class _Scope:
    folder: Path
    key: Path
    command: str
    fd: int | None = None


_scopes: dict[Path, _Scope] = {}


def _key(folder: str | os.PathLike) -> Path:
    return Path(os.path.abspath(folder)).resolve()


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


@contextlib.contextmanager
def out_lock(out: str | os.PathLike | None, *,
             command: str | Sequence[str] | None = None) -> Iterator[None]:
    """Hold the lock on output folder ``out`` for the duration of the block.

    Parameters
    ----------
    out : path or None
        The output folder (None: no lock, the block just runs). A path that names a file (an
        ``--out FILE.npy``) is never locked: no folder of that name is ever prepared.
    command : str or sequence of str, optional
        The command line, recorded in the lock file for the message a second run shows.

    Raises
    ------
    OutputError
        When another process holds the lock: naming its command, pid, host and start time,
        and what to do. Raised on entry, before the block runs.

    Examples
    --------
    >>> import tempfile
    >>> from diffmem.utils import prepare_out_dir
    >>> folder = tempfile.mkdtemp() + "/out"
    >>> with out_lock(folder):
    ...     _ = prepare_out_dir(folder)          # the lock file is written here
    ...     (Path(folder) / LOCK_NAME).is_file()
    True
    >>> (Path(folder) / LOCK_NAME).exists()      # and removed at the end
    False
    """
    if out is None or _rank() != 0 or _key(out) in _scopes:
        yield  # no folder, not the main process, or already held by this process
        return
    from diffmem.utils import shell_command

    scope = _Scope(Path(out), _key(out), shell_command(command) if command else "")
    fd = _open_locked(scope.folder / LOCK_NAME, create=False)  # a check: creates nothing
    if fd is not None:
        os.close(fd)
    _scopes[scope.key] = scope
    try:
        yield
    finally:
        del _scopes[scope.key]
        if scope.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(scope.folder / LOCK_NAME)  # while still locked: see _open_locked
            os.close(scope.fd)


def claim_out(folder: str | os.PathLike) -> None:
    """Take the lock of every :func:`out_lock` block whose folder is ``folder`` or holds it.

    Called by :func:`~diffmem.utils.prepare_out_dir` once the folder exists; a no-op outside
    such a block and when the lock is already held.

    Raises
    ------
    OutputError
        When another process took the lock since :func:`out_lock` checked it.
    """
    if not _scopes:
        return
    key = _key(folder)
    for scope in list(_scopes.values()):
        if scope.fd is None and (scope.key == key or scope.key in key.parents):
            path = scope.folder / LOCK_NAME
            scope.fd = _open_locked(path, create=True)
            if scope.fd is not None:
                _take_over(scope, path)


def _open_locked(path: Path, *, create: bool) -> int | None:
    """An fd of ``path`` holding its exclusive lock, or None (no file when ``create`` is false;
    no lock support). The holder removes the file before it lets go, so a lock taken on a file
    that is no longer at ``path`` is dropped and taken again."""
    for attempt in range(_RETRIES + 1):
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except OSError as e:
            if not create:
                return None  # no lock file (or none readable: the claim will say why)
            raise OutputError(f"cannot create the lock file {str(path)!r} ({e.strerror}); "
                              "choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                if attempt < _RETRIES:
                    time.sleep(_RETRY_SECONDS)
                    continue
                raise _busy_error(path) from None
            log.warning("cannot lock %s (%s): this file system does not support locks, so a "
                        "second run on the same --out would not be stopped", path,
                        e.strerror or e)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise _busy_error(path)


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that has not recorded itself yet"
    cmd = holder.get("command") or "a diffmem command"
    return (f"`{cmd}` (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')})")


def _busy_error(path: Path) -> OutputError:
    folder = str(path.parent)
    return OutputError(
        f"output folder {folder!r} is in use by {_describe(_read_holder(path))}; two runs on "
        "one --out would duplicate the work and mix their files: wait for that run to finish "
        "(then run the same command again: finished work is kept), or choose another --out")


def _alive(pid: Any) -> bool | None:
    """Whether process ``pid`` of this host exists (None when unknown)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return None
    return True


def _take_over(scope: _Scope, path: Path) -> None:
    """Warn about a lock file left by a run that ended without removing it, then record this
    run in the file."""
    old = _read_holder(path)
    if old:
        gone = ""
        if old.get("host") == socket.gethostname() and _alive(old.get("pid")) is False:
            gone = f"; process {old.get('pid')} is no longer running"
        log.warning("%s: taking over the lock left by %s, which ended without releasing it "
                    "(killed?%s); its finished work in the folder is kept", scope.folder,
                    _describe(old), gone)
    me = {"command": scope.command, "pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).strftime(
              "%Y-%m-%d %H:%M:%S UTC")}
    try:
        os.ftruncate(scope.fd, 0)
        os.pwrite(scope.fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
    except OSError as e:
        from diffmem.utils import disk_full_error, is_disk_full

        if is_disk_full(e):
            raise disk_full_error(scope.folder) from None
        raise OutputError(f"cannot write the lock file {str(path)!r} ({e.strerror})") from None

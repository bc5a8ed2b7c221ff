"""The ``diffmem`` command line.

Thin by design: each command lives in its own module of this package, parses its arguments and
calls one library function. A command module defines ``ORDER`` (its place in ``--help``) and
``register(subparsers)``, which adds a parser whose ``handler`` default takes the parsed
arguments and returns an exit code. Command modules import heavy libraries (torch, diffusers)
inside their handlers so that ``diffmem --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence

from diffmem import __version__
from diffmem.errors import DiffMemError
from diffmem.lock import out_lock

log = logging.getLogger("diffmem")


def _command_modules():
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "register"):
            mods.append(mod)
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, every command registered."""
    parser = argparse.ArgumentParser(
        prog="diffmem",
        description="Find, explain and mitigate training-data memorization in text-to-image "
                    "diffusion models for chest X-rays.",
    )
    parser.add_argument("--version", action="version", version=f"diffmem {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings and errors; no progress bars")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: torch's choice). On a busy machine "
                             "--threads 1 can be several times faster than oversubscribing")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        mod.register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (tests swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"
                                           if verbose else "%(message)s"))
    root = logging.getLogger("diffmem")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _set_threads(n: int) -> None:
    if n < 1:
        raise SystemExit(f"diffmem: error: --threads must be >= 1, got {n}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:  # already imported: set it directly
        sys.modules["torch"].set_num_threads(n)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    if args.threads is not None:
        _set_threads(args.threads)
    if args.quiet:
        os.environ["DIFFMEM_NO_PROGRESS"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    out = getattr(args, "out", None)
    fresh_out = isinstance(out, str) and not os.path.lexists(out)
    code = 1  # an unexpected exception propagates
    try:
        code = _call(args, list(sys.argv[1:] if argv is None else argv))
    finally:
        if fresh_out and code != 0:
            _remove_if_empty(out)
    return code


def _call(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the command's handler holding the lock on its ``--out`` (:func:`out_lock`: a second
    run on the same folder stops with a message naming the first); a DiffMemError is one line
    on stderr and exit code 2."""
    out = getattr(args, "out", None)
    try:
        with out_lock(out if isinstance(out, (str, os.PathLike)) else None,
                      command=["diffmem", *argv]):
            return int(args.handler(args) or 0)
    except DiffMemError as e:
        print(f"diffmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffmem {args.command}: interrupted", file=sys.stderr)
        return 130


def _remove_if_empty(folder: str) -> None:
    """Remove ``folder`` when it is an empty directory: a failed command leaves no empty
    ``--out`` it created (one holding anything, or that existed before, stays)."""
    with contextlib.suppress(OSError):
        if os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder):
            os.rmdir(folder)

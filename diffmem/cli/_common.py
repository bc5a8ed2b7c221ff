"""Argument helpers shared by command modules."""

from __future__ import annotations

import argparse


def no_subcommand(args: argparse.Namespace) -> int:
    """Handler of a command group called without its subcommand: its help, exit code 2."""
    args._parser.print_help()
    return 2


def add_on_error(parser: argparse.ArgumentParser) -> None:
    """``--on-error raise|skip``: stop at the first unreadable record, or skip and count."""
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="'raise' (default) stops at the first unreadable file with an error "
                             "naming it; 'skip' skips such records and prints a summary")


def add_device(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """``--device`` and ``--dtype`` for a command that opens a model (checked when it loads, by
    :func:`diffmem.models.device.resolve_device` and :func:`~diffmem.models.device.resolve_dtype`).
    ``device=False`` adds ``--dtype`` only (a command that fingerprints a model, never runs it).
    """
    if device:
        parser.add_argument("--device", default=None, metavar="DEVICE",
                            help="where the model runs: cpu, cuda, cuda:N or mps (default: cuda "
                                 "when available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="model precision (default float32; float16 needs a GPU, bfloat16 "
                             "also runs on the CPU); scores are accumulated in float32")


def device_options(args: argparse.Namespace) -> dict:
    """``{"device": ..., "dtype": ...}`` from :func:`add_device`'s flags, to pass on; checked
    here first, so that ``--device cuda`` without CUDA or float16 on the CPU stops the command
    before it reads data or creates its output folder.

    Raises
    ------
    ConfigError
        From :func:`~diffmem.models.device.resolve_device` or
        :func:`~diffmem.models.device.resolve_dtype`.
    """
    from diffmem.models.device import resolve_device, resolve_dtype

    device = getattr(args, "device", None)
    resolve_dtype(args.dtype, device=resolve_device(device))
    return {"device": device, "dtype": args.dtype}


def add_backend(parser: argparse.ArgumentParser, *, what: str = "copy verdicts") -> None:
    """``--backend``, ``--backend-size`` and ``--encoder``: the similarity backend of the copy
    verdicts (see :func:`backend_options`)."""
    parser.add_argument("--backend", default="pixel",
                        help=f"similarity backend of the {what}: pixel (default), tiled_l2, ssim, "
                             "embedding")
    parser.add_argument("--backend-size", type=int,
                        help="image side the pixel backends compare at (default: the backend's)")
    parser.add_argument("--encoder", metavar="ENC_DIR",
                        help="encoder folder for --backend embedding (from `diffmem embed "
                             "train`)")


def backend_options(args: argparse.Namespace) -> dict:
    """The backend's keyword options from :func:`add_backend`'s flags (those given)."""
    options = {}
    if getattr(args, "backend_size", None) is not None:
        options["size"] = args.backend_size
    if getattr(args, "encoder", None) is not None:
        options["encoder"] = args.encoder
    return options


def add_index(parser: argparse.ArgumentParser) -> None:
    """``--index DIR``: a reference index of the training features (``diffmem index build``)."""
    parser.add_argument("--index", metavar="INDEX_DIR",
                        help="reference index of the training images' features (`diffmem index "
                             "build`, same data and backend settings): reused instead of "
                             "featurizing the training images again")

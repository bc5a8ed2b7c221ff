"""Argument helpers shared by command modules."""

from __future__ import annotations

import argparse


def add_on_error(parser: argparse.ArgumentParser) -> None:
    """``--on-error raise|skip``: stop at the first unreadable record, or skip and count."""
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="'raise' (default) stops at the first unreadable file with an error "
                             "naming it; 'skip' skips such records and prints a summary")


def add_reference(parser: argparse.ArgumentParser, *, without: str = "") -> None:
    """``--reference``, ``--calibration`` and ``--threshold``: the training images copy
    verdicts compare generations with when there is no ``--data``, and how their threshold is
    set (checked by :func:`diffmem.detect.inputs.reference_images` and
    :func:`~diffmem.detect.inputs.heldout_images`). ``without`` ends the ``--reference`` help:
    what the command does without them."""
    parser.add_argument("--reference", metavar="DATA|IMAGE_DIR",
                        help="training images for the copy verdicts when there is no --data: a "
                             "dataset (its train split) or a folder of images (with "
                             f"--calibration DIR or --threshold){without}")
    parser.add_argument("--calibration", metavar="DIR",
                        help="held-out real images (dataset or image folder, never trained on) "
                             "to calibrate the copy threshold on")
    parser.add_argument("--threshold", type=float,
                        help="fixed copy threshold (backend similarity) instead of calibrating "
                             "one")


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

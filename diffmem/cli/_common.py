"""Argument helpers shared by command modules."""

from __future__ import annotations

import argparse


def add_on_error(parser: argparse.ArgumentParser) -> None:
    """``--on-error raise|skip``: stop at the first unreadable record, or skip and count."""
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="'raise' (default) stops at the first unreadable file with an error "
                             "naming it; 'skip' skips such records and prints a summary")

"""``diffmem inspect DATA``: summarise a dataset (counts, prompts, de-identification markers,
duplicates) and optionally draw a grid of each patient's studies."""

from __future__ import annotations

import argparse
import json

from diffmem.cli._common import add_on_error

ORDER = 20


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="summarise a chest X-ray dataset before training on it",
        description="Load a dataset (MIMIC-CXR-JPG or DICOM folder, or a CSV/JSONL manifest), "
                    "decode every image once and print counts, prompt statistics, "
                    "de-identification marker rates and duplicate clusters. Nothing is "
                    "written into DATA.")
    p.add_argument("data", metavar="DATA", help="dataset folder or manifest file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--grid", metavar="PNG", default=None,
                   help="also write a PNG grid of the patients with the most studies "
                        "(outside DATA)")
    p.add_argument("--prompt-section", choices=("impression", "findings", "both", "full"),
                   default="impression",
                   help="report section used as the prompt (default: impression, falling "
                        "back to findings)")
    p.add_argument("--views", default=None, metavar="LIST",
                   help="keep only these view positions, comma-separated (e.g. PA,AP)")
    p.add_argument("--near-threshold", type=float, default=0.1, metavar="D",
                   help="near-duplicate distance on normalised 16 px thumbnails (with "
                        "--index: the index's size) (default 0.1, i.e. correlation >= 0.995)")
    p.add_argument("--index", default=None, metavar="INDEX_DIR",
                   help="a pixel reference index of DATA's training split (`diffmem index "
                        "build --data DATA --out DIR --backend pixel`): near-duplicate "
                        "training images are found through its nearest-neighbour search "
                        "instead of comparing all pairs")
    p.add_argument("--near-k", type=int, default=16, metavar="K",
                   help="with --index: nearest images searched per image (default 16)")
    add_on_error(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from diffmem.data.inspect import format_summary, inspect_dataset

    summary = inspect_dataset(args.data, prompt_section=args.prompt_section, views=args.views,
                              on_error=args.on_error, grid=args.grid,
                              near_threshold=args.near_threshold, index=args.index,
                              near_k=args.near_k)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_summary(summary))
    return 0

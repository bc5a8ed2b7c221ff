"""``diffmem demo``: run the whole product on the embedded default model and data."""

from __future__ import annotations

import argparse

ORDER = 90


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run everything on the embedded default (make demo)",
                       description="Synthesize the demo dataset, inspect it and run the later "
                                   "stages on the embedded default model; writes into --out.")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from diffmem.demo import run_demo

    result = run_demo(args.out)
    print(f"demo finished in {sum(result.seconds.values()):.0f} s; outputs in {result.out}:")
    for name, path in result.artifacts.items():
        print(f"  {name:10s} {path}")
    return 0

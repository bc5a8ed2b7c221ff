"""``diffmem bench SUBCOMMAND``: benchmarks against planted ground truth.

Each subcommand is registered by a function in :data:`SUBCOMMANDS` (``name -> register(sub)``);
add a benchmark by writing one more ``_register_<name>`` function and listing it there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from diffmem.cli._common import add_device, device_options

ORDER = 90


def _register_detect(sub) -> None:
    p = sub.add_parser(
        "detect", help="memorization detector: AUC, TPR@1%%FPR, prompts/s vs the reference",
        description="Build or load a scenario's data and model (synthetic data with planted "
                    "duplicates; the model is trained and cached in $DIFFMEM_CACHE, default "
                    "~/.cache/diffmem, when --model is not given), run `diffmem detect`, and "
                    "print per score AUC and TPR at 1% FPR against the planted labels and "
                    "prompts/second, the copy-verdict rates, and Wen et al.'s reference protocol "
                    "(each prompt alone, 4 generations x 50 DDIM steps) on a subset of the "
                    "prompts with the speed ratio.")
    p.add_argument("--scenario", default="demo",
                   help="scenario name or JSON file (default demo; --list shows them)")
    p.add_argument("--model", help="trained model folder (default: train the scenario's)")
    p.add_argument("--data", help="the scenario's data folder (default: synthesize it)")
    p.add_argument("--out", help="folder for the run's files (default: in the cache)")
    p.add_argument("--reference-prompts", type=int,
                   help="prompts the reference protocol runs on (default: the scenario's; 0 "
                        "skips it)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's choice; 1 is often much faster on a "
                        "machine shared with other jobs)")
    add_device(p)
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.set_defaults(handler=_run_detect)


def _run_detect(args: argparse.Namespace) -> int:
    from diffmem.detect.bench import (
        bench_detect,
        format_bench,
        list_scenarios,
        load_scenario,
    )

    if args.list:
        for name in list_scenarios():
            print(f"{name:10s} {load_scenario(name).description}")
        return 0
    result = bench_detect(args.scenario, model=args.model, data=args.data, out=args.out,
                          reference_prompts=args.reference_prompts, threads=args.threads,
                          **device_options(args))
    print(format_bench(result))
    return 0


#: Benchmark subcommands: name -> function adding its parser to the ``bench`` subparsers.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "detect": _register_detect,
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmarks against planted ground truth (bench detect, ...)",
        description="Benchmarks on synthetic data with planted memorization; each subcommand "
                    "prints its numbers with the machine, seeds and sizes.")
    p.set_defaults(handler=_no_subcommand, _parser=p)
    sub = p.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    for register_one in SUBCOMMANDS.values():
        register_one(sub)


def _no_subcommand(args: argparse.Namespace) -> int:
    args._parser.print_help()
    return 2

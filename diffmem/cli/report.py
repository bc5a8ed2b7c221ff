"""``diffmem report``: the privacy report (report.html + report.json) from the results of the
other commands."""

from __future__ import annotations

import argparse

from diffmem.cli._common import add_device

ORDER = 90


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="write the privacy report (report.html, report.json) from results",
        description="Read the results of diffmem detect, scan, mitigate and study and write "
                    "OUT/report.html (one self-contained file: figures embedded, no network "
                    "requests) and OUT/report.json (the same facts). The report runs no model: "
                    "it fingerprints --model and --data and refuses results computed on "
                    "others. A section whose results are missing says what to run.")
    p.add_argument("--model", required=True, help="model folder the results were computed on")
    p.add_argument("--data",
                   help="its training data (dataset or manifest). Optional: without it the "
                        "report leaves out the dataset section and the training images beside "
                        "copies, and says so")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (new, empty, or a previous report's)")
    p.add_argument("--results", metavar="DIR",
                   help="a folder laid out like `diffmem demo --out DIR` writes it (detect/, "
                        "scan/, mitigate/, study/<name>/); the flags below override its parts")
    p.add_argument("--detect", metavar="DIR", help="the --out folder of `diffmem detect`")
    p.add_argument("--scan", metavar="DIR", help="the --out folder of `diffmem scan`")
    p.add_argument("--mitigate", metavar="DIR", help="the --out folder of `diffmem mitigate`")
    p.add_argument("--study", metavar="DIR", nargs="+", action="extend", default=[],
                   help="--out folders of `diffmem study` runs (one or more)")
    p.add_argument("--reid-eval", metavar="FILE",
                   help="reid_eval.json of `diffmem reid eval` for the re-ID model of the "
                        "detection (default: RESULTS/reid/reid_eval.json when it exists)")
    p.add_argument("--clipmem", metavar="DIR",
                   help="the --out folder of `diffmem clipmem` (image-report encoder "
                        "memorization; default: RESULTS/clipmem when it holds a summary.json)")
    images = p.add_mutually_exclusive_group()
    images.add_argument("--no-images", dest="images", action="store_const", const="omit",
                        help="leave every patient image out: no training image and no "
                             "generation flagged as a copy of one is in the file")
    images.add_argument("--blur-images", dest="images", action="store_const", const="blur",
                        help="blur training images and the generations that copy them")
    p.set_defaults(images="include")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing folder that is not a previous report (only "
                        "report.html and report.json are written there)")
    add_device(p, device=False)  # the fingerprint depends on the precision the results used
    p.set_defaults(handler=run)


def command_line(args: argparse.Namespace) -> list[str]:
    """The ``diffmem report`` command line of parsed ``args`` (recorded in the report)."""
    cmd = ["diffmem", "report", "--model", str(args.model)]
    cmd += ["--data", str(args.data)] if args.data is not None else []
    cmd += ["--out", str(args.out)]
    for flag in ("results", "detect", "scan", "mitigate", "reid_eval", "clipmem"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for study in args.study:
        cmd += ["--study", str(study)]
    cmd += {"omit": ["--no-images"], "blur": ["--blur-images"]}.get(args.images, [])
    cmd += ["--dtype", args.dtype] if args.dtype is not None else []
    return cmd + (["--overwrite"] if args.overwrite else [])


def run(args: argparse.Namespace) -> int:
    from diffmem.report import build_report

    result = build_report(args.out, model=args.model, data=args.data, detect=args.detect,
                          scan=args.scan, mitigate=args.mitigate, studies=args.study,
                          images=args.images, overwrite=args.overwrite, results=args.results,
                          command=command_line(args), dtype=args.dtype,
                          reid_eval=args.reid_eval, clipmem=args.clipmem)
    missing = [k for k, v in result.sections.items() if v != "included"]
    print(f"risk level: {result.risk}")
    for what in result.not_measured:
        print(f"not measured: {what}")
    if missing:
        print(f"sections without results: {', '.join(missing)} (the report says what to run)")
    print(f"report: {result.html}")
    print(f"facts:  {result.json}")
    return 0

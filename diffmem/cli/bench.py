"""``diffmem bench SUBCOMMAND``: benchmarks against planted ground truth.

Each subcommand is registered by a function in :data:`SUBCOMMANDS` (``name -> register(sub)``);
add a benchmark by writing one more ``_register_<name>`` function and listing it there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from diffmem.cli._common import add_device, device_options, no_subcommand

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


def _register_device(sub) -> None:
    p = sub.add_parser(
        "device", help="GPU check: stage-1 prompts/s, stage-2 images/s, peak memory",
        description="Build a Stable Diffusion model from configs (--size sd15: SD 1.5's "
                    "topology, ~1.07B parameters, 512 px, needs CUDA; --size small: a CPU "
                    "smoke test), random weights, nothing downloaded; time the detector's "
                    "stage 1 (first-step noise magnitude of every prompt, batched) and stage 2 "
                    "(full DDIM generations decoded by the VAE) on --device in --dtype (default "
                    "float16 on CUDA), with stage 1 in float32 as the baseline of the same run; "
                    "print prompts/s, images/s and peak GPU memory with seed, sizes and machine.")
    p.add_argument("--size", default="sd15", help="sd15 (default; CUDA) or small")
    add_device(p)
    p.add_argument("--prompts", type=int, default=256, help="stage-1 prompts (default 256)")
    p.add_argument("--images", type=int, default=8, help="stage-2 images (default 8)")
    p.add_argument("--steps", type=int, default=50, help="stage-2 DDIM steps (default 50)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per UNet call (16)")
    p.add_argument("--baseline-prompts", type=int, default=32,
                   help="prompts of the float32 stage-1 baseline (default 32; 0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE.json", help="also write the numbers as JSON")
    p.set_defaults(handler=_run_device)


def _run_device(args: argparse.Namespace) -> int:
    from diffmem.detect.bench_device import bench_device, format_device_bench

    result = bench_device(size=args.size, **device_options(args), prompts=args.prompts,
                          images=args.images, steps=args.steps, batch_size=args.batch_size,
                          baseline_prompts=args.baseline_prompts, seed=args.seed)
    return _emit(format_device_bench(result), result, args.out)


def _register_scale(sub) -> None:
    p = sub.add_parser(
        "scale", help="how the model-free prompt scan's cost grows with the prompt count",
        description="Write synthetic MIMIC-style prompts files (planted exact and near-duplicate "
                    "clusters; --seed fixes them) of each size and, each in a fresh process, "
                    "time a streamed read of the file (the baseline, same run) and the "
                    "model-free `diffmem scan` computation: wall and CPU seconds, peak RSS, the "
                    "scan/baseline ratio, and the growth exponents fitted on log-log. Prints "
                    "seed, sizes and machine.")
    p.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                   help="prompt counts (default 2000 10000 50000; e.g. add 250000 for the "
                        "issue-13 target, about a minute and a few hundred MB more)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--out", metavar="FILE.json", help="also write the numbers as JSON")
    p.set_defaults(handler=_run_scale)


def _run_scale(args: argparse.Namespace) -> int:
    from diffmem.attribution.bench_scale import DEFAULT_SIZES, bench_scale, format_scale_bench

    result = bench_scale(args.sizes or DEFAULT_SIZES, seed=args.seed)
    return _emit(format_scale_bench(result), result, args.out)


def _register_index(sub) -> None:
    p = sub.add_parser(
        "index", help="reference index at scale: build, peak RSS, queries/s vs brute force",
        description="Write synthetic float32 feature vectors (a seeded Gaussian mixture, "
                    "L2-normalized: structure designed in; --data uniform for IVF's worst case) "
                    "as a reference index folder, complete it with the index build code "
                    "(approximate FAISS IVF, nprobe chosen for recall@1 >= 0.99), then, each "
                    "in a fresh process with one thread: build seconds and peak RSS; top-1 "
                    "queries/s, peak RSS and recall@1 of brute-force NumPy (the baseline, same "
                    "run), the blocked exact search, FAISS flat and FAISS IVF, with the ratio "
                    "to the baseline. Prints seed, sizes and machine.")
    p.add_argument("--rows", type=int, default=400_000,
                   help="indexed vectors (default 400000; about 5-10 minutes on 2 cores)")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (default 512)")
    p.add_argument("--queries", type=int, default=1000, help="query vectors (default 1000)")
    p.add_argument("--clusters", type=int, default=1000,
                   help="Gaussian mixture components (default 1000)")
    p.add_argument("--data", choices=("gmm", "uniform"), default="gmm",
                   help="gmm (default: clustered, like embeddings) or uniform on the sphere")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, queries and build")
    p.add_argument("--out", metavar="FILE.json", help="also write the numbers as JSON")
    p.set_defaults(handler=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from diffmem.detect.bench_index import bench_index, format_index_bench

    result = bench_index(args.rows, args.dim, queries=args.queries, seed=args.seed,
                         clusters=args.clusters, data=args.data)
    return _emit(format_index_bench(result), result, args.out)


#: Benchmark subcommands: name -> function adding its parser to the ``bench`` subparsers.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "detect": _register_detect,
    "device": _register_device,
    "index": _register_index,
    "scale": _register_scale,
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmarks against planted ground truth (bench detect, ...)",
        description="Benchmarks on synthetic data with planted memorization; each subcommand "
                    "prints its numbers with the machine, seeds and sizes.")
    p.set_defaults(handler=no_subcommand, _parser=p)
    sub = p.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    for register_one in SUBCOMMANDS.values():
        register_one(sub)


def _emit(text: str, result, out: str | None) -> int:
    """Print a bench's table and, with ``--out``, write its numbers as JSON."""
    from diffmem.utils import write_json

    print(text)
    if out is not None:
        write_json(out, result.to_dict())
    return 0

"""``diffmem mitigate``: what does each inference-time mitigation buy, and what does it cost?"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from diffmem.errors import ConfigError

from diffmem.cli._common import add_device, add_index, add_reference, device_options

ORDER = 60


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "mitigate", help="compare inference-time mitigations: memorization vs utility",
        description="For the model's memorized prompts (from --detect DIR, or detected here) "
                    "and a control set of non-memorized prompts, generate with each mitigation "
                    "at each strength and measure the memorization rate (calibrated copy "
                    "verdicts), nearest similarity and noise magnitude against utility "
                    "(in-domain Fréchet distance to held-out images and prompt-image alignment "
                    "with the in-domain encoder; seconds per image). Without --data: the "
                    "prompts of --prompts FILE, memorization as noise magnitude unless "
                    "--reference gives copy verdicts; summary.json lists what could not be "
                    "measured. Writes OUT/mitigations.csv, summary.json, pareto.png and "
                    "results.sqlite (run again to resume).")
    p.add_argument("--model", help="model folder (diffusers pipeline); required unless --list")
    p.add_argument("--data",
                   help="the model's training data (dataset folder): its train split is the "
                        "copy reference, its validate/test splits calibrate and are the real "
                        "images of the Fréchet distance. Optional: see --prompts")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompts to choose the memorized and control sets from: one per line, "
                        "or a .csv/.jsonl table with a 'prompt' column (default: the training "
                        "prompts of --data)")
    add_reference(p, without="; without them memorization is the noise magnitude. Without "
                             "--data, --calibration's images are also the real images of the "
                             "Fréchet distance")
    p.add_argument("--out", metavar="DIR", help="output folder (outside the data); required "
                                                "unless --list")
    p.add_argument("--methods", default="all",
                   help="'all' (default) or comma-separated names; --list shows them")
    p.add_argument("--strengths", nargs="+", metavar="SPEC",
                   help="'default' (each method's paper value), values for every method "
                        "(0.1,0.5) or NAME=VALUES items (guidance_delay=0.3,0.5)")
    p.add_argument("--detect", metavar="DETECT_DIR",
                   help="reuse a `diffmem detect` run's verdicts and threshold (a run "
                        "without nn: its prompts ranked by noise magnitude)")
    p.add_argument("--encoder", metavar="ENC_DIR",
                   help="in-domain encoder (`diffmem embed train`); default: the embedded one, "
                        "for models trained on `diffmem synth --preset demo --seed 0`. Without "
                        "--data and without an encoder, utility is not measured (said in the "
                        "output)")
    p.add_argument("--n-prompts", type=int, default=8, help="prompts per set (default 8)")
    p.add_argument("--generations", type=int, default=2,
                   help="images per prompt and configuration (default 2)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="generations per UNet call")
    p.add_argument("--backend", default="pixel",
                   help="similarity backend of the copy verdicts when detecting here")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="false-positive rate of the copy threshold calibrated here")
    p.add_argument("--utility", default=None, choices=("fid_in_domain", "alignment"),
                   help="utility axis of the Pareto front (default: fid_in_domain when there are "
                        "held-out real images, else alignment)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes that generate the configurations (default 1); each opens "
                        "the model folder and takes whole (method, strength, set) units, with "
                        "the CPU threads divided among them (or --threads each). Same result "
                        "as one process")
    add_device(p)
    add_index(p)
    p.add_argument("--reid", nargs="?", const="", metavar="REID_DIR",
                   help="also measure the re-identification rate beside the copy rate "
                        "(a re-ID model folder, default: the embedded one)")
    p.add_argument("--reid-threshold", type=float,
                   help="fixed re-ID threshold (cosine) instead of calibrating one at --fpr on "
                        "held-out patients")
    p.add_argument("--list", action="store_true", help="list the mitigations and exit")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from diffmem.mitigate import get_mitigation, list_mitigations

    if args.list:
        for name in list_mitigations():
            m = get_mitigation(name)
            lo, hi = m.strength_range
            print(f"{name:32s} default {m.default_strength:g} in [{lo:g}, {hi:g}]: "
                  f"{m.strength} ({m.paper.split(',')[0]})")
        return 0
    missing = [f"--{name}" for name in ("model", "out") if getattr(args, name) is None]
    if missing:
        print(f"diffmem mitigate: error: the following arguments are required: "
              f"{', '.join(missing)} (or pass --list)", file=sys.stderr)
        return 2
    from diffmem.mitigate.compare import compare_mitigations

    result = compare_mitigations(
        args.model, args.data, args.out, methods=args.methods,
        strengths=parse_strengths(args.strengths), detect_dir=args.detect, encoder=args.encoder,
        prompts=args.prompts, reference=args.reference, calibration=args.calibration,
        n_prompts=args.n_prompts, generations=args.generations, steps=args.steps,
        guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
        backend=args.backend, fpr=args.fpr, threshold=args.threshold, utility=args.utility,
        reid=args.reid is not None, reid_model=args.reid or None,
        reid_threshold=args.reid_threshold, workers=args.workers, threads=args.threads,
        command=["diffmem", *sys.argv[1:]], index=args.index, **device_options(args))
    print(format_summary(result))
    return 0


def parse_strengths(specs: Sequence[str] | str | None,
                    ) -> Mapping[str, list[float]] | list[float] | None:
    """Parse the CLI's ``--strengths``: ``default``; ``0.1,0.5`` (for every method); or
    ``NAME=0.1,0.5`` items (per method, several allowed).

    Examples
    --------
    >>> parse_strengths(["0.1,0.2"])
    [0.1, 0.2]
    >>> parse_strengths(["guidance_delay=0.3,0.5", "opposite_guidance=0.35"])
    {'guidance_delay': [0.3, 0.5], 'opposite_guidance': [0.35]}
    """
    if specs is None:
        return None
    if isinstance(specs, str):
        specs = [specs]
    specs = [s for spec in specs for s in spec.split() if s]
    if not specs or specs == ["default"]:
        return None

    def numbers(text: str, where: str) -> list[float]:
        try:
            return [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--strengths {where!r}: not a comma-separated list of numbers; "
                              "use e.g. 0.1,0.5 or NAME=0.1,0.5") from None

    if all("=" not in s for s in specs):
        return [v for s in specs for v in numbers(s, s)]
    if any("=" not in s for s in specs):
        raise ConfigError(f"--strengths {' '.join(specs)!r} mixes NAME=VALUES items with bare "
                          "values; use one form")
    table: dict[str, list[float]] = {}
    for s in specs:
        name, _, values = s.partition("=")
        table.setdefault(name.strip(), []).extend(numbers(values, s))
    return table


def format_summary(result) -> str:
    """The table and the verdict, for the terminal (``-`` for what was not measured)."""
    def num(value, width, digits):
        return f"{'-' if value is None else f'{value:.{digits}f}':>{width}s}"

    reid = result.reid_threshold is not None
    lines = [f"{'method':32s} {'strength':>8s} {'set':9s} {'mem.rate':>8s} "
             + (f"{'reid.rate':>9s} {'own.reid':>8s} " if reid else "") + f"{'nn sim':>7s} "
             f"{'noise':>7s} {'FID(in)':>8s} {'align':>6s} {'s/img':>6s}"]
    for r in result.rows:
        lines.append(f"{r['method']:32s} {r['strength']:8g} {r['prompt_set']:9s} "
                     f"{num(r['memorization_rate'], 8, 2)} "
                     + (f"{num(r['reid_rate'], 9, 2)} {num(r['reid_rate_own'], 8, 2)} "
                        if reid else "")
                     + f"{num(r['mean_nn_similarity'], 7, 3)} "
                     f"{num(r['noise_magnitude'], 7, 3)} {num(r['fid_in_domain'], 8, 3)} "
                     f"{num(r['alignment'], 6, 3)} {num(r['seconds_per_image'], 6, 3)}"
                     f"{'  *' if r['pareto'] else ''}")
    if result.config.utility is not None:
        lines.append(f"Pareto front (* above): {', '.join(result.pareto_front)}")
    lines.append(f"recommended: {result.recommended or 'none'} ({result.recommendation_reason})")
    for n in result.notes:
        lines.append(f"note: {n}")
    for n in result.not_measured:
        lines.append(f"not measured: {n}")
    if result.out is not None:
        lines.append(f"results: {result.out / 'mitigations.csv'}"
                     + (f", {result.files['pareto']}" if result.files.get("pareto") else ""))
    return "\n".join(lines)

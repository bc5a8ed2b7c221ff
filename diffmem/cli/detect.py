"""``diffmem detect``: which prompts make a model reproduce a training image?"""

from __future__ import annotations

import argparse
import os

from diffmem.cli._common import (
    add_backend,
    add_device,
    add_index,
    add_reference,
    backend_options,
    device_options,
)

ORDER = 40


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "detect", help="scan prompts for memorization (noise magnitude, attention, copies)",
        description="Score every prompt (Wen et al.'s noise magnitude, Ren et al.'s attention "
                    "entropy), generate seeded images and compare them with the training images "
                    "(copy threshold calibrated on held-out images at --fpr). Writes "
                    "OUT/scores.csv, copies.csv, summary.json, results.sqlite (resumable: run "
                    "again to finish an interrupted scan) and PNG figures. Several processes: "
                    "accelerate launch [--multi_gpu] --num_processes N -m diffmem detect ...")
    p.add_argument("--model", required=True, help="model folder (diffusers pipeline)")
    p.add_argument("--data",
                   help="the training data (dataset folder or manifest); its validate/test "
                        "splits calibrate the copy threshold. Optional: --prompts FILE with "
                        "--methods noise,attention needs no images")
    add_reference(p, without="; needed by --methods nn only")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (outside the data)")
    p.add_argument("--prompts", metavar="FILE",
                   help="prompts to scan: one per line, or a .csv/.jsonl table with a 'prompt' "
                        "column (default: the training split's unique prompts)")
    p.add_argument("--ground-truth", metavar="FILE",
                   help="labels to score the detection against (AUC, TPR at 1%% FPR): a CSV "
                        "with a key column (study_id or dicom_id, with --data; or prompt) and a "
                        "0/1 column (memorized, label or planted). Default: DATA/ground_truth.csv "
                        "when it has that shape")
    p.add_argument("--methods", default="noise,attention,nn",
                   help="comma-separated: noise, attention, nn, reid (default noise,attention,"
                        "nn; reid matches each nn generation to its most similar training "
                        "patient: writes reidentified.csv)")
    p.add_argument("--reid", metavar="REID_DIR",
                   help="re-ID model folder for --methods ...,reid (from `diffmem reid train`; "
                        "default: the embedded one)")
    p.add_argument("--reid-threshold", type=float,
                   help="fixed re-ID threshold (cosine) instead of calibrating one at --fpr on "
                        "held-out patients")
    p.add_argument("--patient-from", metavar="COLUMN",
                   help="column of the records (manifest or metadata table) holding the "
                        "patient id, for data without a patient_id column (re-ID)")
    p.add_argument("--generations", type=int, default=1,
                   help="seeded noises per prompt for the noise/attention scores (default 1)")
    p.add_argument("--steps", type=int, default=1,
                   help="first sampling steps the noise/attention scores average (default 1)")
    p.add_argument("--num-inference-steps", type=int, default=50,
                   help="DDIM schedule length the score steps come from (default 50)")
    p.add_argument("--nn-generations", type=int, default=2,
                   help="images generated per prompt for the copy verdicts (default 2)")
    p.add_argument("--sample-steps", type=int, default=25,
                   help="DDIM steps of those images (default 25)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale (default: the pipeline's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="generations per UNet call")
    add_backend(p)
    add_index(p)
    p.add_argument("--fpr", type=float, default=0.01,
                   help="false-positive rate of the copy threshold (default 0.01)")
    p.add_argument("--unconditional", type=int, default=16,
                   help="generations from the empty prompt (default 16; 0 = none)")
    p.add_argument("--unrelated", type=int, default=8,
                   help="held-out prompts to generate from (default 8; 0 = none)")
    p.add_argument("--confirm", choices=("screen", "all"), default="screen",
                   help="screen (default): two-stage: generate images only for prompts the "
                        "noise screen flags, a seeded audit sample of the rest (a stated bound "
                        "on missed copies; widens to every prompt when it finds one), the empty "
                        "and unrelated prompts. all: generate for every prompt")
    p.add_argument("--audit", type=int,
                   help="unflagged prompts audited by generation in a two-stage run (default "
                        "19: no copy found bounds the missed-copy rate by 15%% at 95%% "
                        "confidence; 29: 10%%, 59: 5%%)")
    p.add_argument("--screen-k", type=float, default=3.5,
                   help="noise screen cut: modified z-score (median/MAD) above which a prompt "
                        "is flagged (default 3.5)")
    p.add_argument("--chunk-size", type=int, default=64,
                   help="prompts per commit to the results store (default 64)")
    p.add_argument("--threads", type=int,
                   help="torch threads per process (default: torch's choice; 1 is often much "
                        "faster on a machine shared with other jobs)")
    add_device(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from diffmem.detect.detector import DetectionConfig, detect

    device = device_options(args)
    options = backend_options(args)
    config = DetectionConfig(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        generations=args.generations, steps=args.steps,
        num_inference_steps=args.num_inference_steps, nn_generations=args.nn_generations,
        sample_steps=args.sample_steps, guidance=args.guidance, seed=args.seed,
        batch_size=args.batch_size, backend=args.backend, backend_options=options,
        fpr=args.fpr, threshold=args.threshold, unconditional=args.unconditional,
        unrelated=args.unrelated, chunk_size=args.chunk_size, threads=args.threads,
        confirm=args.confirm, audit=args.audit, screen_k=args.screen_k,
        reid_model=args.reid, reid_threshold=args.reid_threshold,
        patient_from=args.patient_from)
    import sys

    result = detect(args.model, args.data, args.out, config=config, prompts=args.prompts,
                    calibration=args.calibration, reference=args.reference,
                    ground_truth=args.ground_truth, index=args.index,
                    command=["diffmem", *sys.argv[1:]], **device)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(format_summary(result))
    return 0


def format_summary(result) -> str:
    """A few lines for the terminal: counts, threshold, evaluation, files."""
    lines = []
    main = result.of_kind("train", "prompt")
    lines.append(f"scanned {len(main)} prompt(s) with {', '.join(result.config.methods)} "
                 f"({result.world_size} process(es))")
    if result.threshold is not None:
        t = result.threshold
        how = (f"calibrated on {t.n} held-out image(s) at FPR {t.fpr:g}" if t.fpr is not None
               else "fixed")
        lines.append(f"copy threshold: {t.value:.4f} ({result.config.backend} similarity, {how})")
        flagged = [p for p in main if p.memorized]
        confirmed = sum(p.memorized is not None for p in main)
        lines.append(f"memorized prompts: {len(flagged)} of {len(main)}"
                     + (f" ({confirmed} confirmed by generation)" if confirmed < len(main)
                        else ""))
        if result.screen is not None:
            s = result.screen
            if s.policy != "all":
                lines.append(f"two-stage: {len(s.flagged)} flagged by the noise screen, audit "
                             f"of {len(s.audit)} unflagged; {s.statement()}")
        for kind in ("unrelated", "unconditional"):
            r = result.rates.get(kind)
            if r:
                lines.append(f"copies from {kind} prompts: {r['copies']} of {r['generations']} "
                             f"generation(s)" + (f" (studies {', '.join(r['copied_studies'][:5])})"
                                                 if r["copies"] else ""))
    if result.labels is not None and result.evaluations:
        lines.append(f"scored against {result.labels.get('file') or 'the given labels'} "
                     f"({result.labels['key']} -> {result.labels['column']})")
    counts = result.reid_counts()
    if counts is not None:
        t = result.reid["threshold"]
        how = (f"calibrated on {t.n} held-out patient image(s) at FPR {t.fpr:g}"
               if t.fpr is not None else "fixed")
        lines.append(f"re-ID threshold: {t.value:.4f} (cosine, {how})")
        lines.append(f"re-ID: {counts['leaks']} of {counts['generations']} generation(s) "
                     f"re-identify a training patient ({counts['leaks_not_copies']} of them not "
                     f"pixel copies; {counts['copies']} pixel copies); "
                     f"{len(counts['patients'])} patient(s); patient-leaking prompts: "
                     + ", ".join(f"{k} {v}" for k, v in counts["leaking_prompts"].items()))
        judged = {k: n for k, n in counts["own_patient_judged"].items() if n}
        if judged:
            lines.append("re-ID of the prompt's own patient: " + ", ".join(
                f"{k} {counts['own_patient_prompts'][k]} of {n} prompt(s)"
                for k, n in judged.items()))
    for name, ev in result.evaluations.items():
        lines.append(f"{name:18s} AUC {ev.auc:.3f}  TPR@1%FPR {ev.tpr_at_1pct_fpr:.3f}  "
                     f"(memorized {ev.n_pos}, not {ev.n_neg})")
    for key in ("planted", "not_planted"):
        r = result.rates.get(key)
        if r:
            lines.append(f"nn verdicts, {key.replace('_', ' ')}: {r['memorized']}/{r['prompts']} "
                         f"flagged ({r['rate']:.1%}); ratio criterion {r['ratio_criterion']}")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    if result.out is not None:
        lines.append(f"results: {result.out / 'scores.csv'}")
    return "\n".join(lines)

"""``diffmem study toy|lr|train-mitigations|checkpoints|lora|prune``: training studies of
memorization."""

from __future__ import annotations

import argparse
import json
import sys

from diffmem.cli._common import add_device, add_index, device_options, no_subcommand

ORDER = 70


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. "
                                         "0.05,0.1,0.5,2.0") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _measure_args(p: argparse.ArgumentParser, checkpoint_every: int | None = 100,
                  checkpoint_help: str | None = "trainer checkpoint interval, for resuming killed "
                                                "runs (100)") -> None:
    """The measurement options (and ``--checkpoint-every``, unless ``checkpoint_help`` is None:
    a study that trains nothing)."""
    p.add_argument("--encoder", metavar="ENC_DIR",
                   help="in-domain encoder for the FID (default: the embedded one, when shipped)")
    p.add_argument("--controls", type=int, default=20,
                   help="non-planted training prompts scanned besides the planted ones (20)")
    p.add_argument("--nn-generations", type=int, default=4,
                   help="generations per prompt for the copy verdicts (4)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per generation (25)")
    p.add_argument("--fid-images", type=int,
                   help="held-out records generated for the FID (default: all)")
    if checkpoint_help is not None:
        p.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                       help=checkpoint_help)
    add_index(p)
    add_device(p)  # measurement only: training runs where accelerate puts it


def _cxr_study(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A CXR study's parser with its ``--data`` and ``--out``."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--data", required=True, help="dataset with ground_truth.csv (diffmem synth)")
    p.add_argument("--out", required=True, metavar="DIR")
    return p


def _trainer_args(p: argparse.ArgumentParser, which: str = "", *, seeds: bool = False) -> None:
    """Trainer settings shared by the studies that train with one setting per run; with
    ``seeds``, ``--seeds`` (and ``--seed`` as its one-seed synonym)."""
    p.add_argument("--preset", default="demo", help=f"model preset{which} (default demo)")
    p.add_argument("--steps", type=int, help=f"training steps{which} (default: the preset's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    if seeds:
        _seed_args(p)
    else:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int)


def _seed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", help="comma-separated trainer seeds, each setting trained once "
                                   "per seed and reported as mean and 95%% CI (default 0,1,2)")
    p.add_argument("--seed", type=int, help="one seed (the same as --seeds N)")


def _seeds(args: argparse.Namespace) -> str | list[int]:
    """``--seeds``, or ``--seed`` as one seed, or the default; both given is an error."""
    from diffmem.errors import ConfigError
    from diffmem.study.seeds import DEFAULT_SEEDS

    if args.seeds is not None and args.seed is not None:
        raise ConfigError(f"both --seeds {args.seeds} and --seed {args.seed} given; use "
                          "--seeds alone (e.g. --seeds 0,1,2; --seed N means --seeds N)")
    if args.seed is not None:
        return [args.seed]
    return args.seeds if args.seeds is not None else list(DEFAULT_SEEDS)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="training studies: score-matching toy, learning rate, training "
                      "mitigations, checkpoints, LoRA, pruning and NeMo",
        description="Training-time studies of memorization. Each writes OUT/study.json, "
                    "summary.json, a CSV and PNG figures; lr, train-mitigations and lora train "
                    "one model per setting and seed under OUT/runs/ (re-running skips finished "
                    "runs and resumes killed ones) and report mean and 95% CI over the seeds.")
    p.set_defaults(handler=no_subcommand, _parser=p)
    sub = p.add_subparsers(dest="study_command", metavar="STUDY")

    t = sub.add_parser("toy", help="Wu et al. (COLT 2025) score-matching toy in 1-D or 2-D",
                       description="Two-layer ReLU score networks trained by SGD at several "
                                   "learning rates (steps = flow_time / lr), sampled, and "
                                   "compared with the empirical optimal score (MMD, fraction "
                                   "near a training point, Gu et al.'s ratio).")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--dim", type=int, default=1, choices=(1, 2))
    t.add_argument("--lrs", type=_floats, default=[0.05, 0.1, 0.5, 1.0, 2.0],
                   help="comma-separated SGD learning rates (default 0.05,0.1,0.5,1,2)")
    t.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    t.add_argument("--repeats", type=int, default=3,
                   help="seeds seed..seed+repeats-1, each its own training set (default 3)")
    t.add_argument("--flow-time", type=float, help="lr x steps of every run (default 3000)")
    t.set_defaults(handler=run_toy)

    lr = _cxr_study(sub, "lr", "learning-rate sweep of a CXR diffusion model",
                    "Train one model per learning rate and measure copies of the prompt's own "
                    "image, copies of any training image (also from empty and unrelated "
                    "prompts), the noise-magnitude AUC and the in-domain FID.")
    lr.add_argument("--lrs", type=_floats, required=True, help="comma-separated learning rates")
    lr.add_argument("--preset", default="demo", help="model preset (default demo)")
    lr.add_argument("--steps", type=int, help="steps at the preset's lr (default: the preset's)")
    lr.add_argument("--schedule", default="samples", choices=("samples", "inverse-lr"),
                    help="samples: same steps for every lr (default); inverse-lr: steps x "
                         "preset_lr / lr (Wu et al.'s 1/lr rule)")
    _seed_args(lr)
    lr.add_argument("--batch-size", type=int)
    lr.add_argument("--no-embedded", action="store_true",
                    help="retrain the baseline even when the embedded default model is that run")
    lr.add_argument("--no-matched-loss", action="store_true",
                    help="skip the measurement at matched training loss (keeps the trainer's "
                         "default two checkpoints per run instead of all)")
    _measure_args(lr)
    lr.set_defaults(handler=run_lr)

    m = _cxr_study(sub, "train-mitigations", "training-time mitigations, measured",
                   "Train one model per mitigation (none, caption_randomization, "
                   "deid_randomization, loss_filter, dedup) with the same settings and measure "
                   "each like `study lr`.")
    m.add_argument("--methods", type=_names,
                   default=["none", "caption_randomization", "deid_randomization",
                            "loss_filter", "dedup"],
                   help="comma-separated (default: none and all four)")
    m.add_argument("--options", type=json.loads, default=None,
                   help='JSON: {"loss_filter": {"tau": 2.0}, "caption_randomization": '
                        '{"p": 0.1, "mode": "add"}}')
    _trainer_args(m, seeds=True)
    _measure_args(m)
    m.set_defaults(handler=run_mitigations)

    c = _cxr_study(sub, "checkpoints", "memorization over training, with a stopping step",
                   "Measure copies (own image, any image, empty and unrelated prompts), the "
                   "noise-magnitude AUC, skew and the in-domain FID at every checkpoint of one "
                   "training run per seed (mean and 95% t-interval over the seeds at each "
                   "step), and recommend the last checkpoint before copying begins, on the "
                   "mean copy rates.")
    c.add_argument("--model-run", metavar="RUN",
                   help="a finished `diffmem train` folder that kept its checkpoints "
                        "(--keep-checkpoints), measured alone (one seed); default: train "
                        "one per seed under OUT/runs/main-s<seed>")
    _trainer_args(c, " of the runs trained here", seeds=True)
    c.add_argument("--tolerance", type=float, default=0.0,
                   help="copy rate still counted as 'not copying' (0)")
    _measure_args(c, None, "checkpoint interval of the run trained here (default: a tenth "
                           "of its steps; every checkpoint is kept)")
    c.set_defaults(handler=run_checkpoints)
    _lora_parser(sub)
    _prune_parser(sub)


def _prune_parser(sub) -> None:
    pr = _cxr_study(sub, "prune", "magnitude pruning and NeMo neuron deactivation of a model",
                    "Apply magnitude pruning of the cross-attention projections at each ratio "
                    "and NeMo's memorization-neuron deactivation (neurons localized on the "
                    "planted prompts) at each strength to a trained model, through the "
                    "mitigation registry `diffmem mitigate` uses, and measure each like the "
                    "other studies; marks the Pareto front of any-image copies against the "
                    "in-domain FID. Ratio 0 / strength 0 is the plain model. Each setting "
                    "is measured once per --seeds seed (generation noise only: one model) and "
                    "reported as mean and 95% t-interval; the front uses the means.")
    pr.add_argument("--model", required=True, metavar="MODEL_DIR",
                    help="trained model folder (diffmem train)")
    pr.add_argument("--ratios", default="0,0.1,0.3,0.5,0.7",
                    help="comma-separated pruning ratios in [0, 0.99] (default "
                         "0,0.1,0.3,0.5,0.7)")
    pr.add_argument("--nemo", default="0,0.5,1",
                    help="comma-separated NeMo strengths in [0, 1], 1 = deactivated (default "
                         "0,0.5,1)")
    pr.add_argument("--projections", type=_names,
                    help="cross-attention projections pruned (default to_k,to_v)")
    pr.add_argument("--seeds", default="0,1,2",
                    help="comma-separated measurement seeds: each setting is measured once per "
                         "seed (generation noise only, one model) and reported as mean and 95%% "
                         "t-interval (default 0,1,2)")
    _measure_args(pr, checkpoint_help=None)
    pr.set_defaults(handler=run_prune)


def _lora_parser(sub) -> None:
    lo = _cxr_study(sub, "lora", "full fine-tuning vs LoRA (peft) at several ranks, over seeds",
                    "Pretrain a base model on one population, fine-tune it on --data (with "
                    "planted duplicates) fully and with LoRA adapters on the UNet's attention "
                    "projections at each rank, for each seed, and measure own-image and "
                    "any-image copies, the in-domain FID, trainable parameters and seconds "
                    "(mean and 95% t-interval over the seeds).")
    lo.add_argument("--base-data", metavar="DIR",
                    help="pretraining dataset (default: synthesized into OUT/base-data with "
                         "--data's synthesis settings, seed + 1, no planted clusters)")
    lo.add_argument("--ranks", default="4,16,64",
                    help="comma-separated LoRA ranks, positive integers (default 4,16,64)")
    lo.add_argument("--seeds", default="0,1,2",
                    help="comma-separated fine-tuning seeds (default 0,1,2)")
    lo.add_argument("--preset", default="demo", help="model preset (default demo)")
    lo.add_argument("--steps", type=int, help="fine-tuning steps (default: the preset's)")
    lo.add_argument("--base-steps", type=int, help="pretraining steps (default: the preset's)")
    lo.add_argument("--lr", type=float,
                    help="learning rate of the base and the full fine-tuning (default: the "
                         "preset's)")
    lo.add_argument("--lora-lr", type=float,
                    help="learning rate of the LoRA runs (default: 10 x --lr, the ratio of "
                         "diffusers' LoRA (1e-4) and full (1e-5) fine-tuning examples: LoRA "
                         "starts from a zero update)")
    lo.add_argument("--lora-text-encoder", action="store_true",
                    help="also put LoRA adapters on the text encoder's attention projections "
                         "(default: UNet only, the text encoder frozen)")
    lo.add_argument("--batch-size", type=int)
    _measure_args(lo)
    lo.set_defaults(handler=run_lora)



def _measure(args):
    from diffmem.study.measure import MeasureConfig

    return MeasureConfig(controls=args.controls, nn_generations=args.nn_generations,
                         sample_steps=args.sample_steps, fid_images=args.fid_images,
                         **device_options(args))


def _print(result) -> None:
    print(result.title)
    for line in result.findings:
        print(f"- {line}")
    print(f"results: {result.files.get('study')} ({result.seconds:.0f} s)")


def run_toy(args: argparse.Namespace) -> int:
    from diffmem.study.score_matching import ToyConfig, run_toy_study

    cfg = ToyConfig() if args.flow_time is None else ToyConfig(flow_time=args.flow_time)
    _print(run_toy_study(args.out, dim=args.dim, lrs=args.lrs, seed=args.seed,
                         repeats=args.repeats, config=cfg, command=["diffmem", *sys.argv[1:]]))
    return 0


def run_lr(args: argparse.Namespace) -> int:
    from diffmem.study.cxr import run_lr_study

    _print(run_lr_study(args.data, args.out, lrs=args.lrs, preset=args.preset,
                        steps=args.steps, schedule=args.schedule, seeds=_seeds(args),
                        batch_size=args.batch_size, use_embedded=not args.no_embedded,
                        matched_loss=not args.no_matched_loss,
                        encoder=args.encoder, measure=_measure(args),
                        checkpoint_every=args.checkpoint_every, threads=args.threads,
                        command=["diffmem", *sys.argv[1:]], index=args.index))
    return 0


def run_mitigations(args: argparse.Namespace) -> int:
    from diffmem.study.cxr import run_train_mitigation_study

    _print(run_train_mitigation_study(
        args.data, args.out, methods=args.methods, options=args.options, preset=args.preset,
        steps=args.steps, lr=args.lr, seeds=_seeds(args), batch_size=args.batch_size,
        encoder=args.encoder, measure=_measure(args), checkpoint_every=args.checkpoint_every,
        threads=args.threads, command=["diffmem", *sys.argv[1:]], index=args.index))
    return 0


def run_checkpoints(args: argparse.Namespace) -> int:
    from diffmem.study.checkpoints import run_checkpoint_study

    _print(run_checkpoint_study(
        args.data, args.out, run=args.model_run, preset=args.preset, steps=args.steps,
        checkpoint_every=args.checkpoint_every, lr=args.lr,
        seeds=None if args.seeds is None and args.seed is None else _seeds(args),
        batch_size=args.batch_size, tolerance=args.tolerance, encoder=args.encoder,
        measure=_measure(args), threads=args.threads, command=["diffmem", *sys.argv[1:]]))
    return 0


def run_lora(args: argparse.Namespace) -> int:
    from diffmem.study.lora import run_lora_study

    _print(run_lora_study(
        args.data, args.out, base_data=args.base_data, ranks=args.ranks, seeds=args.seeds,
        preset=args.preset, steps=args.steps, base_steps=args.base_steps, lr=args.lr,
        lora_lr=args.lora_lr, lora_text_encoder=args.lora_text_encoder,
        batch_size=args.batch_size, encoder=args.encoder, measure=_measure(args),
        checkpoint_every=args.checkpoint_every, threads=args.threads,
        command=["diffmem", *sys.argv[1:]], index=args.index))
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from diffmem.study.prune import run_prune_study

    _print(run_prune_study(
        args.model, args.data, args.out, ratios=args.ratios, nemo=args.nemo,
        projections=args.projections, seeds=args.seeds, encoder=args.encoder,
        measure=_measure(args),
        threads=args.threads, command=["diffmem", *sys.argv[1:]], index=args.index))
    return 0

"""``diffmem train``: train a CXR text-to-image diffusion model from scratch."""

from __future__ import annotations

import argparse

ORDER = 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a CXR diffusion pipeline from scratch (accelerate)",
        description="Train a CXRDiffusionPipeline on a dataset's training split and save it as a "
                    "diffusers folder. Multi-process: accelerate launch --multi_gpu --num_processes N -m "
                    "diffmem train ...")
    p.add_argument("--data", help="dataset folder or manifest")
    p.add_argument("--out", help="model folder to write (outside the data)")
    p.add_argument("--preset", default="demo", help="model preset name or JSON path (default demo)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: the preset's)")
    p.add_argument("--caption-dropout", type=float,
                   help="probability of training a sample unconditionally (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="checkpoints kept (older ones are deleted; default 2). Keep them all "
                        "for `diffmem study checkpoints --model-run`")
    p.add_argument("--ema", type=float, nargs="?", const=0.999, default=0.0,
                   help="keep an EMA of the weights with this decay (0.999 when given alone)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out")
    p.add_argument("--prompt-section", default="impression",
                   choices=("impression", "findings", "both", "full"))
    p.add_argument("--list-presets", action="store_true", help="list model presets and exit")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        from diffmem.pipelines import list_presets, load_preset

        for name in list_presets():
            print(f"{name:10s} {load_preset(name).description}")
        return 0
    if not args.data or not args.out:
        from diffmem.errors import ConfigError

        raise ConfigError("--data and --out are required (or --list-presets)")
    from diffmem.data import load
    from diffmem.train import TrainConfig, train

    data = load(args.data, prompt_section=args.prompt_section)
    config = TrainConfig(preset=args.preset, lr=args.lr, steps=args.steps,
                         batch_size=args.batch_size, caption_dropout=args.caption_dropout,
                         seed=args.seed, checkpoint_every=args.checkpoint_every,
                         keep_checkpoints=args.keep_checkpoints, ema=args.ema)
    result = train(data, args.out, config=config, resume=args.resume)
    print(f"trained {result.steps} steps in {result.wall_seconds:.0f} s "
          f"(final loss {result.final_loss:.4f}); model folder: {result.out}")
    return 0

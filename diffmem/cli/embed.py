"""``diffmem embed train|images``: train the in-domain open_clip encoder on a dataset's
image-report pairs, and embed a dataset's images with it."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffmem.cli._common import no_subcommand

ORDER = 35


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed", help="train / apply the in-domain image-report encoder (open_clip)",
        description="An in-domain CLIP-style encoder trained from scratch on the dataset's "
                    "(image, prompt) pairs: the detector's 'embedding' similarity backend and "
                    "the features of the in-domain Frechet distance and alignment score.")
    p.set_defaults(handler=no_subcommand, _parser=p)
    sub = p.add_subparsers(dest="embed_command", metavar="SUBCOMMAND")

    t = sub.add_parser(
        "train", help="train an encoder on a dataset's training split",
        description="Train the encoder (open_clip ClipLoss on image-prompt pairs plus an "
                    "image-image term between augmented views) and write ENC_DIR/"
                    "encoder.safetensors, encoder_config.json and tokenizer/.")
    t.add_argument("--data", help="dataset folder or manifest")
    t.add_argument("--out", metavar="ENC_DIR", help="encoder folder to write (outside the data)")
    t.add_argument("--preset", default="demo",
                   help="encoder preset name (tiny, demo) or JSON path (default demo)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    t.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    t.add_argument("--image-size", type=int, help="input side in pixels (default: the preset's)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    t.add_argument("--prompt-section", default="impression",
                   choices=("impression", "findings", "both", "full"),
                   help="report section used as the prompt (default impression)")
    t.add_argument("--list-presets", action="store_true", help="list encoder presets and exit")
    t.set_defaults(handler=run_train, _parser=t)

    e = sub.add_parser(
        "images", help="embed a dataset's images with a trained encoder",
        description="Write FILE.npy (N x D float32, L2-normalized rows in dataset order) and "
                    "FILE.csv (row, study_id, image_id, split) next to it.")
    e.add_argument("--encoder", required=True, metavar="ENC_DIR", help="trained encoder folder")
    e.add_argument("--data", required=True, help="dataset folder or manifest")
    e.add_argument("--out", required=True, metavar="FILE.npy", help="embedding file to write")
    e.add_argument("--split", action="append", choices=("train", "validate", "test"),
                   help="only this split (repeatable; default: all records)")
    e.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    e.add_argument("--prompt-section", default="impression",
                   choices=("impression", "findings", "both", "full"))
    e.set_defaults(handler=run_images, _parser=e)



def run_train(args: argparse.Namespace) -> int:
    if args.list_presets:
        from diffmem.embed import list_presets, load_preset

        for name in list_presets():
            print(f"{name:8s} {load_preset(name).description}")
        return 0
    if not args.data or not args.out:
        args._parser.error("--data and --out are required (or --list-presets)")
    from diffmem.data import load
    from diffmem.embed import train_encoder
    from diffmem.utils import shell_command

    data = load(args.data, prompt_section=args.prompt_section)
    result = train_encoder(data, args.out, preset=args.preset, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           image_size=args.image_size, device=args.device)
    print(f"trained the in-domain encoder for {result.steps} steps in {result.wall_seconds:.0f} s "
          f"(loss {result.initial_loss:.3f} -> {result.final_loss:.3f}; {result.embed_dim}-d, "
          f"{result.image_size} px); encoder folder: {result.out}")
    print("next: " + shell_command(["diffmem", "embed", "images", "--encoder", result.out,
                                    "--data", args.data, "--out", "embeddings.npy"]))
    return 0


def run_images(args: argparse.Namespace) -> int:
    import csv

    import numpy as np

    from diffmem.data import load
    from diffmem.embed import embed_dataset
    from diffmem.errors import OutputError
    from diffmem.utils import prepare_out_dir

    out = Path(args.out)
    if out.suffix != ".npy":
        raise OutputError(f"--out {args.out!r} must end in .npy (a NumPy array file)")
    data = load(args.data, prompt_section=args.prompt_section)
    prepare_out_dir(out.parent, inputs=[data.root])
    records = data.subset(split=args.split) if args.split else data
    emb = embed_dataset(args.encoder, records, batch_size=args.batch_size)
    np.save(out, emb)
    index = out.with_suffix(".csv")
    with open(index, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row", "study_id", "image_id", "split"])
        w.writerows([i, s.study_id, s.image_id, s.split] for i, s in enumerate(records))
    print(f"embedded {len(records)} images ({emb.shape[1]}-d) into {out}; row index: {index}")
    return 0

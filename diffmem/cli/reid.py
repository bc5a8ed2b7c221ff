"""``diffmem reid train|eval``: train a patient-verification (re-identification) network on a
dataset's own patients, and measure how well a re-ID model verifies patients on a dataset."""

from __future__ import annotations

import argparse

from diffmem.cli._common import no_subcommand

ORDER = 37

_SPLITS = ("heldout", "all", "train", "validate", "test")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reid", help="train / evaluate a patient re-identification model",
        description="A siamese patient-verification network (Packhaeuser et al., Sci. Rep. "
                    "2022): is this chest radiograph of the same patient as that one, even "
                    "with different findings or positioning?")
    p.set_defaults(handler=no_subcommand, _parser=p)
    sub = p.add_subparsers(dest="reid_command", metavar="SUBCOMMAND")

    t = sub.add_parser(
        "train", help="train a re-ID network on a dataset's patients",
        description="Train on (same patient, different study) and (different patient) pairs of "
                    "the training split, validate on held-out patients, and write "
                    "R/reid.safetensors, reid_config.json and README.md (the model card, with "
                    "the data fingerprint).")
    t.add_argument("--data", help="dataset folder or manifest (needs patient ids)")
    t.add_argument("--out", metavar="R", help="model folder to write (outside the data)")
    t.add_argument("--preset", default="demo",
                   help="re-ID preset name (tiny, demo, resnet18) or JSON path (default demo)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    t.add_argument("--patients-per-batch", type=int,
                   help="patients per step, two studies each (default: the preset's)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    t.add_argument("--image-size", type=int, help="input side in pixels (default: the preset's)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--split", default="train", choices=("train", "validate", "test"),
                   help="split whose patients are trained on (default train)")
    t.add_argument("--device", default="cpu", help="torch device (default cpu)")
    t.add_argument("--list-presets", action="store_true", help="list re-ID presets and exit")
    t.set_defaults(handler=run_train, _parser=t)

    e = sub.add_parser(
        "eval", help="verification AUC of a re-ID model on a dataset",
        description="Sample seeded same-patient (different study) and different-patient pairs, "
                    "score them with the model's cosine similarity and write O/reid_eval.json "
                    "(auc, tpr_at_1pct_fpr, pairs, patients; the same on same-patient pairs "
                    "that are not pixel near-duplicates; a pixel-similarity baseline) and "
                    "O/reid_roc.png.")
    e.add_argument("--model", metavar="R",
                   help="re-ID model folder (default: the embedded model trained on the "
                        "synthetic demo data)")
    e.add_argument("--data", required=True, help="dataset folder or manifest")
    e.add_argument("--out", required=True, metavar="O", help="output folder (outside the data)")
    e.add_argument("--split", default="heldout", choices=_SPLITS,
                   help="records to pair: heldout = validate + test (default; patients a model "
                        "trained on 'train' never saw), all, or one split")
    e.add_argument("--positive-pairs", type=int, default=2000,
                   help="at most this many same-patient pairs (default 2000)")
    e.add_argument("--negative-pairs", type=int, default=4000,
                   help="different-patient pairs (default 4000)")
    e.add_argument("--seed", type=int, default=0, help="pair-sampling seed (default 0)")
    e.add_argument("--device", default="cpu", help="torch device (default cpu)")
    e.set_defaults(handler=run_eval, _parser=e)



def run_train(args: argparse.Namespace) -> int:
    if args.list_presets:
        from diffmem.reid import list_presets, load_preset

        for name in list_presets():
            print(f"{name:9s} {load_preset(name).description}")
        return 0
    if not args.data or not args.out:
        args._parser.error("--data and --out are required (or --list-presets)")
    from diffmem.reid import train_reid

    r = train_reid(args.data, args.out, preset=args.preset, steps=args.steps,
                   patients_per_batch=args.patients_per_batch, lr=args.lr,
                   image_size=args.image_size, seed=args.seed, split=args.split,
                   device=args.device)
    v = r.validation
    val = (f"validation AUC {v['auc']:.4f}, TPR@1%FPR {v['tpr_at_1pct_fpr']:.3f} on "
           f"{v['patients']} held-out patients" if v.get("auc") is not None else "no validation")
    print(f"trained the re-ID network on {r.train_patients} patients for {r.steps} steps in "
          f"{r.wall_seconds:.0f} s (loss {r.initial_loss:.3f} -> {r.final_loss:.3f}; {val}); "
          f"model folder: {r.out}")
    print(f"next: diffmem reid eval --model {r.out} --data DATA --out OUT")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from diffmem.reid import load_reid_model, run_reid_eval

    model = load_reid_model(args.model, device=args.device)
    r = run_reid_eval(model, args.data, args.out, split=args.split,
                      n_positive=args.positive_pairs, n_negative=args.negative_pairs,
                      seed=args.seed)
    far = r.near_duplicate["auc_not_near_duplicate"]
    far_text = "n/a" if far is None else f"{far:.4f}"
    print(f"re-ID verification on {r.patients} patients ({r.positive_pairs} same-patient, "
          f"{r.negative_pairs} different-patient pairs): AUC {r.auc:.4f}, TPR@1%FPR "
          f"{r.tpr_at_1pct_fpr:.3f}; AUC without near-duplicates {far_text} "
          f"(pixel baseline: AUC {r.baseline_pixel['auc']:.4f}); results in {args.out}")
    return 0

"""``diffmem index build``: the training images' features for the copy verdicts, computed once
and reused by detect, mitigate and study (``--index DIR``)."""

from __future__ import annotations

import argparse

from diffmem.cli._common import add_backend, backend_options, no_subcommand

ORDER = 38


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "index", help="build a reference index of the training images' features",
        description="A reference index holds the features of the training split's images under "
                    "one similarity backend (features.npy, memory-mapped; an exact FAISS index "
                    "for the pixel and embedding backends), keyed by the data's fingerprint and "
                    "the backend settings. detect, mitigate and study take --index DIR instead "
                    "of featurizing the training images on every run.")
    p.set_defaults(handler=no_subcommand, _parser=p)
    sub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    b = sub.add_parser(
        "build", help="compute the index (resumable: run again to finish an interrupted build)",
        description="Stream the training split's images in batches into OUT/features.npy, then "
                    "write the FAISS index and OUT/index.json (the card). Running it again on "
                    "the same folder resumes an interrupted build or says it is up to date.")
    b.add_argument("--data", required=True, help="the training data (dataset folder or manifest)")
    b.add_argument("--out", required=True, metavar="INDEX_DIR",
                   help="index folder to write (outside the data)")
    add_backend(b, what="copy verdicts the index serves")
    b.add_argument("--batch-size", type=int, default=256,
                   help="images loaded and featurized at a time (default 256)")
    b.add_argument("--faiss", choices=("auto", "yes", "no", "ivf"), default="auto",
                   help="also write a FAISS index that runs search with: auto (default: an "
                        "exact one when faiss is installed, the backend is pixel or embedding "
                        "and FAISS beats the blocked exact search on a CPU-time probe; same "
                        "neighbours either way), yes (exact, always), no, ivf (approximate: an "
                        "inverted-file index whose nprobe is the smallest reaching "
                        "--target-recall on a leave-one-out probe, recorded in index.json)")
    b.add_argument("--nlist", type=int, default=None,
                   help="--faiss ivf: inverted lists (default about 4 * sqrt(images))")
    b.add_argument("--target-recall", type=float, default=0.99,
                   help="--faiss ivf: recall@1 against the exact search that nprobe must reach "
                        "on the build's probe (default 0.99)")
    b.add_argument("--seed", type=int, default=0,
                   help="--faiss ivf: seed of the k-means sample and the probe (default 0)")
    b.set_defaults(handler=run_build, _parser=b)


def run_build(args: argparse.Namespace) -> int:
    from diffmem.detect.index import build_index
    from diffmem.detect.verdicts import build_backend

    backend = build_backend(args.backend, backend_options(args))
    card = build_index(args.data, args.out, backend, batch_size=args.batch_size,
                       use_faiss={"auto": None, "yes": True, "no": False,
                                  "ivf": "ivf"}[args.faiss],
                       nlist=args.nlist, target_recall=args.target_recall, seed=args.seed)
    a = card.approximate
    search = (f"approximate FAISS IVF search (nprobe {a['nprobe']} of {a['nlist']} lists, "
              f"recall@1 {a['recall_at_1']:.4f} on {a['probe_queries']} leave-one-out probe "
              "queries)" if a else "FAISS search" if card.faiss else "blocked exact search")
    print(f"reference index {card.path}: {card.n} training images x {card.dim} features "
          f"({card.backend}), data {card.data_fingerprint}, {search}; built in "
          f"{card.build_seconds:.1f} s")
    print(f"next: diffmem detect --model MODEL --data DATA --out OUT --index {card.path}")
    return 0

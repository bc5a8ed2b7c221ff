"""``diffmem clipmem``: memorization of image-report pairs by a CLIP-style encoder (CLIPMem, Wang
et al., ICLR 2025): train f and g on split data and score the candidates, or score a given
(f, g) pair of encoder folders."""

from __future__ import annotations

import argparse
from pathlib import Path

ORDER = 37


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "clipmem", help="CLIPMem: which image-report pairs a CLIP-style encoder memorized",
        description="CLIPMem (Wang et al., ICLR 2025): a pair is memorized when an encoder f "
                    "trained on it aligns image and report much more than a reference g that "
                    "was not. By default trains f on S_S+S_C and g on S_S+S_I (the in-domain "
                    "open_clip recipe of `diffmem embed train`, one run folder per seed and "
                    "model, resumable) and scores S_C and S_I. With --f and --g scores every "
                    "pair of --data under two given encoder folders (f trained on them, g not). "
                    "Writes OUT/clipmem.csv, summary.json, clipmem.png and clipmem_towers.csv "
                    "(which tower memorizes: f's text or image tower swapped into g). With "
                    "--mitigate also trains f again under each text-side mitigation on seed 0's "
                    "split and writes OUT/mitigations.csv and mitigations.png (CLIPMem against "
                    "held-out retrieval recall@5).")
    p.add_argument("--data", required=True, help="dataset folder or manifest")
    p.add_argument("--out", required=True, help="run folder to write (outside the data)")
    p.add_argument("--preset", default="demo",
                   help="encoder preset name (tiny, demo) or JSON path (default demo)")
    p.add_argument("--seeds", type=int, default=1,
                   help="repetitions with fresh splits and initializations (default 1)")
    p.add_argument("--steps", type=int, help="training steps of f and g (default: the preset's)")
    p.add_argument("--views", type=int, default=8,
                   help="augmented image views per pair for the alignment (default 8; 0: none)")
    p.add_argument("--candidates", type=float, default=0.25,
                   help="fraction of training pairs in S_C (default 0.25)")
    p.add_argument("--independent", type=float, default=0.25,
                   help="fraction of training pairs in S_I (default 0.25)")
    p.add_argument("--mitigate", action="store_true",
                   help="also compare the text-side mitigations (caption augmentation, "
                        "text-embedding noise, removing the top-CLIPMem pairs; several reports "
                        "per image where the data has them) on seed 0's split")
    p.add_argument("--mitigations", nargs="+", metavar="NAME",
                   help="with --mitigate: which ones (default all: caption_augment text_noise "
                        "remove_top multi_report)")
    p.add_argument("--caption-drop", type=float, default=0.3,
                   help="with --mitigate: sentence drop probability of caption_augment "
                        "(default 0.3)")
    p.add_argument("--text-noise", type=float, default=0.5,
                   help="with --mitigate: norm of the text-embedding noise (default 0.5)")
    p.add_argument("--remove-top", type=float, default=0.1,
                   help="with --mitigate: fraction of S_C removed by remove_top (default 0.1)")
    p.add_argument("--f", metavar="ENC_DIR",
                   help="given-encoder mode: the encoder folder trained on the pairs")
    p.add_argument("--g", metavar="ENC_DIR",
                   help="given-encoder mode: the reference encoder folder not trained on them")
    p.add_argument("--open-clip-model", metavar="NAME",
                   help="given-encoder mode: --f and --g are checkpoint files of this open_clip "
                        "architecture (open_clip.list_models()); open_clip export folders and "
                        "diffmem encoder folders need no flag")
    p.add_argument("--split", action="append", choices=("train", "validate", "test"),
                   help="given-encoder mode: only score this split (repeatable; default all)")
    p.add_argument("--seed", type=int, default=0,
                   help="given-encoder mode: seed of the augmented views (default 0)")
    p.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    p.add_argument("--prompt-section", default="impression",
                   choices=("impression", "findings", "both", "full"),
                   help="report section used as the text (default impression)")
    p.set_defaults(handler=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    from diffmem.clipmem import run_clipmem, score_pairs
    from diffmem.data import load

    if (args.f is None) != (args.g is None):
        args._parser.error("--f and --g go together (the encoder trained on the pairs and the "
                           "reference that was not); give both or neither")
    if args.mitigate and args.f is not None:
        args._parser.error("--mitigate trains f again, so it needs the training mode; drop --f "
                           "and --g")
    data = load(args.data, prompt_section=args.prompt_section)
    if args.f is not None:
        res = score_pairs(args.f, args.g, data, args.out, split=args.split, views=args.views,
                          seed=args.seed, open_clip_model=args.open_clip_model)
    else:
        res = run_clipmem(data, args.out, preset=args.preset, seeds=args.seeds, steps=args.steps,
                          views=args.views, candidates=args.candidates,
                          independent=args.independent, device=args.device)
    s = res.summary
    print(f"scored {s['scored_pairs']} pairs in {s['wall_seconds']:.0f} s; "
          f"results: {res.files['csv']}")
    for kind, k in s["by_kind"].items():
        print(f"  {kind:14s} {k['pairs']:5d} pairs  mean CLIPMem {k['mean_clipmem']:+.4f}  "
              f"(alignment f {k['mean_alignment_f']:.3f}, g {k['mean_alignment_g']:.3f})")
    if s["auc"] is not None:
        print(f"  AUC of CLIPMem for the planted {s['positive_kind']} pairs against the rest: "
              f"{s['auc']:.3f} ({s['positives']} vs {s['negatives']}); baselines from the same "
              f"run: -alignment_g {s['baseline_auc']['minus_alignment_g']:.3f}, alignment_f "
              f"{s['baseline_auc']['alignment_f']:.3f}")
    if s.get("towers"):
        print(f"  towers: {s['towers']['finding']}")
    for row in res.rows[:5]:
        print(f"  top: {row['clipmem']:+.3f}  {row['study_id']}  {row['prompt'][:70]}")
    if args.mitigate:
        _mitigate(args, data)
    return 0


def _mitigate(args: argparse.Namespace, data) -> None:
    from diffmem.clipmem.mitigate import MITIGATIONS, run_mitigations

    mit = run_mitigations(data, args.out, preset=args.preset, steps=args.steps,
                          views=args.views, candidates=args.candidates,
                          independent=args.independent, device=args.device,
                          methods=args.mitigations or MITIGATIONS, drop=args.caption_drop,
                          noise=args.text_noise, remove=args.remove_top)
    print(f"mitigations ({mit['memorization']} vs {mit['utility']}):")
    for r in mit["rows"]:
        if r["status"] != "measured":
            print(f"  {r['method']:16s} {r['setting']}")
            continue
        auc = "-" if r["auc"] is None else f"{r['auc']:.3f}"
        print(f"  {r['method']:16s} CLIPMem {r[mit['memorization']]:+.4f}  AUC {auc}  "
              f"recall@5 {r['utility']:.3f}  {r['seconds']:.0f} s"
              f"{'  (Pareto)' if r['pareto'] else ''}")
    print(f"  results: {Path(args.out) / 'mitigations.csv'}")

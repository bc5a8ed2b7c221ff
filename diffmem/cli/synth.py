"""``diffmem synth --out DIR``: write a synthetic MIMIC-CXR-JPG dataset with planted
memorization and its ground truth; ``diffmem synth --list-presets`` shows the presets."""

from __future__ import annotations

import argparse
import json
import textwrap

ORDER = 10


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="write a synthetic MIMIC-CXR-style dataset with planted memorization",
        description="Write procedural chest radiographs with MIMIC-style reports in the exact "
                    "MIMIC-CXR-JPG layout, with planted exact and near duplicates in the "
                    "training split, ground_truth.csv and dataset_card.json. The same preset "
                    "and seed give the same files.")
    p.add_argument("--out", metavar="DIR", help="folder to create (must be new or empty)")
    p.add_argument("--preset", default="tiny", metavar="NAME",
                   help="preset name (tiny, demo, benchmark; see --list-presets) or a .json "
                        "preset file (default: tiny)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    p.add_argument("--dicom", action="store_true",
                   help="also write the records as DICOM with fake PHI under DIR/dicom")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a synthetic dataset already in DIR (other folders are refused)")
    p.add_argument("--list-presets", action="store_true",
                   help="list the presets with their descriptions and exit")
    p.set_defaults(handler=run, _parser=p)


def _list_presets() -> int:
    from diffmem.data.synth import list_presets, load_preset

    for name in list_presets():
        cfg = load_preset(name)
        print(f"{name}:")
        print(textwrap.fill(cfg.description, width=88, initial_indent="    ",
                            subsequent_indent="    "))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets()
    if not args.out:
        args._parser.error("--out DIR is required (or use --list-presets)")

    from diffmem.data.synth import synthesize
    from diffmem.utils import shell_command

    out = synthesize(args.out, preset=args.preset, seed=args.seed, dicom=args.dicom,
                     overwrite=args.overwrite)
    card = json.loads((out / "dataset_card.json").read_text(encoding="utf-8"))
    counts = card["counts"]
    print(f"synthetic dataset {card['preset']!r} (seed {card['seed']}) written to {out}")
    for split in ("train", "validate", "test"):
        c = counts[split]
        print(f"  {split:9s} {c['images']:6d} images  {c['patients']:5d} patients "
              f"({c['outpatients']} outpatients, {c['icu_patients']} ICU)  "
              f"planted: {c['planted_clusters']} clusters, {c['planted_records']} records  "
              f"prompts with ___: {c['deid_markers']['rate']:.0%}")
    print(f"  ground truth: {out / 'ground_truth.csv'}")
    print(f"  dataset card: {out / 'dataset_card.json'}")
    if args.dicom:
        print(f"  DICOM copy:   {out / 'dicom'}")
    print("next: " + shell_command(["diffmem", "inspect", out]))
    return 0

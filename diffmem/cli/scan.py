"""``diffmem scan DATA|PROMPTS_FILE --out DIR``: rank a prompt dataset's tokens by memorization
risk (de-identification markers, PHI-like text, enrichment in duplicated prompts; with --model,
memorization-weighted attribution)."""

from __future__ import annotations

import argparse

from diffmem.cli._common import add_device, device_options

ORDER = 55


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan", help="find risky tokens (de-identification markers...) in a prompt dataset",
        description="Scan the prompts of a dataset (folder or manifest; the train split by "
                    "default) or a prompts file (.txt one per line, .csv/.jsonl with a 'prompt' "
                    "column). Without a model: de-identification markers of known conventions "
                    "and generic placeholders, residual PHI-like text, duplicate prompt "
                    "clusters and each token's enrichment in duplicated prompts. With --model: "
                    "also per-token attribution weighted by each prompt's memorization score. "
                    "Writes DIR/tokens.csv, DIR/scan.json, DIR/tokens.png, DIR/enrichment.png.")
    p.add_argument("data", metavar="DATA|PROMPTS_FILE", help="dataset or prompts file")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (outside DATA)")
    p.add_argument("--model", default=None, help="model folder for the model-based part")
    p.add_argument("--method", default=None,
                   help="attribution method with --model: integrated_gradients (default), "
                        "gradient, occlusion, attention")
    p.add_argument("--max-prompts", type=int, default=None, metavar="N",
                   help="attribute a random sample of N distinct prompts (default: all)")
    p.add_argument("--split", default="train",
                   help="dataset split to scan: train (default), validate, test or all")
    p.add_argument("--prompt-section", choices=("impression", "findings", "both", "full"),
                   default="impression", help="report section used as the prompt (datasets)")
    p.add_argument("--near-threshold", type=_threshold, default=0.9, metavar="COS|none",
                   help="TF-IDF cosine similarity from which prompts count as near "
                        "duplicates (default 0.9; found with MinHash LSH, each pair checked "
                        "exactly); 'none' finds exact duplicates only")
    p.add_argument("--min-count", type=int, default=3,
                   help="tokens seen fewer times are ranked last (default 3)")
    p.add_argument("--generations", type=int, default=4,
                   help="initial noises per prompt with --model (default 4)")
    p.add_argument("--steps", type=int, default=1, help="sampling steps averaged (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-images", dest="images", action="store_false",
                   help="datasets: contrast duplicated prompts only, not also the prompts of "
                        "records whose image or patient repeats")
    p.add_argument("--faithfulness", type=int, default=0, metavar="N",
                   help="with --model: deletion/insertion curves of gradient, occlusion and "
                        "attention vs random order on the N most memorized prompts "
                        "(DIR/faithfulness.csv)")
    add_device(p)
    p.set_defaults(handler=run)


def _threshold(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a cosine similarity "
                                         "in (0, 1] such as 0.9, or 'none'") from None


def run(args: argparse.Namespace) -> int:
    from diffmem.attribution.scan import run_scan

    result, paths = run_scan(args.data, out=args.out, model=args.model, split=args.split,
                             prompt_section=args.prompt_section, **device_options(args),
                             images=args.images, faithfulness=args.faithfulness,
                             method=args.method, max_prompts=args.max_prompts,
                             near_threshold=args.near_threshold, min_count=args.min_count,
                             generations=args.generations, steps=args.steps, seed=args.seed)
    s = result.summary
    markers = {**s["markers"], **s["placeholders"]}
    print(f"scanned {s['n_prompts']} prompts ({s['n_distinct']} distinct), "
          f"{s['duplicates']['duplicated_prompts']} in {s['duplicates']['clusters']} duplicate "
          "clusters")
    for name, m in markers.items():
        print(f"  marker {name:24s} {m['occurrences']:6d} times in {m['prompts']} prompts "
              f"({100 * m['rate']:.1f}%)")
    for name, m in s["phi"].items():
        print(f"  PHI-like {name:22s} {m['occurrences']:6d} times in {m['prompts']} prompts")
    print("riskiest tokens:")
    for row in result.tokens[:10]:
        flag = " (de-id marker)" if row["is_deid_marker"] else ""
        print(f"  {row['rank']:3d}. {row['token']:<20s} score {row['score']:.3f}{flag}")
    if result.faithfulness is not None:
        from diffmem.attribution.faithfulness import format_faithfulness

        print(format_faithfulness(result.faithfulness))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0

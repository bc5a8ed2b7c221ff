"""``diffmem attribute --model M "PROMPT"``: which units of a prompt drive memorization."""

from __future__ import annotations

import argparse

from diffmem.cli._common import add_device, device_options

ORDER = 50


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attribute", help="rank the words and markers of a prompt by how much they drive "
                          "memorization",
        description="Attribute a model's memorization signal (noise magnitude, Wen et al. 2024) "
                    "to the units of one prompt: words, de-identification markers (___ stays "
                    "one unit however the tokenizer splits it) and PHI-like spans. Prints the "
                    "ranked units; --out writes the prompt with heat-coloured units.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text (quote it)")
    p.add_argument("--model", required=True, help="model folder (diffusers pipeline)")
    p.add_argument("--method", default=None,
                   help="integrated_gradients (default; through the text encoder), gradient "
                        "(Wen et al. token significance), occlusion or attention")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="write the rendering: .html (coloured prompt page), .png or .json")
    p.add_argument("--generations", type=int, default=4,
                   help="initial noises averaged over (default 4)")
    p.add_argument("--steps", type=int, default=1,
                   help="sampling steps averaged over, from the first (default 1)")
    p.add_argument("--num-inference-steps", type=int, default=50,
                   help="steps of the sampling schedule (default 50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale of the trajectory (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncate", action="store_true",
                   help="attribute the part of an over-long prompt the text encoder reads "
                        "instead of stopping with an error")
    p.add_argument("--reference", metavar="DATA", default=None,
                   help="occlusion only: training data (dataset folder or manifest) to also "
                        "measure the drop of the generated images' nearest-neighbour "
                        "similarity (one full sampling run per unit)")
    p.add_argument("--target", choices=("magnitude", "similarity"), default=None,
                   help="occlusion only: rank by the noise-magnitude drop (default) or by the "
                        "similarity drop (needs --reference)")
    p.add_argument("--faithfulness", action="store_true",
                   help="also measure deletion and insertion curves (RISE, Petsiuk et al. "
                        "2018) of integrated gradients, gradient, occlusion and attention "
                        "against random orders, units replaced by padding, and print their "
                        "areas")
    add_device(p)
    p.add_argument("--top", type=int, default=None, help="print only the TOP best-ranked units")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from diffmem.attribution.commands import format_ranking, run_attribute

    extra = {k: v for k, v in (("reference", args.reference), ("target", args.target))
             if v is not None}
    model = args.model
    device = device_options(args)
    if args.faithfulness:  # one model for the attribution and the curves
        from diffmem.attribution.methods import checked_method
        from diffmem.models import load_model

        checked_method(args.method)
        model = load_model(args.model, **device)
    result, path = run_attribute(model, args.prompt, method=args.method, out=args.out,
                                 **device, generations=args.generations,
                                 steps=args.steps, num_inference_steps=args.num_inference_steps,
                                 guidance=args.guidance, seed=args.seed, truncate=args.truncate,
                                 **extra)
    print(format_ranking(result, top=args.top))
    if path is not None:
        print(f"rendering written to {path}")
    if args.faithfulness:
        from diffmem.attribution.faithfulness import faithfulness_curves, format_faithfulness

        curves = faithfulness_curves(model, [args.prompt], generations=args.generations,
                                     steps=args.steps,
                                     num_inference_steps=args.num_inference_steps,
                                     guidance=args.guidance, seed=args.seed,
                                     truncate=args.truncate)
        print(format_faithfulness(curves))
    return 0

"""Noise-magnitude scores of one model in float32 and in a reduced precision, on the same
prompts and seeds: the largest relative difference and each precision's AUC against the planted
labels (ground_truth.csv of `diffmem synth` data).

    OMP_NUM_THREADS=1 python scripts/compare_precision.py --data DEMO_DATA [--model M]
        [--dtype bfloat16] [--max-prompts N] [--seed 0]

Default model: the embedded default (diffmem.pipelines.default_model_dir()). Scores use
`diffmem detect`'s default noise settings (1 generation, first of 50 DDIM steps, the
pipeline's guidance). Prints seed, sizes, machine and wall times.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from diffmem.data import load
from diffmem.detect.detector import DetectionConfig
from diffmem.detect.inputs import prompt_labels, training_prompts
from diffmem.detect.evaluate import evaluate
from diffmem.detect.scores import default_guidance, noise_magnitude
from diffmem.models import load_model
from diffmem.pipelines import default_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dataset = load(args.data)
    prompts = list(training_prompts(dataset))
    if args.max_prompts is not None:
        prompts = prompts[:args.max_prompts]
    labels = prompt_labels(dataset)
    y = np.array([labels[p] for p in prompts]) if labels else None
    cfg = DetectionConfig()
    model = args.model or default_model_dir()
    out = {"model": str(model), "data": str(args.data), "prompts": len(prompts),
           "planted": None if y is None else int(y.sum()), "seed": args.seed,
           "settings": {"generations": cfg.generations, "steps": cfg.steps,
                        "num_inference_steps": cfg.num_inference_steps,
                        "batch_size": cfg.batch_size},
           "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                       "torch": torch.__version__}}
    scores = {}
    for dtype in ("float32", args.dtype):
        adapter = load_model(model, device=args.device, dtype=dtype)
        t0 = time.perf_counter()
        scores[dtype] = noise_magnitude(
            adapter, prompts, generations=cfg.generations, steps=cfg.steps,
            num_inference_steps=cfg.num_inference_steps, seed=args.seed,
            batch_size=cfg.batch_size, guidance=default_guidance(adapter))
        out[dtype] = {"seconds": round(time.perf_counter() - t0, 1)}
        if y is not None and 0 < y.sum() < len(y):
            ev = evaluate(scores[dtype], y)
            out[dtype].update(auc=round(ev.auc, 4), tpr_at_1pct_fpr=round(ev.tpr_at_1pct_fpr, 4))
    a, b = scores["float32"], scores[args.dtype]
    rel = np.abs(b - a) / np.maximum(np.abs(a), 1e-12)
    out["relative_difference"] = {"max": float(rel.max()), "median": float(np.median(rel)),
                                  "p99": float(np.quantile(rel, 0.99))}
    out["rank_agreement_spearman"] = float(np.corrcoef(np.argsort(np.argsort(a)),
                                                       np.argsort(np.argsort(b)))[0, 1])
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

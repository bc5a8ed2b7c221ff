"""``diffmem demo``: run the whole product on the embedded default model and data."""

from __future__ import annotations

import argparse

from diffmem.cli._common import add_device, device_options

ORDER = 90


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run everything on the embedded default (make demo)",
                       description="Synthesize the demo dataset, inspect it, rank risky prompt "
                                   "tokens, detect memorized prompts with the embedded default "
                                   "model, compare a fast subset of mitigations, run the "
                                   "learning-rate toy study and write the privacy report; "
                                   "writes into --out and prints the report's path.")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    add_device(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from diffmem.demo import run_demo

    import sys

    result = run_demo(args.out, command=["diffmem", *sys.argv[1:]], **device_options(args))
    print(f"demo finished in {sum(result.seconds.values()):.0f} s; outputs in {result.out}:")
    for name, path in result.artifacts.items():
        print(f"  {name:10s} {path}")
    top = result.facts.get("top_token") or {}
    if top.get("token"):
        print(f"riskiest prompt token: {top['token']!r}"
              + (" (a de-identification marker)" if top.get("is_deid_marker") else ""))
    det = result.facts.get("detection")
    if det:
        for kind in ("planted", "not_planted"):
            r = det["rates"].get(kind)
            if r:
                print(f"memorized {kind.replace('_', ' ')} prompts: {r['memorized']}/{r['prompts']}")
        for name, ev in det["evaluations"].items():
            print(f"  {name:18s} AUC {ev['auc']:.3f}  TPR@1%FPR {ev['tpr_at_1pct_fpr']:.3f}")
        reid, ev = det.get("reid"), result.facts.get("reid") or {}
        if reid:
            print(f"generations that re-identify a training patient: {reid['leaks']}/"
                  f"{reid['generations']} ({reid['leaks_not_copies']} of them not pixel copies; "
                  f"{reid['copies']} pixel copies); re-ID model verification AUC "
                  f"{ev.get('auc', float('nan')):.3f} on {ev.get('patients')} held-out patients")
    mit = result.facts.get("mitigation") or {}
    if mit.get("pareto_front") is not None:
        print(f"mitigations on the Pareto front: {', '.join(mit['pareto_front']) or 'none'}"
              + (f"; recommended: {mit['recommended']}" if mit.get("recommended") else ""))
    risk = result.facts.get("risk")
    if risk:
        print(f"risk level: {risk.get('level', risk) if isinstance(risk, dict) else risk}")
    if result.report:
        print(f"privacy report: {result.report}")
    return 0

"""Write the manifest the embedded re-ID model (``diffmem/reid/default_model``) was trained on.

The model learns "same patient?" from patients with two or more studies; the demo data has 73
of them, too few for a verification AUC of 0.99 on new patients. Its training population is
therefore the demo data's training split (the patients of the embedded diffusion model) plus a
second population synthesized with the demo generator's settings and four times its patients
(``diffmem synth --preset reid``, another seed, so other people). This script joins the two into
one manifest (:mod:`diffmem.data.manifest`) without copying an image: ``OUT/demo`` and
``OUT/pop`` are symbolic links to the datasets, patient and study ids are prefixed per source so
that two synthetic patients never merge, the second population's ``validate`` split is the
validation set, and every held-out record of the demo data (validate and test) stays out, so
that ``diffmem reid eval --data DEMO`` scores patients the model never saw.

Usage (the README's re-ID section has the whole recipe)::

    python scripts/reid_default_manifest.py DEMO_DATA POP_DATA OUT
    diffmem --threads 1 reid train --data OUT/manifest.csv --out R --steps 1500
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

from diffmem.data import load

#: Which splits of each source enter the manifest.
KEEP = {"demo": ("train",), "pop": ("train", "validate")}


def write_manifest(demo: Path, pop: Path, out: Path) -> tuple[Path, int]:
    """Link both datasets under ``out`` and write ``out/manifest.csv``; returns its path and
    the number of records."""
    out.mkdir(parents=True, exist_ok=True)
    fields = ("image", "prompt", "patient_id", "study_id", "split", "view")
    n = 0
    path = out / "manifest.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for tag, root in (("demo", demo.resolve()), ("pop", pop.resolve())):
            link = out / tag
            if not link.exists():
                os.symlink(root, link)
            for s in load(root):
                if s.split not in KEEP[tag]:
                    continue
                writer.writerow({"image": f"{tag}/{Path(s.image).relative_to(root)}",
                                 "prompt": s.prompt, "patient_id": f"{tag}-{s.patient_id}",
                                 "study_id": f"{tag}-{s.study_id}", "split": s.split,
                                 "view": s.view or ""})
                n += 1
    return path, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo", type=Path, help="diffmem synth --preset demo --seed 0")
    p.add_argument("pop", type=Path, help="diffmem synth --preset reid --seed 5")
    p.add_argument("out", type=Path, help="folder for the links and manifest.csv")
    args = p.parse_args()
    path, n = write_manifest(args.demo, args.pop, args.out)
    print(f"wrote {path} ({n} records)")


if __name__ == "__main__":
    main()

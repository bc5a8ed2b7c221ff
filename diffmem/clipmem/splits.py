"""The CLIPMem data split (Wang et al., ICLR 2025, Sec. 3): shared pairs S_S that both models
train on, candidates S_C that only the model under test f sees, independent pairs S_I that only
the reference g sees, and held-out pairs S_E for utility.

Records are assigned by *patient*, never one by one: a patient's studies (an ICU series, a
planted cluster of copies of one film) all land in one part, so that g never trains on a
near-copy of a candidate it is the reference for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffmem.checks import check_fraction, check_int
from diffmem.data import CXRDataset
from diffmem.errors import ConfigError, DataError

__all__ = ["ClipMemSplit", "split_pairs"]

#: Part names as the CSV and the split file write them.
PARTS = ("shared", "candidate", "independent", "evaluation")


@dataclass(frozen=True)
class ClipMemSplit:
    """Indices into a dataset for the four CLIPMem parts.

    Attributes
    ----------
    shared : list of int
        S_S: trained on by f and g.
    candidate : list of int
        S_C: trained on by f only (CLIPMem is measured on them).
    independent : list of int
        S_I: trained on by g only (scored too, with the roles of f and g swapped).
    evaluation : list of int
        S_E: held-out records (the dataset's other splits), for utility.
    seed : int
        The seed the split was drawn with.
    """

    shared: list[int]
    candidate: list[int]
    independent: list[int]
    evaluation: list[int]
    seed: int

    @property
    def f_train(self) -> list[int]:
        """S_S + S_C, sorted: what f trains on."""
        return sorted(self.shared + self.candidate)

    @property
    def g_train(self) -> list[int]:
        """S_S + S_I, sorted: what g trains on."""
        return sorted(self.shared + self.independent)

    def part_of(self) -> dict[int, str]:
        """Record index to its part name (``"shared"``, ``"candidate"``...)."""
        return {i: name for name in PARTS for i in getattr(self, name)}

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **{name: list(getattr(self, name)) for name in PARTS},
                "sizes": {name: len(getattr(self, name)) for name in PARTS}}


def split_pairs(dataset: CXRDataset, *, seed: int = 0, candidates: float = 0.25,
                independent: float = 0.25, split: str | Sequence[str] = "train") -> ClipMemSplit:
    """Draw the S_S / S_C / S_I / S_E split of a dataset, by patient, seeded.

    Parameters
    ----------
    dataset : CXRDataset
    seed : int, optional
        Seeds the patient permutation.
    candidates, independent : float, optional
        Target fractions of the ``split`` records in S_C and S_I (the rest is S_S). Whole
        patients are assigned, so the sizes are met approximately. The paper uses 5,000 of
        80,000 pairs each; small datasets need larger fractions to score enough pairs.
    split : str or sequence of str, optional
        The dataset split(s) f and g train on; every other record is S_E.

    Returns
    -------
    ClipMemSplit

    Raises
    ------
    ConfigError
        For fractions outside (0, 1) or summing to 1 or more.
    DataError
        When a part would be empty (too few patients).

    Examples
    --------
    >>> from diffmem.data import CXRDataset, Study
    >>> recs = [Study(f"s{i}", f"p{i // 2}", f"/x/{i}.jpg", "", "No acute process.")
    ...         for i in range(40)]
    >>> parts = split_pairs(CXRDataset(recs, root="/x", format="manifest"), seed=0)
    >>> len(parts.candidate), len(parts.independent), len(parts.shared), len(parts.evaluation)
    (10, 10, 20, 0)
    """
    seed = check_int("seed", seed, low=0)
    candidates = check_fraction("candidates", candidates, open_low=True, open_high=True)
    independent = check_fraction("independent", independent, open_low=True, open_high=True)
    if candidates + independent >= 1:
        raise ConfigError(f"candidates={candidates} + independent={independent} >= 1 leaves no "
                          "shared pairs; use fractions that sum to less than 1 (e.g. 0.25 each)")
    wanted = {split} if isinstance(split, str) else set(split)
    pool = [i for i, s in enumerate(dataset) if s.split in wanted]
    evaluation = [i for i, s in enumerate(dataset) if s.split not in wanted]
    groups: dict[str, list[int]] = {}
    for i in pool:
        groups.setdefault(dataset[i].patient_id, []).append(i)
    order = sorted(groups)
    rng = np.random.default_rng([seed, 0xC11B])
    perm = [order[k] for k in rng.permutation(len(order))]
    targets = {"candidate": candidates * len(pool), "independent": independent * len(pool)}
    parts: dict[str, list[int]] = {"shared": [], "candidate": [], "independent": []}
    for patient in perm:
        members = groups[patient]
        # the part furthest below its target takes the next patient; the rest is shared
        gaps = {k: targets[k] - len(parts[k]) for k in targets}
        name = max(gaps, key=lambda k: gaps[k])
        if gaps[name] < len(members) / 2:
            name = "shared"
        parts[name].extend(members)
    empty = [k for k, v in parts.items() if not v]
    if empty:
        raise DataError(f"the {sorted(wanted)} split(s) have {len(pool)} records of "
                        f"{len(groups)} patients, too few for a CLIPMem split (part(s) "
                        f"{', '.join(empty)} would be empty); use a larger dataset or larger "
                        "candidates/independent fractions", path=dataset.root)
    return ClipMemSplit(shared=sorted(parts["shared"]), candidate=sorted(parts["candidate"]),
                        independent=sorted(parts["independent"]), evaluation=evaluation,
                        seed=seed)

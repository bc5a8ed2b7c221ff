"""What a synthetic study shows: one :class:`Findings` record drives both the drawn image and
the written report, so the two always agree.

A patient's course is a chain of findings: outpatients get one draw per visit, ICU patients a
day-to-day evolution (:func:`evolve_findings`) where effusions grow and shrink, edema comes and
goes, lines and tubes are placed, moved and removed, and a pneumothorax may follow a line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

SIDES = ("right", "left")
SIZES = ("small", "moderate", "large")
GRADES = ("mild", "moderate", "severe")
#: Lobes a consolidation or nodule may sit in (patient's side; the image shows right on the left).
LOBES = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe",
         "lingula", "left lower lobe")
#: Support devices, by the key used in :attr:`Findings.devices`.
DEVICES = ("ett", "ng", "cvl", "picc", "pacemaker", "sternotomy", "chest_tube")


@dataclass(frozen=True)
class Findings:
    """The radiological state of one study.

    Attributes
    ----------
    effusion : dict
        Side (``"right"``/``"left"``) to size (``"small"``, ``"moderate"``, ``"large"``).
    cardiomegaly : str or None
        ``"mild"``, ``"moderate"``, ``"severe"`` or ``None`` (normal heart size).
    consolidation : tuple of str
        Lobes with a consolidation (see :data:`LOBES`).
    atelectasis : tuple of str
        Bases with atelectasis: ``("right",)``, ``("left",)`` or both.
    edema : str or None
        ``"mild"``, ``"moderate"``, ``"severe"`` or ``None``.
    pneumothorax : dict
        Side to size.
    nodule : tuple or None
        ``(lobe, millimetres)`` of one pulmonary nodule.
    granuloma : bool
        A small calcified granuloma (an incidental, stable finding).
    devices : dict
        Device key (see :data:`DEVICES`) to its position: ETT tip in cm above the carina;
        ``"cvl"`` entry (``"right_ij"``, ``"left_ij"``, ``"left_subclavian"``) and tip
        (``"svc"``, ``"cavoatrial"``, ``"right_atrium"``); ``"picc"`` side; ``"chest_tube"``
        side; ``"ng"`` tip (``"stomach"``, ``"esophagus"``); ``"pacemaker"`` leads
        (``"dual"``/``"single"``); ``"sternotomy"`` ``"wires"``.
    """

    effusion: dict = field(default_factory=dict)
    cardiomegaly: str | None = None
    consolidation: tuple = ()
    atelectasis: tuple = ()
    edema: str | None = None
    pneumothorax: dict = field(default_factory=dict)
    nodule: tuple | None = None
    granuloma: bool = False
    devices: dict = field(default_factory=dict)

    @property
    def is_normal(self) -> bool:
        """True when nothing acute or chronic is present (devices and granuloma aside)."""
        return not (self.effusion or self.cardiomegaly or self.consolidation
                    or self.atelectasis or self.edema or self.pneumothorax or self.nodule)

    def labels(self) -> str:
        """A compact, sorted ``;``-separated label string (for ground-truth files)."""
        parts = [f"effusion:{s}:{z}" for s, z in sorted(self.effusion.items())]
        if self.cardiomegaly:
            parts.append(f"cardiomegaly:{self.cardiomegaly}")
        parts += [f"consolidation:{lobe.replace(' ', '_')}" for lobe in self.consolidation]
        parts += [f"atelectasis:{s}" for s in self.atelectasis]
        if self.edema:
            parts.append(f"edema:{self.edema}")
        parts += [f"pneumothorax:{s}:{z}" for s, z in sorted(self.pneumothorax.items())]
        if self.nodule:
            parts.append(f"nodule:{self.nodule[0].replace(' ', '_')}:{self.nodule[1]}mm")
        if self.granuloma:
            parts.append("granuloma")
        parts += [f"device:{k}:{v}" for k, v in sorted(self.devices.items())]
        return ";".join(parts)


def _pick(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def random_outpatient_findings(rng: np.random.Generator, *, abnormal_rate: float,
                               chronic: Findings | None = None) -> Findings:
    """Findings of an outpatient PA study: mostly normal, else one or two mild findings.

    ``chronic`` carries a patient's stable traits (cardiomegaly, pacemaker, sternotomy,
    granuloma) into the draw.
    """
    base = chronic or Findings()
    if rng.random() >= abnormal_rate:
        return base
    kind = _pick(rng, ("effusion", "consolidation", "cardiomegaly", "atelectasis", "nodule",
                       "edema", "two"), p=(0.17, 0.25, 0.14, 0.14, 0.12, 0.08, 0.10))
    kinds = [kind] if kind != "two" else list(rng.choice(
        ["effusion", "consolidation", "cardiomegaly", "atelectasis", "edema"], 2, replace=False))
    f = base
    for k in kinds:
        if k == "effusion":
            side = _pick(rng, ("right", "left", "both"), p=(0.4, 0.35, 0.25))
            size = _pick(rng, SIZES, p=(0.65, 0.3, 0.05))
            eff = {"right": size, "left": size} if side == "both" else {side: size}
            f = replace(f, effusion=eff)
        elif k == "consolidation":
            f = replace(f, consolidation=(_pick(rng, LOBES, p=(0.12, 0.16, 0.27, 0.1, 0.1,
                                                                 0.25)),))
        elif k == "cardiomegaly":
            f = replace(f, cardiomegaly=f.cardiomegaly or _pick(rng, GRADES, p=(0.6, 0.3, 0.1)))
        elif k == "atelectasis":
            f = replace(f, atelectasis=_pick(rng, (("right",), ("left",), ("right", "left"))))
        elif k == "nodule":
            f = replace(f, nodule=(_pick(rng, LOBES), int(rng.integers(5, 19))))
        elif k == "edema":
            f = replace(f, edema="mild", cardiomegaly=f.cardiomegaly or "mild")
    return f


def chronic_traits(rng: np.random.Generator, *, icu: bool) -> Findings:
    """A patient's stable background: cardiomegaly, pacemaker, sternotomy wires, granuloma."""
    f = Findings()
    if rng.random() < (0.25 if icu else 0.08):
        f = replace(f, cardiomegaly=_pick(rng, GRADES, p=(0.55, 0.35, 0.1)))
    if rng.random() < (0.10 if icu else 0.04):
        f = replace(f, devices={**f.devices, "pacemaker": _pick(rng, ("dual", "single"))})
    if rng.random() < (0.12 if icu else 0.04):
        f = replace(f, devices={**f.devices, "sternotomy": "wires"})
    if rng.random() < 0.06:
        f = replace(f, granuloma=True)
    return f


def initial_icu_findings(rng: np.random.Generator, chronic: Findings) -> Findings:
    """The first portable study of an ICU stay: lines and tubes plus acute findings."""
    dev = dict(chronic.devices)
    if rng.random() < 0.6:
        dev["ett"] = int(rng.integers(2, 7))
        dev["ng"] = "stomach" if rng.random() < 0.9 else "esophagus"
    elif rng.random() < 0.3:
        dev["ng"] = "stomach"
    if rng.random() < 0.55:
        dev["cvl"] = (_pick(rng, ("right_ij", "left_ij", "left_subclavian"), p=(0.65, 0.15, 0.2))
                      + ":" + _pick(rng, ("svc", "cavoatrial", "right_atrium"),
                                    p=(0.6, 0.3, 0.1)))
    elif rng.random() < 0.3:
        dev["picc"] = _pick(rng, ("right", "left"))
    eff: dict = {}
    if rng.random() < 0.5:
        for side in SIDES:
            if rng.random() < 0.7:
                eff[side] = _pick(rng, SIZES, p=(0.55, 0.35, 0.1))
    f = replace(chronic, devices=dev, effusion=eff)
    if rng.random() < 0.4:
        f = replace(f, edema=_pick(rng, GRADES, p=(0.5, 0.35, 0.15)))
    if rng.random() < 0.35:
        f = replace(f, consolidation=(_pick(rng, LOBES, p=(0.1, 0.12, 0.3, 0.08, 0.1, 0.3)),))
    if rng.random() < 0.5:
        f = replace(f, atelectasis=_pick(rng, (("right",), ("left",), ("right", "left"))))
    if rng.random() < 0.08:
        f = replace(f, pneumothorax={_pick(rng, SIDES): _pick(rng, SIZES, p=(0.6, 0.3, 0.1))})
    return f


def _step(options, current, rng, up=0.2, down=0.25):
    """Move ``current`` one step along ``options`` (None is below the first) at random."""
    i = -1 if current is None else options.index(current)
    r = rng.random()
    if r < up and i < len(options) - 1:
        i += 1
    elif r < up + down:
        i -= 1
    return None if i < 0 else options[i]


def evolve_findings(prev: Findings, rng: np.random.Generator) -> Findings:
    """The next portable study of an ICU stay: a small random change of ``prev``.

    Most follow-ups are stable or change one or two things, as in daily ICU films.
    """
    f = prev
    if rng.random() < 0.35:  # nothing new: the typical "no change" film
        return f
    eff = {}
    for side in SIDES:
        size = _step(SIZES, f.effusion.get(side), rng, up=0.15, down=0.2)
        if size:
            eff[side] = size
    f = replace(f, effusion=eff, edema=_step(GRADES, f.edema, rng, up=0.12, down=0.25))
    if f.consolidation and rng.random() < 0.2:
        f = replace(f, consolidation=())
    elif not f.consolidation and rng.random() < 0.1:
        f = replace(f, consolidation=(_pick(rng, LOBES, p=(0.1, 0.12, 0.3, 0.08, 0.1, 0.3)),))
    if rng.random() < 0.25:
        f = replace(f, atelectasis=() if f.atelectasis else
                    _pick(rng, (("right",), ("left",), ("right", "left"))))
    dev = dict(f.devices)
    ptx = dict(f.pneumothorax)
    if "ett" in dev:
        r = rng.random()
        if r < 0.18:
            del dev["ett"]
            if rng.random() < 0.7:
                dev.pop("ng", None)
        elif r < 0.35:
            dev["ett"] = int(np.clip(dev["ett"] + rng.choice((-2, -1, 1, 2)), 1, 8))
    elif rng.random() < 0.06:
        dev["ett"] = int(rng.integers(2, 7))
        dev["ng"] = "stomach"
    if "cvl" not in dev and "picc" not in dev and rng.random() < 0.12:
        dev["cvl"] = _pick(rng, ("right_ij:svc", "left_subclavian:svc", "right_ij:cavoatrial"))
        if rng.random() < 0.15:  # an iatrogenic pneumothorax after line placement
            side = "left" if dev["cvl"].startswith("left") else "right"
            ptx[side] = "small"
    elif "cvl" in dev and rng.random() < 0.1:
        del dev["cvl"]
    if ptx:
        side = next(iter(ptx))
        if "chest_tube" not in dev and rng.random() < 0.5:
            dev["chest_tube"] = side
        new = _step(SIZES, ptx[side], rng, up=0.1, down=0.45)
        ptx = {side: new} if new else {}
    elif "chest_tube" in dev and rng.random() < 0.3:
        del dev["chest_tube"]
    return replace(f, devices=dev, pneumothorax=ptx)

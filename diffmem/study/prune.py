"""Pruning and memorization neurons, measured like a training study: magnitude pruning of the
cross-attention projections (after Gupta et al., 2024, who find pruning reduces memorization in
language models) at several ratios and NeMo's memorization-neuron deactivation (Hintersdorf et
al., NeurIPS 2024, "Finding NeMo") at several strengths, applied to one trained model.

Both act through the mitigation registry (:mod:`diffmem.mitigate`, the code ``diffmem mitigate``
runs: ``magnitude_pruning`` and ``nemo_deactivation``): their forward hooks stay on the model's
UNet for a whole measurement (:func:`diffmem.study.measure.measure_model` with ``mitigation``),
so the model is measured exactly as the other studies measure a trained model (same prompts,
seeds, detector settings and columns): own-image and any-image copies of the planted prompts,
empty-prompt copies, re-ID leaks, noise-magnitude AUC, skew and in-domain FID.

NeMo deactivates one fixed set of neurons for every generation (the paper's "all memorization
neurons at once"): the union of the neurons :func:`~diffmem.mitigate.nemo.localize_all` finds
for the planted prompts, against the non-planted scanned prompts as reference (a planted prompt
that NeMo does not judge memorized adds none). Strength ``s`` multiplies their outputs by
``1 - s``.

Ratio 0 and strength 0 are the plain model (the registry's strength 0 installs no hook): the
study measures it once, as ``plain``, the baseline every other setting is compared with.
Memorization (any-image copy rate of the planted prompts) against utility (in-domain FID) gives
the Pareto front. Measurements and the localized neurons are reused on a rerun.

Seeds (``--seeds``, default 0,1,2; issue 17) are *measurement* seeds: there is one model, so
each setting is measured once per seed with :class:`~diffmem.study.measure.MeasureConfig`'s
``seed`` set to it (``measure/<setting>-s<seed>/``). The seed drives the generation noise and
the seeded samples of a measurement (the control prompts scanned, the held-out FID records);
it does not retrain anything, so the interval is the spread of the measurement, not of
training. Each setting's row pools its per-seed measurements with
:func:`diffmem.study.seeds.pool_seeds` (mean and 95% t-interval); the Pareto front is computed
on the means. NeMo's neurons are localized once, with the ``measure`` config's own seed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffmem.checks import as_dataset, number_list
from diffmem.mitigate.compare import non_dominated
from diffmem.mitigate.registry import get_mitigation
from diffmem.study.measure import (MeasureConfig, choose_prompts, measure_model,
                                   resolve_encoder, weights_stamp)
from diffmem.study.results import StudyResult, machine_info, write_study
from diffmem.study.seeds import DEFAULT_SEEDS, SEED_METRICS, parse_seeds, pool_seeds, row_ci
from diffmem.utils import prepare_out_dir, progress, write_json

log = logging.getLogger(__name__)

__all__ = ["parse_strengths", "run_prune_study"]

PRUNE, NEMO = "magnitude_pruning", "nemo_deactivation"
#: Measured fields pooled over the measurement seeds (training-only fields left out).
PRUNE_METRICS = {k: v for k, v in SEED_METRICS.items() if k not in ("final_loss",
                                                                     "train_seconds")}
#: Record fields, in the order the report's table shows them (its first 12).
RECORD_COLUMNS = ("setting", "method", "strength", "own_copies_mean", "own_copies_ci95",
                  "any_copies_mean", "any_copies_ci95", "reid_leaks_mean", "reid_leaks_ci95",
                  "fid_mean", "fid_ci95", "pareto", "seeds", "pruned_weights", "neurons_off",
                  *(f"{k}_{x}" for k in PRUNE_METRICS
                    if k not in ("own_copies", "any_copies", "reid_leaks", "fid")
                    for x in ("mean", "ci95")),
                  "planted_prompts", "control_prompts")


def parse_strengths(values: Sequence[Any] | str, *, method: str, option: str) -> list[float]:
    """Distinct strengths of the registered ``method`` (its preset's range) from a
    comma-separated string or a sequence, sorted; a ConfigError names ``option``.

    Examples
    --------
    >>> parse_strengths("0.5, 0,0.1", method="magnitude_pruning", option="--ratios")
    [0.0, 0.1, 0.5]
    """
    entry = get_mitigation(method)
    lo, hi = entry.strength_range
    return sorted(number_list(values, name=option, cast=float, example=f"{option} 0,0.5,{hi:g}",
                              accept=lambda v, x: lo <= v <= hi,
                              expected=f"in [{lo:g}, {hi:g}] ({entry.strength})"))


def _neurons(adapter, model: Path, dataset, out: Path, measure: MeasureConfig,
             ) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """The union of NeMo's neurons of the planted prompts (reused from ``nemo_neurons.json``
    when the model, prompts and settings are the same)."""
    from diffmem.mitigate.nemo import localize_all

    prompts, labels = choose_prompts(dataset, controls=measure.controls, seed=measure.seed)
    planted = [p for p in prompts if labels.get(p)]
    reference = [p for p in prompts if not labels.get(p)]
    params = {k: get_mitigation(NEMO).params[k] for k in ("theta", "max_k", "n_seeds", "steps")}
    key = {"model": str(model), "weights": weights_stamp(model), "planted": planted,
           "reference": reference, "params": params, "seed": measure.seed}
    path = out / "nemo_neurons.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["neurons"], saved["facts"]
    neurons, facts = localize_all(adapter, planted, reference, seed=measure.seed, **params)
    write_json(path, {"key": key, "neurons": neurons, "facts": facts})
    return neurons, facts


def _settings(ratios: list[float], strengths: list[float], neurons, projections):
    """``(name, method, strength, mitigation)`` of every setting, ``plain`` first."""
    out = [("plain", "none", 0.0, {"method": PRUNE, "strength": 0.0, "params": {}})]
    params = {} if projections is None else {"projections": list(projections)}
    out += [(f"prune-{r:g}", PRUNE, r, {"method": PRUNE, "strength": r, "params": params})
            for r in ratios if r > 0]
    out += [(f"nemo-{s:g}", NEMO, s, {"method": NEMO, "strength": s,
                                       "params": {"neurons": neurons}})
            for s in strengths if s > 0]
    return out


def _pruned_weights(adapter, ratio: float, projections) -> int:
    from diffmem.mitigate.pruning import pruning_masks

    kw = {} if projections is None else {"projections": list(projections)}
    return int(sum(int((m == 0).sum()) for m in pruning_masks(adapter, ratio, **kw).values()))


def run_prune_study(model: str | os.PathLike, data, out: str | os.PathLike, *,
                    ratios: Sequence[float] | str = (0, 0.1, 0.3, 0.5, 0.7),
                    nemo: Sequence[float] | str = (0, 0.5, 1),
                    projections: Sequence[str] | None = None,
                    encoder: str | os.PathLike | None = None,
                    seeds: Sequence[int] | str = DEFAULT_SEEDS,
                    measure: MeasureConfig | None = None, threads: int | None = None,
                    command: Sequence[str] | None = None,
                    index: str | os.PathLike | None = None) -> StudyResult:
    """Magnitude pruning (after Gupta et al., 2024) and NeMo deactivation (Hintersdorf et al.,
    NeurIPS 2024) of one trained model, measured like the training studies, with the Pareto
    front of memorization against utility (see the module docstring).

    Parameters
    ----------
    model : path
        A trained model folder (``diffmem train``); never written into.
    data : path or CXRDataset
        Its training data with ``ground_truth.csv`` (planted duplicates) and validate/test
        splits.
    out : path
        Study folder: ``measure/<setting>-s<seed>/``, ``nemo_neurons.json``, ``prune.csv``,
        ``summary.json``, ``study.json``, ``prune.png``.
    ratios : sequence of float or str
        Pruning ratios in [0, 0.99] (the fraction of each cross-attention projection's weights
        zeroed, smallest ``|w|`` first).
    nemo : sequence of float or str
        NeMo strengths in [0, 1] (1 = neurons deactivated); empty or only 0: no localization.
    projections : sequence of str, optional
        Projections pruned (default: the registry preset's, ``to_k`` and ``to_v``).
    seeds : sequence of int or str
        Measurement seeds (default 0,1,2): every setting is measured once per seed (generation
        noise and seeded prompt/record samples only: one model) and pooled.
    encoder, measure, threads, command, index
        As in :func:`diffmem.study.cxr.run_lr_study`.

    Returns
    -------
    StudyResult
        ``records``: one row per setting (``plain``, ``prune-<ratio>``, ``nemo-<strength>``),
        the mean and 95% t-interval over the seeds of each measured metric
        (``<metric>_mean``, ``<metric>_ci95``) and the per-seed measurements under ``runs``.
    """
    from diffmem.models import load_model

    t0 = time.perf_counter()
    ratios = parse_strengths(ratios, method=PRUNE, option="--ratios")
    strengths = parse_strengths(nemo, method=NEMO, option="--nemo")
    seeds = parse_seeds(seeds)
    measure = measure or MeasureConfig()
    dataset = as_dataset(data)
    model = Path(model)
    adapter = load_model(model, device=measure.device, dtype=measure.dtype)  # bad folder: here
    pruned = {r: _pruned_weights(adapter, r, projections) for r in ratios if r > 0}
    out = prepare_out_dir(out, inputs=[dataset.root, model])
    enc = resolve_encoder(encoder)
    neurons, nemo_facts = ({}, None) if not any(strengths) else \
        _neurons(adapter, model, dataset, out, measure)
    records, plain = [], None
    for name, method, strength, mitigation in progress(
            _settings(ratios, strengths, neurons, projections), desc="prune study",
            unit="setting"):
        if method == NEMO and not neurons:  # nothing to deactivate: the plain model
            runs = plain
        else:
            runs = [{"seed": s, **measure_model(
                model, dataset, out / "measure" / f"{name}-s{s}", config=replace(measure, seed=s),
                encoder=enc, threads=threads, index=index, mitigation=mitigation).to_dict()}
                for s in seeds]
        plain = runs if method == "none" else plain
        setting = {"setting": name, "method": method, "strength": strength,
                   "pruned_weights": pruned.get(strength, 0) if method == PRUNE else 0,
                   "neurons_off": sum(map(len, neurons.values())) if method == NEMO else 0,
                   "planted_prompts": runs[0].get("planted_prompts"),
                   "control_prompts": runs[0].get("control_prompts")}
        row = pool_seeds(runs, setting, metrics=PRUNE_METRICS)
        records.append({**{k: row.get(k) for k in RECORD_COLUMNS}, **row})
    front = _mark_front(records)
    config = {"model": str(model), "data": str(dataset.root), "ratios": ratios,
              "nemo": strengths, "seeds": seeds, "projections": list(projections or
                                                     get_mitigation(PRUNE).params["projections"]),
              "nemo_neurons": neurons, "nemo_localization": _nemo_summary(nemo_facts),
              "measure": measure.to_dict(), "encoder": None if enc is None else str(enc),
              "pareto": {"memorization": "any_copies_mean (planted prompts, mean over seeds)",
                         "utility": "fid_mean (held-out prompts, lower is better, mean over "
                                    "seeds)",
                         "front": front},
              "deviations": _deviations()}
    return _write(records, out, t0, command, config)


def _mark_front(records: list[dict[str, Any]]) -> list[str]:
    """Set each record's ``pareto`` (None without both axes) and return the front's names."""
    pts = [(r["setting"], r["any_copies_mean"], r["fid_mean"]) for r in records
           if r["any_copies_mean"] is not None and r["fid_mean"] is not None]
    front = non_dominated(pts)
    named = {p[0] for p in pts}
    for r in records:
        r["pareto"] = (r["setting"] in front) if r["setting"] in named else None
    return front


def _nemo_summary(facts: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if facts is None:
        return None
    per = facts["prompts"].values()
    return {"tau": facts["tau"], "reference_prompts": facts["reference_prompts"],
            "planted_prompts": len(per),
            "judged_memorized": sum(f["strength"] > facts["tau"] for f in per),
            "mitigated": sum(bool(f["mitigated"]) and f["strength"] > facts["tau"]
                             for f in per)}


def _deviations() -> list[str]:
    return ["applied with forward hooks through the mitigation registry (the stored weights are "
            "unchanged); no fine-tuning after pruning",
            "NeMo neurons localized on the planted prompts (the study's ground truth; a "
            "deployer would localize the prompts `diffmem detect` flags), their union "
            "deactivated for every generation; NeMo's own deviations: see "
            "diffmem.mitigate.nemo",
            "one model: the seeds are measurement seeds (generation noise, control-prompt and "
            "FID-record samples), not training seeds, so the intervals leave out training "
            "variance; a copy rate moves by one planted prompt at a time; detector "
            "restricted for speed (see config.measure)"]


def _write(records, out: Path, t0: float, command, config) -> StudyResult:
    from diffmem.mitigate.plots import plot_pareto

    figures = []
    pts = [{"method": r["method"], "strength": r["strength"], "setting": r["setting"],
            "memorization": r["any_copies_mean"], "utility": r["fid_mean"]}
           for r in records if r["pareto"] is not None]
    if pts:
        figures.append(plot_pareto(
            {"fid_in_domain": pts}, out / "prune.png", front={
                (r["method"], r["strength"]) for r in records if r["pareto"]},
            memorization_set="planted", utility_set="held-out", metric="any-image copy rate",
            labels={(p["method"], p["strength"]): p["setting"] for p in pts}).name)
    result = StudyResult(
        study="prune", title=f"Pruning and NeMo neuron deactivation ({Path(config['model']).name}"
                             f", {len(records)} settings)",
        records=records, figures=figures, findings=_findings(records, config), config=config,
        machine=machine_info(), seconds=time.perf_counter() - t0,
        command=list(command) if command else [])
    return write_study(result, out, csv_name="prune.csv", columns=RECORD_COLUMNS)


def _findings(records: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> list[str]:
    seeds = config["seeds"]
    out = [f"Mean ± 95% t-interval over {len(seeds)} measurement seeds "
           f"({','.join(map(str, seeds))}) of one model: generation noise only, not training."]
    for r in records:
        what = {"none": "plain model (ratio 0 = NeMo strength 0)",
                PRUNE: f"{r['pruned_weights']:,} cross-attention weights zeroed",
                NEMO: f"{r['neurons_off']} neurons x {1 - r['strength']:g}" if r["neurons_off"]
                else "no neuron found: the plain model's numbers"}[r["method"]]
        out.append(f"{r['setting']} ({what}): own-image copies {row_ci(r, 'own_copies')}, "
                   f"any-image {row_ci(r, 'any_copies')}, empty prompt "
                   f"{row_ci(r, 'empty_prompt_copies')}, re-ID leaks {row_ci(r, 'reid_leaks')} "
                   f"(own patient {row_ci(r, 'reid_leaks_own')}), "
                   f"noise AUC {row_ci(r, 'noise_auc', False)}, "
                   f"in-domain FID {row_ci(r, 'fid', False)}.")
    front = config["pareto"]["front"]
    out.append(("Pareto front (mean any-image copies vs mean in-domain FID): "
                + ", ".join(front) + ".")
               if front else "No Pareto front: the in-domain FID was not measured (pass "
                             "--encoder DIR).")
    loc = config["nemo_localization"]
    if loc is not None:
        out.append(f"NeMo judged {loc['judged_memorized']} of {loc['planted_prompts']} planted "
                   f"prompts memorized (tau {loc['tau']:.3g} from {loc['reference_prompts']} "
                   f"reference prompts) and brought {loc['mitigated']} of them below tau; "
                   f"{sum(map(len, config['nemo_neurons'].values()))} neurons in all.")
    n = records[0].get("planted_prompts") if records else None
    if n:
        out.append(f"{n} planted prompts: one prompt moves a copy rate by {1 / n:.0%}.")
    return out

"""Full fine-tuning against LoRA (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large
Language Models"): does fine-tuning fewer parameters memorize less? (Bossy et al., 2025, find
LoRA cuts memorization of injected sequences in LLMs; this measures it for a CXR diffusion model.)

The study

1. pretrains a *base* model on one population (``base_data``; by default a synthetic dataset
   made with the target dataset's synthesis settings but another seed and no planted
   clusters, written to ``OUT/base-data``);
2. fine-tunes the base on the target data (with planted duplicates), for every seed: fully
   (every UNet and text-encoder parameter, as ``diffmem train`` trains) and with LoRA adapters
   (``peft``) of each rank on the UNet's attention projections (``to_q``, ``to_k``, ``to_v``,
   ``to_out.0``: self- and cross-attention), optionally also on the text encoder's
   (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``); same steps, batch and schedule, the
   LoRA runs at their own learning rate;
3. saves each fine-tuned model with the adapters merged into the weights (an ordinary diffusers
   folder that ``measure_model``, ``diffmem detect`` and the report open unchanged) and measures
   it (:func:`diffmem.study.measure.measure_model`: own-image and any-image copies, re-ID
   leaks, in-domain FID); the base model is measured too (copies before fine-tuning);
4. reports every setting as the mean and 95% t-interval over the seeds.

Runs are trainer folders ``OUT/runs/<name>/`` (finished runs are reused, killed ones resume).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmem.checks import as_dataset
from diffmem.errors import ConfigError, DataError
from diffmem.study.measure import MeasureConfig, measure_model, resolve_encoder
from diffmem.study.results import StudyResult, machine_info, write_records_csv, write_study
from diffmem.study.runs import train_or_resume
from diffmem.study.seeds import intervals_apart, parse_ints, parse_seeds, pool_seeds, row_ci
from diffmem.utils import prepare_out_dir, progress

log = logging.getLogger(__name__)

__all__ = ["LoraAdapter", "count_trainable", "parse_ranks", "run_lora_study",
           "synthesize_base_data"]

#: The UNet's attention projections (diffusers ``Attention``: self- and cross-attention).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: The CLIP text encoder's attention projections.
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: LoRA learning rate over the full fine-tuning one when ``lora_lr`` is not given: diffusers'
#: text-to-image examples fine-tune Stable Diffusion fully at 1e-5 and with LoRA at 1e-4
#: (LoRA starts from a zero update, B = 0, and trains a rank-r factorization).
LORA_LR_FACTOR = 10.0
#: A setting's fields, in the order the report's table shows them (its first 12).
SETTING_COLUMNS = ("setting", "trainable_params", "own_copies_mean", "own_copies_ci95",
                   "any_copies_mean", "any_copies_ci95", "reid_leaks_mean", "reid_leaks_ci95",
                   "fid_mean", "fid_ci95", "train_seconds_mean", "seeds", "train_seconds_ci95",
                   "rank", "lr", "trainable_share", "reid_leaks_not_copies_mean",
                   "reid_leaks_not_copies_ci95", "reid_leaks_own_mean", "reid_leaks_own_ci95",
                   "empty_prompt_copies_mean",
                   "empty_prompt_copies_ci95", "noise_auc_mean", "noise_auc_ci95")
RUN_COLUMNS = ("name", "setting", "rank", "seed", "lr", "steps", "status", "final_loss",
               "train_seconds", "trainable_params", "memorization_rate_own",
               "memorization_rate_any", "reid_rate", "reid_rate_not_copies", "reid_rate_own",
               "copy_rate_unconditional", "copy_rate_unrelated",
               "control_copy_rate", "noise_magnitude_auc", "fid_in_domain", "copy_threshold",
               "planted_prompts", "control_prompts", "detect_seconds", "fid_seconds", "model")


@dataclass
class LoraAdapter:
    """LoRA adapters (``peft``) on the attention projections, as a :class:`diffmem.train.
    TrainAdapter`: ``prepare`` wraps the UNet (and the text encoder) in :class:`peft.LoraModel`,
    leaving only the adapters trainable (a text encoder without adapters is frozen); ``merge``
    folds them into the weights (``merge_and_unload``).

    Attributes
    ----------
    rank : int
        LoRA rank r.
    alpha : float or None
        LoRA alpha (the update is scaled by alpha / r); None: ``alpha = rank`` (scale 1, as in
        diffusers' LoRA training examples).
    text_encoder : bool
        Also adapt the text encoder's attention projections.
    """

    rank: int
    alpha: float | None = None
    text_encoder: bool = False
    _models: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return (f"lora(r={self.rank},alpha={self.scale_alpha:g},"
                f"text_encoder={str(self.text_encoder).lower()})")

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def configs(self) -> dict[str, Any]:
        """``{"unet": LoraConfig, "text_encoder": LoraConfig}`` (the latter only when
        ``text_encoder``)."""
        from peft import LoraConfig

        def cfg(targets):
            return LoraConfig(r=self.rank, lora_alpha=self.scale_alpha,
                              target_modules=list(targets), lora_dropout=0.0, bias="none")

        out = {"unet": cfg(UNET_TARGETS)}
        if self.text_encoder:
            out["text_encoder"] = cfg(TEXT_TARGETS)
        return out

    def prepare(self, pipe) -> None:
        from peft import LoraModel

        if not self.text_encoder:
            pipe.text_encoder.requires_grad_(False)
        # peft's LoRA tuner injects the adapters into the module in place (the module keeps
        # its class and call signature) and freezes everything else in it
        self._models = {part: LoraModel(getattr(pipe, part), config, "default")
                        for part, config in self.configs().items()}

    def merge(self, pipe) -> None:
        for part, wrapped in self._models.items():
            setattr(pipe, part, wrapped.merge_and_unload())
        self._models = {}


def count_trainable(model: str | os.PathLike, adapter: LoraAdapter | None) -> tuple[int, int]:
    """``(trainable, total)`` parameters of the UNet and text encoder of the pipeline folder
    ``model`` when fine-tuned with ``adapter`` (None: fully; total without adapters)."""
    from diffmem.pipelines import CXRDiffusionPipeline

    pipe = CXRDiffusionPipeline.from_pretrained(str(model))
    parts = (pipe.unet, pipe.text_encoder)
    total = sum(p.numel() for m in parts for p in m.parameters())
    if adapter is None:
        return total, total
    adapter.prepare(pipe)
    trainable = sum(p.numel() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters()
                    if p.requires_grad)
    return trainable, total


def parse_ranks(ranks: Sequence[Any] | str) -> list[int]:
    """LoRA ranks: distinct positive integers (:func:`parse_ints`)."""
    return parse_ints(ranks, name="ranks", low=1, example="--ranks 4,16,64")


def synthesize_base_data(dataset, dest: str | os.PathLike) -> tuple[Path, str]:
    """A pretraining population for ``dataset`` (a ``diffmem synth`` dataset): the same
    synthesis settings (its ``dataset_card.json``'s ``config``) with the seed plus one and every
    planted cluster kind set to zero, written to ``dest`` (reused when it already holds it).

    Returns
    -------
    (path, note)
        The dataset folder and one sentence saying how it was made.
    """
    from diffmem.data.synth import synthesize
    from diffmem.data.synth.config import config_from_dict

    card_path = Path(dataset.root) / "dataset_card.json"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        config = dict(card["config"])
        seed = int(card["seed"]) + 1
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError("the study synthesizes its base (pretraining) data from the target's "
                        "dataset_card.json, which is missing or unreadable; pass --base-data "
                        "DIR (a dataset to pretrain on)", path=card_path) from None
    planted = dict(config.get("planted") or {})
    for key in ("exact_clusters", "near_clusters", "trigger_clusters", "marker_controls",
                "patient_clusters", "miscaptioned"):
        planted[key] = 0
    config["planted"] = planted
    config["name"] = f"{config.get('name', 'custom')}-base"
    cfg = config_from_dict(config, source=str(card_path))
    dest = Path(dest)
    done = dest / "dataset_card.json"
    reuse = False
    if done.is_file():
        old = json.loads(done.read_text(encoding="utf-8"))
        reuse = old.get("complete") and old.get("seed") == seed \
            and old.get("config") == json.loads(json.dumps(cfg.to_dict()))
    if not reuse:
        synthesize(dest, preset=cfg, seed=seed, overwrite=dest.exists())
    note = (f"base data synthesized into {dest} with the target's settings "
            f"(preset {card.get('preset')!r}), seed {seed} (the target's + 1) and no planted "
            "clusters")
    return dest, note


def _measure_run(name: str, model: str, dataset, out: Path, measure: MeasureConfig, enc,
                 threads, index) -> dict[str, Any]:
    return measure_model(model, dataset, out / "measure" / name, config=measure, encoder=enc,
                         threads=threads, index=index).to_dict()


def _aggregate(runs: Sequence[Mapping[str, Any]], setting: Mapping[str, Any]) -> dict[str, Any]:
    """One setting's row (:func:`~diffmem.study.seeds.pool_seeds`) with the report's columns."""
    return pool_seeds(runs, setting, columns=SETTING_COLUMNS)


@dataclass
class _Plan:
    """What every fine-tuning run of the study shares."""

    preset: str
    steps: int | None
    batch_size: int | None
    checkpoint_every: int
    base_model: str


def _fine_tune(train_set, out: Path, plan: _Plan, *, name: str, lr: float, seed: int,
               adapter: LoraAdapter | None) -> dict[str, Any]:
    from diffmem.train import TrainConfig

    cfg = TrainConfig(preset=plan.preset, lr=lr, steps=plan.steps, seed=seed,
                      batch_size=plan.batch_size, checkpoint_every=plan.checkpoint_every)
    info = train_or_resume(train_set, out / "runs" / name, cfg, init=plan.base_model,
                           adapter=adapter)
    return {"name": name, "seed": seed, "lr": lr, "steps": info.steps, "status": info.status,
            "final_loss": info.final_loss, "train_seconds": info.train_seconds,
            "model": info.model}


def run_lora_study(data, out: str | os.PathLike, *, base_data=None,
                   ranks: Sequence[int] | str = (4, 16, 64), seeds: Sequence[int] | str = (0, 1, 2),
                   preset: str = "demo", steps: int | None = None, base_steps: int | None = None,
                   lr: float | None = None, lora_lr: float | None = None,
                   lora_text_encoder: bool = False, batch_size: int | None = None,
                   encoder: str | os.PathLike | None = None, measure: MeasureConfig | None = None,
                   checkpoint_every: int = 100, threads: int | None = None,
                   command: Sequence[str] | None = None,
                   index: str | os.PathLike | None = None) -> StudyResult:
    """Full fine-tuning against LoRA at several ranks (Hu et al., ICLR 2022), over seeds:
    own-image and any-image copies, in-domain FID, trainable parameters and training seconds,
    as mean and 95% t-interval per setting (see the module docstring).

    Parameters
    ----------
    data : path or CXRDataset
        Target (fine-tuning) data with ``ground_truth.csv`` (planted duplicates) and
        validate/test splits.
    out : path
        Study folder: ``base-data/`` (when synthesized), ``runs/base/``, ``runs/full-s<seed>/``,
        ``runs/lora-r<rank>-s<seed>/``, ``measure/<run>/``, ``lora.csv`` (one row per setting),
        ``lora_runs.csv`` (one row per run), ``summary.json``, ``study.json``, ``lora.png``.
    base_data : path or CXRDataset, optional
        Pretraining data (its training split). Default: :func:`synthesize_base_data`.
    ranks : sequence of int or str
        LoRA ranks (default 4, 16, 64).
    seeds : sequence of int or str
        Fine-tuning seeds (batch order, noise, LoRA initialization); the base is trained once,
        with seed 0.
    preset : str
        Model preset (``demo``; ``tiny`` for tests).
    steps, base_steps : int, optional
        Fine-tuning and pretraining steps (default: the preset's).
    lr : float, optional
        Learning rate of the base and of the full fine-tuning (default: the preset's).
    lora_lr : float, optional
        Learning rate of the LoRA runs (default: :data:`LORA_LR_FACTOR` x ``lr``, the ratio of
        diffusers' LoRA and full fine-tuning examples).
    lora_text_encoder : bool
        Also put adapters on the text encoder (default: UNet only; the text encoder is frozen).
    batch_size : int, optional
    encoder, measure, checkpoint_every, threads, command, index
        As in :func:`diffmem.study.cxr.run_lr_study`.

    Returns
    -------
    StudyResult
        ``records``: one row per setting (``base``, ``full``, ``lora-r<rank>``) with
        ``<metric>_mean`` and ``<metric>_ci95`` (half width) and the runs under ``runs``.
    """
    from diffmem.pipelines import load_preset
    from diffmem.train import TrainConfig

    t0 = time.perf_counter()
    ranks, seeds = parse_ranks(ranks), parse_seeds(seeds)
    for name, value in (("lr", lr), ("lora_lr", lora_lr)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"{name}={value!r}; give a positive learning rate, e.g. 1e-3")
    base_cfg = TrainConfig(preset=preset, lr=lr, steps=base_steps, seed=0,
                           batch_size=batch_size, checkpoint_every=checkpoint_every)
    resolved = base_cfg.resolved(dict(load_preset(preset).training))
    full_lr = resolved.lr
    lora_lr = float(lora_lr) if lora_lr is not None else LORA_LR_FACTOR * full_lr
    ft_steps = TrainConfig(preset=preset, lr=lora_lr, steps=steps, batch_size=batch_size) \
        .resolved(dict(load_preset(preset).training)).steps  # bad settings stop here
    measure = measure or MeasureConfig()
    dataset = as_dataset(data)
    if len(dataset.subset(split="train")) == 0:
        raise DataError("the data has no training split to fine-tune on", path=dataset.root)
    base_set = None if base_data is None else as_dataset(base_data)
    out = prepare_out_dir(out, inputs=[dataset.root] + ([base_set.root] if base_set else []))
    enc = resolve_encoder(encoder)

    # 1. the base model
    base_note = f"base data given: {base_set.root}" if base_set is not None else None
    if base_set is None:
        path, base_note = synthesize_base_data(dataset, out / "base-data")
        base_set = as_dataset(path)
    log.info("%s", base_note)
    base = train_or_resume(base_set.subset(split="train"), out / "runs" / "base", base_cfg)
    train_set = dataset.subset(split="train")
    plan = _Plan(preset, steps, batch_size, checkpoint_every, base.model)

    # 2. fine-tuning runs, then 3. measurements
    settings = [("full", None, full_lr)] + [(f"lora-r{r}", r, lora_lr) for r in ranks]
    jobs = [(s, seed) for s in settings for seed in seeds]
    runs: dict[str, list[dict[str, Any]]] = {s[0]: [] for s in settings}
    for (setting, rank, run_lr), seed in progress(jobs, desc="lora study", unit="run"):
        adapter = None if rank is None else LoraAdapter(rank, text_encoder=lora_text_encoder)
        run = _fine_tune(train_set, out, plan, name=f"{setting}-s{seed}", lr=run_lr, seed=seed,
                         adapter=adapter)
        run.update(setting=setting, rank=rank,
                   **_measure_run(run["name"], run["model"], dataset, out, measure, enc,
                                  threads, index))
        runs[setting].append(run)
    base_run = {"name": "base", "setting": "base", "rank": None, "seed": 0, "lr": full_lr,
                "steps": base.steps, "status": base.status, "final_loss": base.final_loss,
                "train_seconds": base.train_seconds, "model": base.model,
                **_measure_run("base", base.model, dataset, out, measure, enc, threads, index)}

    # 4. per-setting rows
    records = [_aggregate([base_run], {"setting": "base", "rank": None, "lr": full_lr,
                                      "trainable_params": 0, "trainable_share": 0.0})]
    records[0]["train_seconds_mean"] = None  # pretraining time is not a fine-tuning cost
    for setting, rank, run_lr in settings:
        adapter = None if rank is None else LoraAdapter(rank, text_encoder=lora_text_encoder)
        trainable, total = count_trainable(base.model, adapter)
        for r in runs[setting]:
            r["trainable_params"] = trainable
        records.append(_aggregate(runs[setting], {
            "setting": setting, "rank": rank, "lr": run_lr, "trainable_params": trainable,
            "trainable_share": trainable / total}))
    return _write(records, base_run, out, t0, command, config={
        "preset": preset, "ranks": ranks, "seeds": seeds, "steps": ft_steps,
        "base_steps": base.steps, "lr": full_lr,
        "lora_lr": lora_lr, "lora_lr_default": f"{LORA_LR_FACTOR:g} x lr (diffusers' text-to-"
        "image examples: full fine-tuning 1e-5, LoRA 1e-4)", "lora_alpha": "equal to the rank "
        "(scale 1)", "lora_targets": {"unet": list(UNET_TARGETS), "text_encoder":
                                      list(TEXT_TARGETS) if lora_text_encoder else None},
        "lora_text_encoder": lora_text_encoder, "batch_size": resolved.batch_size,
        "base_data": str(base_set.root), "base_data_note": base_note, "base_seed": 0,
        "base_model": base.model, "data": str(dataset.root),
        "data_fingerprint": train_set.fingerprint(),
        "encoder": None if enc is None else str(enc), "measure": measure.to_dict(),
        "reid_leaks": "share of generations (scanned, unrelated and empty prompts) that the "
                      "embedded re-ID model matches to a training patient (measure_model's "
                      "reid_rate); none when MeasureConfig.reid is off or the data has no "
                      "patient ids. Own patient: those that re-identify the patient whose "
                      "training study carries their prompt (measure_model's reid_rate_own), a "
                      "part of the re-ID leaks",
        "deviations": _deviations(preset)})


def _deviations(preset: str) -> list[str]:
    return [f"{preset}-preset pixel model with its own small CLIP text encoder, not Stable "
            "Diffusion; LoRA on the attention projections only (no convolution or MLP adapters)",
            "the base is trained once (seed 0); seeds vary the fine-tuning only (batch order, "
            "noise, LoRA initialization)",
            "the fine-tuned models keep the base's tokenizer (trained on the base prompts), as "
            "fine-tuning a pretrained model does",
            "detector restricted for speed (see config.measure); 95% t-intervals over a few "
            "seeds are wide"]


def _write(records, base_run, out: Path, t0: float, command, *, config) -> StudyResult:
    from diffmem.study import plots

    preset = config["preset"]
    fig = plots.plot_metric_bars(
        records, ("own_copies_mean", "any_copies_mean", "fid_mean", "train_seconds_mean"),
        out / "lora.png", label="setting", err_suffix="_ci95",
        title=f"Full fine-tuning vs LoRA ({preset}, {len(config['seeds'])} seeds, mean and "
              "95% CI)").name
    run_rows = [base_run] + [r for rec in records[1:] for r in rec["runs"]]
    result = StudyResult(
        study="lora", title=f"Full fine-tuning vs LoRA ({preset} preset, ranks "
                            f"{', '.join(map(str, config['ranks']))}, "
                            f"{len(config['seeds'])} seeds)",
        records=records, figures=[fig], findings=_findings(records, config),
        config=config, machine=machine_info(), seconds=time.perf_counter() - t0,
        command=list(command) if command else [])
    write_records_csv(out / "lora_runs.csv", run_rows, RUN_COLUMNS)
    result = write_study(result, out, csv_name="lora.csv", columns=SETTING_COLUMNS)
    result.files["runs_csv"] = str(out / "lora_runs.csv")
    return result


NOT_MEASURED = "not measured"


def _findings(records: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> list[str]:
    out = [config["base_data_note"] + f"; base trained {config['base_steps']} steps, then "
           f"fine-tuned {config['steps']} steps on the target (lr {config['lr']:g} full, "
           f"{config['lora_lr']:g} LoRA)."]
    for r in records:
        out.append(
            f"{r['setting']} ({r['trainable_params']:,} trainable parameters, {r['seeds']} "
            f"run{'s' if r['seeds'] != 1 else ''}): own-image copies "
            f"{row_ci(r, 'own_copies')}, any-image copies "
            f"{row_ci(r, 'any_copies')}, re-ID leaks "
            f"{row_ci(r, 'reid_leaks', True, NOT_MEASURED)} of "
            "generations (of the prompt's own patient "
            + row_ci(r, "reid_leaks_own", True, NOT_MEASURED)
            + "), empty-prompt copies "
            f"{row_ci(r, 'empty_prompt_copies')}, "
            f"in-domain FID {row_ci(r, 'fid', False)}"
            + ("" if r["train_seconds_mean"] is None else
               f", {row_ci(r, 'train_seconds', False)} s of "
               "fine-tuning") + ".")
    full = next((r for r in records if r["setting"] == "full"), None)
    for r in records:
        if full is None or r["rank"] is None:
            continue
        a, b = r["any_copies_mean"], full["any_copies_mean"]
        if a is None or b is None:
            continue
        sep = intervals_apart(r, full, "any_copies")
        out.append(f"{r['setting']} vs full: any-image copy rate {a - b:+.0%} "
                   + ("(the 95% intervals do not overlap)." if sep else
                      "(within the seeds' 95% intervals: not distinguishable with these runs)."))
    n = (records[-1]["runs"][0].get("planted_prompts") if records and records[-1]["runs"]
         else None)
    if n:
        out.append(f"{n} planted prompts per run: one prompt moves a copy rate by {1 / n:.0%}.")
    out.append("Re-ID leaks: " + config["reid_leaks"] + ".")
    return out

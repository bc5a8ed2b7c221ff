"""``diffmem bench detect``: how well and how fast the detector finds planted memorization.

A *scenario* is a JSON preset (``diffmem/detect/scenarios/<name>.json``) naming the synthetic
data (preset and seed), the model (preset and training settings) and the detection settings.
:func:`bench_detect` builds the data and trains the model when they are not given (cached under
``$DIFFMEM_CACHE``, default ``~/.cache/diffmem``), runs :func:`~diffmem.detect.detector.detect`
on a fresh output folder and reports, per score, ROC AUC and TPR at 1 % FPR against the planted
ground truth and prompts per second; the nearest-neighbour verdict rates on planted and other
prompts; and the reference protocol of Wen et al. and Dutt et al. (each prompt alone,
4 generations x 50 DDIM steps, full classifier-free guidance, noise magnitude averaged over all
steps) on a subset of the same prompts, with the speed ratio of the batched first-step scan.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import ConfigError, OutputError
from diffmem.presets import preset_names, read_preset_json
from diffmem.store import prompt_hash
from diffmem.utils import progress, sha256_text, stable_json

log = logging.getLogger(__name__)

__all__ = ["BenchResult", "Scenario", "bench_detect", "cache_dir", "format_bench",
           "list_scenarios", "load_scenario"]

SCENARIO_DIR = Path(__file__).with_name("scenarios")
_SECTIONS = ("data", "model", "detect", "reference")
_REFERENCE_DEFAULTS = {"generations": 4, "steps": 50, "num_inference_steps": 50,
                       "max_prompts": 40}


@dataclass(frozen=True)
class Scenario:
    """A benchmark preset (see the module docstring).

    Attributes
    ----------
    name, description : str
    data : dict
        ``preset`` and ``seed`` of :func:`diffmem.data.synth.synthesize`.
    model : dict
        ``preset`` and the :class:`~diffmem.train.TrainConfig` fields to train with
        (``lr``, ``batch_size``, ``steps``, ``seed``...).
    detect : dict
        :class:`~diffmem.detect.detector.DetectionConfig` fields.
    reference : dict
        The reference protocol: ``generations``, ``steps``, ``num_inference_steps`` and
        ``max_prompts`` (the subset it is measured on; 0 skips it).
    source : str
    """

    name: str
    description: str
    data: dict[str, Any]
    model: dict[str, Any]
    detect: dict[str, Any]
    reference: dict[str, Any]
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "data": dict(self.data),
                "model": dict(self.model), "detect": dict(self.detect),
                "reference": dict(self.reference), "source": self.source}


def list_scenarios() -> list[str]:
    """Names of the shipped benchmark scenarios.

    Examples
    --------
    >>> {"demo", "tiny"} <= set(list_scenarios())
    True
    """
    return preset_names(SCENARIO_DIR)


def load_scenario(name_or_path: str | os.PathLike | Scenario) -> Scenario:
    """A scenario by name (``"demo"``) or from a JSON file.

    Raises
    ------
    ConfigError
        For an unknown name (the message lists the known ones), unreadable JSON, or a
        missing section.

    Examples
    --------
    >>> load_scenario("demo").model["steps"]
    1200
    """
    if isinstance(name_or_path, Scenario):
        return name_or_path
    name, path, doc = read_preset_json(name_or_path, SCENARIO_DIR, kind="benchmark scenario")
    missing = [s for s in _SECTIONS[:3] if not isinstance(doc.get(s), dict)]
    if missing:
        raise ConfigError(f"scenario {str(path)!r} lacks the section(s) {missing}; it needs "
                          "'data', 'model' and 'detect' objects")
    for section, keys in (("data", ("preset", "seed")), ("model", ("preset",))):
        absent = [k for k in keys if k not in doc[section]]
        if absent:
            raise ConfigError(f"scenario {str(path)!r}: '{section}' lacks {absent}")
    return Scenario(name=name, description=str(doc.get("description", "")),
                    data=dict(doc["data"]), model=dict(doc["model"]), detect=dict(doc["detect"]),
                    reference={**_REFERENCE_DEFAULTS, **dict(doc.get("reference") or {})},
                    source=str(path))


def cache_dir() -> Path:
    """Where benchmark data and models are kept: ``$DIFFMEM_CACHE`` or ``~/.cache/diffmem``."""
    env = os.environ.get("DIFFMEM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffmem"


@dataclass
class BenchResult:
    """What :func:`bench_detect` measured (see :meth:`to_dict` and :func:`format_bench`)."""

    scenario: Scenario
    machine: dict[str, Any]
    sizes: dict[str, Any]
    seeds: dict[str, Any]
    scores: list[dict[str, Any]]
    verdicts: dict[str, Any]
    reference: dict[str, Any] | None
    speed_ratio: float | None
    wall_seconds: dict[str, float]
    paths: dict[str, str]
    detection: Any = field(default=None, repr=False)
    two_stage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario.to_dict(), "machine": dict(self.machine),
                "sizes": dict(self.sizes), "seeds": dict(self.seeds),
                "scores": [dict(s) for s in self.scores], "verdicts": dict(self.verdicts),
                "reference": None if self.reference is None else dict(self.reference),
                "speed_ratio": self.speed_ratio, "wall_seconds": dict(self.wall_seconds),
                "paths": dict(self.paths),
                "two_stage": None if self.two_stage is None else dict(self.two_stage)}


def machine_info() -> dict[str, Any]:
    """The machine the numbers were measured on."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "python": platform.python_version(),
            "torch": torch.__version__}


def _data(scenario: Scenario, data: Any, cache: Path) -> Path:
    if data is not None:
        return Path(data)
    from diffmem.data.synth import synthesize

    folder = cache / "data" / f"{scenario.data['preset']}-seed{int(scenario.data['seed'])}"
    card = folder / "dataset_card.json"
    complete = False
    if card.is_file():
        try:
            complete = bool(json.loads(card.read_text(encoding="utf-8")).get("complete"))
        except (OSError, ValueError):
            complete = False
    if not complete:
        log.info("synthesizing %s data (seed %s) into %s", scenario.data["preset"],
                 scenario.data["seed"], folder)
        synthesize(folder, preset=scenario.data["preset"], seed=int(scenario.data["seed"]),
                   overwrite=folder.exists())
    return folder


def _model(scenario: Scenario, model: Any, dataset: Any, cache: Path) -> tuple[Path, float]:
    if model is not None:
        return Path(model), 0.0
    from diffmem.train import TrainConfig, train

    settings = dict(scenario.model)
    key = sha256_text(stable_json({"model": settings,
                                   "data": dataset.subset(split="train").fingerprint()}))[:12]
    folder = cache / "models" / f"{scenario.name}-{key}"
    if (folder / "model_index.json").is_file():
        return folder, 0.0
    log.info("training the scenario's model into %s (%s steps; interrupted runs resume)",
             folder, settings.get("steps", "preset"))
    started = time.perf_counter()
    fields = {k: v for k, v in settings.items() if k != "preset"}
    config = TrainConfig(preset=settings["preset"], **fields)
    resume = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    train(dataset, folder, config=config, resume=resume)
    return folder, time.perf_counter() - started


def _subset(prompts: list[Any], n: int) -> list[Any]:
    """Up to ``n`` labelled prompts, half planted and half not where possible, in a fixed
    (hash) order."""
    pos = sorted((p for p in prompts if p.label == 1), key=lambda p: prompt_hash(p.prompt))
    neg = sorted((p for p in prompts if p.label == 0), key=lambda p: prompt_hash(p.prompt))
    k = min(len(pos), n // 2)
    chosen = pos[:k] + neg[:n - k]
    if len(chosen) < n:
        chosen += pos[k:k + n - len(chosen)]
    return chosen


def _score_rows(result: Any, config: Any) -> list[dict[str, Any]]:
    """One row per score: AUC, TPR at 1% FPR, speed, settings."""
    scores: list[dict[str, Any]] = []
    for name, timing_key in (("noise_magnitude", "noise_magnitude"),
                             ("attention_entropy", "attention_entropy"),
                             ("nn_similarity", "nn")):
        ev = result.evaluations.get(name)
        timing = result.timings.get(timing_key)
        if ev is None and timing is None:
            continue
        scores.append({
            "score": name,
            "auc": None if ev is None else round(ev.auc, 4),
            "tpr_at_1pct_fpr": None if ev is None else round(ev.tpr_at_1pct_fpr, 4),
            "prompts_per_second": None if timing is None else timing["prompts_per_second"],
            "seconds": None if timing is None else timing["seconds"],
            "prompts": None if timing is None else timing["prompts"],
            "settings": (f"{config.generations} generation(s) x first {config.steps} step(s), "
                         "batched" if name != "nn_similarity" else
                         f"{config.images_per_prompt} generation(s) x {config.sample_steps} "
                         f"DDIM steps, {result.config.backend} backend")})
    return scores


def bench_detect(scenario: str | os.PathLike | Scenario = "demo", *, model: Any = None,
                 data: Any = None, out: str | os.PathLike | None = None,
                 reference_prompts: int | None = None,
                 threads: int | None = None, device: str | None = None,
                 dtype: str | None = None) -> BenchResult:
    """Run a benchmark scenario (see the module docstring).

    Parameters
    ----------
    scenario : str, path or Scenario
        A scenario name (:func:`list_scenarios`) or JSON file.
    model : path, optional
        A trained model folder; default: train the scenario's model (cached).
    data : path, optional
        The scenario's data; default: synthesize it (cached).
    out : path, optional
        Folder for the detection run's files (``out/detect``); default: a new folder in the
        cache. It must not hold an earlier scan (the benchmark times a fresh one).
    reference_prompts : int, optional
        Prompts the reference protocol is measured on (default: the scenario's
        ``max_prompts``; 0 skips it).
    threads : int, optional
        Torch threads for the whole benchmark (default: torch's choice).
    device, dtype : str, optional
        Device and precision the model is opened with (see
        :func:`~diffmem.models.load_model`); recorded with the machine.

    Returns
    -------
    BenchResult
    """
    from diffmem.detect.detector import DetectionConfig, detect
    from diffmem.models import load_model

    scenario = load_scenario(scenario)
    if threads is not None:
        import torch

        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads={threads!r}; use a positive integer")
        torch.set_num_threads(threads)
    cache = cache_dir()
    started = time.perf_counter()

    # 1. data and model (built or trained when not given)
    from diffmem.data import load

    data_path = _data(scenario, data, cache)
    dataset = load(data_path)
    model_path, train_seconds = _model(scenario, model, dataset, cache)
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = cache / "bench" / f"{scenario.name}-{stamp}-{os.getpid()}"
    run_dir = Path(out) / "detect"
    if (run_dir / "results.sqlite").exists():
        raise OutputError(f"{run_dir} already holds a scan; the benchmark times a fresh one: "
                          "choose a new --out")

    # 2. the product's scan
    detect_settings = dict(scenario.detect)
    if "methods" in detect_settings:
        detect_settings["methods"] = tuple(detect_settings["methods"])
    # exhaustive unless the scenario says otherwise: the nn AUC needs every prompt's verdict,
    # and it is the baseline of the two-stage row
    config = DetectionConfig(**{"confirm": "all", **detect_settings})
    adapter = load_model(model_path, device=device, dtype=dtype)
    t0 = time.perf_counter()
    result = detect(adapter, dataset, run_dir, config=config,
                    command=["diffmem", "bench", "detect", "--scenario", scenario.name])
    detect_seconds = time.perf_counter() - t0
    two_stage = None
    if "nn" in config.methods and config.confirm == "all":
        two_stage = _two_stage_row(adapter, dataset, Path(out) / "detect-two-stage", config,
                                   result, detect_seconds)

    main = [p for p in result.prompts if p.kind == "train"]
    scores = _score_rows(result, config)

    # 3. the reference protocol on a subset of the same prompts
    ref = scenario.reference
    n_ref = int(ref["max_prompts"] if reference_prompts is None else reference_prompts)
    reference, speed_ratio = _reference_protocol(adapter, main, result, config, ref, n_ref)

    # 4. sizes, seeds, machine
    dataset_counts = {"train": 0, "validate": 0, "test": 0, **dataset.split_counts()}
    sizes = {"train_images": dataset_counts["train"],
             "heldout_images": dataset_counts["validate"] + dataset_counts["test"],
             "prompts": len(main), "planted_prompts": sum(p.label == 1 for p in main),
             "model_parameters": int(sum(p.numel() for p in adapter.unet.parameters()) +
                                     sum(p.numel() for p in adapter.text_encoder.parameters())),
             "image_size": adapter.image_size}
    seeds = {"data": scenario.data.get("seed"), "model": scenario.model.get("seed"),
             "detect": config.seed}
    verdicts = {k: result.rates[k] for k in ("planted", "not_planted", "unrelated",
                                             "unconditional") if k in result.rates}
    if result.threshold is not None:
        verdicts["threshold"] = result.threshold.to_dict()
    bench = BenchResult(
        scenario=scenario, machine={**machine_info(), "device": str(adapter.device),
                                    "dtype": str(adapter.dtype).replace("torch.", "")},
        sizes=sizes, seeds=seeds, scores=scores,
        verdicts=verdicts, reference=reference, speed_ratio=speed_ratio,
        wall_seconds={"train": round(train_seconds, 1), "detect": round(detect_seconds, 1),
                      "reference": None if reference is None else reference["seconds"],
                      "total": round(time.perf_counter() - started, 1)},
        paths={"data": str(data_path), "model": str(model_path), "out": str(run_dir)},
        detection=result, two_stage=two_stage)
    try:
        from diffmem.utils import write_json

        write_json(Path(out) / "bench.json", bench.to_dict())
    except OSError as e:
        raise OutputError(f"cannot write {Path(out) / 'bench.json'}: {e.strerror}") from None
    return bench


def _reference_protocol(adapter: Any, main: list, result: Any, config: Any,
                        ref: dict[str, Any], n_ref: int) -> tuple[dict | None, float | None]:
    """The reference protocol (each prompt alone, several generations and steps) on a labelled
    subset of ``main``: its AUC and speed beside the fast batched score of the same prompts."""
    from diffmem.detect.detector import _quiet_truncation
    from diffmem.detect.evaluate import evaluate
    from diffmem.detect.scores import default_guidance, noise_magnitude

    reference = None
    speed_ratio = None
    labelled = [p for p in main if p.label is not None]
    if n_ref > 0 and labelled:
        subset = _subset(labelled, n_ref)
        guidance = default_guidance(adapter) if config.guidance is None else config.guidance
        values = []
        t0 = time.perf_counter()
        with _quiet_truncation():
            for p in progress(subset, desc="reference protocol", unit="prompt"):
                values.append(float(noise_magnitude(
                    adapter, [p.prompt], generations=int(ref["generations"]),
                    steps=int(ref["steps"]), num_inference_steps=int(ref["num_inference_steps"]),
                    seed=config.seed, batch_size=int(ref["generations"]), guidance=guidance)[0]))
        ref_seconds = time.perf_counter() - t0
        y = np.array([p.label for p in subset])
        fast = np.array([p.noise_magnitude for p in subset], dtype=np.float64)
        reference = {
            "protocol": (f"each prompt alone, {ref['generations']} generations x "
                         f"{ref['steps']} of {ref['num_inference_steps']} DDIM steps, "
                         f"guidance {guidance:g}, noise magnitude averaged over steps and "
                         "generations (Wen et al.; Dutt et al.)"),
            "prompts": len(subset), "planted": int(y.sum()),
            "seconds": round(ref_seconds, 3),
            "prompts_per_second": round(len(subset) / ref_seconds, 4),
            "auc": None, "tpr_at_1pct_fpr": None, "fast_auc_on_subset": None,
            "fast_tpr_on_subset": None}
        if 0 < y.sum() < len(y):
            ev_ref = evaluate(np.array(values), y)
            reference.update(auc=round(ev_ref.auc, 4), tpr_at_1pct_fpr=round(
                ev_ref.tpr_at_1pct_fpr, 4))
            if np.all(np.isfinite(fast)):
                ev_fast = evaluate(fast, y)
                reference.update(fast_auc_on_subset=round(ev_fast.auc, 4),
                                 fast_tpr_on_subset=round(ev_fast.tpr_at_1pct_fpr, 4))
        fast_pps = (result.timings.get("noise_magnitude") or {}).get("prompts_per_second")
        if fast_pps:
            speed_ratio = round(fast_pps / reference["prompts_per_second"], 1)
    return reference, speed_ratio


def _two_stage_row(adapter: Any, dataset: Any, run_dir: Path, config: Any, exhaustive: Any,
                   exhaustive_seconds: float) -> dict[str, Any]:
    """A fresh two-stage run (``--confirm screen``, same settings and seed) against the
    exhaustive one just measured: wall time, speed-up, planted prompts found, the audit."""
    from dataclasses import replace

    from diffmem.detect.detector import detect

    t0 = time.perf_counter()
    result = detect(adapter, dataset, run_dir, config=replace(config, confirm="screen"),
                    command=["diffmem", "bench", "detect", "(two-stage)"])
    seconds = time.perf_counter() - t0

    def found(res: Any, label: int) -> str:
        group = [p for p in res.of_kind("train") if p.label == label]
        return f"{sum(bool(p.memorized) for p in group)}/{len(group)}"

    screen = result.screen.to_dict()
    return {"seconds": round(seconds, 1), "exhaustive_seconds": round(exhaustive_seconds, 1),
            "speedup": round(exhaustive_seconds / seconds, 2) if seconds > 0 else None,
            "planted_memorized": found(result, 1),
            "planted_memorized_exhaustive": found(exhaustive, 1),
            "not_planted_memorized": found(result, 0),
            "not_planted_memorized_exhaustive": found(exhaustive, 0),
            "confirmed_prompts": (result.timings.get("nn") or {}).get("prompts"),
            "screen": screen, "out": str(run_dir)}


def format_bench(result: BenchResult) -> str:
    """The benchmark as a few lines of text (what ``diffmem bench detect`` prints)."""
    m, s = result.machine, result.sizes
    lines = [
        f"scenario {result.scenario.name}: {result.scenario.description}",
        (f"machine: {m['platform']}, {m['cpus']} CPU(s), {m['torch_threads']} torch "
         f"thread(s), CUDA {'yes' if m['cuda'] else 'no'}, torch {m['torch']}"
         + (f"; model on {m['device']} in {m['dtype']}" if "device" in m else "")),
        (f"seeds: data {result.seeds['data']}, model {result.seeds['model']}, "
         f"detect {result.seeds['detect']}"),
        (f"sizes: {s['train_images']} training images, {s['heldout_images']} held-out, "
         f"{s['prompts']} prompts ({s['planted_prompts']} planted), model "
         f"{s['model_parameters'] / 1e6:.2f}M parameters at {s['image_size']} px"),
        ""]
    lines.append(f"{'score':20s} {'AUC':>7s} {'TPR@1%FPR':>10s} {'prompts/s':>10s}  settings")
    for row in result.scores:
        auc = "-" if row["auc"] is None else f"{row['auc']:.3f}"
        tpr = "-" if row["tpr_at_1pct_fpr"] is None else f"{row['tpr_at_1pct_fpr']:.3f}"
        pps = "-" if row["prompts_per_second"] is None else f"{row['prompts_per_second']:.2f}"
        lines.append(f"{row['score']:20s} {auc:>7s} {tpr:>10s} {pps:>10s}  {row['settings']}")
    v = result.verdicts
    if "threshold" in v:
        t = v["threshold"]
        lines.append("")
        lines.append(f"copy threshold {t['value']:.4f} calibrated on {t['n']} held-out images "
                     f"at FPR {t['fpr']}" if t["fpr"] is not None else
                     f"copy threshold {t['value']:.4f} (fixed)")
    for key, name in (("planted", "planted prompts"), ("not_planted", "other prompts")):
        if key in v:
            r = v[key]
            lines.append(f"nn verdicts: {r['memorized']}/{r['prompts']} {name} memorized "
                         f"({r['rate']:.1%}); Gu et al. ratio criterion: "
                         f"{r['ratio_criterion']}/{r['prompts']}")
    for key in ("unrelated", "unconditional"):
        if key in v:
            r = v[key]
            lines.append(f"copies from {key} prompts: {r['copies']}/{r['generations']} "
                         "generations")
    if result.reference is not None:
        r = result.reference
        lines.append("")
        lines.append(f"reference protocol ({r['protocol']}) on {r['prompts']} of the prompts "
                     f"({r['planted']} planted):")
        auc = "-" if r["auc"] is None else f"{r['auc']:.3f}"
        tpr = "-" if r["tpr_at_1pct_fpr"] is None else f"{r['tpr_at_1pct_fpr']:.3f}"
        fauc = "-" if r["fast_auc_on_subset"] is None else f"{r['fast_auc_on_subset']:.3f}"
        ftpr = "-" if r["fast_tpr_on_subset"] is None else f"{r['fast_tpr_on_subset']:.3f}"
        lines.append(f"  reference: AUC {auc}, TPR@1%FPR {tpr}, "
                     f"{r['prompts_per_second']:.3f} prompts/s")
        lines.append(f"  batched first step on the same prompts: AUC {fauc}, TPR@1%FPR {ftpr}")
        if result.speed_ratio is not None:
            lines.append(f"  speed ratio (batched first-step scan / reference): "
                         f"{result.speed_ratio:g}x")
    t = result.two_stage
    if t is not None:
        sc = t["screen"]
        lines.append("")
        lines.append(f"two-stage (--confirm screen, same settings): {t['seconds']} s vs "
                     f"exhaustive {t['exhaustive_seconds']} s ({t['speedup']}x); planted "
                     f"memorized {t['planted_memorized']} (exhaustive "
                     f"{t['planted_memorized_exhaustive']}), other prompts "
                     f"{t['not_planted_memorized']} (exhaustive "
                     f"{t['not_planted_memorized_exhaustive']})")
        lines.append(f"  screen: {sc['flagged']} flagged, audit {sc['audit_size']}; "
                     f"{sc['statement']}")
    w = result.wall_seconds
    lines.append("")
    lines.append(f"wall time: train {w['train']} s, detect {w['detect']} s, reference "
                 f"{w['reference']} s, total {w['total']} s")
    lines.append(f"files: {result.paths['out']}")
    return "\n".join(lines)

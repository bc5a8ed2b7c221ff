"""Train a patient-verification network on a dataset's own patients (Packhäuser et al., Sci.
Rep. 2022: a siamese network that tells whether two chest radiographs show the same patient).

Pairs and loss
--------------
Each step draws ``patients_per_batch`` training patients and, for each, two records from
**different studies** whose images are not pixel-identical (planted exact duplicates re-filed
under new study ids never form a positive). Both images are augmented independently (zoom and
shift, i.e. a random crop; small rotations; brightness and contrast; a little noise; sometimes a
low-resolution round trip, as generated images are small) and embedded by one shared network.
The loss is the normalized-temperature cross-entropy (NT-Xent; Sohn, NeurIPS 2016 N-pair loss,
Chen et al., ICML 2020): for each image, its partner study is the positive and the other
``2 P - 2`` images of the batch, all of other patients, are the negatives. This differs from
Packhäuser et al.'s binary cross-entropy on a merged pair feature (see
:mod:`diffmem.reid.network`); in-batch negatives give ``2 P - 2`` different-patient pairs per
image and step instead of one.

Because positives are different studies, matching pixels does not solve the task: a network
that only recognised copies of one image would score follow-ups with new findings, devices or
positioning as strangers. :func:`diffmem.reid.evaluate_reid` reports the AUC on exactly those
non-near-duplicate pairs.

Held-out patients
-----------------
Validation uses patients the network never saw: the dataset's ``validate`` split when it has a
patient with two studies (MIMIC-style splits never share patients), otherwise a seeded
``validation_fraction`` of the training patients, removed from training. The validation AUC and
TPR at 1 % FPR go into the model card.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from diffmem.checks import check_int, check_positive, package_versions
from diffmem.data import CXRDataset
from diffmem.errors import ConfigError, DataError, TrainingError
from diffmem.reid.network import PatientVerifier, build_network, model_config, save_reid_model
from diffmem.reid.pairs import NO_TWO_STUDIES, patient_records, require_two_studies
from diffmem.reid.presets import ReIDPreset, load_preset
from diffmem.utils import prepare_out_dir, progress_bar

log = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003
_VALIDATION_PAIRS = (1000, 2000)  # positive, negative pairs sampled for the model card


@dataclass
class ReIDTrainResult:
    """What :func:`train_reid` produced.

    Attributes
    ----------
    out : str
        The model folder (load it with :func:`diffmem.reid.load_reid_model`).
    steps : int
    initial_loss, final_loss : float
        Mean loss over the first and the last ``min(10, steps)`` steps.
    losses : list of float
    train_patients, train_records : int
        Patients (with two usable studies) and records trained on.
    validation : dict
        ``source`` (``"validate split"``, ``"held-out training patients"`` or ``"none"``),
        ``patients``, ``pairs``, ``auc``, ``tpr_at_1pct_fpr``.
    wall_seconds : float
    model : PatientVerifier
        The trained model, in memory (not part of :meth:`to_dict`).
    """

    out: str
    steps: int
    initial_loss: float
    final_loss: float
    losses: list[float]
    train_patients: int
    train_records: int
    validation: dict[str, Any]
    wall_seconds: float
    model: PatientVerifier | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything but the in-memory model."""
        d = asdict(self)
        d.pop("model")
        return d


def _usable_patients(train_set: CXRDataset, group_of: np.ndarray) -> dict[str, list[int]]:
    """Training patients with two records of different studies and different pixels."""
    out = {}
    for p, idx in patient_records(train_set).items():
        keys = {(train_set[i].study_id, int(group_of[i])) for i in idx}
        if len({s for s, _ in keys}) >= 2 and len({g for _, g in keys}) >= 2:
            out[p] = idx
    return out


def _split_validation(dataset: CXRDataset, train_set: CXRDataset, fraction: float,
                      seed: int) -> tuple[CXRDataset, CXRDataset | None, str]:
    """(training records, validation records or None, where validation comes from)."""
    val = dataset.subset(split="validate")
    try:
        require_two_studies(val, what="validate split")
        return train_set, val, "validate split"
    except DataError:
        pass
    patients = sorted(patient_records(train_set))
    eligible = sorted(require_two_studies(train_set, what="training split"))
    n_val = int(round(fraction * len(eligible)))
    if n_val < 2 or len(eligible) - n_val < 2:
        log.warning("too few patients with two studies (%d) to hold some out for validation; "
                    "the model card has no validation AUC", len(eligible))
        return train_set, None, "none"
    rng = np.random.default_rng(seed)
    held = set(rng.choice(eligible, size=n_val, replace=False).tolist())
    keep = [i for i, s in enumerate(train_set) if s.patient_id not in held]
    val_idx = [i for i, s in enumerate(train_set) if s.patient_id in held]
    log.info("validation: %d of %d training patients held out (the validate split has no "
             "patient with two studies)", len(held), len(patients))
    return train_set.subset(indices=keep), train_set.subset(indices=val_idx), \
        "held-out training patients"


def _batch(patients: list[list[int]], studies: list[str], group_of: np.ndarray, size: int,
           seed: int, step: int) -> tuple[list[int], list[int]]:
    """Step ``step``: ``size`` distinct patients (seeded epochs, drawn as the in-domain encoder
    draws its image groups), then two usable records of each: different studies, different
    pixels."""
    import torch

    from diffmem.embed.training import _batch as draw_groups

    picked = draw_groups([[k] for k in range(len(patients))], size, seed, step)
    gen = torch.Generator().manual_seed((seed * _SEED_STRIDE + step) * 4 + 3)

    def partners_of(a: int, idx: list[int]) -> list[int]:
        return [i for i in idx if studies[i] != studies[a] and group_of[i] != group_of[a]]

    first, second = [], []
    for p in picked:
        idx = patients[p]
        starts = [i for i in idx if partners_of(i, idx)]
        a = starts[int(torch.randint(len(starts), (1,), generator=gen))]
        partners = partners_of(a, idx)
        first.append(a)
        second.append(partners[int(torch.randint(len(partners), (1,), generator=gen))])
    return first, second


def nt_xent(z_a, z_b, temperature: float):
    """NT-Xent loss of two (P, D) embedding batches whose rows ``i`` are positive partners.

    Examples
    --------
    >>> import torch
    >>> z = torch.nn.functional.normalize(torch.eye(4)[:, :3] + 0.01, dim=1)
    >>> round(float(nt_xent(z, z, 0.1)), 4) < round(float(nt_xent(z, z.roll(1, 0), 0.1)), 4)
    True
    """
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    n = len(z_a)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -1e9)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def _check_overrides(p: ReIDPreset, steps, patients_per_batch, lr, image_size, seed):
    tr = p.training
    steps = check_int("steps", tr["steps"] if steps is None else steps)
    size = check_int("patients_per_batch",
                         tr["patients_per_batch"] if patients_per_batch is None
                         else patients_per_batch)
    if size < 2:
        raise ConfigError(f"patients_per_batch={size}; use at least 2 (negatives are the other "
                          "patients of the batch)")
    lr = check_positive("lr", tr["lr"] if lr is None else lr)
    image_size = p.image_size if image_size is None else check_int("image_size", image_size)
    if image_size < 16:
        raise ConfigError(f"image_size={image_size}; use at least 16 px")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r}; expected an integer >= 0")
    return steps, size, lr, image_size, int(seed)


@dataclass
class _PatientPool:
    """The training patients of a re-ID run: records, images, study groups, batch size."""

    train_set: CXRDataset
    val_set: CXRDataset | None
    val_source: str
    images: Any
    group_of: np.ndarray
    patients: list
    studies: list[str]
    batch_patients: int


def _patient_pool(dataset: CXRDataset, full_train: CXRDataset, *, split: str, size: int,
                  seed: int, validation_fraction: float, batch_patients: int) -> _PatientPool:
    """Split off held-out validation patients and keep the training patients with two studies
    whose images differ (``batch_patients`` capped at their number)."""
    from diffmem.embed.training import _TrainingImages

    train_set, val_set, val_source = _split_validation(dataset, full_train,
                                                       validation_fraction, seed)
    images = _TrainingImages(train_set, size)
    group_of = np.empty(len(train_set), dtype=np.int64)
    for g, members in enumerate(images.groups):
        group_of[members] = g
    usable = _usable_patients(train_set, group_of)
    if not usable:
        raise DataError(f"{NO_TWO_STUDIES} whose images differ in the {split!r} split (planted "
                        "exact duplicates under new study ids do not count)", path=dataset.root)
    if batch_patients > len(usable):
        log.info("patients_per_batch=%d exceeds the %d usable training patients; using %d",
                 batch_patients, len(usable), len(usable))
        batch_patients = len(usable)
    if batch_patients < 2:
        raise DataError(f"only {len(usable)} training patient has two studies; contrastive "
                        "training needs at least 2 (the other patient gives the negatives)",
                        path=dataset.root)
    patient_ids = sorted(usable)
    patients = [usable[q] for q in patient_ids]
    studies = [s.study_id for s in train_set]
    return _PatientPool(train_set, val_set, val_source, images, group_of, patients, studies,
                        batch_patients)


def train_reid(data: CXRDataset | str | os.PathLike, out: str | os.PathLike, *,
               preset: str | os.PathLike | ReIDPreset = "demo", steps: int | None = None,
               patients_per_batch: int | None = None, lr: float | None = None,
               image_size: int | None = None, seed: int = 0, split: str = "train",
               device: str = "cpu") -> ReIDTrainResult:
    """Train a patient-verification network (Packhäuser et al., Sci. Rep. 2022) on a dataset's
    (same patient, different study) and (different patient) pairs.

    Parameters
    ----------
    data : CXRDataset or path
        The dataset (a path is read with :func:`diffmem.data.load`); the ``split`` records'
        patients are trained on.
    out : path
        The model folder to write (``reid.safetensors``, ``reid_config.json``, ``README.md``);
        it must not lie inside the data.
    preset : str, path or ReIDPreset, optional
        ``"demo"`` (default), ``"tiny"``, ``"resnet18"`` or a preset JSON path.
    steps, patients_per_batch, lr, image_size : optional
        Override the preset's values; ``patients_per_batch`` is capped at the number of usable
        training patients.
    seed : int, optional
        Seeds the weights, the batches, the augmentation and the validation pairs.
    split : str, optional
        Which split to train on.
    device : str, optional
        ``"cpu"`` (default) or a torch device such as ``"cuda"``.

    Returns
    -------
    ReIDTrainResult
        With the trained model in ``.model``.

    Raises
    ------
    DataError
        Without patient ids, or when no training patient has two studies with different images
        (``"cannot train or evaluate verification: no patient with two studies"``).
    ConfigError
        For a bad preset or override.
    OutputError
        When ``out`` lies inside the dataset.
    TrainingError
        When the loss becomes NaN or infinite.
    """
    import torch

    from diffmem.data import load
    from diffmem.embed.model import _prepare_images
    from diffmem.embed.training import _VERSIONED, _augment, _lr_factor

    t_start = time.time()
    # 1. check inputs
    p = load_preset(preset)
    steps, batch_patients, lr, size, seed = _check_overrides(p, steps, patients_per_batch, lr,
                                                             image_size, seed)
    tr = p.training
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'") from e
    dataset = data if isinstance(data, CXRDataset) else load(data)
    out = prepare_out_dir(out, inputs=[dataset.root])
    full_train = dataset.subset(split=split)
    require_two_studies(full_train, what=f"{split!r} split")

    # 2. patients: training and held-out validation
    pool = _patient_pool(dataset, full_train, split=split, size=size, seed=seed,
                         validation_fraction=float(tr["validation_fraction"]),
                         batch_patients=batch_patients)
    train_set, val_set, val_source = pool.train_set, pool.val_set, pool.val_source
    images, group_of, patients, studies = pool.images, pool.group_of, pool.patients, pool.studies
    batch_patients = pool.batch_patients

    # 3. network and optimizer (AdamW, warm-up + cosine, no decay on gains and biases)
    network = build_network(p.backbone, embed_dim=p.embed_dim, seed=seed).to(device)
    n_params = sum(t.numel() for t in network.parameters())
    decay = [t for t in network.parameters() if t.ndim >= 2]
    no_decay = [t for t in network.parameters() if t.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(tr["weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    log.info("training a %.2fM-parameter re-ID network (preset %r, %d px) on %d patients "
             "(%d records) for %d steps of %d patients", n_params / 1e6, p.name, size,
             len(patients), len(train_set), steps, batch_patients)

    # 4. training loop
    losses: list[float] = []
    network.train()
    bar = progress_bar(total=steps, desc="training re-ID", unit="step")
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(step, steps=steps, warmup=int(tr["warmup_steps"]))
            first, second = _batch(patients, studies, group_of, batch_patients, seed, step)
            gen = torch.Generator().manual_seed((seed * _SEED_STRIDE + step) * 4 + 1)
            x = images.get(first + second)
            x = _prepare_images(_augment(x, p.augment, gen), size).to(device)
            z = network(x)
            loss = nt_xent(z[:batch_patients], z[batch_patients:], float(tr["temperature"]))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"the re-ID loss became {value} at step {step}; lower the "
                                    f"learning rate (lr={lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(value)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    network.eval()

    # 5. validation on held-out patients, then save weights, config and card
    k = min(10, steps)
    initial, final = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    training = {"steps": steps, "patients_per_batch": batch_patients, "lr": lr, "seed": seed,
                "weight_decay": tr["weight_decay"], "warmup_steps": tr["warmup_steps"],
                "temperature": tr["temperature"], "augment": dict(p.augment),
                "initial_loss": initial, "final_loss": final,
                "loss_every_10_steps": [round(float(np.mean(losses[i:i + 10])), 4)
                                        for i in range(0, steps, 10)],
                "parameters": n_params, "device": str(device)}
    data_info = {"root": str(dataset.root), "format": dataset.format, "split": split,
                 "fingerprint": full_train.fingerprint(), "records": len(full_train),
                 "patients": len(patient_records(full_train)),
                 "trained_records": len(train_set), "trained_patients": len(patients)}
    config = model_config(p.backbone, embed_dim=p.embed_dim, image_size=size,
                          preset=p.to_dict(), data=data_info, training=training,
                          versions=package_versions(*_VERSIONED))
    model = PatientVerifier(network, config, path=str(out))
    validation = _validate(model, val_set, val_source, seed)
    wall = time.time() - t_start
    config["training"]["wall_seconds"] = round(wall, 1)
    config["validation"] = validation
    model.config = config
    save_reid_model(model, out, model_card(config))
    log.info("re-ID network trained in %.0f s: loss %.3f -> %.3f, validation AUC %s; saved to "
             "%s", wall, initial, final, validation.get("auc"), out)
    return ReIDTrainResult(out=str(out), steps=steps, initial_loss=initial, final_loss=final,
                           losses=losses, train_patients=len(patients),
                           train_records=len(train_set), validation=validation,
                           wall_seconds=wall, model=model)


def _validate(model: PatientVerifier, val_set: CXRDataset | None, source: str,
              seed: int) -> dict[str, Any]:
    from diffmem.reid.evaluation import evaluate_reid

    if val_set is None:
        return {"source": "none"}
    try:
        ev = evaluate_reid(model, val_set, split="all", n_positive=_VALIDATION_PAIRS[0],
                           n_negative=_VALIDATION_PAIRS[1], seed=seed)
    except DataError as e:  # e.g. one held-out patient: no negatives
        log.warning("no validation AUC: %s", e)
        return {"source": source, "error": str(e)}
    return {"source": source, "patients": ev.patients, "pairs": ev.pairs, "auc": ev.auc,
            "tpr_at_1pct_fpr": ev.tpr_at_1pct_fpr,
            "auc_not_near_duplicate": ev.near_duplicate.get("auc_not_near_duplicate")}


def model_card(config: Mapping[str, Any]) -> str:
    """The model card (``README.md``) of a re-ID model folder, from its config."""
    d, t, v = config["data"], config["training"], config.get("validation", {})
    auc = v.get("auc")
    val_line = (f"- validation on {v.get('patients')} held-out patients ({v.get('source')}, "
                f"{v.get('pairs')} sampled pairs): AUC {auc:.4f}, TPR at 1 % FPR "
                f"{v.get('tpr_at_1pct_fpr'):.3f}; AUC on same-patient pairs that are not pixel "
                f"near-duplicates: {_fmt(v.get('auc_not_near_duplicate'))}"
                if auc is not None else "- no validation (too few held-out patients)")
    return "\n".join([
        "# Patient re-identification model (diffmem.reid)",
        "",
        "A siamese patient-verification network (after Packhäuser et al., Sci. Rep. 2022): the "
        "cosine similarity of two images' embeddings says how likely they show the same "
        "patient.",
        "",
        f"- preset `{config['preset']['name']}`: backbone `{config['backbone']}`, "
        f"{config['image_size']} px, {config['embed_dim']}-d embeddings, "
        f"{t['parameters']} parameters;",
        f"- trained on the {d['split']!r} split of `{d['root']}` (format {d['format']}), data "
        f"fingerprint `{d['fingerprint']}` ({d['records']} records of {d['patients']} patients; "
        f"{d['trained_patients']} patients with two usable studies trained on);",
        f"- {t['steps']} steps of {t['patients_per_batch']} patients (two different studies "
        f"each), NT-Xent loss at temperature {t['temperature']}, seed {t['seed']}: loss "
        f"{t['initial_loss']:.3f} -> {t['final_loss']:.3f} in {t.get('wall_seconds', '?')} s on "
        f"{t['device']};",
        val_line,
        "",
        "It knows only the patients of its training data's population. Evaluate it on yours "
        "with `diffmem reid eval --model DIR --data DATA --out OUT`.",
        "",
    ])


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"

"""Large learning rates against memorization in denoising score matching: a toy reproduction of
Wu, Marion, Biau & Boyer, "Taking a Big Step: Large Learning Rates in Denoising Score Matching
Prevent Memorization" (COLT 2025).

The setting
-----------
A finite training set ``X = {x_1..x_n}`` in 1-D or 2-D is noised by the variance-preserving
(Ornstein-Uhlenbeck) process ``y = mu_t x + sigma_t eps`` with ``mu_t = exp(-t)`` and
``sigma_t^2 = 1 - exp(-2t)``. The minimizer of the denoising score-matching loss over *all*
functions is the **empirical optimal score** (:func:`empirical_optimal_score`)

    s*(y, t) = (mu_t E_w[x] - y) / sigma_t^2,   w_i ∝ exp(-||y - mu_t x_i||^2 / (2 sigma_t^2)),

and sampling the reverse process with it returns the training points (memorization). The paper
proves that SGD with a large enough learning rate cannot converge stably to a minimum whose
excess risk is arbitrarily small, so the learned score stays away from ``s*`` and the samples
spread. Here each noise level has its own two-layer ReLU network (the paper's 1-D architecture,
``f(y) = (1/sqrt(m)) sum_j a_j relu(w_j . y + b_j) + c``, trained by plain SGD on fresh
``(x_i, eps)`` minibatches) and the number of steps is ``flow_time / lr`` (the paper's rule:
epochs proportional to 1/lr, so every run covers the same gradient-flow time).

Memorization is measured three ways (:func:`memorization_metrics`): the maximum mean discrepancy
(Gaussian kernel) of the samples against samples drawn with ``s*`` and against samples of a
Gaussian fitted to the training set; the fraction of samples within ``epsilon`` of a training
point; and Gu et al.'s ratio criterion ``d1 / d2 < 1/3`` (nearest over second-nearest training
point distance; Gu et al., "On Memorization in Diffusion Models", TMLR 2025).

Deviations from the paper (stated in every output)
--------------------------------------------------
* One network per noise level on a geometric grid of ``levels`` times in ``[t_min, t_max]``
  (the paper's theory is at a fixed noise level; it does not prescribe a time embedding), and
  an ancestral (DDPM posterior) sampler on that grid.
* The networks predict the noise (``eps``-parametrization, ``s = -eps_hat / sigma_t``): the
  DSM loss weighted by ``sigma_t^2``, with a factor 1/2 (``0.5 ||eps_hat - eps||^2``).
* Small sizes for a CPU: ``n = 4`` points at least ``min_spacing`` apart, width 64, eight
  levels. The learning-rate scale depends on this parametrization: here lr 1.0-1.4 already
  give the "spread" regime the paper shows at lr 2, while lr 2.0 is beyond the stability limit
  of SGD at initialization and the run blows up (reported as ``diverged``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from diffmem.checks import check_int
from diffmem.errors import ConfigError
from diffmem.study.results import StudyResult, machine_info, write_study
from diffmem.utils import prepare_out_dir, progress

log = logging.getLogger(__name__)

__all__ = [
    "ToyConfig",
    "ToyRecord",
    "ToyRun",
    "run_toy",
    "run_toy_study",
    "empirical_eps_fn",
    "empirical_optimal_score",
    "gaussian_mmd",
    "make_training_set",
    "memorization_metrics",
    "sample_reverse",
    "train_score_network",
    "vp_schedule",
]

PAPER = ("Wu, Marion, Biau & Boyer, Taking a Big Step: Large Learning Rates in Denoising Score "
         "Matching Prevent Memorization, COLT 2025")


# ---------------------------------------------------------------------------- settings
@dataclass
class ToyConfig:
    """Settings of the toy study (defaults: the measured configuration).

    Attributes
    ----------
    dim : int
        1 or 2.
    n_train : int
        Training points, drawn from a standard Gaussian, at least ``min_spacing`` apart.
    min_spacing : float
        Smallest distance between two training points (redraws until it holds).
    width : int
        Hidden ReLU units of each two-layer network.
    levels : int
        Noise levels (one network each), geometric in ``[t_min, t_max]``.
    t_min, t_max : float
        Smallest and largest diffusion time.
    flow_time : float
        ``lr x steps`` of every run (steps = ``round(flow_time / lr)``: the paper's 1/lr rule).
    batch_size : int
        ``(x_i, eps)`` pairs per SGD step and level.
    init_scale : float
        Standard deviation of the first-layer weights and of the output weights at init.
    n_samples : int
        Reverse-process samples per run.
    epsilon : float
        Radius of "near a training point".
    ratio : float
        Gu et al.'s threshold on ``d1 / d2``.
    bandwidth : float
        Gaussian-kernel bandwidth of the MMD.
    """

    dim: int = 1
    n_train: int = 4
    min_spacing: float = 0.8
    width: int = 64
    levels: int = 8
    t_min: float = 0.02
    t_max: float = 2.0
    flow_time: float = 3000.0
    batch_size: int = 32
    init_scale: float = 0.3
    n_samples: int = 500
    epsilon: float = 0.05
    ratio: float = 1 / 3
    bandwidth: float = 0.2

    def validated(self) -> ToyConfig:
        """This config, checked.

        Raises
        ------
        ConfigError
            Naming the setting, its value and what would work.
        """
        if self.dim not in (1, 2):
            raise ConfigError(f"dim={self.dim!r}; the toy study runs in 1 or 2 dimensions")
        for name in ("n_train", "width", "levels", "batch_size", "n_samples"):
            check_int(name, getattr(self, name), low=3 if name == "n_train" else 1)
        for name in ("min_spacing", "t_min", "flow_time", "init_scale", "epsilon", "bandwidth"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name}={value!r}; use a positive number")
        if not self.t_max > self.t_min:
            raise ConfigError(f"t_max={self.t_max!r} must be larger than t_min={self.t_min!r}")
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio!r}; use a number in (0, 1] (Gu et al.: 1/3)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_lrs(lrs: Sequence[float]) -> list[float]:
    out = []
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
                or lr <= 0:
            raise ConfigError(f"learning rate {lr!r}; use positive numbers, e.g. "
                              "--lrs 0.05,0.1,0.5,2.0")
        out.append(float(lr))
    if not out:
        raise ConfigError("no learning rate given; use e.g. --lrs 0.05,0.1,0.5,2.0")
    return out


# ---------------------------------------------------------------------------- the math
def vp_schedule(t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """``(mu_t, sigma_t)`` of the variance-preserving process: ``exp(-t)``,
    ``sqrt(1 - exp(-2t))``.

    Examples
    --------
    >>> mu, sigma = vp_schedule(0.5)
    >>> bool(np.isclose(mu**2 + sigma**2, 1.0))
    True
    """
    t = np.asarray(t, dtype=np.float64)
    return np.exp(-t), np.sqrt(-np.expm1(-2 * t))


def empirical_optimal_score(y: np.ndarray, t: float, train: np.ndarray) -> np.ndarray:
    """The empirical optimal score of a finite training set (Wu et al., COLT 2025, eq. of s*).

    ``s*(y, t) = (mu_t E_w[x] - y) / sigma_t^2`` with softmax weights
    ``w_i ∝ exp(-||y - mu_t x_i||^2 / (2 sigma_t^2))``: the exact minimizer of denoising score
    matching over all functions, which copies the training set when sampled.

    Parameters
    ----------
    y : array, shape (M, d)
    t : float
        Diffusion time (> 0).
    train : array, shape (n, d)

    Returns
    -------
    numpy.ndarray, shape (M, d)

    Examples
    --------
    >>> x = np.array([[0.0], [2.0]])
    >>> s = empirical_optimal_score(np.array([[0.1]]), 0.01, x)  # points back to mu x_1 = 0
    >>> bool(s[0, 0] < 0)
    True
    """
    mu, sigma = vp_schedule(t)
    y = np.asarray(y, dtype=np.float64)
    logits = -((y[:, None, :] - mu * train[None]) ** 2).sum(-1) / (2 * sigma**2)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    return (mu * (w @ train) - y) / sigma**2


def make_training_set(n: int, dim: int, *, min_spacing: float, seed: int) -> np.ndarray:
    """``n`` standard-Gaussian points in ``dim`` dimensions, redrawn until every pair is at least
    ``min_spacing`` apart (seeded)."""
    rng = np.random.default_rng(seed)
    for _ in range(10_000):
        x = rng.standard_normal((n, dim))
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        if d.min() >= min_spacing:
            return x
    raise ConfigError(f"could not draw {n} points {min_spacing} apart in {dim}-D; lower "
                      "min_spacing or n_train")


@dataclass
class _Nets:
    """One two-layer ReLU network per noise level: ``(1/sqrt(m)) relu(y W + b) A + c``."""

    W: np.ndarray  # (K, d, m)
    b: np.ndarray  # (K, 1, m)
    A: np.ndarray  # (K, m, d)
    c: np.ndarray  # (K, 1, d)

    def eps(self, y: np.ndarray, k: int) -> np.ndarray:
        m = self.W.shape[2]
        return np.maximum(y @ self.W[k] + self.b[k], 0) @ self.A[k] / np.sqrt(m) + self.c[k]


def _init_nets(cfg: ToyConfig, rng: np.random.Generator) -> _Nets:
    K, d, m = cfg.levels, cfg.dim, cfg.width
    W = rng.standard_normal((K, d, m)) * cfg.init_scale
    # kinks spread over the data range: b_j = -w_j . (c_j, ..., c_j), c_j ~ U(-3, 3)
    b = -(rng.uniform(-3, 3, (K, 1, m)) * W.sum(axis=1, keepdims=True))
    A = rng.standard_normal((K, m, d)) * cfg.init_scale
    return _Nets(W=W, b=b, A=A, c=np.zeros((K, 1, d)))


def train_score_network(train: np.ndarray, lr: float, cfg: ToyConfig, *, seed: int,
                        ) -> tuple[_Nets, dict[str, Any]]:
    """SGD on denoising score matching, one two-layer ReLU network per noise level (Wu et al.,
    COLT 2025; ``steps = flow_time / lr``).

    Returns the networks and a dict with ``steps``, ``epochs``, ``final_loss`` (after the last
    update, on a fresh batch, mean over the levels), ``final_loss_per_level``, ``diverged`` and
    ``seconds``. A run whose loss overflows stops there; it, and a run that ends with a loss
    ten times that of predicting zero noise, is reported as diverged.
    """
    rng = np.random.default_rng(seed)
    nets = _init_nets(cfg, rng)
    ts = np.geomspace(cfg.t_min, cfg.t_max, cfg.levels)
    mu, sigma = vp_schedule(ts)
    mu, sigma = mu[:, None, None], sigma[:, None, None]
    steps = max(1, int(round(cfg.flow_time / lr)))
    K, B, m = cfg.levels, cfg.batch_size, cfg.width
    diverged, done = False, 0
    t0 = time.perf_counter()
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(steps):
            idx = rng.integers(0, len(train), (K, B))
            eps = rng.standard_normal((K, B, cfg.dim))
            y = mu * train[idx] + sigma * eps
            h = y @ nets.W + nets.b
            a = np.maximum(h, 0)
            r = a @ nets.A / np.sqrt(m) + nets.c - eps
            loss = 0.5 * (r**2).sum(axis=2).mean(axis=1)
            done = step + 1
            if not np.all(np.isfinite(loss)) or loss.max() > 1e6:
                diverged = True
                break
            g = r / B
            gA = a.transpose(0, 2, 1) @ g / np.sqrt(m)
            gc = g.sum(axis=1, keepdims=True)
            ga = (g @ nets.A.transpose(0, 2, 1)) / np.sqrt(m) * (h > 0)
            gW = y.transpose(0, 2, 1) @ ga
            gb = ga.sum(axis=1, keepdims=True)
            nets.W -= lr * gW
            nets.b -= lr * gb
            nets.A -= lr * gA
            nets.c -= lr * gc
    # the loss after the last update, on a fresh batch of 256 pairs per level
    with np.errstate(over="ignore", invalid="ignore"):
        idx = rng.integers(0, len(train), (K, 256))
        eps = rng.standard_normal((K, 256, cfg.dim))
        y = mu * train[idx] + sigma * eps
        r = np.maximum(y @ nets.W + nets.b, 0) @ nets.A / np.sqrt(m) + nets.c - eps
        per_level = 0.5 * (r**2).sum(axis=2).mean(axis=1)
    # far worse than the trivial predictor eps_hat = 0 (loss dim / 2): SGD is not converging
    diverged = diverged or not np.all(np.isfinite(per_level)) \
        or bool(per_level.max() > 10 * 0.5 * cfg.dim)
    if diverged:
        per_level = np.full(K, np.nan)
    info = {"steps": done, "planned_steps": steps, "epochs": round(done * B / len(train), 1),
            "final_loss": float(np.mean(per_level)) if not diverged else math.nan,
            "final_loss_per_level": [float(v) for v in per_level], "diverged": diverged,
            "seconds": round(time.perf_counter() - t0, 3)}
    return nets, info


def sample_reverse(eps_fn, cfg: ToyConfig, *, n: int, seed: int) -> np.ndarray:
    """Ancestral sampling of the reverse process on the noise-level grid (DDPM posterior steps,
    Ho et al. 2020, for the VP process), ending with the Tweedie denoiser at ``t_min``.

    ``eps_fn(y, k)`` predicts the noise at level ``k``; the score is ``-eps / sigma_k``.
    """
    rng = np.random.default_rng(seed)
    ts = np.geomspace(cfg.t_min, cfg.t_max, cfg.levels)
    mu, sigma = vp_schedule(ts)
    y = rng.standard_normal((n, cfg.dim))
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(cfg.levels - 1, -1, -1):
            x0 = (y - sigma[k] * eps_fn(y, k)) / mu[k]
            if k == 0:
                return x0
            alpha = np.exp(-(ts[k] - ts[k - 1]))  # mu_k / mu_{k-1}
            beta2 = 1 - alpha**2
            mean = (alpha * sigma[k - 1] ** 2 / sigma[k] ** 2) * y \
                + (mu[k - 1] * beta2 / sigma[k] ** 2) * x0
            var = beta2 * sigma[k - 1] ** 2 / sigma[k] ** 2
            y = mean + np.sqrt(var) * rng.standard_normal(y.shape)
    return x0  # pragma: no cover - the loop returns at k == 0


def empirical_eps_fn(train: np.ndarray, cfg: ToyConfig):
    """``eps(y, k)`` of the empirical optimal score on the level grid (``-sigma_k s*``)."""
    ts = np.geomspace(cfg.t_min, cfg.t_max, cfg.levels)

    def eps(y, k):
        _, sigma = vp_schedule(ts[k])
        return -sigma * empirical_optimal_score(y, ts[k], train)

    return eps


# ---------------------------------------------------------------------------- metrics
def gaussian_mmd(a: np.ndarray, b: np.ndarray, *, bandwidth: float) -> float:
    """Maximum mean discrepancy with a Gaussian kernel ``exp(-||u - v||^2 / (2 h^2))``
    (Gretton et al., JMLR 2012): the square root of the biased (V-statistic) estimate of MMD^2,
    so 0 for identical sets. Rows with NaN/inf (a diverged run) give ``nan``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(300, 1))
    >>> gaussian_mmd(a, a, bandwidth=0.5)
    0.0
    >>> gaussian_mmd(a, a + 3.0, bandwidth=0.5) > 0.5
    True
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan

    def k(u, v):
        d2 = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * bandwidth**2)).mean()

    return float(np.sqrt(max(k(a, a) + k(b, b) - 2 * k(a, b), 0.0)))


def memorization_metrics(samples: np.ndarray, train: np.ndarray, *, epsilon: float,
                         ratio: float = 1 / 3) -> dict[str, float]:
    """Fraction of samples within ``epsilon`` of a training point, and fraction meeting Gu et
    al.'s ratio criterion ``d1 / d2 < ratio`` (higher = more memorized). NaN rows (a diverged
    run) count as not memorized.

    Examples
    --------
    >>> x = np.array([[0.0], [1.0], [3.0]])
    >>> memorization_metrics(np.array([[0.01], [2.0]]), x, epsilon=0.05)
    {'frac_near_training': 0.5, 'memorization_ratio': 0.5}
    """
    s = np.asarray(samples, np.float64)
    d = np.sqrt(((s[:, None, :] - train[None]) ** 2).sum(-1))
    d.sort(axis=1)
    d = np.nan_to_num(d, nan=np.inf)
    near = d[:, 0] < epsilon
    with np.errstate(invalid="ignore"):
        by_ratio = d[:, 0] < ratio * d[:, 1]
    return {"frac_near_training": float(near.mean()), "memorization_ratio": float(by_ratio.mean())}


# ---------------------------------------------------------------------------- one run
@dataclass
class ToyRecord:
    """One (learning rate, seed) run of the toy study: the row of ``summary.json``."""

    lr: float
    seed: int
    dim: int
    steps: int
    epochs: float
    final_loss: float
    diverged: bool
    mmd_to_empirical: float
    mmd_to_gaussian: float
    frac_near_training: float
    memorization_ratio: float
    train_seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


@dataclass
class ToyRun:
    """Everything a figure needs about one dimension's sweep (kept in memory, not in JSON).

    Attributes
    ----------
    train : ndarray
        The training points of each seed (``train[seed]``).
    samples : dict
        ``(lr, seed) -> samples``; ``("empirical", seed)`` for the empirical optimal score and
        ``("gaussian", seed)`` for the fitted Gaussian.
    records : list of ToyRecord
    """

    config: ToyConfig
    train: dict[int, np.ndarray] = field(default_factory=dict)
    samples: dict[tuple[Any, int], np.ndarray] = field(default_factory=dict)
    records: list[ToyRecord] = field(default_factory=list)
    reference: dict[int, dict[str, float]] = field(default_factory=dict)


def run_toy(cfg: ToyConfig, lrs: Sequence[float], seeds: Sequence[int]) -> ToyRun:
    """Train, sample and measure every (lr, seed) of one dimension (no files)."""
    cfg = cfg.validated()
    lrs = _check_lrs(lrs)
    run = ToyRun(config=cfg)
    jobs = [(seed, lr) for seed in seeds for lr in lrs]
    for seed in seeds:
        x = make_training_set(cfg.n_train, cfg.dim, min_spacing=cfg.min_spacing, seed=seed)
        run.train[seed] = x
        emp = sample_reverse(empirical_eps_fn(x, cfg), cfg, n=cfg.n_samples, seed=seed + 10_000)
        gauss = np.random.default_rng(seed + 20_000).multivariate_normal(
            x.mean(0), np.atleast_2d(np.cov(x.T)), size=cfg.n_samples)
        run.samples[("empirical", seed)] = emp
        run.samples[("gaussian", seed)] = gauss
        run.reference[seed] = {
            "empirical_" + k: v for k, v in memorization_metrics(
                emp, x, epsilon=cfg.epsilon, ratio=cfg.ratio).items()}
        run.reference[seed]["mmd_empirical_to_gaussian"] = gaussian_mmd(
            emp, gauss, bandwidth=cfg.bandwidth)
    for seed, lr in progress(jobs, desc=f"toy {cfg.dim}-D", unit="run"):
        x = run.train[seed]
        nets, info = train_score_network(x, lr, cfg, seed=seed)
        s = sample_reverse(nets.eps, cfg, n=cfg.n_samples, seed=seed + 30_000)
        run.samples[(lr, seed)] = s
        mem = memorization_metrics(s, x, epsilon=cfg.epsilon, ratio=cfg.ratio)
        run.records.append(ToyRecord(
            lr=lr, seed=int(seed), dim=cfg.dim, steps=info["steps"], epochs=info["epochs"],
            final_loss=info["final_loss"], diverged=info["diverged"],
            mmd_to_empirical=gaussian_mmd(s, run.samples[("empirical", seed)],
                                          bandwidth=cfg.bandwidth),
            mmd_to_gaussian=gaussian_mmd(s, run.samples[("gaussian", seed)],
                                         bandwidth=cfg.bandwidth),
            train_seconds=info["seconds"], **mem))
        if info["diverged"]:
            log.info("lr %g, seed %d: SGD diverged after %d steps", lr, seed, info["steps"])
    return run


# ---------------------------------------------------------------------------- the study
TOY_CSV = "toy.csv"
TOY_COLUMNS = ("lr", "seed", "dim", "steps", "epochs", "final_loss", "diverged",
               "mmd_to_empirical", "mmd_to_gaussian", "frac_near_training",
               "memorization_ratio", "train_seconds")


def _mean(records: Sequence[ToyRecord], lr: float, key: str) -> float:
    vals = [getattr(r, key) for r in records if r.lr == lr]
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def toy_findings(run: ToyRun) -> list[str]:
    """Honest one-sentence findings computed from the records."""
    recs = run.records
    lrs = sorted({r.lr for r in recs})
    seeds = sorted({r.seed for r in recs})
    out = []
    stable = [lr for lr in lrs if not any(r.diverged for r in recs if r.lr == lr)]
    near = {lr: _mean(recs, lr, "frac_near_training") for lr in lrs}
    ref = np.mean([v["empirical_frac_near_training"] for v in run.reference.values()])
    out.append(f"{run.config.dim}-D, seeds {seeds}: the empirical optimal score puts "
               f"{ref:.0%} of its samples within {run.config.epsilon:g} of a training point; "
               "the trained networks: " + ", ".join(
                   f"lr {lr:g}: {near[lr]:.0%}" if math.isfinite(near[lr]) else f"lr {lr:g}: n/a"
                   for lr in lrs) + ".")
    if len(stable) >= 2:
        lo, hi = stable[0], stable[-1]
        falls = near[hi] < near[lo]
        mmd_lo, mmd_hi = (_mean(recs, lo, "mmd_to_empirical"), _mean(recs, hi, "mmd_to_empirical"))
        out.append(f"Among runs that did not diverge, memorization {'falls' if falls else 'does not fall'} "
                   f"as the learning rate rises from {lo:g} to {hi:g} (near-training fraction "
                   f"{near[lo]:.0%} -> {near[hi]:.0%}; MMD to the empirical-score samples "
                   f"{mmd_lo:.3f} -> {mmd_hi:.3f}).")
    bad = [lr for lr in lrs if lr not in stable]
    if bad:
        out.append("SGD diverged at lr " + ", ".join(f"{lr:g}" for lr in bad)
                   + " in this parametrization (beyond its stability limit at initialization), "
                     "so those samples are not the paper's 'spread' regime.")
    return out


def run_toy_study(out: str | os.PathLike, *, dim: int = 1,
                  lrs: Sequence[float] = (0.05, 0.1, 0.5, 1.0, 2.0), seed: int = 0,
                  repeats: int = 3, config: ToyConfig | None = None,
                  command: Sequence[str] | None = None) -> StudyResult:
    """The score-matching toy study of Wu et al. (COLT 2025): memorization against the learning
    rate in 1-D or 2-D, written to ``out``.

    Parameters
    ----------
    out : path
        Output folder: ``summary.json`` (the list of records), ``toy.csv``, ``study.json``,
        ``toy_samples.png`` (samples per lr, seed ``seed``) and ``toy_metrics.png``.
    dim : int
        1 or 2.
    lrs : sequence of float
        SGD learning rates; each run takes ``flow_time / lr`` steps (the paper's 1/lr rule).
    seed, repeats : int
        Seeds ``seed .. seed + repeats - 1``: each draws its own training set, initialization
        and noise.
    config : ToyConfig, optional
        Everything else (``config.dim`` is replaced by ``dim``).
    command : sequence of str, optional
        Recorded in ``study.json``.

    Returns
    -------
    StudyResult

    Examples
    --------
    >>> import tempfile
    >>> cfg = ToyConfig(flow_time=20.0, n_samples=50, width=8, levels=3)
    >>> res = run_toy_study(tempfile.mkdtemp(), dim=1, lrs=[0.1, 0.5], repeats=1, config=cfg)
    >>> [r["lr"] for r in res.records]
    [0.1, 0.5]
    """
    from diffmem.study import plots

    t0 = time.perf_counter()
    check_int("repeats", repeats, hint=" (the number of seeds)")
    cfg = replace(config or ToyConfig(), dim=dim).validated()
    lrs = _check_lrs(lrs)
    out = prepare_out_dir(out)
    seeds = list(range(int(seed), int(seed) + repeats))
    run = run_toy(cfg, lrs, seeds)
    records = [r.to_dict() for r in run.records]

    # figures
    first = seeds[0]
    shown = {"empirical optimal score": run.samples[("empirical", first)]}
    for lr in lrs:
        tag = " (diverged)" if any(r.diverged for r in run.records if r.lr == lr and
                                   r.seed == first) else ""
        shown[f"lr {lr:g}{tag}"] = run.samples[(lr, first)]
    figures = [plots.plot_toy_samples(run.train[first], shown, out / "toy_samples.png",
                                      title=f"{dim}-D toy, seed {first}: samples (blue) and "
                                            "training points (red)").name,
               plots.plot_metrics_vs_lr(records, ("mmd_to_empirical", "mmd_to_gaussian",
                                                  "frac_near_training", "memorization_ratio"),
                                        out / "toy_metrics.png",
                                        title=f"{dim}-D toy: memorization vs learning rate "
                                              f"(seeds {seeds})").name]
    result = StudyResult(
        study="toy", title=f"Score-matching toy ({dim}-D): large learning rates against "
                           "memorization (Wu et al., COLT 2025)",
        records=records, figures=figures, findings=toy_findings(run),
        config={**cfg.to_dict(), "lrs": lrs, "seeds": seeds, "paper": PAPER,
                "rule": "steps = flow_time / lr (epochs proportional to 1/lr)",
                "reference": {str(k): v for k, v in run.reference.items()},
                "deviations": [
                    "one two-layer ReLU network per noise level on a geometric grid (no time "
                    "embedding), ancestral sampler on that grid",
                    "noise (eps) parametrization with loss 0.5 ||eps_hat - eps||^2",
                    f"small CPU sizes: n={cfg.n_train} points, width {cfg.width}, "
                    f"{cfg.levels} levels, flow time {cfg.flow_time:g}",
                    "the lr scale is this parametrization's: lr 2.0 diverges here"]},
        machine=machine_info(), seconds=time.perf_counter() - t0,
        command=list(command) if command else [])
    return write_study(result, out, csv_name=TOY_CSV, summary=records, columns=TOY_COLUMNS)

"""The score-matching toy (Wu et al., COLT 2025): the math against independent references, the
SGD runs, the study files and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.errors import ConfigError
from diffmem.study.score_matching import (
    ToyConfig,
    empirical_eps_fn,
    empirical_optimal_score,
    gaussian_mmd,
    make_training_set,
    memorization_metrics,
    run_toy_study,
    sample_reverse,
    train_score_network,
    vp_schedule,
)

FAST = ToyConfig(width=16, levels=4, flow_time=60.0, n_samples=120)


def _log_density(y: np.ndarray, t: float, x: np.ndarray) -> np.ndarray:
    """log p_t(y) of the noised empirical distribution, up to a constant (independent of s*)."""
    mu, sigma = vp_schedule(t)
    a = -((y[:, None, :] - mu * x[None]) ** 2).sum(-1) / (2 * sigma**2)
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


@pytest.mark.parametrize("dim", [1, 2])
def test_empirical_score_is_the_gradient_of_the_noised_log_density(dim):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, dim))
    y = rng.normal(size=(7, dim))
    t, h = 0.3, 1e-5
    s = empirical_optimal_score(y, t, x)
    for j in range(dim):
        e = np.zeros(dim)
        e[j] = h
        fd = (_log_density(y + e, t, x) - _log_density(y - e, t, x)) / (2 * h)
        np.testing.assert_allclose(s[:, j], fd, rtol=1e-5, atol=1e-6)


def test_empirical_score_with_one_point_is_the_gaussian_score():
    x = np.array([[0.7]])
    y = np.array([[0.1], [2.0]])
    mu, sigma = vp_schedule(0.5)
    np.testing.assert_allclose(empirical_optimal_score(y, 0.5, x), (mu * 0.7 - y) / sigma**2)


def test_gaussian_mmd_matches_a_hand_computed_case():
    a, b = np.array([[0.0]]), np.array([[1.0]])
    k = np.exp(-1 / (2 * 0.5**2))
    assert gaussian_mmd(a, b, bandwidth=0.5) == pytest.approx(np.sqrt(2 - 2 * k))
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(40, 2)), rng.normal(size=(30, 2)) + 1
    assert gaussian_mmd(u, v, bandwidth=1.0) == pytest.approx(gaussian_mmd(v, u, bandwidth=1.0))
    assert np.isnan(gaussian_mmd(u, np.full((3, 2), np.nan), bandwidth=1.0))


def test_memorization_metrics_count_near_points_and_the_ratio_criterion():
    x = np.array([[0.0, 0.0], [4.0, 0.0]])
    s = np.array([[0.01, 0.0], [1.0, 0.0], [2.0, 0.0], [np.nan, np.nan]])
    m = memorization_metrics(s, x, epsilon=0.05)
    # d1/d2: 0.01/3.99 (yes), 1/3 (not strictly below), 2/2 (no); NaN counts as not memorized
    assert m == {"frac_near_training": 0.25, "memorization_ratio": 0.25}


def test_empirical_score_sampler_reproduces_the_training_points():
    cfg = replace(FAST, levels=8, n_samples=300)
    x = make_training_set(4, 1, min_spacing=0.8, seed=0)
    s = sample_reverse(empirical_eps_fn(x, cfg), cfg, n=300, seed=0)
    assert memorization_metrics(s, x, epsilon=0.05)["frac_near_training"] > 0.75
    gauss = np.random.default_rng(0).normal(x.mean(), x.std(ddof=1), size=(300, 1))
    assert memorization_metrics(gauss, x, epsilon=0.05)["frac_near_training"] < 0.3


def test_training_set_respects_the_spacing_and_the_seed():
    a = make_training_set(4, 2, min_spacing=0.8, seed=3)
    d = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1)) + np.eye(4) * 9
    assert d.min() >= 0.8
    np.testing.assert_array_equal(a, make_training_set(4, 2, min_spacing=0.8, seed=3))
    with pytest.raises(ConfigError, match="could not draw"):
        make_training_set(50, 1, min_spacing=5.0, seed=0)


def test_sgd_lowers_the_loss_and_a_huge_learning_rate_is_flagged_diverged():
    x = make_training_set(4, 1, min_spacing=0.8, seed=0)
    nets, info = train_score_network(x, 0.1, FAST, seed=0)
    assert not info["diverged"] and info["steps"] == 600
    assert info["final_loss"] < 0.5  # the trivial predictor eps = 0 has loss 0.5
    _, bad = train_score_network(x, 20.0, FAST, seed=0)
    assert bad["diverged"]
    # the 1/lr rule: same flow time
    _, other = train_score_network(x, 0.5, FAST, seed=0)
    assert other["planned_steps"] * 0.5 == pytest.approx(info["planned_steps"] * 0.1)


def test_toy_study_writes_the_contract_files(tmp_path):
    res = run_toy_study(tmp_path / "toy", dim=2, lrs=[0.1, 1.0], seed=5, repeats=2, config=FAST)
    summary = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert isinstance(summary, list) and len(summary) == 4
    for rec in summary:
        for key in ("lr", "mmd_to_empirical", "mmd_to_gaussian", "frac_near_training",
                    "memorization_ratio", "seed"):
            assert key in rec
    assert sorted({r["seed"] for r in summary}) == [5, 6]
    study = json.loads((tmp_path / "toy" / "study.json").read_text())
    assert study["study"] == "toy" and study["records"] == summary
    assert set(study) >= {"title", "figures", "findings", "config", "machine", "seconds",
                          "command"}
    for name in study["figures"]:
        assert (tmp_path / "toy" / name).stat().st_size > 1000
    assert (tmp_path / "toy" / "toy.csv").read_text().startswith("lr,seed,dim")
    assert study["config"]["deviations"] and res.findings


def test_toy_study_is_seeded(tmp_path):
    a = run_toy_study(tmp_path / "a", dim=1, lrs=[0.5], repeats=1, config=FAST)
    b = run_toy_study(tmp_path / "b", dim=1, lrs=[0.5], repeats=1, config=FAST)
    keys = ("mmd_to_empirical", "frac_near_training", "final_loss")
    assert [a.records[0][k] for k in keys] == [b.records[0][k] for k in keys]


@pytest.mark.parametrize("kwargs, match", [
    ({"dim": 3}, "dim=3"),
    ({"lrs": [0.1, -1.0]}, "learning rate -1.0"),
    ({"repeats": 0}, "repeats=0"),
])
def test_toy_study_rejects_bad_settings(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        run_toy_study(tmp_path / "bad", **{"config": FAST, **kwargs})


def test_cli_toy_in_process(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["-q", "study", "toy", "--out", str(out), "--dim", "1", "--lrs", "0.5,2",
                 "--repeats", "1", "--flow-time", "10"])
    assert code == 0
    assert "results:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [r["lr"] for r in summary] == [0.5, 2.0]
    with pytest.raises(SystemExit):
        main(["-q", "study", "toy", "--out", str(out), "--lrs", "0.1,x"])
    assert "comma-separated numbers" in capsys.readouterr().err

"""diffmem.detect.skew: skewed memorization (Li et al. 2025) — Gini, top shares and the
Lorenz curve against hand-computed cases and an independent definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffmem.detect import plots
from diffmem.detect.skew import copy_concentration, gini, lorenz_curve, top_share
from diffmem.errors import DataError


def _gini_mean_difference(x):
    """The other textbook definition: mean absolute difference over all pairs / (2 x mean)."""
    x = np.asarray(x, float)
    return np.abs(x[:, None] - x[None, :]).mean() / (2 * x.mean())


def test_gini_hand_computed():
    # equal counts: 0; one of four prompts makes every copy: 1 - 1/4
    assert gini([3, 3, 3, 3]) == 0.0
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)
    # k equal non-zero counts among n: 1 - k/n
    assert gini([0] * 23 + [2] * 4) == pytest.approx(1 - 4 / 27)
    # [1, 2, 3, 4]: sum_i (2i - 5) x_i = -3 - 2 + 3 + 12 = 10; 10 / (4 * 10) = 0.25
    assert gini([4, 1, 3, 2]) == pytest.approx(0.25)
    assert math.isnan(gini([])) and math.isnan(gini([0, 0]))


def test_gini_matches_mean_difference_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.poisson(rng.uniform(0.1, 3), size=rng.integers(2, 60)).astype(float)
        if x.sum():
            assert gini(x) == pytest.approx(_gini_mean_difference(x))


def test_top_shares_hand_computed():
    counts = [0] * 90 + [1] * 5 + [2, 3, 5, 10, 20]  # 100 prompts, 45 copies
    assert top_share(counts, 0.01) == pytest.approx(20 / 45)  # one prompt
    assert top_share(counts, 0.1) == pytest.approx((20 + 10 + 5 + 3 + 2 + 5) / 45)
    # fewer than 100 prompts: the top 1% is still one prompt
    assert top_share([1, 1, 2], 0.01) == pytest.approx(0.5)
    with pytest.raises(DataError, match="fraction=0"):
        top_share([1], 0)
    with pytest.raises(DataError, match="finite and >= 0"):
        gini([1, -1])


def test_lorenz_curve_and_summary():
    x, y = lorenz_curve([2, 0, 0, 2])
    assert x.tolist() == [0, 0.25, 0.5, 0.75, 1] and y.tolist() == [0, 0, 0, 0.5, 1]
    c = copy_concentration([0] * 23 + [2] * 4, curve_points=11)
    assert c["prompts"] == 27 and c["copies"] == 8 and c["prompts_with_copies"] == 4
    assert c["gini"] == pytest.approx(1 - 4 / 27, abs=1e-6)
    assert c["top_shares"] == {"1%": 0.25, "10%": 0.75}  # 1 and ceil(2.7) = 3 prompts
    assert c["lorenz"]["prompts"][0] == 0 and c["lorenz"]["copies"][-1] == 1
    assert np.all(np.diff(c["lorenz"]["copies"]) >= 0)
    # below the line of equality everywhere
    assert all(cy <= px + 1e-9 for px, cy in zip(c["lorenz"]["prompts"],
                                                 c["lorenz"]["copies"]))
    none = copy_concentration([0, 0, 0])
    assert none["gini"] is None and none["top_shares"]["10%"] is None


def test_lorenz_plot(tmp_path):
    path = plots.plot_lorenz({"a": copy_concentration([0, 0, 1, 5]),
                              "b": copy_concentration([0, 0])}, tmp_path / "l.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match="no Lorenz curve"):
        plots.plot_lorenz({}, tmp_path / "x.png")

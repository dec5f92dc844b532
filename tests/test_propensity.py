"""Tests for training/propensity.py: power-law fit of position bias and IPW weights."""

from __future__ import annotations

import numpy as np
import pytest

from training.propensity import MIN_IMPRESSIONS, fit_power_law, ipw_weights


def synthetic_counts(eta: float, c: float = 0.3, positions: int = 40, per_position: int = 20_000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binomial clicks with ctr(p) = c * (1 + p) ** -eta (the randomised-bucket model)."""
    rng = np.random.default_rng(seed)
    pos = np.arange(positions)
    impressions = np.full(positions, per_position)
    clicks = rng.binomial(impressions, c * (1.0 + pos) ** -eta)
    return pos, impressions, clicks


@pytest.mark.parametrize("eta", [0.8, 1.2])
def test_fit_recovers_eta(eta: float) -> None:
    pos, impressions, clicks = synthetic_counts(eta, seed=int(eta * 10))
    fit = fit_power_law(pos, impressions, clicks)
    assert fit["eta"] == pytest.approx(eta, abs=0.1)
    assert np.exp(fit["intercept"]) == pytest.approx(0.3, rel=0.15)  # intercept is log(c)
    assert fit["positions_used"] == 40
    assert fit["clicks"] == int(clicks.sum())


def test_fit_recovers_eta_with_uneven_traffic() -> None:
    # Fewer impressions deeper in the list (as with variable list lengths).
    rng = np.random.default_rng(5)
    pos = np.arange(50)
    impressions = np.linspace(30_000, 2_000, 50).astype(int)
    clicks = rng.binomial(impressions, 0.2 * (1.0 + pos) ** -1.0)
    assert fit_power_law(pos, impressions, clicks)["eta"] == pytest.approx(1.0, abs=0.1)


def test_fit_skips_sparse_positions_and_counts_clickless_ones() -> None:
    pos = np.arange(6)
    ctr = 0.5 * (1.0 + pos) ** -1.0
    impressions = np.array([10_000, 10_000, 10_000, 10_000, MIN_IMPRESSIONS - 1, 40])
    clicks = np.round(impressions * ctr).astype(int)
    clicks[5] = 0  # 40 impressions at ctr 1/12: no click is plausible, and it is evidence, not a gap
    fit = fit_power_law(pos, impressions, clicks)
    assert fit["positions_used"] == 5  # position 4 (29 impressions) is left out
    assert fit["clicks"] == int(clicks[:4].sum())
    assert fit["eta"] == pytest.approx(1.0, abs=0.01)


def test_fit_is_unbiased_on_small_randomised_buckets() -> None:
    """Few impressions per position and a low ctr leave deep positions without clicks. Least squares on log ctr
    had to drop them, which biased eta low (0.61 for 0.8 here); the binomial likelihood keeps them."""
    rng = np.random.default_rng(3)
    pos = np.arange(40)
    impressions = np.full(40, 250)
    estimates = [fit_power_law(pos, impressions, rng.binomial(impressions, 0.05 * (1.0 + pos) ** -0.8))["eta"]
                 for _ in range(100)]
    assert np.mean(estimates) == pytest.approx(0.8, abs=0.03)


def test_fit_too_little_data() -> None:
    # Only two positions with enough impressions and a click.
    with pytest.raises(ValueError, match="too little"):
        fit_power_law([0, 1, 2, 3], [1000, 1000, 5, 1000], [100, 50, 2, 0])
    with pytest.raises(ValueError, match="too little"):
        fit_power_law([], [], [])


def test_ipw_weights_hand_computed() -> None:
    positions = np.array([0, 1, 3, -1])
    valid = np.array([True, True, True, False])
    # eta=1: raw (1+p) = 1, 2, 4; clip 3 -> 1, 2, 3; invalid -> 0. Mean over valid = 2 -> 0.5, 1, 1.5, 0.
    np.testing.assert_allclose(ipw_weights(positions, 1.0, valid, clip=3.0), [0.5, 1.0, 1.5, 0.0], rtol=1e-6)
    # No clipping: 1, 2, 4 -> mean 7/3 -> 3/7, 6/7, 12/7.
    np.testing.assert_allclose(ipw_weights(positions, 1.0, valid), [3 / 7, 6 / 7, 12 / 7, 0.0], rtol=1e-6)


def test_ipw_weights_properties_on_padded_batch() -> None:
    rng = np.random.default_rng(0)
    positions = np.tile(np.arange(60, dtype=np.float64), (8, 1))
    valid = np.arange(60)[None, :] < rng.integers(20, 61, size=8)[:, None]
    positions = np.where(valid, positions, -1.0)
    weights = ipw_weights(positions, 1.2, valid, clip=20.0)
    assert weights.dtype == np.float32
    assert weights.shape == (8, 60)
    assert (weights[~valid] == 0).all()
    assert (weights[valid] > 0).all()
    assert weights[valid].mean() == pytest.approx(1.0, abs=1e-5)
    # Clipping: (1+p)^1.2 exceeds 20 from p = 12, so every deeper weight equals the clipped maximum.
    deep = valid & (positions >= 12)
    assert np.allclose(weights[deep], weights[valid].max())
    # Below the clip, weights keep the (1+p)^eta ratio.
    assert weights[0, 3] / weights[0, 0] == pytest.approx(4.0 ** 1.2, rel=1e-5)


def test_ipw_weights_eta_zero_and_nothing_valid() -> None:
    valid = np.array([True, False, True])
    np.testing.assert_allclose(ipw_weights(np.array([0, 5, 9]), 0.0, valid), [1.0, 0.0, 1.0])
    assert (ipw_weights(np.array([0, 1]), 1.0, np.array([False, False])) == 0).all()

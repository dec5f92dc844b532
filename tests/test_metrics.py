"""Tests for training/metrics.py against hand-computed values (and TF-Ranking for NDCG)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import metrics
from training.metrics import average_precision, mrr, ndcg, paired_bootstrap, per_list_metrics, summarize

L2 = math.log2


def row(values: list[float]) -> np.ndarray:
    return np.asarray([values], dtype=np.float64)


# Shared example: 4 items already in score order, labels [3, 2, 0, 1].
SCORES = row([4.0, 3.0, 2.0, 1.0])
LABELS = row([3, 2, 0, 1])
# DCG@4  = (2^3-1)/log2(2) + (2^2-1)/log2(3) + (2^0-1)/log2(4) + (2^1-1)/log2(5)
#        = 7 + 3/log2(3) + 0 + 1/log2(5)
# IDCG@4 = ideal order [3, 2, 1, 0] = 7 + 3/log2(3) + 1/log2(4) + 0 = 7 + 3/log2(3) + 0.5
DCG4 = 7 + 3 / L2(3) + 1 / L2(5)
IDCG4 = 7 + 3 / L2(3) + 1 / L2(4)


def test_ndcg_hand_computed_full_list() -> None:
    assert ndcg(SCORES, LABELS, 4)[0] == pytest.approx(DCG4 / IDCG4, abs=1e-12)
    # (7 + 1.892789 + 0.430677) / (7 + 1.892789 + 0.5) = 9.323466 / 9.392789 ~ 0.992620:
    # one swap at the bottom of the list costs little.
    assert ndcg(SCORES, LABELS, 4)[0] == pytest.approx(0.992620, abs=1e-5)


def test_ndcg_hand_computed_cutoff() -> None:
    # @2: DCG = 7 + 3/log2(3) = IDCG (top two are already ideal) -> 1.0
    assert ndcg(SCORES, LABELS, 2)[0] == pytest.approx(1.0)
    # @3: DCG = 7 + 3/log2(3) + 0, IDCG = 7 + 3/log2(3) + 1/log2(4)
    expected = (7 + 3 / L2(3)) / (7 + 3 / L2(3) + 0.5)
    assert ndcg(SCORES, LABELS, 3)[0] == pytest.approx(expected, abs=1e-12)


def test_ndcg_scores_reorder_the_list() -> None:
    # Scores put the items in order [label 0, 1, 2, 3] (reverse of ideal).
    scores = row([1.0, 2.0, 3.0, 4.0])
    labels = row([3, 2, 1, 0])
    # DCG = 0/1 + 1/log2(3) + 3/log2(4) + 7/log2(5); IDCG = 7 + 3/log2(3) + 1/log2(4) + 0
    dcg = 1 / L2(3) + 3 / 2 + 7 / L2(5)
    idcg = 7 + 3 / L2(3) + 0.5
    assert ndcg(scores, labels, 10)[0] == pytest.approx(dcg / idcg, abs=1e-12)
    # @1: top item has label 0 -> DCG 0.
    assert ndcg(scores, labels, 1)[0] == 0.0


def test_k_larger_than_list() -> None:
    assert ndcg(SCORES, LABELS, 100)[0] == pytest.approx(DCG4 / IDCG4, abs=1e-12)
    assert ndcg(SCORES, LABELS, 100)[0] == pytest.approx(ndcg(SCORES, LABELS, 4)[0])


def test_padding_is_ignored_wherever_it_sits() -> None:
    # Same 4 real items as SCORES/LABELS plus two padded slots (label -1) with the highest scores.
    scores = row([100.0, 4.0, 3.0, 99.0, 2.0, 1.0])
    labels = row([-1, 3, 2, -1, 0, 1])
    assert ndcg(scores, labels, 4)[0] == pytest.approx(DCG4 / IDCG4, abs=1e-12)
    assert ndcg(scores, labels, 10)[0] == pytest.approx(DCG4 / IDCG4, abs=1e-12)
    assert mrr(scores, labels)[0] == 1.0
    # AP: relevant at ranks 1, 2, 4 -> (1/1 + 2/2 + 3/4) / 3 = 2.75 / 3
    assert average_precision(scores, labels)[0] == pytest.approx(2.75 / 3)


def test_weighted_dcg_hand_computed() -> None:
    # Clicks [1, 0, 1, 0] in score order; the third item's click is weighted 4x (a slot rarely examined).
    # DCG = 1/log2(2) + 4/log2(4) = 3; the ideal ranking is by weighted gain [4, 1, 0, 0]: IDCG = 4 + 1/log2(3).
    clicks, weights = row([1, 0, 1, 0]), row([1.0, 1.0, 4.0, 1.0])
    gained, ideal = metrics.dcg(SCORES, clicks, 4, weights)
    assert (gained[0], ideal[0]) == (pytest.approx(3.0), pytest.approx(4 + 1 / L2(3)))
    assert metrics.dcg(SCORES, LABELS, 4) == (pytest.approx([DCG4]), pytest.approx([IDCG4]))
    per_list = per_list_metrics(SCORES, clicks, weights)
    assert per_list["dcg@20"][0] == pytest.approx(3.0) and per_list["ideal_dcg@20"][0] == pytest.approx(ideal[0])
    assert "ndcg@20" not in per_list  # a DCG is not an NDCG until pooled
    assert per_list["mrr"][0] == 1.0  # MRR and MAP stay unweighted


def test_pooled_weighted_ndcg_is_the_ratio_of_sums() -> None:
    # Two lists: DCG 3 of ideal 3, and 2/log2(3) of ideal 2; a third has no click (NaN, out of the means).
    scores = np.array([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]])
    labels = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float64)
    weights = np.array([[3.0, 1.0], [1.0, 2.0], [1.0, 1.0]])
    raw = per_list_metrics(scores, labels, weights)
    assert raw["dcg@5"][:2] == pytest.approx([3.0, 1 / L2(3) * 2]) and np.isnan(raw["dcg@5"][2])
    pooled = metrics.pooled(raw)
    assert set(pooled) == set(metrics.METRICS) and np.isnan(pooled["ndcg@5"][2])
    ratio = (3.0 + 2 / L2(3)) / (3.0 + 2.0)
    summary = summarize(pooled)["ndcg@5"]
    assert summary["value"] == pytest.approx(ratio) and summary["lists"] == 2
    # Its standard error is the ratio's (delta method): spread of DCG - R * ideal over the mean ideal.
    residual = np.array([3.0, 2 / L2(3)]) - ratio * np.array([3.0, 2.0])
    assert summary["standard_deviation"] == pytest.approx(residual.std(ddof=1) / np.sqrt(2) / 2.5)
    assert pooled["mrr"] is raw["mrr"]  # unweighted metrics pass through
    unweighted = per_list_metrics(scores, labels)
    assert metrics.pooled(unweighted)["ndcg@10"] is unweighted["ndcg@10"]


def test_paired_comparison_of_pooled_ndcg_is_the_difference_of_the_ratios() -> None:
    rng = np.random.default_rng(11)
    labels = np.where(rng.random((300, 15)) < 0.15, 1.0, 0.0)
    labels[rng.random(300) < 0.2] = 0.0  # lists without a click
    labels[:, 12:] = -1.0  # padding
    weights = rng.uniform(1.0, 6.0, labels.shape)
    first, second = rng.random(labels.shape), rng.random(labels.shape) + labels * 0.5
    a = metrics.pooled(per_list_metrics(first, labels, weights))["ndcg@10"]
    b = metrics.pooled(per_list_metrics(second, labels, weights))["ndcg@10"]

    def ratio(scores: np.ndarray) -> float:
        gained, ideal = metrics.dcg(scores, labels, 10, weights)
        return gained.sum() / ideal.sum()

    result = paired_bootstrap(b, a, resamples=200, groups=np.arange(300) // 3)
    assert result["mean_diff"] == pytest.approx(ratio(second) - ratio(first), abs=1e-12)
    assert result["mean_diff"] > 0.05 and result["ci_low"] < result["mean_diff"] < result["ci_high"]


def test_inverse_propensity_ndcg_undoes_the_logging_policys_advantage() -> None:
    """Clicks logged under a position-biased policy favour that policy's own order; weighting each click's gain by
    1 / examination (the position-based click model) and pooling over lists restores the truth's order. The
    per-list ratio does not: which items a list's ideal DCG holds depends on the logging order."""
    rng = np.random.default_rng(3)
    lists, size, eta = 4000, 20, 0.8
    relevance = rng.random((lists, size))  # click probability when examined
    logging = relevance + rng.normal(0.0, 0.6, (lists, size))  # a noisy policy produced the logs
    position = np.argsort(np.argsort(-logging, axis=1), axis=1).astype(np.float64)
    clicks = (rng.random((lists, size)) < relevance * (1.0 + position) ** -eta).astype(np.float64)
    weights = (1.0 + position) ** eta
    better = relevance + rng.normal(0.0, 0.2, (lists, size))  # a ranker closer to the truth than the policy

    def pooled(scores: np.ndarray) -> float:
        return float(np.nanmean(metrics.pooled(per_list_metrics(scores, clicks, weights))["ndcg@10"]))

    def per_list_ratio(scores: np.ndarray) -> float:
        gained, ideal = metrics.dcg(scores, clicks, 10, weights)
        return float(np.mean(gained[ideal > 0] / ideal[ideal > 0]))

    truth = float(np.nanmean(ndcg(better, relevance, 10))), float(np.nanmean(ndcg(-position, relevance, 10)))
    raw = float(np.nanmean(ndcg(better, clicks, 10))), float(np.nanmean(ndcg(-position, clicks, 10)))
    assert truth[0] > truth[1] + 0.1  # the better ranker is better
    assert raw[1] > raw[0] + 0.1  # raw clicks: the logging order wins
    assert pooled(better) > pooled(-position) + 0.03  # inverse-propensity NDCG: the truth's order
    assert per_list_ratio(-position) > per_list_ratio(better)  # why it pools


def test_mrr_hand_computed() -> None:
    # Score order gives labels [0, 0, 2, 1]: first relevant at rank 3 -> 1/3.
    scores = row([0.9, 0.8, 0.7, 0.1])
    labels = row([0, 0, 2, 1])
    assert mrr(scores, labels)[0] == pytest.approx(1 / 3)
    # Reversed scores: labels in order [1, 2, 0, 0] -> 1/1.
    assert mrr(-scores, labels)[0] == 1.0


def test_map_hand_computed() -> None:
    # Ranked labels [1, 0, 1, 0, 1]: precision at hits = 1/1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3
    scores = row([5, 4, 3, 2, 1])
    labels = row([1, 0, 4, 0, 2])
    assert average_precision(scores, labels)[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3, abs=1e-12)
    # Example list: ranked labels [3, 2, 0, 1] -> relevant at 1, 2, 4 -> (1 + 1 + 3/4) / 3
    assert average_precision(SCORES, LABELS)[0] == pytest.approx(2.75 / 3, abs=1e-12)


def test_no_relevant_item_gives_nan() -> None:
    scores = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    labels = np.array([[0, 0, 0], [0, -1, -1]])
    per_list = per_list_metrics(scores, labels)
    assert set(per_list) == set(metrics.METRICS)
    for name, values in per_list.items():
        assert values.shape == (2,), name
        assert np.isnan(values).all(), name


def test_all_padding_list_gives_nan() -> None:
    per_list = per_list_metrics(np.zeros((1, 3)), np.full((1, 3), -1.0))
    assert all(np.isnan(v).all() for v in per_list.values())


def test_ties_broken_by_list_order() -> None:
    # Constant scorer: the input order is the ranking.
    scores = np.zeros((2, 4))
    labels = np.array([[0, 0, 1, 0], [1, 0, 0, 0]])
    # list 0: first relevant at rank 3 -> MRR 1/3; NDCG@4 = (1/log2(4)) / 1 = 0.5
    # list 1: relevant first -> MRR 1, NDCG 1
    np.testing.assert_allclose(mrr(scores, labels), [1 / 3, 1.0])
    np.testing.assert_allclose(ndcg(scores, labels, 4), [0.5, 1.0])
    # A partial tie: items 1 and 2 share a score; the earlier one (label 0) ranks first.
    scores = row([2.0, 1.0, 1.0])
    labels = row([0, 0, 1])
    assert mrr(scores, labels)[0] == pytest.approx(1 / 3)


def test_per_list_metrics_shapes_and_keys() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(7, 25))
    labels = rng.integers(0, 5, size=(7, 25)).astype(float)
    labels[:, 20:] = -1
    out = per_list_metrics(scores, labels)
    assert list(out) == ["ndcg@5", "ndcg@10", "ndcg@20", "mrr", "map"]
    for values in out.values():
        assert values.shape == (7,)
        assert ((values >= 0) & (values <= 1 + 1e-12)).all()


def test_summarize_excludes_nan_lists() -> None:
    per_list = {"ndcg@10": np.array([0.5, np.nan, 1.0, 0.0]), "mrr": np.array([np.nan, np.nan, np.nan, 1.0])}
    summary = summarize(per_list)
    # ndcg@10 over [0.5, 1.0, 0.0]: mean 0.5; sample std = sqrt((0^2 + 0.5^2 + 0.5^2) / 2) = 0.5;
    # SE = 0.5 / sqrt(3)
    assert summary["ndcg@10"]["value"] == pytest.approx(0.5)
    assert summary["ndcg@10"]["standard_deviation"] == pytest.approx(0.5 / math.sqrt(3))
    assert summary["ndcg@10"]["lists"] == 3
    # mrr: a single defined list -> its value, SE 0.
    assert summary["mrr"] == {"value": 1.0, "standard_deviation": 0.0, "lists": 1}


def test_summarize_mask_and_empty() -> None:
    per_list = {"map": np.array([0.2, 0.4, np.nan, 0.9])}
    masked = summarize(per_list, mask=np.array([True, True, True, False]))
    assert masked["map"]["value"] == pytest.approx(0.3)
    assert masked["map"]["lists"] == 2
    empty = summarize({"map": np.array([np.nan, np.nan])})
    assert math.isnan(empty["map"]["value"])
    assert empty["map"]["lists"] == 0
    assert empty["map"]["standard_deviation"] == 0.0


def test_matches_tensorflow_ranking_ndcg() -> None:
    tf = pytest.importorskip("tensorflow")
    tfr = pytest.importorskip("tensorflow_ranking")
    rng = np.random.default_rng(42)
    n, size = 64, 30
    scores = rng.normal(size=(n, size)).astype(np.float32)  # continuous: no ties
    labels = rng.integers(0, 5, size=(n, size)).astype(np.float32)
    lengths = rng.integers(5, size + 1, size=n)
    labels[np.arange(size)[None, :] >= lengths[:, None]] = -1.0  # padding
    labels[:, 0] = np.maximum(labels[:, 0], 1.0)  # every list has a relevant item
    for k in (5, 10, 20):
        ours = ndcg(scores, labels, k)
        assert not np.isnan(ours).any()
        metric = tfr.keras.metrics.NDCGMetric(topn=k)
        metric.update_state(tf.constant(labels), tf.constant(scores))
        assert float(ours.mean()) == pytest.approx(float(metric.result().numpy()), abs=1e-5), k


# ---------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_ci_contains_mean_diff() -> None:
    rng = np.random.default_rng(1)
    champion = rng.uniform(0, 1, 500)
    challenger = np.clip(champion + rng.normal(0.05, 0.1, 500), 0, 1)
    out = paired_bootstrap(challenger, champion, resamples=500, seed=3)
    mean_diff = float(np.mean(challenger - champion))
    assert out["mean_diff"] == pytest.approx(mean_diff)
    assert out["ci_low"] < mean_diff < out["ci_high"]
    assert out["ci_low"] > 0  # a clear 0.05 lift over 500 lists
    assert out["lists"] == 500
    assert out["resamples"] == 500
    assert out["confidence"] == 0.95


def test_paired_bootstrap_identical_inputs() -> None:
    values = np.linspace(0, 1, 50)
    out = paired_bootstrap(values, values.copy())
    assert out["mean_diff"] == 0.0
    assert out["ci_low"] == 0.0
    assert out["ci_high"] == 0.0


def test_paired_bootstrap_deterministic_with_seed() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.uniform(size=200), rng.uniform(size=200)
    assert paired_bootstrap(a, b, seed=11) == paired_bootstrap(a, b, seed=11)
    assert paired_bootstrap(a, b, seed=11)["ci_low"] != paired_bootstrap(a, b, seed=12)["ci_low"]


def test_paired_bootstrap_drops_nan_pairs() -> None:
    challenger = np.array([1.0, np.nan, 0.5, 0.25])
    champion = np.array([0.5, 0.5, np.nan, 0.25])
    out = paired_bootstrap(challenger, champion)
    # defined pairs: (1.0 - 0.5) and (0.25 - 0.25) -> mean 0.25 over 2 lists
    assert out["lists"] == 2
    assert out["mean_diff"] == pytest.approx(0.25)
    assert 0.0 <= out["ci_low"] <= out["ci_high"] <= 0.5


def test_paired_bootstrap_raises_on_all_nan() -> None:
    with pytest.raises(ValueError, match="no list"):
        paired_bootstrap(np.array([np.nan, 1.0]), np.array([0.5, np.nan]))


def test_paired_bootstrap_by_group_resamples_whole_users() -> None:
    # 40 users x 10 lists; each user's lists share that user's difference: lists are not independent evidence
    rng = np.random.default_rng(5)
    per_user = rng.normal(0.01, 0.05, 40)
    diff = np.repeat(per_user, 10) + rng.normal(0, 0.002, 400)
    users = np.repeat([f"u{i}" for i in range(40)], 10)
    champion = np.full(400, 0.5)
    by_list = paired_bootstrap(champion + diff, champion, seed=1)
    by_user = paired_bootstrap(champion + diff, champion, seed=1, groups=users)
    assert by_user["mean_diff"] == pytest.approx(by_list["mean_diff"]) == pytest.approx(diff.mean())
    assert (by_user["clusters"], by_list["clusters"], by_user["lists"]) == (40, 400, 400)
    # ~sqrt(10) wider: 400 lists carry the information of 40 users
    width = {name: out["ci_high"] - out["ci_low"] for name, out in (("list", by_list), ("user", by_user))}
    assert width["user"] > 2.5 * width["list"]
    assert by_user["ci_low"] <= by_user["mean_diff"] <= by_user["ci_high"]
    # a NaN list drops out of its group; unequal group sizes weigh lists, not users
    sizes = paired_bootstrap(np.array([1.0, 1.0, 1.0, np.nan]), np.zeros(4), groups=np.array(["a", "a", "b", "b"]))
    assert sizes["mean_diff"] == 1.0 and sizes["lists"] == 3 and sizes["clusters"] == 2

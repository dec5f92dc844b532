"""Per-list ranking metrics in NumPy and a paired bootstrap: what every offline evaluation and benchmark reports.

Conventions: gain ``2**label - 1``, discount ``1 / log2(1 + rank)`` (TF-Ranking's NDCG gain and discount); MRR
and MAP treat ``label > 0`` as relevant. Padded slots have ``label < 0`` and are ignored. A list with no relevant
item has no defined NDCG/MRR/MAP: it gets NaN and is left out of the means (the usual LETOR practice), never
scored as 0 or 1. Ties in scores are broken by list order, so a constant scorer reproduces the input order.

On logged clicks, ``per_list_metrics(gain_weights=...)`` and ``pooled`` give the inverse-propensity
NDCG: each item's gain is weighted by 1 / its examination probability, which under the position-based click
model (with the true exponent, and up to the weights' clip) makes a list's DCG an unbiased estimate of its DCG
had every slot been examined; NDCG is then the sum of DCG over the sum of ideal DCG over lists. A per-list
ratio would not do: a list's ideal DCG depends on which items happened to be clicked, which the logging order
decides, and on simulated clicks the mean of per-list ratios still ranks the logging order above a better
ranker (``tests/test_metrics.py``). The pooled ratio compares rankers on the same lists; its level depends on
the lists and the exponent, so it is not comparable across test sets.

Two deliberate differences from ``tfr.keras.metrics`` (the ``val_ndcg_10`` of training logs and MLflow): those
score a list with no relevant item as 0 and still count it, and break ties at random. On click labels, where
many lists have no click, ``val_ndcg_10`` therefore reads lower than the same model's NDCG here; compare
models on this module's numbers (``evaluation.json``, the benchmarks), not across the two.
"""

from __future__ import annotations

import numpy as np

CUTOFFS = (5, 10, 20)
METRICS = ("ndcg@5", "ndcg@10", "ndcg@20", "mrr", "map")


def _order(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Labels sorted by descending score (padding last), per list."""
    valid = labels >= 0
    keyed = np.where(valid, scores, -np.inf)
    order = np.argsort(-keyed, axis=1, kind="stable")
    return np.take_along_axis(np.where(valid, labels, 0.0), order, axis=1)


def dcg(scores: np.ndarray, labels: np.ndarray, k: int,
        gain_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DCG@k and the ideal DCG@k per list; ``gain_weights`` (per item, >= 0) multiply the gains."""
    labels = np.asarray(labels, dtype=np.float64)
    valid = labels >= 0
    gains = 2.0 ** np.where(valid, labels, 0.0) - 1.0
    if gain_weights is not None:
        gains = gains * np.asarray(gain_weights, dtype=np.float64)
    ranked = _order(np.asarray(scores, dtype=np.float64), np.where(valid, gains, -1.0))[:, :k]
    ideal = -np.sort(-np.where(valid, gains, 0.0), axis=1)[:, :k]
    discount = 1.0 / np.log2(np.arange(2, ranked.shape[1] + 2))
    return (ranked * discount).sum(axis=1), (ideal * discount[: ideal.shape[1]]).sum(axis=1)


def ndcg(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k per list; NaN where the list has no relevant item."""
    gained, ideal = dcg(scores, labels, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, gained / ideal, np.nan)


def mrr(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Reciprocal rank of the first relevant item per list; NaN where there is none."""
    relevant = _order(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)) > 0
    first = relevant.argmax(axis=1)
    return np.where(relevant.any(axis=1), 1.0 / (first + 1.0), np.nan)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Average precision per list (binary relevance ``label > 0``); NaN where there is no relevant item."""
    relevant = (_order(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)) > 0)
    hits = np.cumsum(relevant, axis=1)
    precision = hits / np.arange(1, relevant.shape[1] + 1)
    total = relevant.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (precision * relevant).sum(axis=1) / total, np.nan)


def per_list_metrics(scores: np.ndarray, labels: np.ndarray,
                     gain_weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every metric of ``METRICS`` per list, for padded [N, L] scores and labels.

    With ``gain_weights`` there is ``dcg@k`` (the weighted DCG, NaN where the list has no relevant item) and
    ``ideal_dcg@k`` instead of ``ndcg@k``: ``pooled`` turns them into NDCG once every list is in. MRR and MAP,
    which look at the first or at every relevant item, stay unweighted."""
    out = {}
    for k in CUTOFFS:
        if gain_weights is None:
            out[f"ndcg@{k}"] = ndcg(scores, labels, k)
        else:
            gained, ideal = dcg(scores, labels, k, gain_weights)
            out[f"dcg@{k}"], out[f"ideal_dcg@{k}"] = np.where(ideal > 0, gained, np.nan), ideal
    out["mrr"] = mrr(scores, labels)
    out["map"] = average_precision(scores, labels)
    return out


def pooled(per_list: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``per_list_metrics`` of a set of lists, ready to average: weighted ``dcg@k`` and ``ideal_dcg@k`` become
    ``ndcg@k`` = R = sum DCG / sum ideal DCG over the lists that have one, given per list as its linearised
    share ``R + (DCG - R * ideal) / mean ideal``. Their mean is R, their standard error R's (delta method), and a
    paired difference's mean the difference of two rankers' R. Unweighted metrics are returned as they are."""
    out = {}
    for name, values in per_list.items():
        if name.startswith("ideal_dcg@"):
            continue
        if name.startswith("dcg@"):
            ideal = per_list[f"ideal_{name}"]
            defined = ~np.isnan(values)
            scale = ideal[defined].mean() if defined.any() else np.nan
            ratio = values[defined].sum() / ideal[defined].sum() if defined.any() else np.nan
            name, values = f"n{name}", ratio + (values - ratio * ideal) / scale
        out[name] = values
    return out


def summarize(per_list: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Mean and standard error of each metric over the lists with a defined value (optionally a subset).

    The standard error goes in ``standard_deviation``: SageMaker's model-quality statistics mean the spread of
    the metric's estimate there (Model Monitor bootstraps it), not the spread of per-list values."""
    summary = {}
    for name, values in per_list.items():
        values = values if mask is None else values[mask]
        values = values[~np.isnan(values)]
        summary[name] = {
            "value": float(values.mean()) if values.size else float("nan"),
            "standard_deviation": float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0,
            "lists": int(values.size),
        }
    return summary


def paired_bootstrap(challenger: np.ndarray, champion: np.ndarray, resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0, groups: np.ndarray | None = None) -> dict[str, float]:
    """Percentile bootstrap CI of mean(challenger - champion) over lists scored by both (NaNs dropped).

    ``groups`` (one key per list, e.g. its user): resample whole groups instead of lists. One user's lists are
    alike, so resampling lists one by one makes the interval too narrow for the gate's lower bound; the estimate
    is the same mean over lists either way (``clusters``: the groups, or the lists without ``groups``)."""
    diff = np.asarray(challenger, dtype=np.float64) - np.asarray(champion, dtype=np.float64)
    defined = ~np.isnan(diff)
    diff = diff[defined]
    if diff.size == 0:
        raise ValueError("paired_bootstrap: no list has a defined metric for both models")
    rng = np.random.default_rng(seed)
    if groups is None:
        sums, counts = diff, np.ones_like(diff)
    else:
        _, cluster = np.unique(np.asarray(groups)[defined], return_inverse=True)
        sums, counts = np.bincount(cluster, weights=diff), np.bincount(cluster).astype(np.float64)
    picks = rng.integers(0, sums.size, size=(resamples, sums.size))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return {"mean_diff": float(diff.mean()), "ci_low": float(np.quantile(means, alpha)),
            "ci_high": float(np.quantile(means, 1.0 - alpha)), "confidence": confidence,
            "resamples": resamples, "lists": int(diff.size), "clusters": int(sums.size)}

"""Position-bias (examination propensity) estimation from result-randomised traffic.

In requests served in random order, relevance is independent of position, so the click-through rate at each
position is proportional to the examination probability there. Fitting ``ctr(p) = c * (1 + p) ** -eta`` by
weighted least squares on the log scale gives ``eta``; inverse-propensity weights are then ``(1 + p) ** eta``.
"""

from __future__ import annotations

import numpy as np

#: Positions with fewer impressions than this are left out of the fit (too noisy).
MIN_IMPRESSIONS = 30


def fit_power_law(positions: np.ndarray, impressions: np.ndarray, clicks: np.ndarray) -> dict[str, float]:
    """Fit ``eta`` from per-position impression and click counts (0-based positions).

    Returns ``{"eta", "intercept", "positions_used", "clicks"}``; raises ValueError when there is too little data.
    """
    positions = np.asarray(positions, dtype=np.float64)
    impressions = np.asarray(impressions, dtype=np.float64)
    clicks = np.asarray(clicks, dtype=np.float64)
    usable = (impressions >= MIN_IMPRESSIONS) & (clicks > 0)
    if usable.sum() < 3:
        raise ValueError(f"too little randomised traffic to estimate position bias: {int(usable.sum())} positions "
                         f"with >= {MIN_IMPRESSIONS} impressions and a click")
    x = np.log1p(positions[usable])
    y = np.log(clicks[usable] / impressions[usable])
    weight = clicks[usable]  # ~ inverse variance of log(ctr) for a binomial count
    design = np.stack([np.ones_like(x), -x], axis=1) * np.sqrt(weight)[:, None]
    (intercept, eta), *_ = np.linalg.lstsq(design, y * np.sqrt(weight), rcond=None)
    return {"eta": float(eta), "intercept": float(intercept), "positions_used": int(usable.sum()),
            "clicks": int(clicks[usable].sum())}


def propensity_weights(positions: np.ndarray, eta: float, valid: np.ndarray, clip: float = 20.0) -> np.ndarray:
    """Per-item weights ``(1 + p) ** eta`` clipped at ``clip``, 0 where not ``valid`` (before scaling)."""
    return np.where(valid, np.minimum((1.0 + np.maximum(positions, 0.0)) ** eta, clip), 0.0).astype(np.float32)


def ipw_weights(positions: np.ndarray, eta: float, valid: np.ndarray, clip: float = 20.0) -> np.ndarray:
    """Per-item weights ``(1 + p) ** eta`` clipped at ``clip`` and scaled to mean 1 over ``valid`` items (the
    scaling is per batch: ``training.data`` does it in TensorFlow for batches it cuts itself)."""
    weights = propensity_weights(positions, eta, valid, clip).astype(np.float64)
    total = weights.sum()
    return (weights * (valid.sum() / total) if total > 0 else weights).astype(np.float32)

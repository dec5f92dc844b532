"""Position-bias (examination propensity) estimation from result-randomised traffic.

In requests served in random order, relevance is independent of position, so the click-through rate at each
position is proportional to the examination probability there. ``ctr(p) = c * (1 + p) ** -eta`` is fitted by
maximum likelihood on the binomial click counts (Newton's method from the log-scale least-squares fit), so
positions with few or no clicks count as the evidence they are: least squares on log ctr has to drop the
clickless positions deep in the list, which biased ``eta`` low on small logs (0.61 for a true 0.8 with 250
impressions per position, against 0.79 for the likelihood). Inverse-propensity weights are ``(1 + p) ** eta``.
"""

from __future__ import annotations

import numpy as np

#: Positions with fewer impressions than this are left out of the fit (too noisy).
MIN_IMPRESSIONS = 30
#: Largest inverse-propensity weight (training and evaluation): deep slots' rare clicks must not dominate.
CLIP = 20.0


def fit_power_law(positions: np.ndarray, impressions: np.ndarray, clicks: np.ndarray) -> dict[str, float]:
    """Fit ``eta`` from per-position impression and click counts (0-based positions).

    Returns ``{"eta", "intercept", "positions_used", "clicks"}`` (``intercept`` = log c); raises ValueError when
    there is too little data. Positions with fewer than ``MIN_IMPRESSIONS`` impressions are left out.
    """
    positions = np.asarray(positions, dtype=np.float64)
    impressions = np.asarray(impressions, dtype=np.float64)
    clicks = np.asarray(clicks, dtype=np.float64)
    usable = impressions >= MIN_IMPRESSIONS
    clicked = usable & (clicks > 0)
    if clicked.sum() < 3:
        raise ValueError(f"too little randomised traffic to estimate position bias: {int(clicked.sum())} positions "
                         f"with >= {MIN_IMPRESSIONS} impressions and a click")
    x, n, k = np.log1p(positions[usable]), impressions[usable], clicks[usable]
    start = _log_least_squares(x[k > 0], n[k > 0], k[k > 0])
    # A position clicked on every impression puts the likelihood's maximum on the boundary ctr = 1, where
    # Newton's method cannot land: such a (degenerate) log keeps the least-squares fit.
    intercept, eta = start if (k >= n).any() else _binomial_fit(x, n, k, start)
    return {"eta": float(eta), "intercept": float(intercept), "positions_used": int(usable.sum()),
            "clicks": int(k.sum())}


def _log_least_squares(x: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(log c, eta) by least squares on log ctr, weighted by clicks (~ inverse variance): the starting point."""
    weight = np.sqrt(k)
    design = np.stack([np.ones_like(x), -x], axis=1) * weight[:, None]
    return np.linalg.lstsq(design, np.log(k / n) * weight, rcond=None)[0]


def _binomial_fit(x: np.ndarray, n: np.ndarray, k: np.ndarray, start: np.ndarray,
                  iterations: int = 50) -> np.ndarray:
    """(log c, eta) maximising sum k log q + (n - k) log(1 - q), q = exp(log c - eta x), by damped Newton steps."""
    design = np.stack([np.ones_like(x), -x], axis=1)

    def loglik(theta: np.ndarray) -> float:
        q = np.exp(design @ theta)
        return -np.inf if q.max() >= 1 else float(np.sum(k * np.log(q) + (n - k) * np.log1p(-q)))

    theta = np.asarray(start, dtype=np.float64)
    if not np.isfinite(loglik(theta)):  # least squares put some ctr at or above 1: start from the mean ctr
        theta = np.array([np.log(k.sum() / n.sum()), 0.0])
    for _ in range(iterations):
        q = np.exp(design @ theta)
        gradient = design.T @ ((k - n * q) / (1 - q))
        curvature = q * (k - n) / (1 - q) ** 2  # <= 0: the log-likelihood is concave in theta
        hessian = design.T @ (design * curvature[:, None])
        try:
            step = np.linalg.solve(hessian, -gradient)
        except np.linalg.LinAlgError:
            break
        before, scale = loglik(theta), 1.0
        while scale > 1e-6 and not loglik(theta + scale * step) >= before:
            scale /= 2
        if scale <= 1e-6 or np.abs(scale * step).max() < 1e-10:  # no better point along the step: converged
            break
        theta = theta + scale * step
    return theta if np.isfinite(theta).all() and np.isfinite(loglik(theta)) else np.asarray(start, np.float64)


def propensity_weights(positions: np.ndarray, eta: float, valid: np.ndarray, clip: float = CLIP) -> np.ndarray:
    """Per-item weights ``(1 + p) ** eta`` clipped at ``clip``, 0 where not ``valid`` (before scaling)."""
    return np.where(valid, np.minimum((1.0 + np.maximum(positions, 0.0)) ** eta, clip), 0.0).astype(np.float32)


def ipw_weights(positions: np.ndarray, eta: float, valid: np.ndarray, clip: float = CLIP) -> np.ndarray:
    """Per-item weights ``(1 + p) ** eta`` clipped at ``clip`` and scaled to mean 1 over ``valid`` items (the
    scaling is per batch: ``training.data`` does it in TensorFlow for batches it cuts itself)."""
    weights = propensity_weights(positions, eta, valid, clip).astype(np.float64)
    total = weights.sum()
    return (weights * (valid.sum() / total) if total > 0 else weights).astype(np.float32)

"""Estimators of a subject's mean score over all items from its scores on a few.

Each function takes the anchor scores of many subjects at once (subjects x K,
nan = not observed) and returns (value, stderr) arrays on the scale of the
item-pool mean. IRT-based ones need abilities, which come from the binarized
anchor responses (see `irt.fit_theta`). Formulas follow tinyBenchmarks (IRT,
p-IRT, gp-IRT) and MERGE^3 (mp-IRT, gmp-IRT: ability near a combination of the
merged models' abilities).
"""

from __future__ import annotations

import numpy as np
import torch

from evomerge.estimators.irt import ItemParams, _lbfgs, fit_theta, one_thread

def weighted_mean(scores: np.ndarray, weights: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of the observed scores; stderr treats each as a Bernoulli draw (finite pool)."""
    scores = np.atleast_2d(scores)
    w = np.where(np.isnan(scores), 0.0, weights)
    w_sum = w.sum(1)
    w = w / np.where(w_sum > 0, w_sum, 1.0)[:, None]
    value = (w * np.nan_to_num(scores)).sum(1)
    k = scores.shape[1]
    fpc = max(1.0 - k / n_items, 0.0)
    stderr = np.sqrt(np.clip(value * (1 - value), 1e-6, None) * (w**2).sum(1) * fpc)
    return np.where(w_sum > 0, value, np.nan), stderr


def irt(params: ItemParams, theta: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted probability over all items; delta-method stderr from the ability covariance."""
    p = params.prob(theta)
    value = p.mean(1)
    grad = (p * (1 - p)) @ params.a / p.shape[1]  # d value / d theta
    stderr = np.sqrt(np.einsum("nd,nde,ne->n", grad, cov, grad))
    return value, stderr


def pirt(params: ItemParams, theta: np.ndarray, cov: np.ndarray, anchors: np.ndarray,
         anchor_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Observed anchor scores plus predicted probabilities of the items not observed."""
    anchor_scores = np.atleast_2d(anchor_scores)
    m = params.a.shape[0]
    p = params.prob(theta)
    seen = np.zeros_like(p, dtype=bool)
    seen[:, anchors] = ~np.isnan(anchor_scores)
    filled = p.copy()
    filled[:, anchors] = np.where(np.isnan(anchor_scores), p[:, anchors], anchor_scores)
    value = filled.mean(1)
    unseen_var = p * (1 - p) * ~seen
    grad = unseen_var @ params.a / m
    var = np.einsum("nd,nde,ne->n", grad, cov, grad) + unseen_var.sum(1) / m**2
    return value, np.sqrt(var)


def combine(lam: float, first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]):
    """lam * first + (1 - lam) * second (gp-IRT's convex combination); errors assumed independent."""
    value = lam * first[0] + (1 - lam) * second[0]
    stderr = np.sqrt((lam * first[1]) ** 2 + ((1 - lam) * second[1]) ** 2)
    return value, stderr


def merge_theta(params: ItemParams, anchors: np.ndarray, binary_scores: np.ndarray,
                source_thetas: np.ndarray, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """MERGE^3's merge-aware ability for ONE candidate: theta ~ sum_s w_s theta_s + delta.

    The simplex weights w maximise the anchor likelihood of the combination; then
    theta is the MAP with prior N(sum_s w_s theta_s, spread^2 I), so the sources'
    abilities pull a candidate seen on few anchors toward where merges usually land."""
    src = torch.tensor(np.atleast_2d(source_thetas), dtype=torch.float64)
    y_np = np.asarray(binary_scores, float).ravel()
    observed = ~np.isnan(y_np)
    a = torch.tensor(params.a[anchors][observed])
    b = torch.tensor(params.b[anchors][observed])
    y = torch.tensor(y_np[observed])
    z = torch.zeros(len(src), dtype=torch.float64, requires_grad=True)

    def loss():
        theta = torch.softmax(z, 0) @ src
        value = torch.nn.functional.binary_cross_entropy_with_logits(a @ theta - b, y, reduction="sum")
        return value + 1e-3 * (z**2).sum()  # keeps z bounded when one source explains everything

    if observed.any():
        with one_thread():
            _lbfgs([z], loss, 100)
    centre = (torch.softmax(z, 0) @ src).detach().numpy()
    return fit_theta(params, y_np[None, :], items=anchors, prior_mean=centre, prior_sd=spread)


# ---- learned map (metabench-style score reconstruction, anchors picked for it) ----------------
# Features of a subject's anchor scores x (missing cells -> the item's calibration mean):
# [1, m, m^2, m^3 | x], m = mean(x). The cubic in m is unpenalized, so with few calibration
# subjects the map falls back to a smooth function of the anchor mean; the per-item weights
# are ridge-penalized and take over as the population grows.
N_FREE = 4


def learned_features(scores: np.ndarray, item_means: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(scores, float))
    x = np.where(np.isnan(x), item_means, x)
    m = x.mean(1, keepdims=True)
    return np.hstack([np.ones_like(m), m, m**2, m**3, x])


def fit_ridge(features: np.ndarray, target: np.ndarray, lam: float) -> np.ndarray:
    """Least squares with an L2 penalty lam on the per-item weights only."""
    penalty = np.zeros(features.shape[1])
    penalty[N_FREE:] = lam
    penalty[1:N_FREE] = 1e-8 * len(features)  # keeps the cubic solvable when m is nearly constant
    return np.linalg.solve(features.T @ features + np.diag(penalty), features.T @ target)


def learned(coef: np.ndarray, item_means: np.ndarray, residual_sd: float,
            scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prediction of the learned map; stderr = its held-out residual sd, widened by the
    Bernoulli variance of anchors that were not observed (imputed by their mean)."""
    scores = np.atleast_2d(np.asarray(scores, float))
    value = learned_features(scores, item_means) @ coef
    # d value / d x_j, evaluated at the observed mean (the cubic in m couples all items).
    x = np.where(np.isnan(scores), item_means, scores)
    m = x.mean(1)
    k = scores.shape[1]
    slope = coef[N_FREE:][None, :] + ((coef[1] + 2 * coef[2] * m + 3 * coef[3] * m**2) / k)[:, None]
    var_missing = (np.isnan(scores) * slope**2 * item_means * (1 - item_means)).sum(1)
    return value, np.sqrt(residual_sd**2 + var_missing)

"""Multidimensional two-parameter logistic IRT, fitted by MAP with full-batch L-BFGS.

P(subject i answers item j) = sigmoid(a_j . theta_i - b_j). Abilities have a
standard normal prior; discriminations and difficulties weak normal priors, which
is what keeps the fit finite for items everybody (or nobody) gets right. Missing
cells simply drop out of the likelihood.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.errors import EvomergeError

PRIOR_SD_A = 2.0
PRIOR_SD_B = 4.0


@dataclass
class ItemParams:
    a: np.ndarray  # items x dims, discriminations
    b: np.ndarray  # items, difficulties (mirt's intercept d = -b)

    @property
    def dims(self) -> int:
        return self.a.shape[1]

    def prob(self, theta: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """P(correct) for subjects x items (or the given item subset)."""
        a, b = (self.a, self.b) if items is None else (self.a[items], self.b[items])
        return 1.0 / (1.0 + np.exp(-(np.atleast_2d(theta) @ a.T - b)))


def binarize(values: np.ndarray) -> tuple[np.ndarray, float | None]:
    """0/1 responses, thresholding graded scores where the mean is preserved best.

    tinyBenchmarks' rule: pick c so that mean(Y >= c) is as close as possible to
    mean(Y); binary matrices pass through (threshold None)."""
    observed = values[~np.isnan(values)]
    if np.all((observed == 0) | (observed == 1)):
        return values.copy(), None
    target = observed.mean()
    candidates = np.unique(observed)
    sorted_obs = np.sort(observed)
    frac_at_least = 1.0 - np.searchsorted(sorted_obs, candidates, side="left") / observed.size
    c = float(candidates[np.argmin(np.abs(frac_at_least - target))])
    out = np.where(np.isnan(values), np.nan, (values >= c).astype(float))
    return out, c


@contextlib.contextmanager
def one_thread():
    """These fits are many small ops: on a shared CPU one thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _lbfgs(params: list[torch.Tensor], loss_fn, max_iter: int) -> None:
    """Minimise loss_fn over params in place with scipy's L-BFGS-B, torch giving the gradient.

    (scipy rather than torch.optim.LBFGS: constructing a torch optimizer imports torch._dynamo,
    which alone takes longer than these fits.)"""
    from scipy.optimize import minimize

    sizes = [p.numel() for p in params]

    def unpack(x: np.ndarray) -> None:
        with torch.no_grad():
            for p, chunk in zip(params, np.split(x, np.cumsum(sizes)[:-1])):
                p.copy_(torch.from_numpy(chunk).view(p.shape))

    def value_and_grad(x: np.ndarray):
        unpack(x)
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return float(loss.detach()), np.concatenate([p.grad.reshape(-1).numpy() for p in params])

    x0 = np.concatenate([p.detach().reshape(-1).numpy() for p in params])
    result = minimize(value_and_grad, x0, jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "maxcor": 20, "gtol": 1e-6, "ftol": 1e-12})
    unpack(result.x)


def fit_irt(responses: np.ndarray, dims: int, seed: int = 0, max_iter: int = 500) -> tuple[ItemParams, np.ndarray]:
    """Fit item parameters and abilities to a 0/1 matrix (nan = missing)."""
    n, m = responses.shape
    if dims < 1:
        raise EvomergeError(f"IRT dims must be >= 1, got {dims}")
    if n <= dims:
        raise EvomergeError(f"IRT with {dims} dimensions needs more than {dims} subjects, got {n}")
    if m < 2:
        raise EvomergeError(f"IRT needs at least 2 items, got {m}")
    mask_np = ~np.isnan(responses)
    y = torch.tensor(np.nan_to_num(responses), dtype=torch.float64)
    mask = torch.tensor(mask_np, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    # Start from item easiness and a centred, scaled row mean so the first dimension
    # begins as "general ability"; the others break symmetry from small noise.
    p_item = np.clip(np.nansum(responses, 0) / np.maximum(mask_np.sum(0), 1), 0.02, 0.98)
    row = np.nansum(responses, 1) / np.maximum(mask_np.sum(1), 1)
    row = (row - row.mean()) / (row.std() + 1e-9)
    theta0 = 0.1 * torch.randn(n, dims, generator=gen, dtype=torch.float64)
    theta0[:, 0] = torch.tensor(row)
    theta = theta0.requires_grad_()
    a = (torch.full((m, dims), 0.1, dtype=torch.float64) + 0.1 * torch.randn(m, dims, generator=gen, dtype=torch.float64))
    a[:, 0] = 1.0
    a.requires_grad_()
    b = torch.tensor(-np.log(p_item / (1 - p_item)), dtype=torch.float64).requires_grad_()
    count = mask.sum()

    def loss():
        logits = theta @ a.T - b
        nll = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * mask).sum()
        prior = 0.5 * (theta**2).sum() + 0.5 * (a**2).sum() / PRIOR_SD_A**2 + 0.5 * (b**2).sum() / PRIOR_SD_B**2
        return (nll + prior) / count

    with one_thread():
        _lbfgs([theta, a, b], loss, max_iter)
    a_np, th = a.detach().numpy().copy(), theta.detach().numpy().copy()
    # Orient each dimension so items load positively on it on average (sign is arbitrary).
    flip = np.where(a_np.sum(0) < 0, -1.0, 1.0)
    return ItemParams(a_np * flip, b.detach().numpy().copy()), th * flip


def fit_theta(params: ItemParams, responses: np.ndarray, items: np.ndarray | None = None,
              prior_mean: np.ndarray | None = None, prior_sd: float = 1.0,
              max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """MAP abilities of subjects from their responses on `items` (nan = not observed).

    Returns (theta: subjects x dims, cov: subjects x dims x dims), cov being the
    inverse Hessian of the negative log posterior at the mode (Laplace)."""
    y_np = np.atleast_2d(responses)
    a_np = params.a if items is None else params.a[items]
    b_np = params.b if items is None else params.b[items]
    n, d = y_np.shape[0], params.dims
    a = torch.tensor(a_np)
    b = torch.tensor(b_np)
    mask = torch.tensor(~np.isnan(y_np), dtype=torch.float64)
    y = torch.tensor(np.nan_to_num(y_np))
    mu = torch.zeros(n, d, dtype=torch.float64) if prior_mean is None else torch.tensor(np.broadcast_to(prior_mean, (n, d)).copy())
    theta = mu.clone()
    eye = torch.eye(d, dtype=torch.float64) / prior_sd**2
    outer = (a[:, :, None] * a[:, None, :]).reshape(-1, d * d)  # a_j a_j^T per item, flattened
    # Newton steps per subject: the posterior is log-concave, so this converges in a few steps.
    with one_thread():
        theta = _newton_theta(theta, mu, y, mask, a, b, outer, eye, prior_sd, max_iter)
        p = torch.sigmoid(theta @ a.T - b)
        hess = ((p * (1 - p) * mask) @ outer).view(n, d, d) + eye
        cov = torch.linalg.inv(hess)
    return theta.numpy(), cov.numpy()


def _newton_theta(theta, mu, y, mask, a, b, outer, eye, prior_sd, max_iter):
    """Damped Newton per subject: a step is halved until that subject's posterior improves
    (needed with the very steep items metabench selects, where plain Newton oscillates)."""
    n, d = theta.shape

    def neg_log_post(t):
        logits = t @ a.T - b
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (nll * mask).sum(1) + 0.5 * ((t - mu) ** 2).sum(1) / prior_sd**2

    current = neg_log_post(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(theta @ a.T - b)
        grad = ((y - p) * mask) @ a - (theta - mu) / prior_sd**2
        hess = ((p * (1 - p) * mask) @ outer).view(n, d, d) + eye
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        scale = torch.ones(n, 1, dtype=theta.dtype)
        for _ in range(30):
            trial = theta + scale * step
            value = neg_log_post(trial)
            worse = value > current + 1e-12
            if not worse.any():
                break
            scale = torch.where(worse[:, None], scale * 0.5, scale)
        theta = torch.where(worse[:, None], theta, trial)
        current = torch.minimum(value, current)
        if (scale * step).abs().max() < 1e-7:
            break
    return theta


def heldout_loglik(params: ItemParams, responses: np.ndarray, seed: int = 0, frac: float = 0.5) -> float:
    """Mean log-likelihood of a random half of each subject's cells, abilities from the other half."""
    rng = np.random.default_rng(seed)
    observed = ~np.isnan(responses)
    hide = observed & (rng.random(responses.shape) < frac)
    shown = np.where(hide, np.nan, responses)
    theta, _ = fit_theta(params, shown)
    p = np.clip(params.prob(theta), 1e-9, 1 - 1e-9)
    y = responses[hide]
    return float(np.mean(y * np.log(p[hide]) + (1 - y) * np.log(1 - p[hide])))

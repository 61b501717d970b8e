"""Choosing the few items a candidate is actually scored on.

Anchors (tinyBenchmarks): cluster the items, take the item nearest each centroid,
and weight it by its cluster's share of the items, so the weighted anchor mean
estimates the mean over all items. Items are embedded either by their IRT
parameters (a_j, b_j) or by their correctness column over the calibration
subjects. The baseline is a stratified random subset: items sorted by
difficulty, cut into K strata, one item drawn from each.
"""

from __future__ import annotations

import numpy as np

from evomerge.errors import EvomergeError


def kmeans(points: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding (scikit-learn's, best of 10 seeded starts). Returns
    (centroids, labels)."""
    from sklearn.cluster import KMeans

    fit = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(np.asarray(points, dtype=float))
    return fit.cluster_centers_, fit.labels_


def _check_k(k: int, n_items: int) -> None:
    if k < 1:
        raise EvomergeError(f"number of anchors must be >= 1, got {k}")
    if k > n_items:
        raise EvomergeError(f"{k} anchors requested but the response matrix has only {n_items} items")


def item_embeddings(method: str, responses: np.ndarray | None = None, a: np.ndarray | None = None,
                    b: np.ndarray | None = None) -> np.ndarray:
    if method == "irt":
        return np.column_stack([a, b])
    if method == "correct":
        # Missing cells count as the item's mean, so they pull nothing apart.
        col_mean = np.nanmean(responses, 0)
        return np.where(np.isnan(responses), col_mean, responses).T
    raise EvomergeError(f"unknown anchor method {method!r} (irt, correct)")


def select_anchors(embeddings: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(anchor item indices, weights summing to 1) by k-means over item embeddings."""
    _check_k(k, len(embeddings))
    centroids, labels = kmeans(embeddings, k, seed)
    anchors, weights = [], []
    for j in range(k):
        members = np.flatnonzero(labels == j)
        if len(members) == 0:
            continue
        d2 = ((embeddings[members] - centroids[j]) ** 2).sum(1)
        anchors.append(members[d2.argmin()])
        weights.append(len(members))
    anchors = np.array(anchors)
    weights = np.array(weights, float)
    # Duplicate centroids can leave fewer than k distinct anchors; top up with unused items.
    if len(anchors) < k:
        rest = np.setdiff1d(np.arange(len(embeddings)), anchors)
        extra = np.random.default_rng(seed).choice(rest, k - len(anchors), replace=False)
        anchors = np.concatenate([anchors, extra])
        weights = np.concatenate([weights, np.full(len(extra), 1e-9)])
    return anchors, weights / weights.sum()


def stratified_random(item_means: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """One random item from each of k difficulty strata (equal-count bins of item means)."""
    _check_k(k, len(item_means))
    rng = np.random.default_rng(seed)
    order = np.argsort(item_means, kind="stable")
    return np.array([rng.choice(stratum) for stratum in np.array_split(order, k)])


def forward_select(responses: np.ndarray, target: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Greedy forward selection of k items whose responses best predict `target` linearly.

    Each step adds the item that most reduces the least-squares residual of the target
    regressed on the items chosen so far (orthogonal matching pursuit over correctness
    columns). This optimises the anchors for predicting the FULL score, which is what
    tinyBenchmarks' clustering and metabench's information filter only approximate.
    Missing cells count as the item's mean. Once the chosen items span the subjects
    (few subjects), the rest are stratified random items."""
    _check_k(k, responses.shape[1])
    x = np.where(np.isnan(responses), np.nanmean(responses, 0), responses)
    x = np.nan_to_num(x - x.mean(0))  # an all-missing column becomes a constant zero column
    r = np.asarray(target, float) - np.mean(target)
    norm0 = (x**2).sum(0)
    chosen: list[int] = []
    for _ in range(k):
        den = (x**2).sum(0)
        # A column already (almost) explained by the chosen ones carries no new information.
        alive = den > 1e-6 * norm0 + 1e-12
        alive[chosen] = False
        if not alive.any():
            break
        gain = np.where(alive, (r @ x) ** 2 / np.where(alive, den, 1.0), -1.0)
        j = int(np.argmax(gain))
        chosen.append(j)
        q = x[:, j] / np.sqrt(den[j])
        x -= np.outer(q, q @ x)
        r -= q * (q @ r)
    if len(chosen) < k:
        rest = np.setdiff1d(np.arange(responses.shape[1]), chosen)
        means = np.nan_to_num(np.nanmean(responses[:, rest], 0), nan=0.5)
        chosen += list(rest[stratified_random(means, k - len(chosen), seed)])
    return np.array(chosen, dtype=int)


def mass_weights(embeddings: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Weights of given anchors: the share of items nearest to each (as k-means weights are)."""
    d2 = ((embeddings[:, None, :] - embeddings[anchors][None, :, :]) ** 2).sum(-1)
    counts = np.bincount(d2.argmin(1), minlength=len(anchors)).astype(float)
    counts[counts == 0] = 1e-9
    return counts / counts.sum()

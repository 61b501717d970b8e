"""On simulated 2PL data every estimator beats or matches a random subset of the same size,
and the merge-aware ones use the sources' abilities."""

from dataclasses import replace

import numpy as np
import pytest

from evomerge.estimators import Calibration
from evomerge.estimators.anchors import kmeans, select_anchors, stratified_random
from evomerge.errors import EvomergeError


@pytest.fixture(scope="module")
def fitted(simulated_2d):
    y, *_ = simulated_2d
    train, test = y[:600], y[600:]
    calib = Calibration.fit(train, n_anchors=25, method="irt", dims=2, seed=0, max_iter=150)
    return calib, test


def test_every_estimator_beats_or_matches_random(fitted):
    calib, test = fitted
    truth = test.mean(1)
    pool = calib.estimate_many(test[:, calib.anchors], test[:, calib.random_items], scale="pool")
    mae = {name: np.mean(np.abs(v - truth)) for name, (v, _) in pool.items()}
    for name in ("irt", "pirt", "gpirt"):
        assert mae[name] < mae["random"], (name, mae)
    # The cluster-weighted anchor mean is noisier than a difficulty-stratified random subset
    # at small K (unequal weights); it must stay in the same league.
    assert mae["anchor"] <= 1.3 * mae["random"], mae


def test_stderr_is_honest(fitted):
    calib, test = fitted
    truth = test.mean(1)
    value, stderr = calib.estimate_many(test[:, calib.anchors], scale="pool")["pirt"]
    z = np.abs(value - truth) / stderr
    assert 0.4 < np.mean(z < 1.0) < 0.95  # about 68% inside one standard error


def test_single_estimate_matches_batch_and_ignores_missing_anchors(fitted):
    calib, test = fitted
    scores = test[0, calib.anchors]
    one = calib.estimate("gpirt", scores)
    batch = calib.estimate_many(test[:1, calib.anchors])["gpirt"]
    assert one.value == pytest.approx(batch[0][0]) and one.n_items == len(calib.anchors)
    holey = scores.copy()
    holey[:3] = np.nan
    est = calib.estimate("gpirt", holey)
    assert est.n_items == len(calib.anchors) - 3 and 0.0 <= est.value <= 1.0 and est.stderr > 0


def test_merge_aware_estimate_is_pulled_toward_the_sources(fitted, simulated_2d):
    # A merge of two near-copies of one model: its sources' abilities (known from the full
    # pool) pin its ability down far better than 6 anchors alone do.
    y, *_ = simulated_2d
    calib = replace(fitted[0], anchors=fitted[0].anchors[:6], anchor_weights=np.full(6, 1 / 6), learned={})
    errors = {"pirt": [], "mpirt": []}
    for i in range(600, 620):
        theta_i, _ = calib.theta_full(y[i])
        sources = np.vstack([theta_i + 0.05, theta_i - 0.05])
        for name in errors:
            est = calib.estimate(name, y[i, calib.anchors], source_thetas=sources, scale="pool")
            errors[name].append(abs(est.value - y[i].mean()))
    assert np.mean(errors["mpirt"]) < 0.8 * np.mean(errors["pirt"])
    gmp = calib.estimate("gmpirt", y[600, calib.anchors], source_thetas=sources)
    assert 0.0 <= gmp.value <= 1.0 and gmp.stderr > 0
    with pytest.raises(EvomergeError, match="source_thetas"):
        calib.estimate("gmpirt", y[600, calib.anchors])


def test_kmeans_anchors_weights_are_cluster_mass():
    points = np.concatenate([np.zeros((30, 2)), np.ones((10, 2)) * 5]) + np.random.default_rng(0).normal(0, 0.01, (40, 2))
    anchors, weights = select_anchors(points, 2, seed=0)
    assert sorted(np.round(weights, 2)) == [0.25, 0.75]
    _, labels = kmeans(points, 2, seed=0)
    assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1


def test_stratified_random_takes_one_item_per_difficulty_stratum():
    means = np.linspace(0, 1, 100)
    picked = stratified_random(means, 10, seed=0)
    assert sorted(picked // 10) == list(range(10))
    with pytest.raises(EvomergeError, match="only 100 items"):
        stratified_random(means, 101)

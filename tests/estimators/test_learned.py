"""The learned estimator: anchors chosen for predicting the full score, ridge map to it.

The simulated benchmark mimics metabench: the response matrix holds only some of the
benchmark's items (and not a representative sample: the harder ones), while the full
score is the mean over every item, most of which nobody observed."""

import numpy as np
import pytest

from evomerge.estimators import Calibration
from evomerge.estimators.anchors import forward_select


@pytest.fixture(scope="module")
def partial_benchmark():
    rng = np.random.default_rng(7)
    n, m_all, m_seen = 700, 300, 60
    theta = rng.normal(size=(n, 2))
    a = np.abs(rng.normal(1.0, 0.4, size=(m_all, 2)))
    b = rng.normal(0.0, 1.2, size=m_all)
    p = 1 / (1 + np.exp(-(theta @ a.T - b)))
    y = (rng.random(p.shape) < p).astype(float)
    seen = np.argsort(b)[-m_seen:]  # the observed items are the hardest ones
    full = y.mean(1)                # the full score counts every item
    return y[:, seen], full


@pytest.fixture(scope="module")
def fitted(partial_benchmark):
    y, full = partial_benchmark
    calib = Calibration.fit(y[:550], n_anchors=12, dims=1, seed=0, full_scores=full[:550], max_iter=100)
    return calib, y[550:], full[550:]


def test_learned_beats_random_subsets_of_the_same_size(fitted):
    calib, y, full = fitted
    est = calib.estimate_many(y[:, calib.anchors], y[:, calib.random_items])
    mae_learned = np.mean(np.abs(est["learned"][0] - full))
    mae_mapped_random = np.mean(np.abs(est["random"][0] - full))
    rng = np.random.default_rng(0)
    mae_plain = np.mean([np.mean(np.abs(y[:, rng.choice(y.shape[1], 12, replace=False)].mean(1) - full))
                         for _ in range(20)])
    assert mae_learned < 0.5 * mae_plain, (mae_learned, mae_plain)  # plain means miss the easy items
    assert mae_learned < 0.9 * mae_mapped_random, (mae_learned, mae_mapped_random)


def test_single_estimate_matches_batch_and_has_honest_stderr(fitted):
    calib, y, full = fitted
    values, sds = calib.estimate_many(y[:, calib.anchors])["learned"]
    one = calib.estimate("learned", y[0, calib.anchors])
    assert one.value == pytest.approx(values[0]) and one.n_items == 12
    inside = np.mean(np.abs(values - full) < sds)
    assert 0.5 < inside < 0.9, inside  # about 68% within one standard error


def test_missing_anchors_widen_the_stderr(fitted):
    calib, y, _ = fitted
    scores = y[0, calib.anchors].copy()
    full_info = calib.estimate("learned", scores)
    scores[:4] = np.nan
    holey = calib.estimate("learned", scores)
    assert holey.n_items == 8 and holey.stderr > full_info.stderr and 0.0 <= holey.value <= 1.0


def test_learned_map_survives_the_json_round_trip(fitted, tmp_path):
    calib, y, _ = fitted
    loaded = Calibration.load(calib.save(tmp_path / "c.json"))
    assert loaded.estimate("learned", y[3, calib.anchors]) == calib.estimate("learned", y[3, calib.anchors])
    assert loaded.info["learned_lambda"] == calib.learned["lam"]


def test_forward_selection_finds_the_items_the_target_is_made_of():
    rng = np.random.default_rng(1)
    y = (rng.random((400, 50)) < 0.5).astype(float)
    target = y[:, [3, 17, 29, 41]].mean(1)
    assert set(forward_select(y, target, 4)) == {3, 17, 29, 41}


def test_tiny_population_still_gives_k_distinct_anchors():
    # 20 subjects cannot identify 15 item weights: selection stops once the chosen columns
    # span the subjects and tops up with stratified random items; estimates stay in [0, 1].
    rng = np.random.default_rng(2)
    y = (rng.random((20, 40)) < rng.random(40)).astype(float)
    calib = Calibration.fit(y, n_anchors=15, dims=1, seed=0, max_iter=50)
    assert len(set(calib.anchors.tolist())) == 15
    est = calib.estimate("learned", y[0, calib.anchors])
    assert 0.0 <= est.value <= 1.0 and np.isfinite(est.stderr)

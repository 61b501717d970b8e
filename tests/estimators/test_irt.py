"""The 2PL fit recovers known parameters; graded scores binarize preserving their mean."""

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.estimators.irt import binarize, fit_irt, fit_theta


def test_fit_recovers_known_item_parameters(simulated_1d):
    y, a, b, theta = simulated_1d
    params, theta_hat = fit_irt(y, dims=1, seed=0)
    assert np.corrcoef(params.a[:, 0], a[:, 0])[0, 1] > 0.9
    assert np.corrcoef(params.b, b)[0, 1] > 0.97
    assert np.corrcoef(theta_hat[:, 0], theta[:, 0])[0, 1] > 0.9


def test_missing_cells_are_left_out_not_counted_as_wrong(simulated_1d):
    y, a, b, _ = simulated_1d
    holes = y.copy()
    holes[np.random.default_rng(3).random(y.shape) < 0.3] = np.nan
    params, _ = fit_irt(holes, dims=1, seed=0)
    assert np.corrcoef(params.b, b)[0, 1] > 0.95
    assert abs(np.mean(params.b) - np.mean(b)) < 0.3  # nan-as-0 would shift every item harder


def test_theta_from_a_few_items_agrees_with_joint_fit(simulated_1d):
    y, *_ = simulated_1d
    params, theta_joint = fit_irt(y, dims=1, seed=0)
    theta, cov = fit_theta(params, y)
    assert np.abs(theta - theta_joint).max() < 0.05
    few, cov_few = fit_theta(params, y[:, :10], items=np.arange(10))
    assert np.all(cov_few[:, 0, 0] > cov[:, 0, 0])  # fewer items, wider posterior


def test_binarize_preserves_the_mean_of_graded_scores():
    rng = np.random.default_rng(0)
    graded = rng.beta(2, 3, size=(50, 80))
    graded[rng.random(graded.shape) < 0.05] = np.nan
    binary, threshold = binarize(graded)
    assert threshold is not None
    assert set(np.unique(binary[~np.isnan(binary)])) <= {0.0, 1.0}
    assert np.array_equal(np.isnan(binary), np.isnan(graded))
    assert abs(np.nanmean(binary) - np.nanmean(graded)) < 0.01


def test_binary_input_passes_through(simulated_1d):
    y, *_ = simulated_1d
    out, threshold = binarize(y)
    assert threshold is None and np.array_equal(out, y)


def test_fewer_subjects_than_dimensions_is_a_user_error():
    with pytest.raises(EvomergeError, match="needs more than 3 subjects"):
        fit_irt(np.ones((3, 10)), dims=3)

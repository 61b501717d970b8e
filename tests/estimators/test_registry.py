"""The estimator registry as a spec: every estimator one object, asked by everything else."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.estimators import Calibration, registry
from evomerge.search.config import load_config

SYNTHETIC = {
    "seed": 7,
    "genome": {"kind": "box", "dim": 2, "lower": 0.0, "upper": 1.0},
    "objectives": [{"name": "a", "task": "synthetic/a"}],
    "evaluator": {"kind": "synthetic"},
    "optimizer": {"name": "random", "population": 2, "generations": 1},
}


@pytest.fixture(scope="module")
def calib(simulated_1d):
    y, *_ = simulated_1d
    return Calibration.fit(y[:600], n_anchors=8, dims=1, seed=0)


def test_the_mean_and_its_standard_error_by_hand():
    exact = registry.mean_estimate(np.array([1.0, 0.0, 1.0, 1.0]))
    assert (exact.value, exact.n_items) == (0.75, 4)
    assert exact.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))       # binomial
    graded = registry.mean_estimate(np.array([0.2, 0.4]))
    assert graded.value == pytest.approx(0.3)
    assert graded.stderr == pytest.approx(math.sqrt(0.02 / 2))             # sample variance 0.02
    assert registry.mean_estimate(np.array([0.7])).stderr == 0.0


def test_the_calibration_free_estimators_pick_their_items_from_the_task():
    full, subset = registry.get("full"), registry.get("subset")
    assert not full.calibrated and not subset.calibrated
    assert list(full.items(5)) == [0, 1, 2, 3, 4]
    chosen = subset.items(40, subset=0.1, seed=3)
    assert len(chosen) == 4 and list(chosen) == sorted(set(chosen.tolist()))
    assert list(chosen) == list(subset.items(40, subset=0.1, seed=3))         # a pure function of the seed
    assert len(subset.items(40, subset=7, seed=3)) == 7                       # >= 1: a count
    assert subset.estimate(np.array([1.0, 0.0])).value == 0.5


def test_calibrated_estimators_read_the_calibrations_anchors_or_its_random_items(calib):
    for e in registry.calibrated():
        want = calib.random_items if e.name.startswith("random") else calib.anchors
        assert list(e.items(calib.n_items, calib)) == list(want), e.name
        assert e.needs_abilities == (e.name in ("mpirt", "gmpirt", "gmpirt_reg")), e.name
    # a calibration fits a map for every registered estimator but the direct one
    assert set(calib.maps) == {e.name for e in registry.calibrated() if e.map != "direct"}


def test_calibration_estimate_is_the_registered_objects_estimate(calib, simulated_1d):
    y, *_ = simulated_1d
    thetas = np.array([[0.3], [-0.2]])
    for e in registry.calibrated():
        scores = y[700, e.items(calib.n_items, calib)]
        assert calib.estimate(e.name, scores, source_thetas=thetas) == e.estimate(scores, calib, thetas), e.name
    with pytest.raises(EvomergeError, match="needs no calibration"):
        calib.estimate("full", y[700, calib.anchors])


def test_an_unknown_name_is_one_line_listing_every_registered_name():
    with pytest.raises(EvomergeError) as info:
        registry.get("stratified", "objectives.a.estimator")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("objectives.a.estimator: unknown estimator 'stratified' (choose from full, subset, ")
    assert all(name in message for name in registry.ESTIMATORS)


def test_an_unknown_estimator_in_a_config_fails_before_anything_is_written(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SYNTHETIC | {"objectives": [{"name": "a", "task": "synthetic/a",
                                                                   "estimator": "stratified"}]}))
    capsys.readouterr()
    assert main(["search", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "objectives.0.estimator: unknown estimator 'stratified' (choose from full, subset, random, anchor" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", list(registry.ESTIMATORS))
def test_every_registered_estimator_round_trips_through_a_search_config(name, tmp_path):
    from evomerge.search.config import build_genome_space
    from evomerge.workers.evaluator import EvaluatorSpec

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SYNTHETIC | {"objectives": [{"name": "a", "task": "synthetic/a",
                                                                   "estimator": name}]}))
    cfg = load_config(config)
    assert cfg.objectives[0].estimator == name
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    assert load_config(again).objectives[0].estimator == name
    assert EvaluatorSpec.from_config(cfg, build_genome_space(cfg)).objectives[0].estimator == name
    # graded scores fit no IRT: likelihood scoring goes with the calibration-free ones only
    graded = tmp_path / "graded.yaml"
    graded.write_text(yaml.safe_dump(SYNTHETIC | {"objectives": [{"name": "a", "task": "synthetic/a",
                                                                   "estimator": name, "scoring": "likelihood"}]}))
    if registry.get(name).calibrated:
        with pytest.raises(EvomergeError, match="likelihood scoring works with full or subset"):
            load_config(graded)
    else:
        assert load_config(graded).objectives[0].scoring == "likelihood"

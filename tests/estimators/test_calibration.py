"""The calibration artifact round-trips through JSON and refuses corrupted or foreign files."""

import json

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.estimators import Calibration


@pytest.fixture(scope="module")
def calib(simulated_1d):
    y, *_ = simulated_1d
    return Calibration.fit(y[:600], n_anchors=10, dims=[1, 2], seed=0, max_iter=150)


def test_round_trip_gives_identical_estimates(calib, simulated_1d, tmp_path):
    y, *_ = simulated_1d
    path = calib.save(tmp_path / "calib.json")
    loaded = Calibration.load(path)
    assert np.array_equal(loaded.anchors, calib.anchors)
    for name in ("anchor", "irt", "pirt", "gpirt", "gpirt_reg", "learned"):
        assert loaded.estimate(name, y[700, calib.anchors]) == calib.estimate(name, y[700, calib.anchors])
    assert loaded.info["dims"] in (1, 2) and set(loaded.info["dims_tried"]) == {"1", "2"}


def test_corrupted_file_is_rejected(calib, tmp_path):
    path = calib.save(tmp_path / "calib.json")
    doc = json.loads(path.read_text())
    doc["payload"]["b"][0] += 0.5
    path.write_text(json.dumps(doc))
    with pytest.raises(EvomergeError, match="checksum mismatch"):
        Calibration.load(path)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(EvomergeError, match="bad JSON"):
        Calibration.load(path)


def test_other_version_is_rejected(calib, tmp_path):
    path = calib.save(tmp_path / "calib.json")
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(EvomergeError, match="version 99"):
        Calibration.load(path)


def test_fit_rejects_more_anchors_than_items(simulated_1d):
    y, *_ = simulated_1d
    with pytest.raises(EvomergeError, match="41 anchors requested but the response matrix has only 40 items"):
        Calibration.fit(y, n_anchors=41, dims=1)


def test_anchor_count_must_match(calib):
    with pytest.raises(EvomergeError, match="got 3 anchor scores"):
        calib.estimate("pirt", np.ones(3))

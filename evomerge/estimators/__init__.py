"""Cheap fitness: IRT-calibrated anchor subsets (tinyBenchmarks, MERGE^3), one registry of estimators."""

from evomerge.estimators.calibration import Calibration
from evomerge.estimators.registry import ESTIMATORS, Estimate, Estimator, register

__all__ = ["Calibration", "ESTIMATORS", "Estimate", "Estimator", "register"]

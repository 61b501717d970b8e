"""Cheap fitness: IRT-calibrated anchor subsets (tinyBenchmarks, MERGE^3)."""

from evomerge.estimators.calibration import Calibration, Estimate, estimate

__all__ = ["Calibration", "Estimate", "estimate"]

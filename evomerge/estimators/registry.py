"""Every fitness estimator as one object: which items it scores, and how it turns their
scores into a value with a standard error.

An objective's ``estimator:`` names one of ``ESTIMATORS``. The evaluator asks the object
which items to score (``items``), scores them, and asks it for the estimate
(``estimate``); the config, the pre-search and the run's checks ask it whether it needs a
calibration (IRT item parameters and anchors, ``calibrated``) or the source models'
abilities (``needs_abilities``). Nothing else in the package knows an estimator by name,
so a new one is a ``register(...)`` call away (see tests/estimators/test_registry.py).

Two kinds ship:

- ``MeanEstimator``: the mean over a set of the task's items picked without a calibration
  (``full``: every item; ``subset``: a fixed random sample);
- ``CalibratedEstimator``: an item-pool estimate from a calibration's anchors (or its
  stratified random items), mapped onto the full score by a map the calibration fitted
  (``evomerge.estimators.calibration``; formulas in ``estimators.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.estimators.calibration import Calibration


@dataclass
class Estimate:
    value: float
    stderr: float
    n_items: int


def mean_estimate(scores: np.ndarray) -> Estimate:
    """The mean and its standard error (binomial for 0/1 scores, sample-based for graded ones)."""
    scores = np.asarray(scores, float)
    p = float(np.mean(scores))
    n = len(scores)
    if n < 2:
        return Estimate(p, 0.0, n)
    binary = bool(np.all((scores == 0) | (scores == 1)))
    var = p * (1 - p) if binary else float(np.var(scores, ddof=1))
    return Estimate(p, math.sqrt(max(var, 0.0) / n), n)


def subset_indices(n_items: int, size: float, seed: int) -> np.ndarray:
    """The "subset" estimator's items: a fixed random sample (sorted), a pure function of the
    seed, so every worker and every resumed run scores the same items. ``size`` < 1 is a
    fraction of the items, else a count."""
    k = max(1, min(n_items, round(size * n_items) if size < 1 else int(size)))
    return np.sort(np.random.default_rng([int(seed), 0x5B5E7]).choice(n_items, k, replace=False))


class Estimator:
    """What every estimator answers. ``items`` are positions in the task's item order for a
    calibration-free estimator, in the calibration's item order for a calibrated one."""

    name: str
    summary: str
    calibrated: bool = False          # needs a Calibration (fitted before the search when not given)
    needs_abilities: bool = False     # needs the source models' abilities (source_thetas)

    def items(self, n_items: int, calibration: Calibration | None = None, subset: float = 0.1,
              seed: int = 0) -> np.ndarray:
        raise NotImplementedError

    def estimate(self, scores: np.ndarray, calibration: Calibration | None = None,
                 source_thetas: np.ndarray | None = None, scale: str = "full") -> Estimate:
        """The estimate from the scores of ``items(...)``, in that order. ``scale="pool"``:
        the item-pool estimate before the calibration's map (calibrated estimators)."""
        raise NotImplementedError


@dataclass(frozen=True)
class MeanEstimator(Estimator):
    """The mean over items chosen without a calibration: ``pick(n_items, subset, seed)``."""

    name: str
    summary: str
    pick: Callable[[int, float, int], np.ndarray]

    def items(self, n_items, calibration=None, subset=0.1, seed=0):
        return np.asarray(self.pick(n_items, subset, seed), dtype=int)

    def estimate(self, scores, calibration=None, source_thetas=None, scale="full"):
        return mean_estimate(scores)


@dataclass(frozen=True)
class CalibratedEstimator(Estimator):
    """``pool``: the item-pool estimate it starts from (random, anchor, irt, pirt, gpirt,
    mpirt, gmpirt, learned); ``map``: the features of its map onto the full score (affine,
    cubic, reg; direct: the pool stage predicts the full score itself); ``fitted_as``: the
    pool estimate its map is fitted on, where calibration subjects cannot have its own (the
    merge-aware ones: no sources there, so they reduce to their plain counterparts)."""

    name: str
    summary: str
    pool: str
    map: str = "affine"
    fitted_as: str | None = None
    calibrated: bool = True

    @property
    def needs_abilities(self) -> bool:
        return self.pool in ("mpirt", "gmpirt")

    def items(self, n_items, calibration=None, subset=0.1, seed=0):
        if calibration is None:
            raise EvomergeError(f"estimator {self.name!r} needs a calibration")
        return calibration.random_items if self.pool == "random" else calibration.anchors

    def estimate(self, scores, calibration=None, source_thetas=None, scale="full"):
        if calibration is None:
            raise EvomergeError(f"estimator {self.name!r} needs a calibration")
        scores = np.asarray(scores, float).ravel()
        if self.map == "direct":
            return calibration.learned_estimate(scores, scale)
        value, stderr, theta = calibration.pool_estimate(self.name, self.pool, scores, source_thetas)
        n_items = int(np.sum(~np.isnan(scores)))
        if scale == "pool":
            return Estimate(float(value[0]), float(stderr[0]), n_items)
        return calibration.mapped_estimate(self.name, self.map, value, stderr, theta, n_items)


ESTIMATORS: dict[str, Estimator] = {}


def register(estimator: Estimator) -> Estimator:
    """Add (or replace) an estimator under its name; returns it."""
    ESTIMATORS[estimator.name] = estimator
    return estimator


def unknown_estimator(name: str) -> str:
    return f"unknown estimator {name!r} (choose from {', '.join(ESTIMATORS)})"


def get(name: str, where: str | None = None) -> Estimator:
    """The estimator called ``name``; a one-line error listing every name otherwise."""
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise EvomergeError(f"{where}: {unknown_estimator(name)}" if where else unknown_estimator(name)) from None


def calibrated() -> list[CalibratedEstimator]:
    """The estimators a calibration fits maps for, in registration order."""
    return [e for e in ESTIMATORS.values() if isinstance(e, CalibratedEstimator)]


register(MeanEstimator("full", "the mean over every item of the task",
                       lambda n, subset, seed: np.arange(n)))
register(MeanEstimator("subset", "the mean over a fixed random sample of the items (calibration.anchors of them)",
                       subset_indices))
for _args in [
    ("random", "stratified random items, their mean through an affine map", "random"),
    ("anchor", "anchor items weighted by their cluster's mass, affine map", "anchor"),
    ("irt", "IRT: the mean predicted probability at the anchors' ability, affine map", "irt"),
    ("pirt", "p-IRT: anchor scores plus predicted probabilities of the other items, affine map", "pirt"),
    ("gpirt", "gp-IRT: anchor and p-IRT combined (lambda tuned on validation subjects), affine map", "gpirt"),
    ("mpirt", "mp-IRT: p-IRT with the ability pulled toward the merged sources' (MERGE^3)", "mpirt", "affine", "pirt"),
    ("gmpirt", "gmp-IRT: gp-IRT with mp-IRT's ability", "gmpirt", "affine", "gpirt"),
    # Stronger maps: a cubic of the random mean (a fair baseline for the regressions below),
    # and a regression of the full score on gp-IRT plus a cubic in each ability dimension.
    ("random_cubic", "stratified random items, cubic map", "random", "cubic"),
    ("gpirt_reg", "gp-IRT, regression on it and a cubic in each ability dimension", "gpirt", "reg"),
    ("gmpirt_reg", "gmp-IRT, the same regression", "gmpirt", "reg", "gpirt"),
    # Ridge on the anchor responses straight to the full score (no item-pool stage).
    ("learned", "ridge regression of the full score on the anchor responses", "learned", "direct"),
]:
    register(CalibratedEstimator(*_args))
del _args

"""The calibration artifact: everything a worker needs to turn anchor scores into fitness.

`Calibration.fit` takes the full response matrix of a calibration population
(subjects x items, nan = missing; for a search: the source models plus random
merges scored on the whole pool) and, optionally, each subject's full-benchmark
score when the matrix holds only part of the benchmark (metabench). It

1. binarizes graded scores at the mean-preserving threshold;
2. picks the IRT dimension by validation error on held-out subjects;
3. picks anchors: by default ("select") greedy forward selection of the items that best
   predict the full score (anchors/forward_select), else k-means over IRT embeddings or
   correctness columns (tinyBenchmarks); plus a stratified random set as the baseline;
4. fits a multidimensional 2PL and tunes gp-IRT's lambda on the validation subjects;
5. learns, per estimator, the map from its item-pool estimate to the full score,
   using features computed from the anchors only (as a candidate will have them);
6. fits the "learned" estimator: a ridge regression of the full score on the anchor
   responses plus a cubic in their mean (metabench reconstructs full scores with a
   learned map too), its penalty chosen and its residual sd measured on the
   validation subjects, which gives the estimate's standard error.

The artifact is JSON with a version and a SHA-256 of its payload; `load` refuses a
file that fails either check. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.estimators import anchors as anchor_sel
from evomerge.estimators import estimators as est
from evomerge.estimators import registry
from evomerge.estimators.registry import Estimate
from evomerge.estimators.irt import ItemParams, binarize, fit_irt, fit_theta

VERSION = 2
READS = (1, 2)  # version 1 files simply lack the learned estimator
LEARNED_LAMBDAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
RIDGE = 1e-4
LAMBDA_GRID = np.linspace(0.0, 1.0, 21)


def _features(kind: str, x: np.ndarray, theta: np.ndarray | None) -> np.ndarray:
    cols = [np.ones_like(x), x]
    if kind in ("cubic", "reg"):
        cols += [x**2, x**3]
    if kind == "reg":
        for t in np.atleast_2d(theta).T:
            cols += [t, t**2, t**3]
    return np.column_stack(cols)


def _fit_map(kind: str, x: np.ndarray, theta: np.ndarray, target: np.ndarray) -> np.ndarray:
    f = _features(kind, x, theta)
    return np.linalg.solve(f.T @ f + RIDGE * len(x) * np.eye(f.shape[1]) * (np.arange(f.shape[1]) > 0), f.T @ target)


@dataclass
class Calibration:
    items: list[str]
    a: np.ndarray
    b: np.ndarray
    threshold: float | None
    anchors: np.ndarray
    anchor_weights: np.ndarray
    random_items: np.ndarray
    lam: float
    maps: dict[str, list[float]]
    residual_sd: dict[str, float]
    info: dict = field(default_factory=dict)  # dims tried, validation errors, seeds
    learned: dict = field(default_factory=dict)  # coef, coef_pool, item_means, lam (the "learned" map)

    @property
    def params(self) -> ItemParams:
        return ItemParams(self.a, self.b)

    @property
    def n_items(self) -> int:
        return len(self.b)

    # ---- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, responses: np.ndarray, n_anchors: int, method: str = "select", dims: int | list[int] = (1, 2, 3),
            seed: int = 0, full_scores: np.ndarray | None = None, items: list[str] | None = None,
            val_frac: float = 0.2, max_iter: int = 300) -> Calibration:
        responses = np.asarray(responses, float)
        n, m = responses.shape
        dims_list = [dims] if isinstance(dims, int) else list(dims)
        if n_anchors > m:
            raise EvomergeError(f"{n_anchors} anchors requested but the response matrix has only {m} items")
        if n <= max(dims_list) + 1:
            raise EvomergeError(f"{n} calibration subjects are too few for {max(dims_list)} IRT dimensions")
        target = np.nanmean(responses, 1) if full_scores is None else np.asarray(full_scores, float)
        binary, threshold = binarize(responses)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_val = max(int(round(val_frac * n)), 2)
        val, fit_part = perm[:n_val], perm[n_val:]
        if len(fit_part) <= max(dims_list):
            raise EvomergeError(f"{n} calibration subjects are too few to hold out validation subjects for {max(dims_list)} IRT dimensions")

        if method not in ("select", "irt", "correct"):
            raise EvomergeError(f"unknown anchor method {method!r} (select, irt, correct)")
        # Anchors chosen for predicting the target do not depend on the IRT fit: pick them once.
        selected = anchor_sel.forward_select(responses[fit_part], target[fit_part], n_anchors, seed) \
            if method == "select" else None
        trials = {}
        for d in dims_list:
            calib = cls._fit_once(responses, binary, threshold, target, fit_part, n_anchors, method, d, seed,
                                  selected, max_iter)
            tc_val = tuple(t[val] for t in calib._theta_all)
            calib.lam = calib._tune_lambda(responses[val], target[val], tc_val)
            err = calib._validation_errors(responses[val], target[val], tc_val)
            trials[d] = (err["gpirt_reg"], calib, err)
        best = min(trials, key=lambda d: trials[d][0])
        # The item parameters stay those fitted on the fit part (a refit on every subject costs
        # as much again and moves them little); the maps are refitted on every subject.
        calib = trials[best][1]
        calib._fit_maps(responses, target, calib._theta_all)
        del calib._theta_all
        # Held-out error is the honest uncertainty of a mapped estimate.
        calib.residual_sd = {k: float(v) for k, v in trials[best][2].items()}
        calib._fit_learned(responses, target, fit_part, val)
        calib.info = {"dims": best, "dims_tried": {str(d): trials[d][0] for d in trials}, "seed": seed,
                      "method": method, "n_subjects": n, "validation_rmse": trials[best][2],
                      "learned_lambda": calib.learned["lam"]}
        calib.items = list(items) if items is not None else [str(j) for j in range(m)]
        return calib

    @classmethod
    def _fit_once(cls, responses, binary, threshold, target, rows, n_anchors, method, dims, seed,
                  selected=None, max_iter=300) -> Calibration:
        params, _ = fit_irt(binary[rows], dims, seed=seed, max_iter=max_iter)
        if selected is not None:
            anchors = selected
            weights = anchor_sel.mass_weights(anchor_sel.item_embeddings("irt", a=params.a, b=params.b), anchors)
        else:
            emb = anchor_sel.item_embeddings(method, binary[rows], params.a, params.b)
            anchors, weights = anchor_sel.select_anchors(emb, n_anchors, seed)
        random_items = anchor_sel.stratified_random(np.nanmean(responses[rows], 0), n_anchors, seed)
        calib = cls([], params.a, params.b, threshold, anchors, weights, random_items, 0.5, {}, {})
        # Every subject's anchor-only abilities, computed once: the maps, lambda and the
        # validation errors all need them.
        calib._theta_all = calib.theta(responses[:, anchors])
        calib._fit_maps(responses[rows], target[rows], tuple(t[rows] for t in calib._theta_all))
        return calib

    def _pool_estimates(self, anchor_scores: np.ndarray, random_scores: np.ndarray | None = None,
                        theta_cov: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, tuple]:
        """Item-pool estimates (value, stderr arrays) of every estimator, plus the abilities."""
        anchor_scores = np.atleast_2d(anchor_scores)
        theta, cov = self.theta(anchor_scores) if theta_cov is None else theta_cov
        out = {
            "anchor": est.weighted_mean(anchor_scores, self.anchor_weights, self.n_items),
            "irt": est.irt(self.params, theta, cov),
            "pirt": est.pirt(self.params, theta, cov, self.anchors, anchor_scores),
        }
        out["gpirt"] = est.combine(self.lam, out["anchor"], out["pirt"])
        if self.learned:
            out["learned"] = self._learned(anchor_scores, "pool")
        if random_scores is not None:
            random_scores = np.atleast_2d(random_scores)
            out["random"] = est.weighted_mean(random_scores, np.ones(random_scores.shape[1]), self.n_items)
        return out, theta

    def _fit_maps(self, responses: np.ndarray, target: np.ndarray, theta_cov=None) -> None:
        pool, theta = self._pool_estimates(responses[:, self.anchors], responses[:, self.random_items], theta_cov)
        self.maps = {}
        for e in registry.calibrated():
            # Merge-aware estimators are fitted as their counterparts: on calibration
            # subjects (no sources) they reduce to p-IRT / gp-IRT.
            source = e.fitted_as or e.pool
            if source in pool and e.map != "direct":
                self.maps[e.name] = _fit_map(e.map, pool[source][0], theta, target).tolist()

    def _fit_learned(self, responses: np.ndarray, target: np.ndarray, fit_part: np.ndarray,
                     val: np.ndarray) -> None:
        """Ridge map from anchor responses to the target (and to the pool mean): penalty
        chosen on the validation subjects, coefficients refitted on every subject."""
        x = responses[:, self.anchors]
        item_means = np.nan_to_num(np.nanmean(x[fit_part], 0), nan=0.5)
        f = est.learned_features(x, item_means)
        scale = len(fit_part) / 1000.0  # penalties relative to the data term's size
        errors = {}
        for lam in LEARNED_LAMBDAS:
            coef = est.fit_ridge(f[fit_part], target[fit_part], lam * scale)
            errors[lam] = float(np.sqrt(np.mean((f[val] @ coef - target[val]) ** 2)))
        lam = min(errors, key=errors.get)
        item_means = np.nan_to_num(np.nanmean(x, 0), nan=0.5)
        f = est.learned_features(x, item_means)
        pool_mean = np.nanmean(responses, 1)
        self.learned = {"coef": est.fit_ridge(f, target, lam * scale).tolist(),
                        "coef_pool": est.fit_ridge(f, pool_mean, lam * scale).tolist(),
                        "item_means": item_means.tolist(), "lam": lam}
        self.residual_sd["learned"] = errors[lam]

    def _learned(self, anchor_scores: np.ndarray, target: str = "full") -> tuple[np.ndarray, np.ndarray]:
        if not self.learned:
            raise EvomergeError("this calibration has no learned estimator (made by an older evomerge); refit it")
        coef = np.array(self.learned["coef" if target == "full" else "coef_pool"])
        return est.learned(coef, np.array(self.learned["item_means"]), self.residual_sd.get("learned", 0.0),
                           anchor_scores)

    def _tune_lambda(self, responses: np.ndarray, target: np.ndarray, theta_cov=None) -> float:
        pool, theta = self._pool_estimates(responses[:, self.anchors], None, theta_cov)
        errors = []
        for lam in LAMBDA_GRID:
            x = lam * pool["anchor"][0] + (1 - lam) * pool["pirt"][0]
            errors.append(np.mean(np.abs(x - np.nanmean(responses, 1))))
        return float(LAMBDA_GRID[int(np.argmin(errors))])

    def _validation_errors(self, responses: np.ndarray, target: np.ndarray, theta_cov=None) -> dict[str, float]:
        values = self.estimate_many(responses[:, self.anchors], responses[:, self.random_items], theta_cov=theta_cov)
        return {name: float(np.sqrt(np.mean((v[0] - target) ** 2))) for name, v in values.items()}

    # ---- estimating ------------------------------------------------------------------------
    def theta(self, anchor_scores: np.ndarray, prior_mean: np.ndarray | None = None,
              prior_sd: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Abilities (subjects x dims) and their covariances from anchor scores (subjects x K)."""
        scores = np.atleast_2d(np.asarray(anchor_scores, float))
        if scores.shape[1] != len(self.anchors):
            raise EvomergeError(f"got {scores.shape[1]} anchor scores, the calibration has {len(self.anchors)} anchors")
        binary = scores if self.threshold is None else np.where(np.isnan(scores), np.nan, (scores >= self.threshold) * 1.0)
        return fit_theta(self.params, binary, items=self.anchors, prior_mean=prior_mean, prior_sd=prior_sd)

    def theta_full(self, responses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Abilities of subjects scored on the whole item pool (e.g. the source models)."""
        scores = np.atleast_2d(np.asarray(responses, float))
        if scores.shape[1] != self.n_items:
            raise EvomergeError(f"got {scores.shape[1]} item scores, the calibration has {self.n_items} items")
        binary = scores if self.threshold is None else np.where(np.isnan(scores), np.nan, (scores >= self.threshold) * 1.0)
        return fit_theta(self.params, binary)

    def estimate_many(self, anchor_scores: np.ndarray, random_scores: np.ndarray | None = None,
                      scale: str = "full", theta_cov: tuple[np.ndarray, np.ndarray] | None = None,
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every estimator at once for many subjects: {name: (values, stderrs)}. `theta_cov`:
        abilities already computed by `self.theta(anchor_scores)`, to skip recomputing them."""
        pool, theta = self._pool_estimates(anchor_scores, random_scores, theta_cov)
        if scale == "pool":
            return pool
        out = {}
        if self.learned:
            value, sd = self._learned(anchor_scores)
            out["learned"] = (np.clip(value, 0.0, 1.0), sd)
        for e in registry.calibrated():
            name, source, kind = e.name, e.pool, e.map
            if source not in pool or name not in self.maps:
                continue
            value = _features(kind, pool[source][0], theta) @ np.array(self.maps[name])
            # The map's slope carries the pool-level stderr onto the full-score scale; the
            # held-out error (which includes the map's own misfit) is the floor under it.
            sd = np.maximum(abs(self.maps[name][1]) * pool[source][1], self.residual_sd.get(name, 0.0))
            out[name] = (np.clip(value, 0.0, 1.0), sd)
        return out

    def estimate(self, name: str, anchor_scores: np.ndarray, source_thetas: np.ndarray | None = None,
                 scale: str = "full") -> Estimate:
        """One candidate's estimate by the registered estimator ``name``. `anchor_scores` are
        its scores on `self.anchors` (or on `self.random_items` for name="random");
        `source_thetas` (sources x dims) are the merged models' abilities, needed by the
        merge-aware mp-IRT / gmp-IRT."""
        estimator = registry.get(name)
        if not estimator.calibrated:
            raise EvomergeError(f"estimator {name!r} needs no calibration")
        return estimator.estimate(anchor_scores, self, source_thetas=source_thetas, scale=scale)

    def pool_estimate(self, name: str, pool: str, scores: np.ndarray, source_thetas: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Estimator ``name``'s item-pool estimate ``pool`` (value, stderr, abilities) from one
        candidate's scores on its items."""
        if pool == "random":
            if len(scores) != len(self.random_items):
                raise EvomergeError(f"estimator {name!r} needs {len(self.random_items)} scores on random_items, got {len(scores)}")
            value, sd = est.weighted_mean(scores[None], np.ones(len(scores)), self.n_items)
            return value, sd, np.zeros((1, self.a.shape[1]))
        if pool in ("mpirt", "gmpirt"):
            if source_thetas is None:
                raise EvomergeError(f"estimator {name!r} needs source_thetas (the merged models' abilities)")
            binary = scores if self.threshold is None else np.where(np.isnan(scores), np.nan, (scores >= self.threshold) * 1.0)
            theta, cov = est.merge_theta(self.params, self.anchors, binary, np.asarray(source_thetas, float))
            value, sd = est.pirt(self.params, theta, cov, self.anchors, scores[None])
            if pool == "gmpirt":
                value, sd = est.combine(self.lam, est.weighted_mean(scores[None], self.anchor_weights, self.n_items), (value, sd))
            return value, sd, theta
        estimates, theta = self._pool_estimates(scores[None])
        if pool not in estimates:
            raise EvomergeError(f"estimator {name!r}: this calibration has no {pool!r} estimate")
        value, sd = estimates[pool]
        return value, sd, theta

    def mapped_estimate(self, name: str, kind: str, value: np.ndarray, stderr: np.ndarray, theta: np.ndarray,
                        n_items: int) -> Estimate:
        """An item-pool estimate through estimator ``name``'s map onto the full score."""
        if name not in self.maps:
            raise EvomergeError(f"estimator {name!r}: this calibration has no map for it (made by another evomerge); refit it")
        coef = np.array(self.maps[name])
        full = float(np.clip(_features(kind, value, theta) @ coef, 0.0, 1.0)[0])
        return Estimate(full, float(max(abs(coef[1]) * stderr[0], self.residual_sd.get(name, 0.0))), n_items)

    def learned_estimate(self, scores: np.ndarray, scale: str = "full") -> Estimate:
        """The learned map's estimate from one candidate's anchor scores."""
        if len(scores) != len(self.anchors):
            raise EvomergeError(f"got {len(scores)} anchor scores, the calibration has {len(self.anchors)} anchors")
        value, sd = self._learned(scores[None], "full" if scale == "full" else "pool")
        value = np.clip(value, 0.0, 1.0) if scale == "full" else value
        return Estimate(float(value[0]), float(sd[0]), int(np.sum(~np.isnan(scores))))

    # ---- artifact --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"items": self.items, "a": self.a.tolist(), "b": self.b.tolist(), "threshold": self.threshold,
                "anchors": self.anchors.tolist(), "anchor_weights": self.anchor_weights.tolist(),
                "random_items": self.random_items.tolist(), "lam": self.lam, "maps": self.maps,
                "residual_sd": self.residual_sd, "info": self.info, "learned": self.learned}

    def save(self, path: str | Path) -> Path:
        from evomerge.io.atomic import atomic_write_text

        payload = self.to_dict()
        body = json.dumps(payload, sort_keys=True)
        doc = {"format": "evomerge-calibration", "version": VERSION,
               "sha256": hashlib.sha256(body.encode()).hexdigest(), "payload": payload}
        return atomic_write_text(path, json.dumps(doc, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise EvomergeError(f"{path}: no such calibration file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EvomergeError(f"{path}: not a calibration file (bad JSON: {exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != "evomerge-calibration":
            raise EvomergeError(f"{path}: not an evomerge calibration file")
        if doc.get("version") not in READS:
            raise EvomergeError(f"{path}: calibration version {doc.get('version')!r}, this evomerge reads {VERSION}")
        payload = doc.get("payload")
        body = json.dumps(payload, sort_keys=True)
        if hashlib.sha256(body.encode()).hexdigest() != doc.get("sha256"):
            raise EvomergeError(f"{path}: checksum mismatch, the calibration file is corrupted")
        p = payload
        return cls(p["items"], np.array(p["a"], float), np.array(p["b"], float), p["threshold"],
                   np.array(p["anchors"], int), np.array(p["anchor_weights"], float),
                   np.array(p["random_items"], int), float(p["lam"]), p["maps"], p["residual_sd"], p["info"],
                   p.get("learned", {}))


"""Optimizers behind one ask/tell interface.

Every optimizer here *maximises*; the libraries underneath minimise, so values are
negated on the way in. ``ask(n)`` returns up to ``n`` genomes (fewer only when a
pymoo generation came up short after duplicate elimination); ``tell(xs, F)`` takes the
same genomes back with an ``len(xs) x n_obj`` array of objective values.

Integer genes (layer swap: which source supplies a layer) are searched as continuous
values on ``[lower - 0.5, upper + 0.5)`` and rounded, so every integer gets the same
share of the box; the optimizers never see the rounding.

``state_dict()`` returns in-memory snapshots (cloudpickled library objects) for use within
one process; nothing writes them to disk: a run resumes by replaying its archive into a
fresh optimizer (see ``evomerge/search/run.py``). That works because every optimizer owns
its random generator, so two optimizers with the same seed, told the same values, ask
the same genomes whatever else in the process consumes randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import cloudpickle
import numpy as np

from evomerge.errors import ConfigError

# name -> (family, multi-objective?)
OPTIMIZERS: dict[str, tuple[str, bool]] = {
    "random": ("random", True),
    "nsga2": ("pymoo", True),
    "nsga3": ("pymoo", True),
    "smsemoa": ("pymoo", True),
    "ga": ("pymoo", False),
    "de": ("pymoo", False),
    "cmaes": ("nevergrad", False),
    "ngopt": ("nevergrad", False),
    "ng_de": ("nevergrad", False),
    "pso": ("nevergrad", False),
    "ng_mo": ("nevergrad", True),  # nevergrad's multi-objective mode (hypervolume-driven)
}
_NEVERGRAD_NAMES = {"cmaes": "CMA", "ngopt": "NGOpt", "ng_de": "TwoPointsDE", "pso": "PSO", "ng_mo": "DE"}
_INTEGER_MARGIN = 0.5 - 1e-9


class Space(Protocol):
    """What an optimizer needs from a genome space."""

    dim: int
    lower: np.ndarray
    upper: np.ndarray
    integer: np.ndarray


@dataclass
class BoxSpace:
    """A plain box of genes. Used by the synthetic evaluator and by tests; the merge
    genome spaces of ``evomerge/search/genome.py`` have the same four attributes."""

    lower: np.ndarray
    upper: np.ndarray
    integer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.lower = np.asarray(self.lower, dtype=float)
        self.upper = np.asarray(self.upper, dtype=float)
        if self.integer is None:
            self.integer = np.zeros(self.lower.shape, dtype=bool)
        self.integer = np.asarray(self.integer, dtype=bool)

    @property
    def dim(self) -> int:
        return int(self.lower.size)

    def decode(self, x: np.ndarray) -> None:  # no merge plan: the genome is the recipe
        return None

    def describe(self, x: np.ndarray) -> dict[str, float]:
        return {f"x{i}": float(v) for i, v in enumerate(x)}


def is_multi_objective(name: str) -> bool:
    return OPTIMIZERS[name][1]


def check_space(space: Space, where: str = "genome") -> None:
    lower, upper = np.asarray(space.lower, float), np.asarray(space.upper, float)
    if lower.shape != (space.dim,) or upper.shape != (space.dim,):
        raise ConfigError(f"{where}: bounds must have {space.dim} entries")
    bad = np.flatnonzero(~(lower <= upper))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"{where}: gene {i}: lower bound {lower[i]} is above upper bound {upper[i]}")


class Optimizer:
    """Base: maps between the user's genome box and the search box the library sees."""

    name: str = ""

    def __init__(self, space: Space, n_obj: int, seed: int) -> None:
        check_space(space)
        self.dim, self.n_obj, self.seed = space.dim, n_obj, seed
        self.integer = np.asarray(space.integer, dtype=bool)
        self.lower = np.asarray(space.lower, dtype=float).copy()
        self.upper = np.asarray(space.upper, dtype=float).copy()
        self.lower[self.integer] -= _INTEGER_MARGIN
        self.upper[self.integer] += _INTEGER_MARGIN
        # Degenerate genes (lower == upper) are fine for us but not for every library.
        self.upper = np.maximum(self.upper, self.lower + 1e-12)

    def to_genome(self, z: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(z, dtype=float), self.lower, self.upper)
        x[self.integer] = np.round(x[self.integer]) + 0.0  # + 0.0: no -0.0 in the archive
        return x

    def ask(self, n: int) -> list[np.ndarray]:
        raise NotImplementedError

    def tell(self, xs: list[np.ndarray], objectives: np.ndarray) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _check_told(self, xs: list[np.ndarray], objectives: np.ndarray) -> np.ndarray:
        F = np.asarray(objectives, dtype=float).reshape(len(xs), -1)
        if F.shape[1] != self.n_obj:
            raise ValueError(f"told {F.shape[1]} objectives, optimizer has {self.n_obj}")
        if not np.isfinite(F).all():
            raise ValueError("objective values told to an optimizer must be finite")
        return F


class RandomSearch(Optimizer):
    """Uniform sampling of the box: the baseline every other optimizer must beat."""

    name = "random"

    def __init__(self, space: Space, n_obj: int, seed: int, **_: Any) -> None:
        super().__init__(space, n_obj, seed)
        self.rng = np.random.default_rng(seed)

    def ask(self, n: int) -> list[np.ndarray]:
        return [self.to_genome(self.rng.uniform(self.lower, self.upper)) for _ in range(n)]

    def tell(self, xs: list[np.ndarray], objectives: np.ndarray) -> None:
        self._check_told(xs, objectives)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


def _pymoo_problem(dim: int, n_obj: int, lower: np.ndarray, upper: np.ndarray):
    from pymoo.core.problem import Problem

    # Evaluation happens outside pymoo (on the workers), so the problem only carries the box.
    return Problem(n_var=dim, n_obj=n_obj, xl=lower, xu=upper)


class PymooOptimizer(Optimizer):
    """pymoo's ask/tell: ``algorithm.ask()`` yields one generation of infills; it is
    handed out through ``ask(n)`` and told back to pymoo once every infill has a value."""

    def __init__(self, name: str, space: Space, n_obj: int, seed: int, population: int = 16,
                 **options: Any) -> None:
        super().__init__(space, n_obj, seed)
        self.name = name
        self.algorithm = self._make_algorithm(name, n_obj, population, seed, options)
        self.algorithm.setup(_pymoo_problem(self.dim, n_obj, self.lower, self.upper), seed=seed,
                             verbose=False)
        self.batch = None           # the pymoo Population currently out for evaluation
        self.handed_out = 0         # how many of its rows ask() returned
        self.told: dict[int, np.ndarray] = {}   # row -> minimisation values

    @staticmethod
    def _make_algorithm(name: str, n_obj: int, population: int, seed: int, options: dict):
        if name == "nsga2":
            from pymoo.algorithms.moo.nsga2 import NSGA2
            return NSGA2(pop_size=population, **options)
        if name == "nsga3":
            from pymoo.algorithms.moo.nsga3 import NSGA3
            from pymoo.util.ref_dirs import get_reference_directions
            # The finest Das-Dennis lattice that still fits in one population.
            partitions = 1
            while len(get_reference_directions("das-dennis", n_obj, n_partitions=partitions + 1)) <= population \
                    and n_obj > 1:
                partitions += 1
            ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=partitions)
            return NSGA3(ref_dirs=ref_dirs, pop_size=population, **options)
        if name == "smsemoa":
            from pymoo.algorithms.moo.sms import SMSEMOA
            # A whole generation of offspring, so it fits the generation barrier.
            return SMSEMOA(pop_size=population, n_offsprings=population, **options)
        if name == "ga":
            from pymoo.algorithms.soo.nonconvex.ga import GA
            return GA(pop_size=population, **options)
        if name == "de":
            from pymoo.algorithms.soo.nonconvex.de import DE
            return DE(pop_size=population, **options)
        raise ValueError(name)

    def ask(self, n: int) -> list[np.ndarray]:
        if self.batch is None or self.handed_out >= len(self.batch):
            if self.batch is not None and len(self.told) < len(self.batch):
                raise RuntimeError("ask() before the previous pymoo generation was fully told")
            self.batch, self.handed_out, self.told = self.algorithm.ask(), 0, {}
        X = self.batch.get("X")
        rows = range(self.handed_out, min(self.handed_out + n, len(self.batch)))
        self.handed_out = rows.stop
        return [self.to_genome(X[i]) for i in rows]

    def tell(self, xs: list[np.ndarray], objectives: np.ndarray) -> None:
        F = self._check_told(xs, objectives)
        X = self.to_genome_rows(self.batch.get("X")[: self.handed_out])
        for x, f in zip(xs, F):
            # Match by genome (rounded integer genes included), the first untold row.
            hits = [i for i in np.flatnonzero(np.all(np.isclose(X, x, rtol=0, atol=1e-12), axis=1))
                    if i not in self.told]
            if not hits:
                raise ValueError("tell() got a genome this optimizer did not ask for")
            self.told[int(hits[0])] = -f
        if len(self.told) == len(self.batch):
            self.batch.set("F", np.array([self.told[i] for i in range(len(self.batch))]))
            self.algorithm.tell(infills=self.batch)
            self.batch, self.handed_out, self.told = None, 0, {}

    def to_genome_rows(self, X: np.ndarray) -> np.ndarray:
        return np.array([self.to_genome(x) for x in X]).reshape(len(X), self.dim)

    def state_dict(self) -> dict[str, Any]:
        # pymoo keeps its Generator inside the algorithm, so this blob holds the RNG too.
        return {"name": self.name,
                "blob": cloudpickle.dumps((self.algorithm, self.batch, self.handed_out, self.told))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algorithm, self.batch, self.handed_out, self.told = cloudpickle.loads(state["blob"])


class NevergradOptimizer(Optimizer):
    """nevergrad: one ``ask()`` per genome, ``tell(candidate, loss or [losses])``."""

    def __init__(self, name: str, space: Space, n_obj: int, seed: int, population: int = 16,
                 budget: int | None = None, start: np.ndarray | None = None, **options: Any) -> None:
        super().__init__(space, n_obj, seed)
        import nevergrad as ng

        _disable_surrogate_models()
        self.name = name
        if start is None:
            param = ng.p.Array(shape=(self.dim,), lower=self.lower, upper=self.upper)
        else:   # the search is centred on a given genome (e.g. a recipe known to be good)
            param = ng.p.Array(init=np.clip(np.asarray(start, float), self.lower, self.upper),
                               lower=self.lower, upper=self.upper)
        param.random_state = np.random.RandomState(seed)
        optimizer_cls = ng.optimizers.registry[_NEVERGRAD_NAMES[name]]
        if options:
            optimizer_cls = _configured(name, options)
        self.optimizer = optimizer_cls(parametrization=param, budget=budget, num_workers=population)
        if n_obj > 1:
            # Hypervolume is measured against this corner (losses: 0 = the worst accuracy).
            self.optimizer.tell(ng.p.MultiobjectiveReference(), np.zeros(n_obj))
        self.asked: list[Any] = []  # nevergrad candidates out for evaluation

    def ask(self, n: int) -> list[np.ndarray]:
        fresh = [self.optimizer.ask() for _ in range(n)]
        self.asked.extend(fresh)
        return [self.to_genome(c.value) for c in fresh]

    def tell(self, xs: list[np.ndarray], objectives: np.ndarray) -> None:
        F = self._check_told(xs, objectives)
        for x, f in zip(xs, F):
            index = next((i for i, c in enumerate(self.asked)
                          if np.allclose(self.to_genome(c.value), x, rtol=0, atol=1e-12)), None)
            if index is None:
                raise ValueError("tell() got a genome this optimizer did not ask for")
            candidate = self.asked.pop(index)
            loss = [-float(v) for v in f] if self.n_obj > 1 else -float(f[0])
            self.optimizer.tell(candidate, loss)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "blob": cloudpickle.dumps((self.optimizer, self.asked))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer, self.asked = cloudpickle.loads(state["blob"])


def _surrogate_disabled(*args: Any, **kwargs: Any):
    from nevergrad.optimization.metamodel import MetaModelFailure

    raise MetaModelFailure("surrogate models are disabled in evomerge")


def _disable_surrogate_models() -> None:
    """NGOpt's surrogate-model step fits a model and minimises it under a 20-second
    wall-clock timer (so a seeded run is not reproducible) and, in nevergrad 1.0.12,
    crashes on numpy >= 2.4. Reporting it as failed makes NGOpt take its regular path,
    which nevergrad already does whenever the surrogate cannot be learnt."""
    from nevergrad.optimization import metamodel, optimizerlib

    optimizerlib.learn_on_k_best = _surrogate_disabled
    metamodel.learn_on_k_best = _surrogate_disabled


def _configured(name: str, options: dict[str, Any]):
    """A nevergrad optimizer family with user options (e.g. cmaes: {popsize: 8})."""
    import nevergrad as ng

    families = {"cmaes": ng.families.ParametrizedCMA, "ng_de": ng.families.DifferentialEvolution,
                "ng_mo": ng.families.DifferentialEvolution, "pso": ng.families.ConfPSO}
    if name not in families:
        raise ConfigError(f"optimizer.options: {name} takes no options")
    try:
        return families[name](**options)
    except TypeError as exc:
        raise ConfigError(f"optimizer.options: {exc}") from None


def make_optimizer(name: str, space: Space, n_obj: int, seed: int, population: int = 16,
                   budget: int | None = None, options: dict[str, Any] | None = None,
                   start: list[float] | None = None) -> Optimizer:
    """Build an optimizer by name; single-objective ones need ``n_obj == 1``
    (the caller folds several objectives into a weighted sum first). ``start``: a genome the
    nevergrad optimizers centre their search on."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    family, multi = OPTIMIZERS[name]
    if n_obj > 1 and not multi:
        raise ConfigError(f"optimizer.name: {name} is single-objective; got {n_obj} objectives")
    options = dict(options or {})
    if space.dim == 0 and family == "nevergrad":
        # e.g. genome.method: arcee_fusion, which has no parameters: every candidate is the same merge
        raise ConfigError(f"optimizer.name: {name} needs at least one gene and this genome has none "
                          "(use random, which evaluates the one possible merge)")
    if start is not None:
        if family != "nevergrad":
            raise ConfigError(f"optimizer.start: {name} cannot start from a genome "
                              "(the nevergrad optimizers can: cmaes, ngopt, ng_de, pso, ng_mo)")
        if len(start) != space.dim:
            raise ConfigError(f"optimizer.start: {len(start)} values for a genome of {space.dim} genes")
        lower, upper, start = np.asarray(space.lower, float), np.asarray(space.upper, float), np.asarray(start, float)
        outside = np.flatnonzero((start < lower) | (start > upper))
        if outside.size:
            i = int(outside[0])
            raise ConfigError(f"optimizer.start: gene {i} = {start[i]} is outside its bounds [{lower[i]}, {upper[i]}]")
        options["start"] = start
    if family == "random":
        return RandomSearch(space, n_obj, seed)
    if family == "pymoo":
        try:
            return PymooOptimizer(name, space, n_obj, seed, population=population, **options)
        except TypeError as exc:
            raise ConfigError(f"optimizer.options: {exc}") from None
    return NevergradOptimizer(name, space, n_obj, seed, population=population, budget=budget, **options)

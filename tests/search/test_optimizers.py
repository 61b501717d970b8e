"""Every optimizer: ask/tell maximises, is seeded, survives a state round trip, and runs
a tiny search end to end."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.search.optimizers import OPTIMIZERS, BoxSpace, is_multi_objective, make_optimizer
from evomerge.search.run import SearchRun

SPACE = BoxSpace(np.zeros(4), np.array([1.0, 1.0, 1.0, 2.0]), integer=np.array([0, 0, 0, 1], bool))


def objectives(x: np.ndarray, n_obj: int) -> np.ndarray:
    a = 1 - np.sum((x[:3] - 0.2) ** 2)
    b = 1 - np.sum((x[:3] - 0.8) ** 2) + 0.1 * x[3]
    return np.array([a, b]) if n_obj == 2 else np.array([a + 0.5 * x[3]])


def drive(name: str, seed: int, generations: int, reload_at: int | None = None) -> list[np.ndarray]:
    """Ask/tell for some generations; optionally rebuild the optimizer from its state."""
    n_obj = 2 if is_multi_objective(name) else 1
    opt = make_optimizer(name, SPACE, n_obj, seed=seed, population=6, budget=6 * generations)
    asked = []
    for g in range(generations):
        if g == reload_at:
            state = opt.state_dict()
            opt = make_optimizer(name, SPACE, n_obj, seed=seed + 1000, population=6, budget=6 * generations)
            opt.load_state_dict(state)
        xs = opt.ask(6)
        asked.extend(xs)
        opt.tell(xs, np.array([objectives(x, n_obj) for x in xs]))
    return asked


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_seeded_and_state_round_trip_gives_the_uninterrupted_sequence(name):
    plain = drive(name, seed=3, generations=4)
    reloaded = drive(name, seed=3, generations=4, reload_at=2)
    assert len(plain) == 24
    np.testing.assert_array_equal(np.array(plain), np.array(reloaded))
    genomes = np.array(plain)
    assert np.all(genomes >= SPACE.lower) and np.all(genomes <= SPACE.upper)
    # integer gene: whole numbers only, and (over 24 samples) more than one of them
    assert np.all(genomes[:, 3] == np.round(genomes[:, 3]))
    other_seed = drive(name, seed=4, generations=1)
    assert not np.allclose(np.array(plain[:6]), np.array(other_seed))


@pytest.mark.parametrize("name", ["ga", "de", "cmaes", "ngopt", "ng_de", "pso"])
def test_single_objective_optimizers_beat_their_first_generation(name):
    opt = make_optimizer(name, SPACE, 1, seed=0, population=8, budget=80)
    best_per_gen = []
    for _ in range(10):
        xs = opt.ask(8)
        F = np.array([objectives(x, 1) for x in xs])
        opt.tell(xs, F)
        best_per_gen.append(F.max())
    assert max(best_per_gen[5:]) > best_per_gen[0]
    assert max(best_per_gen) > 1.8  # optimum: x = (0.2, 0.2, 0.2, 2) -> 1 + 1.0


def test_unknown_or_mismatched_optimizer_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"optimizer.name: unknown optimizer 'foo' \(choose from random, nsga2"):
        make_optimizer("foo", SPACE, 2, seed=0)
    with pytest.raises(ConfigError, match="cmaes is single-objective; got 2 objectives"):
        make_optimizer("cmaes", SPACE, 2, seed=0)
    with pytest.raises(ConfigError, match="gene 1: lower bound 2.0 is above upper bound 1.0"):
        make_optimizer("random", BoxSpace([0, 2], [1, 1]), 1, seed=0)


@pytest.mark.parametrize("name", ["cmaes", "ng_de"])
def test_a_nevergrad_search_centred_on_a_start_genome_samples_around_it(name):
    start = np.array([0.9, 0.1, 0.9, 1.0])
    centred = make_optimizer(name, SPACE, 1, seed=0, population=8, budget=16, options=None, start=list(start))
    plain = make_optimizer(name, SPACE, 1, seed=0, population=8, budget=16)
    near = np.mean([np.abs(x[:3] - start[:3]).mean() for x in centred.ask(8)])
    far = np.mean([np.abs(x[:3] - start[:3]).mean() for x in plain.ask(8)])
    assert near < far, (near, far)


def test_a_start_genome_that_does_not_fit_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optimizer.start: 3 values for a genome of 4 genes"):
        make_optimizer("cmaes", SPACE, 1, seed=0, start=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match=r"optimizer.start: gene 0 = 1.5 is outside its bounds \[0.0, 1.0\]"):
        make_optimizer("cmaes", SPACE, 1, seed=0, start=[1.5, 0.5, 0.5, 1.0])
    with pytest.raises(ConfigError, match=r"optimizer.start: de cannot start from a genome"):
        make_optimizer("de", SPACE, 1, seed=0, start=[0.5, 0.5, 0.5, 1.0])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_runs_a_tiny_search_end_to_end(name, write_config, tmp_path):
    single = not is_multi_objective(name)
    cfg = write_config(optimizer={"name": name, "population": 4, "generations": 2},
                       objectives=[{"name": "a", "task": "t", "weight": 1.0},
                                   {"name": "b", "task": "t", "weight": 0.5}])
    run = SearchRun.create(cfg, tmp_path / "run")
    run.run(progress=False)
    records = run.archive.records()
    assert len(records) == 8 and {r.generation for r in records} == {0, 1}
    assert all(r.status == "ok" and set(r.objectives) == {"a", "b"} for r in records)
    assert run.finished and run.archive.meta()["finished"] is True
    assert 1 <= len(run.archive.front()) <= 8 and run.archive.hypervolume() > 0
    assert all(r.genome[4] in (0.0, 1.0, 2.0, 3.0) for r in records)
    if single:  # the weighted sum is what was optimised; the archive keeps both objectives
        assert all(r.objectives["a"].value != r.objectives["b"].value for r in records)

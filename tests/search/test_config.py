"""Bad input: each a one-line error naming the field, and no run directory damaged."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from evomerge.cli import main
from evomerge.io.synthetic import make_tiny_llama
from evomerge.search.config import load_config
from evomerge.search.archive import Archive
from evomerge.search.run import SearchRun


def one_line_error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("changes, message", [
    ({"optimizer": {"name": "foo"}},
     r"config.yaml: optimizer.name: unknown optimizer 'foo' \(choose from random, nsga2, nsga3"),
    ({"workers": {"backend": "slurm"}}, r"workers.backend: Input should be 'local' or 'ray'"),
    ({"workers": {"task_timeout": 0}}, r"workers.task_timeout: Input should be greater than 0"),
    ({"optimizer": {"steady_state": True}}, r"optimizer.steady_state: nsga2 needs generation barriers"),
    ({"genome": {"kind": "box", "dim": 2, "lower": [0, 5], "upper": [1, 1], "integer": []}},
     r"genome: gene 1: lower bound 5.0 is above upper bound 1.0"),
    ({"optimizer": {"population": 0}}, r"optimizer.population: Input should be greater than or equal to 1"),
    ({"optimizer": {"popsize": 3}}, r"optimizer.popsize: unknown field"),
    ({"objectives": []}, r"objectives: List should have at least 1 item"),
    ({"base": "nope"}, r"base: 'nope' is not one of the sources"),
    ({"optimizer": {"reference_point": [0.0]}}, r"optimizer.reference_point: 1 values for 2 objectives"),
    # names become file names (calibration/<objective>.json) and plan references: identifiers only
    ({"objectives": [{"name": "../../escaped", "task": "synthetic/a"}]},
     r"objectives.0.name: '../../escaped' is not a plain name .*no path separators, no '..'"),
    ({"objectives": [{"name": "a/b", "task": "synthetic/a"}]}, r"objectives.0.name: 'a/b' is not a plain name"),
    ({"objectives": [{"name": "..", "task": "synthetic/a"}]}, r"objectives.0.name: '..' is not a plain name"),
    ({"sources": {"../up": "m"}}, r"sources: '../up' is not a plain name"),
])
def test_invalid_configs_fail_before_anything_is_written(changes, message, write_config, tmp_path, capsys):
    config = write_config(**changes)
    line = one_line_error(capsys, "search", str(config), "--run-dir", str(tmp_path / "run"))
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    base = make_tiny_llama(root / "base", num_layers=2, seed=0)
    tuned = make_tiny_llama(root / "tuned", base=base, noise=0.01, seed=1)
    wide = make_tiny_llama(root / "wide", num_layers=2, hidden_size=64, intermediate_size=128, seed=2)
    return {"base": str(base), "tuned": str(tuned), "wide": str(wide)}


def merge_config(tmp_path, paths, **changes) -> str:
    cfg = {"sources": {"base": paths["base"], "tuned": paths["tuned"]}, "base": "base",
           "genome": {"kind": "parameter", "method": "ties"},
           "objectives": [{"name": "arith", "task": "zoo/arith:search"}],
           "optimizer": {"name": "ga", "population": 2, "generations": 1}, **changes}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_a_task_that_does_not_exist(sources, tmp_path, capsys):
    config = merge_config(tmp_path, sources, objectives=[{"name": "x", "task": "zoo/nope"}])
    line = one_line_error(capsys, "search", config, "--run-dir", str(tmp_path / "run"))
    assert "objectives.x.task: unknown zoo task 'zoo/nope'" in line
    assert not (tmp_path / "run").exists()


def test_sources_of_different_architectures(sources, tmp_path, capsys):
    config = merge_config(tmp_path, sources, sources={"base": sources["base"], "tuned": sources["wide"]})
    line = one_line_error(capsys, "search", config, "--run-dir", str(tmp_path / "run"))
    assert "base" in line and ("tuned" in line or "wide" in line), line
    assert not (tmp_path / "run").exists()


def test_genome_bounds_inverted_in_a_merge_space(sources, tmp_path, capsys):
    config = merge_config(tmp_path, sources, genome={"kind": "parameter", "method": "ties", "weight": [1.0, 0.0]})
    line = one_line_error(capsys, "search", config, "--run-dir", str(tmp_path / "run"))
    assert "genome.weight" in line and "above upper bound" in line


def test_a_run_directory_is_never_reused_or_damaged(write_config, tmp_path, capsys):
    config = write_config(optimizer={"population": 2, "generations": 1})
    run = SearchRun.create(config, tmp_path / "run")
    run.run(progress=False)
    run.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    line = one_line_error(capsys, "search", str(config), "--run-dir", str(tmp_path / "run"))
    assert "run directory already exists" in line and "evomerge resume" in line
    bad = write_config("bad.yaml", optimizer={"name": "foo"})
    one_line_error(capsys, "search", str(bad), "--run-dir", str(tmp_path / "run"))
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if "-" not in k} == {k: v for k, v in before.items() if "-" not in k}


def test_a_run_directory_from_another_version_is_refused(write_config, tmp_path, capsys):
    config = write_config(optimizer={"population": 2, "generations": 2})
    run = SearchRun.create(config, tmp_path / "run")
    run.close()
    archive = Archive(tmp_path / "run")
    archive.set_meta(evomerge_version="0.0.1", format=0)
    archive.close()
    line = one_line_error(capsys, "resume", str(tmp_path / "run"))
    assert "archive.sqlite: run directory written by evomerge 0.0.1 (format 0)" in line
    archive = Archive(tmp_path / "run", readonly=True)
    assert archive.counts()["total"] == 0  # nothing ran
    archive.close()
    line = one_line_error(capsys, "resume", str(tmp_path / "elsewhere"))
    assert "no such run directory" in line


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    config = tmp_path / "sub" / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": "runs/x", "sources": {"m": "models/m"},
                                      "genome": {"kind": "box", "dim": 1},
                                      "objectives": [{"name": "t", "task": "tasks/t.yaml:search"},
                                                     {"name": "z", "task": "zoo/arith"}],
                                      "evaluator": {"kind": "synthetic"}}))
    cfg = load_config(config)
    assert cfg.run_dir == str(tmp_path / "sub" / "runs" / "x")
    assert cfg.sources == {"m": str(tmp_path / "sub" / "models" / "m")}
    assert cfg.objectives[0].task == str(tmp_path / "sub" / "tasks" / "t.yaml") + ":search"
    assert cfg.objectives[1].task == "zoo/arith"

"""An unknown key reads the same in every config a user writes: ``<file>: <field>: unknown field``."""

from __future__ import annotations

import pytest
import yaml

from evomerge.cli import main
from evomerge.errors import ConfigError

SEARCH = {
    "genome": {"kind": "box", "dim": 2},
    "objectives": [{"name": "a", "task": "synthetic/a"}],
    "evaluator": {"kind": "synthetic"},
    "optimizer": {"name": "random", "population": 2, "generations": 1},
}
MERGE_GENOME = {"kind": "parameter", "method": "linear"}


def cli_error(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0].removeprefix("error: ")


def search_error(tmp_path, capsys, **changes) -> str:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({**SEARCH, **changes}))
    line = cli_error(capsys, "search", str(path), "--run-dir", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    return line.replace(str(path), "search.yaml")


def test_an_unknown_key_reads_alike_in_every_config_kind(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a", "bogus": 1}]}))
    (tmp_path / "items.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"kind": "generate", "data": "items.jsonl", "bogus": 1}))
    from evomerge.tasks.task import load_task

    with pytest.raises(ConfigError) as task_error:
        load_task(str(task))
    sources = {"a": str(tmp_path / "a")}
    lines = {
        "search config": search_error(tmp_path, capsys, bogus=1),
        "search section": search_error(tmp_path, capsys, optimizer={"name": "random", "bogus": 1}),
        "box genome": search_error(tmp_path, capsys, genome={"kind": "box", "dim": 2, "bogus": 1}),
        "merge genome": search_error(tmp_path, capsys, sources=sources, evaluator={"kind": "merge"},
                                     genome={**MERGE_GENOME, "bogus": 1}),
        "lm-eval options": search_error(tmp_path, capsys, objectives=[
            {"name": "a", "task": "synthetic/a", "lm_eval": {"bogus": 1}}]),
        "merge recipe": cli_error(capsys, "merge", str(recipe), str(tmp_path / "out")).replace(str(recipe), "recipe.yaml"),
        "task file": str(task_error.value).replace(str(task), "task.yaml"),
    }
    assert lines == {
        "search config": "search.yaml: bogus: unknown field",
        "search section": "search.yaml: optimizer.bogus: unknown field",
        "box genome": "search.yaml: genome.bogus: unknown field",
        "merge genome": "search.yaml: genome.bogus: unknown field",
        "lm-eval options": "search.yaml: objectives.0.lm_eval.bogus: unknown field",
        "merge recipe": "recipe.yaml: models.0.bogus: unknown field",
        "task file": "task.yaml: bogus: unknown field",
    }
    assert not (tmp_path / "out").exists()


def test_an_unknown_vllm_engine_option_reads_alike(tmp_path):
    pytest.importorskip("vllm")
    from evomerge.backends.vllm_backend import check_engine_options

    with pytest.raises(ConfigError, match=r"^evaluator.engine.max_modl_len: unknown field \(not a vLLM engine "):
        check_engine_options({"max_modl_len": 64}, "evaluator.engine")

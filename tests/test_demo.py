"""`evomerge demo` end to end at a token budget: zoo -> search on likelihood scores -> held-out table -> export + report."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUICK = dict(pretrain=dict(steps=3, batch=4, lr=1e-3, warmup=1),
             finetune=dict(steps=2, batch=4, lr=1e-3, warmup=1, replay=0.5))


@pytest.mark.slow
def test_the_demo_pipeline_judges_every_row_on_heldout_items_and_exports_loadable_models(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.demo import DEFAULT_CONFIG, run_demo
    from evomerge.zoo.build import build_zoo

    build_zoo(tmp_path / "zoo", verbose=False, **QUICK)   # a zoo of barely trained models: fast
    out = run_demo(DEFAULT_CONFIG, run_dir=tmp_path / "run", results=tmp_path / "results",
                   zoo_dir=tmp_path / "zoo", tiny=True, progress=False)

    rows = out["table"]
    best = f"evomerge search best (candidate {out['best_candidate']})"
    assert list(rows) == ["source: base", "source: arith", "source: strings", "source: lang",
                          "linear (uniform average of the experts)", "task_arithmetic (weight 1)",
                          "ties (weight 1, density 0.5)", "dare_ties (weight 1, density 0.5)", best]
    for scores in rows.values():   # full evaluation on the held-out split of every column
        assert {c: s["n_items"] for c, s in scores.items()} == {"calc": 100, "arith": 100, "strings": 100, "lang": 100}
        assert all(0.0 <= s["value"] <= 1.0 for s in scores.values())
    margin = out["margin_over_runner_up"]     # the win is stated with its paired standard error
    assert margin["verdict"].startswith("better") == (margin["gap"] > 2 * margin["paired_stderr"])
    assert out["margin_over_best_source"]["source"].startswith("source: ")
    saved = json.loads((tmp_path / "results" / "demo.json").read_text())
    assert saved["table"] == rows and saved["search_best_beats_every_other_row"] == out["search_best_beats_every_other_row"]
    assert (tmp_path / "results" / "demo.md").read_text().count("| source: ") == 4
    assert (tmp_path / "run" / "calibration" / "sources.json").is_file()    # sources scored before the search
    assert not (tmp_path / "run" / "calibration" / "calc.json").exists()    # the subset estimator needs no IRT
    assert (tmp_path / "run" / "report" / "report.md").is_file()

    assert out["exported"], "the demo exports the front"
    for path in out["exported"]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert model.config.num_hidden_layers == 4

    # The run directory is reused only for the config that made it.
    from evomerge.errors import EvomergeError

    changed = tmp_path / "demo-changed.yaml"
    changed.write_text(DEFAULT_CONFIG.read_text().replace("name: cmaes", "name: ng_de"))
    with pytest.raises(EvomergeError, match=r"run: made from another demo config \(differs in: optimizer\); pass --fresh"):
        run_demo(changed, run_dir=tmp_path / "run", results=tmp_path / "results2", zoo_dir=tmp_path / "zoo",
                 tiny=True, progress=False)


def test_a_relative_zoo_path_is_made_absolute_before_the_run_keeps_the_config(tmp_path, monkeypatch):
    from pathlib import Path

    from evomerge.demo import DEFAULT_CONFIG, load_demo_config
    from evomerge.zoo.build import zoo_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_demo_config(DEFAULT_CONFIG, zoo_paths("rel/zoo"), run_dir=None)
    assert all(Path(p).is_absolute() for p in cfg.sources.values())
    assert cfg.sources["base"] == str(tmp_path / "rel" / "zoo" / "base")


def test_the_demo_states_a_win_only_beyond_two_paired_standard_errors():
    from evomerge.demo import margin_verdict, paired_margin

    # per-item differences 1, 0, 0, 1: mean 0.5, sd 0.577, standard error 0.289
    gap, stderr = paired_margin([1, 1, 0, 1], [0, 1, 0, 0])
    assert gap == 0.5 and abs(stderr - 0.2887) < 1e-4
    assert margin_verdict(gap, stderr).startswith("ahead, but within the noise")
    assert margin_verdict(0.2, 0.05).startswith("better")
    assert margin_verdict(-0.01, 0.05) == "NOT better"
    # the same items both right or both wrong cancel: only the items that differ count
    assert paired_margin([1] * 50 + [0] * 50, [1] * 40 + [0] * 60)[1] < 0.031


def test_fresh_deletes_only_a_directory_that_evomerge_made_as_a_run(tmp_path):
    from evomerge.demo import open_search
    from evomerge.errors import EvomergeError
    from evomerge.search.config import parse_config

    synthetic = {"genome": {"kind": "box", "dim": 2}, "objectives": [{"name": "a", "task": "synthetic/a"}],
                 "evaluator": {"kind": "synthetic"}, "optimizer": {"name": "random", "population": 2, "generations": 1}}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    cfg = parse_config({**synthetic, "run_dir": str(mine)}, "demo config", tmp_path)
    with pytest.raises(EvomergeError, match="mine: not an evomerge run directory"):
        open_search(cfg, fresh=True)
    assert (mine / "thesis.tex").read_text() == "years of work"

    cfg = parse_config({**synthetic, "run_dir": str(tmp_path / "run")}, "demo config", tmp_path)
    run = open_search(cfg, fresh=False)
    run.run(progress=False)
    run.close()
    (tmp_path / "run" / "notes.txt").write_text("inside a run directory: goes with it")
    run = open_search(cfg, fresh=True)            # an evomerge run: deleted and started afresh
    assert run.archive.counts()["total"] == 0 and not (tmp_path / "run" / "notes.txt").exists()
    run.close()

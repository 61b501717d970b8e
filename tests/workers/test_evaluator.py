"""CandidateEvaluator on real tiny models: plan -> in-memory merge -> HF backend -> scores.

Two tiny Llamas with the zoo tokenizer; a generation task whose even items are answered
exactly as model A answers them (so A scores 1/2 by construction) and whose odd items
are wrong for every model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.backends import make_backend
from evomerge.tasks.task import load_task
from evomerge.workers.evaluator import EvaluatorSpec, ObjectiveSpec, make_evaluator
from evomerge.workers.types import Candidate
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

PROMPTS = ["12+7=", "rev:abc=", "tr:KaMi=", "9-3=", "up:hi=", "calc:Le+Sa=", "sort:zyx=", "3+4="]


def tiny_llama(path, seed: int) -> str:
    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.3,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    return str(path)


def write_task(folder, answers: list[str]) -> str:
    folder.mkdir(exist_ok=True)
    with open(folder / "items.jsonl", "w") as f:
        for i, (prompt, answer) in enumerate(zip(PROMPTS, answers)):
            f.write(json.dumps({"id": f"t{i}", "prompt": prompt, "answer": answer}) + "\n")
    (folder / "task.yaml").write_text(yaml.safe_dump({"name": "echo", "kind": "generate", "max_new_tokens": 4,
                                                      "data": "items.jsonl"}))
    return str(folder / "task.yaml")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluator")
    a, b = tiny_llama(root / "a", 0), tiny_llama(root / "b", 1)
    draft = write_task(root / "draft", ["?"] * len(PROMPTS))
    outputs = [r.output for r in make_backend("hf", a).score(load_task(draft), range(len(PROMPTS)))]
    answers = [out.strip() if i % 2 == 0 else out.strip() + "#never" for i, out in enumerate(outputs)]
    task = write_task(root / "task", answers)
    return {"a": a, "b": b, "task": task}


def linear(weights: dict[str, float]) -> dict:
    return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m, w in weights.items()]}


def spec_for(zoo) -> EvaluatorSpec:
    return EvaluatorSpec(kind="merge", objectives=[ObjectiveSpec("echo", zoo["task"])],
                         sources={"a": zoo["a"], "b": zoo["b"]}, model_dir=zoo["a"])


def test_scores_of_merged_candidates_match_the_models_they_equal(zoo):
    evaluator = make_evaluator(spec_for(zoo))
    only_a = evaluator.evaluate(Candidate(0, 0, [1.0, 0.0], linear({"a": 1.0, "b": 0.0})))
    assert only_a.status == "ok", only_a.error
    assert only_a.objectives["echo"].value == 0.5           # A answers its own even items
    assert only_a.objectives["echo"].stderr == pytest.approx(np.sqrt(0.25 / 8))
    assert only_a.objectives["echo"].full is None and only_a.items_scored == 8
    assert set(only_a.timings) == {"merge", "load", "score"}

    # B through the evaluator (weights swapped in place) vs B scored by its own backend
    only_b = evaluator.evaluate(Candidate(1, 0, [0.0, 1.0], linear({"a": 0.0, "b": 1.0}), audit=True))
    direct = make_backend("hf", zoo["b"]).score(load_task(zoo["task"]), range(len(PROMPTS)))
    assert only_b.objectives["echo"].value == pytest.approx(np.mean([r.score for r in direct]))
    assert only_b.objectives["echo"].full == pytest.approx(only_b.objectives["echo"].value)

    # and back to A: nothing of B is left behind in the resident backend
    again = evaluator.evaluate(Candidate(2, 0, [1.0, 0.0], linear({"a": 1.0, "b": 0.0})))
    assert again.objectives["echo"].value == 0.5


def test_bad_candidates_fail_with_a_reason_instead_of_raising(zoo):
    evaluator = make_evaluator(spec_for(zoo))
    # weights overflow float32: the merged tensors hold inf
    overflow = linear({"a": 3e38, "b": 3e38}) | {"parameters": {"normalize": False}}
    nan = evaluator.evaluate(Candidate(0, 0, [], overflow))
    assert nan.status == "failed" and "NaN/inf" in nan.error and nan.objectives == {}
    invalid = evaluator.evaluate(Candidate(0, 0, [], linear({"a": float("nan"), "b": 1.0})))
    assert invalid.status == "failed" and "not finite" in invalid.error
    unknown = evaluator.evaluate(Candidate(1, 0, [], linear({"a": 0.5, "zzz": 0.5})))
    assert unknown.status == "failed" and "zzz" in unknown.error and "\n" not in unknown.error
    fine = evaluator.evaluate(Candidate(2, 0, [], linear({"a": 0.5, "b": 0.5})))
    assert fine.status == "ok"


def test_a_real_search_with_the_merge_evaluator(zoo, tmp_path):
    from evomerge.search.run import SearchRun

    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 1, "sources": {"a": zoo["a"], "b": zoo["b"]},
        "genome": {"kind": "parameter", "method": "linear", "granularity": "model"},
        "objectives": [{"name": "echo", "task": zoo["task"]},
                       {"name": "graded", "task": zoo["task"], "scoring": "likelihood", "estimator": "subset"}],
        "calibration": {"anchors": 4},
        "optimizer": {"name": "random", "population": 3, "generations": 2},
        "audit": {"every": 2},
    }))
    run = SearchRun.create(config, tmp_path / "run")
    run.run(progress=False)
    records = run.archive.records()
    assert [r.status for r in records] == ["ok"] * 6, [r.result.error for r in records]
    assert all(r.plan["merge_method"] == "linear" for r in records)
    assert [r.candidate.audit for r in records] == [True, False, True, False, True, False]
    assert all(0 <= r.objectives["echo"].value <= 1 for r in records)
    # the graded objective: 4 of the 8 items, no calibration needed, probabilities not 0/1
    assert all(r.objectives["graded"].n_items == 4 for r in records)
    assert not (tmp_path / "run" / "calibration" / "graded.json").exists()
    assert any(0 < r.objectives["graded"].value < 1 for r in records)
    # the sources, the front's reference points, are scored on each objective's own scale
    sources = run.archive.meta()["source_scores"]["a"]
    task = load_task(zoo["task"])
    from evomerge.estimators.registry import subset_indices

    graded_a = np.array([r.score for r in make_backend("hf", zoo["a"]).likelihood(task, range(len(task.items)))])
    assert sources["graded"]["full"] == pytest.approx(graded_a.mean(), rel=1e-5)
    # ... and, like the candidates' estimates, on the subset's items (seed 1: the run's)
    assert sources["graded"]["value"] == pytest.approx(graded_a[subset_indices(len(graded_a), 4, 1)].mean(), rel=1e-5)
    assert sources["graded"]["n_items"] == 4
    assert sources["echo"]["value"] == 0.5                   # exact: A answers its own even items
    stats = run.archive.audit_stats()["echo"]
    assert stats["n"] == 3 and stats["mae"] == 0.0  # "full" estimator: estimate == full score


def test_subset_estimator_with_likelihood_scoring_reads_the_graded_scores_of_its_items(zoo):
    from evomerge.estimators.registry import subset_indices

    task = load_task(zoo["task"])
    spec = EvaluatorSpec(kind="merge", objectives=[ObjectiveSpec("echo", zoo["task"], "subset", scoring="likelihood",
                                                                 subset=3, subset_seed=7)],
                         sources={"a": zoo["a"], "b": zoo["b"]}, model_dir=zoo["a"])
    chosen = subset_indices(len(task.items), 3, 7)
    assert len(chosen) == 3 and list(chosen) == sorted(set(chosen.tolist()))
    assert list(chosen) == list(subset_indices(len(task.items), 3, 7))      # the same in every worker
    assert list(chosen) != list(subset_indices(len(task.items), 3, 8)) or len(task.items) == 3

    result = make_evaluator(spec).evaluate(Candidate(0, 0, [0.0, 1.0], linear({"a": 0.0, "b": 1.0}), audit=True))
    assert result.status == "ok", result.error
    graded = {r.index: r.score for r in make_backend("hf", zoo["b"]).likelihood(task, range(len(task.items)))}
    score = result.objectives["echo"]
    assert score.value == pytest.approx(np.mean([graded[int(i)] for i in chosen]), rel=1e-5)
    assert score.full == pytest.approx(np.mean(list(graded.values())), rel=1e-5)
    assert score.n_items == 3 and result.items_scored == len(task.items)    # the audit scored every item
    assert 0.0 < score.value < 1.0 and score.stderr > 0.0


def test_likelihood_scoring_with_an_irt_estimator_is_a_config_error(tmp_path, zoo):
    from evomerge.errors import ConfigError
    from evomerge.search.config import load_config

    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "sources": {"a": zoo["a"], "b": zoo["b"]},
        "genome": {"kind": "parameter", "method": "linear", "granularity": "model"},
        "objectives": [{"name": "echo", "task": zoo["task"], "scoring": "likelihood", "estimator": "gpirt"}],
    }))
    with pytest.raises(ConfigError, match=r"search.yaml: objectives.0.estimator: 'gpirt' .*likelihood scoring"):
        load_config(config)


def test_an_estimator_registered_in_a_test_is_used_by_the_evaluator_and_the_search(zoo, tmp_path, monkeypatch):
    """The extension point: a stratified pick (the even items, which model A answers by
    construction) registered here, with no other module touched."""
    from evomerge.estimators import registry
    from evomerge.search.run import SearchRun

    evens = registry.MeanEstimator("evens", "the even items", lambda n, subset, seed: np.arange(0, n, 2))
    monkeypatch.setitem(registry.ESTIMATORS, "evens", evens)
    spec = EvaluatorSpec(kind="merge", objectives=[ObjectiveSpec("echo", zoo["task"], "evens")],
                         sources={"a": zoo["a"], "b": zoo["b"]}, model_dir=zoo["a"])
    only_a = make_evaluator(spec).evaluate(Candidate(0, 0, [1.0, 0.0], linear({"a": 1.0, "b": 0.0}), audit=True))
    assert only_a.status == "ok", only_a.error
    score = only_a.objectives["echo"]
    assert (score.value, score.stderr, score.n_items) == (1.0, 0.0, 4)   # 4 even items, all right
    assert score.full == 0.5                                            # the audit: all 8 items

    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 1, "sources": {"a": zoo["a"], "b": zoo["b"]},
        "genome": {"kind": "parameter", "method": "linear", "granularity": "model"},
        "objectives": [{"name": "echo", "task": zoo["task"], "estimator": "evens"}],
        "optimizer": {"name": "random", "population": 2, "generations": 1},
    }))
    run = SearchRun.create(config, tmp_path / "run")
    run.run(progress=False)
    records = run.archive.records()
    assert [r.status for r in records] == ["ok", "ok"], [r.result.error for r in records]
    assert all(r.objectives["echo"].n_items == 4 for r in records)
    assert run.archive.meta()["source_scores"]["a"]["echo"]["value"] == 1.0   # the sources on the same items
    run.close()

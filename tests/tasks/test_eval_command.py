"""`evomerge eval`: a model directory scored on a task file, exact or likelihood, table + JSONL."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.backends import make_backend
from evomerge.cli import main as cli_main
from evomerge.tasks.task import load_task
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

PROMPTS = ["12+7=", "rev:abc=", "tr:KaMi=", "9-3=", "up:hi="]


@pytest.fixture(scope="module")
def model_and_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(root / "model", safe_serialization=True)
    save_tokenizer(root / "model")
    with open(root / "items.jsonl", "w") as f:
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"id": f"t{i}", "prompt": p, "answer": str(i)}) + "\n")
    (root / "task.yaml").write_text(yaml.safe_dump({"name": "mine", "kind": "generate", "max_new_tokens": 3,
                                                    "data": "items.jsonl"}))
    return root / "model", root / "task.yaml"


@pytest.mark.parametrize("scoring", ["exact", "likelihood"])
def test_eval_prints_the_table_and_writes_per_item_results(model_and_task, tmp_path, capsys, scoring):
    model, task_path = model_and_task
    out = tmp_path / "results.jsonl"
    assert cli_main(["eval", str(model), "--tasks", str(task_path), "--scoring", scoring, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    backend, task = make_backend("hf", model), load_task(task_path)
    expected = (backend.likelihood if scoring == "likelihood" else backend.score)(task, range(len(PROMPTS)))
    assert [r["id"] for r in rows] == [f"t{i}" for i in range(len(PROMPTS))]
    assert [r["score"] for r in rows] == pytest.approx([r.score for r in expected], rel=1e-5)
    table = capsys.readouterr().out
    header = "likelihood" if scoring == "likelihood" else "accuracy"
    assert header in table.splitlines()[0]
    assert f"{sum(r.score for r in expected) / len(PROMPTS):.3f}" in table


def test_eval_rejects_a_bad_limit_and_a_missing_model(model_and_task, tmp_path, capsys):
    model, task_path = model_and_task
    assert cli_main(["eval", str(model), "--tasks", str(task_path), "--limit", "0"]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "nope"), "--tasks", str(task_path)]) == 2
    assert "nope: no such model directory or recipe" in capsys.readouterr().err

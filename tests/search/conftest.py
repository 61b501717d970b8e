"""Helpers for the search tests: small synthetic-evaluator configs written to disk."""

from __future__ import annotations

import copy
from pathlib import Path

import json

import numpy as np
import pytest
import yaml

SYNTHETIC = {
    "seed": 7,
    "genome": {"kind": "box", "dim": 5, "lower": 0.0, "upper": [1, 1, 1, 1, 3], "integer": [4]},
    "objectives": [{"name": "a", "task": "synthetic/a"}, {"name": "b", "task": "synthetic/b"}],
    "evaluator": {"kind": "synthetic"},
    "optimizer": {"name": "nsga2", "population": 6, "generations": 3},
    "audit": {"every": 4},
}


def deep_update(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def write_config(tmp_path: Path):
    """write_config(name, **changes) -> path of a synthetic config with those changes."""

    def write(name: str = "config.yaml", **changes) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(deep_update(SYNTHETIC, changes)))
        return path

    return write


# --------------------------------------------------------------------------- a real merge run

WORDS = ["cat", "dog", "sun", "sea", "red", "blue", "one", "two", "tree", "rock"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Three tiny Llamas and a 40 + 20 item multiple-choice task: (root, search config)."""
    from evomerge.io.synthetic import make_tiny_llama
    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("calibrate")
    save_tokenizer(root / "tok")
    vocab = build_tokenizer().get_vocab_size()
    base = make_tiny_llama(root / "base", vocab_size=vocab, hidden_size=32, num_layers=2, tokenizer_from=root / "tok")
    a = make_tiny_llama(root / "a", base=base, noise=0.6, seed=1, tokenizer_from=root / "tok")
    b = make_tiny_llama(root / "b", base=base, noise=0.6, seed=2, tokenizer_from=root / "tok")
    rng = np.random.default_rng(0)
    for split, n in (("search", 40), ("heldout", 20)):
        rows = []
        for i in range(n):
            choices = list(rng.choice(WORDS, 3, replace=False))
            rows.append({"id": f"{split}-{i}", "prompt": f"{i} {choices[0]} is", "choices": choices,
                         "answer": choices[i % 3]})
        (root / f"mc.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mc.yaml").write_text(yaml.safe_dump({"name": "mc", "kind": "multiple_choice", "default_split": "search",
                                                  "splits": {"search": "mc.search.jsonl", "heldout": "mc.heldout.jsonl"}}))
    config = {
        "seed": 5, "sources": {"base": str(base), "a": str(a), "b": str(b)}, "base": "base",
        "genome": {"kind": "parameter", "method": "task_arithmetic", "granularity": "layer", "weight": [0.0, 1.5]},
        "objectives": [{"name": "mc", "task": f"{root / 'mc.yaml'}:search", "estimator": "gmpirt"}],
        "calibration": {"random_merges": 9, "anchors": 0.2, "dims": [1]},
        "evaluator": {"kind": "merge", "threads": 1},
        "optimizer": {"name": "random", "population": 4, "generations": 2}, "audit": {"every": 2},
    }
    return root, config


@pytest.fixture(scope="session")
def finished(tiny):
    """A finished merge search of the tiny models, with IRT calibration (read it, do not change it)."""
    from evomerge.search.run import SearchRun

    root, config = tiny
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run = SearchRun.create(path, root / "run")
    run.run(progress=False)
    run.close()
    return root / "run"

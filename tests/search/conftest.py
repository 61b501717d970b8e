"""Helpers for the search tests: small synthetic-evaluator configs written to disk."""

from __future__ import annotations

import copy
from pathlib import Path

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


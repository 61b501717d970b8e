"""Every committed result measured on a zoo was measured on the shipped one (issue 16): the
weights' checksums recorded in each result file equal the shipped zoo's."""

import json
from pathlib import Path

import pytest

from evomerge.zoo.build import EXPERTS, SHIPPED_ZOO, zoo_paths

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def _zoo_results() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*.json") if "zoo_fingerprint" in json.loads(p.read_text()))


def test_there_are_zoo_results_to_check():
    assert len(_zoo_results()) >= 5


@pytest.mark.parametrize("path", _zoo_results(), ids=lambda p: p.name)
def test_a_result_file_names_the_shipped_zoo(path, experiment):
    common = experiment("common")
    zoo = zoo_paths(SHIPPED_ZOO)
    shipped = common.zoo_fingerprint({"base": str(zoo.base), **{s: str(zoo.experts[s]) for s in EXPERTS}})
    recorded = json.loads(path.read_text())["zoo_fingerprint"]
    assert recorded == {k: shipped[k] for k in recorded}, f"{path.name} was measured on another zoo"


def test_the_demo_result_names_the_shipped_zoo():
    import hashlib

    demo = json.loads((RESULTS / "demo.json").read_text())
    zoo = zoo_paths(SHIPPED_ZOO)
    assert demo["zoo"]["sha256"] == {name: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()[:16]
                                     for name, p in zoo.models.items()}

"""Disk merges read, merge and write in overlapping threads; results and failures stay the same."""

import threading

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.synthetic import make_tiny_llama
from evomerge.merge.engine import SourceSet, merge, merge_to_disk
from evomerge.merge.plan import MergePlan


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    # intermediate 512 x hidden 64: the MLP matrices are large enough for the fused kernels
    root = tmp_path_factory.mktemp("pipeline")
    base = make_tiny_llama(root / "base", num_layers=2, hidden_size=64, intermediate_size=512, seed=0)
    a = make_tiny_llama(root / "a", base=base, noise=0.02, seed=1, shards=2)
    b = make_tiny_llama(root / "b", base=base, noise=0.02, seed=2)
    return {"base": base, "a": a, "b": b}


PLANS = {
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.3},
             "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 0.6}}]},
    "linear": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.3}},
                                                    {"model": "b", "parameters": {"weight": 0.7}}]},
}


@pytest.mark.parametrize("method", list(PLANS))
def test_streamed_disk_merge_equals_in_memory_merge(family, tmp_path, method):
    plan = MergePlan.from_dict(PLANS[method])
    want = merge(plan, SourceSet.load(family))
    out = merge_to_disk(plan, SourceSet.load(family, resident=False), tmp_path / "out", max_shard_size=200_000)
    got = Checkpoint(out)
    assert len(list(out.glob("*.safetensors"))) > 1
    assert got.tensor_names == list(want)
    assert all(torch.equal(got.get(name), want[name]) for name in want)


def test_failure_in_the_merge_thread_leaves_no_output_and_no_thread(family, tmp_path):
    plan = MergePlan.from_dict({"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": -1.0}, {"value": 1.0}]}},
        {"model": "b"}], "parameters": {"weight": 1.0}})
    with pytest.raises(EvomergeError, match=r"linear failed on tensor model\.layers\.0\.mlp"):
        merge_to_disk(plan, SourceSet.load(family, resident=False), tmp_path / "half")
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "evomerge-pipeline"]

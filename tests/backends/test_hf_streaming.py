"""HFBackend.load_stream: a merge streamed into the model tensor by tensor loads exactly what
load_weights loads from the whole merged dict, and the evaluator never holds that dict."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from evomerge.backends.hf import HFBackend
from evomerge.errors import CheckpointError
from evomerge.io.synthetic import make_tiny_llama
from evomerge.merge import engine
from evomerge.merge.engine import SourceSet, merge_to_disk
from evomerge.merge.staged import StagedPlan, iter_merge_with_config, merge_with_config, plan_from_dict
from evomerge.search.genome import build_space
from evomerge.tasks.task import load_task
from evomerge.workers.evaluator import CandidateEvaluator, EvaluatorSpec, ObjectiveSpec
from evomerge.workers.types import Candidate
from evomerge.zoo.tokenizer import save_tokenizer

LAYERS = 3


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    save_tokenizer(root / "tok")
    base = make_tiny_llama(root / "base", num_layers=LAYERS, vocab_size=128, seed=0, tokenizer_from=root / "tok")
    paths = {"base": str(base)}
    for i, name in enumerate(("a", "b"), start=1):
        paths[name] = str(make_tiny_llama(root / name, base=base, noise=0.05, seed=i, tokenizer_from=root / "tok"))
    return paths


def plan_of(genome: dict, paths: dict[str, str], seed: int = 0):
    space = build_space(genome, list(paths), "base", LAYERS)
    return space.decode(space.random(np.random.default_rng(seed)))


GENOMES = {
    "ties": {"method": "ties"},
    "combined": {"kind": "combined", "parameter": {"method": "ties"}, "data_flow": {"repetitions": 1, "max_layers": 5}},
    "data_flow": {"kind": "data_flow", "repetitions": 1, "max_layers": 5},
}
# Genome seeds whose candidates include shallower ones than the 5-layer cap (identity padding).
SEEDS = {"ties": (0, 1, 2), "combined": (0, 1, 2), "data_flow": (0, 2, 8)}


def scores(backend: HFBackend, task) -> list[float]:
    return [r.score for r in backend.likelihood(task, range(12))]


@pytest.mark.parametrize("kind", list(GENOMES))
def test_streamed_load_is_bit_identical_to_load_weights_and_to_the_model_on_disk(kind, sources, tmp_path):
    """Three loads of the same candidate: the merged dict through load_weights, the stream
    through load_stream, and the merge written to disk and loaded by transformers. The
    data_flow engine is built 5 layers deep, so shallower candidates get identity layers."""
    task = load_task("zoo/arith")
    src = SourceSet.load(sources, resident=False)
    capacity = None if kind == "ties" else 5
    by_dict, by_stream = HFBackend(sources["base"], layer_capacity=capacity), \
        HFBackend(sources["base"], layer_capacity=capacity)
    checked = padded = 0
    for seed in SEEDS[kind]:
        plan = plan_of(GENOMES[kind], sources, seed)
        assert isinstance(plan, StagedPlan) == (kind == "combined")
        weights, config = merge_with_config(plan, src)
        by_dict.load_weights(weights, config)
        by_stream.load_stream(*iter_merge_with_config(plan, src))
        dict_params, stream_params = dict(by_dict.model.named_parameters()), dict(by_stream.model.named_parameters())
        assert dict_params.keys() == stream_params.keys()
        assert all(torch.equal(dict_params[n], stream_params[n]) for n in dict_params)
        assert by_stream.rebuilds == by_dict.rebuilds == 0
        layers = config["num_hidden_layers"]
        if capacity and layers < capacity:
            padded += 1
            assert by_stream.model.config.num_hidden_layers == layers
            spare = [p for n, p in stream_params.items() if n.startswith(f"model.layers.{layers}.")]
            assert spare and all(bool((p == 0).all()) for p in spare)
        on_disk = tmp_path / f"{kind}-{seed}"
        final = plan.final if isinstance(plan, StagedPlan) else plan
        merge_to_disk(final, _staged_or_plain(plan, src), on_disk, tokenizer_from=sources["base"])
        fresh = HFBackend(on_disk)
        assert scores(by_stream, task) == scores(fresh, task) == scores(by_dict, task)
        checked += 1
    assert checked == 3 and (padded > 0 or kind == "ties")


def _staged_or_plain(plan, src):
    from evomerge.merge.staged import staged_sources

    return staged_sources(plan, src) if isinstance(plan, StagedPlan) else src


def test_a_nan_tensor_fails_the_load_naming_it(sources):
    src = SourceSet.load(sources, resident=False)
    tensors, config = iter_merge_with_config(plan_of(GENOMES["ties"], sources), src)

    def poisoned():
        try:
            for n, t in tensors:
                yield n, (t.clone().fill_(float("nan")) if n == "model.layers.1.mlp.up_proj.weight" else t)
        finally:
            tensors.close()               # as timed_stream does: closed by load_stream, inside its no_grad

    backend = HFBackend(sources["base"])
    with pytest.raises(CheckpointError, match=r"merged tensor model\.layers\.1\.mlp\.up_proj\.weight has NaN/inf"):
        backend.load_stream(poisoned(), config)
    assert torch.is_grad_enabled()


def test_a_stream_missing_a_tensor_or_naming_an_unknown_one_is_refused(sources):
    src = SourceSet.load(sources, resident=False)
    backend = HFBackend(sources["base"])
    tensors, config = iter_merge_with_config(plan_of(GENOMES["ties"], sources), src)
    with pytest.raises(CheckpointError, match="candidate weights lack tensor model.norm.weight"):
        backend.load_stream(((n, t) for n, t in tensors if n != "model.norm.weight"), config)
    tensors, config = iter_merge_with_config(plan_of(GENOMES["ties"], sources), src)
    with pytest.raises(CheckpointError, match="candidate tensor model.extra.weight does not exist"):
        backend.load_stream(iter([*tensors, ("model.extra.weight", torch.zeros(2))]), config)


def _alive_counter(monkeypatch) -> dict:
    """Wrap the merge engine's tensor stream: at each tensor it yields, count how many of the
    tensors it yielded so far are still alive somewhere (weak references)."""
    seen = {"yielded": 0, "most_alive": 0}
    original = engine.iter_merge

    def counted(*args, **kwargs):
        refs = []
        for name, tensor in original(*args, **kwargs):
            refs.append(weakref.ref(tensor))
            seen["yielded"] += 1
            seen["most_alive"] = max(seen["most_alive"], sum(r() is not None for r in refs))
            yield name, tensor
            del tensor

    monkeypatch.setattr(engine, "iter_merge", counted)
    return seen


def test_the_evaluator_never_holds_the_merged_model(sources, monkeypatch):
    """At most a couple of merged tensors are alive at once while a candidate streams in
    (the merged dict of before held every one of them: the counter sees that too)."""
    seen = _alive_counter(monkeypatch)
    spec = EvaluatorSpec(kind="merge", objectives=[ObjectiveSpec("arith", "zoo/arith", "subset", subset=4)],
                         sources=dict(sources), model_dir=sources["base"])
    evaluator = CandidateEvaluator(spec)
    plan = plan_of(GENOMES["ties"], sources)
    result = evaluator.evaluate(Candidate(0, 0, [], plan.to_dict()))
    assert result.status == "ok", result.error
    assert seen["yielded"] == 3 + 9 * LAYERS and seen["most_alive"] <= 2
    assert result.timings["merge"] > 0 and result.timings["load"] > 0

    seen.update(yielded=0, most_alive=0)
    weights, _ = merge_with_config(plan_from_dict(plan.to_dict()), evaluator.scorer.sources)
    assert seen["most_alive"] == seen["yielded"] == len(weights)


def test_a_source_candidate_streams_from_the_mapped_sources(sources, monkeypatch):
    """Pre-search source scoring (a source reproduced by a linear weight-1 plan): the worker
    keeps no copy of the sources (mapped from the page cache on the CPU) and scores exactly
    what the source model scores."""
    from evomerge.search.calibrate import source_plan

    seen = _alive_counter(monkeypatch)
    spec = EvaluatorSpec(kind="merge", objectives=[ObjectiveSpec("arith", "zoo/arith")],
                         sources=dict(sources), model_dir=sources["base"])
    evaluator = CandidateEvaluator(spec)
    assert not evaluator.scorer.sources.resident
    result, responses = evaluator.evaluate_full(Candidate(0, 0, [], source_plan("a")))
    assert result.status == "ok" and seen["most_alive"] <= 2
    task = load_task("zoo/arith")
    own = HFBackend(sources["a"])
    assert responses["arith"] == [r.score for r in own.score(task, range(len(task.items)))]


def test_a_candidate_that_overflows_fails_naming_the_first_tensor_and_leaves_autograd_on(sources):
    """The evaluator stops the stream at the first NaN/inf tensor (the norms, whose weights
    are 1: 2 x 3e38 overflows float32; the embeddings, ~0.02, do not) and closes the merge,
    which runs under no_grad(): autograd works again afterwards (the calibration fit, in the
    same process for a local pool, needs it)."""
    spec = EvaluatorSpec(kind="merge", objectives=[ObjectiveSpec("arith", "zoo/arith", "subset", subset=4)],
                         sources=dict(sources), model_dir=sources["base"])
    evaluator = CandidateEvaluator(spec)
    overflow = {"merge_method": "linear", "parameters": {"normalize": False},
                "models": [{"model": "a", "parameters": {"weight": 3e38}},
                           {"model": "b", "parameters": {"weight": 3e38}}]}
    result = evaluator.evaluate(Candidate(0, 0, [], overflow))
    assert result.status == "failed" and result.objectives == {}
    assert "merged tensor model.layers.0.input_layernorm.weight has NaN/inf values" in result.error
    assert torch.is_grad_enabled()
    x = torch.ones(2, requires_grad=True)
    (x * 3).sum().backward()
    assert x.grad.tolist() == [3.0, 3.0]

"""vLLM in its default multiprocess mode: the engine's worker runs in its own process and
candidates reach it as plans, merged there tensor by tensor (``backends.vllm_extension``).

One rank (``tensor_parallel_size: 1``): the cross-process path is the same for every rank;
``EVOMERGE_TEST_TP=1`` adds a run with two ranks (opt-in: a 1-4 minute engine start on 2 cores).
Runs only where vllm imports (``scripts/setup_vllm_venv.sh``); a module of its own so that no
in-process engine of another module is alive in this process meanwhile.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="vllm not installed (scripts/setup_vllm_venv.sh)")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from evomerge.backends.hf import HFBackend  # noqa: E402
from evomerge.backends.vllm_backend import VLLMBackend  # noqa: E402
from evomerge.errors import CheckpointError, EvomergeError  # noqa: E402
from evomerge.merge.engine import SourceSet, merge, output_config  # noqa: E402
from evomerge.merge.plan import MergePlan  # noqa: E402
from evomerge.tasks.task import Item, Task  # noqa: E402
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["12+7=", "rev:abc=", "tr:KaMi=", "9-3=", "up:hello world=", "calc:Le+Sa=", "x", "sort:zyx="]
CHOICES = ["12", "ab", "Bolu", "zzz", "7"]
MAX_NEW = 6
MARGIN = 1e-3


def save_tiny(seed: int, path, layers: int = 2) -> str:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=build_tokenizer().get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.3,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    return str(path)


def greedy_margin(model, tokenizer, prompt: str) -> float:
    """The smallest top-1/top-2 logit gap along the unbatched greedy path of ``prompt``."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    margin = float("inf")
    with torch.no_grad():
        for _ in range(MAX_NEW):
            top = model(input_ids=ids).logits[0, -1].topk(2)
            margin = min(margin, float(top.values[0] - top.values[1]))
            if int(top.indices[0]) == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, top.indices[:1][None]], dim=1)
    return margin


def test_plans_merged_in_the_engine_worker_score_as_the_hf_backend_on_the_merged_weights(tmp_path):
    sources = {"a": save_tiny(0, tmp_path / "a"), "b": save_tiny(1, tmp_path / "b")}
    gen = Task("gen", "generate", [Item(str(i), p, "7") for i, p in enumerate(PROMPTS)], max_new_tokens=MAX_NEW)
    mc = Task("mc", "multiple_choice", [Item(str(i), p, CHOICES[i % 5], CHOICES) for i, p in enumerate(PROMPTS)])
    idx = list(range(len(PROMPTS)))
    plans = {
        "ties": {"merge_method": "ties", "base_model": "b",
                 "models": [{"model": "a", "parameters": {"weight": 0.8, "density": 0.6}}]},
        # one layer of a, then b's second: a data-flow path shallower than the engine
        "one layer": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 1]}]}]},
        "swap": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 1]}]}, {"sources": [{"model": "b", "layer_range": [1, 2]}]},
            {"sources": [{"model": "a", "layer_range": [1, 2]}]}]},
    }
    resident = SourceSet.load(sources)
    engine = VLLMBackend(sources["b"], device="cpu", tasks=[gen, mc], layer_capacity=3, multiprocess=True)
    try:
        assert engine.capacity == 3
        for label, spec in plans.items():
            plan = MergePlan.from_dict(spec)
            hf = HFBackend(sources["b"])
            hf.load_weights(merge(plan, resident), output_config(plan, resident))
            engine.load_plan(spec, sources)
            got, want = engine.score(gen, idx), hf.score(gen, idx)
            margins = [greedy_margin(hf.model, hf.tokenizer, p) for p in PROMPTS]
            clear = [i for i, m in enumerate(margins) if m > MARGIN]
            assert len(clear) >= len(PROMPTS) - 2, (label, margins)
            assert [got[i].output for i in clear] == [want[i].output for i in clear], label
            got_ll = [r.score for r in engine.likelihood(mc, idx)]
            assert got_ll == pytest.approx([r.score for r in hf.likelihood(mc, idx)], abs=2e-3), label
        assert engine.restarts == 0

        # a merge that overflows is reported by name; the engine keeps serving
        with pytest.raises(CheckpointError, match="NaN/inf"):
            engine.load_plan({"merge_method": "linear", "parameters": {"normalize": False},
                              "models": [{"model": "a", "parameters": {"weight": 3e38}},
                                         {"model": "b", "parameters": {"weight": 3e38}}]}, sources)
        engine.load_plan(plans["ties"], sources)
        assert len(engine.score(gen, [0, 1])) == 2
        with pytest.raises(EvomergeError, match="load_plan"):
            engine.load_weights(merge(MergePlan.from_dict(plans["ties"]), resident),
                                output_config(MergePlan.from_dict(plans["ties"]), resident))
    finally:
        engine.close()


@pytest.mark.skipif(os.environ.get("EVOMERGE_TEST_TP") != "1",
                    reason="two engine ranks take 1-4 minutes to start on 2 cores: set EVOMERGE_TEST_TP=1")
def test_tensor_parallel_2_ranks_each_merge_the_plan_and_score_as_the_hf_backend():
    """``tensor_parallel_size: 2`` on vLLM's CPU build (the backend splits this process's
    cores between the ranks): both ranks merge the TIES plan and load their shards; every
    item of zoo/arith as the HF backend scores the merged weights. Opt-in, not in CI."""
    from evomerge.tasks.task import load_task
    from evomerge.zoo.build import ensure_zoo

    zoo = ensure_zoo()
    sources = {name: str(path) for name, path in zoo.models.items()}
    spec = {"merge_method": "ties", "base_model": "base", "models": [
        {"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in ("expert-arith", "expert-lang")]}
    task, idx = load_task("zoo/arith:heldout"), list(range(40))
    plan, resident = MergePlan.from_dict(spec), SourceSet.load(sources)
    hf = HFBackend(zoo.base)
    hf.load_weights(merge(plan, resident), output_config(plan, resident))
    want = [(r.output, r.score) for r in hf.score(task, idx)]
    engine = VLLMBackend(zoo.base, device="cpu", tasks=[task], engine={"tensor_parallel_size": 2})
    try:
        assert engine.multiprocess                      # implied by two ranks
        engine.load_plan(spec, sources)
        got = [(r.output, r.score) for r in engine.score(task, idx)]
    finally:
        engine.close()
    assert sum(g == w for g, w in zip(got, want)) >= len(idx) - 1, (got, want)
    assert 0 < sum(s for _, s in want) < len(idx)          # the merge gets some right, not all

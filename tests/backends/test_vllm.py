"""VLLMBackend on a real vLLM engine (CPU build): weights swapped into the running engine give
the same per-item results as a fresh engine, and agree with the HF backend.

Runs only where vllm imports (``scripts/setup_vllm_venv.sh``, then
``.venv-vllm/bin/python -m pytest tests/backends/test_vllm.py``); skipped elsewhere.
One engine for the whole module: starting one costs ~10-25 s on 2 cores. The tests on it come
first: shutting down an in-process engine (the other tests start and close their own) tears
down vLLM's process-wide distributed state, which the module's engine then lacks.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vllm not installed (scripts/setup_vllm_venv.sh)")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from evomerge.backends.base import longest_request  # noqa: E402
from evomerge.backends.hf import HFBackend  # noqa: E402
from evomerge.backends.vllm_backend import VLLMBackend  # noqa: E402
from evomerge.errors import CheckpointError, EvomergeError  # noqa: E402
from evomerge.tasks.task import Item, Task, load_task  # noqa: E402
from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = ["12+7=", "rev:abc=", "tr:KaMi=", "9-3=", "up:hello world=", "calc:Le+Sa=", "x", "sort:zyx=",
           "345+678=", "rev:hello=", "44-17=", "up:abc="]
CHOICES = ["12", "ab", "Bolu", "zzz", "7"]
MAX_NEW = 6
MARGIN = 1e-3          # greedy steps whose top-2 logit gap is below this may flip on float noise


def tiny_model(seed: int, layers: int = 2) -> LlamaForCausalLM:
    # head_dim 32: the smallest head vLLM's CPU attention supports. initializer_range 0.3 gives
    # peaked next-token distributions, so greedy paths are far from ties.
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=build_tokenizer().get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.3,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def save(model: LlamaForCausalLM, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    return str(path)


def weights_of(model: LlamaForCausalLM) -> tuple[dict[str, torch.Tensor], dict]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    return state, model.config.to_dict()


def greedy_with_margin(model, tokenizer, prompt: str) -> tuple[str, float]:
    """Unbatched greedy output and the smallest top-1/top-2 logit gap along its path."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out, margin = [], float("inf")
    with torch.no_grad():
        for _ in range(MAX_NEW):
            top = model(input_ids=ids).logits[0, -1].topk(2)
            margin = min(margin, float(top.values[0] - top.values[1]))
            nxt = int(top.indices[0])
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True), margin


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    return {"a": save(tiny_model(0), root / "a"), "b": save(tiny_model(1), root / "b")}


@pytest.fixture(scope="module")
def engine(dirs):
    """The module's single vLLM engine, started on model B."""
    backend = VLLMBackend(dirs["b"], device="cpu", max_model_len=128)
    yield backend
    backend.close()


def generate_task(answers: list[str]) -> Task:
    return Task("gen", "generate", [Item(str(i), p, a) for i, (p, a) in enumerate(zip(PROMPTS, answers))],
                max_new_tokens=MAX_NEW)


def mc_task() -> Task:
    return Task("mc", "multiple_choice", [Item(str(i), p, CHOICES[i % len(CHOICES)], CHOICES)
                                          for i, p in enumerate(PROMPTS)])


def test_swapped_weights_give_the_fresh_engines_results(engine, dirs):
    """B fresh -> A in place -> B in place: the last equals the first, item by item."""
    gen, mc = generate_task(["7"] * len(PROMPTS)), mc_task()
    idx = list(range(len(PROMPTS)))
    fresh_gen, fresh_mc = engine.score(gen, idx), engine.score(mc, idx)
    rows = [(engine._encode(p), engine._encode(c, special=False)) for p in PROMPTS for c in CHOICES]
    fresh_ll = engine.loglikelihoods(rows)

    engine.load_weights(*weights_of(tiny_model(0)))
    assert [r.output for r in engine.score(gen, idx)] != [r.output for r in fresh_gen]   # A really loaded

    engine.load_weights(*weights_of(tiny_model(1)))
    assert engine.restarts == 0
    assert [(r.index, r.output, r.score) for r in engine.score(gen, idx)] == \
        [(r.index, r.output, r.score) for r in fresh_gen]
    assert [(r.output, r.score) for r in engine.score(mc, idx)] == [(r.output, r.score) for r in fresh_mc]
    assert engine.loglikelihoods(rows) == pytest.approx(fresh_ll, abs=1e-5)


def test_generation_agrees_with_hf_backend(engine, dirs):
    """After swapping A in, vLLM's greedy outputs are HF's wherever HF's path has clear margins."""
    engine.load_weights(*weights_of(tiny_model(0)))
    hf = HFBackend(dirs["a"])
    refs = [greedy_with_margin(hf.model, hf.tokenizer, p) for p in PROMPTS]
    clear = [i for i, (_, m) in enumerate(refs) if m > MARGIN]
    assert len(clear) >= len(PROMPTS) - 2, [m for _, m in refs]
    # even items: the answer is HF's own output (correct); odd items: a wrong answer
    task = generate_task([out.strip() if i % 2 == 0 else out + "#" for i, (out, _) in enumerate(refs)])
    order = list(reversed(range(len(PROMPTS))))
    got, want = engine.score(task, order), hf.score(task, order)
    assert [r.index for r in got] == order
    for g, w in zip(got, want):
        if g.index in clear:
            assert (g.output, g.score) == (w.output, w.score) == (refs[g.index][0], float(g.index % 2 == 0))


def test_multiple_choice_agrees_with_hf_backend(engine, dirs):
    engine.load_weights(*weights_of(tiny_model(0)))
    hf = HFBackend(dirs["a"])
    rows = [(hf._encode(p), hf._encode(c, special=False)) for p in PROMPTS for c in CHOICES]
    hf_ll = [ll for ll, _ in hf._loglikelihood(rows)]
    assert engine.loglikelihoods(rows) == pytest.approx(hf_ll, abs=1e-3)

    def margin(i):                     # gap between the best and second-best choice of prompt i
        lls = sorted(hf_ll[i * len(CHOICES):(i + 1) * len(CHOICES)], reverse=True)
        return lls[0] - lls[1]

    task = mc_task()
    got, want = engine.score(task, range(len(PROMPTS))), hf.score(task, range(len(PROMPTS)))
    assert 0 < sum(r.score for r in want) < len(PROMPTS)          # the task separates right from wrong
    for g, w in zip(got, want):
        if margin(g.index) > MARGIN:
            assert (g.output, g.score) == (w.output, w.score)


def test_likelihood_agrees_with_hf_backend(engine, dirs):
    engine.load_weights(*weights_of(tiny_model(0)))
    hf = HFBackend(dirs["a"])
    for task in (generate_task([p[::-1] for p in PROMPTS]), mc_task()):
        got, want = engine.likelihood(task, range(len(PROMPTS))), hf.likelihood(task, range(len(PROMPTS)))
        assert [r.index for r in got] == list(range(len(PROMPTS)))
        assert [r.score for r in got] == pytest.approx([r.score for r in want], rel=1e-2, abs=1e-6), task.name


def test_zoo_task_items_agree_with_hf_backend(engine, dirs):
    """A shipped task file, 40 items, through both backends: same per-item correctness."""
    engine.load_weights(*weights_of(tiny_model(0)))
    task = load_task("zoo/arith")
    idx = list(range(40))
    got, want = engine.score(task, idx), HFBackend(dirs["a"]).score(task, idx)
    same = sum(g.output == w.output for g, w in zip(got, want))
    assert same >= 36, [(g.output, w.output) for g, w in zip(got, want) if g.output != w.output]
    assert [g.score for g in got] == [w.score for w in want]


def test_bad_candidate_weights_name_the_tensor_and_keep_the_engine(engine):
    state, config = weights_of(tiny_model(0))
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        engine.load_weights({k: v for k, v in state.items() if k != "model.norm.weight"}, config)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        engine.load_weights({**state, "model.layers.1.mlp.up_proj.weight": torch.zeros(3, 64)}, config)
    with pytest.raises(CheckpointError, match="model.layers.9.extra"):
        engine.load_weights({**state, "model.layers.9.extra": torch.zeros(3)}, config)
    engine.load_weights(state, config)
    assert len(engine.score(generate_task(["1"] * len(PROMPTS)), [0, 1])) == 2


def test_out_of_range_index_and_unsupported_head_size(engine, tmp_path):
    with pytest.raises(EvomergeError, match="index 99"):
        engine.score(generate_task(["1"] * len(PROMPTS)), [99])
    small_heads = LlamaForCausalLM(LlamaConfig(vocab_size=build_tokenizer().get_vocab_size(), hidden_size=64,
                                               intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                               num_key_value_heads=4, tie_word_embeddings=True))
    with pytest.raises(EvomergeError, match="head dimension 16"):
        VLLMBackend(save(small_heads, tmp_path / "h16"), device="cpu")


def test_token_level_methods_lm_eval_uses_agree_with_hf_backend(engine, dirs):
    """token_loglikelihoods and greedy_generate, the methods lm-eval tasks are answered with
    (tasks.lm_eval_lm.BackendLM), give the HF backend's answers."""
    engine.load_weights(*weights_of(tiny_model(0)))
    hf = HFBackend(dirs["a"])
    encode = hf.tokenizer
    rows = [(encode(p)["input_ids"], encode(c, add_special_tokens=False)["input_ids"])
            for p in PROMPTS for c in CHOICES]
    got, want = engine.token_loglikelihoods(rows), hf.token_loglikelihoods(rows)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=1e-2, abs=1e-4)
    assert sum(g == w for (_, g), (_, w) in zip(got, want)) >= len(rows) - 2      # greedy flags (near-ties aside)
    prompts = [encode(p)["input_ids"] for p in PROMPTS]
    texts, reference = engine.greedy_generate(prompts, MAX_NEW, [";"]), hf.greedy_generate(prompts, MAX_NEW, [";"])
    cut = [t.split(";")[0] for t in reference]                                      # vLLM stops before the stop string
    assert sum(a.split(";")[0] == b for a, b in zip(texts, cut)) >= len(PROMPTS) - 2


STREAM_PLANS = {
    "ties": {"merge_method": "ties", "base_model": "b",
             "models": [{"model": "a", "parameters": {"weight": 0.8, "density": 0.6}}]},
    # one layer of a: shallower than the 2-layer engine, its spare layer an identity layer
    "one layer": {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]},
}


def counted_merge(plan, sources, seen: dict):
    """``iter_merge_with_config``'s stream, counting at each tensor how many of the tensors
    it yielded so far are still alive anywhere (weak references): a consumer that collects
    the merge into a dict or a list keeps them all alive."""
    import weakref

    from evomerge.merge.staged import iter_merge_with_config

    tensors, config = iter_merge_with_config(plan, sources)

    def stream():
        refs = []
        for name, tensor in tensors:
            refs.append(weakref.ref(tensor))
            seen["yielded"] += 1
            seen["most_alive"] = max(seen["most_alive"], sum(r() is not None for r in refs))
            yield name, tensor
            del tensor

    return stream(), config


@pytest.mark.parametrize("label", list(STREAM_PLANS))
def test_a_streamed_merge_is_never_held_whole_and_scores_as_the_hf_backend(engine, dirs, label):
    """The in-process load path (``base.load_merged`` -> ``VLLMBackend.load_stream``) hands the
    merge's own stream to vLLM's reload: at most a few merged tensors are alive at once (the
    dict of before held every one: 20, or 11 for the one-layer plan), and the scores are the
    HF backend's on the same stream and those of the merged dict through ``load_weights``."""
    from evomerge.backends.base import load_merged
    from evomerge.merge.engine import SourceSet
    from evomerge.merge.staged import merge_with_config, plan_from_dict

    plan = plan_from_dict(STREAM_PLANS[label])
    sources = SourceSet.load({"a": dirs["a"], "b": dirs["b"]}, resident=False)
    gen, mc, idx = generate_task(["7"] * len(PROMPTS)), mc_task(), list(range(len(PROMPTS)))
    seen = {"yielded": 0, "most_alive": 0}
    load_merged(engine, *counted_merge(plan, sources, seen))
    layers = 1 if label == "one layer" else 2
    # 4: vLLM's reload buffers q, k and v until the fused qkv_proj has all three, + the one just yielded
    assert seen["yielded"] == 2 + 9 * layers and seen["most_alive"] <= 4, seen
    assert engine.restarts == 0
    streamed = (engine.score(gen, idx), engine.likelihood(mc, idx))

    hf = HFBackend(dirs["b"])
    load_merged(hf, *counted_merge(plan, sources, {"yielded": 0, "most_alive": 0}))
    want_gen, want_ll = hf.score(gen, idx), hf.likelihood(mc, idx)
    margins = [greedy_with_margin(hf.model, hf.tokenizer, p)[1] for p in PROMPTS]
    clear = [i for i, m in enumerate(margins) if m > MARGIN]
    assert len(clear) >= len(PROMPTS) - 2, margins
    assert [streamed[0][i].output for i in clear] == [want_gen[i].output for i in clear]
    assert [r.score for r in streamed[1]] == pytest.approx([r.score for r in want_ll], abs=2e-3)

    engine.load_weights(*merge_with_config(plan, sources))
    assert [r.output for r in engine.score(gen, idx)] == [r.output for r in streamed[0]]
    assert [r.score for r in engine.likelihood(mc, idx)] == pytest.approx([r.score for r in streamed[1]], abs=1e-6)


def test_a_bad_stream_fails_naming_the_tensor_and_the_engine_keeps_serving(engine, dirs):
    """A NaN tensor, an unknown name, a wrong shape, a missing tensor, or the merge raising
    half-way: the load fails naming the cause, and the engine (whose reload always runs to
    its end) then loads and scores a good candidate exactly as before."""
    from evomerge.backends.base import NonFiniteWeights

    state, config = weights_of(tiny_model(0))
    gen, idx = generate_task(["7"] * len(PROMPTS)), list(range(len(PROMPTS)))
    engine.load_stream(iter(state.items()), config)
    good = [r.output for r in engine.score(gen, idx)]

    def broken():
        for name, tensor in state.items():
            if name == "model.layers.1.self_attn.k_proj.weight":
                raise RuntimeError("merge failed here")
            yield name, tensor

    nan = {**state, "model.layers.0.mlp.up_proj.weight": torch.full((128, 64), float("nan"))}
    unknown = {**state, "model.layers.9.extra": torch.zeros(3)}
    misshapen = {**state, "model.norm.weight": torch.zeros(3)}
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    bad = [(NonFiniteWeights, r"model\.layers\.0\.mlp\.up_proj\.weight has NaN/inf", nan),
           (CheckpointError, "candidate tensor model.layers.9.extra does not exist", unknown),
           (CheckpointError, r"tensor model\.norm\.weight: shape \(3,\)", misshapen),
           (CheckpointError, "lack tensor model.norm.weight", missing)]
    for error, match, weights in bad:
        with pytest.raises(error, match=match):
            engine.load_stream(iter(weights.items()), config)
    with pytest.raises(RuntimeError, match="merge failed here"):
        engine.load_stream(broken(), config)
    engine.load_stream(iter(state.items()), config)
    assert [r.output for r in engine.score(gen, idx)] == good


def test_eval_command_with_the_vllm_backend_scores_every_item_as_the_hf_backend(tmp_path, capsys):
    """`evomerge eval ZOO_MODEL --backend vllm` (default engine options) writes the same per-item
    scores as `--backend hf`, exact and likelihood."""
    import json

    from evomerge.cli import main as cli_main
    from evomerge.zoo.build import ensure_zoo

    model = str(ensure_zoo().models["expert-arith"])
    for scoring in ("exact", "likelihood"):
        rows = {}
        for backend in ("vllm", "hf"):
            out = tmp_path / f"{backend}-{scoring}.jsonl"
            assert cli_main(["eval", model, "--tasks", "zoo/arith:heldout,zoo/lang", "--limit", "60", "--backend",
                             backend, "--scoring", scoring, "--out", str(out)]) == 0
            rows[backend] = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows["vllm"]) == 120
        assert [(r["task"], r["id"]) for r in rows["vllm"]] == [(r["task"], r["id"]) for r in rows["hf"]]
        got, want = [r["score"] for r in rows["vllm"]], [r["score"] for r in rows["hf"]]
        if scoring == "exact":
            assert got == want
            assert 0 < sum(got) < len(got)                      # the items separate right from wrong
        else:
            assert got == pytest.approx(want, abs=2e-3)
    assert "zoo/arith:heldout" in capsys.readouterr().out


def test_unknown_engine_options_are_one_line_errors(tmp_path, capsys):
    from evomerge.cli import main as cli_main
    from evomerge.search.config import parse_config
    from evomerge.zoo.build import ensure_zoo

    zoo = ensure_zoo()
    assert cli_main(["eval", str(zoo.base), "--tasks", "zoo/arith", "--backend", "vllm",
                     "--engine", "max_modl_len=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --engine.max_modl_len: unknown field (not a vLLM engine argument, vllm.EngineArgs); "
                   "did you mean 'max_model_len'?")
    data = {"sources": {k: str(v) for k, v in zoo.models.items()}, "base": "base",
            "genome": {"kind": "parameter", "method": "linear"}, "objectives": [{"name": "x", "task": "zoo/arith"}],
            "evaluator": {"backend": "vllm", "engine": {"kv_cache_bytes": 1 << 20}}}
    with pytest.raises(EvomergeError, match=r"^cfg.yaml: evaluator.engine.kv_cache_bytes: unknown field \(not a vLLM engine argument"):
        parse_config(data, "cfg.yaml", tmp_path)


@pytest.mark.slow
def test_data_flow_search_on_vllm_loads_every_candidate_in_place_and_scores_as_hf(tmp_path, capsys):
    """A data_flow search whose layer counts vary (max_layers 16 over 4-layer sources): zero
    engine restarts (archive timings, `evomerge status`), and every candidate's score equals
    the HF backend's on the same plan."""
    import yaml

    from evomerge.search.archive import Archive
    from evomerge.search.command_status import status_lines
    from evomerge.search.run import SearchRun
    from evomerge.workers.evaluator import CandidateEvaluator, EvaluatorSpec
    from evomerge.workers.types import Candidate
    from evomerge.zoo.build import ensure_zoo

    zoo = ensure_zoo()
    config = {"seed": 3, "sources": {k: str(v) for k, v in zoo.models.items()}, "base": "base",
              "genome": {"kind": "data_flow", "max_layers": 16},
              "objectives": [{"name": "arith", "task": "zoo/arith:search", "estimator": "subset"}],
              "calibration": {"anchors": 40},
              "evaluator": {"backend": "vllm"}, "optimizer": {"name": "random", "population": 6, "generations": 1},
              "audit": {"every": 0}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = SearchRun.create(path, tmp_path / "run")
    try:
        run.run()
    finally:
        run.close()
    archive = Archive(tmp_path / "run", readonly=True)
    try:
        records = [r for r in archive.records() if r.generation >= 0]
    finally:
        archive.close()
    assert len(records) == 6 and all(r.status == "ok" for r in records)
    depths = {sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in r.plan["slices"])
              for r in records}
    assert len(depths) > 1, depths                      # the layer counts really vary
    assert not any("restart" in r.result.timings for r in records)
    assert any("0 engine restarts" in line and "6 of 6" in line for line in status_lines(tmp_path / "run"))

    spec = EvaluatorSpec.from_config(run.config, run.space)
    spec.backend, spec.engine = "hf", {}
    hf = CandidateEvaluator(spec)
    for r in records:
        want = hf.evaluate(Candidate(r.candidate_id, 0, r.genome, r.plan))
        assert want.status == "ok"
        assert r.objectives["arith"].value == want.objectives["arith"].value, r.candidate_id




def test_real_zoo_models_and_a_merge_agree_with_hf_backend():
    """The zoo's own models (head_dim 32 since zoo-v2) through one vLLM engine, weights swapped
    in place: per-item correctness on the composite task agrees with the HF backend. The merge
    engine (and so numba) is imported before the engine starts, as in a worker: vLLM 0.32 on
    CPU failed to start then until ``vllm_backend._llvmlite_hidden``."""
    import numba  # noqa: F401  -- loaded first on purpose

    from evomerge.merge.engine import SourceSet, merge, output_config
    from evomerge.merge.plan import MergePlan
    from evomerge.zoo.build import ensure_zoo

    zoo = ensure_zoo()
    sources = SourceSet.load({name: path for name, path in zoo.models.items()})
    plans = {name: {"merge_method": "passthrough", "models": [{"model": name}]} for name in zoo.models}
    plans["ties(arith+lang)"] = {"merge_method": "ties", "base_model": "base", "models": [
        {"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in ("expert-arith", "expert-lang")]}
    task, idx = load_task("zoo/calc:heldout"), list(range(50))
    engine = VLLMBackend(zoo.base, device="cpu", max_model_len=64)   # the zoo is trained to 64 positions
    hf, accuracy = HFBackend(zoo.base), {}
    try:
        for label, spec in plans.items():
            plan = MergePlan.from_dict(spec)
            weights, config = merge(plan, sources), output_config(plan, sources)
            engine.load_weights(weights, config)
            hf.load_weights(weights, config)
            got, want = [r.score for r in engine.score(task, idx)], [r.score for r in hf.score(task, idx)]
            assert sum(g == w for g, w in zip(got, want)) >= len(idx) - 2, (label, got, want)
            accuracy[label] = sum(got) / len(idx)
            # likelihood scoring (the search's graded objective): the same probabilities
            graded = [r.score for r in engine.likelihood(task, idx)]
            assert graded == pytest.approx([r.score for r in hf.likelihood(task, idx)], abs=2e-3), label
    finally:
        engine.close()
    assert accuracy["ties(arith+lang)"] > accuracy["expert-lang"], accuracy    # what the search exploits


@pytest.mark.slow
def test_layer_count_change_restarts_the_engine_and_identity_padding_gives_the_same_results(engine, dirs, tmp_path):
    """Runs last (it closes the module's engine): a 3-layer candidate cannot be reloaded into
    the 2-layer engine; it restarts on it. An engine built 4 layers deep (``layer_capacity``) loads the same 3-layer candidate in
    place, the spare layer an identity layer, and then a 2-layer one: item for item the restart
    path's and a fresh engine's results, and no restart."""
    deeper = tiny_model(2, layers=3)
    deeper_dir = save(deeper, tmp_path / "deeper")
    gen, mc = generate_task(["1"] * len(PROMPTS)), mc_task()
    idx = list(range(len(PROMPTS)))
    rows = [(engine._encode(p), engine._encode(c, special=False)) for p in PROMPTS for c in CHOICES]
    engine.load_weights(*weights_of(deeper))
    assert engine.restarts == 1 and engine.config["num_hidden_layers"] == 3
    hf = HFBackend(deeper_dir)
    refs = [greedy_with_margin(hf.model, hf.tokenizer, p) for p in PROMPTS]
    restarted = engine.score(gen, idx)
    for r, (out, margin) in zip(restarted, refs):
        if margin > MARGIN:
            assert r.output == out
    restarted_mc, restarted_ll = engine.score(mc, idx), engine.loglikelihoods(rows)
    engine.load_weights(*weights_of(tiny_model(0)))             # the 2-layer A, padded with an identity layer
    assert engine.restarts == 1
    a_in_restarted = engine.score(gen, idx)
    engine.close()                 # closing an in-process engine tears down vLLM's process-wide state

    padded = VLLMBackend(dirs["b"], device="cpu", tasks=[gen, mc], layer_capacity=4)
    try:
        assert padded.restarts == 0 and padded.capacity == 4
        # the default context: the tasks' longest request (+ a little), within max_position_embeddings
        longest = max(longest_request(t, padded._encode, padded.tokenizer.eos_token_id) for t in (gen, mc))
        assert longest < padded.engine_options["max_model_len"] <= min(128, longest + 24)
        padded.load_weights(*weights_of(deeper))
        assert [(r.output, r.score) for r in padded.score(gen, idx)] == [(r.output, r.score) for r in restarted]
        assert [r.output for r in padded.score(mc, idx)] == [r.output for r in restarted_mc]
        assert padded.loglikelihoods(rows) == pytest.approx(restarted_ll, abs=1e-5)
        padded.load_weights(*weights_of(tiny_model(0)))
        assert [r.output for r in padded.score(gen, idx)] == [r.output for r in a_in_restarted]
        assert padded.restarts == 0
    finally:
        padded.close()

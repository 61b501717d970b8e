"""Genome spaces: a vector decodes deterministically into a plan the engine merges as specified."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.io.synthetic import make_tiny_llama
from evomerge.merge.engine import SourceSet, merge, output_config
from evomerge.search.genome import (
    MERGED,
    StagedPlan,
    build_space,
    merge_plan,
    parse_genome_config,
    plan_from_dict,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
L = 4  # layers of the test models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("genome_models")
    base = make_tiny_llama(root / "base", num_layers=L, hidden_size=32, seed=1)
    a = make_tiny_llama(root / "a", base=base, noise=0.02, seed=2)
    b = make_tiny_llama(root / "b", base=base, noise=0.02, seed=3)
    return {"base": base, "a": a, "b": b}


@pytest.fixture(scope="module")
def sources(models):
    return SourceSet.load(models)


def sample(space, seed=0):
    return space.random(np.random.default_rng(seed))


# -- the box and decoding ------------------------------------------------------------------------

ALL_KINDS = [
    {"method": "ties", "granularity": "layer", "per_module": True, "separate": ["embed", "norm", "lm_head"]},
    {"method": "dare_ties", "granularity": "block:3"},
    {"method": "della"},
    {"method": "breadcrumbs", "granularity": "layer"},
    {"method": "task_arithmetic", "granularity": "block:2", "per_module": True},
    {"method": "linear", "granularity": "layer"},
    {"kind": "layer_swap"},
    {"kind": "data_flow", "repetitions": 2, "scaling": "transition"},
    {"kind": "data_flow", "repetitions": 3, "scaling": "slot", "max_layers": 5},
    {"kind": "combined", "parameter": {"method": "ties", "granularity": "layer"},
     "data_flow": {"repetitions": 1, "scaling": "slot"}},
]


@pytest.mark.parametrize("cfg", ALL_KINDS, ids=lambda c: c.get("kind", c.get("method")))
def test_decode_is_deterministic_and_clips_to_bounds(cfg):
    space = build_space(cfg, ["base", "a", "b"], "base", L)
    assert space.dim == len(space.names) == len(space.lower) == len(space.upper) == len(space.integer)
    assert np.all(space.lower <= space.upper)
    x = sample(space)
    first = space.decode(x).to_dict()
    assert space.decode(x.copy()).to_dict() == first
    # Out-of-box genes decode exactly like their clipped values; integer genes are rounded.
    wild = x + np.where(np.arange(space.dim) % 2 == 0, 10.0, -10.0)
    clipped = np.clip(wild, space.lower, space.upper)
    assert space.decode(wild).to_dict() == space.decode(clipped).to_dict()
    nudged = x.copy()
    nudged[space.integer] += 0.3
    assert space.decode(nudged).to_dict() == first
    # The stored dict round-trips into the same plan kind.
    assert plan_from_dict(first).to_dict() == first
    assert isinstance(space.describe(x), dict)


def test_wrong_genome_length_is_an_error():
    space = build_space({"method": "ties"}, ["base", "a", "b"], "base", L)
    with pytest.raises(ConfigError, match="genome has 3 genes, the space expects 4"):
        space.decode(np.zeros(3))


@pytest.mark.parametrize("cfg, message", [
    ({"method": "ties", "weight": [1.0, 0.0]}, "genome.weight: lower bound 1.0 is above upper bound 0.0"),
    ({"method": "ties", "density": [0.2, 1.5]}, "genome.density: must lie within [0, 1]"),
    ({"method": "ties", "granularity": "block:0"}, "genome.granularity: must be 'model', 'layer' or 'block:N'"),
    ({"method": "nope"}, "genome.method: unknown merge method 'nope' (registered: linear, "),
    ({"method": "ties", "wieght": [0, 1]}, "genome.wieght: unknown field"),
    ({"kind": "data_flow", "scale": [0.0, 2.0]}, "genome.scale: scales must be positive"),
    ({"kind": "data_flow", "repetitions": 0}, "genome.repetitions"),
    ({"kind": "combined", "parameter": {"method": "ties", "t": [1, 0]}, "data_flow": {}},
     "genome.parameter.t: lower bound 1.0 is above upper bound 0.0"),
    ({"kind": "layer_swap", "sources": ["a", "zzz"]}, "genome.sources: 'zzz' is not one of the sources"),
])
def test_config_errors_are_one_line_and_name_the_field(cfg, message):
    with pytest.raises(ConfigError) as exc:
        build_space(cfg, ["base", "a", "b"], "base", L)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_methods_that_need_a_base_refuse_to_build_without_one():
    with pytest.raises(ConfigError, match="genome.method: ties needs a base model"):
        build_space({"method": "ties"}, ["a", "b"], None, L)
    with pytest.raises(ConfigError, match="slerp merges the base with exactly one source"):
        build_space({"method": "slerp"}, ["base", "a", "b"], "base", L)


def test_default_kind_is_parameter():
    assert parse_genome_config({"method": "ties"}).kind == "parameter"


# -- parameter space: genes land on the layers they name ----------------------------------------

def test_per_layer_genes_are_exact_per_layer_coefficients(models, sources):
    cfg = {"method": "task_arithmetic", "granularity": "layer", "per_module": True,
           "separate": ["embed", "norm", "lm_head"], "weight": [-0.5, 1.5]}
    space = build_space(cfg, ["base", "a", "b"], "base", L)
    assert space.dim == 2 * (2 * L + 3)  # two models x (attn + mlp per layer, embed, norm, head)
    x = sample(space, seed=7)
    genes = space.describe(x)["genes"]
    out = merge(space.decode(x), sources)
    T = {m: {n: sources.tensor(m, n) for n in sources.checkpoints[m].tensor_names} for m in ("base", "a", "b")}

    def expected(name, wa, wb):
        return T["base"][name] + wa * (T["a"][name] - T["base"][name]) + wb * (T["b"][name] - T["base"][name])

    for i in range(L):
        for module, tensor in (("attn", "self_attn.q_proj"), ("attn", "self_attn.o_proj"),
                               ("mlp", "mlp.down_proj"), ("mlp", "mlp.gate_proj")):
            name = f"model.layers.{i}.{tensor}.weight"
            want = expected(name, genes[f"weight[a].{module}.g{i}"], genes[f"weight[b].{module}.g{i}"])
            torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6)
        norm = f"model.layers.{i}.input_layernorm.weight"
        torch.testing.assert_close(out[norm], expected(norm, genes["weight[a].norm"], genes["weight[b].norm"]),
                                   rtol=0, atol=1e-6)
    for name, part in (("model.embed_tokens.weight", "embed"), ("lm_head.weight", "lm_head"),
                       ("model.norm.weight", "norm")):
        torch.testing.assert_close(out[name], expected(name, genes[f"weight[a].{part}"], genes[f"weight[b].{part}"]),
                                   rtol=0, atol=1e-6)


def test_block_granularity_shares_one_gene_per_block(sources):
    space = build_space({"method": "linear", "granularity": "block:3"}, ["a", "b"], None, L)
    assert space.dim == 2 * 2  # blocks {0,1,2} and {3}
    x = np.array([0.2, 0.9, 0.7, 0.1])  # weight[a].g0, weight[a].g1, weight[b].g0, weight[b].g1
    out = merge(space.decode(x), sources)
    for i, (wa, wb) in enumerate([(0.2, 0.7)] * 3 + [(0.9, 0.1)]):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        want = (wa * sources.tensor("a", name) + wb * sources.tensor("b", name)) / (wa + wb)
        torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6)


def test_slerp_per_layer_t(sources):
    space = build_space({"method": "slerp", "granularity": "layer"}, ["base", "a"], "base", L)
    x = np.array([0.0, 1.0, 0.0, 1.0])
    out = merge(space.decode(x), sources)
    for i in range(L):
        name = f"model.layers.{i}.self_attn.v_proj.weight"
        torch.testing.assert_close(out[name], sources.tensor("a" if i % 2 else "base", name), rtol=0, atol=1e-6)


def test_della_epsilon_is_kept_inside_the_densities_room(sources):
    space = build_space({"method": "della", "density": [0.05, 0.95], "epsilon": [0.0, 0.2]},
                        ["base", "a", "b"], "base", L)
    x = space.upper.copy()
    x[space.names.index("density[a]")] = 0.06  # epsilon 0.2 would push density - epsilon below 0
    plan = space.decode(x)
    eps = plan.models[0].parameters["epsilon"]
    assert 0 < eps < 0.06
    merge(plan, sources)  # the engine accepts it


# -- layer swap ------------------------------------------------------------------------------------

def test_layer_swap_takes_each_layer_from_the_chosen_source(sources):
    space = build_space({"kind": "layer_swap"}, ["a", "b"], "base", L)
    assert space.integer.all() and space.dim == L
    x = np.array([2, 0, 1, 2])  # choices are [base, a, b]
    out = merge(space.decode(x), sources)
    assert space.describe(x)["layers"] == ["b", "base", "a", "b"]
    for i, src in enumerate(["b", "base", "a", "b"]):
        for suffix in ("self_attn.k_proj.weight", "mlp.up_proj.weight", "post_attention_layernorm.weight"):
            name = f"model.layers.{i}.{suffix}"
            assert torch.equal(out[name], sources.tensor(src, name))
    # mergekit's rule: embeddings from the first layer's source, head from the last layer's
    assert torch.equal(out["model.embed_tokens.weight"], sources.tensor("b", "model.embed_tokens.weight"))
    assert torch.equal(out["lm_head.weight"], sources.tensor("b", "lm_head.weight"))



def test_embed_from_pins_embeddings_norm_and_head_to_one_source_without_adding_layers(sources):
    space = build_space({"kind": "layer_swap", "embed_from": "a"}, ["a", "b"], "base", L)
    x = np.array([2, 2, 0, 2])  # choices are [base, a, b]: no layer of a
    plan = space.decode(x)
    assert plan.slices[0].sources[0].layer_range == (0, 0) and plan.slices[-1].sources[0].layer_range == (0, 0)
    assert plan.tokenizer_source == "a"
    out = merge(plan, sources)
    assert output_config(plan, sources)["num_hidden_layers"] == L
    assert not any(n.startswith(f"model.layers.{L}.") for n in out)
    for i, src in enumerate(["b", "b", "base", "b"]):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(out[name], sources.tensor(src, name))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[name], sources.tensor("a", name)), name
        assert not torch.equal(out[name], sources.tensor("b", name)), name


def test_embed_from_in_a_data_flow_space_and_its_errors(sources):
    space = build_space({"kind": "data_flow", "repetitions": 1, "scaling": "none", "embed_from": "base"},
                        ["a", "b"], "base", L)
    x = np.zeros(space.dim)
    x[space.names.index("slot4.include")] = 1   # the collection is [base, a, b]: slot 4 is a's layer 0
    out = merge(space.decode(x), sources)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], sources.tensor("a", "model.layers.0.self_attn.q_proj.weight"))
    assert not any(n.startswith("model.layers.1.") for n in out)
    assert torch.equal(out["lm_head.weight"], sources.tensor("base", "lm_head.weight"))
    with pytest.raises(ConfigError, match=r"genome.embed_from: 'zzz' is not one of the sources"):
        build_space({"kind": "layer_swap", "embed_from": "zzz"}, ["a", "b"], "base", L)
    from evomerge.merge.plan import MergePlan

    with pytest.raises(ConfigError, match=r"slices: every slice is empty"):   # empty slices alone: no model
        MergePlan.from_dict({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 0]}]}]})


# -- data flow -----------------------------------------------------------------------------------

def test_data_flow_layer_count_and_cap(sources):
    space = build_space({"kind": "data_flow", "repetitions": 2, "scaling": "none", "max_layers": 6},
                        ["a", "b"], None, L)
    M = 2 * L
    assert space.dim == 2 * M  # inclusion genes only
    x = np.zeros(space.dim)
    x[[0, 1, 5, 9, 12]] = 1  # slots -> a:0, a:1, b:1, a:1, b:0
    plan = space.decode(x)
    assert space.describe(x)["layers"] == ["a:0", "a:1", "b:1", "a:1", "b:0"]
    out = merge(plan, sources)
    assert output_config(plan, sources)["num_hidden_layers"] == 5
    for k, (src, layer) in enumerate([("a", 0), ("a", 1), ("b", 1), ("a", 1), ("b", 0)]):
        name = f"model.layers.{k}.mlp.gate_proj.weight"
        assert torch.equal(out[name], sources.tensor(src, f"model.layers.{layer}.mlp.gate_proj.weight"))
    assert not any(n.startswith("model.layers.5.") for n in out)
    # The cap keeps the first max_layers included slots; nothing included keeps slot 0.
    assert space.decode(np.ones(space.dim)).to_dict()["slices"].__len__() == 6
    assert space.describe(np.zeros(space.dim))["layers"] == ["a:0"]


def _run_with_residual_scaling(model, ids, scales: dict[int, float]):
    """Logits with the residual stream entering layer k multiplied by scales[k] (the data-flow op)."""
    def hook_for(s):
        def hook(module, args, kwargs):
            if args:
                return (args[0] * s, *args[1:]), kwargs
            kwargs["hidden_states"] = kwargs["hidden_states"] * s
            return args, kwargs
        return hook

    handles = [model.model.layers[k].register_forward_pre_hook(hook_for(s), with_kwargs=True)
               for k, s in scales.items()]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def _set_norm_eps(model, eps: float) -> None:
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = eps


def test_data_flow_scales_fold_into_o_proj_and_down_proj(models, sources, tmp_path):
    """Scaling the stream into layer k == dividing o_proj/down_proj of layers >= k (RMSNorm invariance)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    space = build_space({"kind": "data_flow", "repetitions": 1, "scaling": "slot", "scale": [0.25, 4.0]},
                        ["a"], None, L)
    x = np.zeros(space.dim)
    x[[space.names.index(f"slot{t}.include") for t in range(L)]] = 1
    slot_scales = [3.0, 0.5, 2.5, 0.3]  # the first layer's input scale is dropped (a no-op)
    for t, s in enumerate(slot_scales):
        x[space.names.index(f"slot{t}.scale")] = s
    plan = space.decode(x)
    assert space.describe(x)["per_layer"]["input_scale"] == [1.0, 0.5, 2.5, 0.3]

    folded_weights = merge(plan, sources)
    config = LlamaConfig(**output_config(plan, sources))
    folded = AutoModelForCausalLM.from_config(config)
    folded.load_state_dict(folded_weights)
    original = AutoModelForCausalLM.from_pretrained(models["a"])
    folded.eval(), original.eval()
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    scales = {1: 0.5, 2: 2.5, 3: 0.3}

    with torch.no_grad():
        plain = original(ids).logits
    # With eps = 0 the norms are exactly scale invariant: equal up to float rounding.
    _set_norm_eps(original, 0.0), _set_norm_eps(folded, 0.0)
    with torch.no_grad():
        got = folded(ids).logits
    want = _run_with_residual_scaling(original, ids, scales)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # With the model's own eps the match is up to eps; the scaling itself changes logits far more.
    _set_norm_eps(original, config.rms_norm_eps), _set_norm_eps(folded, config.rms_norm_eps)
    with torch.no_grad():
        got = folded(ids).logits
    want = _run_with_residual_scaling(original, ids, scales)
    err = (got - want).abs().max().item()
    assert err < 0.1 * (want - plain).abs().max().item()


# -- combined ------------------------------------------------------------------------------------

def test_combined_space_merges_then_stacks_the_merged_layers(sources):
    space = build_space({"kind": "combined", "parameter": {"method": "task_arithmetic"},
                         "data_flow": {"sources": [MERGED, "a"], "repetitions": 1, "scaling": "none"}},
                        ["base", "a", "b"], "base", L)
    x = np.zeros(space.dim)
    x[space.names.index("param.weight[a]")] = 0.3
    x[space.names.index("param.weight[b]")] = 0.6
    for t in (0, 1, 4 + 2, 3):  # merged:0, merged:1, merged:3, a:2
        x[space.names.index(f"flow.slot{t}.include")] = 1
    plan = space.decode(x)
    assert isinstance(plan, StagedPlan) and plan.stages[0][0] == MERGED
    assert plan_from_dict(plan.to_dict()).to_dict() == plan.to_dict()

    stage1 = merge(plan.stages[0][1], sources)
    out = merge_plan(plan, sources)
    assert space.describe(x)["data_flow"]["layers"] == ["merged:0", "merged:1", "merged:3", "a:2"]
    for k, (src, layer) in enumerate([("m", 0), ("m", 1), ("m", 3), ("a", 2)]):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        want = stage1[name] if src == "m" else sources.tensor("a", name)
        assert torch.equal(out[f"model.layers.{k}.self_attn.q_proj.weight"], want)
    assert not any(n.startswith("model.layers.4.") for n in out)


def test_a_combined_candidate_merges_its_first_stage_once_and_returns_its_config(sources, monkeypatch):
    from evomerge.merge import engine
    from evomerge.merge.staged import merge_with_config

    space = build_space({"kind": "combined", "parameter": {"method": "task_arithmetic"},
                         "data_flow": {"sources": [MERGED, "a"], "repetitions": 1, "scaling": "none"}},
                        ["base", "a", "b"], "base", L)
    x = np.zeros(space.dim)
    for t in (0, 1, 4 + 2):  # merged:0, merged:1, a:2
        x[space.names.index(f"flow.slot{t}.include")] = 1
    plan = space.decode(x)
    calls = []
    real = engine.iter_merge                       # what engine.merge and the streamed last stage both run
    monkeypatch.setattr(engine, "iter_merge", lambda p, *a, **k: calls.append(p.merge_method) or real(p, *a, **k))
    weights, config = merge_with_config(plan, sources)
    assert calls == ["task_arithmetic", "passthrough"]      # stage 1 once, then the stack over it
    assert config["num_hidden_layers"] == 3 and not any(n.startswith("model.layers.3.") for n in weights)

"""The merge engine on real (tiny) Llama checkpoints made in code."""

import json

import pytest
import torch

from evomerge.errors import CheckpointError, ConfigError, EvomergeError
from evomerge.io.checkpoint import Checkpoint
from evomerge.io.synthetic import make_tiny_llama
from evomerge.merge import methods as M
from evomerge.merge.engine import SourceSet, iter_merge, merge, merge_to_disk, output_config
from evomerge.merge.plan import MergePlan

UP = "model.layers.{}.mlp.up_proj.weight"
Q = "model.layers.{}.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base = make_tiny_llama(root / "base", num_layers=4, seed=0)
    (base / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    a = make_tiny_llama(root / "a", base=base, noise=0.02, seed=1, shards=2)
    b = make_tiny_llama(root / "b", base=base, noise=0.02, seed=2)
    return {"base": base, "a": a, "b": b}


@pytest.fixture(scope="module")
def sources(family):
    return SourceSet.load(family)


def ties_plan(**params):
    return MergePlan.from_dict({"merge_method": "ties", "base_model": "base",
                                "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 0.5}}],
                                "parameters": {"weight": 1.0, "density": 0.4, **params}})


def test_ties_engine_equals_method_per_tensor(sources):
    out = merge(ties_plan(), sources)
    assert set(out) == set(sources.checkpoints["base"].tensor_names)
    for name in (UP.format(2), "model.embed_tokens.weight", "lm_head.weight"):
        want = M.ties(sources.tensor("base", name), [sources.tensor("a", name), sources.tensor("b", name)],
                      [1.0, 0.5], [0.4, 0.4])
        assert torch.equal(out[name], want)


def test_resident_and_lazy_sources_give_identical_merges(family, sources):
    lazy = SourceSet.load(family, resident=False)
    p = ties_plan()
    a, b = merge(p, sources), dict(iter_merge(p, lazy))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_t_per_layer_and_t0_for_embeddings_and_head(sources):
    p = MergePlan.from_dict({"merge_method": "slerp", "base_model": "base",
                             "models": [{"model": "base"}, {"model": "a"}],
                             "parameters": {"t": [{"filter": "self_attn", "value": 0.5}, {"value": [0, 1]}]}})
    out = merge(p, sources)
    for layer in range(4):  # mlp follows the gradient: t = layer / 3
        want = M.slerp(layer / 3, sources.tensor("base", UP.format(layer)), sources.tensor("a", UP.format(layer)))
        assert torch.allclose(out[UP.format(layer)], want)
        want = M.slerp(0.5, sources.tensor("base", Q.format(layer)), sources.tensor("a", Q.format(layer)))
        assert torch.allclose(out[Q.format(layer)], want)
    assert torch.equal(out["lm_head.weight"], sources.tensor("base", "lm_head.weight"))
    assert torch.equal(out["model.embed_tokens.weight"], sources.tensor("base", "model.embed_tokens.weight"))


def test_per_model_parameters_override_global(sources):
    p = MergePlan.from_dict({"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 3.0}]}}, {"model": "b"}],
        "parameters": {"weight": 1.0, "normalize": False}})
    out = merge(p, sources)
    mlp, attn = UP.format(1), Q.format(1)
    assert torch.allclose(out[mlp], 3 * sources.tensor("a", mlp) + sources.tensor("b", mlp))
    assert torch.allclose(out[attn], sources.tensor("a", attn) + sources.tensor("b", attn))


def test_passthrough_stacking_reorders_repeats_and_adjusts_config(family, sources, tmp_path):
    p = MergePlan.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}]},
        {"sources": [{"model": "b", "layer_range": [1, 2]}]},
        {"sources": [{"model": "b", "layer_range": [1, 4], "parameters": {"scale": [
            {"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.5}]}}]},
    ]})
    assert output_config(p, sources)["num_hidden_layers"] == 6
    out_dir = merge_to_disk(p, sources, tmp_path / "stack", tokenizer_from=family["base"], max_shard_size=20_000)
    ck = Checkpoint(out_dir)
    assert ck.num_layers == 6 and json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 6
    assert (out_dir / "model.safetensors.index.json").is_file()
    assert (out_dir / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    sources_order = [("a", 0), ("a", 1), ("b", 1), ("b", 1), ("b", 2), ("b", 3)]
    for out_layer, (model, layer) in enumerate(sources_order):
        assert torch.equal(ck.get(UP.format(out_layer)), sources.tensor(model, UP.format(layer)))
        o = "model.layers.{}.self_attn.o_proj.weight"
        scale = 0.5 if out_layer >= 3 else 1.0
        assert torch.allclose(ck.get(o.format(out_layer)), scale * sources.tensor(model, o.format(layer)))
    assert torch.equal(ck.get("lm_head.weight"), sources.tensor("b", "lm_head.weight"))  # last slice
    assert torch.equal(ck.get("model.embed_tokens.weight"), sources.tensor("a", "model.embed_tokens.weight"))
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out_dir)
    assert len(model.model.layers) == 6


def test_layer_swap_takes_each_layer_whole(sources):
    choice = ["a", "b", "b", "base"]
    p = MergePlan.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": m, "layer_range": [i, i + 1]}]} for i, m in enumerate(choice)]})
    out = merge(p, sources)
    for i, m in enumerate(choice):
        assert out[UP.format(i)] is sources.tensor(m, UP.format(i))  # resident tensors are shared, not copied


def test_dtype_casts_inputs_and_output(sources):
    out = merge(ties_plan().model_copy(update={"dtype": "bfloat16"}), sources)
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert output_config(ties_plan().model_copy(update={"dtype": "bfloat16"}), sources)["torch_dtype"] == "bfloat16"


def test_dare_is_reproducible_with_a_seed(sources):
    p = MergePlan.from_dict({"merge_method": "dare_ties", "base_model": "base", "random_seed": 7,
                             "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 1, "density": 0.3}})
    x, y = merge(p, sources), merge(p, sources)
    z = merge(p.model_copy(update={"random_seed": 8}), sources)
    name = UP.format(0)
    assert torch.equal(x[name], y[name]) and not torch.equal(x[name], z[name])


def test_mismatched_shapes_name_tensor_and_both_models(family, tmp_path):
    wide = make_tiny_llama(tmp_path / "wide", num_layers=4, intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"shape mismatch for tensor model\.layers\.\*\.mlp\..*base.*wide"):
        SourceSet.load({"base": family["base"], "wide": wide})


def test_plan_problems_found_before_writing(sources, tmp_path):
    out = tmp_path / "never"
    bad_model = MergePlan.from_dict({"merge_method": "linear", "models": [{"model": "zzz"}],
                                     "parameters": {"weight": 1}})
    with pytest.raises(ConfigError, match="model 'zzz'"):
        merge_to_disk(bad_model, sources, out)
    too_deep = MergePlan.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [2, 9]}]}]})
    with pytest.raises(ConfigError, match=r"beyond the 4 layers of a"):
        merge_to_disk(too_deep, sources, out)
    no_weight = MergePlan.from_dict({"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}]})
    with pytest.raises(ConfigError, match="needs parameter 'weight' for model a"):
        merge_to_disk(no_weight, sources, out)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_merge_leaves_no_output(sources, tmp_path):
    # weights cancel only on mlp tensors: found while running, after earlier tensors were written
    p = MergePlan.from_dict({"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": -1.0}, {"value": 1.0}]}},
        {"model": "b"}], "parameters": {"weight": 1.0}})
    with pytest.raises(EvomergeError, match=r"linear failed on tensor model\.layers\.0\.mlp"):
        merge_to_disk(p, sources, tmp_path / "half")
    assert list(tmp_path.iterdir()) == []

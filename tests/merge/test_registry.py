"""The method registry: every mergekit 0.1.5 method is one declared object, and plans, the engine
and the genome read the declarations -- a method registered at run time works everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.io.synthetic import make_tiny_llama
from evomerge.merge import methods as M
from evomerge.merge.engine import SourceSet, merge
from evomerge.merge.plan import MergePlan
from evomerge.merge.registry import METHODS, MergeInputs, MergeMethod, Param, register
from evomerge.search.genome import build_space

# mergekit 0.1.5's registry (mergekit/merge_methods/registry.py), all 20 names.
MERGEKIT_0_1_5 = {
    "multislerp", "nearswap", "ram", "ramplus_tl", "sce", "linear", "slerp", "nuslerp", "passthrough",
    "model_stock", "arcee_fusion", "karcher", "task_arithmetic", "ties", "dare_ties", "dare_linear",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    base = make_tiny_llama(root / "base", num_layers=2, seed=0)
    return {"base": str(base), **{n: str(make_tiny_llama(root / n, base=base, noise=0.02, seed=s))
                                  for n, s in (("a", 1), ("b", 2), ("c", 3))}}


@pytest.fixture(scope="module")
def sources(family):
    return SourceSet.load(family)


def test_every_mergekit_0_1_5_method_is_registered_with_typed_declared_parameters():
    assert set(METHODS) == MERGEKIT_0_1_5
    for method in METHODS.values():
        assert method.base in ("required", "optional", "ignored")
        for p in method.params:
            assert p.kind in (float, int, bool) and p.scope in ("shared", "input", "non_base")
            if not p.required and p.default is not None:
                p.validate(p.default, p.name)  # defaults are valid values
            if p.search is not None and p.kind is float:
                p.validate(p.search[0], p.name), p.validate(p.search[1], p.name)
            if p.scope == "non_base":
                assert method.base != "ignored"  # as mergekit: non-base values need a base-aware method


NEW_METHOD_DEFAULTS = {
    "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
    "multislerp": {"normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "sce": {"int8_mask": False, "select_topk": 1.0},
    "nearswap": {},
    "arcee_fusion": {},
    "ram": {"epsilon": 1e-5},
    "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
}


@pytest.mark.parametrize("name", sorted(NEW_METHOD_DEFAULTS))
def test_new_methods_have_mergekits_parameter_names_and_defaults(name):
    declared = {p.name: p.default for p in METHODS[name].params if not p.required}
    assert declared == NEW_METHOD_DEFAULTS[name]
    required = {p.name for p in METHODS[name].params if p.required}
    assert required == {"nuslerp": {"weight"}, "multislerp": {"weight"}, "nearswap": {"t"}}.get(name, set())


def recipe(method, models, base="base", **params):
    d = {"merge_method": method, "models": [{"model": m} for m in models], "parameters": params}
    if base:
        d["base_model"] = base
    return d


@pytest.mark.parametrize("plan, message", [
    (recipe("karcher", ["a"], base=None), r"merge_method karcher needs at least 2 models \(base included\) in models, got 1"),
    (recipe("nearswap", ["base", "a"], base=None, t=0.1), "merge_method nearswap needs a base_model"),
    (recipe("nearswap", ["base", "a"], t=-0.01), r"parameters.t: -0.01 is outside \[0, inf\)"),
    (recipe("nearswap", ["base", "a", "b"], t=0.01), "merge_method nearswap takes at most 2 model"),
    (recipe("sce", ["a", "b"], select_topk=0), r"parameters.select_topk: 0 is outside \(0, 1\]"),
    (recipe("sce", ["a", "b"], select_topk=[0.5, 1.2]), r"parameters.select_topk: 1.2 is outside \(0, 1\]"),
    (recipe("nuslerp", ["a", "b", "c"], weight=1.0), "nuslerp needs exactly 2 model\\(s\\) besides the base in models, got 3"),
    (recipe("karcher", ["a", "b"], base=None, max_iter=2.5), "parameters.max_iter: 2.5 is not an integer"),
    (recipe("karcher", ["a", "b"], base=None, weight=1.0), "unknown parameter 'weight' for merge_method karcher"),
    (recipe("ram", ["a", "b"], epsilon=-1), r"parameters.epsilon: -1 is outside \[0, inf\)"),
    (recipe("ramplus_tl", ["a", "b"], alpha=-0.1), r"parameters.alpha: -0.1 is outside \[0, inf\)"),
    (recipe("arcee_fusion", ["a"], base=None), "merge_method arcee_fusion needs a base_model"),
    (recipe("multislerp", ["a"], normalize_weights="maybe", weight=1), "normalize_weights: 'maybe' is not a boolean"),
])
def test_bad_recipes_for_the_new_methods_are_one_line_errors_naming_the_parameter(plan, message):
    with pytest.raises(ConfigError, match=message) as err:
        MergePlan.from_dict(plan)
    assert "\n" not in str(err.value)


def test_a_missing_required_parameter_names_the_parameter_and_model(sources):
    plan = MergePlan.from_dict(recipe("nuslerp", ["a", "b"], base=None))
    with pytest.raises(ConfigError, match="merge_method nuslerp needs parameter 'weight' for model a"):
        merge(plan, sources)
    plan = MergePlan.from_dict(recipe("nearswap", ["base", "a"], t=[{"filter": "mlp", "value": 0.1}]))
    with pytest.raises(ConfigError, match=r"nearswap needs parameter 't' \(tensor model.embed_tokens.weight\)"):
        merge(plan, sources)


def test_the_cli_refuses_a_bad_new_method_recipe_and_writes_nothing(family, tmp_path, capsys):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "sce", "base_model": family["base"],
                                   "models": [{"model": family["a"]}], "parameters": {"select_topk": 0}}))
    assert cli_main(["merge", str(cfg), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "select_topk: 0 is outside (0, 1]" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, params, per_model", [
    ("nuslerp", {"nuslerp_flatten": False}, {"a": {"weight": 0.3}, "b": {"weight": 0.6}}),
    ("multislerp", {}, {"a": {"weight": 0.3}, "b": {"weight": 0.6}, "c": {"weight": 0.1}}),
    ("karcher", {"max_iter": 5}, {}),
    ("sce", {"select_topk": 0.4}, {}),
    ("nearswap", {"t": 0.01}, {}),
    ("arcee_fusion", {}, {}),
    ("ram", {"epsilon": 0.02}, {}),
    ("ramplus_tl", {"epsilon": 0.02, "r": 0.5}, {}),
])
def test_the_engine_runs_each_new_method_as_its_kernel_per_tensor(sources, name, params, per_model):
    method = METHODS[name]
    models = list(per_model) or (["a"] if method.max_non_base == 1 else ["a", "b", "c"])
    base = None if method.base == "ignored" else "base"
    plan = {"merge_method": name, "models": [{"model": m, "parameters": per_model.get(m, {})} for m in models],
            "parameters": params}
    if base:
        plan["base_model"] = base
    out = merge(MergePlan.from_dict(plan), sources)
    key = "model.layers.1.mlp.up_proj.weight"
    xs = {m: sources.tensor(m, key) for m in ["base", *models]}
    inputs = [xs[m] for m in models]
    expected = {
        "nuslerp": lambda: M.nuslerp(0.6 / 0.9, xs["a"] - xs["base"], xs["b"] - xs["base"], flatten=False) + xs["base"],
        "multislerp": lambda: M.multislerp(inputs, [0.3, 0.6, 0.1], xs["base"]),
        "karcher": lambda: M.karcher(inputs, max_iter=5),
        "sce": lambda: M.sce(xs["base"], inputs, select_topk=0.4),
        "nearswap": lambda: M.nearswap(xs["base"], xs["a"], 0.01),
        "arcee_fusion": lambda: M.arcee_fusion(xs["base"], xs["a"]),
        "ram": lambda: M.ram(xs["base"], inputs, epsilon=0.02),
        "ramplus_tl": lambda: M.ram(xs["base"], inputs, epsilon=0.02, r=0.5, alpha=0.2),
    }[name]()
    assert torch.allclose(out[key], expected, atol=1e-6)
    assert not torch.equal(out[key], xs["base"]) and not torch.equal(out[key], xs[models[0]])


# -- the worked example of docs/adding-a-merge-method.md -----------------------------------

def trimmed_mean(tensors: list[torch.Tensor], trim: float) -> torch.Tensor:
    """Entry by entry, drop the ``trim`` share of the largest and of the smallest values, average the rest."""
    stacked = torch.stack([t.float() for t in tensors]).sort(dim=0).values
    cut = int(trim * len(tensors))
    return stacked[cut:len(tensors) - cut].mean(dim=0)


TRIMMED_MEAN = MergeMethod(
    "trimmed_mean",
    (Param("trim", float, "shared", 0.25, low=0.0, high=0.5, high_open=True, search=(0.0, 0.45)),),
    lambda x: trimmed_mean(x.tensors, x.shared["trim"]),
    base="ignored", min_inputs=3,
    summary="entry-wise trimmed mean of the models")


@pytest.fixture
def with_trimmed_mean():
    register(TRIMMED_MEAN)
    yield TRIMMED_MEAN
    del METHODS["trimmed_mean"]


def test_a_method_registered_at_run_time_is_validated_merged_and_searchable(with_trimmed_mean, sources):
    with pytest.raises(ConfigError, match=r"parameters.trim: 0.5 is outside \[0, 0.5\)"):
        MergePlan.from_dict({"merge_method": "trimmed_mean", "models": [{"model": m} for m in "abc"],
                             "parameters": {"trim": 0.5}})
    with pytest.raises(ConfigError, match="needs at least 3 models"):
        MergePlan.from_dict({"merge_method": "trimmed_mean", "models": [{"model": "a"}]})
    space = build_space({"method": "trimmed_mean", "granularity": "layer"}, ["base", "a", "b", "c"], None, 2)
    assert space.names == ["trim.g0", "trim.g1"]
    plan = space.decode(np.array([0.3, 0.0]))
    assert plan.parameters == {"trim": [0.3, 0.0]}
    out = merge(plan, sources)
    key = "model.layers.0.self_attn.q_proj.weight"  # layer 0: trim 0.3 of 4 models drops 1 from each end
    xs = [sources.tensor(m, key) for m in ("base", "a", "b", "c")]
    assert torch.allclose(out[key], torch.stack(xs).sort(dim=0).values[1:3].mean(dim=0))
    last = "model.layers.1.self_attn.q_proj.weight"  # layer 1: trim 0 is the plain mean
    assert torch.allclose(out[last], torch.stack([sources.tensor(m, last) for m in ("base", "a", "b", "c")]).mean(0))


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(METHODS["ties"])


def test_merge_inputs_split_base_and_others():
    x = MergeInputs([torch.zeros(1), torch.ones(1), 2 * torch.ones(1)], 1, {}, [{"w": 1}, {}, {"w": 3}])
    assert torch.equal(x.base, torch.ones(1)) and [float(t) for t in x.others] == [0.0, 2.0]
    assert x.values("w") == [1, 3]


def test_the_benchmark_has_a_valid_recipe_for_every_registered_method():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_merge.py"
    spec = importlib.util.spec_from_file_location("bench_merge", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.RECIPES) == set(METHODS)
    for name, recipe in bench.RECIPES.items():
        assert MergePlan.from_dict(recipe).merge_method == name

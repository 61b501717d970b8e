"""MergePlan: mergekit's schema, parameter resolution, and one-line errors."""

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.registry import METHODS
from evomerge.merge.plan import MergePlan, evaluate_setting, resolve


def plan(**kw):
    d = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}],
         "parameters": {"weight": 1.0, "density": 0.5}}
    d.update(kw)
    return MergePlan.from_dict(d)


def test_gradient_is_interpolated_over_relative_layer_position():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate_setting([1, 2, 5], "x", 0.75) == pytest.approx(3.5)  # halfway between 2 and 5
    assert evaluate_setting([1, 2, 5], "x", 1.0) == 5
    assert evaluate_setting(["1e-1", 0.3], "x", 0.5) == pytest.approx(0.2)  # YAML strings become numbers


def test_filters_first_match_wins_and_unmatched_falls_through():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0, 1]}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.norm.weight", 0.5) == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "lm_head.weight", 0) is None
    density = METHODS["ties"].param("density")
    scopes = [{"density": [{"filter": "mlp", "value": 0.2}]}, {"density": 0.7}]
    assert resolve(density, scopes, "model.layers.0.mlp.up_proj.weight", 0) == 0.2
    assert resolve(density, scopes, "model.layers.0.self_attn.q_proj.weight", 0) == 0.7  # global
    assert resolve(density, [{}, {}], "x", 0) == 1.0  # mergekit's default


def test_round_trip_to_mergekit_dict():
    p = plan(models=[{"model": "a", "parameters": {"weight": [0, 1]}}, {"model": "b"}], dtype="bfloat16")
    d = p.to_dict()
    assert d["models"] == [{"model": "a", "parameters": {"weight": [0, 1]}}, {"model": "b"}]
    assert MergePlan.from_dict(d) == p
    assert MergePlan.from_dict(__import__("yaml").safe_load(p.to_yaml())) == p


@pytest.mark.parametrize("change, message", [
    ({"merge_method": "frobnicate"}, "unknown merge_method 'frobnicate'"),
    ({"parameters": {"weight": 1.0, "density": 1.5}}, r"parameters.density: 1.5 is outside \[0, 1\]"),
    ({"parameters": {"weight": 1.0, "densty": 0.5}}, "unknown parameter 'densty'"),
    ({"merge_method": "slerp", "models": [{"model": "base"}, {"model": "a"}], "parameters": {"t": -0.2}},
     r"t: -0.2 is outside \[0, 1\]"),
    ({"merge_method": "slerp", "models": [{"model": "base"}, {"model": "a"}],
      "parameters": {"t": [0, {"filter": "x", "value": 2}]}}, "a list must be all numbers"),
    ({"base_model": None}, "needs a base_model"),
    ({"modules": {}}, "'modules'"),
    ({"tokenizer": {"source": "base"}}, "'tokenizer'"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"models": [{"model": "a", "weight": 1}]}, "merge plan: models.0.weight: unknown field"),
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, "exactly one of 'models' or 'slices'"),
    ({"merge_method": "model_stock", "models": [{"model": "a"}], "parameters": {}}, "at least 3 models"),
    ({"merge_method": "della", "parameters": {"weight": 1, "density": 0.9, "epsilon": 0.2}}, "epsilon"),
])
def test_bad_plans_are_one_line_errors_naming_the_field(change, message):
    with pytest.raises(ConfigError, match=message) as err:
        plan(**change)
    assert "\n" not in str(err.value)


def test_slices_need_equal_lengths_and_valid_ranges():
    with pytest.raises(ConfigError, match="same number of layers"):
        MergePlan.from_dict({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5}, "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}]})
    with pytest.raises(ConfigError, match="layer_range"):
        MergePlan.from_dict({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [3, 1]}]}]})
    with pytest.raises(ConfigError, match="at most 1"):
        MergePlan.from_dict({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 1]}, {"model": "b", "layer_range": [0, 1]}]}]})


def test_from_yaml_reports_the_file(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: bogus: unknown field"):
        MergePlan.from_yaml(f)
    with pytest.raises(ConfigError, match="cannot read merge config"):
        MergePlan.from_yaml(tmp_path / "missing.yaml")

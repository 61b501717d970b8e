"""Every example recipe in configs/mergekit/ parses and merges with evomerge.

The recipes name their models `base`, `ft_a`, `ft_b`, `ft_c`; here those become tiny
Llama checkpoints made in code (a base and three noisy fine-tunes of it). The exact
agreement with mergekit is checked by scripts/crosscheck_mergekit.py, which needs
mergekit's own venv; these tests need only evomerge.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.io.synthetic import make_tiny_llama
from evomerge.merge.engine import SourceSet, merge, output_config
from evomerge.merge.plan import MergePlan

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "mergekit"
RECIPES = sorted(CONFIG_DIR.glob("*.yaml"))
NUM_LAYERS = 4
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    paths = {"base": make_tiny_llama(root / "base", num_layers=NUM_LAYERS, hidden_size=32,
                                     intermediate_size=64, vocab_size=64, seed=1)}
    for seed, name in enumerate(("ft_a", "ft_b", "ft_c"), start=2):
        paths[name] = make_tiny_llama(root / name, base=paths["base"], noise=0.01, seed=seed)
    return paths


@pytest.fixture(scope="module")
def sources(models) -> SourceSet:
    return SourceSet.load({str(p): p for p in models.values()})


def with_paths(node, models: dict[str, Path]):
    if isinstance(node, dict):
        return {k: (str(models[v]) if k in ("model", "base_model") and v in models else with_paths(v, models))
                for k, v in node.items()}
    if isinstance(node, list):
        return [with_paths(v, models) for v in node]
    return node


def expected_layers(recipe: dict) -> list[tuple[str, int]]:
    """(model placeholder, source layer) for each output layer, per mergekit's slice rules."""
    if "slices" not in recipe:
        return [(None, i) for i in range(NUM_LAYERS)]
    out = []
    for sl in recipe["slices"]:
        src = sl["sources"][0]
        lo, hi = src["layer_range"]
        out += [(src["model"], i) for i in range(lo, hi)]
    return out


def test_there_are_recipes_for_every_method():
    methods = {yaml.safe_load(p.read_text())["merge_method"] for p in RECIPES}
    assert methods >= {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della",
                       "della_linear", "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock",
                       "passthrough"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_merges(path: Path, models, sources):
    recipe = yaml.safe_load(path.read_text())
    plan = MergePlan.from_dict(with_paths(recipe, models), source=str(path))
    # The plan round-trips through its mergekit-compatible dict.
    assert MergePlan.from_dict(plan.to_dict()) == plan

    weights = merge(plan, sources)
    layers = expected_layers(recipe)
    config = output_config(plan, sources)
    assert config["num_hidden_layers"] == len(layers)

    ref = sources.checkpoints[str(models["base"])]
    per_layer = {LAYER.match(n).group(2) for n in ref.tensor_names if LAYER.match(n)}
    expected_names = {n for n in ref.tensor_names if not LAYER.match(n)}
    expected_names |= {f"model.layers.{i}.{s}" for i in range(len(layers)) for s in per_layer}
    assert set(weights) == expected_names

    dtype = getattr(torch, recipe.get("dtype", "float32"))
    for name, tensor in weights.items():
        m = LAYER.match(name)
        src_name = f"model.layers.{layers[int(m.group(1))][1]}.{m.group(2)}" if m else name
        assert tensor.shape == ref.shape(src_name), name
        assert tensor.dtype == dtype, name
        assert torch.isfinite(tensor.float()).all(), name

    if recipe["merge_method"] == "passthrough":
        # Each output layer is its source layer, whole (times a per-tensor scale, if any).
        for name, tensor in weights.items():
            m = LAYER.match(name)
            if not m:
                continue
            model, src_layer = layers[int(m.group(1))]
            src = sources.tensor(str(models[model]), f"model.layers.{src_layer}.{m.group(2)}").to(dtype)
            ratio = tensor.float() / src.float()
            assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-5), name
            if "scale" not in path.read_text() or not name.endswith(("o_proj.weight", "down_proj.weight")):
                assert torch.equal(tensor, src), name


def test_every_registered_method_has_an_example_recipe_for_the_crosscheck():
    from evomerge.merge.registry import METHODS

    covered = {yaml.safe_load(p.read_text())["merge_method"] for p in RECIPES}
    assert set(METHODS) <= covered, sorted(set(METHODS) - covered)

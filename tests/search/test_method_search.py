"""Every registered merge method is searchable: `genome.method: NAME` runs a real (tiny) search,
its candidates export, and re-merging the exported mergekit YAML gives the exported tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main as cli_main
from evomerge.io.synthetic import make_tiny_llama
from evomerge.merge.registry import METHODS
from evomerge.search.export import load_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# passthrough copies one model: its searches are the layer-swap and data-flow spaces.
SEARCHES = [(name, {"method": name, "granularity": "block:2"}) for name in METHODS if name != "passthrough"]
SEARCHES.append(("passthrough", {"kind": "layer_swap"}))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    root = tmp_path_factory.mktemp("method_search")
    save_tokenizer(root / "tok")
    vocab = build_tokenizer().get_vocab_size()
    base = make_tiny_llama(root / "base", vocab_size=vocab, num_layers=2, seed=1, tokenizer_from=root / "tok")
    paths = {"base": str(base)} | {n: str(make_tiny_llama(root / n, base=base, noise=0.3, seed=s,
                                                          tokenizer_from=root / "tok"))
                                   for n, s in (("a", 2), ("b", 3))}
    words = ["cat", "dog", "sun", "sea", "red", "blue"]
    rows = [{"id": f"q{i}", "prompt": f"{i} {words[i % 6]} is", "choices": [words[(i + k) % 6] for k in range(3)],
             "answer": words[(i + i % 3) % 6]} for i in range(6)]
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "q.yaml").write_text(yaml.safe_dump({"name": "q", "kind": "multiple_choice", "data": "q.jsonl"}))
    return root, paths


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name, genome", SEARCHES, ids=[n for n, _ in SEARCHES])
def test_each_method_searches_exports_and_its_exported_recipe_re_merges_to_the_same_tensors(zoo, tmp_path, name, genome):
    root, paths = zoo
    method = METHODS[name]
    sources = {k: v for k, v in paths.items() if k in ("base", "a")} if method.max_non_base == 1 else paths
    config = {"seed": 3, "sources": sources, "base": "base", "run_dir": str(tmp_path / "run"), "genome": genome,
              "objectives": [{"name": "q", "task": str(root / "q.yaml")}], "evaluator": {"threads": 1},
              "optimizer": {"name": "random", "population": 3, "generations": 1}, "audit": {"every": 0}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["search", str(tmp_path / "search.yaml")]) == 0

    records = [r for r in load_records(tmp_path / "run") if r.generation >= 0]
    assert len(records) == 3 and all(r.status == "ok" for r in records)
    assert {r.plan["merge_method"] for r in records} == {name}
    dim = len(records[0].genome)
    assert dim == 0 or len({tuple(r.genome) for r in records}) > 1  # the search varied the genes

    base = tensors_of(Path(paths["base"]))
    merged_something = False
    for rec in records:
        out = tmp_path / "export"
        assert cli_main(["export", str(tmp_path / "run"), str(out), "--id", str(rec.candidate_id)]) == 0
        exported = out / f"candidate-{rec.candidate_id}"
        again = tmp_path / f"again-{rec.candidate_id}"
        assert cli_main(["merge", str(exported / "mergekit.yaml"), str(again)]) == 0
        want, got = tensors_of(exported), tensors_of(again)
        assert set(want) == set(got)
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), key
        merged_something |= any(not torch.equal(want[k], base[k]) for k in want)
    assert merged_something  # real merges, not copies of the base


def test_a_method_without_parameters_has_an_empty_genome_that_gradient_free_optimizers_refuse_in_one_line():
    from evomerge.errors import ConfigError
    from evomerge.search.genome import build_space
    from evomerge.search.optimizers import make_optimizer

    space = build_space({"method": "arcee_fusion"}, ["base", "a"], "base", 2)
    assert space.dim == 0
    assert space.decode(space.random(__import__("numpy").random.default_rng(0))).merge_method == "arcee_fusion"
    with pytest.raises(ConfigError, match="optimizer.name: cmaes needs at least one gene"):
        make_optimizer("cmaes", space, 1, seed=0)


@pytest.mark.parametrize("genome, message", [
    ({"method": "nearswap"}, "merges the base with exactly one source, got 2"),
    ({"method": "karcher", "bounds": {"weight": [0, 1]}}, "bounds.weight: merge_method karcher has no parameter 'weight'"),
    ({"method": "sce", "bounds": {"select_topk": [0.0, 1.0]}}, "bounds.select_topk: [0, 1] leaves sce's valid range (0, 1]"),
    ({"method": "passthrough"}, "search its merges with genome.kind: layer_swap or data_flow"),
])
def test_genome_config_errors_for_the_new_methods_are_one_line(genome, message):
    from evomerge.errors import ConfigError
    from evomerge.search.genome import build_space

    with pytest.raises(ConfigError) as err:
        build_space(genome, ["base", "a", "b"], "base", 2)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bounds_make_any_declared_parameter_a_gene():
    from evomerge.search.genome import build_space

    space = build_space({"method": "breadcrumbs", "bounds": {"gamma": [0.0, 0.05], "density": [0.5, 0.9]}},
                        ["base", "a"], "base", 2)
    assert space.names == ["weight[a]", "density[a]", "gamma[a]"]
    assert space.lower.tolist() == [0.0, 0.5, 0.0] and space.upper.tolist() == [1.0, 0.9, 0.05]
    plan = space.decode(__import__("numpy").array([0.5, 0.7, 0.02]))
    assert plan.models[0].parameters == {"weight": 0.5, "density": 0.7, "gamma": 0.02}

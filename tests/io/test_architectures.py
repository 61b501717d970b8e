"""Every registered architecture, on real transformers models: merge, eval, search, export, data-flow fold.

Each architecture is a tiny random model built by transformers from its config class (a
base and two noisy fine-tunes, saved with ``save_pretrained``). The tests run what a user
runs -- the merge engine, ``evomerge eval``, a search per genome kind, ``evomerge export``
-- and check the results against transformers itself: the written models load, the in-place
weight swap gives the logits of the written model, and a data-flow residual scale folded
into the weights gives the logits of scaling the residual stream with forward pre-hooks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main as cli_main
from evomerge.io.architectures import ARCHITECTURES
from evomerge.io.checkpoint import Checkpoint
from evomerge.merge.engine import SourceSet, _layout, merge, merge_to_disk, output_config
from evomerge.merge.plan import MergePlan
from evomerge.search.genome import build_space
from tests.io.tiny_archs import ARCHS, MOE, build_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ["12+7=", "rev:abc=", "tr:KaMi=", "9-3="]


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tmp_path_factory):
    """(model_type, {"base", "a", "b"} -> dir, SourceSet, task yaml) for one architecture."""
    root = tmp_path_factory.mktemp(request.param)
    paths = build_family(request.param, root)
    with open(root / "items.jsonl", "w") as f:
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"id": f"t{i}", "prompt": p, "answer": str(i)}) + "\n")
    (root / "task.yaml").write_text(yaml.safe_dump({"name": "mine", "kind": "generate", "max_new_tokens": 3,
                                                    "data": "items.jsonl"}))
    sources = SourceSet.load({k: str(v) for k, v in paths.items()})
    return request.param, paths, sources, root / "task.yaml"


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _from_weights(config: dict, weights: dict, arch):
    """A transformers model built from ``config`` holding exactly ``weights`` (checkpoint names)."""
    from transformers import AutoModelForCausalLM

    from evomerge.backends.hf import _config_object

    model = AutoModelForCausalLM.from_config(_config_object(config)).eval()
    runtime = arch.to_runtime(weights)
    tied = {t for t, _ in arch.tied}
    missing, unexpected = model.load_state_dict(runtime, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= tied, missing
    return model


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 6), generator=torch.Generator().manual_seed(seed))


PLANS = {
    "linear": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.3}},
                                                    {"model": "b", "parameters": {"weight": 0.7}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base",
                        "models": [{"model": "a", "parameters": {"weight": 0.5}},
                                   {"model": "b", "parameters": {"weight": 0.3}}]},
    "ties": {"merge_method": "ties", "base_model": "base",
             "models": [{"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
                        {"model": "b", "parameters": {"weight": 0.6, "density": 0.5}}]},
    "slerp": {"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.4},
              "models": [{"model": "base"}, {"model": "a"}]},
    # a frankenmerge: three layers, the middle one repeated from the other model
    "passthrough": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}]}, {"sources": [{"model": "b", "layer_range": [1, 2]}]}]},
}


# -- the registry --------------------------------------------------------------------------------

def test_the_registry_names_every_tensor_of_each_architecture(family):
    model_type, paths, sources, _ = family
    ck = Checkpoint(paths["base"])
    arch = ck.architecture
    assert arch.name == model_type and not arch.inferred
    assert ck.num_layers == 2
    layout = _layout(ck)
    assert sorted(layout.pre) == sorted(arch.embeddings)
    assert set(arch.final_norm) <= set(layout.post) <= set(arch.final_norm + arch.head)
    groups = [f for fs in arch.modules.values() for f in fs]
    for i, suffixes in layout.layers.items():
        for suffix in suffixes:  # every layer tensor is in a module group or is a norm
            assert any(f in suffix for f in groups) or any(n in suffix for n in arch.norm_filters), suffix
        for writer in arch.residual_writers:  # and every block writes to the residual stream through them
            assert any(writer in suffix for suffix in suffixes), (i, writer)


# -- merging -------------------------------------------------------------------------------------

def test_each_merge_method_follows_its_formula_and_writes_a_model_transformers_loads(family, tmp_path):
    model_type, paths, sources, _ = family
    arch = ARCHITECTURES[model_type]
    T = lambda m, n: sources.tensor(m, n).float()  # noqa: E731
    names = sources.checkpoints["base"].tensor_names
    for method, recipe in PLANS.items():
        plan = MergePlan.from_dict(recipe)
        weights = merge(plan, sources)
        if method == "linear":
            for n in names:
                torch.testing.assert_close(weights[n], 0.3 * T("a", n) + 0.7 * T("b", n), rtol=0, atol=1e-6)
        elif method == "task_arithmetic":
            for n in names:
                want = T("base", n) + 0.5 * (T("a", n) - T("base", n)) + 0.3 * (T("b", n) - T("base", n))
                torch.testing.assert_close(weights[n], want, rtol=0, atol=1e-6)
        elif method == "passthrough":
            prefix = arch.layer_prefix
            for n in names:
                split = arch.split_layer(n)
                if split is None:
                    model = "a" if n in arch.embeddings else "b"
                    assert torch.equal(weights[n], T(model, n)), n
                    continue
                assert torch.equal(weights[n], T("a", n)), n
                if split[0] == 1:
                    assert torch.equal(weights[f"{prefix}2.{split[1]}"], T("b", n))
        out = merge_to_disk(plan, sources, tmp_path / method)
        config = json.loads((out / "config.json").read_text())
        layers = 3 if method == "passthrough" else 2
        assert arch.config_section(config)[arch.layer_count_key] == layers
        loaded = _hf(out)
        state = loaded.state_dict()
        for name, tensor in arch.to_runtime(weights).items():
            assert torch.equal(state[name], tensor.to(state[name].dtype)), (method, name)
        assert torch.isfinite(loaded(_ids(loaded.config.vocab_size)).logits).all()


def test_the_hf_backend_swaps_a_merge_in_place_with_the_logits_of_the_written_model(family, tmp_path):
    from evomerge.backends.hf import HFBackend

    model_type, paths, sources, _ = family
    backend = HFBackend(paths["base"], batch_size=8)
    for method in ("ties", "passthrough"):  # same shapes (in place), then three layers (a rebuild)
        plan = MergePlan.from_dict(PLANS[method])
        backend.load_weights(merge(plan, sources), output_config(plan, sources))
        written = _hf(merge_to_disk(plan, sources, tmp_path / method))
        ids = _ids(written.config.vocab_size, seed=1)
        with torch.no_grad():
            torch.testing.assert_close(backend.model(ids).logits, written(ids).logits, rtol=1e-5, atol=1e-5)
    assert backend.rebuilds == 1


def test_evomerge_eval_scores_a_recipe_as_its_written_merge_and_greedy_as_generate(family, tmp_path, capsys):
    model_type, paths, sources, task = family
    recipe = dict(PLANS["ties"])
    recipe["models"] = [{"model": str(paths[m["model"]]), "parameters": m["parameters"]} for m in recipe["models"]]
    recipe["base_model"] = str(paths["base"])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_main(["merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "merged")]) == 0
    rows = {}
    for label, model in (("recipe", tmp_path / "recipe.yaml"), ("dir", tmp_path / "merged")):
        out = tmp_path / f"{label}.jsonl"
        assert cli_main(["eval", str(model), "--tasks", str(task), "--out", str(out)]) == 0, capsys.readouterr().err
        rows[label] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["output"] for r in rows["recipe"]] == [r["output"] for r in rows["dir"]]

    # Greedy outputs are transformers' generate(do_sample=False), prompt by prompt.
    from evomerge.backends.hf import load_tokenizer

    tok, model = load_tokenizer(tmp_path / "merged"), _hf(tmp_path / "merged")
    for row, prompt in zip(rows["dir"], PROMPTS):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in gen:
            gen = gen[: gen.index(tok.eos_token_id)]
        assert row["output"] == tok.decode(gen, skip_special_tokens=True), prompt


# -- the data-flow fold --------------------------------------------------------------------------

def _layers_module(model, arch):
    return model.get_submodule(arch.layer_prefix.rstrip("."))


def _without_norm_eps(model) -> None:
    # With eps = 0 the norms are exactly scale invariant: the fold is then exact up to rounding.
    for module in model.modules():
        for attr in ("variance_epsilon", "eps"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def _logits_with_residual_scaling(model, arch, ids, scales: dict[int, float]):
    """Logits with the residual stream entering layer k multiplied by scales[k], by forward pre-hooks."""
    def hook_for(s):
        def hook(module, args, kwargs):
            if args:
                return (args[0] * s, *args[1:]), kwargs
            kwargs["hidden_states"] = kwargs["hidden_states"] * s
            return args, kwargs
        return hook

    layers = _layers_module(model, arch)
    handles = [layers[k].register_forward_pre_hook(hook_for(s), with_kwargs=True) for k, s in scales.items()]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def test_a_folded_data_flow_scale_equals_scaling_the_residual_stream(family, record_property):
    """Scaling the stream into layer k == folding 1/prod(s) into the residual writes of layers >= k
    (o_proj/down_proj, GPT-2's c_proj, every expert's down projection, Gemma's post-norm gains)."""
    model_type, paths, sources, _ = family
    arch = ARCHITECTURES[model_type]
    space = build_space({"kind": "data_flow", "repetitions": 2, "scaling": "slot", "scale": [0.25, 4.0]},
                        ["a"], None, 2, arch)
    x = np.zeros(space.dim)
    x[[space.names.index(f"slot{t}.include") for t in range(4)]] = 1  # a:0, a:1, a:0, a:1
    for t, s in enumerate([3.0, 0.5, 2.5, 0.3]):  # slot 0's input scale is a no-op under the norms
        x[space.names.index(f"slot{t}.scale")] = s
    scaled_plan = space.decode(x)
    plain_space = build_space({"kind": "data_flow", "repetitions": 2, "scaling": "none"}, ["a"], None, 2, arch)
    plain_plan = plain_space.decode(x[: plain_space.dim])
    assert plain_space.describe(x[: plain_space.dim])["layers"] == ["a:0", "a:1", "a:0", "a:1"]

    config = output_config(scaled_plan, sources)
    assert config == output_config(plain_plan, sources)
    folded = _from_weights(config, merge(scaled_plan, sources), arch)
    stacked = _from_weights(config, merge(plain_plan, sources), arch)
    _without_norm_eps(folded), _without_norm_eps(stacked)
    ids = _ids(config.get("vocab_size"), seed=2)
    with torch.no_grad():
        got, plain = folded(ids).logits, stacked(ids).logits
    want = _logits_with_residual_scaling(stacked, arch, ids, {1: 0.5, 2: 2.5, 3: 0.3})
    err = float((got - want).abs().max() / want.abs().max())
    record_property("fold_rel_error", err)  # scripts/architecture_table.py reports it
    assert err < 1e-4, f"{model_type}: folded scale off by {err:.2e} (relative)"
    assert (want - plain).abs().max() > 1e3 * (got - want).abs().max()  # the scaling itself matters


# -- search and export ---------------------------------------------------------------------------

KINDS = {
    "parameter": {"kind": "parameter", "method": "ties", "granularity": "layer", "per_module": True,
                  "separate": ["embed", "norm", "lm_head"]},
    "layer_swap": {"kind": "layer_swap"},
    "data_flow": {"kind": "data_flow", "repetitions": 2, "scaling": "transition"},
    "combined": {"kind": "combined", "parameter": {"method": "task_arithmetic"},
                 "data_flow": {"repetitions": 1, "scaling": "slot"}},
}
# The default run searches each architecture with one genome kind (every kind on several
# architectures); the slow run does every architecture x every kind.
FAST_KIND = {arch: list(KINDS)[i % len(KINDS)] for i, arch in enumerate(ARCHS)}


def _search_and_export(family, kind: str, tmp_path: Path) -> None:
    from evomerge.search.archive import Archive
    from evomerge.search.genome import merge_plan, plan_from_dict, plan_output_config
    from evomerge.search.run import SearchRun

    model_type, paths, sources, task = family
    arch = ARCHITECTURES[model_type]
    config = {
        "seed": 5, "sources": {k: str(v) for k, v in paths.items()}, "base": "base", "genome": KINDS[kind],
        "objectives": [{"name": "mine", "task": str(task)}],
        "evaluator": {"kind": "merge", "backend": "hf", "device": "cpu", "threads": 1},
        "optimizer": {"name": "random", "population": 3, "generations": 1}, "audit": {"every": 0},
        "workers": {"backend": "local", "count": 1},
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    run = SearchRun.create(tmp_path / "search.yaml", tmp_path / "run")
    run.run(progress=False)
    run.close()
    archive = Archive(tmp_path / "run", readonly=True)
    try:
        records = [r for r in archive.records() if r.generation >= 0]
    finally:
        archive.close()
    assert len(records) == 3 and all(r.status == "ok" for r in records), [r.result.error for r in records]

    best = records[0]
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--id", str(best.candidate_id)]) == 0
    out = tmp_path / "out" / f"candidate-{best.candidate_id}"
    plan = plan_from_dict(best.plan)
    weights, config = merge_plan(plan, sources), plan_output_config(plan, sources)
    written = json.loads((out / "config.json").read_text())
    assert arch.config_section(written)[arch.layer_count_key] == arch.config_section(config)[arch.layer_count_key]
    loaded = _hf(out)
    state = loaded.state_dict()
    for name, tensor in arch.to_runtime(weights).items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_search_with_each_genome_kind_runs_and_its_export_reloads(family, kind, tmp_path):
    if kind != FAST_KIND[family[0]]:
        pytest.skip("this architecture x genome kind runs with -m slow (test_..._every_kind)")
    _search_and_export(family, kind, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_search_with_every_kind_on_every_architecture_runs_and_exports(family, kind, tmp_path):
    if kind == FAST_KIND[family[0]]:
        pytest.skip("runs in the default set")
    _search_and_export(family, kind, tmp_path)


def test_moe_architectures_fuse_experts_as_transformers_loads_them(family):
    """The registry's checkpoint -> runtime mapping is transformers' own: the loaded model's
    fused expert parameters are the checkpoint's per-expert tensors, stacked."""
    model_type, paths, sources, _ = family
    arch = ARCHITECTURES[model_type]
    ck = Checkpoint(paths["a"])
    runtime = arch.to_runtime({n: ck.get(n) for n in ck.tensor_names})
    state = _hf(paths["a"]).state_dict()
    tied = {t for t, _ in arch.tied}
    assert set(state) - set(runtime) <= tied
    assert set(runtime) <= set(state)
    for name, tensor in runtime.items():
        assert torch.equal(state[name], tensor), name
    if model_type in MOE:
        assert any(name.endswith("experts.gate_up_proj") for name in runtime)
        assert not any(".experts.0." in name for name in runtime)


def test_a_recipe_filter_on_mergekit_moe_names_reaches_the_per_expert_tensors(family):
    """mergekit 0.1.5 names Mixtral's experts as transformers 5 holds them (mlp.experts.down_proj);
    a recipe's ``filter: down_proj`` must scale the checkpoint's experts.*.w2 the same way."""
    model_type, paths, sources, _ = family
    arch = ARCHITECTURES[model_type]
    if model_type not in MOE:
        pytest.skip("dense: checkpoint and runtime names are the same")
    plan = MergePlan.from_dict({"merge_method": "passthrough", "slices": [{"sources": [
        {"model": "a", "layer_range": [0, 2], "parameters": {"scale": [{"filter": "down_proj", "value": 0.5},
                                                                         {"value": 1.0}]}}]}]})
    weights = merge(plan, sources)
    scaled = [n for n in weights if "down_proj" in arch.runtime_name(n)]
    assert any(".experts.0." in n for n in scaled)
    for name, tensor in weights.items():
        factor = 0.5 if name in scaled else 1.0
        torch.testing.assert_close(tensor, factor * sources.tensor("a", name).float(), rtol=0, atol=0, msg=name)

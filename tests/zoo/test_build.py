"""Zoo building: layout, HF-loadable models, cache + lock; and (slow) the real zoo's skills."""

from __future__ import annotations

import json
import threading

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from evomerge.backends import make_backend
from evomerge.tasks.task import load_task
from evomerge.zoo import build, skills
from evomerge.zoo.build import EXPERTS, ensure_zoo, is_built, zoo_paths

QUICK = dict(pretrain=dict(steps=3, batch=4, lr=1e-3, warmup=1),
             finetune=dict(steps=2, batch=4, lr=1e-3, warmup=1, replay=0.5))


def test_ensure_zoo_builds_once_under_concurrency(tmp_path, monkeypatch):
    calls = []
    real = build.build_zoo
    monkeypatch.setattr(build, "build_zoo", lambda *a, **k: calls.append(1) or real(*a, **k))
    root = tmp_path / "zoo"
    threads = [threading.Thread(target=ensure_zoo, args=(root,), kwargs=QUICK) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    paths = zoo_paths(root)
    assert is_built(paths) and set(paths.models) == {"base", *EXPERTS.values()}
    meta = json.loads((root / "zoo.json").read_text())
    assert meta["pretrain"]["steps"] == 3
    for path in paths.models.values():
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert LlamaForCausalLM.from_pretrained(str(path)).num_parameters() > 0
        assert AutoTokenizer.from_pretrained(str(path)).decode([5, 6]) == "12"
    ensure_zoo(root)                               # already built: returns without building
    assert len(calls) == 1


def test_experts_differ_from_base_and_are_deterministic(tmp_path):
    a = build.build_zoo(tmp_path / "a", verbose=False, **QUICK)
    b = build.build_zoo(tmp_path / "b", verbose=False, **QUICK)
    for name in a.models:
        assert (a.models[name] / "model.safetensors").read_bytes() == (b.models[name] / "model.safetensors").read_bytes()
    assert (a.base / "model.safetensors").read_bytes() != (a.experts["arith"] / "model.safetensors").read_bytes()


def test_another_seed_builds_another_zoo_and_records_its_seed(tmp_path):
    a = build.build_zoo(tmp_path / "a", verbose=False, **QUICK)
    b = build.build_zoo(tmp_path / "b", verbose=False, seed=build.SEED + 1, **QUICK)
    assert (a.base / "model.safetensors").read_bytes() != (b.base / "model.safetensors").read_bytes()
    assert build.built_seed(a) == build.SEED and build.built_seed(b) == build.SEED + 1
    assert build.built_seed(zoo_paths(tmp_path / "none")) is None


@pytest.mark.parametrize("seed", [build.SEED, build.SEED + 7])
def test_trained_prompts_replays_exactly_what_training_saw(tmp_path, monkeypatch, seed):
    seen = []
    real_batch = build.Encoder.batch
    monkeypatch.setattr(build.Encoder, "batch", lambda self, pairs: seen.extend(pairs) or real_batch(self, pairs))
    build.build_zoo(tmp_path / "zoo", verbose=False, seed=seed, **QUICK)
    replayed = build.trained_prompts(**QUICK, seed=seed)
    assert replayed == {skills.item_key(prompt) for prompt, *_ in seen}
    if seed != build.SEED:
        assert replayed != build.trained_prompts(**QUICK)
    assert len(seen) == 3 * 4 + 3 * 2 * 4          # the base's batches, then each expert's
    assert not replayed & {item.prompt for name in skills.TASKS for item in load_task(f"zoo/{name}:all").items}
    # taught end to end: no translation in the prompt and nothing left untaught
    whole = {prompt for prompt, _, tail in seen if skills.item_key(prompt) == prompt and not tail}
    assert build.trained_prompts(**QUICK, end_to_end=True, seed=seed) == whole < replayed


def test_zoo_build_command_keeps_the_default_zoo_and_names_a_seed_mismatch(tmp_path, capsys):
    from evomerge.cli import main

    assert main(["zoo", "build", "--seed", "7"]) == 2               # the default dir keeps the default zoo
    assert "--seed 7: give --out too" in capsys.readouterr().err
    build.build_zoo(tmp_path / "zoo", verbose=False, **QUICK)        # seed SEED
    assert main(["zoo", "build", "--out", str(tmp_path / "zoo"), "--seed", "7"]) == 2
    assert f"built with seed {build.SEED}, not 7" in capsys.readouterr().err


def test_composite_items_are_taught_end_to_end_only_with_the_base_s_known_words():
    # larger corpora than QUICK, replayed only (no training): every composite the corpora
    # teach whole uses digits the base has words for; the others come with a half untaught
    settings = {"pretrain": {**build.PRETRAIN, "steps": 30}, "finetune": {**build.FINETUNE, "steps": 30}}
    whole = {p for p in build.trained_prompts(**settings, end_to_end=True) if p.startswith("calc:")}
    partly = {p for p in build.trained_prompts(**settings) if p.startswith("calc:")} - whole
    known = {skills.calc_prompt(a, b) for a in range(100) for b in range(100)
             if max(f"{a}{b}") < str(skills.KNOWN_DIGITS)}
    assert whole and whole <= known and partly - known


@pytest.mark.slow
def test_real_zoo_each_expert_is_best_on_its_skill():
    zoo = ensure_zoo()                             # builds the cached zoo (a few CPU minutes) if missing
    backend = make_backend("hf", zoo.base)
    tasks = {s: load_task(f"zoo/{s}:heldout") for s in EXPERTS}
    acc = {}
    for name, path in zoo.models.items():
        backend.load_weights(dict(LlamaForCausalLM.from_pretrained(str(path)).named_parameters()),
                             json.loads((path / "config.json").read_text()))
        acc[name] = {s: sum(r.score for r in backend.score(t, range(60))) / 60 for s, t in tasks.items()}
    for skill, expert in EXPERTS.items():
        others = [m for m in acc if m != expert]
        assert acc[expert][skill] > max(acc[m][skill] for m in others), (skill, acc)


@pytest.mark.slow
def test_real_zoo_a_merge_of_the_experts_beats_every_source_on_the_composite():
    """What the search exploits: the composite needs the arith and lang experts together."""
    from evomerge.merge.engine import SourceSet, merge, output_config
    from evomerge.merge.plan import MergePlan

    zoo = ensure_zoo()
    task = load_task("zoo/calc:heldout")
    sources = SourceSet.load({name: path for name, path in zoo.models.items()})
    backend = make_backend("hf", zoo.base)

    def accuracy(plan: dict) -> float:
        plan = MergePlan.from_dict(plan)
        backend.load_weights(merge(plan, sources), output_config(plan, sources))
        return sum(r.score for r in backend.score(task, range(len(task.items)))) / len(task.items)

    singles = {name: accuracy({"merge_method": "passthrough", "models": [{"model": name}]}) for name in zoo.models}
    pair = accuracy({"merge_method": "ties", "base_model": "base", "models": [
        {"model": EXPERTS[s], "parameters": {"weight": 1.0, "density": 0.5}} for s in ("arith", "lang")]})
    assert pair > max(singles.values()) + 0.05, (pair, singles)

"""`evomerge export`: chosen candidates of a run become loadable HF models with a card and a mergekit recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main as cli_main
from evomerge.io.synthetic import make_tiny_llama
from evomerge.merge.engine import SourceSet
from evomerge.merge.plan import MergePlan
import evomerge
from evomerge.search.archive import Archive
from evomerge.search.store import RUN_FORMAT
from evomerge.search.export import load_records, pareto_front, top_k
from evomerge.search.genome import build_space, merge_plan
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
L = 3


def hand_made_archive(run_dir: Path, config: dict, objectives: list[str]) -> Archive:
    """The archive of a run directory built by hand (no search): the config a search stores
    in it, and the format and version marks a run's archive carries."""
    run_dir.mkdir(parents=True, exist_ok=True)
    archive = Archive(run_dir, objectives=objectives)
    archive.set_meta(format=RUN_FORMAT, evomerge_version=evomerge.__version__, config=config)
    return archive


def make_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(63)} | {"[UNK]": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def write_run(run_dir: Path, paths: dict[str, str], base: str, rows: list[dict], objectives: list[str]) -> Path:
    """A run directory as the search leaves it: its config and the archive of evaluations."""
    archive = hand_made_archive(run_dir, {
        "sources": paths, "base": base, "genome": {"method": "ties", "granularity": "layer"},
        "objectives": [{"name": o, "task": f"zoo/{o}"} for o in objectives]}, objectives)
    for r in rows:
        archive.add(Candidate(r["candidate_id"], r["generation"], r["genome"], r["plan"]),
                    EvalResult(r["candidate_id"], r["status"], {k: ObjectiveScore(**v) for k, v in r["objectives"].items()},
                               worker="local-0", seconds=1.5))
    archive.close()
    return run_dir


def score(value, stderr=0.02, full=None):
    return {"value": value, "stderr": stderr, "n_items": 40, "full": full}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tok = make_tokenizer(root / "tok")
    base = make_tiny_llama(root / "base", num_layers=L, seed=1, tokenizer_from=tok)
    paths = {"base": str(base),
             "a": str(make_tiny_llama(root / "a", base=base, noise=0.02, seed=2, tokenizer_from=tok)),
             "b": str(make_tiny_llama(root / "b", base=base, noise=0.02, seed=3, tokenizer_from=tok))}
    param = build_space({"method": "ties", "granularity": "layer"}, ["base", "a", "b"], "base", L)
    combined = build_space({"kind": "combined", "parameter": {"method": "task_arithmetic"},
                            "data_flow": {"repetitions": 1, "scaling": "slot", "sources": ["merged", "a"]}},
                           ["base", "a", "b"], "base", L)
    rng = np.random.default_rng(0)
    objs = [(0.6, 0.3), (0.45, 0.6), (0.3, 0.2), (0.2, 0.7), (0.9, 0.1)]  # 2 is dominated by 0
    rows = []
    for i, (f1, f2) in enumerate(objs):
        space = combined if i == 3 else param
        x = space.random(rng)
        rows.append({"candidate_id": i, "generation": i // 2, "genome": x.tolist(),
                     "plan": space.decode(x).to_dict(), "status": "ok",
                     "objectives": {"arith": score(f1, full=f1 + 0.01), "copy": score(f2)}})
    rows.append({"candidate_id": 5, "generation": 2, "genome": [0.5] * param.dim, "plan": {}, "status": "failed",
                 "objectives": {}})
    run_dir = write_run(root / "run", paths, "base", rows, ["arith", "copy"])
    return {"dir": run_dir, "paths": paths, "root": root, "rows": rows}


def test_selection_front_top_and_failed_rows(run):
    records = load_records(run["dir"])
    assert [r.candidate_id for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[0].objectives["arith"].stderr == 0.02
    assert sorted(r.candidate_id for r in pareto_front(records)) == [0, 1, 3, 4]
    assert [r.candidate_id for r in top_k(records, 2, "copy")] == [3, 1]
    assert [r.candidate_id for r in top_k(records, 1)] == [1]  # best mean: (0.45 + 0.6) / 2


def test_export_id_writes_a_loadable_model_equal_to_the_in_memory_merge(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert cli_main(["export", str(run["dir"]), str(out), "--id", "0"]) == 0
    model_dir = out / "candidate-0"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    plan = MergePlan.from_dict(run["rows"][0]["plan"])
    want = merge_plan(plan, SourceSet.load(run["paths"]))
    got = model.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name

    # mergekit.yaml is the same recipe with checkpoint paths for model names
    recipe = MergePlan.from_yaml(model_dir / "mergekit.yaml")
    by_path = {v: k for k, v in run["paths"].items()}
    renamed = json.loads(json.dumps(recipe.to_dict()))
    renamed["base_model"] = by_path[renamed["base_model"]]
    for m in renamed["models"]:
        m["model"] = by_path[m["model"]]
    assert renamed == plan.to_dict()

    card = (model_dir / "README.md").read_text()
    assert "evomerge candidate 0" in card and str(run["dir"].resolve()) in card
    assert "| arith | exact | 0.6000 | 0.0200 | 40 | 0.6100 |" in card
    assert "```yaml\nmerge_method: ties" in card


def test_export_front_includes_a_staged_plan_with_both_stages(run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "front"
    assert cli_main(["export", str(run["dir"]), str(out), "--front"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"candidate-{i}" for i in (0, 1, 3, 4)]
    staged_dir = out / "candidate-3"
    docs = list(yaml.safe_load_all((staged_dir / "mergekit.yaml").read_text()))
    assert len(docs) == 2
    first, second = MergePlan.from_dict(docs[0]), MergePlan.from_dict(docs[1])
    assert first.merge_method == "task_arithmetic" and second.merge_method == "passthrough"
    names = {v: k for k, v in run["paths"].items()} | {"./merged": "merged"}
    final = run["rows"][3]["plan"]["stages"][1]["plan"]
    assert [names[s.model] for sl in second.slices for s in sl.sources] == \
        [s["model"] for sl in final["slices"] for s in sl["sources"]]
    model = AutoModelForCausalLM.from_pretrained(staged_dir, local_files_only=True)
    n_layers = sum(sl.num_layers for sl in second.slices)
    assert model.config.num_hidden_layers == n_layers == len(model.model.layers)


def test_export_refuses_bad_requests_with_one_line(run, tmp_path, capsys):
    assert cli_main(["export", str(run["dir"]), str(tmp_path / "x"), "--id", "5"]) == 2
    assert "candidate 5 has status 'failed'" in capsys.readouterr().err
    assert cli_main(["export", str(run["dir"]), str(tmp_path / "x"), "--id", "42"]) == 2
    assert "no candidate 42" in capsys.readouterr().err
    assert cli_main(["export", str(run["dir"]), str(tmp_path / "x"), "--top", "1", "--objective", "nah"]) == 2
    assert "unknown objective 'nah'" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "no-run"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a directory in the way that is not this candidate's export is kept unless --overwrite
    out = tmp_path / "again"
    (out / "candidate-1").mkdir(parents=True)
    (out / "candidate-1" / "mine.txt").write_text("not an export")
    assert cli_main(["export", str(run["dir"]), str(out), "--id", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "candidate-1" / "mine.txt").exists()
    assert cli_main(["export", str(run["dir"]), str(out), "--id", "1", "--overwrite"]) == 0
    assert not (out / "candidate-1" / "mine.txt").exists()
    # and a path that is a file is one line too
    (tmp_path / "afile").write_text("x")
    assert cli_main(["export", str(run["dir"]), str(tmp_path / "afile"), "--id", "1"]) == 2
    assert "afile: exists and is not a directory" in capsys.readouterr().err


def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_export_run_again_keeps_verified_candidates_rewrites_damaged_ones_and_clears_leftovers(run, tmp_path,
                                                                                                  capsys):
    out = tmp_path / "out"
    assert cli_main(["export", str(run["dir"]), str(out), "--front"]) == 0
    weights = {i: out / f"candidate-{i}" / "model.safetensors" for i in (0, 1, 4)}
    written = {i: p.stat().st_mtime_ns for i, p in weights.items()}
    # what a kill -9 halfway through the next export leaves: a temporary with shards ...
    leftover = out / f".candidate-0.tmp-{dead_pid()}-k9"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a shard")
    # ... and one candidate whose weights changed on disk since
    data = bytearray(weights[1].read_bytes())
    data[-3] ^= 0xFF
    weights[1].write_bytes(bytes(data))
    capsys.readouterr()
    assert cli_main(["export", str(run["dir"]), str(out), "--front"]) == 0
    assert capsys.readouterr().out.split() == [str(out / f"candidate-{i}") for i in (0, 1, 3, 4)]
    assert not leftover.exists()
    assert weights[0].stat().st_mtime_ns == written[0] and weights[4].stat().st_mtime_ns == written[4]  # verified
    assert weights[1].read_bytes() != bytes(data)                                                       # rewritten
    manifest = json.loads((out / "candidate-1" / "evomerge_export.json").read_text())["sha256"]
    import hashlib
    assert manifest["model.safetensors"] == hashlib.sha256(weights[1].read_bytes()).hexdigest()


def test_an_exported_model_scores_what_its_candidate_scored_in_the_search(tmp_path):
    """A real (tiny) search with full evaluation; the exported best candidate, loaded from
    disk by transformers, scores the same on the same items with the same backend."""
    from transformers import AutoModelForCausalLM

    from evomerge.backends import make_backend
    from evomerge.search.run import SearchRun
    from evomerge.tasks.task import load_task
    from evomerge.zoo.tokenizer import build_tokenizer, save_tokenizer

    save_tokenizer(tmp_path / "tok")
    vocab = build_tokenizer().get_vocab_size()
    base = make_tiny_llama(tmp_path / "base", vocab_size=vocab, num_layers=2, seed=1, tokenizer_from=tmp_path / "tok")
    paths = {"base": str(base)} | {n: str(make_tiny_llama(tmp_path / n, base=base, noise=0.6, seed=s,
                                                          tokenizer_from=tmp_path / "tok")) for n, s in (("a", 2), ("b", 3))}
    words = ["cat", "dog", "sun", "sea", "red", "blue"]
    rows = [{"id": f"q{i}", "prompt": f"{i} {words[i % 6]} is", "choices": [words[(i + k) % 6] for k in range(3)],
             "answer": words[(i + i % 3) % 6]} for i in range(18)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "q.yaml").write_text(yaml.safe_dump({"name": "q", "kind": "multiple_choice", "data": "q.jsonl"}))
    config = {"seed": 2, "sources": paths, "base": "base", "run_dir": str(tmp_path / "run"),
              "genome": {"method": "task_arithmetic", "granularity": "layer", "weight": [0.0, 1.5]},
              "objectives": [{"name": "q", "task": str(tmp_path / "q.yaml")}], "evaluator": {"threads": 1},
              "optimizer": {"name": "random", "population": 4, "generations": 1}, "audit": {"every": 0}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    search = SearchRun.create(tmp_path / "search.yaml")
    search.run(progress=False)
    search.close()

    records = load_records(tmp_path / "run")
    assert len({r.value("q") for r in records}) > 1, "identical scores would make the comparison weak"
    best = top_k(records, 1, "q")[0]
    out = tmp_path / "export"
    assert cli_main(["export", str(tmp_path / "run"), str(out), "--id", str(best.candidate_id)]) == 0
    exported = out / f"candidate-{best.candidate_id}"
    AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)   # loads with transformers
    task = load_task(str(tmp_path / "q.yaml"))
    results = make_backend("hf", exported).score(task, range(len(task.items)))
    assert np.mean([r.score for r in results]) == best.value("q")


def test_export_streams_each_merged_tensor_to_disk(run, tmp_path, monkeypatch):
    """The export never holds the merged model: at most a couple of the tensors a merge
    yields are alive at once (weak references), for a plain plan and for a staged plan's
    last stage (besides its first stage's output, which is held: the last stage reads it,
    its passthrough yielding some of those tensors again), and the files
    hold exactly the in-memory merge."""
    import weakref

    from safetensors.torch import load_file

    from evomerge.merge import engine
    from evomerge.merge.staged import merge_with_config, plan_from_dict

    calls: list[dict] = []
    earlier: list[weakref.ref] = []      # tensors an earlier stage yielded (a passthrough yields them again)
    original = engine.iter_merge

    def counted(*args, **kwargs):
        seen, refs = {"yielded": 0, "most_alive": 0}, []
        calls.append(seen)
        for name, tensor in original(*args, **kwargs):
            refs.append(weakref.ref(tensor))
            seen["yielded"] += 1
            held = [r() for r in earlier]
            seen["most_alive"] = max(seen["most_alive"], sum(
                r() is not None and not any(r() is h for h in held) for r in refs))
            del held
            yield name, tensor
            del tensor
        earlier.extend(refs)

    monkeypatch.setattr(engine, "iter_merge", counted)
    for candidate, stages in ((0, 1), (3, 2)):
        calls.clear()
        earlier.clear()
        out = tmp_path / f"c{candidate}"
        assert cli_main(["export", str(run["dir"]), str(out), "--id", str(candidate)]) == 0
        assert len(calls) == stages and calls[-1]["yielded"] > 3 * L and calls[-1]["most_alive"] <= 2
        if stages == 2:                   # the first stage, merged into memory
            assert calls[0]["most_alive"] == calls[0]["yielded"] > 3 * L
        written = load_file(out / f"candidate-{candidate}" / "model.safetensors")
        want, _ = merge_with_config(plan_from_dict(run["rows"][candidate]["plan"]), SourceSet.load(run["paths"]))
        assert written.keys() == want.keys() and all(torch.equal(written[n], want[n]) for n in want)

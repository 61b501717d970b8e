"""lm-eval tasks score in evomerge exactly as lm-eval scores them.

The reference is lm-eval itself: ``simple_evaluate(model=HFLM(...), log_samples=True)`` on the
same zoo model, the task YAMLs under ``tests/tasks/data/lm_eval`` (local JSON data). evomerge
answers through its HF backend (``BackendLM``); per item every metric under every filter must
equal lm-eval's logged sample, and the objective's mean lm-eval's aggregate to 1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow              # lm-eval's import and HFLM: a few seconds per reference run

from evomerge.backends import make_backend  # noqa: E402
from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.tasks.task import load_task  # noqa: E402
from evomerge.zoo.build import is_built, zoo_paths  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
# renders system turns, user turns and assistant turns with visible separators, so the
# chat-templated prompt differs from the plain one and still reads like the zoo's prompts
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}|"
                 "{% elif m['role'] == 'user' %}{{ m['content'] }}{% else %}{{ m['content'] }}\n{% endif %}"
                 "{% endfor %}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The test task YAMLs with their data path filled in (lm-eval reads data_files from the cwd)."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for data in ("arith.jsonl", "arith_small.jsonl", "utils.py"):
        shutil.copy(DATA / data, out / data)
    for path in DATA.glob("*.yaml"):
        (out / path.name).write_text(path.read_text().replace("DATA_DIR", str(out)))
    return out


@pytest.fixture(scope="module")
def model_dir() -> Path:
    paths = zoo_paths()                    # EVOMERGE_ZOO_DIR, else the cached zoo
    if not is_built(paths):
        pytest.skip("the model zoo is not built (evomerge zoo build)")
    return paths.root / "expert-arith"


@pytest.fixture(scope="module")
def chat_model_dir(model_dir, tmp_path_factory) -> Path:
    """The zoo model with a chat template in its tokenizer config."""
    out = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(model_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def lm_eval_reference(model: Path, task_dir: Path, tasks: list[str], **kwargs) -> dict:
    """lm-eval's own numbers: {"results": {task: {"metric,filter": value}}, "items": {task: {(doc, key): value}}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=str(model), device="cpu", batch_size=4), tasks=tasks,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0, **kwargs)
    items, responses = {}, {}
    for task, samples in out["samples"].items():
        items[task] = {(s["doc_id"], f"{m},{s['filter']}"): s[m] for s in samples for m in s["metrics"]}
        responses[task] = {(s["doc_id"], s["filter"]): s["filtered_resps"] for s in samples}
    return {"results": out["results"], "items": items, "responses": responses}


@pytest.fixture(scope="module")
def plain_reference(model_dir, task_dir):
    return lm_eval_reference(model_dir, task_dir, ["evo_arith_mc", "evo_arith_gen", "evo_arith_fewshot",
                                                   "evo_arith_em_options", "evo_arith_function",
                                                   "evo_arith_loglikelihood"])


@pytest.fixture(scope="module")
def group_reference(model_dir, task_dir):
    return lm_eval_reference(model_dir, task_dir, ["evo_arith_group"])


@pytest.fixture(scope="module")
def backend(model_dir):
    return make_backend("hf", model_dir)


def assert_parity(task, results, reference, name):
    """Every per-item metric equals lm-eval's sample, and each metric's mean its aggregate."""
    theirs = reference["items"][name]
    assert len(results) == len(task.items) == len({doc for doc, _ in theirs})
    keys = {key for _, key in theirs}
    assert keys == set(results[0].metrics)
    for r in results:
        for key in keys:
            assert r.metrics[key] == pytest.approx(theirs[(r.index, key)], abs=1e-9), (name, r.index, key)
    for key in keys:
        ours = sum(r.metrics[key] for r in results) / len(results)
        assert ours == pytest.approx(float(reference["results"][name][key]), abs=1e-6), (name, key)
    # and what the metrics were computed from: the generated texts after each filter, or each
    # choice's log-likelihood and greedy flag
    responses = reference["responses"][name]
    leaf = task.harness.leaves[0]
    for r in results:
        for filter_key in {key.partition(",")[2] for key in keys}:
            ours = [req.filtered_resps[filter_key] for req in leaf.requests[r.index]]
            theirs = responses[(r.index, filter_key)]
            if task.harness.output_type == "generate_until":
                assert ours == theirs, (name, r.index, filter_key)
            else:
                assert [g for _, g in ours] == [g for _, g in theirs], (name, r.index)
                assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-4), (name, r.index)


@pytest.mark.parametrize("name", ["evo_arith_mc", "evo_arith_gen", "evo_arith_fewshot", "evo_arith_em_options",
                                  "evo_arith_function", "evo_arith_loglikelihood"])
def test_every_item_and_metric_equals_lm_evals_logged_samples(name, task_dir, backend, plain_reference):
    options = {"trust_task_code": True} if name == "evo_arith_function" else None    # it runs utils.py
    task = load_task(f"{task_dir}:{name}", lm_eval=options)
    results = backend.score(task, range(len(task.items)))
    assert_parity(task, results, plain_reference, name)
    # the objective's number is the task's first metric under its first filter
    first = next(iter(results[0].metrics))
    assert task.harness.metric == first
    assert [r.score for r in results] == [r.metrics[first] for r in results]


def test_function_utilities_run_only_when_asked(task_dir):
    with pytest.raises(EvomergeError, match=r"lm-eval task 'evo_arith_function': .*arith_function\.yaml uses !function"
                                            r".*lm_eval\.trust_task_code: true"):
        load_task(f"{task_dir}:evo_arith_function")
    task = load_task(f"{task_dir}:evo_arith_function", lm_eval={"trust_task_code": True})
    # utils.small_sums dropped the sums with a number of 50 or more; utils.question wrote the prompts
    assert 0 < len(task.items) < 16
    assert all(all(int(x) < 50 for x in item.prompt.rstrip("=").split("+")) for item in task.items)


def test_rolling_log_likelihoods_equal_hflms(model_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from evomerge.tasks.lm_eval_lm import BackendLM

    texts = ["12+7=19", "rev:abc=cba", "3+4=7 " * 20]            # the last one spans several windows
    requests = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts]
    ours = BackendLM(make_backend("hf", model_dir)).loglikelihood_rolling(requests)
    theirs = HFLM(pretrained=str(model_dir), device="cpu", batch_size=4).loglikelihood_rolling(requests,
                                                                                             disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_acc_norm_and_a_named_filter_are_objectives_of_their_own(task_dir, backend, plain_reference):
    mc = load_task(f"{task_dir}:evo_arith_mc", metric="acc_norm")
    scores = [r.score for r in backend.score(mc, range(len(mc.items)))]
    assert sum(scores) / len(scores) == pytest.approx(plain_reference["results"]["evo_arith_mc"]["acc_norm,none"])
    gen = load_task(f"{task_dir}:evo_arith_gen", metric="exact_match,whole")
    scores = [r.score for r in backend.score(gen, range(len(gen.items)))]
    assert sum(scores) / len(scores) == pytest.approx(
        plain_reference["results"]["evo_arith_gen"]["exact_match,whole"])


def test_the_regex_filter_takes_the_first_match_as_lm_eval_does(task_dir, backend):
    task = load_task(f"{task_dir}:evo_arith_gen")
    results = backend.score(task, range(len(task.items)))
    two_digit = [r for r in results if len(task.items[r.index].answer) > 1]
    assert two_digit
    for r in two_digit:                    # "(\d)": the first digit of the output, never the last
        (request,) = task.harness.leaves[0].requests[r.index]
        whole = request.filtered_resps["whole"]
        assert len(r.output) == 1 and whole.startswith(r.output) and whole != r.output
        assert r.metrics["exact_match,first-number"] == 0.0
    # the expert model gets most sums right: the two filters really disagree
    assert sum(r.metrics["exact_match,whole"] for r in two_digit) > 0


def test_exact_match_options_change_the_score(task_dir, backend, plain_reference):
    task = load_task(f"{task_dir}:evo_arith_em_options")
    results = backend.score(task, range(len(task.items)))
    # without the options no output ("7") equals a reference ("N7."); with them most do
    assert sum(r.score for r in results) > len(results) / 2


def test_few_shot_context_is_part_of_every_request(task_dir):
    task = load_task(f"{task_dir}:evo_arith_fewshot")
    prompts = [item.prompt for item in task.items]
    assert all(p.count("\n") == 3 for p in prompts)          # three shots, then the question
    assert all(p.endswith(item_q) for p, item_q in zip(prompts, (json.loads(line)["q"] for line in
                                                               (task_dir / "arith.jsonl").read_text().splitlines())))


def test_a_subset_of_items_scores_as_in_the_full_run(task_dir, backend, plain_reference):
    task = load_task(f"{task_dir}:evo_arith_fewshot")
    subset = [11, 3, 7]
    results = backend.score(task, subset)
    assert [r.index for r in results] == subset
    theirs = plain_reference["items"]["evo_arith_fewshot"]
    assert [r.score for r in results] == [theirs[(i, "exact_match,none")] for i in subset]


def test_a_group_is_one_objective_averaged_as_lm_eval_aggregates_it(task_dir, backend, group_reference):
    task = load_task(f"{task_dir}:evo_arith_group")
    assert len(task.items) == 32 and task.items[16].id == "evo_arith_mc_zeroshot:0"
    results = backend.score(task, range(len(task.items)))
    mean = sum(r.score for r in results) / len(results)
    assert mean == pytest.approx(group_reference["results"]["evo_arith_group"]["acc,none"], abs=1e-6)


@pytest.fixture(scope="module")
def chat_reference(chat_model_dir, task_dir):
    return lm_eval_reference(chat_model_dir, task_dir, ["evo_arith_fewshot", "evo_arith_mc"],
                             apply_chat_template=True, system_instruction="sum", fewshot_as_multiturn=True)


def test_a_chat_template_system_instruction_and_multiturn_shots_match_lm_eval(task_dir, chat_model_dir,
                                                                             chat_reference):
    options = {"apply_chat_template": True, "system_instruction": "sum", "fewshot_as_multiturn": True}
    reference = chat_reference
    backend = make_backend("hf", chat_model_dir)
    for name in ("evo_arith_fewshot", "evo_arith_mc"):
        task = load_task(f"{task_dir}:{name}", lm_eval=options)
        results = backend.score(task, range(len(task.items)))
        assert_parity(task, results, reference, name)
        # the requests went through the template: the system turn leads every context
        assert all(leaf_req[0].args[0].startswith("sum|") for leaf_req in task.harness.leaves[0].requests)


def test_likelihood_scoring_grades_lm_eval_items(task_dir, backend):
    mc = load_task(f"{task_dir}:evo_arith_mc")
    graded = backend.likelihood(mc, range(len(mc.items)))
    exact = backend.score(mc, range(len(mc.items)))
    assert all(0.0 < g.score <= 1.0 for g in graded)
    # the gold choice's share of the probability is above a half exactly where it is the argmax ...
    for g, e in zip(graded, exact):
        if g.score > 0.5:
            assert e.metrics["acc,none"] == 1.0
    gen = load_task(f"{task_dir}:evo_arith_gen")
    graded = backend.likelihood(gen, range(len(gen.items)))
    assert all(0.0 < g.score <= 1.0 for g in graded)
    assert [g.output for g in graded] == [item.answer for item in gen.items]


def test_an_unknown_metric_is_named_with_the_metrics_the_task_has(task_dir):
    with pytest.raises(EvomergeError, match=r"lm-eval task 'evo_arith_mc' has no metric 'f1' \(it reports acc, acc_norm\)"):
        load_task(f"{task_dir}:evo_arith_mc", metric="f1")
    with pytest.raises(EvomergeError, match="lm-eval task 'evo_arith_gen' has no filter 'strict'"):
        load_task(f"{task_dir}:evo_arith_gen", metric="exact_match,strict")


def test_a_group_without_an_aggregate_asks_for_one_of_its_tasks(task_dir):
    with pytest.raises(EvomergeError, match="lm-eval group 'evo_arith_plain_group' reports no aggregate.*"
                                            "name one of its tasks: evo_arith_gen, evo_arith_fewshot"):
        load_task(f"{task_dir}:evo_arith_plain_group")


def test_a_task_whose_dataset_is_not_local_is_named(task_dir):
    with pytest.raises(EvomergeError, match="lm-eval task 'evo_remote': cannot load its dataset from local files"):
        load_task(f"{task_dir}:evo_remote")


def test_a_metric_on_a_zoo_task_is_refused():
    with pytest.raises(EvomergeError, match="task zoo/arith: a metric applies to lm-eval tasks only"):
        load_task("zoo/arith", metric="acc")


def test_the_archived_fitness_of_a_source_is_lm_evals_number_for_it(task_dir, model_dir, plain_reference, backend,
                                                                     tmp_path):
    import yaml

    from evomerge.search.archive import Archive
    from evomerge.search.run import SearchRun

    config = {
        "seed": 3, "sources": {"base": str(model_dir.parent / "base"), "arith": str(model_dir)}, "base": "base",
        "genome": {"kind": "parameter", "method": "task_arithmetic", "granularity": "model", "weight": [0.0, 1.0]},
        "objectives": [
            {"name": "choice", "task": f"{task_dir}:evo_arith_mc", "metric": "acc_norm"},
            {"name": "sums", "task": f"{task_dir}:evo_arith_gen", "metric": "exact_match,whole"},
            {"name": "graded", "task": f"{task_dir}:evo_arith_mc", "scoring": "likelihood", "estimator": "subset"},
        ],
        "evaluator": {"kind": "merge", "threads": 1},
        "optimizer": {"name": "random", "population": 2, "generations": 1},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    run = SearchRun.create(path, tmp_path / "run")
    run.run(progress=False)
    run.close()
    archive = Archive(tmp_path / "run", readonly=True)
    meta, records = archive.meta(), archive.records()
    archive.close()
    arith = meta["source_scores"]["arith"]
    results = plain_reference["results"]
    assert arith["choice"]["value"] == pytest.approx(results["evo_arith_mc"]["acc_norm,none"], abs=1e-6)
    assert arith["sums"]["value"] == pytest.approx(float(results["evo_arith_gen"]["exact_match,whole"]), abs=1e-6)
    assert arith["sums"]["n_items"] == 16
    # a graded objective on the same lm-eval task: the gold choice's mean share of probability
    mc = load_task(f"{task_dir}:evo_arith_mc")
    graded = [r.score for r in backend.likelihood(mc, range(16))]
    assert arith["graded"]["full"] == pytest.approx(sum(graded) / 16, abs=1e-6)     # value: the subset's mean
    searched = [r for r in records if r.generation == 0]
    assert len(searched) == 2 and all(r.status == "ok" for r in searched)


def test_an_objective_with_an_unknown_metric_is_refused_naming_objective_and_task(task_dir, model_dir, tmp_path):
    import yaml

    from evomerge.search.run import SearchRun

    config = {
        "sources": {"base": str(model_dir.parent / "base"), "arith": str(model_dir)}, "base": "base",
        "genome": {"kind": "parameter", "method": "linear", "granularity": "model"},
        "objectives": [{"name": "choice", "task": f"{task_dir}:evo_arith_mc", "metric": "bleu"}],
        "evaluator": {"kind": "merge", "threads": 1},
        "optimizer": {"name": "random", "population": 2, "generations": 1},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(EvomergeError, match=r"objectives\.choice\.task: lm-eval task 'evo_arith_mc' has no metric 'bleu'"):
        SearchRun.create(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_eval_prints_the_named_metric_and_writes_every_metric_per_item(task_dir, model_dir, plain_reference,
                                                                       tmp_path, capsys):
    from evomerge.cli import main as cli_main

    out = tmp_path / "items.jsonl"
    assert cli_main(["eval", str(model_dir), "--tasks", f"{task_dir}:evo_arith_mc", "--metric", "acc_norm",
                     "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "acc_norm" in table.splitlines()[0]
    assert f"{plain_reference['results']['evo_arith_mc']['acc_norm,none']:.3f}" in table
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]["metrics"]) == {"acc,none", "acc_norm,none"}
    theirs = plain_reference["items"]["evo_arith_mc"]
    assert [r["metrics"]["acc,none"] for r in rows] == [theirs[(i, "acc,none")] for i in range(16)]
    assert cli_main(["eval", str(model_dir), "--tasks", f"{task_dir}:evo_arith_mc", "--metric", "f1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: lm-eval task 'evo_arith_mc' has no metric 'f1'")


def test_a_group_averaging_unequal_subtasks_unweighted_asks_for_one_objective_per_subtask(task_dir):
    with pytest.raises(EvomergeError, match="lm-eval group 'evo_arith_unweighted' averages its subtasks' exact_match "
                                            "unweighted .* one objective per subtask: evo_arith_fewshot, evo_arith_small"):
        load_task(f"{task_dir}:evo_arith_unweighted")


def test_unknown_lm_eval_options_in_a_search_config_name_the_field(task_dir, tmp_path):
    from evomerge.errors import ConfigError
    from evomerge.search.config import parse_config

    objective = {"name": "choice", "task": f"{task_dir}:evo_arith_mc", "lm_eval": {"num_shots": 2}}
    with pytest.raises(ConfigError, match=r"search\.yaml: objectives\.0\.lm_eval\.num_shots"):
        parse_config({"sources": {"a": "a"}, "genome": {"kind": "box", "dim": 1}, "objectives": [objective]},
                     "search.yaml", tmp_path)


def test_sampling_generation_kwargs_are_refused_naming_the_task(task_dir, tmp_path):
    text = (DATA / "arith_gen.yaml").read_text().replace("DATA_DIR", str(task_dir))
    text = text.replace("task: evo_arith_gen", "task: evo_arith_sampled").replace(
        "  max_gen_toks: 6\n", "  max_gen_toks: 6\n  do_sample: true\n  temperature: 0.7\n")
    (tmp_path / "sampled.yaml").write_text(text)
    with pytest.raises(EvomergeError, match="lm-eval task evo_arith_sampled: generation_kwargs ask for sampling"):
        load_task(str(tmp_path / "sampled.yaml"))


def test_eval_takes_lm_evals_chat_flags(task_dir, chat_model_dir, chat_reference, tmp_path, capsys):
    from evomerge.cli import main as cli_main

    out = tmp_path / "items.jsonl"
    assert cli_main(["eval", str(chat_model_dir), "--tasks", f"{task_dir}:evo_arith_fewshot", "--apply-chat-template",
                     "--system-instruction", "sum", "--fewshot-as-multiturn", "true", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    theirs = chat_reference["items"]["evo_arith_fewshot"]
    assert [r["metrics"]["exact_match,none"] for r in rows] == [theirs[(i, "exact_match,none")] for i in range(16)]
    assert f"{chat_reference['results']['evo_arith_fewshot']['exact_match,none']:.3f}" in capsys.readouterr().out


def test_num_fewshot_overrides_the_task_unless_its_yaml_says_zero(task_dir):
    two_shot = load_task(f"{task_dir}:evo_arith_mc", lm_eval={"num_fewshot": 1})
    assert all(item.prompt.count(";") == 1 for item in two_shot.items)      # one shot, then the question
    zero = load_task(f"{task_dir}:evo_arith_mc_zeroshot", lm_eval={"num_fewshot": 1})
    assert all(";" not in item.prompt for item in zero.items)                # an explicit 0 wins, as in lm-eval


def test_a_chat_template_asked_of_a_tokenizer_without_one_is_named(task_dir, backend):
    task = load_task(f"{task_dir}:evo_arith_mc", lm_eval={"apply_chat_template": True})
    with pytest.raises(EvomergeError, match="lm-eval task 'evo_arith_mc': apply_chat_template needs a chat template "
                                            "and the tokenizer of expert-arith has none"):
        backend.score(task, [0])

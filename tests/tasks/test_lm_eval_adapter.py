"""lm-eval tasks as objectives: local YAML dirs, both output types, unknown names."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")
# lm-eval indexes its thousands of task YAMLs once per include path (seconds each)
pytestmark = pytest.mark.slow

from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.tasks.task import load_task  # noqa: E402

MC_YAML = """task: evomerge_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_YAML = """task: evomerge_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: [";"]
  max_gen_toks: 5
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "=(\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval")
    rows = [{"question": f"{i}+1", "choices": [str(i + 1), str(i + 2), "x"], "label": i % 3} for i in range(6)]
    (d / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "gen.jsonl").write_text("\n".join(json.dumps({"q": f"{i}+2=", "a": str(i + 2)}) for i in range(4)) + "\n")
    (d / "mc.yaml").write_text(MC_YAML.format(data=d / "mc.jsonl"))
    (d / "gen.yaml").write_text(GEN_YAML.format(data=d / "gen.jsonl"))
    return d


def test_multiple_choice_task_from_local_yaml_dir(task_dir):
    task = load_task(f"{task_dir}:evomerge_local_mc")
    assert task.kind == "multiple_choice" and len(task) == 6 and task.split == "test"
    # items describe lm-eval's documents: the request's context, the choices, the gold choice
    assert task.items[0].prompt == "Question: 0+1\nAnswer:"
    assert task.items[0].choices == ["1", "2", "x"]
    assert [i.answer for i in task.items[:3]] == ["1", "3", "x"]
    assert [i.id for i in task.items] == [str(i) for i in range(6)]
    # each document's requests are lm-eval's: the target delimiter starts every continuation
    requests = task.harness.leaves[0].requests[0]
    assert [r.args for r in requests] == [("Question: 0+1\nAnswer:", " 1"), ("Question: 0+1\nAnswer:", " 2"),
                                          ("Question: 0+1\nAnswer:", " x")]
    assert task.harness.metric == "acc,none"


def test_generation_task_keeps_its_filter_pipeline_and_generation_kwargs(task_dir):
    task = load_task(str(task_dir / "gen.yaml"))
    assert (task.name, task.kind) == ("evomerge_local_gen", "generate")
    assert task.items[1].answer == "3"
    (request,) = task.harness.leaves[0].requests[1]
    assert request.args[0] == "1+2=" and request.args[1]["until"] == [";"] and request.args[1]["max_gen_toks"] == 5
    assert task.harness.metric == "exact_match,strict"
    # the filters are lm-eval's: the regex's first match, then take_first
    request.resps = ["1+2=3;=9"]
    task.harness.leaves[0].task._filters[0].apply([request])
    assert request.filtered_resps["strict"] == "3"


def test_unknown_lm_eval_task_is_named():
    with pytest.raises(EvomergeError, match="unknown lm-eval task 'no_such_task_xyz'"):
        load_task("no_such_task_xyz")

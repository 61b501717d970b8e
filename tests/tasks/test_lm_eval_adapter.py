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
    assert task.items[0].prompt == "Question: 0+1\nAnswer:"
    assert task.items[0].choices == [" 1", " 2", " x"]           # target delimiter kept
    assert [i.answer for i in task.items[:3]] == [" 1", " 3", " x"]


def test_generation_task_keeps_stops_budget_and_regex(task_dir):
    task = load_task(str(task_dir / "gen.yaml"))
    assert (task.name, task.kind, task.max_new_tokens, task.stop) == ("evomerge_local_gen", "generate", 5, [";"])
    assert task.items[1].answer == "3"
    assert task.is_correct(1, "1+2=3;=9") and not task.is_correct(1, "=4")


def test_unknown_lm_eval_task_is_named():
    with pytest.raises(EvomergeError, match="unknown lm-eval task 'no_such_task_xyz'"):
        load_task("no_such_task_xyz")

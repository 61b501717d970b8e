"""The task format: JSONL items + YAML definition, zoo tasks, and one-line errors."""

from __future__ import annotations

import pytest

from evomerge.errors import EvomergeError
from evomerge.tasks.task import load_task, zoo_task_names
from evomerge.zoo.skills import N_HELDOUT, N_SEARCH


def write_task(tmp_path, lines, kind="generate", extra=""):
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / "task.yaml"
    path.write_text(f"name: mine\nkind: {kind}\ndata: items.jsonl\n{extra}")
    return path


def test_zoo_tasks_have_fixed_disjoint_splits():
    assert zoo_task_names() == ["zoo/arith", "zoo/calc", "zoo/lang", "zoo/strings"]
    for name in zoo_task_names():
        search, heldout = load_task(name), load_task(f"{name}:heldout")
        assert (len(search), len(heldout)) == (N_SEARCH, N_HELDOUT)
        assert search.split == "search" and heldout.split == "heldout"
        assert not {i.prompt for i in search.items} & {i.prompt for i in heldout.items}
        assert len(load_task(f"{name}:all")) == N_SEARCH + N_HELDOUT
        assert {i.meta["level"] for i in search.items} == {1, 2, 3}


def test_composite_answer_is_extracted_from_the_worked_solution():
    task = load_task("zoo/calc")
    item = task.items[0]
    assert task.is_correct(0, item.meta["worked"])
    assert task.extract_answer("12+34=46") == "46"
    assert task.extract_answer("12+34") == ""
    assert not task.is_correct(0, item.meta["worked"] + "1")


def test_generate_task_from_yaml(tmp_path):
    path = write_task(tmp_path, ['{"id": "a", "prompt": "2+2=", "answer": "4"}', '{"prompt": "x", "answer": 5}'],
                      extra="max_new_tokens: 3\nstop: [';']\n")
    task = load_task(path)
    assert (task.name, task.kind, task.max_new_tokens, len(task)) == ("mine", "generate", 3, 2)
    assert task.items[1].answer == "5" and task.items[1].id == "items-2"
    assert task.is_correct(0, " 4 ;junk") and not task.is_correct(0, "44")


def test_multiple_choice_answer_by_text_or_index(tmp_path):
    path = write_task(tmp_path, ['{"prompt": "q", "choices": ["a", "b"], "answer": 1}',
                                 '{"prompt": "q", "choices": ["a", "b"], "answer": "a"}'], kind="multiple_choice")
    task = load_task(path)
    assert [i.answer for i in task.items] == ["b", "a"]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q", "answer": ', "items.jsonl:2: malformed JSON item"),
    ('{"prompt": "q"}', "items.jsonl:2: item has no 'answer' field"),
    ('{"answer": "q"}', "items.jsonl:2: item has no 'prompt' field"),
    ('[1, 2]', "items.jsonl:2: item must be a JSON object"),
])
def test_malformed_items_name_file_and_line(tmp_path, line, message):
    path = write_task(tmp_path, ['{"prompt": "ok", "answer": "1"}', line])
    with pytest.raises(EvomergeError, match=message) as err:
        load_task(path)
    assert "\n" not in str(err.value)


def test_bad_multiple_choice_items(tmp_path):
    path = write_task(tmp_path, ['{"prompt": "q", "choices": ["a", "b"], "answer": "c"}'], kind="multiple_choice")
    with pytest.raises(EvomergeError, match="items.jsonl:1: answer 'c' is not one of the choices"):
        load_task(path)
    path = write_task(tmp_path, ['{"prompt": "q", "answer": "c"}'], kind="multiple_choice")
    with pytest.raises(EvomergeError, match="items.jsonl:1: multiple-choice item needs 'choices'"):
        load_task(path)


def test_bad_definitions(tmp_path):
    with pytest.raises(EvomergeError, match="unknown zoo task 'zoo/poetry'"):
        load_task("zoo/poetry")
    with pytest.raises(EvomergeError, match="unknown split 'train'"):
        load_task("zoo/arith:train")
    path = write_task(tmp_path, ['{"prompt": "q", "answer": "1"}'], extra="extract: '(('\n")
    with pytest.raises(EvomergeError, match="task.yaml: extract: not a valid regex"):
        load_task(path)
    path.write_text("kind: essay\ndata: items.jsonl\n")
    with pytest.raises(EvomergeError, match="task.yaml: kind: must be one of multiple_choice, generate, got 'essay'"):
        load_task(path)
    path.write_text("kind: generate\ndata: nothere.jsonl\n")
    with pytest.raises(EvomergeError, match="nothere.jsonl: task data file not found"):
        load_task(path)


def test_reference_output_for_likelihood_scoring(tmp_path):
    path = write_task(tmp_path, ['{"id": "a", "prompt": "calc:Le+Sa=", "answer": "12", "worked": "4+8=12"}'],
                      extra="target: worked\ntarget_eos: true\n")
    task = load_task(path)
    assert task.reference(0) == "4+8=12" and task.target_eos
    plain = load_task(write_task(tmp_path, ['{"prompt": "1+1=", "answer": 2}']))
    assert plain.reference(0) == "2" and not plain.target_eos       # default: the answer, no end-of-sequence
    calc = load_task("zoo/calc")                                     # the zoo's composite task reads the worked sum
    assert calc.reference(0) == calc.items[0].meta["worked"] and calc.reference(0).endswith("=" + calc.items[0].answer)


def test_a_target_field_missing_from_an_item_names_the_item(tmp_path):
    path = write_task(tmp_path, ['{"id": "a", "prompt": "p", "answer": "1", "worked": "w"}',
                                 '{"id": "b", "prompt": "q", "answer": "2"}'], extra="target: worked\n")
    with pytest.raises(EvomergeError, match=r"task.yaml: item b has no field 'worked' \(named by 'target'\)"):
        load_task(path)


def test_shipped_zoo_data_is_what_the_generator_makes():
    from evomerge.tasks.task import DATA_DIR
    from evomerge.zoo.skills import task_files

    for name, content in task_files().items():
        assert (DATA_DIR / "zoo" / name).read_text() == content, name

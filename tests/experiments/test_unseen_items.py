"""The unseen calc items (experiments/unseen_items.py): a second, larger held-out set that no
zoo model was trained on; the shipped files are what the script writes today."""

import json

from evomerge.tasks.task import load_task


def test_shipped_unseen_items_are_up_to_date_and_outside_every_split_and_corpus(experiment):
    script = experiment("unseen_items")
    files = script.unseen_files()
    for name, text in files.items():
        assert (script.DATA / name).read_text() == text, f"{name} is stale: run experiments/unseen_items.py"
    task = load_task(script.TASK)
    shipped = {item.prompt for split in ("search", "heldout") for item in load_task(f"zoo/calc:{split}").items}
    prompts = [item.prompt for item in task.items]
    assert len(prompts) == len(set(prompts)) > 1000
    assert not set(prompts) & shipped
    rows = [json.loads(line) for line in files["calc-unseen.jsonl"].splitlines()]
    for row in rows:
        a, b = map(int, row["worked"].partition("=")[0].split("+"))
        assert row["answer"] == str(a + b) and a >= 10 and b >= 10
    assert task.is_correct(0, rows[0]["worked"]) and not task.is_correct(0, "10+1=11")

"""The unseen calc items (experiments/unseen_items.py): a second, larger held-out set that no
zoo model was trained on; the shipped files are what the script writes today."""

import json

import pytest

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


def test_untaught_items_are_the_easier_levels_outside_the_splits_never_taught_whole(experiment):
    from evomerge.zoo.build import trained_prompts

    script = experiment("unseen_items")
    task = load_task(script.UNTAUGHT_TASK)
    shipped = {item.prompt for split in ("search", "heldout") for item in load_task(f"zoo/calc:{split}").items}
    prompts = {item.prompt for item in task.items}
    assert {item.meta["level"] for item in task.items} == {1, 2} and len(prompts) == len(task.items) > 500
    assert not prompts & shipped and not prompts & trained_prompts(end_to_end=True)
    # but they are not unseen: each was in some corpus, with a half of its answer taught
    assert prompts <= trained_prompts()


def test_describe_compares_sums_of_any_item_set(experiment):
    unseen = experiment("unseen_items")
    # every 2+2-digit pair: operands average 54.5 each
    assert unseen.describe([(a, b) for a in range(10, 100) for b in range(10, 100)]).startswith(
        " 8100 items: mean sum 109.0")
    assert unseen.describe([(10, 10), (95, 15)]) == "    2 items: mean sum 65.0, sum >= 100 50%, carry in the ones 50%"
    # shipped rows keep the worked sum under meta and mix levels; only 2+2-digit rows count
    rows = ('{"prompt": "p", "meta": {"level": 3, "worked": "38+16=54"}}\n'
            '{"prompt": "q", "meta": {"level": 2, "worked": "38+6=44"}}\n'
            '{"prompt": "r", "level": 3, "worked": "10+28=38"}\n')
    assert unseen.level3_pairs(rows) == [(38, 16), (10, 28)]


def test_a_zoo_from_another_seed_gets_its_own_unseen_items_beside_it(experiment, tmp_path):
    from evomerge.zoo import build

    script, common = experiment("unseen_items"), experiment("common")
    quick = dict(pretrain=dict(steps=2, batch=2, lr=1e-3, warmup=1),
                 finetune=dict(steps=1, batch=2, lr=1e-3, warmup=1, replay=0.5))
    other = build.build_zoo(tmp_path / "other", verbose=False, seed=build.SEED + 1, **quick)
    assert script.zoo_data([]) == (build.SEED, script.DATA)
    assert script.zoo_data(["--zoo", str(other.root)]) == (build.SEED + 1, other.root / "eval")
    assert common.level_sets(None) == (common.UNSEEN_TASK, common.UNTAUGHT_TASK)
    with pytest.raises(SystemExit, match="unseen_items.py --zoo"):
        common.level_sets(other.root)               # not written yet: the experiments say how
    (other.root / "eval").mkdir()
    (other.root / "eval" / "calc-unseen.yaml").write_text("")
    assert common.level_sets(other.root)[0] == str(other.root / "eval" / "calc-unseen.yaml")


def test_calc_wide_halves_every_level_of_the_unseen_and_untaught_items_into_search_and_heldout(experiment):
    script = experiment("unseen_items")
    wide = script.DATA / "calc-wide.yaml"
    search, heldout = (load_task(f"{wide}:{split}") for split in ("search", "heldout"))
    together = load_task(script.TASK).items + load_task(script.UNTAUGHT_TASK).items
    prompts = {split: [item.prompt for item in task.items] for split, task in (("s", search), ("h", heldout))}
    assert not set(prompts["s"]) & set(prompts["h"])                     # judged on items it never searched on
    assert sorted(prompts["s"] + prompts["h"]) == sorted(item.prompt for item in together)
    for level in (1, 2, 3):
        n = [sum(item.meta["level"] == level for item in task.items) for task in (search, heldout)]
        assert abs(n[0] - n[1]) <= 1 and min(n) > 10, (level, n)
    assert len(search.items) // 10 > 100            # a 10% subset is over 100 items, not 20
    # the split is a fixed draw: the same files again
    files = script.unseen_files()
    assert files["calc-wide.search.jsonl"] == (script.DATA / "calc-wide.search.jsonl").read_text()

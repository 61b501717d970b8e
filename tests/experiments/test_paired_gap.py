"""Claims carry a paired gap whose standard error counts the draw of the evaluation items."""

import numpy as np


class ItemScores:
    """Per-item 0/1 scores looked up by plan: paired_gap needs only ``scores(plan, task)``."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def scores(self, plan: dict, task_spec: str) -> np.ndarray:
        return self.table[plan["name"]]


def _pairs(seeds: int) -> list[tuple[dict, dict]]:
    return [({"name": f"a{s}"}, {"name": f"b{s}"}) for s in range(seeds)]


def test_the_gap_is_the_mean_item_difference_and_counts_seeds_ahead_and_behind(experiment):
    common = experiment("common")
    rng = np.random.default_rng(1)
    table = {}
    for s in range(4):
        b = rng.integers(0, 2, 200).astype(float)
        a = b.copy()
        a[: 10 * s] = 1.0                         # seed s: a is right on up to 10 s more items
        table[f"a{s}"], table[f"b{s}"] = a, b
    gap = common.paired_gap(ItemScores(table), _pairs(4), "task")
    expected = np.mean([(table[f"a{s}"] - table[f"b{s}"]).mean() for s in range(4)])
    assert abs(gap["mean"] - expected) < 1e-12
    assert gap["ahead"] == 3 and gap["behind"] == 0        # seed 0: no gap
    assert gap["seeds"] == 4 and gap["items"] == 200
    assert gap["se"] > 0 and gap["se_seeds"] > 0


def test_identical_picks_have_no_gap_and_no_error(experiment):
    common = experiment("common")
    same = np.array([1.0, 0.0, 1.0, 1.0])
    table = {f"{k}{s}": same for k in "ab" for s in range(3)}
    gap = common.paired_gap(ItemScores(table), _pairs(3), "task")
    assert gap["mean"] == 0.0 and gap["se"] == 0.0 and gap["ahead"] == gap["behind"] == 0


def test_resampling_items_widens_the_error_when_every_seed_shares_one_lucky_item_draw(experiment):
    # Every seed's pick a beats b on the same 5 items and loses on none: the seeds agree
    # perfectly, so the error over seeds is 0, but another draw of the items could have
    # held fewer of those 5 -- the two-way bootstrap sees that.
    common = experiment("common")
    a, b = np.zeros(100), np.zeros(100)
    a[:5] = 1.0
    table = {f"a{s}": a for s in range(5)} | {f"b{s}": b for s in range(5)}
    gap = common.paired_gap(ItemScores(table), _pairs(5), "task")
    assert gap["se_seeds"] == 0.0
    assert 0.01 < gap["se"] < 0.04                # about sqrt(0.05 * 0.95 / 100) = 0.022


def test_a_claim_line_says_whether_the_gap_is_outside_the_noise(experiment):
    builder = experiment("make_readme_tables")
    claim = {"evomerge": 0.44, "cmaes_weights": 0.40, "met": True,
             "gap": {"mean": 0.04, "se": 0.015, "se_seeds": 0.01, "ahead": 8, "behind": 1, "seeds": 10,
                     "items": 100},
             "beyond_noise": True}
    line = builder.claim_line("", claim, "at equal budget evomerge beats CMA-ES")
    assert line.startswith("- at equal budget evomerge beats CMA-ES: **met**")
    assert "paired gap +0.040 ± 0.015" in line and "ahead in 8, behind in 1 of 10 seeds" in line
    assert "outside two standard errors of 0" in line
    fidelity = {"mean_difference": -0.004, "met": True, "se": 0.006, "shown": False}
    line = builder.claim_line("", fidelity, "within 1 point")
    assert "**met**" in line and "± 0.006" in line and "not shown inside 1 point" in line

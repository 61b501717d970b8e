"""The claims re-judged level by level on the larger item sets (experiments/level_composite.py)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


class LevelledScores:
    """Two tasks of levelled items and fixed 0/1 scores per plan: all composite_gap reads."""

    def __init__(self, levels: dict[str, list[int]], table: dict[tuple[str, str], np.ndarray]) -> None:
        self.levels, self.table = levels, table

    def task(self, spec: str):
        return SimpleNamespace(items=[SimpleNamespace(meta={"level": lv}) for lv in self.levels[spec]])

    def scores(self, plan: dict, spec: str) -> np.ndarray:
        return self.table[(plan["name"], spec)]


def test_the_composite_gap_weights_each_level_s_gap_by_its_share(experiment):
    lc = experiment("level_composite")
    levels = {"easy": [1] * 50, "hard": [3] * 200}
    table = {}
    for s in range(3):
        table[(f"a{s}", "easy")], table[(f"b{s}", "easy")] = np.ones(50), np.r_[np.ones(40), np.zeros(10)]
        table[(f"a{s}", "hard")], table[(f"b{s}", "hard")] = np.zeros(200), np.r_[np.ones(10), np.zeros(190)]
    pairs = [({"name": f"a{s}"}, {"name": f"b{s}"}) for s in range(3)]
    gap = lc.composite_gap(LevelledScores(levels, table), pairs, {1: 0.25, 3: 0.75}, tasks={1: "easy", 3: "hard"})
    assert abs(gap["per_level"]["1"] - 0.2) < 1e-12 and abs(gap["per_level"]["3"] + 0.05) < 1e-12
    assert abs(gap["mean"] - (0.25 * 0.2 - 0.75 * 0.05)) < 1e-12
    assert abs(gap["a"] - 0.25) < 1e-12 and abs(gap["b"] - (0.25 * 0.8 + 0.75 * 0.05)) < 1e-12
    assert gap["ahead"] == 3 and gap["behind"] == 0 and gap["se"] > 0


def test_verdicts_say_which_side_of_the_threshold_and_whether_beyond_the_noise(experiment):
    builder = experiment("make_readme_tables")
    v = builder.composite_verdict
    assert v({"mean": 0.04, "se": 0.01}, "beat") == "**met**, beyond the noise"
    assert v({"mean": 0.01, "se": 0.01}, "beat") == "**met**, within the noise"
    assert v({"mean": 0.0, "se": 0.01}, "beat") == "**NOT met**, within the noise"
    assert v({"mean": 0.0, "se": 0.01}, "reach") == "**met**, within the noise"
    assert v({"mean": -0.03, "se": 0.01}, "reach") == "**NOT met**, beyond the noise"
    assert v({"mean": -0.002, "se": 0.003}, "1 point") == "**met**, beyond the noise"
    assert v({"mean": -0.008, "se": 0.007}, "1 point") == "**met** by the mean, not beyond the noise"
    assert v({"mean": -0.018, "se": 0.008}, "1 point") == "**NOT met**"


def test_the_section_is_built_from_the_result_file(experiment):
    builder = experiment("make_readme_tables")
    result = json.loads((ROOT / "experiments" / "results" / "level_composite.json").read_text())
    text = "\n".join(builder.level_composite(result))
    assert "`.venv/bin/python experiments/level_composite.py`" in text
    for name, e in result["experiments"].items():
        for key, g in e["claims"].items():
            assert builder.COMPOSITE_CLAIMS[key][0] in text
            assert f"| {g['a']:.3f} | {g['b']:.3f} | {g['mean']:+.3f} ± {g['se']:.3f}" in text


def test_the_wide_fidelity_picks_are_judged_only_on_the_half_they_did_not_search_on(experiment):
    builder = experiment("make_readme_tables")
    result = json.loads((ROOT / "experiments" / "results" / "level_composite.json").read_text())
    wide = result["experiments"]["estimator_fidelity_wide"]
    assert wide["judged_on"] == ["calc-wide.yaml:heldout"]
    assert result["experiments"]["estimator_fidelity"]["judged_on"] == ["calc-unseen.yaml", "calc-untaught.yaml"]
    text = "\n".join(builder.level_composite(result))
    assert "picks are judged on the other half only (calc-wide.yaml:heldout)" in text
    for key, g in wide["claims"].items():
        label = builder.COMPOSITE_CLAIMS[key][0]
        assert f"| estimator_fidelity_wide ({g['seeds']} seeds) | {label} | {g['a']:.3f} |" in text

"""The results page and the README's headline numbers are built only from the experiments' JSON files."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _throughput_json() -> dict:
    machine = {"cpu_cores": 2, "gpu": False, "torch": "2.13.0+cpu", "torch_threads": 1,
               "load_average_1_5_15": [3.5, 2.0, 1.0]}
    median = lambda m, l, s: {"merge_s": m, "load_s": l, "score_s": s, "turnaround_s": m + l + s}  # noqa: E731
    return {"command": ".venv/bin/python experiments/throughput.py", "machine_start": machine,
            "machine_end": machine, "wall_seconds": 90.0,
            "turnaround": {"candidates": 2, "items_per_candidate": 100, "task": "zoo/calc:heldout",
                           "evomerge": {"startup_s": 4.0, "median": median(0.125, 0.004, 0.5)},
                           "mergekit": {"startup_s": 9.0, "median": median(2.5, 1.25, 0.5)},
                           "agreement": {"items_equal_fraction": 1.0},
                           "speedup_turnaround": 6.543, "speedup_materialize_and_load": 29.1},
            "merge_benchmark": {"error": "scripts/bench_merge.py wrote no JSON"}}


def test_tables_come_from_the_json_files(tmp_path, experiment):
    (tmp_path / "throughput.json").write_text(json.dumps(_throughput_json()))
    text = experiment("make_readme_tables").build(tmp_path)
    # numbers, machine and command are taken from the file
    assert "| evomerge (in memory) | 0.125 | 0.004 | 0.500 | 0.629 | 4.0 |" in text
    assert "6.5x" in text and "100.0%" in text
    assert "2 CPU cores, no GPU" in text and "[3.5, 2.0, 1.0]" in text
    assert "`.venv/bin/python experiments/throughput.py`" in text
    assert "scripts/bench_merge.py wrote no JSON" in text
    # experiments without a result file are listed as not run, with their command
    assert "not run yet (`.venv/bin/python experiments/search_quality.py`)" in text
    assert "not run yet (`.venv/bin/python experiments/estimator_fidelity.py`)" in text


def test_main_writes_results_md(tmp_path, experiment):
    (tmp_path / "throughput.json").write_text(json.dumps(_throughput_json()))
    builder = experiment("make_readme_tables")
    import sys

    argv = sys.argv
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\nafter\n")
    sys.argv = ["make_readme_tables.py", "--results", str(tmp_path), "--out", str(tmp_path / "docs" / "results.md"),
                "--readme", str(readme)]
    try:
        assert builder.main() == 0
    finally:
        sys.argv = argv
    assert (tmp_path / "docs" / "results.md").read_text().startswith("# Results")
    spliced = readme.read_text()     # the README gets the headline section and the link, not the tables
    assert "[results page](docs/results.md)" in spliced and "| evomerge (in memory) |" not in spliced
    assert spliced.startswith("intro\n") and spliced.endswith("after\n") and "\nold\n" not in spliced


def test_graded_fidelity_table_and_readme_figure_paths(tmp_path, experiment):
    builder = experiment("make_readme_tables")
    result = json.loads((ROOT / "experiments" / "results" / "estimator_fidelity.json").read_text())
    lines = builder.estimator_fidelity(result)
    text = "\n".join(lines)
    assert result["settings"]["scoring"] == "likelihood"
    assert "`scoring: likelihood`" in text and "likelihood on the subset (the search's estimator)" in text
    assert "![estimator fidelity](estimator_fidelity.png)" in text     # beside RESULTS.md
    # the same search by the same score on every item: the item cut alone, with its verdict
    same = result["summary"]["claims"]["final_unseen_within_1_point_of_graded_full"]
    verdict = "met" if same["met"] else "NOT met"
    assert f"so only the item cut differs), judged on the unseen items: **{verdict}**" in text
    assert f"mean_difference = {same['mean_difference']:.3f}, ± {same['se']:.3f}" in text
    page = builder.relink(text, "../experiments/results/")
    assert "![estimator fidelity](../experiments/results/estimator_fidelity.png)" in page   # from docs/results.md


def test_the_gpu_section_comes_from_the_gpu_check_files(tmp_path, experiment):
    import shutil

    builder = experiment("make_readme_tables")
    assert builder.gpu_check(tmp_path) == []                    # no GPU results: no section
    for name in ("gpu_check.json", "gpu_check_cpu.json", "demo_gpu.json"):
        shutil.copy(ROOT / "experiments" / "results" / name, tmp_path / name)
    text = "\n".join(builder.gpu_check(tmp_path))
    gpu = json.loads((tmp_path / "gpu_check.json").read_text())
    same = sum(a["outputs_equal"] for a in gpu["agreement"].values())
    assert f"{same} of {7 * 100} greedy outputs identical" in text and gpu["info"]["gpu"] in text
    assert "configs/demo-gpu.yaml" in text


def test_search_quality_table_shows_the_unseen_items_beside_the_heldout_ones(experiment):
    builder = experiment("make_readme_tables")
    result = json.loads((ROOT / "experiments" / "results" / "search_quality.json").read_text())
    single = result["single_objective"]
    text = "\n".join(builder.search_quality(result))
    assert f"The same picks on the {single['unseen_items']} unseen items" in text
    final = single["unseen"]["evomerge"][-1]
    assert f"{final['mean']:.3f} ± {final['std']:.3f}" in text
    verdict = "met" if single["claims_unseen"]["evomerge_beats_cmaes_weights_at_equal_budget"]["met"] else "NOT met"
    assert f"CMA-ES-over-weights baseline (its highest estimate; judged on the unseen items): **{verdict}**" in text
    # and a result without the unseen set (older runs) still renders
    for key in ("unseen", "unseen_items", "claims_unseen", "claims_top_unseen"):
        single.pop(key, None)
    assert "unseen items" not in "\n".join(builder.search_quality(result))


def test_mergenetic_s_refused_merges_and_early_ends_are_reported(experiment):
    builder = experiment("make_readme_tables")
    result = json.loads((ROOT / "experiments" / "results" / "search_quality.json").read_text())
    single = result["single_objective"]
    if "mergenetic" not in single["per_seed"]:     # a run with --skip-mergenetic: give it random's rows
        import copy

        for part in ("per_seed", "heldout", "unseen"):
            if part in single and "random" in single[part]:
                single[part]["mergenetic"] = copy.deepcopy(single[part]["random"])
    runs = single["per_seed"]["mergenetic"]
    for run in runs.values():
        run.pop("error", None)
        run["failed_merges"] = []
    first = next(iter(runs))
    runs[first]["failed_merges"] = ["not gonna zero out the whole tensor buddy"] * 2
    text = "\n".join(builder.search_quality(result))
    assert "no items scored: 2 in all." in text and "Runs that ended early" not in text
    runs[first]["error"] = "mergenetic_adapter exited 1: boom"
    single["heldout"].pop("mergenetic", None)
    text = "\n".join(builder.search_quality(result))
    assert f"Runs that ended early: seed {first}: mergenetic_adapter exited 1: boom -- so Mergenetic has no row" in text


def test_each_other_zoo_gets_its_claims_and_its_sources_beside_the_picks(tmp_path, experiment):
    import shutil

    (tmp_path / "throughput.json").write_text(json.dumps(_throughput_json()))
    shutil.copy(ROOT / "experiments/results/level_composite.json", tmp_path)
    other = tmp_path / "zoo-seed7"
    other.mkdir()
    composite = json.loads((ROOT / "experiments/results/level_composite.json").read_text())
    composite["experiments"] = {"search_quality": composite["experiments"]["search_quality"]}
    (other / "level_composite.json").write_text(json.dumps(composite))
    quality = json.loads((ROOT / "experiments/results/search_quality.json").read_text())
    quality["command"] = "search_quality.py --zoo Z7"
    (other / "search_quality.json").write_text(json.dumps(quality))
    text = experiment("make_readme_tables").build(tmp_path)
    section = text.split("### The same claims on another zoo (built from seed 7)")[1].split("\n### ")[0]
    assert "`search_quality.py --zoo Z7`" in section and "`bash experiments/other_zoo.sh 7`" in section
    assert "estimator_fidelity (" not in section          # only the claims of that zoo's files
    lang = quality["single_objective"]["sources_heldout"]["lang"]
    final = quality["single_objective"]["heldout"]["evomerge"][-1]["mean"]
    assert "| held-out | " in section and f"{lang:.3f}" in section and f"{final:.3f}" in section


def test_the_wide_fidelity_run_gets_its_own_section_named_by_its_search_split(tmp_path, experiment):
    builder = experiment("make_readme_tables")
    result = json.loads((ROOT / "experiments" / "results" / "estimator_fidelity.json").read_text())
    for row in result["per_seed"].values():
        row["items_per_candidate"] = {"estimate": 120.0, "full": 1205.0}
    result["settings"]["task"] = "/somewhere/eval/calc-wide.yaml"
    (tmp_path / "estimator_fidelity_wide.json").write_text(json.dumps(result))
    text = builder.build(tmp_path)
    assert "### Estimator cost and fidelity on a search split of 1205 items (zoo, calc-wide)" in text
    assert "evomerge's search on `calc-wide.yaml:search`" in text and "/somewhere" not in text
    assert "judged by full evaluation on the 1205 search items" in text
    assert "![estimator fidelity](estimator_fidelity_wide.png)" in text


def test_a_search_quality_file_names_its_own_split_sizes(tmp_path, experiment):
    builder = experiment("make_readme_tables")
    result = json.loads((ROOT / "experiments" / "results" / "search_quality.json").read_text())
    old = "\n".join(builder.search_quality(result))
    assert "(15 full evaluations of its 200 items)" in old and "on the 100 held-out items" in old
    single = result["single_objective"]
    single.update(task="/somewhere/eval/calc-wide.yaml", budget_items=18075, search_items=1205, heldout_items=1207)
    text = "\n".join(builder.search_quality(result, "search_quality_wide"))
    assert text.startswith("### Search quality per budget on a search split of 1205 items (zoo, calc-wide)")
    assert "`calc-wide.yaml:search` (15 full evaluations of its 1205 items)" in text
    assert "in full on the 1207 held-out items (`calc-wide.yaml:heldout`)" in text and "/somewhere" not in text

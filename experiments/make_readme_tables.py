"""Build the results page (docs/results.md) from the experiments' JSON files, and the README's
three headline numbers.

    .venv/bin/python experiments/make_readme_tables.py [--results DIR] [--out FILE] [--readme README.md]

Every number comes from experiments/results/*.json written by the experiment scripts; a
missing file is listed as not run. Each table says what was measured, on what machine and
the command that reproduces it. ``--readme`` splices the headline numbers (with a link to the
page) between the README's results markers.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RESULTS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def _f(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ms(stats: dict | None, digits=3) -> str:
    """mean ± std [min, max] of a mean_spread dict."""
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"


def machine(result: dict) -> str:
    a, b = result.get("machine_start", {}), result.get("machine_end", {})
    la, lb = a.get("load_average_1_5_15"), b.get("load_average_1_5_15")
    return (f"{a.get('cpu_cores')} CPU cores, {'a GPU' if a.get('gpu') else 'no GPU'}, torch {a.get('torch')} "
            f"({a.get('torch_threads')} thread); 1/5/15-min load average {la} at start, {lb} at the end "
            f"-- the cores are shared with other jobs, so wall times are inflated and noisy; compare "
            f"times within one table only. Whole run: {result.get('wall_seconds', 0) / 60:.1f} min.")


def _repo_relative(path) -> str:
    """A path inside the repository as the repository names it (results are read on other machines)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        return str(Path(str(path)).resolve().relative_to(repo))
    except (ValueError, OSError):
        return str(path)


def zoo_line(result: dict) -> str:
    """Which zoo the numbers come from, and whether it is the one `evomerge zoo build` makes by default."""
    fp = result.get("zoo_fingerprint")
    if not fp:
        return ""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import EXPERT_NAMES, zoo_fingerprint
        from evomerge.zoo.build import is_built, zoo_paths

        paths = zoo_paths(None)
        same = None
        if is_built(paths):
            default = zoo_fingerprint({"base": str(paths.base), **{s: str(paths.experts[s]) for s in EXPERT_NAMES}})
            same = default == fp
    except Exception:  # the tables do not depend on the zoo being present
        same, paths = None, None
    shown = _repo_relative(paths.root) if paths is not None else None
    where = "" if same is None else (f" -- identical to the default zoo ({shown}, the one shipped in the package "
                                     "unless EVOMERGE_ZOO_DIR is set), so the command works without `--zoo`"
                                     if same else f" -- differs from the default zoo at {shown}")
    # Named by its weights, not by the path of whichever checkout measured it.
    measured = shown if same else _repo_relative(result.get("zoo"))
    return (f"**Zoo:** {measured}, weights SHA-256 (first 16 hex) "
            + ", ".join(f"{k} {v}" for k, v in fp.items()) + where + ".")


def header(title: str, result: dict, what: str) -> list[str]:
    return [f"### {title}", "", f"**Measured:** {what}", "", f"**Machine:** {machine(result)}", "",
            f"**Reproduce:** `{result.get('command')}`", "", zoo_line(result), ""]


def claim_line(name: str, claim: dict, text: str) -> str:
    def show(v):
        if isinstance(v, float):
            return _f(v)
        if isinstance(v, list):
            return "[" + ", ".join(show(x) for x in v) + "]"
        return v

    def noise(k, v):
        if k == "gap":        # experiments/common.paired_gap
            return (f"paired gap {v['mean']:+.3f} ± {v['se']:.3f} (standard error, seeds and items resampled; "
                    f"ahead in {v['ahead']}, behind in {v['behind']} of {v['seeds']} seeds)")
        if k == "beyond_noise":
            return "outside two standard errors of 0" if v else "within two standard errors of 0: noise"
        if k == "se":
            return f"± {v:.3f} (standard error, seeds and items resampled)"
        if k == "shown":
            return ("inside 1 point by more than two standard errors" if v else
                    "not shown inside 1 point: the two-standard-error bound reaches past it")
        return f"{k} = {show(v)}"

    details = ", ".join(noise(k, v) for k, v in claim.items() if k != "met")
    return f"- {text}: **{'met' if claim.get('met') else 'NOT met'}** ({details})"


# --------------------------------------------------------------------------- search quality
def binomial_se(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


def heldout_size(task: str) -> int:
    """Number of held-out items of a task, read from the task itself."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from evomerge.tasks.task import load_task

    return len(load_task(f"{task}:heldout").items)


def verdict(best_merge: float | None, best_source: float, stderr: float) -> str:
    """Whether the best merge beats the best source by more than two standard errors."""
    if best_merge is None:
        return "no method returned a merge."
    if best_merge > best_source + 2 * stderr:
        return "the best merge beats the best source by more than two standard errors."
    return ("the differences between methods in these tables are within noise: no method found a merge "
            "clearly better than the sources at the composite task.")


def task_label(spec: str) -> str:
    """A task as the tables name it: a zoo task by its name, a task file by its file name
    (where it lies differs from machine to machine)."""
    return Path(spec).name if spec.endswith(".yaml") else spec


def search_quality(r: dict, name: str = "search_quality") -> list[str]:
    s = r["single_objective"]
    S = r["settings"]
    search_items, heldout_items = s.get("search_items", 200), s.get("heldout_items", 100)   # older files: calc's
    task = task_label(s["task"])
    title = f"Search quality per budget (zoo, composite task, {s['budget_items']} items)"
    if name == "search_quality_wide":
        title = f"Search quality per budget on a search split of {search_items} items (zoo, calc-wide)"
    lines = header(title, r,
                   f"{len(S['seeds'])} seeds; every method gets {s['budget_items']} scored items on "
                   f"`{task}:search` ({s['budget_items'] // search_items} full evaluations of its {search_items} "
                   "items). At each budget point the candidate with the best search fitness so far is re-evaluated "
                   f"in full on the {heldout_items} held-out items (`{task}:heldout`). Cells: held-out accuracy, "
                   "mean ± std [min, max] over seeds.")
    fr = s["fractions"]
    lines += ["| method | " + " | ".join(f"{int(f * s['budget_items'])} items" for f in fr)
              + " | candidates evaluated | items / candidate | s / candidate |",
              "|---" * (len(fr) + 4) + "|"]
    evo = S.get("evomerge", {})
    graded = evo.get("scoring") == "likelihood"
    how = (f"likelihood scores on a fixed random {evo.get('anchor_frac', 0.1):.0%} of the items, nothing calibrated"
           if graded else f"estimator on {evo.get('anchor_frac', 0.1):.0%} anchors, calibration paid from the budget")
    descr = {"evomerge": f"evomerge ({evo.get('optimizer')}, population {evo.get('population')}; {how})",
             "evomerge_top": f"evomerge, its pick re-scored: the top {evo.get('rescore_top')} by estimate scored on "
                             "every search item (paid from the budget)",
             "random": "random search (evomerge `random`, same genome, full evaluation)",
             "cmaes_weights": "CMA-ES over per-model weight + density (mergekit-evolve's algorithm, full evaluation)",
             "mergenetic": "Mergenetic 0.1.1 (its GA + mergekit merges on disk, full evaluation)"}
    for method, rows in s["heldout"].items():
        seeds = s["per_seed"][method]
        evals = [v["evaluations"] for v in seeds.values()]
        ipc = [v.get("items_per_candidate") for v in seeds.values()]
        spc = [v.get("wall_seconds_per_candidate") for v in seeds.values() if v.get("wall_seconds_per_candidate")]
        lines.append(f"| {descr.get(method, method)} | " + " | ".join(_ms(x) for x in rows)
                     + f" | {min(evals)}-{max(evals)} | {ipc[0]} | {_f(sum(spc) / len(spc), 2) if spc else 'n/a'} |")
    for method, seeds in s["per_seed"].items():
        if method not in s["heldout"]:
            errors = "; ".join(str(v.get("error")) for v in seeds.values() if v.get("error"))
            lines.append(f"| {descr.get(method, method)} | did not produce results: {errors or 'no evaluations'} |")
    src = s["sources_heldout"]
    best_name, best_acc = max(src.items(), key=lambda kv: kv[1])
    n_held = heldout_size(r["settings"]["task"])
    stderr = binomial_se(best_acc, n_held)
    lines += ["", "Source models on the held-out items: " + ", ".join(f"{k} {_f(v)}" for k, v in src.items()) + ".",
              ""]
    if s.get("unseen"):
        n_unseen = s["unseen_items"]
        lines += [f"The same picks on the {n_unseen} unseen items (`{Path(s['unseen_task']).name}`: every 2+2-digit "
                  "`calc` item no zoo model was trained on and no split holds, found by replaying the seeded "
                  "training corpora; `experiments/unseen_items.py`). They are all of the hardest level, so the "
                  "accuracies are lower, but a seed's score has a standard error of about "
                  f"{binomial_se(0.13, n_unseen):.3f} instead of {binomial_se(0.4, n_held):.3f}:", "",
                  "| method | " + " | ".join(f"{int(f * s['budget_items'])} items" for f in fr) + " |",
                  "|---" * (len(fr) + 1) + "|"]
        for method, rows in s["unseen"].items():
            lines.append(f"| {descr.get(method, method)} | " + " | ".join(_ms(x) for x in rows) + " |")
        lines += ["", "Source models on the unseen items: "
                  + ", ".join(f"{k} {_f(v)}" for k, v in s["sources_unseen"].items()) + ".", ""]
    so = s.get("heldout_search_only")
    calibrated = any(v.get("calibration") for v in s["per_seed"].get("evomerge", {}).values())
    if graded:
        lines += ["evomerge's fitness here is graded: per item, the probability the merge gives the reference "
                  "output (the worked sum, then end-of-sequence), read in one forward pass "
                  "(`scoring: likelihood`); the mean over a fixed random "
                  f"{evo.get('anchor_frac', 0.1):.0%} of the search items is the estimate (`estimator: subset`). "
                  "Every result is still judged by exact match of the greedy output on the held-out items"
                  + (" and the unseen ones." if s.get("unseen") else "."), ""]
    if so and calibrated:
        lines += ["The same, counting only merges the method's optimizer proposed (evomerge's calibration population "
                  "-- the unmodified sources and a few random merges, fully scored -- may not be returned; the "
                  "budget positions still include its cost):", "",
                  "| method | " + " | ".join(f"{int(f * s['budget_items'])} items" for f in fr) + " |",
                  "|---" * (len(fr) + 1) + "|"]
        for method, rows in so.items():
            lines.append(f"| {descr.get(method, method)} | " + " | ".join(_ms(x) for x in rows) + " |")
        lines.append("")
        evo_rows = s["per_seed"].get("evomerge", {})
        picked = [((v.get("curve") or [{}])[-1].get("plan") or {}) for v in evo_rows.values()]
        from_sources = [p for p in picked if p.get("merge_method") == "linear" and len(p.get("models", [])) == 1]
        finals = [v["curve_search_only"][-1]["heldout"] for m in s["per_seed"] for v in s["per_seed"][m].values()
                  if v.get("curve_search_only") and v["curve_search_only"][-1].get("heldout") is not None]
        lines += [f"Reading: in {len(from_sources)} of {len(picked)} seeds evomerge's final pick (first table) is an "
                  "unmerged source model from its calibration population"
                  + (f" ({', '.join(sorted({p['models'][0]['model'] for p in from_sources}))})" if from_sources else "")
                  + f". At the full budget the best merge any method returns scores {_f(max(finals) if finals else None)} on the held-out "
                  f"items, against {_f(best_acc)} for the best source ({best_name}); one held-out item is "
                  f"{1 / n_held:.2f} and the binomial standard error at that accuracy is {stderr:.3f}: "
                  + verdict(max(finals) if finals else None, best_acc, stderr), ""]
    evo = s["per_seed"].get("evomerge", {})
    if evo and calibrated:
        first = next(iter(evo.values()))
        cal = first.get("calibration", {})
        obj = next(iter(cal.get("objectives", {}).values()), {})
        lines += [f"evomerge's calibration: {cal.get('population')} models (the sources + random merges) scored on "
                  f"every search item = {cal.get('items_spent')} items of the budget; {obj.get('anchors')} anchors; "
                  "estimator (" + str(next(iter(next(iter(evo.values()))["calibration"]["objectives"].values()))
                                      .get("estimator_chosen_by", "chosen by the calibration's validation error"))
                  + "): "
                  + ", ".join(f"seed {k}: {next(iter(v['calibration']['objectives'].values()))['estimator']}"
                              for k, v in evo.items()) + ".", ""]
    mg = s["per_seed"].get("mergenetic", {})
    if mg:
        summ = next((v["summary"] for v in mg.values() if v.get("summary")), {})
        failed = sum(len(v.get("failed_merges", [])) for v in mg.values())
        errors = {seed: v["error"] for seed, v in mg.items() if v.get("error")}
        lines += ["Mergenetic ran its own `Searcher` / pymoo `GA` / `TiesMerger` (mergekit 0.0.6 merges written to "
                  "disk and loaded with `from_pretrained`) with a custom metric hook scoring the zoo task; imports it "
                  "only needs for its predefined lm-eval problems were shimmed ("
                  + ", ".join(summ.get("shimmed_modules", []) or ["none"]) + "), and its `low_cpu_memory=True` "
                  "merge option (which mergekit 0.0.6 maps to CUDA storage) is cleared on CPU -- see "
                  "experiments/mergenetic_adapter.py. A genome whose merge mergekit refuses (a TIES density that "
                  "keeps no entry of a tensor) counts as a failed candidate with the worst fitness and no items "
                  f"scored: {failed} in all."
                  + ("" if not errors else " Runs that ended early: "
                     + "; ".join(f"seed {seed}: {err}" for seed, err in errors.items())
                     + ("" if "mergenetic" in s["heldout"] else " -- so Mergenetic has no row above.")), ""]
    lines += ["Claims (means over seeds):"]
    held = "; judged on the held-out items"
    for key, label in (("claims", ("any candidate it scored" if calibrated else "its highest estimate") + held),
                       ("claims_search_only", "only its optimizer's merges" + held),
                       ("claims_top", f"its pick re-scored, top {S.get('evomerge', {}).get('rescore_top')}" + held),
                       ("claims_unseen", "its highest estimate; judged on the unseen items"),
                       ("claims_top_unseen", f"its pick re-scored, top {S.get('evomerge', {}).get('rescore_top')}; "
                                             "judged on the unseen items")):
        c = s.get(key, {})
        if key == "claims_search_only" and not calibrated:
            continue                                   # nothing but the optimizer's merges to begin with
        if "evomerge_half_budget_reaches_random_final" in c:
            lines.append(claim_line("", c["evomerge_half_budget_reaches_random_final"],
                                    f"evomerge reaches random search's final accuracy with half the budget ({label})"))
        if "evomerge_beats_cmaes_weights_at_equal_budget" in c:
            lines.append(claim_line("", c["evomerge_beats_cmaes_weights_at_equal_budget"],
                                    f"at equal budget evomerge beats the CMA-ES-over-weights baseline ({label})"))
    se = binomial_se(0.4, n_held)
    lines += ["", "Noise: each claim's paired gap compares the two picks seed by seed, item by item; its "
              "standard error resamples seeds and items together, since every seed is judged on the same "
              "items and the spread over seeds alone would leave out their draw (`paired_gap` in "
              f"experiments/common.py). One seed's held-out score has a binomial standard error of about "
              f"{se:.3f} at accuracy 0.4 ({n_held} items)"
              + (f"; on the {s['unseen_items']} unseen items about {binomial_se(0.13, s['unseen_items']):.3f} "
                 "at accuracy 0.13, and gaps between methods shrink with the accuracy there too."
                 if s.get("unseen") else ".")]
    lines.append("")
    m = r.get("multi_objective")
    if m:
        lines += [f"Multi-objective ({' + '.join(m['objectives'])}), {m['budget_items']} items per run: hypervolume "
                  "(reference 0, 0) of the held-out scores of the front found so far (front = non-dominated by "
                  "search fitness), mean ± std [min, max] over seeds.", "",
                  "| method | " + " | ".join(f"{int(f * m['budget_items'])} items" for f in m["fractions"]) + " |",
                  "|---" * (len(m["fractions"]) + 1) + "|"]
        multi_graded = (m.get("settings") or S.get("multi_objective", {})).get("evomerge", {}).get("scoring") == "likelihood"
        names = {"evomerge": "evomerge (NSGA-II, " + ("likelihood scores on 10% of the items)" if multi_graded
                                                       else "estimator)"),
                 "random": "random search (full evaluation)"}
        for method, rows in m["hypervolume"].items():
            lines.append(f"| {names.get(method, method)} | " + " | ".join(_ms(x) for x in rows) + " |")
        for method, rows in (m.get("hypervolume_search_only") or {}).items():
            if method == "evomerge" and not multi_graded:
                lines.append(f"| {names.get(method, method)}, optimizer's merges only | "
                             + " | ".join(_ms(x) for x in rows) + " |")
        if not multi_graded:
            lines += ["", "evomerge's front may include its calibration population (for example the strings expert, "
                      "which is on the front by itself); the last row leaves those out (0 where the calibration has "
                      "used up the budget so far)."
                      + (f" That row was added from the run's archives by `{m['hypervolume_search_only_by']}`."
                         if m.get("hypervolume_search_only_by") else "")]
        lines.append("")
    lines += [f"![search quality]({name}.png)", ""]
    return lines


# --------------------------------------------------------------------------- estimator fidelity
def estimator_fidelity(r: dict, name: str = "estimator_fidelity") -> list[str]:
    S, s = r["settings"], r["summary"]
    graded = S.get("scoring") == "likelihood"
    estimator = (f"likelihood scores on a fixed random {S['anchor_frac']:.0%} of the items (`scoring: likelihood`, "
                 "`estimator: subset`, nothing calibrated)" if graded else
                 f"the estimator on {S['anchor_frac']:.0%} anchors (IRT calibrated first)")
    search_items = next(iter(r["per_seed"].values()))["items_per_candidate"]["full"]
    task = task_label(S["task"])
    title = "Estimator cost and fidelity during a real search (zoo)" + ("" if graded else ": gp-IRT on 0/1 anchors")
    if name == "estimator_fidelity_wide":
        title = f"Estimator cost and fidelity on a search split of {search_items:.0f} items (zoo, calc-wide)"
    lines = header(title, r,
                   f"per seed ({len(S['seeds'])} seeds), evomerge's search on `{task}:search` with "
                   f"{S['candidates']} candidates ({S['optimizer']}, population {S['population']}), once with "
                   f"{estimator} (every k-th candidate also scored on all items, k = {S['audit_every']}) and once "
                   "with full exact evaluation"
                   + (" (and, with graded scores, once with the same score on every item)" if graded else "")
                   + "; then each search's best candidate (by its own fitness) scored on "
                   + ("the held-out items" if name != "estimator_fidelity_wide" else
                      "the held-out items: calc-wide's held-out split, the other half of every level")
                   + (f" (and on the {S['unseen'].rpartition('/')[2]} items no zoo model was trained on: "
                      "experiments/unseen_items.py)." if S.get("unseen") else "."))
    per = r["per_seed"]
    unseen = all(p.get("unseen_best") for p in per.values())
    same_score = all(p.get("graded_full_search") for p in per.values())
    lines += ["| seed | estimator | items / candidate (estimate vs full) | s / candidate (estimate vs full) | "
              "Spearman (audited) | held-out best: estimator search | held-out best: full search |"
              + ((" held-out / unseen best: full search, same score |" if unseen else
                  " held-out best: full search, same score |") if same_score else "")
              + (" unseen: estimator search / its pick re-scored / full search |" if unseen else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if same_score else "") + ("---|" if unseen else "")]
    for seed, p in per.items():
        u, g = p.get("unseen_best") or {}, p.get("graded_full_search") or {}
        lines.append(f"| {seed} | {p['estimator']} | {p['items_per_candidate']['estimate']:.0f} vs "
                     f"{p['items_per_candidate']['full']:.0f} | {p['seconds_per_candidate']['estimate']:.2f} vs "
                     f"{p['seconds_per_candidate']['full']:.2f} | {_f(p['audit_spearman'], 2)} (n={p['audited']}) | "
                     f"{_f(p['heldout_best']['estimate_search'])} | {_f(p['heldout_best']['full_search'])} |"
                     + (f" {_f(g.get('heldout'))}" + (f" / {_f(g.get('unseen'))}" if unseen else "") + " |"
                        if same_score else "")
                     + (f" {_f(u.get('estimate_search'))} / {_f(u.get('top'))} / {_f(u.get('full_search'))} |"
                        if unseen else ""))
    lines += ["", f"Items per candidate cut {_ms(s['items_reduction'], 1)}x; wall time per candidate cut "
              f"{_ms(s['time_reduction_per_candidate'], 2)}x (merging is a fixed cost per candidate). Spearman over "
              f"all {s['audited_candidates']} audited candidates pooled: {_f(s['audit_spearman_pooled'], 2)}.", "",
              "Alternatives recomputed from the audited candidates' item scores (Spearman vs exact accuracy on "
              "every search item, mean ± std [min, max] over seeds):", "", "| estimator | Spearman |", "|---|---|"]
    labels = {"subset_exact": "0/1 exact match on the same subset",
              "subset_likelihood": "likelihood on the subset (the search's estimator)",
              "full_likelihood": "likelihood on every search item"}
    for estimator_name, st in s["all_estimators_spearman"].items():
        lines.append(f"| {labels.get(estimator_name, estimator_name)} | {_ms(st, 2)} |")
    c = s["claims"]
    claims = [
        claim_line("", c["items_cut_at_least_10x"], "the estimator cuts scored items per candidate by at least 10x"),
        claim_line("", c["final_heldout_within_1_point"],
                   "the search's final held-out result stays within 1 point of the same search with full "
                   "evaluation, judged on the held-out items (met: at most 1 point worse)"),
        claim_line("", c["final_top_heldout_within_1_point"],
                   f"the same for evomerge's own pick (the top {S.get('rescore_top')} by estimate re-scored "
                   "on every search item, as the demo does), on the held-out items; items cut counting "
                   "that re-scoring")
        if "final_top_heldout_within_1_point" in c else "",
        claim_line("", c["final_unseen_within_1_point"],
                   "the search's final result stays within 1 point of the full-evaluation search, judged on "
                   "the unseen items (standard error of a seed's score about 0.01, not 0.05)")
        if "final_unseen_within_1_point" in c else "",
        claim_line("", c["final_top_unseen_within_1_point"],
                   "the same for evomerge's own pick (top "
                   f"{S.get('rescore_top')} re-scored), on the unseen items")
        if "final_top_unseen_within_1_point" in c else "",
        _unseen_scale_note(per, c) if "final_unseen_within_1_point" in c else "",
        *[claim_line("", c[f"final_{key}_within_1_point_of_graded_full"],
                     "the estimator search against the same search with full evaluation by the same score "
                     "(likelihood on every search item, so only the item cut differs), judged on the "
                     f"{label} items")
          for key, label in (("heldout", "held-out"), ("unseen", "unseen"))
          if f"final_{key}_within_1_point_of_graded_full" in c],
        claim_line("", c["final_on_search_items_within_1_point"],
                   f"the same, judged by full evaluation on the {search_items:.0f} search items (a bias in "
                   "favour of the full-evaluation search, whose pick is the maximum of those very scores)")
        if "final_on_search_items_within_1_point" in c else "",
    ]
    return lines + ["", "Claims:", *[line for line in claims if line], "", f"![estimator fidelity]({name}.png)", ""]


def _unseen_scale_note(per: dict, c: dict) -> str:
    """Absolute gaps shrink with the accuracy: say what the unseen gap is relative to the score."""
    full = sum(p["unseen_best"]["full_search"] for p in per.values()) / len(per)
    held = sum(p["heldout_best"]["full_search"] for p in per.values()) / len(per)
    gap = c["final_unseen_within_1_point"]["mean_difference"]
    se = c["final_unseen_within_1_point"].get("se")
    bound = gap - 2 * se if se is not None else None
    return (f"  Scale: the full-evaluation search's pick scores {full:.3f} on the unseen items and {held:.3f} on the "
            f"held-out ones, so the unseen gap of {gap:+.3f} is {gap / full:+.0%} of the score; the same relative gap "
            f"on the held-out scale would be {gap / full * held:+.3f}"
            + (f" (its two-standard-error bound {bound:+.3f} is {bound / full:+.0%} of the score, "
               f"{bound / full * held:+.3f} on the held-out scale)" if bound is not None else "")
            + ". Read the unseen lines as the direction and size of the gap on one level of the task, measured "
            "precisely, not as the composite task's 1-point threshold.")


# --------------------------------------------------------------------------- level composite
COMPOSITE_CLAIMS = {   # claim key (experiments/level_composite.py) -> (what it compares, its threshold)
    "evomerge:half_budget_vs_random_final": ("evomerge at half budget (highest estimate) vs random search's final",
                                             "reach"),
    "evomerge:vs_cmaes_weights_equal_budget": ("evomerge (highest estimate) vs CMA-ES over weights, equal budget",
                                               "beat"),
    "evomerge_top:half_budget_vs_random_final": ("evomerge at half budget (top 3 re-scored) vs random's final",
                                                 "reach"),
    "evomerge_top:vs_cmaes_weights_equal_budget": ("evomerge (top 3 re-scored) vs CMA-ES over weights, equal budget",
                                                   "beat"),
    "evomerge:vs_mergenetic_equal_budget": ("evomerge (highest estimate) vs Mergenetic, equal budget", "beat"),
    "evomerge_top:vs_mergenetic_equal_budget": ("evomerge (top 3 re-scored) vs Mergenetic, equal budget", "beat"),
    "estimator_vs_full_exact": ("estimator search (highest estimate) vs the same search, full exact evaluation",
                                "1 point"),
    "top_vs_full_exact": ("estimator search (top 3 re-scored) vs the same search, full exact evaluation", "1 point"),
    "estimator_vs_full_same_score": ("estimator search (highest estimate) vs the same search, the same score on "
                                     "every item", "1 point"),
    "top_vs_full_same_score": ("estimator search (top 3 re-scored, items counted in the fidelity table) vs the same "
                               "search, the same score on every item", "1 point"),
}


def composite_verdict(gap: dict, kind: str) -> str:
    m, bound = gap["mean"], 2 * gap["se"]
    if kind == "1 point":
        if m - bound >= -0.01:
            return "**met**, beyond the noise"
        return "**met** by the mean, not beyond the noise" if m >= -0.01 else "**NOT met**"
    met = m >= 0 if kind == "reach" else m > 0
    if not met:
        return "**NOT met**" + (", beyond the noise" if m + bound < 0 else ", within the noise")
    return "**met**" + (", beyond the noise" if m - bound > 0 else ", within the noise")


def level_composite(r: dict, title: str = "The claims on the composite rebuilt from larger item sets",
                    where: str = "stored in the result files above") -> list[str]:
    weights, sets = r["level_weights"], r["level_sets"]
    lines = header(title, r,
                   f"each claim's two picks ({where}, nothing re-searched) judged level by "
                   "level on the largest item sets the zoo has, weighted as the held-out split weights the levels ("
                   + ", ".join(f"level {lv}: {w:.0%} on {sets[lv]['items']} items of {sets[lv]['task']}"
                               for lv, w in weights.items())
                   + "). calc-unseen: no model was trained on these items in any form; calc-untaught: items "
                   "outside the splits that no model was taught end to end, though their halves (the translation, "
                   "the sum) were taught (experiments/unseen_items.py). The standard error resamples seeds (jointly "
                   "over the levels) and items (within each level).")
    lines += ["| experiment | claim | a | b | gap a - b | per level (1 / 2 / 3) | verdict |",
              "|---|---|---|---|---|---|---|"]
    for name, e in r["experiments"].items():
        for key, g in e["claims"].items():
            label, kind = COMPOSITE_CLAIMS.get(key, (key, "beat"))
            per_level = " / ".join(f"{g['per_level'][lv]:+.3f}" for lv in weights)
            lines.append(f"| {name} ({g['seeds']} seeds) | {label} | {g['a']:.3f} | {g['b']:.3f} | "
                         f"{g['mean']:+.3f} ± {g['se']:.3f} (ahead in {g['ahead']}, behind in {g['behind']}) | "
                         f"{per_level} | {composite_verdict(g, kind)} |")
    wide = [name for name in r["experiments"] if name.endswith("_wide")]
    judged = sorted({t for name in wide for t in r["experiments"][name]["judged_on"]})
    lines += ["", "Verdicts: reach = a at least b; beat = a above b; 1 point = a at most 0.01 below b. Beyond the "
              "noise: the two-standard-error interval of the gap lies entirely on the verdict's side."
              + (f" {' and '.join(wide)} searched on half of these sets (calc-wide's search split), so "
                 f"{'its' if len(wide) == 1 else 'their'} picks are judged on the other half only "
                 f"({', '.join(judged)}), with the same level weights." if wide else ""), ""]
    return lines


# --------------------------------------------------------------------------- throughput
def throughput(r: dict) -> list[str]:
    t = r["turnaround"]
    lines = header("Candidate turnaround and merge throughput", r,
                   f"the same {t['candidates']} random TIES recipes of the zoo's 3 experts, each materialized, loaded "
                   f"into the inference engine and scored on {t['items_per_candidate']} items; median seconds per "
                   "candidate. evomerge: in-memory merge from resident sources, weights copied into the resident "
                   "model. mergekit-style: mergekit 0.1.5 `run_merge` to disk (in process), `from_pretrained`, score "
                   "(experiments/mergekit_turnaround_worker.py).")
    lines += ["| path | materialize | load | score | turnaround | one-time startup |", "|---|---|---|---|---|---|"]
    for name, label in (("evomerge", "evomerge (in memory)"), ("mergekit", "mergekit 0.1.5 (disk)")):
        m = t[name].get("median") or {}
        lines.append(f"| {label} | {_f(m.get('merge_s'))} | {_f(m.get('load_s'))} | {_f(m.get('score_s'))} | "
                     f"{_f(m.get('turnaround_s'))} | {_f(t[name].get('startup_s'), 1)} |")
    agree = t.get("agreement") or {}
    lines += ["", f"Turnaround speed-up: {_f(t.get('speedup_turnaround'), 1)}x; materialize + load: "
              f"{_f(t.get('speedup_materialize_and_load'), 1)}x. Per-item outputs identical between the two paths "
              f"for {_f(100 * agree['items_equal_fraction'], 1) if agree else 'n/a'}% of the items.", ""]
    if t["mergekit"].get("error"):
        lines += [f"mergekit path error: {t['mergekit']['error']}", ""]
    bench = r.get("merge_benchmark", {})
    data = bench.get("data")
    if data and "methods" in data:
        lines += [f"Merge throughput, from `{bench.get('measured_by')}` ({bench.get('source')}): "
                  f"{data.get('model_bytes', 0) / 1e9:.2f} GB float32 checkpoints "
                  f"({data.get('shape', {}).get('num_layers')} layers, hidden {data.get('shape', {}).get('hidden_size')}), "
                  f"load average at start {data.get('load_at_start')}.", "",
                  "| method | mergekit to disk (s) | evomerge to disk (s) | evomerge in memory (s, median) | "
                  "peak RSS mergekit / evomerge disk (GB) | max abs diff vs mergekit |", "|---|---|---|---|---|---|"]
        for method, v in data["methods"].items():
            mk, ed, em = v.get("mergekit", {}), v.get("evomerge_disk", {}), v.get("evomerge_memory", {})
            mem = sorted(em.get("merge_s") or [])
            med = mem[len(mem) // 2] if mem else None
            lines.append(f"| {method} | {_f(mk.get('wall_s'), 1)} | {_f(ed.get('wall_s'), 1)} | {_f(med, 1)} | "
                         f"{_f(mk.get('peak_rss_gb'), 2)} / {_f(ed.get('peak_rss_gb'), 2)} | "
                         f"{v.get('max_abs_diff_vs_mergekit', 'n/a')} |")
        lines.append("")
    elif bench.get("error"):
        lines += [f"Merge benchmark: {bench['error']}", ""]
    lines += ["![throughput](throughput.png)", ""]
    return lines


def embedded(results: Path, name: str, title: str, command: str) -> list[str]:
    """An experiment that writes its own Markdown table: included as written, headings demoted."""
    path = results / f"{name}.md"
    if not path.exists():
        return [f"### {title}", "", f"not run yet (`{command}`)", ""]
    body = path.read_text().strip().splitlines()
    if body and body[0].startswith("# "):
        body = body[1:]
    body = [("###" + line) if line.startswith("#") else line for line in body]
    return [f"### {title}", "", f"**Reproduce:** `{command}`", "", *body, ""]


def gpu_check(results: Path) -> list[str]:
    """scripts/gpu_check.py on a CUDA machine against the same script's CPU reference, and the
    demo run there (configs/demo-gpu.yaml)."""
    path, ref_path = results / "gpu_check.json", results / "gpu_check_cpu.json"
    if not path.exists() or not ref_path.exists():
        return []
    g, c = json.loads(path.read_text()), json.loads(ref_path.read_text())
    gi, ci = g["info"], c["info"]
    lines = ["### On a GPU", "",
             f"**Measured:** `scripts/gpu_check.py` on {gi['gpu']} (torch {gi['torch']}, {gi['cpu_cores']} CPU cores) "
             f"against the same script on this machine's CPU (torch {ci['torch']}, 1 thread). The 4 zoo models and "
             "3 TIES merges of the experts, merged on the device from resident sources and scored on the 100 "
             "held-out `calc` items. vLLM did not run there: its GPU build could not be installed on that machine "
             "(no package index, and a wheel far above what a call can carry).", "",
             "**Reproduce:** `python3 scripts/gpu_check.py --device cpu --zoo ZOO --out cpu.json`, then on the GPU "
             "machine `python3 scripts/gpu_check.py --device cuda --zoo ZOO --reference cpu.json --out gpu.json`", ""]
    if "zoo_fingerprint" not in g:   # measured before the zoo was shipped (issue 16)
        lines += ["**Zoo:** an earlier zoo (seed 1234, trained on another machine's CPU and cached there), not the "
                  "shipped one: no GPU has been lent since the zoo was shipped, so these figures are not re-measured. "
                  "They are timings and CPU/GPU agreement, which do not depend on which zoo it is.", ""]
    agree = g.get("agreement", {})
    if agree:
        same = sum(a["outputs_equal"] for a in agree.values())
        total = sum(a["items"] for a in agree.values())
        worst = max(a["likelihood_max_abs_diff"] for a in agree.values())
        lines += [f"Agreement with the CPU, float32: {same} of {total} greedy outputs identical over "
                  f"{len(agree)} models; likelihood scores within {worst:.1e}.", ""]
    lines += ["Per candidate, median over the 7 models; on the GPU the float32 rows ran first and carry CUDA's "
              "warm-up.", "",
              "| per candidate, median (s) | merge | load | score exact (100 items) | score likelihood (100 items) |",
              "|---|---|---|---|---|"]
    for label, r in (("GPU", g), ("CPU", c)):
        for dtype, t in r["turnaround"].items():
            lines.append(f"| {label}, {dtype} | {_f(t['merge'], 4)} | {_f(t['load'], 4)} | {_f(t['score_exact'], 4)} | "
                         f"{_f(t['score_likelihood'], 4)} |")
    gm, cm = g.get("merge_speed"), c.get("merge_speed")
    if gm and cm:
        lines += ["", f"The zoo's models are tiny (h64, 4 layers), so a GPU cannot speed their scoring up: greedy "
                  "decoding is launch-bound there. Merging is what scales: TIES of two fine-tunes of a "
                  f"{gm['parameters'] / 1e6:.0f}M-parameter float32 Llama in memory takes {_f(gm['ties_merge_s'])} s on "
                  f"the GPU and {_f(cm['ties_merge_s'])} s on the CPU ({cm['ties_merge_s'] / gm['ties_merge_s']:.1f}x).", ""]
    demo_path = results / "demo_gpu.json"
    if demo_path.exists():
        d = json.loads(demo_path.read_text())
        best = next(k for k in d["table"] if k.startswith("evomerge search best"))
        runner = d["runner_up"]
        lines += [f"The demo on the GPU (`evomerge demo --config configs/demo-gpu.yaml`: bfloat16, random optimizer): "
                  f"the search's best scores {_f(d['table'][best][d['objective']]['value'])} on held-out "
                  f"`{d['objective']}` against {_f(d['table'][runner][d['objective']]['value'])} for the best other "
                  f"row ({runner}), in {d['seconds']['total']} s ({d['evaluations']} candidates).", ""]
    return lines


def merge_bench(results: Path) -> list[str]:
    """scripts/bench_merge.py's JSON, printed by that script's own table code."""
    path = results / "merge_bench.json"
    command = ".venv/bin/python scripts/bench_merge.py --json experiments/results/merge_bench.json"
    lines = ["### Merge speed and memory against mergekit", "", f"**Reproduce:** `{command}` "
             "(builds three ~220M-parameter float32 Llama checkpoints; mergekit 0.1.5 from "
             "`scripts/setup_mergekit_venv.sh`)", ""]
    if not path.exists():
        return lines + ["not run yet", ""]
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_merge.py"
    table = subprocess.run([sys.executable, str(script), "--table-from", str(path)], capture_output=True,
                           text=True, check=True).stdout.strip()
    return lines + ["```", table, "```", ""]


def crosscheck(results: Path) -> list[str]:
    path = results / "crosscheck.json"
    command = ".venv/bin/python scripts/crosscheck_mergekit.py --json experiments/results/crosscheck.json"
    lines = ["### Same tensors as mergekit", "", f"**Reproduce:** `{command}`", ""]
    if not path.exists():
        return lines + ["not run yet", ""]
    r = json.loads(path.read_text())
    lines += [f"Every recipe in `configs/mergekit/` run through mergekit 0.1.5 and `evomerge merge` on the same "
              f"small Llama checkpoints (shape {r.get('model_shape')}). Deterministic methods: worst absolute "
              f"difference over all tensors (tolerance {r.get('tolerance_fp32')} for float32, "
              f"{r.get('half_ulps')} ulps for 16-bit). Random methods (DARE, DELLA): checked against their "
              "definition and against mergekit's statistics.", "",
              "| recipe | method | dtype | worst difference / check | result |", "|---|---|---|---|---|"]
    documented = r.get("documented_differences", {})
    for row in r["rows"]:
        if "max_abs" in row:
            check = f"{row['max_abs']:.2e} ({row.get('worst_tensor')})"
        elif "changed_fraction_evomerge" in row:
            check = (f"changed fraction {row['changed_fraction_evomerge']:.3f} vs mergekit "
                     f"{row['changed_fraction_mergekit']:.3f}; mean abs delta ratio {row['mean_abs_delta_ratio']:.3f}")
            if "kept_fraction" in row:
                check += f"; kept {row['kept_fraction']:.3f} at density {row['density']}"
        else:
            check = "; ".join(p for p in row.get("problems", []) if p) or "-"
        verdict = "pass" if row["passed"] else ("documented difference" if row["config"] in documented else "FAIL")
        lines.append(f"| {row['config']} | {row['method']} | {row.get('dtype')} | {check} | {verdict} |")
    for name, why in documented.items():
        lines += ["", f"Documented difference, `{name}`: {why}"]
    return lines + [""]


def scaling(results: Path) -> list[str]:
    path = results / "scaling.json"
    command = ".venv/bin/python scripts/bench_scaling.py --json experiments/results/scaling.json"
    lines = ["### Workers and controller overhead (Ray)", "", f"**Reproduce:** `{command}`", ""]
    if not path.exists():
        return lines + ["not run yet", ""]
    r = json.loads(path.read_text())
    load = r.get("machine", {}).get("load_average_at_start")
    lines += [f"Real local Ray on {r.get('machine', {}).get('cpus')} cores (load average at start {load}).", "",
              "| workload | workers | candidates / min | speed-up |", "|---|---|---|---|"]
    for key, label in (("throughput", "real in-memory merges of tiny Llamas (CPU-bound)"),
                       ("throughput_device_bound", "device-bound candidates (sleep, CPU idle)")):
        rows = r.get(key, [])
        first = rows[0]["candidates_per_minute"] if rows else None
        for row in rows:
            lines.append(f"| {label} | {row['workers']} | {row['candidates_per_minute']:.0f} | "
                         f"{row['candidates_per_minute'] / first:.2f}x |")
    overhead = r.get("controller_overhead_per_candidate_s", {})
    lines += ["", f"Controller time per candidate (the whole search loop: optimizer ask/tell, pool dispatch, "
              f"archive writes with fsync, with evaluations that cost nothing): "
              f"{1e3 * overhead.get('wall', float('nan')):.2f} ms wall, {1e3 * overhead.get('cpu', float('nan')):.2f} "
              "ms CPU. Workers one controller keeps busy at a given candidate turnaround:", "",
              "| turnaround (s) | workers (wall) | workers (CPU) |", "|---|---|---|"]
    for t, w in r.get("workers_supported", {}).items():
        lines.append(f"| {float(t):.3g} | {w['wall']:.0f} | {w['cpu']:.0f} |")
    be = r.get("break_even_turnaround_s", {})
    if be:
        lines += ["", f"So the controller is not the bottleneck at 256 workers for candidates slower than "
                  f"{be['wall']:.2f} s (wall) / {be['cpu']:.2f} s (CPU)."]
    return lines + [""]


def other_zoos(results: Path) -> list[str]:
    """The same claims on zoos built from other seeds (results/zoo-seedN/, experiments/other_zoo.sh)."""
    lines = []
    for folder in sorted(results.glob("zoo-seed*")):
        path = folder / "level_composite.json"
        if not path.exists():
            continue
        seed = folder.name.removeprefix("zoo-seed")
        runs = ", ".join(f"`{json.loads((folder / f'{n}.json').read_text()).get('command')}`"
                         for n in ("search_quality", "search_quality_large", "estimator_fidelity",
                                   "estimator_fidelity_wide", "search_quality_wide")
                         if (folder / f"{n}.json").exists())
        composite = level_composite(json.loads(path.read_text()),
                                    f"The same claims on another zoo (built from seed {seed})",
                                 f"from {runs}, on a zoo of the same design built by `evomerge zoo build --seed "
                                 f"{seed}`: other initial weights, other training streams, so other unseen items; "
                                 f"the whole section: `bash experiments/other_zoo.sh {seed}`, about 50 minutes here")
        lines += composite + zoo_scores(folder / "search_quality.json")
    return lines


def zoo_scores(path: Path) -> list[str]:
    """The sources' scores beside each method's final pick: how much merging adds on this zoo."""
    if not path.exists():
        return []
    r = json.loads(path.read_text())["single_objective"]
    methods = [m for m in ("evomerge", "random", "cmaes_weights", "mergenetic") if m in r["heldout"]]
    head = list(r["sources_heldout"]) + methods
    lines = ["Sources and final picks (3000 items, mean over seeds) on the held-out and the unseen items:", "",
             "| items | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, key, sources in (("held-out", "heldout", "sources_heldout"), ("unseen", "unseen", "sources_unseen")):
        if key in r and sources in r:
            cells = [r[sources][s] for s in r[sources]] + [r[key][m][-1]["mean"] for m in methods]
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return lines + [""]


def build(results: Path) -> str:
    lines = ["## Results", "",
             "Generated by `experiments/make_readme_tables.py --readme README.md` from the files in "
             "`experiments/results/`; nothing here is typed by hand. Machine: 2 CPU cores, no GPU, shared with "
             "other jobs while these ran (each table states its load), so wall times are noisy; compare within a "
             "table. Budgets are counted in scored items (one prompt answered by one candidate).", ""]
    lines += embedded(results, "demo", "The demo (`make demo`)", "make demo")
    lines += embedded(results, "zoo_matrix", "The model zoo: accuracy matrix",
                      ".venv/bin/python experiments/zoo_matrix.py --split heldout")
    large = lambda r: search_quality(r, "search_quality_large")  # noqa: E731
    wide_search = lambda r: search_quality(r, "search_quality_wide")  # noqa: E731
    irt = lambda r: estimator_fidelity(r, "estimator_fidelity_irt")  # noqa: E731
    wide = lambda r: estimator_fidelity(r, "estimator_fidelity_wide")  # noqa: E731
    optional = ("search_quality_large", "search_quality_wide", "estimator_fidelity_irt", "estimator_fidelity_wide",
                "level_composite")   # not run: no section
    for name, fn in (("search_quality", search_quality), ("search_quality_large", large),
                     ("search_quality_wide", wide_search),
                     ("estimator_fidelity", estimator_fidelity), ("estimator_fidelity_wide", wide),
                     ("estimator_fidelity_irt", irt),
                     ("level_composite", level_composite), ("throughput", throughput)):
        path = results / f"{name}.json"
        if not path.exists() and name in optional:
            continue
        if not path.exists():
            lines += [f"### {name}", "", f"not run yet (`.venv/bin/python experiments/{name}.py`)", ""]
            continue
        lines += fn(json.loads(path.read_text()))
        if name == "level_composite":
            lines += other_zoos(results)
    lines += embedded(results, "estimators_metabench", "Estimators on real leaderboard data (metabench, AlpacaEval)",
                      ".venv/bin/python experiments/estimators_metabench.py")
    lines += embedded(results, "estimators_zoo", "Estimators on the zoo (rank correlation over random merges)",
                      ".venv/bin/python experiments/estimators_zoo.py")
    lines += gpu_check(results)
    lines += merge_bench(results)
    lines += crosscheck(results)
    lines += scaling(results)
    return "\n".join(lines).rstrip() + "\n"


def _gap(gap: dict) -> str:
    return f"{gap['mean']:+.3f} ± {gap['se']:.3f}"


def headline(results: Path) -> str:
    """The README's results section: three numbers and a link to the page with the rest."""
    lines = ["## Results", "",
             "Measured on the shipped zoo on this project's machine (2 CPU cores, no GPU); every table, the "
             "command that made it and its noise are on the [results page](docs/results.md), generated by "
             "`experiments/make_readme_tables.py` from `experiments/results/`.", ""]
    demo_path = results / "demo.json"
    if demo_path.exists():
        d = json.loads(demo_path.read_text())
        best = f"evomerge search best (candidate {d['best_candidate']})"
        obj = d["objective"]
        runner, source = d.get("margin_over_runner_up"), d.get("margin_over_best_source")
        if runner and source:
            lines.append(
                f"- **The demo** (`make demo`, {d['seconds']['total']:.0f} s): its best merge scores "
                f"{d['table'][best][obj]['value']:.2f} on the held-out `{obj}` items, against "
                f"{d['table'][source['source']][obj]['value']:.2f} for the best source model "
                f"({source['source'].removeprefix('source: ')}; {source['gap']:+.3f} ± {source['paired_stderr']:.3f}, "
                f"paired) and {d['table'][d['runner_up']][obj]['value']:.2f} for the best other row "
                f"({d['runner_up']}; {runner['gap']:+.3f} ± {runner['paired_stderr']:.3f}: {runner['verdict']}).")
    sq_path = results / "search_quality.json"
    if sq_path.exists():
        r = json.loads(sq_path.read_text())["single_objective"]
        cma = r["claims"]["evomerge_beats_cmaes_weights_at_equal_budget"]
        unseen = r.get("claims_unseen", {}).get("evomerge_beats_cmaes_weights_at_equal_budget")
        half = r["claims"]["evomerge_half_budget_reaches_random_final"]
        seeds = cma["gap"]["seeds"]
        lines.append(
            f"- **Search quality** ({r['budget_items']} scored items a run, {seeds} seeds): evomerge's pick minus "
            f"CMA-ES over per-model weights (mergekit-evolve's algorithm) at the same budget: {_gap(cma['gap'])} on "
            f"the held-out items" + (f", {_gap(unseen['gap'])} on the {r.get('unseen_items')} unseen ones" if unseen
                                     else "")
            + f"; at half the budget minus random search's final pick: {_gap(half['gap'])} (held-out).")
    fid_path = results / "estimator_fidelity_wide.json"
    if fid_path.exists():
        f = json.loads(fid_path.read_text())
        c = f["summary"]["claims"]
        same = c.get("final_heldout_within_1_point_of_graded_full")
        lines.append(
            "- **Cheap fitness** (calc-wide, a search split of about 1200 items, "
            f"{len(f['per_seed'])} seeds): "
            f"scoring {c['items_cut_at_least_10x']['ratio']:.1f}x fewer items per candidate moves the search's pick "
            f"by {c['final_heldout_within_1_point']['mean_difference']:+.3f} ± {c['final_heldout_within_1_point']['se']:.3f} "
            f"against the same search with full exact evaluation"
            + (f" ({same['mean_difference']:+.3f} ± {same['se']:.3f} against full evaluation by the same score)"
               if same else "") + " (held-out half).")
    return "\n".join(lines).rstrip() + "\n"


def relink(text: str, prefix: str) -> str:
    """Point the figures (named bare, as they sit beside the result files) at ``prefix``."""
    return re.sub(r"!\[([^\]]*)\]\(([^/)]+\.png)\)", lambda m: f"![{m[1]}]({prefix}{m[2]})", text)


def splice(readme: Path, text: str) -> str:
    """Put ``text`` between the README's results markers."""
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    current = readme.read_text()
    if begin not in current or end not in current:
        raise SystemExit(f"{readme}: no {begin} / {end} markers")
    head, rest = current.split(begin, 1)
    tail = rest.split(end, 1)[1]
    return f"{head}{begin}\n{text}{end}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=RESULTS_PAGE, help="the results page (default docs/results.md)")
    ap.add_argument("--readme", type=Path, default=None, help="also splice the headline numbers into this README")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from evomerge.io.atomic import atomic_write_text

    import os

    figures = os.path.relpath(args.results.resolve(), args.out.resolve().parent) + "/"
    page = "# Results\n\n" + build(args.results).removeprefix("## Results\n\n")
    atomic_write_text(args.out, relink(page, figures))
    print(f"wrote {args.out}")
    if args.readme:
        atomic_write_text(args.readme, splice(args.readme, headline(args.results)))
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

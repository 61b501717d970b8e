"""``evomerge demo``: the README's first command (``make demo``).

1. load the tiny model zoo shipped in the package (checksums verified; ``--zoo DIR`` for
   another one, built first if DIR holds none);
2. run the search of ``configs/demo.yaml`` on it (graded fitness on a tenth of the
   composite task ``calc``), or resume / reuse ``runs/demo`` if it is already there;
3. choose the search's best merge using search items only: the top candidates by
   estimate are re-scored on every search item and the best of them is kept;
4. judge by FULL evaluation on HELD-OUT items (never seen by the search): every source
   model, the standard one-shot recipes at mergekit-style default parameters and the
   search's best merge, and print the table with the best merge's margin over the runner-up
   and its paired standard error (the same items, so their shared difficulty cancels);
5. export the front to ``runs/demo/export`` and write the report (PNGs + report.md);
6. write the numbers to ``experiments/results/demo.json`` and ``demo.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from evomerge.errors import ConfigError, EvomergeError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
MAX_EXPORT = 4                                  # models written to RUN_DIR/export
TOP_K = 4                                       # candidates re-scored on all search items
SKILL_COLUMNS = ("arith", "strings", "lang")    # extra held-out columns, for context


def one_shot_recipes(experts: list[str], base: str) -> dict[str, dict]:
    """The usual one-shot merges of the experts at their common default parameters:
    weight 1 per expert (mergekit has no default weight), density 0.5 where there is one
    (mergekit's examples), mergekit's default normalization per method."""
    def over_base(method: str, **params) -> dict:
        return {"merge_method": method, "base_model": base,
                "models": [{"model": e, "parameters": {"weight": 1.0, **params}} for e in experts]}

    return {
        "linear (uniform average of the experts)": {
            "merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts]},
        "task_arithmetic (weight 1)": over_base("task_arithmetic"),
        "ties (weight 1, density 0.5)": over_base("ties", density=0.5),
        "dare_ties (weight 1, density 0.5)": {**over_base("dare_ties", density=0.5), "random_seed": 0},
    }


def load_demo_config(path: Path, zoo, run_dir: Path | None, tiny: bool = False):
    """The demo config with its sources pointed at the zoo that was found or built."""
    from evomerge.search.config import load_config

    cfg = load_config(path)
    models = {"base": zoo.base, **{skill: p for skill, p in zoo.experts.items()}}
    # absolute: the run directory keeps this config, and relative paths would be read from there
    cfg.sources = {name: str(Path(models.get(name, p)).resolve()) for name, p in cfg.sources.items()}
    if run_dir is not None:
        cfg.run_dir = str(run_dir.resolve())
    if tiny:  # the end-to-end test: the whole pipeline at a token budget
        cfg.optimizer.population, cfg.optimizer.generations = 3, 2
        cfg.calibration.random_merges = 4
        cfg.calibration.dims = [1]
        cfg.audit.every = 3
    return cfg


def open_search(cfg, fresh: bool):
    """A new run, or the existing one in cfg.run_dir resumed (a finished run is reused)."""
    from evomerge.search.run import SearchRun
    from evomerge.search.store import RunStore

    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and fresh:
        if not RunStore.is_run_dir(run_dir):   # never delete what evomerge did not make
            raise EvomergeError(f"{run_dir}: not an evomerge run directory (no run marker); --fresh deletes only "
                                "run directories, so move it away or choose another --run-dir")
        RunStore(run_dir).lock().release()      # nobody is writing it
        shutil.rmtree(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        from evomerge.search.config import load_run_config

        stored = load_run_config(run_dir).model_dump(mode="json")
        wanted = cfg.model_dump(mode="json")
        changed = [key for key in wanted if key != "run_dir" and stored.get(key) != wanted[key]]
        if changed:   # resuming would silently finish the old search, not the one asked for
            raise EvomergeError(f"{run_dir}: made from another demo config (differs in: {', '.join(changed)}); "
                                "pass --fresh to start over")
        print(f"reusing {run_dir} (pass --fresh to start over)")
        return SearchRun.resume(run_dir)
    return SearchRun.create(cfg)


def choose_best(run_dir: Path, objective: str, k: int = TOP_K) -> tuple[int, dict]:
    """The search's best merge, chosen on search items only (held-out items stay unseen):
    the top-k candidates by estimate, re-scored on every search item."""
    from evomerge.search.export import load_records, top_k
    from evomerge.search.run import judge

    records = load_records(run_dir)
    top = top_k(records, k, objective)
    if not top:
        raise EvomergeError(f"{run_dir}: the search has no successful candidate")
    full = judge(run_dir, {str(r.candidate_id): r.plan for r in top}, split="search")
    best = max(top, key=lambda r: (full[str(r.candidate_id)][objective]["value"], -r.candidate_id))
    rescored = {int(cid): s[objective]["value"] for cid, s in full.items()}
    return best.candidate_id, {"plan": best.plan, "estimate": best.value(objective), "rescored_search": rescored}


def paired_margin(best: list[float], other: list[float]) -> tuple[float, float]:
    """Mean per-item difference of two rows scored on the same items, and its standard error."""
    import numpy as np

    diff = np.asarray(best, dtype=float) - np.asarray(other, dtype=float)
    if len(diff) < 2:
        return float(diff.mean()) if len(diff) else 0.0, float("nan")
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def margin_verdict(gap: float, stderr: float) -> str:
    """"better" only beyond two paired standard errors; a smaller lead is noise."""
    if gap > 2 * stderr:
        return "better, beyond two paired standard errors"
    if gap > 0:
        return "ahead, but within the noise (inside two paired standard errors)"
    return "NOT better"


def table_markdown(rows: dict[str, dict], columns: list[str], objective: str) -> str:
    head = f"| model | {' | '.join(c + (' (objective)' if c == objective else '') for c in columns)} |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for label, scores in rows.items():
        cells = [f"{scores[c]['value']:.3f} ± {scores[c]['stderr']:.3f}" if c in scores else "" for c in columns]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def run_demo(config: Path = DEFAULT_CONFIG, run_dir: Path | None = None, results: Path | None = None,
             zoo_dir: Path | None = None, fresh: bool = False, tiny: bool = False, progress: bool = True) -> dict:
    from evomerge.io.atomic import atomic_write_text
    from evomerge.search.calibrate import source_plan
    from evomerge.search.export import export_records, load_records, pareto_front
    from evomerge.search.report import write_report
    from evomerge.search.run import judge
    from evomerge.zoo.build import built_seed, ensure_zoo, file_checksums, is_built, zoo_paths

    t0 = time.time()
    load0 = os.getloadavg()
    if not is_built(zoo_paths(zoo_dir)):
        print(f"building a model zoo at {zoo_paths(zoo_dir).root} (a few CPU minutes)", flush=True)
    zoo = ensure_zoo(zoo_dir, verbose=True)
    print(f"zoo: {zoo.root} (checksums verified)", flush=True)
    cfg = load_demo_config(config, zoo, run_dir, tiny)
    objective = cfg.objectives[0].name
    search = open_search(cfg, fresh)
    run_dir = search.run_dir
    print(f"run directory: {run_dir}", flush=True)
    t_search = time.time()
    search.run(progress=progress)
    search.close()
    t_search = time.time() - t_search

    best_id, best = choose_best(run_dir, objective)
    base = cfg.base
    experts = [s for s in cfg.sources if s != base]
    plans = {f"source: {s}": source_plan(s) for s in cfg.sources}
    plans.update(one_shot_recipes(experts, base))
    best_label = f"evomerge search best (candidate {best_id})"
    plans[best_label] = best["plan"]
    extra = {c: f"zoo/{c}:heldout" for c in SKILL_COLUMNS if c not in cfg.objective_names}
    t_judge = time.time()
    rows = judge(run_dir, plans, split="heldout", extra_tasks=extra, progress=progress, per_item=True)
    t_judge = time.time() - t_judge
    columns = [o.name for o in cfg.objectives if o.heldout_task] + list(extra)
    item_scores = {label: row[objective].pop("scores") for label, row in rows.items()}
    for row in rows.values():
        for column in row.values():
            column.pop("scores", None)

    others = {k: v[objective]["value"] for k, v in rows.items() if k != best_label}
    won = all(rows[best_label][objective]["value"] > v for v in others.values())
    runner_up = max(others, key=others.get)
    gap, gap_se = paired_margin(item_scores[best_label], item_scores[runner_up])
    verdict = margin_verdict(gap, gap_se)
    source_rows = {k: v for k, v in others.items() if k.startswith("source: ")}
    best_source = max(source_rows, key=source_rows.get)
    source_gap, source_se = paired_margin(item_scores[best_label], item_scores[best_source])
    table = table_markdown(rows, columns, objective)
    print(f"\nJudged by full evaluation on held-out items ({rows[best_label][objective]['n_items']} "
          f"{objective} items never used by the search):\n\n{table}\n")
    print(f"search best vs the best other row ({runner_up}): {rows[best_label][objective]['value']:.3f} vs "
          f"{others[runner_up]:.3f}, margin {gap:+.3f} ± {gap_se:.3f} (paired standard error) -> {verdict}")
    print(f"search best vs the best source ({best_source}): margin {source_gap:+.3f} ± {source_se:.3f} -> "
          f"{margin_verdict(source_gap, source_se)}", flush=True)

    records = load_records(run_dir)
    # The best merge plus the search's front; with one objective many candidates can tie
    # on the front, so at most MAX_EXPORT models are written.
    front = pareto_front([r for r in records if r.generation >= 0], cfg.objective_names)
    chosen = [r for r in records if r.candidate_id == best_id]
    chosen += [r for r in front if r.candidate_id != best_id][: MAX_EXPORT - 1]
    exported = export_records(chosen, run_dir, run_dir / "export", overwrite=True)
    report = write_report(run_dir)
    print(f"exported {len(exported)} merge(s) to {run_dir / 'export'}; report: {report}")

    checksums = file_checksums(zoo.root)
    out = {
        "command": "evomerge demo" + (" (tiny)" if tiny else ""),
        "config": str(config), "run_dir": str(run_dir), "objective": objective,
        "judged_on": "full evaluation on held-out items (zoo/<task>:heldout)",
        "table": rows, "best_candidate": best_id, "best_estimate": best["estimate"],
        "rescored_on_search_items": best["rescored_search"],
        "search_best_beats_every_other_row": won, "runner_up": runner_up,
        "margin_over_runner_up": {"gap": round(gap, 4), "paired_stderr": round(gap_se, 4), "verdict": verdict},
        "margin_over_best_source": {"source": best_source, "gap": round(source_gap, 4),
                                    "paired_stderr": round(source_se, 4),
                                    "verdict": margin_verdict(source_gap, source_se)},
        "zoo": {"path": zoo_label(zoo.root), "seed": built_seed(zoo),
                "sha256": {name: checksums[f"{p.name}/model.safetensors"][:16] for name, p in zoo.models.items()}},
        "evaluations": len(records), "exported": [str(p) for p in exported],
        "seconds": {"total": round(time.time() - t0, 1), "search_incl_presearch": round(t_search, 1),
                    "judging": round(t_judge, 1)},
        "load_average": {"start": [round(v, 2) for v in load0], "end": [round(v, 2) for v in os.getloadavg()]},
        "cpus": os.cpu_count(),
    }
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results / "demo.json", json.dumps(out, indent=2) + "\n")
        md = [f"# Demo: `{out['command']}`", "",
              f"Search of `{config.name}` on the zoo; objective `{objective}`; judged by {out['judged_on']}.", "",
              table, "",
              f"Search best (candidate {best_id}, chosen on search items only) against the runner-up "
              f"({runner_up}) on held-out `{objective}`: {gap:+.3f} ± {gap_se:.3f} (paired standard error over "
              f"the same {len(item_scores[best_label])} items): {verdict}. Against the best source model "
              f"({best_source}): {source_gap:+.3f} ± {source_se:.3f}: {margin_verdict(source_gap, source_se)}.", "",
              f"Zoo: `{zoo_label(zoo.root)}` (seed {built_seed(zoo)}), model.safetensors SHA-256 (first 16 hex) "
              + ", ".join(f"{n} {h}" for n, h in out["zoo"]["sha256"].items()) + ".", "",
              f"Wall time {out['seconds']['total']} s (search incl. scoring the sources {out['seconds']['search_incl_presearch']} s, "
              f"judging {out['seconds']['judging']} s) on {out['cpus']} cores, load average "
              f"{out['load_average']['start'][0]} at start / {out['load_average']['end'][0]} at end.", ""]
        atomic_write_text(results / "demo.md", "\n".join(md))
        print(f"numbers: {results / 'demo.json'}")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return out


def zoo_label(root: Path) -> str:
    """A zoo's path as the results should show it: relative to the repository when inside it."""
    try:
        return str(root.resolve().relative_to(REPO))
    except ValueError:
        return str(root)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="demo search config")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: run_dir of the config)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where demo.json / demo.md go (default: experiments/results in the repo)")
    parser.add_argument("--zoo", type=Path, default=None,
                        help="zoo directory (default: the zoo shipped in the package; a directory without one "
                             "gets one built first)")
    parser.add_argument("--fresh", action="store_true", help="delete an existing run directory first")
    parser.add_argument("--tiny", action="store_true", help="a token budget (tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if not args.config.is_file():
        raise ConfigError(f"--config: {args.config}: no such config file")
    results = args.results
    if results is None and (REPO / "experiments" / "results").is_dir() and not args.tiny:
        results = REPO / "experiments" / "results"
    run_demo(args.config, args.run_dir, results, args.zoo, args.fresh, args.tiny, not args.no_progress)
    return 0

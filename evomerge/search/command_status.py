"""``evomerge status RUN_DIR``: where a search stands (safe to run while it is running)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from evomerge.workers.types import ObjectiveScore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory of `evomerge search`")
    parser.add_argument("--heldout", action="store_true",
                        help="also judge the Pareto front by full evaluation on the held-out items (slow: merges)")


def status_lines(run_dir: str | Path) -> list[str]:
    from evomerge.search.store import RunStore

    run_dir = Path(run_dir)
    store = RunStore(run_dir)
    cfg = store.config()
    archive = store.open_archive()
    try:
        meta = archive.meta()
        counts = archive.counts()
        front = archive.front()
        best = archive.best()
        audit = archive.audit_stats()
        engine = engine_line(archive, cfg)
    finally:
        archive.close()
    writer = store.writer()
    state = ("finished" if meta.get("finished") else
             f"running: pid {writer} writes it" if writer else "stopped; `evomerge resume` continues it")
    lines = [
        f"run:          {run_dir} ({state})",
        f"optimizer:    {cfg.optimizer.name}, population {cfg.optimizer.population}, seed {cfg.seed}",
        f"generation:   {meta.get('generation', 0)} of {cfg.optimizer.generations} done",
        f"evaluations:  {counts['total']} ({counts['ok']} ok, {counts['failed']} failed)",
        f"front:        {len(front)} candidates, hypervolume {meta.get('hypervolume', 0.0):.4f} "
        f"(reference {meta.get('reference')})",
    ]
    if engine:
        lines.append(engine)
    # Likelihood objectives are mean probabilities of the reference output, not accuracies.
    scale = {o.name: " (likelihood)" if o.scoring == "likelihood" else "" for o in cfg.objectives}
    for name in archive.objectives:
        if name in best:
            lines.append(f"best {name}: {best[name]:.4f}{scale.get(name, '')}")
    if audit:
        for name, s in audit.items():
            rho = "n/a" if math.isnan(s["spearman"]) else f"{s['spearman']:.3f}"
            lines.append(f"audit {name}: {s['n']} audited, estimate error {s['mae']:.4f} "
                         f"(bias {s['bias']:+.4f}), Spearman {rho}")
    else:
        lines.append("audit:        no audited candidates yet")
    for name in archive.objectives:
        path = store.thetas_path(name)
        if path.is_file():
            lines.append(f"calibration {name}: {_calibration_named(path)}")
    for model, scores in (meta.get("source_scores") or {}).items():
        held = (meta.get("source_heldout_scores") or {}).get(model, {})
        text = ", ".join(f"{o}={ObjectiveScore.from_dict(s).value:.3f}{scale.get(o, '')}"
                         + (f" (held-out accuracy {ObjectiveScore.from_dict(held[o]).value:.3f})" if o in held else "")
                         for o, s in scores.items())
        lines.append(f"source {model}: {text}")
    return lines


def _calibration_named(thetas: Path) -> str:
    """Which calibration a run's source abilities were computed under (a path, as JSON text)."""
    import json

    try:
        found = json.loads(thetas.read_text()).get("calibration")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        return f"unreadable ({thetas}: {type(exc).__name__})"
    return str(found)


def engine_line(archive, cfg) -> str | None:
    """How the candidates reached the engine: loaded in place, or after an engine restart
    (a candidate's ``timings.restart``, written by the evaluator)."""
    if cfg.evaluator.kind != "merge":
        return None
    import json

    loaded = restarts = 0
    restart_seconds = 0.0
    for (text,) in archive.db.execute("SELECT timings FROM evaluations WHERE timings IS NOT NULL"):
        timings = json.loads(text) if text else {}
        if "load" not in timings:
            continue
        loaded += 1
        if "restart" in timings:
            restarts += 1
            restart_seconds += float(timings["restart"])
    if not loaded:
        return None
    return (f"engine:       {cfg.evaluator.backend}, {loaded - restarts} of {loaded} candidates loaded in place, "
            f"{restarts} engine restarts ({restart_seconds:.1f} s)")


def heldout_lines(run_dir: str | Path) -> list[str]:
    """The front judged by full evaluation on each objective's held-out items."""
    from evomerge.search.run import judge_candidates

    judged = judge_candidates(run_dir, progress=True)
    lines = []
    for cid, scores in judged.items():
        scores = {o: ObjectiveScore.from_dict(s) for o, s in scores.items()}
        text = ", ".join(f"{o}={s.value:.3f}±{s.stderr:.3f} ({s.n_items} items)" for o, s in scores.items())
        lines.append(f"held-out candidate {cid}: {text}")
    return lines


def print_status(run_dir: str | Path) -> None:
    print("\n".join(status_lines(run_dir)))


def run(args: argparse.Namespace) -> int:
    print_status(args.run_dir)
    if args.heldout:
        print("\n".join(heldout_lines(args.run_dir)))
    return 0

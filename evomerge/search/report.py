"""``evomerge report RUN_DIR [--out DIR]``: plots and a Markdown summary of a search run.

Writes into ``DIR`` (default ``RUN_DIR/report``):

- ``pareto.png``: every successful candidate on the first two objectives, the
  Pareto front joined up, the source models marked (when the run recorded their
  scores); with one objective, the score of each candidate in evaluation order;
- ``progress.png``: hypervolume of the front and best score per objective,
  after each generation;
- ``coefficients.png``: the per-layer coefficients of the front's merges
  (their genomes decoded with the run's genome space);
- ``report.md``: the front as a table with standard errors and audits, the
  sources' scores, and what could not be drawn and why.

Only reads the run, so it is safe while a search is still writing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.io.atomic import atomic_write_bytes, atomic_write_text
from evomerge.search.archive import Record, hypervolume
from evomerge.search.store import RunStore
from evomerge.workers.types import ObjectiveScore
from evomerge.search.export import (
    load_records,
    load_source_scores,
    open_archive,
    pareto_front,
)


def _values(records: list[Record], objectives: list[str]) -> np.ndarray:
    return np.array([[r.value(o) for o in objectives] for r in records], dtype=float).reshape(len(records), -1)


def progress(records: list[Record], objectives: list[str], reference: np.ndarray | None = None) -> dict:
    """Per generation (cumulative): best value per objective and the front's hypervolume
    above ``reference`` (the archive's reference point; default 0 per objective)."""
    ok = [r for r in records if r.status == "ok" and all(o in r.objectives for o in objectives)]
    if not ok:
        return {"generations": [], "best": {}, "hypervolume": []}
    F = _values(ok, objectives)
    ref = np.zeros(len(objectives)) if reference is None else np.asarray(reference, dtype=float)
    gens = sorted({r.generation for r in ok})
    out = {"generations": gens, "best": {o: [] for o in objectives}, "hypervolume": [], "reference": ref.tolist()}
    for g in gens:
        upto = np.array([r.generation <= g for r in ok])
        for j, o in enumerate(objectives):
            out["best"][o].append(float(F[upto, j].max()))
        front = _values(pareto_front([r for r, u in zip(ok, upto) if u], objectives), objectives)
        out["hypervolume"].append(hypervolume(front, ref))
    return out


def _space_for_run(run_dir: Path):
    """The run's genome space, rebuilt from its config; (None, why) if that is not possible."""
    from evomerge.search.config import load_run_space

    try:
        return load_run_space(run_dir), None
    except EvomergeError as exc:
        return None, str(exc)


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_pareto(records, objectives, source_scores, path: Path) -> str | None:
    plt = _plt()
    ok = [r for r in records if r.status == "ok" and all(o in r.objectives for o in objectives)]
    if not ok:
        return "no successful candidates to plot"
    front = pareto_front(ok, objectives)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    note = None
    if len(objectives) >= 2:
        x, y = objectives[0], objectives[1]
        F = _values(ok, [x, y])
        gens = np.array([r.generation for r in ok])
        sc = ax.scatter(F[:, 0], F[:, 1], c=gens, cmap="viridis", s=18, alpha=0.7, label="candidates")
        fig.colorbar(sc, ax=ax, label="generation")
        P = _values(sorted(front, key=lambda r: r.value(x)), [x, y])
        ax.plot(P[:, 0], P[:, 1], "-o", color="crimson", ms=6, mfc="none", label="Pareto front")
        for r in front:
            ax.annotate(str(r.candidate_id), (r.value(x), r.value(y)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        marked = False
        for model, scores in source_scores.items():
            if x in scores and y in scores:
                ax.scatter([scores[x].value], [scores[y].value], marker="*", s=160, color="black",
                           zorder=5, label=None if marked else "source models")
                ax.annotate(Path(model).name, (scores[x].value, scores[y].value), fontsize=8,
                            xytext=(4, -10), textcoords="offset points")
                marked = True
        ax.set_xlabel(x), ax.set_ylabel(y)
        if len(objectives) > 2:
            note = f"the Pareto plot shows the first two of {len(objectives)} objectives"
    else:
        o = objectives[0]
        ids = [r.candidate_id for r in ok]
        ax.scatter(ids, [r.value(o) for r in ok], s=18, alpha=0.7, label="candidates")
        best = np.maximum.accumulate([r.value(o) for r in ok])
        ax.step(ids, best, where="post", color="crimson", label="best so far")
        for k, (model, scores) in enumerate(source_scores.items()):
            if o in scores:
                ax.axhline(scores[o].value, ls="--", lw=1, color=f"C{k + 2}", label=f"source {Path(model).name}")
        ax.set_xlabel("candidate id"), ax.set_ylabel(o)
    if not source_scores:
        note = "; ".join(filter(None, [note, "source models are not marked: the run recorded no source scores"]))
    ax.set_title("Candidates and Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    return note


def plot_progress(prog: dict, path: Path) -> None:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    gens = prog["generations"]
    ax1.plot(gens, prog["hypervolume"], "-o", color="crimson")
    ax1.set_title("Hypervolume of the front")
    ax1.set_xlabel("generation"), ax1.set_ylabel("hypervolume")
    for o, values in prog["best"].items():
        ax2.plot(gens, values, "-o", label=o)
    ax2.set_title("Best score per objective")
    ax2.set_xlabel("generation"), ax2.set_ylabel("estimated score")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_coefficients(front: list[Record], space, path: Path, max_panels: int = 9) -> str | None:
    series: dict[str, dict[int, list[float]]] = {}
    for r in front:
        if len(r.genome) != space.dim:
            return f"candidate {r.candidate_id} has {len(r.genome)} genes, the run's space has {space.dim}"
        for name, values in space.describe(np.array(r.genome)).get("per_layer", {}).items():
            series.setdefault(name, {})[r.candidate_id] = values
    if not series:
        return "the genome space has no per-layer coefficients to plot"
    plt = _plt()
    names = list(series)[:max_panels]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        for cid, values in series[name].items():
            ax.plot(range(len(values)), values, "-o", ms=3, label=f"#{cid}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, title="front candidate", title_fontsize=7)
    fig.suptitle("Per-layer coefficients of the front's merges")
    _save(fig, path)
    if len(series) > max_panels:
        return f"coefficients.png shows {max_panels} of {len(series)} per-layer series"
    return None


# --------------------------------------------------------------------------- markdown


def _fmt(score: ObjectiveScore | None) -> str:
    if score is None:
        return ""
    s = f"{score.value:.4f} ± {score.stderr:.4f}"
    if score.full is not None:
        s += f" (full {score.full:.4f})"
    return s


def summary_markdown(run_dir: Path, records, objectives, front, source_scores, prog, notes, images) -> str:
    ok = sum(r.status == "ok" for r in records)
    lines = [f"# evomerge run report: `{run_dir}`", "",
             f"- candidates evaluated: {len(records)} ({ok} ok, {len(records) - ok} failed)",
             f"- generations: {len(prog['generations'])}",
             f"- objectives (maximised): {', '.join(objectives) or 'none'}",
             f"- Pareto front: {len(front)} candidate(s)"]
    if prog["hypervolume"]:
        lines.append(f"- final hypervolume: {prog['hypervolume'][-1]:.5g} (reference point {prog['reference']})")
    lines += ["", "## Pareto front", "", "Estimates ± standard error; *full* is the full-pool audit where one was run.", "",
              "| candidate | generation | " + " | ".join(objectives) + " |",
              "|---|---|" + "---|" * len(objectives)]
    for r in sorted(front, key=lambda r: -r.value(objectives[0])):
        lines.append(f"| {r.candidate_id} | {r.generation} | " + " | ".join(_fmt(r.objectives.get(o)) for o in objectives) + " |")
    if source_scores:
        lines += ["", "## Source models", "", "| model | " + " | ".join(objectives) + " |",
                  "|---|" + "---|" * len(objectives)]
        for model, scores in source_scores.items():
            lines.append(f"| {model} | " + " | ".join(_fmt(scores.get(o)) for o in objectives) + " |")
        lines += ["", "Front candidates beating every source model on every objective: "
                  + (", ".join(str(r.candidate_id) for r in front
                               if all(r.value(o) > max(s[o].value for s in source_scores.values() if o in s)
                                      for o in objectives if any(o in s for s in source_scores.values())))
                     or "none")]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the plots and report.md for a run; returns the output directory."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else RunStore(run_dir).report_dir
    records = load_records(run_dir)
    if not records:
        raise EvomergeError(f"{run_dir}: the archive has no evaluations yet")
    archive = open_archive(run_dir)
    try:
        objectives, reference = list(archive.objectives), archive.reference
    finally:
        archive.close()
    source_scores = load_source_scores(run_dir)
    front = pareto_front(records, objectives)
    prog = progress(records, objectives, reference)
    out.mkdir(parents=True, exist_ok=True)
    notes, images = [], []
    note = plot_pareto(records, objectives, source_scores, out / "pareto.png")
    images.append("pareto.png")
    notes += [note] if note else []
    if prog["generations"]:
        plot_progress(prog, out / "progress.png")
        images.append("progress.png")
    space, why = _space_for_run(run_dir)
    if space is None:
        notes.append(f"no coefficient plot: {why}")
    elif not hasattr(space, "describe"):
        notes.append("no coefficient plot: the run's genome is a synthetic box, not a merge")
    elif front:
        note = plot_coefficients(front, space, out / "coefficients.png")
        if note is None or note.startswith("coefficients.png shows"):
            images.append("coefficients.png")
        notes += [note] if note else []
    atomic_write_text(out / "report.md", summary_markdown(run_dir, records, objectives, front, source_scores,
                                                           prog, notes, images))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/report)")


def run(args: argparse.Namespace) -> int:
    out = write_report(args.run_dir, args.out)
    print(out / "report.md")
    return 0

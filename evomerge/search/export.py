"""``evomerge export RUN_DIR [--front | --top K | --id N] OUT``: chosen merges as HF models.

Each chosen candidate becomes ``OUT/candidate-<id>/`` (a calibration merge, chosen by its
negative id, ``OUT/calibration-<n>/``): safetensors + config +
tokenizer, a ``README.md`` model card (recipe, scores with their standard errors
and full-pool audits, the run it came from, the evomerge version) and
``mergekit.yaml``, the recipe for reproducing it with mergekit alone. Every model
directory is written atomically: it is complete or absent, and it carries
``evomerge_export.json``, the SHA-256 of each of its files. Running the same export again
(after it was killed, or with more candidates) skips every candidate already exported and
verified by those checksums; one that fails them is written again.

The run is only read (SQLite opened read-only), so exporting during a search is safe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import evomerge
from evomerge.errors import ConfigError, EvomergeError
from evomerge.merge.plan import MergePlan
from evomerge.merge.staged import StagedPlan, plan_from_dict
from evomerge.search.archive import Record
from evomerge.workers.types import ObjectiveScore

# --------------------------------------------------------------------------- archive rows


def open_archive(run_dir: str | Path):
    """The run's archive, read-only (safe while a search writes)."""
    from evomerge.search.store import RunStore

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvomergeError(f"run directory {run_dir} does not exist")
    return RunStore(run_dir).open_archive()


def load_records(run_dir: str | Path, calibration: bool = False) -> list[Record]:
    """Every evaluated search candidate of a run, ordered by candidate id.

    Calibration merges (generation -1, negative ids: random merges scored on every item
    before the search) are left out unless ``calibration=True``, so fronts, tops and bests
    are the search's own."""
    archive = open_archive(run_dir)
    try:
        return archive.records("" if calibration else "WHERE generation >= 0")
    finally:
        archive.close()


def export_name(record: Record) -> str:
    """``candidate-<id>`` for a search candidate, ``calibration-<n>`` for calibration merge -n."""
    if record.candidate_id < 0:
        return f"calibration-{-record.candidate_id}"
    return f"candidate-{record.candidate_id}"


def load_source_scores(run_dir: str | Path) -> dict[str, dict[str, ObjectiveScore]]:
    """Scores of the source models, if the search recorded them: {model: {objective: score}}.

    The search stores them in the archive's meta table under ``source_scores``
    (``Archive.set_meta(source_scores={model: {objective: ObjectiveScore.to_dict()}})``).
    """
    archive = open_archive(run_dir)
    try:
        stored = archive.meta().get("source_scores") or {}
    finally:
        archive.close()
    return {model: {name: ObjectiveScore.from_dict(score) for name, score in scores.items()}
            for model, scores in stored.items()}


# --------------------------------------------------------------------------- selection


def objective_names(records: list[Record]) -> list[str]:
    names: dict[str, None] = {}
    for r in records:
        names.update(dict.fromkeys(r.objectives))
    return list(names)


def pareto_front(records: list[Record], objectives: list[str] | None = None) -> list[Record]:
    """The successful records no other successful record dominates (all objectives maximised)."""
    ok = [r for r in records if r.status == "ok" and r.objectives]
    objectives = objectives or objective_names(ok)
    ok = [r for r in ok if all(o in r.objectives for o in objectives)]
    if not ok:
        return []
    F = np.array([[r.value(o) for o in objectives] for r in ok])
    front = []
    for i in range(len(ok)):
        dominated = np.any(np.all(F >= F[i], axis=1) & np.any(F > F[i], axis=1))
        if not dominated:
            front.append(ok[i])
    return front


def top_k(records: list[Record], k: int, objective: str | None = None) -> list[Record]:
    """The k best successful records by one objective (default: the mean of all objectives)."""
    ok = [r for r in records if r.status == "ok" and r.objectives]
    names = objective_names(ok)
    if objective is not None and objective not in names:
        raise ConfigError(f"--objective: unknown objective {objective!r} (the run has: {', '.join(names)})")

    def score(r: Record) -> float:
        if objective is not None:
            return r.value(objective) if objective in r.objectives else -np.inf
        return float(np.mean([r.value(o) for o in r.objectives]))

    return sorted(ok, key=lambda r: (-score(r), r.candidate_id))[:k]


# --------------------------------------------------------------------------- the run's sources


def run_sources(run_dir: Path) -> tuple[dict[str, str], str | None]:
    """{model name used in plans: checkpoint path} and the base model, from the run's config."""
    from evomerge.search.config import load_run_sources

    return load_run_sources(run_dir)


# --------------------------------------------------------------------------- writing


def _materialize(plan: MergePlan | StagedPlan, sources) -> tuple[Any, dict, list[tuple]]:
    """(iterator of (name, tensor), output config, every output tensor's (name, shape, dtype))
    for either plan kind. With the layout known up front the writer streams each tensor to
    its shard as it is merged (``write_checkpoint(layout=...)``): no shard, let alone the
    model, is held in memory; a staged plan holds its earlier stages' output besides."""
    from evomerge.merge.engine import _output_layout, compile_plan, iter_merge, output_config
    from evomerge.merge.staged import staged_sources

    if isinstance(plan, StagedPlan):
        sources = staged_sources(plan, sources)
        plan = plan.final
    layout = _output_layout(plan, sources, compile_plan(plan, sources))
    return iter_merge(plan, sources), output_config(plan, sources), layout


def mergekit_yaml(plan: MergePlan | StagedPlan, paths: dict[str, str]) -> str:
    """The recipe as mergekit YAML with model names replaced by their checkpoint paths.

    A StagedPlan becomes a multi-document YAML (one mergekit config per stage, in order);
    a later stage names an earlier one by the directory it is written to (``./<stage>``).
    """
    def with_paths(d: Any, mapping: dict[str, str]) -> Any:
        if isinstance(d, dict):
            return {k: (mapping.get(v, v) if k in ("model", "base_model", "tokenizer_source") and isinstance(v, str)
                        else with_paths(v, mapping)) for k, v in d.items()}
        if isinstance(d, list):
            return [with_paths(v, mapping) for v in d]
        return d

    if isinstance(plan, MergePlan):
        return yaml.safe_dump(with_paths(plan.to_dict(), paths), sort_keys=False)
    docs, mapping = [], dict(paths)
    for name, stage in plan.stages:
        docs.append(f"# stage {name!r}: mergekit-yaml this document into ./{name}\n"
                    + yaml.safe_dump(with_paths(stage.to_dict(), mapping), sort_keys=False))
        mapping[name] = f"./{name}"
    return "---\n".join(docs)


def _objective_scoring(run_dir: Path) -> dict[str, str]:
    from evomerge.search.config import load_run_config

    try:
        return {o.name: o.scoring for o in load_run_config(run_dir).objectives}
    except EvomergeError:      # a bare archive without its config: the default
        return {}


def model_card(record: Record, run_dir: Path, plan: MergePlan | StagedPlan, paths: dict[str, str],
               scoring: dict[str, str] | None = None) -> str:
    """``scoring``: objective -> exact | likelihood (default: read from the run's config)."""
    lines = [
        "---", "tags: [merge, evomerge]", "library_name: transformers", "---", "",
        f"# evomerge {export_name(record).replace('-', ' ', 1)}", "",
        (f"Found by an evolutionary merge search (evomerge {evomerge.__version__}) in run `{run_dir.resolve()}`, "
         f"generation {record.generation}." if record.candidate_id >= 0 else
         f"A random calibration merge (candidate id {record.candidate_id}) of the pre-search phase of run "
         f"`{run_dir.resolve()}` (evomerge {evomerge.__version__}), scored on every item."), "", "## Scores", "",
        "Estimates from the search's item subsets (± standard error); *full* is the score on the whole "
        "item pool where the candidate was audited. *exact*: the share of items answered correctly; "
        "*likelihood*: the mean probability the model gives the reference output (not an accuracy).", "",
        "| objective | scoring | estimate | ± stderr | items | full |", "|---|---|---|---|---|---|",
    ]
    scoring = _objective_scoring(run_dir) if scoring is None else scoring
    for name, s in record.objectives.items():
        lines.append(f"| {name} | {scoring.get(name, 'exact')} | {s.value:.4f} | {s.stderr:.4f} | "
                     f"{s.n_items} | {'' if s.full is None else f'{s.full:.4f}'} |")
    lines += ["", "## Recipe", "",
              "Reproduce with mergekit (`mergekit-yaml mergekit.yaml OUT`):" if isinstance(plan, MergePlan) else
              "Two stages: the first merge is written to `./merged`, the second reads it "
              "(run `mergekit-yaml` on each document of `mergekit.yaml` in order):",
              "", "```yaml", mergekit_yaml(plan, paths).rstrip(), "```", "",
              "## Genome", "", "```json", json.dumps(record.genome), "```", ""]
    result = record.result
    info = {"audit": record.candidate.audit, "error": result.error, "worker": result.worker,
            "seconds": result.seconds, "items_scored": result.items_scored,
            "submitted_at": record.submitted_at, "finished_at": record.finished_at}
    info = {k: v for k, v in info.items() if v is not None}
    lines += ["## Evaluation", "", *[f"- {k}: {v}" for k, v in info.items()], ""]
    return "\n".join(lines)


EXPORT_MANIFEST = "evomerge_export.json"
PLAN_FILE = "evomerge_plan.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(target: Path) -> None:
    """Record the checksum of every file of an exported model directory."""
    from evomerge.io.atomic import atomic_write_text

    files = {p.name: _sha256(p) for p in sorted(target.iterdir()) if p.is_file() and p.name != EXPORT_MANIFEST}
    atomic_write_text(target / EXPORT_MANIFEST, json.dumps({"sha256": files}, indent=2) + "\n")


def export_state(target: Path, plan: dict) -> str:
    """``absent``; ``done`` (this plan's export, every checksum verified); ``ours`` (an export
    of this plan that is incomplete or damaged: to be written again); ``foreign`` (something
    else is there)."""
    if not target.exists():
        return "absent"
    try:
        if json.loads((target / PLAN_FILE).read_text()) != plan:
            return "foreign"
    except (OSError, UnicodeDecodeError, ValueError):
        return "foreign"
    try:
        files = json.loads((target / EXPORT_MANIFEST).read_text())["sha256"]
        ok = isinstance(files, dict) and bool(files) and all(
            isinstance(name, str) and "/" not in name and (target / name).is_file()
            and _sha256(target / name) == digest for name, digest in files.items())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        ok = False
    return "done" if ok else "ours"


def export_records(records: list[Record], run_dir: str | Path, out: str | Path, sources=None,
                   paths: dict[str, str] | None = None, overwrite: bool = False) -> list[Path]:
    """Write each record as ``out/candidate-<id>`` (``out/calibration-<n>`` for a calibration
    merge); returns the directories, written now or verified as exported before."""
    from evomerge.io.atomic import remove_stale_temps
    from evomerge.io.checkpoint import write_checkpoint
    from evomerge.merge.engine import SourceSet

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"{out}: exists and is not a directory (the export writes candidate folders into it)")
    if paths is None:
        paths, _ = run_sources(run_dir)
    scoring = _objective_scoring(run_dir)
    written = []
    todo = []
    for rec in records:
        if not rec.plan:
            raise EvomergeError(f"candidate {rec.candidate_id} has no stored plan in {run_dir}")
        target = out / export_name(rec)
        state = export_state(target, rec.plan)
        if state == "done" and not overwrite:
            remove_stale_temps(target)     # a killed earlier export's leftovers
            written.append(target)         # exported before, checksums verified: kept
        else:
            todo.append((rec, state))
    if todo and sources is None:
        # Each source tensor is mapped from the page cache while a merge reads it, not read
        # into memory: with the streamed write an export holds about one tensor per source.
        sources = SourceSet.load(paths, resident=False)
    for rec, state in todo:
        plan = plan_from_dict(rec.plan)
        final = plan.final if isinstance(plan, StagedPlan) else plan
        tok = final.tokenizer_source or final.base_model or final.referenced_models()[0]
        tok_path = paths.get(tok, paths.get(plan.stages[0][1].base_model, None) if isinstance(plan, StagedPlan) else None)
        tensors, config, layout = _materialize(plan, sources)
        target = out / export_name(rec)
        write_checkpoint(target, tensors, config, tokenizer_from=tok_path, overwrite=overwrite or state == "ours",
                         layout=layout,
                         extra_files={"README.md": model_card(rec, run_dir, plan, paths, scoring),
                                      "mergekit.yaml": mergekit_yaml(plan, paths),
                                      PLAN_FILE: json.dumps(rec.plan, indent=2) + "\n"})
        write_manifest(target)
        written.append(target)
    order = {export_name(r): i for i, r in enumerate(records)}
    return sorted(written, key=lambda p: order[p.name])


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    parser.add_argument("out", metavar="OUT", type=Path, help="directory to write candidate-<id>/ model dirs into")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--front", action="store_true", help="every merge on the Pareto front (default)")
    which.add_argument("--top", type=int, metavar="K", help="the K best by --objective")
    which.add_argument("--id", type=int, metavar="N", dest="candidate_id",
                       help="one candidate by id (a negative id: that calibration merge)")
    parser.add_argument("--objective", help="objective for --top (default: the mean of all objectives)")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                        help="override where a source model lives (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing candidate directories")


def select(records: list[Record], args: argparse.Namespace) -> list[Record]:
    if args.candidate_id is not None:
        chosen = [r for r in records if r.candidate_id == args.candidate_id]
        if not chosen:
            raise EvomergeError(f"--id: no candidate {args.candidate_id} in {args.run_dir}")
        if chosen[0].status != "ok":
            raise EvomergeError(f"--id: candidate {args.candidate_id} has status {chosen[0].status!r}, not 'ok'")
        return chosen
    if args.top is not None:
        if args.top < 1:
            raise ConfigError("--top: K must be at least 1")
        return top_k(records, args.top, args.objective)
    return pareto_front(records)


def run(args: argparse.Namespace) -> int:
    records = load_records(args.run_dir, calibration=args.candidate_id is not None and args.candidate_id < 0)
    chosen = select(records, args)
    if not chosen:
        raise EvomergeError(f"{args.run_dir}: no successful candidates to export")
    try:
        paths, _ = run_sources(args.run_dir)
    except EvomergeError:
        if not args.source:
            raise
        paths = {}
    for spec in args.source:
        if "=" not in spec:
            raise ConfigError(f"--source: expected NAME=PATH, got {spec!r}")
        name, path = spec.split("=", 1)
        paths[name] = path
    for target in export_records(chosen, args.run_dir, args.out, paths=paths, overwrite=args.overwrite):
        print(target)
    return 0

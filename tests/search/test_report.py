"""`evomerge report`: plots and a Markdown summary from a run's archive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.cli import main as cli_main
import evomerge
from evomerge.search.archive import Archive
from evomerge.search.store import RUN_FORMAT
from evomerge.search.genome import build_space
from evomerge.workers.types import Candidate, EvalResult, ObjectiveScore
from evomerge.search.archive import hypervolume
from evomerge.search.report import progress, write_report
from evomerge.search.export import load_records

L = 4
GENOME = {"method": "ties", "granularity": "layer", "per_module": True}


def hand_made_archive(run_dir: Path, config: dict, objectives: list[str]) -> Archive:
    """The archive of a run directory built by hand (no search): the config a search stores
    in it, and the format and version marks a run's archive carries."""
    run_dir.mkdir(parents=True, exist_ok=True)
    archive = Archive(run_dir, objectives=objectives)
    archive.set_meta(format=RUN_FORMAT, evomerge_version=evomerge.__version__, config=config)
    return archive


def fake_sources(root: Path) -> dict[str, str]:
    # the report reads only each source's config.json (its layer count)
    paths = {}
    for name in ("base", "a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps({"num_hidden_layers": L, "model_type": "llama"}))
        paths[name] = str(root / name)
    return paths


def make_run(root: Path, objectives=("arith", "copy"), with_sources=True, generations=3, per_gen=6) -> Path:
    paths = fake_sources(root / "models")
    run_dir = root / "run"
    archive = hand_made_archive(run_dir, {
        "sources": paths, "base": "base", "genome": GENOME,
        "objectives": [{"name": o, "task": f"zoo/{o}"} for o in objectives]}, list(objectives))
    space = build_space(GENOME, ["a", "b"], "base", L)
    rng = np.random.default_rng(0)
    cid = 0
    for g in range(generations):
        for _ in range(per_gen):
            x = space.random(rng)
            # later generations score higher, so progress is visible
            objs = {o: ObjectiveScore(float(np.clip(0.3 + 0.1 * g + 0.3 * rng.random(), 0, 1)), 0.03, 30)
                    for o in objectives}
            status = "failed" if cid == 4 else "ok"
            archive.add(Candidate(cid, g, x.tolist(), space.decode(x).to_dict()),
                        EvalResult(cid, status, objs if status == "ok" else {}, error=None if status == "ok" else "NaN"))
            cid += 1
    if with_sources:
        archive.set_meta(source_scores={
            name: {o: {"value": 0.35 + 0.05 * k, "stderr": 0.01, "n_items": 200, "full": None} for o in objectives}
            for k, name in enumerate(["base", "a", "b"])})
    archive.close()
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_hypervolume_matches_hand_computed_areas():
    ref = np.array([0.0, 0.0])
    assert hypervolume(np.array([[1.0, 1.0]]), ref) == pytest.approx(1.0)
    # two boxes overlapping in [0,1]x[0,1]: 2*1 + 1*2 - 1 = 3
    assert hypervolume(np.array([[2.0, 1.0], [1.0, 2.0]]), ref) == pytest.approx(3.0)
    # a dominated point adds nothing; points not above the reference count for nothing
    assert hypervolume(np.array([[2.0, 1.0], [1.0, 2.0], [0.5, 0.5], [-1.0, 5.0]]), ref) == pytest.approx(3.0)
    assert hypervolume(np.array([[0.7]]), np.array([0.2])) == pytest.approx(0.5)


def test_progress_is_cumulative(tmp_path):
    records = load_records(make_run(tmp_path))
    prog = progress(records, ["arith", "copy"])
    assert prog["generations"] == [0, 1, 2]
    for series in [prog["hypervolume"], *prog["best"].values()]:
        assert all(b >= a for a, b in zip(series, series[1:]))
    ok = [r for r in records if r.status == "ok"]
    assert prog["best"]["arith"][-1] == max(r.value("arith") for r in ok)
    assert prog["hypervolume"][-1] > 0


def test_report_writes_plots_and_markdown(tmp_path):
    run_dir = make_run(tmp_path)
    assert cli_main(["report", str(run_dir)]) == 0
    out = run_dir / "report"
    for name in ("pareto.png", "progress.png", "coefficients.png"):
        w, h = png_size(out / name)
        assert w > 300 and h > 200 and (out / name).stat().st_size > 5000
    md = (out / "report.md").read_text()
    assert "candidates evaluated: 18 (17 ok, 1 failed)" in md
    assert "## Source models" in md and "| a | 0.4000 ± 0.0100 |" in md
    assert "![coefficients.png](coefficients.png)" in md
    records = load_records(run_dir)
    from evomerge.search.export import pareto_front
    for r in pareto_front(records):
        assert f"| {r.candidate_id} | {r.generation} | {r.value('arith'):.4f} ± 0.0300 |" in md
    assert "Notes" not in md  # everything could be drawn


def test_report_without_source_scores_or_genome_notes_what_is_missing(tmp_path):
    run_dir = make_run(tmp_path, objectives=("composite",), with_sources=False)
    archive = Archive(run_dir)
    cfg = archive.meta()["config"]
    cfg["genome"]["granularity"] = "per-attention-head"  # no longer a valid space: nothing to decode with
    archive.set_meta(config=cfg)
    archive.close()
    out = write_report(run_dir, tmp_path / "rep")
    assert png_size(out / "pareto.png")[0] > 300
    assert not (out / "coefficients.png").exists()
    md = (out / "report.md").read_text()
    assert "source models are not marked: the run recorded no source scores" in md
    # the config is read from the archive, so the error names that file
    assert (f"no coefficient plot: {run_dir / 'archive.sqlite'}: config: genome.granularity: "
            "must be 'model', 'layer' or 'block:N'") in md


def test_report_on_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err

"""`evomerge estimators bench` on a slice of real metabench data, and its one-line errors."""

import gzip
import json
from pathlib import Path

import pytest

from evomerge.cli import main

METABENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "metabench"
TAG = "arc-2PL-MAP-0.005-seed=1"


def run_cli(args, capsys):
    code = main(["estimators", "bench", *args])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def arc_slice(tmp_path_factory):
    source = METABENCH / f"{TAG}__train_responses.csv.gz"
    if not source.exists():
        pytest.skip("shared metabench data not present")
    lines = gzip.decompress(source.read_bytes()).decode().splitlines()[:801]  # header + 800 LLMs
    path = tmp_path_factory.mktemp("arc") / "arc800.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path, METABENCH / f"{TAG}__scores.csv"


@pytest.mark.slow
def test_bench_on_real_metabench_slice(arc_slice, tmp_path, capsys):
    responses, scores = arc_slice
    out = tmp_path / "bench.json"
    code, io = run_cli(["--responses", str(responses), "--scores", str(scores), "--anchors", "30",
                        "--seeds", "0", "--dims", "1", "--json", str(out)], capsys)
    assert code == 0, io.err
    summary = json.loads(out.read_text())
    assert summary["anchors"] == 30 and summary["subjects"] == 800
    est = summary["estimators"]
    assert {"random", "anchor", "irt", "pirt", "gpirt", "gpirt_reg"} <= set(est)
    assert all(0 <= row["mae_full"] < 0.2 and 0 <= row["mae_subset"] < 0.2 for row in est.values())
    assert est["gpirt_reg"]["mae_full"] < est["random"]["mae_full"]
    assert 0 < summary["floor_full"] < est["random"]["mae_full"]
    assert "gpirt_reg" in io.out and "floor" in io.out


def bad_input(tmp_path, capsys, text, *extra):
    path = tmp_path / "r.csv"
    path.write_text(text)
    code, io = run_cli(["--responses", str(path), "--seeds", "0", *extra], capsys)
    assert code == 2
    assert io.err.startswith("error: ") and io.err.count("\n") == 1 and "Traceback" not in io.err
    return io.err


def matrix(n_rows, n_items, cell=lambda r, c: (r + c) % 2):
    head = "llm," + ",".join(f"i{c}" for c in range(n_items))
    return "\n".join([head] + [f"m{r}," + ",".join(str(cell(r, c)) for c in range(n_items)) for r in range(n_rows)]) + "\n"


def test_ragged_csv(tmp_path, capsys):
    err = bad_input(tmp_path, capsys, matrix(20, 5) + "m99,1,0\n", "--anchors", "2")
    assert "r.csv" in err and "row 22 has 3 cells" in err


def test_non_numeric_cell(tmp_path, capsys):
    err = bad_input(tmp_path, capsys, matrix(20, 5, lambda r, c: "yes" if (r, c) == (3, 2) else 1), "--anchors", "2")
    assert "r.csv" in err and "row 5" in err and "'i2'" in err and "'yes'" in err


def test_fewer_subjects_than_dimensions(tmp_path, capsys):
    err = bad_input(tmp_path, capsys, matrix(12, 6), "--anchors", "2", "--dims", "8")
    assert "r.csv" in err and "too few for 8 IRT dimensions" in err


def test_more_anchors_than_items(tmp_path, capsys):
    err = bad_input(tmp_path, capsys, matrix(20, 5), "--anchors", "6")
    assert "r.csv" in err and "6 anchors requested" in err and "only 5 items" in err


def test_missing_scores_file(tmp_path, capsys):
    err = bad_input(tmp_path, capsys, matrix(20, 5), "--anchors", "2", "--scores", str(tmp_path / "nope.csv"))
    assert "nope.csv: no such file" in err

#!/usr/bin/env python
"""The architecture x {merge, eval, search per genome kind, export, data-flow fold} table, from the tests.

Runs tests/io/test_architectures.py (slow part included: every architecture x every genome
kind) with a JUnit XML report and turns each test outcome into a table cell, so every cell
is a test result, never a claim. Writes the table between the markers in
docs/architectures.md (or prints it with --print).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/architecture_table.py [--print]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOC = ROOT / "docs" / "architectures.md"
BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"

# column -> (test function names whose [arch(-kind)] outcome fills it)
COLUMNS = {
    "registry": ["test_the_registry_names_every_tensor_of_each_architecture"],
    "merge (5 methods) + reload": ["test_each_merge_method_follows_its_formula_and_writes_a_model_transformers_loads"],
    "in-place swap": ["test_the_hf_backend_swaps_a_merge_in_place_with_the_logits_of_the_written_model",
                      "test_moe_architectures_fuse_experts_as_transformers_loads_them"],
    "eval (= generate)": ["test_evomerge_eval_scores_a_recipe_as_its_written_merge_and_greedy_as_generate"],
}
SEARCH_TESTS = ["test_a_search_with_each_genome_kind_runs_and_its_export_reloads",
                "test_a_search_with_every_kind_on_every_architecture_runs_and_exports"]
FOLD_TEST = "test_a_folded_data_flow_scale_equals_scaling_the_residual_stream"


def run_tests() -> Path:
    report = Path(tempfile.mkdtemp(prefix="arch-table-")) / "junit.xml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/io/test_architectures.py"),
                    f"--junitxml={report}", "-o", "junit_family=xunit1"], cwd=ROOT, env=env, check=False)
    return report


def outcomes(report: Path) -> dict[tuple[str, str], tuple[str, dict]]:
    """(test function, param id) -> (passed | failed | skipped, recorded properties)."""
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        m = re.fullmatch(r"(\w+)\[(.+)\]", case.get("name", ""))
        if not m:
            continue
        status = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            status = "failed"
        elif case.find("skipped") is not None:
            status = "skipped"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        out[(m.group(1), m.group(2))] = (status, props)
    return out


def _cell(statuses: list[str]) -> str:
    ran = [s for s in statuses if s != "skipped"]
    if not ran:
        return "not run"
    return "yes" if all(s == "passed" for s in ran) else "**FAILS**"


def table(results: dict) -> str:
    from tests.io.test_architectures import KINDS
    from tests.io.tiny_archs import ARCHS

    def status(test: str, arch: str, kind: str | None = None) -> str:
        ids = [arch] if kind is None else [f"{arch}-{kind}", f"{kind}-{arch}"]
        for i in ids:
            if (test, i) in results:
                return results[(test, i)][0]
        return "skipped"

    header = ["architecture", *COLUMNS, *(f"search: {k} + export" for k in KINDS), "data-flow fold exact (rel. error)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arch in ARCHS:
        row = [arch]
        for tests in COLUMNS.values():
            row.append(_cell([status(t, arch) for t in tests]))
        for kind in KINDS:
            row.append(_cell([status(t, arch, kind) for t in SEARCH_TESTS]))
        fold = results.get((FOLD_TEST, arch))
        if fold is None:
            row.append("not run")
        else:
            err = fold[1].get("fold_rel_error")
            row.append(("yes" if fold[0] == "passed" else "**FAILS**") + (f" ({float(err):.1e})" if err else ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the table instead of writing the doc")
    parser.add_argument("--junit", type=Path, help="read this JUnit report instead of running the tests")
    args = parser.parse_args()
    text = table(outcomes(args.junit or run_tests()))
    if args.print:
        print(text)
        return 0
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + doc[end:])
    print(f"wrote the table into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

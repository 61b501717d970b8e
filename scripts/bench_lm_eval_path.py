#!/usr/bin/env python
"""Scoring 100 items through lm-eval (``Task.harness``) against evomerge's own task path.

The same 100 zoo/arith items (prompt, answer) are written twice: as an evomerge task (JSONL +
YAML: greedy generation, exact match of the output) and as a local lm-eval task YAML
(``generate_until``, ``exact_match``), and as a pair of multiple-choice tasks (three choices).
Each is scored on a zoo model through the HF backend (``backend.score``) after one warm-up
call (lm-eval's request building happens when the task loads, not in the timed calls), the
fastest of ``--repeats`` interleaved timings each; the script prints both wall times and their
ratio, against the target lm-eval / evomerge <= 1.2.
The scores of the two paths are printed too: for these zero-shot items they must agree.

    EVOMERGE_ZOO_DIR=/tmp/zoo/zoo-v2 .venv/bin/python scripts/bench_lm_eval_path.py [--items 100] [--model expert-arith]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_DATASETS_OFFLINE"] = "1"

ZOO_ITEMS = Path(__file__).resolve().parents[1] / "evomerge" / "tasks" / "data" / "zoo" / "arith.search.jsonl"


def write_tasks(root: Path, n: int) -> dict[str, tuple[str, str]]:
    """{kind: (evomerge task path, lm-eval task spec)} for the first ``n`` zoo/arith items."""
    rows = [json.loads(line) for line in ZOO_ITEMS.read_text().splitlines()[:n]]
    docs = []
    for i, row in enumerate(rows):
        answer = int(row["answer"])
        choices = [str(answer + 1), str(answer + 10)]
        choices.insert(i % 3, row["answer"])
        docs.append({"id": row["id"], "q": row["prompt"], "a": row["answer"], "choices": choices, "label": i % 3})
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "gen.jsonl").write_text("".join(json.dumps({"id": d["id"], "prompt": d["q"], "answer": d["a"]}) + "\n"
                                            for d in docs))
    (root / "mc.jsonl").write_text("".join(json.dumps({"id": d["id"], "prompt": d["q"], "answer": d["label"],
                                                       "choices": d["choices"]}) + "\n" for d in docs))
    (root / "gen.yaml").write_text("name: bench_gen\nkind: generate\nmax_new_tokens: 6\ndata: gen.jsonl\n")
    (root / "mc.yaml").write_text("name: bench_mc\nkind: multiple_choice\ndata: mc.jsonl\n")
    lm = root / "lm_eval"
    lm.mkdir()
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\n"
              "test_split: test\ndoc_to_text: \"{{q}}\"\ntarget_delimiter: \"\"\n")
    (lm / "gen.yaml").write_text("task: bench_lm_gen\n" + common + "output_type: generate_until\n"
                                 "doc_to_target: \"{{a}}\"\ngeneration_kwargs:\n  until: []\n  max_gen_toks: 6\n"
                                 "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                                 "    higher_is_better: true\n")
    (lm / "mc.yaml").write_text("task: bench_lm_mc\n" + common + "output_type: multiple_choice\n"
                                "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
                                "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return {"generate": (str(root / "gen.yaml"), f"{lm}:bench_lm_gen"),
            "multiple_choice": (str(root / "mc.yaml"), f"{lm}:bench_lm_mc")}


def timed(backend, task) -> tuple[float, float]:
    start = time.perf_counter()
    results = backend.score(task, range(len(task.items)))
    return time.perf_counter() - start, sum(r.score for r in results) / len(results)


def best_of(backend, native, lm, repeats: int) -> tuple[float, float, float, float]:
    """Fastest of ``repeats`` interleaved timings of each path (a shared machine's load comes
    and goes; interleaving gives both paths the same weather), after one warm-up each."""
    timed(backend, native), timed(backend, lm)
    native_s, lm_s = [], []
    for _ in range(repeats):
        seconds, native_score = timed(backend, native)
        native_s.append(seconds)
        seconds, lm_score = timed(backend, lm)
        lm_s.append(seconds)
    return min(native_s), native_score, min(lm_s), lm_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--model", default="expert-arith", help="a model of the zoo (EVOMERGE_ZOO_DIR)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per path; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a search worker's default)")
    args = parser.parse_args()

    from evomerge.backends import make_backend
    from evomerge.tasks.task import load_task
    from evomerge.zoo.build import zoo_paths

    backend = make_backend("hf", zoo_paths().root / args.model, num_threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        specs = write_tasks(Path(tmp), args.items)
        total_native = total_lm = 0.0
        for kind, (native_spec, lm_spec) in specs.items():
            native_s, native_score, lm_s, lm_score = best_of(backend, load_task(native_spec), load_task(lm_spec),
                                                             args.repeats)
            total_native += native_s
            total_lm += lm_s
            print(f"{kind:<16} evomerge {native_s:7.3f} s (score {native_score:.3f})   "
                  f"lm-eval {lm_s:7.3f} s (score {lm_score:.3f})   ratio {lm_s / native_s:.2f}")
    print(f"{args.items} items x 2 tasks: lm-eval path / evomerge path = {total_lm / total_native:.2f} "
          f"(target <= 1.2; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()

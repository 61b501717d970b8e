"""The mergekit-style candidate turnaround, timed. Runs inside .venv-mergekit, not .venv.

    .venv-mergekit/bin/python experiments/mergekit_turnaround_worker.py PLANS.json TASK OUT_DIR

For every mergekit config in PLANS.json (model paths absolute): merge to disk with mergekit's
``run_merge`` (in process, CPU, as mergekit-evolve's on-disk mode does), load the result with
``AutoModelForCausalLM.from_pretrained``, and score the task's items with greedy decoding
(the same batching and answer check as evomerge's HF backend, bound to this model). Prints
one ``RESULT {json}`` line per candidate with merge / load / score seconds and per-item scores.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    plans_path, task_spec, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(1)  # shared machine: one thread is much faster under load
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from evomerge.backends.hf import HFBackend
    from evomerge.tasks.task import load_task

    task = load_task(task_spec)
    print("IMPORT " + json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    options = MergeOptions(cuda=False, copy_tokenizer=True, lazy_unpickle=False, write_model_card=False, quiet=True)
    for i, plan in enumerate(json.loads(Path(plans_path).read_text())):
        out = out_dir / f"candidate-{i}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        run_merge(MergeConfiguration.model_validate(plan), str(out), options=options)
        t_merge = time.perf_counter() - t
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        scorer = HFBackend.__new__(HFBackend)  # evomerge's scoring methods, on this model
        scorer.model, scorer.tokenizer, scorer.device, scorer.batch_size = model, tokenizer, torch.device("cpu"), 64
        scorer._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        scores = [r.score for r in scorer.score(task, range(len(task.items)))]
        t_score = time.perf_counter() - t
        print("RESULT " + json.dumps({"index": i, "merge_s": t_merge, "load_s": t_load, "score_s": t_score,
                                      "scores": scores}), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

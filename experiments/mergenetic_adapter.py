"""Run Mergenetic's own search loop on a zoo task. Runs inside .venv-mergenetic, not .venv.

    .venv-mergenetic/bin/python experiments/mergenetic_adapter.py --zoo DIR --seed 0 \
        --pop 10 --iters 4 --workdir /tmp/mgn-run --out evals.jsonl

What is Mergenetic's and what is ours:
- Mergenetic's: ``TiesMerger`` writes a mergekit YAML per genome and merges it to disk with
  mergekit 0.0.6 (``run_merge``); ``MergingProblem._evaluate`` loads the merged directory
  with ``AutoModelForCausalLM.from_pretrained`` (its ``load_model``); ``Searcher`` runs
  pymoo's ``minimize`` with a GA over [weights..., densities...] in [0, 1].
- Ours: ``ZooProblem.metrics_4_genotype``, the "bring your own metric" hook. It scores every
  item of the zoo task with greedy decoding, using the same batching and answer check as
  evomerge's HF backend (``evomerge.backends.hf.HFBackend._generate``, bound to Mergenetic's
  model and tokenizer), so both tools are judged by one scorer. Fitness = -accuracy
  (pymoo minimises, as in Mergenetic's predefined problems).

Shims: ``mergenetic.optimization`` imports lm-eval (with vLLM) and fastText at module level
for its predefined problems (lm-eval tasks, language ID). They are not installed in this CPU
venv (lm-eval[vllm] pulls a CUDA torch; fastText's language-ID model is a download), so
``SHIMMED`` stands in for exactly the names imported; each raises if called. This run never
calls them (``use_lm_eval=False``, our own metric). A genome whose merge mergekit refuses
(a TIES density too small to keep any entry) is a failed candidate, not the end of the run.
And one CPU fix: Mergenetic's merger
asks mergekit for ``low_cpu_memory=True``, which mergekit 0.0.6 implements by storing
tensors on "cuda"; without a GPU that option is cleared (see ``cpu_merge_options``). The
merged directory's tokenizer_config.json gets the transformers-4 class name
(``_fix_tokenizer_class``): the zoo is written by transformers 5.

Every evaluation is appended to ``--out`` as one JSON line (genome, mergekit config,
accuracy, items scored, merge / load / score seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Modules Mergenetic imports at package level but only uses in its predefined problems
# (lm-eval tasks, vLLM, fastText language ID). None of them is installed in this CPU venv.
SHIMMED = {
    "lm_eval": [], "lm_eval.models": [], "lm_eval.models.vllm_causallms": ["VLLM"], "lm_eval.api": [],
    "lm_eval.api.task": ["ConfigurableTask"], "lm_eval.evaluator": ["simple_evaluate"],
    "lm_eval.tasks": ["TaskManager"], "fasttext": ["load_model"],
}


def _shim_missing_modules() -> list[str]:
    """Stand-ins for the modules above that are missing; each name raises if ever called."""
    import importlib.util

    def unavailable(name):
        # a class, since Mergenetic also uses these names in type annotations (VLLM | ...)
        def refuse(self, *args, **kwargs):
            raise RuntimeError(f"{name} is not installed in this venv (shimmed by mergenetic_adapter.py)")
        return type(name.rsplit(".", 1)[-1], (), {"__init__": refuse})

    shimmed = []
    for module, names in SHIMMED.items():
        top = module.split(".")[0]
        if top not in sys.modules and importlib.util.find_spec(top) is not None:
            continue  # a real install wins
        mod = sys.modules.setdefault(module, types.ModuleType(module))
        for name in names:
            setattr(mod, name, unavailable(f"{module}.{name}"))
        shimmed.append(module)
    return shimmed


class _Transformers4:
    """evomerge's scorer asks for ``logits_to_keep`` (transformers 5); transformers 4.45, pinned
    by Mergenetic, names that argument ``num_logits_to_keep``. Same computation, other name."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        if "logits_to_keep" in kwargs:
            kwargs["num_logits_to_keep"] = kwargs.pop("logits_to_keep")
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _fix_tokenizer_class(model_dir: Path) -> None:
    """The zoo is saved by transformers 5, whose tokenizer_config.json names the class
    "TokenizersBackend"; transformers 4.45 (pinned by Mergenetic) does not know it. The
    tokenizer.json itself is a plain fast tokenizer, so name the 4.x class for it."""
    path = model_dir / "tokenizer_config.json"
    if path.exists():
        config = json.loads(path.read_text())
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(config, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--task", default="zoo/calc:search")
    ap.add_argument("--experts", default="expert-arith,expert-strings,expert-lang")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pop", type=int, default=10)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--max-evals", type=int, default=None, help="stop evaluating (fitness 0) after this many")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # the machine is shared; one thread is much faster under load
    shimmed = _shim_missing_modules()
    sys.path.insert(0, str(ROOT))  # evomerge's task loader and scorer (pure Python + transformers)

    import numpy as np
    import pandas as pd
    from pymoo.algorithms.soo.nonconvex.ga import GA

    import mergenetic
    from mergenetic.merging.ties_merger import TiesMerger
    from mergenetic.optimization import MergingProblem
    from mergenetic.searcher import Searcher

    from evomerge.backends.hf import HFBackend
    from evomerge.tasks.task import load_task

    # Mergenetic's Merger.merge_model_from_configuration passes low_cpu_memory=True, which
    # mergekit 0.0.6 turns into storage_device="cuda" -- a crash without a GPU. Keep its
    # method; only clear that one option when CUDA is absent.
    import mergenetic.merging.merger as merger_module

    real_options = merger_module.MergeOptions

    def cpu_merge_options(**kw):
        if not torch.cuda.is_available():
            kw["low_cpu_memory"] = False
        return real_options(**kw)

    merger_module.MergeOptions = cpu_merge_options

    task = load_task(args.task)
    experts = [args.zoo / name for name in args.experts.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = open(args.out, "w")

    def score(model, tokenizer) -> list[float]:
        scorer = HFBackend.__new__(HFBackend)  # the scoring methods only, on Mergenetic's model
        scorer.model, scorer.tokenizer, scorer.device = _Transformers4(model), tokenizer, torch.device("cpu")
        scorer.batch_size = 64
        scorer._cache_kw = "past_key_values"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return [r.score for r in scorer.score(task, range(len(task.items)))]

    class ZooProblem(MergingProblem):
        def __init__(self, merger):
            items = pd.DataFrame({"id": [it.id for it in task.items], "prompt": [it.prompt for it in task.items],
                                  "answer": [it.answer for it in task.items]})
            super().__init__(merger, search_df=items, test_df=None, n_var=2 * len(experts), n_obj=1,
                             xl=0.0, xu=1.0, device="cpu", load_in_4bit=False, use_lm_eval=False,
                             eval_batch_size=64)
            self.timings: dict[str, float] = {}
            self.count = 0

        def _from_array_to_genotype(self, x):
            t = time.perf_counter()
            self.config_path = self.merger.create_individual_configuration(x)
            path = self.merger.merge_model_from_configuration(self.config_path)
            _fix_tokenizer_class(Path(path))
            self.timings["merge"] = time.perf_counter() - t
            return path

        def load_model(self, path, verbose: bool = True):
            t = time.perf_counter()
            out = super().load_model(path, verbose)
            self.timings["load"] = time.perf_counter() - t
            return out

        def metrics_4_genotype(self, model, tokenizer=None):
            t = time.perf_counter()
            scores = score(model, tokenizer)
            self.timings["score"] = time.perf_counter() - t
            self.last_scores = scores
            acc = float(np.mean(scores))
            return [-acc], f"accuracy {acc:.4f}"

        def test(self):  # held-out scoring is done by the harness, the same way for every method
            raise NotImplementedError

        def _evaluate(self, x, out, *a, **kw):
            if args.max_evals is not None and self.count >= args.max_evals:
                out["F"] = [0.0]  # budget spent: no more scoring (pymoo still asks for a value)
                return
            t = time.perf_counter()
            try:
                super()._evaluate(x, out, *a, **kw)
            except AssertionError as exc:
                # mergekit 0.0.6 refuses a TIES density that keeps no entry of a tensor ("not
                # gonna zero out the whole tensor"), and that would end the whole search. The
                # candidate fails instead, with the worst fitness and no items scored, as a
                # failed candidate does in evomerge.
                out["F"] = [0.0]
                log.write(json.dumps({"step": self.count, "genome": [float(v) for v in x], "error": str(exc),
                                      "items_scored": 0, "seconds": time.perf_counter() - t}) + "\n")
                log.flush()
                return
            import yaml

            record = {"step": self.count, "genome": [float(v) for v in x],
                      "config": yaml.safe_load(Path(self.config_path).read_text()),
                      "accuracy": -float(np.asarray(out["F"]).ravel()[0]), "items_scored": len(task.items),
                      "seconds": time.perf_counter() - t, "timings": dict(self.timings),
                      "scores": self.last_scores}
            log.write(json.dumps(record) + "\n")
            log.flush()
            self.count += 1

    merger = TiesMerger(run_id=f"seed{args.seed}", path_to_base_model=str(args.zoo / "base"),
                        model_paths=[str(p) for p in experts], path_to_store_yaml=str(args.workdir / "configs"),
                        path_to_store_merged_model=str(args.workdir / "merged"), dtype="float32")
    problem = ZooProblem(merger)
    algorithm = GA(pop_size=args.pop, eliminate_duplicates=True)
    searcher = Searcher(problem, algorithm, results_path=str(args.workdir), n_iter=args.iters, seed=args.seed,
                        run_id=f"seed{args.seed}", verbose=False)
    t0 = time.perf_counter()
    searcher.search()
    log.close()
    summary = {"mergenetic_version": getattr(mergenetic, "__version__", None), "evaluations": problem.count,
               "seconds": time.perf_counter() - t0, "best_genome": [float(v) for v in np.ravel(searcher.result_X)],
               "best_accuracy": -float(np.ravel(searcher.result_F)[0]), "shimmed_modules": shimmed}
    print("MERGENETIC_SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``evomerge eval MODEL_DIR_OR_RECIPE... --tasks t1,t2 [--limit N] [--scoring likelihood] [--out results.jsonl]``.

A model is a Hugging Face model directory or a mergekit-style recipe YAML, which is merged
in memory (nothing written to disk) and scored through the same backend the search uses.
Prints an accuracy table; ``--out`` writes one JSON line per scored item.

lm-eval tasks are scored by lm-eval (``tasks.lm_eval_adapter``): ``--metric`` picks the number
in the table (default each task's first metric), ``--num-fewshot``, ``--apply-chat-template``,
``--system-instruction`` and ``--fewshot-as-multiturn`` mean what they mean to ``lm_eval run``,
and each ``--out`` line carries every metric of the item under every filter (``metrics``).

``--backend vllm`` scores with a vLLM engine; ``--engine KEY=VALUE`` (repeatable, or one
JSON/YAML mapping) passes vLLM engine arguments, checked against ``vllm.EngineArgs``. By
default the engine's context fits the longest request of the tasks and, on CPU, its KV cache
is sized to that (see ``evomerge/backends/vllm_backend.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.tasks.task import Task, is_lm_eval_task, load_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="model directories and/or merge recipe YAMLs")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated tasks: zoo/arith, zoo/calc:heldout, task.yaml, lm-eval names")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    parser.add_argument("--out", type=Path, default=None, help="write per-item results here (JSONL)")
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="items scored at once (hf: default 64; vllm: the engine's max_num_seqs)")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="a vLLM engine argument for --backend vllm (repeatable; VALUE read as YAML), "
                             "or all of them as one JSON/YAML mapping: --engine '{max_model_len: 512}'")
    parser.add_argument("--allow-bin", action="store_true", help="also load pickled .bin weights")
    parser.add_argument("--scoring", default="exact", choices=["exact", "likelihood"],
                        help="exact: 0/1 per item (accuracy); likelihood: the probability of the reference output")
    lm = parser.add_argument_group("lm-eval tasks")
    lm.add_argument("--metric", default=None,
                    help="the metric in the table, as lm-eval names it: acc_norm, exact_match,strict-match (default: "
                         "each task's first)")
    lm.add_argument("--num-fewshot", type=int, default=None, help="override the tasks' num_fewshot")
    lm.add_argument("--apply-chat-template", action="store_true", help="format requests with the tokenizer's chat template")
    lm.add_argument("--system-instruction", default=None, help="a system turn before each request")
    lm.add_argument("--fewshot-as-multiturn", default=None, type=lambda v: v.lower() in ("1", "true", "yes"),
                    metavar="BOOL", help="few-shot examples as chat turns (default: on with --apply-chat-template)")
    lm.add_argument("--trust-task-code", action="store_true",
                    help="run the !function Python of task YAMLs outside lm-eval's own tasks")


def lm_eval_options(args: argparse.Namespace) -> dict:
    """The lm-eval evaluation options given on the command line (empty: lm-eval's defaults)."""
    given = {"num_fewshot": args.num_fewshot, "apply_chat_template": args.apply_chat_template or None,
             "system_instruction": args.system_instruction, "fewshot_as_multiturn": args.fewshot_as_multiturn,
             "trust_task_code": args.trust_task_code or None}
    return {k: v for k, v in given.items() if v is not None}


def parse_engine_options(values: list[str]) -> dict:
    """``--engine`` values -> vLLM engine options: each ``KEY=VALUE`` (VALUE parsed as YAML, so
    numbers and booleans come out typed) or a whole JSON/YAML mapping; later ones win."""
    import yaml

    options: dict = {}
    for value in values:
        text = value.strip()
        if text.startswith("{"):
            try:
                mapping = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"--engine {value!r}: invalid JSON/YAML ({str(exc).splitlines()[0]})") from None
            if not isinstance(mapping, dict):
                raise ConfigError(f"--engine {value!r}: expected a mapping of engine arguments")
            options.update({str(k): v for k, v in mapping.items()})
            continue
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--engine {value!r}: expected KEY=VALUE or a JSON/YAML mapping")
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            options[key.strip()] = raw
    return options


def _recipe_weights(path: Path, device: str, allow_bin: bool):
    """A recipe's (weights(): merged in memory when called, config, model dir for the
    tokenizer, {model name: directory})."""
    from evomerge.merge.engine import SourceSet, merge, output_config
    from evomerge.merge.plan import MergePlan

    plan = MergePlan.from_yaml(path)
    models = plan.referenced_models()
    sources = SourceSet.load({m: m for m in models}, device=device, allow_bin=allow_bin)
    tok_source = plan.tokenizer_source if plan.tokenizer_source not in (None, "base", "union") else None
    if plan.tokenizer_source == "base" or tok_source is None:
        tok_source = plan.base_model or models[0]
    tok_dir = sources.checkpoints[tok_source].path if tok_source in sources.checkpoints else Path(tok_source)
    paths = {name: str(ck.path) for name, ck in sources.checkpoints.items()}
    return (lambda: merge(plan, sources)), output_config(plan, sources), tok_dir, paths


def make_model_backend(model: str | Path, backend: str = "hf", device: str = "cpu", allow_bin: bool = False,
                       **kw):
    """A backend holding ``model`` (a model directory or a recipe YAML merged in memory)."""
    from evomerge.backends import make_backend
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.io.device import check_device

    check_device(device, "--device")
    path = Path(model)
    if not path.exists():
        raise ConfigError(f"{model}: no such model directory or recipe")
    if path.is_file():
        if path.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"{model}: expected a model directory or a .yaml recipe")
        weights, config, tok_dir, sources = _recipe_weights(path, device, allow_bin)
        if backend == "vllm":          # an engine as deep as the recipe: its weights load in place
            kw.setdefault("layer_capacity", config.get("num_hidden_layers"))
        b = make_backend(backend, tok_dir, device=device, **kw)
        if getattr(b, "multiprocess", False):   # the engine's workers merge the recipe themselves
            from evomerge.merge.plan import MergePlan

            b.load_plan(MergePlan.from_yaml(path).to_dict(), sources)
        else:
            b.load_weights(weights(), config)
        return b
    if not (allow_bin and not any(path.glob("*.safetensors"))):
        Checkpoint(path).close()        # safetensors headers checked against the files: one line if damaged
    if allow_bin and backend == "hf":
        kw["allow_bin"] = True
    return make_backend(backend, path, device=device, **kw)


def backend_options(backend: str, batch_size: int | None, engine: dict, tasks: list[Task]) -> dict:
    """Keyword arguments for ``make_backend``: the HF backend's batch size, or vLLM's engine
    options (checked against vLLM's engine arguments) and the tasks its context is sized for."""
    if backend == "hf":
        if engine:
            raise ConfigError(f"--engine {next(iter(engine))}: engine options are for --backend vllm")
        return {"batch_size": batch_size or 64}
    from evomerge.backends.vllm_backend import check_engine_options

    return {"engine": check_engine_options(engine, "--engine"), "tasks": tasks, "batch_size": batch_size}


def evaluate(backend, tasks: list[Task], limit: int | None = None, scoring: str = "exact") -> dict[str, list]:
    """Score every task (first ``limit`` items) -> task name -> list[ItemResult]."""
    from evomerge.backends.base import scoring_method

    score = scoring_method(backend, scoring)
    return {task.name + ("" if task.split in ("all", "search") else f":{task.split}"):
            score(task, range(min(len(task.items), limit or len(task.items)))) for task in tasks}


def _load(name: str, metric: str | None, options: dict) -> Task:
    """A task with the lm-eval flags; they are lm-eval's, so evomerge's own tasks ignore them."""
    if is_lm_eval_task(name):
        return load_task(name, metric=metric, lm_eval=options or None)
    return load_task(name)


def _plain(value):
    """JSON for the numbers lm-eval's metrics return (numpy scalars, tuples of them)."""
    return value.item() if hasattr(value, "item") else str(value)


def run(args: argparse.Namespace) -> int:
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks: name at least one task")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be a positive integer")
    options = lm_eval_options(args)
    tasks = [_load(n, args.metric, options) for n in names]
    backend_kw = backend_options(args.backend, args.batch_size, parse_engine_options(args.engine), tasks)
    rows, lines = [], []
    for model in args.models:
        start = time.perf_counter()
        backend = make_model_backend(model, args.backend, args.device, args.allow_bin, **backend_kw)
        try:
            results = evaluate(backend, tasks, args.limit, args.scoring)
        finally:
            if hasattr(backend, "close"):      # a vLLM engine holds its KV cache until closed
                backend.close()
        seconds = time.perf_counter() - start
        for (label, res), task in zip(results.items(), tasks):
            acc = sum(r.score for r in res) / max(1, len(res))
            shown = label if task.harness is None or args.scoring == "likelihood" else f"{label} [{task.harness.metric}]"
            rows.append((model, shown, len(res), acc))
            for r in res:
                item = task.items[r.index]
                line = {"model": model, "task": label, "index": r.index, "id": item.id,
                        "score": r.score, "output": r.output, "answer": item.answer}
                if r.metrics is not None:
                    line["metrics"] = r.metrics
                lines.append(json.dumps(line, default=_plain))
        print(f"# {model}: {seconds:.1f} s", file=sys.stderr)
    width = max(len(r[0]) for r in rows)
    header = "likelihood" if args.scoring == "likelihood" else (args.metric or "accuracy")
    task_width = max(20, *(len(r[1]) for r in rows))
    print(f"{'model':<{width}}  {'task':<{task_width}} {'n':>5}  {header}")
    for model, label, n, acc in rows:
        print(f"{model:<{width}}  {label:<{task_width}} {n:>5}  {acc:.3f}")
    if args.out:
        from evomerge.io.atomic import atomic_write_text

        atomic_write_text(args.out, "\n".join(lines) + "\n")
    return 0

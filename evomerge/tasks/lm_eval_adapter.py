"""lm-eval tasks as evomerge objectives, scored exactly as lm-eval scores them (optional extra ``lmeval``).

Accepts an lm-eval task or group name (``arc_easy``, ``gsm8k``, ``mmlu``...), a directory of
lm-eval task YAMLs (``path/to/dir`` or ``path/to/dir:task_name``), or one task YAML file.
Datasets are read from local files or the local Hugging Face datasets cache only
(``HF_DATASETS_OFFLINE`` is forced on), so nothing is downloaded while a search runs.

lm-eval does what lm-eval does. The task is lm-eval's own task object; its requests are built
by ``Task.build_all_requests`` (few-shot sampling with the seed ``simple_evaluate`` uses,
delimiters, ``doc_to_*``, chat template, system instruction, multi-turn few-shot); the
responses come from the evomerge backend's resident model through ``lm_eval_lm.BackendLM``;
the task's own filter pipelines and ``process_results`` turn them into per-item metric
values. evomerge adds only the bookkeeping that lets estimators score any subset: item ``i`` is
document ``i`` of the evaluation split (for a group, the subtasks' documents one after the
other), and ``Harness.score(backend, indices)`` runs the requests of those documents only.

The objective's number is one metric under one filter, named as lm-eval names its results:
``acc``, ``acc_norm``, ``exact_match`` (the task's first filter) or ``exact_match,strict-match``.
The default is the task's first metric under its first filter, the first row lm-eval prints.
Every metric of every filter is kept per item (``ItemResult.metrics``). A metric must be a mean
over items (lm-eval's ``aggregation: mean``), which is what makes subsets and estimators
meaningful; corpus-level metrics (bleu, perplexity...) are refused.
"""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from evomerge.errors import EvomergeError, StrictModel, validate
from evomerge.tasks.task import Item, Task

FEWSHOT_SEED = 1234                        # simple_evaluate's fewshot_random_seed default


class LMEvalOptions(StrictModel):
    """What ``lm_eval run`` takes as evaluation flags rather than task fields."""

    num_fewshot: int | None = None            # --num_fewshot (a task whose YAML says 0 keeps 0, as in lm-eval)
    apply_chat_template: bool = False         # --apply_chat_template (the model tokenizer's template)
    system_instruction: str | None = None     # --system_instruction
    fewshot_as_multiturn: bool | None = None  # --fewshot_as_multiturn; default: on with a chat template
    fewshot_seed: int = FEWSHOT_SEED          # --seed's fewshot part
    # run the '!function' Python of task YAMLs outside lm-eval's own package (they import a .py
    # from beside the YAML); refused unless asked, as trust_remote_code is
    trust_task_code: bool = False


def _import_lm_eval():
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval.tasks
        import lm_eval.utils
    except ImportError:
        raise EvomergeError("lm-eval tasks need the lmeval extra (pip install 'evomerge[lmeval]')") from None
    _memoize_templates(lm_eval.utils.env)
    return lm_eval.tasks


def _memoize_templates(env) -> None:
    """Compile each of lm-eval's Jinja prompt templates once.

    ``lm_eval.utils.apply_template`` compiles its template on every call, and
    ``process_results`` renders ``doc_to_target`` / ``doc_to_choice`` for every item each time
    a candidate is scored: compiling was most of the cost of scoring a small model. A compiled
    template renders exactly what a freshly compiled one does."""
    if getattr(env, "_evomerge_memoized", False):
        return
    compile_template = env.from_string

    @functools.lru_cache(maxsize=4096)
    def compiled(source: str):
        return compile_template(source)

    def from_string(source, globals=None, template_class=None):
        if globals is None and template_class is None and isinstance(source, str):
            return compiled(source)
        return compile_template(source, globals, template_class)

    env.from_string = from_string
    env._evomerge_memoized = True


@functools.lru_cache(maxsize=8)
def _manager(include: str | None, defaults: bool = True):
    # indexing lm-eval's thousands of task YAMLs takes seconds: do it once, and not at all for a
    # local task directory that needs nothing from lm-eval's own tasks
    tasks_mod = _import_lm_eval()
    return tasks_mod.TaskManager(include_path=include, include_defaults=defaults or include is None)


def _resolve(spec: str) -> tuple[str | None, str]:
    """-> (include path or None, task name)."""
    path_part, _, name = spec.partition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    path = Path(path_part)
    if path.is_dir():
        if not name:
            yamls = sorted(path.glob("*.yaml"))
            if len(yamls) != 1:
                raise EvomergeError(f"{path}: name the lm-eval task as {path}:TASK ({len(yamls)} task YAMLs inside)")
            name = _task_name_in(yamls[0])
        return str(path), name
    if path.is_file():
        return str(path.parent), name or _task_name_in(path)
    return None, spec


def _task_name_in(path: Path) -> str:
    for line in path.read_text().splitlines():
        for key in ("task:", "group:"):
            if line.startswith(key):
                return line.split(":", 1)[1].strip().strip("'\"")
    raise EvomergeError(f"{path}: not an lm-eval task YAML (no 'task:' line)")


def _load(include: str | None, name: str, trust_code: bool = False) -> dict:
    """lm-eval's ``TaskManager.load`` of one name: {"tasks": {...}, "groups": {...}}."""
    manager = _manager(include, False) if include else _manager(None)
    if include and (name not in manager.all_tasks or _names_outside(manager, name)):
        manager = _manager(include, True)   # the name, or a group's member, is one of lm-eval's own tasks
    if name not in manager.all_tasks:
        raise EvomergeError(f"unknown lm-eval task {name!r}" + (f" in {include}" if include else ""))
    if not trust_code:
        code = _task_code(manager, name)
        if code is not None:
            raise EvomergeError(f"lm-eval task {name!r}: {code} uses !function (Python from the task's folder); "
                                "evomerge runs it only when asked: lm_eval.trust_task_code: true "
                                "(evomerge eval --trust-task-code)")
    try:
        return manager.load([name])
    except Exception as exc:  # datasets raises many kinds of errors when a dataset is absent
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise EvomergeError(f"lm-eval task {name!r}: cannot load its dataset from local files "
                            f"({type(exc).__name__}: {text})") from None


def _task_code(manager, name: str) -> Path | None:
    """The first YAML outside lm-eval's own package that task/group ``name`` reads (itself, its
    ``include:`` chain, a group's members) and that names a ``!function``; None when none does."""
    import lm_eval

    package = Path(lm_eval.__file__).resolve().parent
    index = getattr(manager, "_index", {})
    seen: set[Path] = set()

    def yaml_with_code(path: Path) -> Path | None:
        path = path.resolve()
        if path in seen or package in path.parents or not path.is_file():
            return None
        seen.add(path)
        text = path.read_text()
        if "!function" in text:
            return path
        for line in text.splitlines():
            if line.startswith("include:"):
                found = yaml_with_code(path.parent / line.split(":", 1)[1].strip().strip("'\""))
                if found is not None:
                    return found
        return None

    def entry_with_code(entry_name: str, depth: int) -> Path | None:
        entry = index.get(entry_name)
        if entry is None or depth > 8:
            return None
        if getattr(entry, "yaml_path", None) is not None:
            found = yaml_with_code(Path(entry.yaml_path))
            if found is not None:
                return found
        members = (getattr(entry, "cfg", None) or {}).get("task")
        for member in members if isinstance(members, list) else []:
            if isinstance(member, str):
                found = entry_with_code(member, depth + 1)
                if found is not None:
                    return found
        return None

    return entry_with_code(name, 0)


def _names_outside(manager, name: str, depth: int = 0) -> bool:
    """Whether group ``name`` (recursively) names a task that ``manager`` has not indexed."""
    entry = getattr(manager, "_index", {}).get(name)
    members = (getattr(entry, "cfg", None) or {}).get("task") if entry is not None and depth < 8 else None
    if not members or "group" not in (entry.cfg or {}):
        return False
    for member in members if isinstance(members, list) else [members]:
        if isinstance(member, str) and (member not in manager.all_tasks or _names_outside(manager, member, depth + 1)):
            return True
    return False


# ---------------------------------------------------------------- the harness


class ScoredItem(NamedTuple):
    index: int
    score: float
    output: str
    metrics: dict | None = None                  # every "metric,filter" value (exact scoring)


@dataclass
class _Leaf:
    """One lm-eval task: its documents are items ``offset .. offset + len(docs) - 1``."""

    name: str
    task: Any                                # lm_eval.api.task.ConfigurableTask
    docs: list
    offset: int
    requests: list[list[Any]] = field(default_factory=list)   # per document, its Instances in idx order


class Harness:
    """The lm-eval side of an evomerge ``Task`` (``Task.harness``): builds requests with lm-eval,
    answers them with a backend, scores them with lm-eval's filters and ``process_results``."""

    def __init__(self, name: str, leaves: list[_Leaf], metric: str, options: LMEvalOptions,
                 metric_names: list[str]) -> None:
        self.name = name
        self.leaves = leaves
        self.metric = metric                 # "metric,filter", the objective's number
        self.metric_names = metric_names     # every "metric,filter" key process_results yields
        self.options = options
        self._lm = None
        self._built_for: object = None       # the chat template requests were built with
        self.n_items = sum(len(leaf.docs) for leaf in leaves)

    @property
    def output_type(self) -> str:
        return self.leaves[0].task.OUTPUT_TYPE

    def leaf_of(self, index: int) -> tuple[_Leaf, int]:
        for leaf in self.leaves:
            if index < leaf.offset + len(leaf.docs):
                return leaf, index - leaf.offset
        raise EvomergeError(f"task {self.name}: item index {index} out of range (0..{self.n_items - 1})")

    # ------------------------------------------------------------ requests
    def build_requests(self, lm: Any = None) -> None:
        """lm-eval's ``build_all_requests`` for every leaf, as ``simple_evaluate`` calls it;
        with a chat template the requests depend on the model's tokenizer (``lm``)."""
        chat = self.options.apply_chat_template
        if chat and lm is None:
            return                            # built at first scoring, when the model is known
        key = getattr(lm.tokenizer, "chat_template", None) if chat else None
        if self.leaves[0].requests and self._built_for == key:
            return
        if chat and not key:
            model = getattr(getattr(lm.model_backend, "model_dir", None), "name", None) or "the model"
            raise EvomergeError(f"lm-eval task {self.name!r}: apply_chat_template needs a chat template and the "
                                f"tokenizer of {model} has none")
        multiturn = self.options.fewshot_as_multiturn
        multiturn = chat if multiturn is None else multiturn
        for leaf in self.leaves:
            leaf.task.set_fewshot_seed(seed=self.options.fewshot_seed)   # same shots on every rebuild
            try:
                leaf.task.build_all_requests(
                    limit=None, rank=0, world_size=1, system_instruction=self.options.system_instruction,
                    apply_chat_template=chat, fewshot_as_multiturn=bool(multiturn),
                    chat_template=lm.apply_chat_template if chat else None,
                    tokenizer_name=lm.tokenizer_name if chat else "")
            except EvomergeError:
                raise
            except Exception as exc:
                raise EvomergeError(f"lm-eval task {leaf.name!r}: cannot build its requests "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
            per_doc: dict[int, list] = defaultdict(list)
            for instance in leaf.task.instances:
                per_doc[instance.doc_id].append(instance)
            leaf.requests = [sorted(per_doc[d], key=lambda inst: inst.idx) for d in range(len(leaf.docs))]
        self._built_for = key

    def _lm_for(self, backend: Any):
        from evomerge.tasks.lm_eval_lm import BackendLM

        if self._lm is None or self._lm.model_backend is not backend:
            self._lm = BackendLM(backend)
        self.build_requests(self._lm)
        return self._lm

    def _answer(self, lm: Any, instances: list) -> None:
        """Run the instances through the LM, as lm-eval's ``evaluate`` does (``repeats`` copies)."""
        by_type: dict[str, list] = defaultdict(list)
        for inst in instances:
            inst.resps, inst.filtered_resps = [], {}
            by_type[inst.request_type].extend([inst] * (inst.repeats or 1))
        for request_type, requests in by_type.items():
            for response, inst in zip(getattr(lm, request_type)(requests), requests):
                inst.resps.append(response)

    # ------------------------------------------------------------ scoring
    def score(self, backend: Any, indices, scoring: str = "exact") -> list[ScoredItem]:
        """Per index a ``ScoredItem``: the objective metric's value (``scoring="exact"``), or the
        graded probability of the reference (``"likelihood"``), with every metric in ``.metrics``.
        Backends turn them into their ``ItemResult`` (``backends.base.harness_results``)."""
        indices = [int(i) for i in indices]
        located = [self.leaf_of(i) for i in indices]
        if not indices:
            return []
        lm = self._lm_for(backend)
        if scoring == "likelihood":
            return self._graded(lm, indices, located)
        self._answer(lm, [inst for leaf, d in located for inst in leaf.requests[d]])
        by_leaf: dict[str, list] = defaultdict(list)
        for leaf, d in located:
            by_leaf[leaf.name].extend(leaf.requests[d])
        for leaf in self.leaves:
            if by_leaf[leaf.name]:
                # the task's filter pipelines on the scored documents' instances only (what
                # Task.apply_filters does for all of them; _filters is lm-eval's list of them)
                for ensemble in leaf.task._filters:
                    ensemble.apply(by_leaf[leaf.name])
        metric_filter = self.metric.partition(",")[2]
        results = []
        for index, (leaf, d) in zip(indices, located):
            requests = leaf.requests[d]
            metrics: dict[str, Any] = {}
            for filter_key in requests[0].filtered_resps:
                values = leaf.task.process_results(leaf.docs[d], [r.filtered_resps[filter_key] for r in requests])
                metrics.update({f"{m},{filter_key}": v for m, v in values.items()})
            results.append(ScoredItem(index, float(metrics[self.metric]), self._output(leaf, d, metric_filter),
                                      metrics=metrics))
        return results

    def _output(self, leaf: _Leaf, d: int, filter_key: str) -> str:
        requests = leaf.requests[d]
        if leaf.task.OUTPUT_TYPE == "multiple_choice":
            lls = [r.resps[0][0] for r in requests]
            choices = leaf.task.doc_to_choice(leaf.docs[d])
            best = max(range(len(lls)), key=lls.__getitem__)
            return str(choices[best]) if best < len(choices) else str(best)
        resp = requests[0].filtered_resps.get(filter_key, requests[0].resps)
        return resp if isinstance(resp, str) else str(resp)

    def _graded(self, lm: Any, indices: list[int], located: list) -> list:
        """Likelihood scoring: multiple choice -- the gold choices' share of the choices'
        probability; generate_until -- P(target delimiter + target | the request's context);
        loglikelihood -- P(continuation | context). Contexts include few-shot and chat turns."""
        from lm_eval.api.instance import Instance

        kind = self.output_type
        if kind == "loglikelihood_rolling":
            raise EvomergeError(f"lm-eval task {self.name!r}: loglikelihood_rolling has no reference to grade")
        if kind == "generate_until":
            probes = []
            for leaf, d in located:
                target = leaf.task.doc_to_target(leaf.docs[d])
                target = target[0] if isinstance(target, list) else target
                delimiter = leaf.task.config.target_delimiter or ""
                probes.append(Instance("loglikelihood", leaf.docs[d], (leaf.requests[d][0].args[0],
                                                                       delimiter + str(target)), 0))
            lls = [ll for ll, _ in lm.loglikelihood(probes)]
            return [ScoredItem(i, math.exp(min(ll, 0.0)), p.args[1]) for i, ll, p in zip(indices, lls, probes)]
        self._answer(lm, [inst for leaf, d in located for inst in leaf.requests[d]])
        results = []
        for index, (leaf, d) in zip(indices, located):
            lls = [r.resps[0][0] for r in leaf.requests[d]]
            if kind != "multiple_choice":
                results.append(ScoredItem(index, math.exp(min(lls[0], 0.0)), leaf.requests[d][0].args[1]))
                continue
            gold = leaf.task.doc_to_target(leaf.docs[d])
            choices = leaf.task.doc_to_choice(leaf.docs[d])
            golds = gold if isinstance(gold, list) else [gold]
            golds = [choices.index(g) if isinstance(g, str) else int(g) for g in golds]
            top = max(lls)
            total = sum(math.exp(v - top) for v in lls)
            share = sum(math.exp(lls[g] - top) for g in set(golds) if 0 <= g < len(lls)) / total
            results.append(ScoredItem(index, share, str(choices[golds[0]])))
        return results


# ---------------------------------------------------------------- loading


def _metric_key(name: str, task: Any, metric: str | None) -> tuple[str, list[str]]:
    """The objective's "metric,filter" key and every key the task reports."""
    aggregations = task.aggregation()
    filters = [ensemble.name for ensemble in task._filters]
    every = [f"{m},{f}" for f in filters for m in aggregations]
    wanted, _, filter_key = (metric or next(iter(aggregations))).partition(",")
    filter_key = filter_key or filters[0]
    if wanted not in aggregations:
        raise EvomergeError(f"lm-eval task {name!r} has no metric {wanted!r} (it reports {', '.join(aggregations)})")
    if filter_key not in filters:
        raise EvomergeError(f"lm-eval task {name!r} has no filter {filter_key!r} (it has {', '.join(filters)})")
    aggregation = aggregations[wanted]
    if getattr(aggregation, "__name__", "") != "mean":
        raise EvomergeError(f"lm-eval task {name!r}: metric {wanted!r} aggregates by "
                            f"{getattr(aggregation, '__name__', aggregation)}, not a mean over items; "
                            "an evomerge objective needs a per-item mean")
    return f"{wanted},{filter_key}", every


def _prepare(task: Any, options: LMEvalOptions) -> None:
    """The task-level overrides ``simple_evaluate`` applies before building requests."""
    if options.num_fewshot is not None:
        if task.get_config("num_fewshot") != 0:        # a YAML's explicit 0 wins, as in lm-eval
            task.set_config(key="num_fewshot", value=options.num_fewshot)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=options.fewshot_seed)


def _group_metric(name: str, group: Any, leaves: list[_Leaf], metric: str | None) -> str | None:
    """The metric a group reports, checked to be a plain mean over all its items."""
    aggregates = list(getattr(group, "aggregate_metric_list", None) or [])
    if not aggregates:
        raise EvomergeError(f"lm-eval group {name!r} reports no aggregate (no aggregate_metric_list); "
                            f"name one of its tasks: {', '.join(leaf.name for leaf in leaves)}")
    wanted = (metric or aggregates[0].metric).partition(",")[0]
    config = next((a for a in aggregates if a.metric == wanted), None)
    if config is None:
        raise EvomergeError(f"lm-eval group {name!r} aggregates no metric {wanted!r} "
                            f"(it aggregates {', '.join(a.metric for a in aggregates)})")
    sizes = {len(leaf.docs) for leaf in leaves}
    if not config.weight_by_size and len(sizes) > 1:
        raise EvomergeError(f"lm-eval group {name!r} averages its subtasks' {wanted} unweighted "
                            "(weight_by_size: false) over subtasks of different sizes; make one objective "
                            f"per subtask: {', '.join(leaf.name for leaf in leaves)}")
    return metric or wanted


def load_lm_eval_task(spec: str, metric: str | None = None, options: LMEvalOptions | dict | None = None) -> Task:
    """An lm-eval task (or group) as an evomerge ``Task`` whose scoring is lm-eval's (``Task.harness``)."""
    _import_lm_eval()
    options = options if isinstance(options, LMEvalOptions) else validate(LMEvalOptions, options or {}, f"task {spec}", "lm_eval")
    include, name = _resolve(spec)
    loaded = _load(include, name, options.trust_task_code)
    tasks = loaded["tasks"]
    groups = loaded.get("groups", {})
    group = next((g for key, g in groups.items() if getattr(g, "name", key) == name or key == name), None)
    if not tasks:
        raise EvomergeError(f"lm-eval task {name!r} is a group without tasks")
    leaves, offset = [], 0
    for task_name, task in tasks.items():
        _prepare(task, options)
        if task.OUTPUT_TYPE == "generate_until":
            from evomerge.tasks.lm_eval_lm import check_generation_kwargs

            check_generation_kwargs(task_name, dict(task.config.generation_kwargs or {}))
        try:
            docs = list(task.eval_docs)
        except Exception as exc:
            raise EvomergeError(f"lm-eval task {task_name!r} has no test or validation split "
                                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not docs:
            raise EvomergeError(f"lm-eval task {task_name!r}: no documents in its evaluation split")
        leaves.append(_Leaf(task_name, task, docs, offset))
        offset += len(docs)
    if group is None and len(leaves) > 1:
        raise EvomergeError(f"lm-eval name {name!r} selects {len(leaves)} tasks and no group aggregates them; "
                            f"name one of them: {', '.join(leaf.name for leaf in leaves)}")
    if group is not None:
        metric = _group_metric(name, group, leaves, metric)
    keys = [_metric_key(leaf.name, leaf.task, metric) for leaf in leaves]
    if len({k for k, _ in keys}) > 1:
        raise EvomergeError(f"lm-eval group {name!r}: its tasks report {metric!r} under different filters "
                            f"({', '.join(sorted({k for k, _ in keys}))})")
    metric_key, every = keys[0]
    harness = Harness(name, leaves, metric_key, options, every)
    harness.build_requests()              # now, unless a chat template needs the model's tokenizer
    items = []
    for leaf in leaves:
        for d, doc in enumerate(leaf.docs):
            item_id = str(leaf.offset + d) if len(leaves) == 1 else f"{leaf.name}:{d}"
            items.append(_item(leaf, d, doc, item_id))
    kind = "multiple_choice" if harness.output_type == "multiple_choice" else "generate"
    split = "test" if leaves[0].task.has_test_docs() else "validation"
    return Task(name, kind, items, split=split, source=f"lm-eval:{name}", harness=harness)


def _item(leaf: _Leaf, d: int, doc: dict, item_id: str) -> Item:
    """An evomerge item describing document ``d`` (for display and ids; lm-eval scores it)."""
    task = leaf.task
    prompt = leaf.requests[d][0].args[0] if leaf.requests else task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = [str(c) for c in task.doc_to_choice(doc)]
        first = target[0] if isinstance(target, list) else target
        answer = choices[first] if isinstance(first, int) and 0 <= first < len(choices) else str(first)
        return Item(item_id, str(prompt), answer, choices)
    if isinstance(target, list):
        target = target[0]
    return Item(item_id, str(prompt), str(target))

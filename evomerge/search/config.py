"""The search config: one YAML file, validated with messages that name the field.

    seed: 0
    run_dir: runs/demo                 # where the run directory goes
    sources: {base: zoo/base, math: zoo/math, lang: zoo/lang}   # name used in plans -> model dir
    base: base                         # one of the sources, or omitted
    genome: {kind: parameter, method: ties, granularity: layer}  # see evomerge/search/genome.py
    objectives:                        # one per task; all maximised
      - {name: arith, task: "zoo/arith:search", estimator: gpirt}   # calibrated before generation 0
      - {name: calc, task: "zoo/calc:search", estimator: irt, calibration: calib/calc.json}  # given
      - {name: lang, task: "zoo/lang:search"}           # no estimator: score every item
      - {name: graded, task: "zoo/calc:search", scoring: likelihood, estimator: subset}
                                       # probability of the reference output on a fixed 10% subset
    calibration: {random_merges: 24, anchors: 0.1}     # IRT calibration population + anchor count
    evaluator: {kind: merge, backend: hf, device: cpu}
    optimizer: {name: nsga2, population: 8, generations: 6}
    audit: {every: 10}                 # every 10th candidate also scored on the whole pool
    workers: {backend: local, count: 1}

Relative paths (sources, task YAML files, calibrations, run_dir) are relative to the
config file. ``evaluator: {kind: synthetic}`` replaces merging and scoring by a cheap
analytic function of the genome (see ``evomerge/workers/evaluator.py``); it exists for
tests and for benchmarking the controller and the pools, not for real searches.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, field_validator, model_validator

from evomerge.errors import ConfigError, EvomergeError, StrictModel, UNKNOWN_FIELD, validate
from evomerge.search.optimizers import OPTIMIZERS, BoxSpace, check_space

from evomerge.tasks.lm_eval_adapter import LMEvalOptions
from evomerge.estimators import registry


# Objective and source names end up in file names (calibration/<objective>.json) and
# mergekit stage paths, so they are identifiers, never paths.
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def check_identifier(name: str) -> str:
    """``name`` unchanged if it is a plain name; ValueError naming it otherwise."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or ".." in name:
        raise ValueError(f"{name!r} is not a plain name (letters, digits, '_', '.', '+', '-'; "
                         "no path separators, no '..')")
    return name


class ObjectiveConfig(StrictModel):
    name: str
    task: str                                   # zoo/NAME[:split], a task YAML, or an lm-eval task
    estimator: str = "full"                     # full = mean over every item of the task
    calibration: str | None = None              # evomerge calibration JSON; default: fit one before the search
    heldout: str | None = None                  # held-out task for judging; default: task with :search -> :heldout
    weight: float = 1.0                         # for single-objective optimizers (weighted sum)
    # exact: 0/1 per item (greedy output vs answer); likelihood: the probability of the
    # reference output, a graded score with far less noise per item (estimators full | subset)
    scoring: Literal["exact", "likelihood"] = "exact"
    # lm-eval tasks: the metric maximised, as lm-eval names its results ("acc_norm",
    # "exact_match,strict-match"; default the task's first), and lm-eval's evaluation options
    metric: str | None = None
    lm_eval: LMEvalOptions | None = None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_identifier(v)

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, v: str) -> str:
        if v not in registry.ESTIMATORS:
            raise ValueError(registry.unknown_estimator(v))
        return v

    @model_validator(mode="after")
    def _scoring_fits_estimator(self) -> "ObjectiveConfig":
        if self.scoring == "likelihood" and registry.get(self.estimator).calibrated:
            free = [e.name for e in registry.ESTIMATORS.values() if not e.calibrated]
            raise ValueError(f"estimator: {self.estimator!r} fits IRT to 0/1 responses; likelihood scoring "
                             f"works with {' or '.join(free)}")
        return self

    @property
    def heldout_task(self) -> str | None:
        if self.heldout is not None:
            return self.heldout
        base, sep, split = self.task.rpartition(":")
        return f"{base}:heldout" if sep and split == "search" else None


class CalibrationConfig(StrictModel):
    """How a run fits IRT item parameters for objectives whose estimator needs them and
    whose ``calibration`` file is not given: the source models plus ``random_merges`` random
    genomes, each scored on every item of the task, make the calibration population."""

    random_merges: int = Field(24, ge=0)
    anchors: float = Field(0.1, gt=0)           # < 1: fraction of the task's items; >= 1: a count
    method: str = "irt"                         # anchor clustering: irt (item embeddings) | correct
    dims: list[int] = [1, 2]                    # IRT dimensions tried (chosen by validation error)
    seed: int | None = None                     # default: the run's seed

    def n_anchors(self, n_items: int) -> int:
        k = round(self.anchors * n_items) if self.anchors < 1 else int(self.anchors)
        return max(1, min(k, n_items))


class EvaluatorConfig(StrictModel):
    kind: Literal["merge", "synthetic"] = "merge"
    backend: str = "hf"                         # merge: inference engine (hf | vllm)
    device: str = "cpu"
    model_dir: str | None = None                # tokenizer + architecture; default: the base or first source
    threads: int | None = Field(None, ge=1)     # torch CPU threads per worker; default: torch's choice
    # vllm: engine arguments handed to vllm.LLM (max_model_len, kv_cache_memory_bytes, dtype,
    # gpu_memory_utilization, tensor_parallel_size, ...), checked against vllm.EngineArgs.
    # Default: a context that fits the objectives' longest request, a KV cache sized to it on CPU.
    engine: dict[str, Any] = {}
    # vllm: the engine's workers in their own processes (vLLM's default mode; needed for
    # tensor_parallel_size > 1); candidates reach them as plans and are merged there
    multiprocess: bool = False
    sleep: float = Field(0.0, ge=0)             # synthetic: seconds per evaluation
    fail_every: int = Field(0, ge=0)            # synthetic: every N-th candidate fails (0: never)

    @model_validator(mode="after")
    def _engine_options(self) -> "EvaluatorConfig":
        if self.engine and self.backend != "vllm":
            raise ValueError(f"engine.{next(iter(self.engine))}: engine options are for backend vllm "
                             f"(backend is {self.backend!r})")
        if self.multiprocess and self.backend != "vllm":
            raise ValueError(f"multiprocess: the engine's worker processes are vLLM's (backend is {self.backend!r})")
        if self.engine and self.kind == "merge":
            from evomerge.backends.vllm_backend import check_engine_options

            try:
                check_engine_options(self.engine, "engine")
            except EvomergeError as exc:
                raise ValueError(str(exc)) from None
        return self


class OptimizerConfig(StrictModel):
    name: str = "nsga2"
    population: int = Field(8, ge=1)
    generations: int = Field(10, ge=1)
    max_evaluations: int | None = Field(None, ge=1)
    options: dict[str, Any] = {}                # passed to the library's algorithm
    reference_point: list[float] | None = None  # hypervolume reference; default 0 per objective
    failed_value: float = 0.0                   # objective value told for a failed candidate
    # Steady state: ask one new candidate whenever a result arrives, so no worker waits for
    # the slowest candidate of a generation. Only for optimizers that take results in any
    # order (random, nevergrad); pymoo's need generation barriers.
    steady_state: bool = False
    # nevergrad optimizers: the genome the search is centred on (one value per gene, in the
    # order of the genome's names), e.g. a recipe known to be good; default: the box centre
    start: list[float] | None = None

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {v!r} (choose from {', '.join(OPTIMIZERS)})")
        return v


class AuditConfig(StrictModel):
    every: int = Field(10, ge=0)                # 0: no audits


class WorkersConfig(StrictModel):
    backend: Literal["local", "ray"] = "local"
    count: int = Field(1, ge=1)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    memory: int | None = Field(None, ge=1)      # bytes per worker (Ray)
    max_retries: int = Field(2, ge=0)
    address: str | None = None                  # Ray cluster: "auto" or HOST:PORT
    # Seconds one candidate may run before its worker counts as hung and is replaced (the
    # candidate is retried like one whose worker died). None: wait forever. Ray only.
    task_timeout: float | None = Field(None, gt=0)


class SearchConfig(StrictModel):
    seed: int = 0
    run_dir: str | None = None
    sources: dict[str, str] = {}
    base: str | None = None
    genome: dict[str, Any]
    objectives: list[ObjectiveConfig] = Field(min_length=1)
    evaluator: EvaluatorConfig = EvaluatorConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    audit: AuditConfig = AuditConfig()
    workers: WorkersConfig = WorkersConfig()
    calibration: CalibrationConfig = CalibrationConfig()

    @field_validator("sources", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        if isinstance(v, list):  # [path, ...] or [{name, path}, ...]
            out = {}
            for entry in v:
                if isinstance(entry, str):
                    out[Path(entry).name] = entry
                elif isinstance(entry, dict) and set(entry) == {"name", "path"}:
                    out[str(entry["name"])] = str(entry["path"])
                else:
                    raise ValueError(f"entries must be paths or {{name, path}}, got {entry!r}")
            return out
        return v

    @field_validator("sources")
    @classmethod
    def _source_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            check_identifier(name)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "SearchConfig":
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: duplicate objective name in {names}")
        if self.base is not None and self.base not in self.sources:
            raise ValueError(f"base: {self.base!r} is not one of the sources ({', '.join(self.sources) or 'none'})")
        if self.evaluator.kind == "merge" and len(self.sources) < 1:
            raise ValueError("sources: a merge search needs at least one source model")
        if self.optimizer.steady_state and OPTIMIZERS[self.optimizer.name][0] == "pymoo":
            raise ValueError(f"optimizer.steady_state: {self.optimizer.name} needs generation barriers "
                             "(steady state works with random and the nevergrad optimizers)")
        ref = self.optimizer.reference_point
        if ref is not None and len(ref) != len(self.objectives):
            raise ValueError(f"optimizer.reference_point: {len(ref)} values for {len(self.objectives)} objectives")
        return self

    @property
    def calibration_seed(self) -> int:
        """The seed of the calibration merges and of the subset estimator's items."""
        return self.calibration.seed if self.calibration.seed is not None else self.seed

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]


def _resolve(value: str, root: Path) -> str:
    path = Path(os.path.expandvars(value)).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def _is_task_file(task: str) -> bool:
    return task.split(":")[0].endswith((".yaml", ".yml"))


def parse_config(data: Any, where: str, root: Path) -> SearchConfig:
    """Validate a config mapping; relative paths are resolved against ``root``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of fields")
    cfg = validate(SearchConfig, data, where)
    # The genome section is checked here too, so its errors name the file like the others.
    if cfg.genome.get("kind") == "box":
        box_space(cfg.genome, f"{where}: genome")
    else:
        from evomerge.search.genome import parse_genome_config

        parse_genome_config(cfg.genome, where)
    cfg.sources = {name: _resolve(p, root) for name, p in cfg.sources.items()}
    if cfg.run_dir is not None:
        cfg.run_dir = _resolve(cfg.run_dir, root)
    if cfg.evaluator.model_dir is not None:
        cfg.evaluator.model_dir = _resolve(cfg.evaluator.model_dir, root)
    for obj in cfg.objectives:
        if _is_task_file(obj.task):
            base, sep, split = obj.task.partition(":")
            obj.task = _resolve(base, root) + sep + split
        if obj.calibration is not None:
            obj.calibration = _resolve(obj.calibration, root)
        if obj.heldout is not None and _is_task_file(obj.heldout):
            base, sep, split = obj.heldout.partition(":")
            obj.heldout = _resolve(base, root) + sep + split
    return cfg


def load_config(path: str | Path) -> SearchConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8); a config is YAML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return parse_config(data, str(path), path.resolve().parent)


def dump_config(cfg: SearchConfig) -> str:
    """The resolved config (absolute paths) as YAML: what the run directory keeps."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- genome space


def source_depths(cfg: SearchConfig, where: str = "sources") -> dict[str, int]:
    return {name: depth for name, (_, depth) in _source_architectures(cfg, where).items()}


def _source_architectures(cfg: SearchConfig, where: str = "sources") -> dict:
    """{source: (registry architecture, layer count)}, from config.json (and, only for an
    architecture the registry must infer, the safetensors headers)."""
    from evomerge.io.architectures import architecture_of
    from evomerge.io.checkpoint import Checkpoint

    out = {}
    for name, path in cfg.sources.items():
        config_json = Path(path) / "config.json"
        try:
            config = json.loads(config_json.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{where}.{name}: {path} is not a model directory (no config.json)") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}.{name}: cannot parse {config_json} ({exc})") from None
        try:
            try:
                arch = architecture_of(config, where=str(path))
            except EvomergeError:  # not registered: inferred from the tensor names, or refused
                arch = Checkpoint(path).architecture
            out[name] = (arch, arch.num_layers(config, str(config_json)))
        except EvomergeError as exc:
            raise ConfigError(f"{where}.{name}: {exc}") from None
    return out


def box_space(genome: dict[str, Any], where: str = "genome") -> BoxSpace:
    """``genome: {kind: box, dim: D, lower: L, upper: U, integer: [i, ...]}`` (synthetic runs)."""
    extra = set(genome) - {"kind", "dim", "lower", "upper", "integer"}
    if extra:
        raise ConfigError(f"{where}.{sorted(extra)[0]}: {UNKNOWN_FIELD}")
    dim = genome.get("dim")
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"{where}.dim: must be a positive integer, got {dim!r}")
    try:
        lower = np.broadcast_to(np.asarray(genome.get("lower", 0.0), float), (dim,)).copy()
        upper = np.broadcast_to(np.asarray(genome.get("upper", 1.0), float), (dim,)).copy()
    except (ValueError, TypeError):
        raise ConfigError(f"{where}.lower/upper: need a number or {dim} numbers") from None
    integer = np.zeros(dim, bool)
    for i in genome.get("integer", []) or []:
        if not isinstance(i, int) or not 0 <= i < dim:
            raise ConfigError(f"{where}.integer: gene index {i!r} outside 0..{dim - 1}")
        integer[i] = True
    space = BoxSpace(lower, upper, integer)
    check_space(space, where)
    return space


def build_genome_space(cfg: SearchConfig):
    """The run's genome space: a box for synthetic runs, else genome.py's spaces."""
    if cfg.genome.get("kind") == "box":
        if cfg.evaluator.kind != "synthetic":
            raise ConfigError("genome.kind: 'box' has no merge plan; use it with evaluator.kind: synthetic")
        return box_space(cfg.genome)
    from evomerge.search.genome import build_space

    from evomerge.io.architectures import common_architecture

    found = _source_architectures(cfg)
    if not found:
        raise ConfigError("sources: the genome space needs source models")
    try:
        architecture = common_architecture({name: arch for name, (arch, _) in found.items()})
    except EvomergeError as exc:
        raise ConfigError(f"sources: {exc}") from None
    depths = {name: depth for name, (_, depth) in found.items()}
    names = [n for n in cfg.sources if n != cfg.base]
    depth: int | dict[str, int] = depths if len(set(depths.values())) > 1 else next(iter(depths.values()))
    space = build_space(cfg.genome, names, cfg.base, depth, architecture)
    check_space(space)
    return space


# --------------------------------------------------------------------------- run directories


def load_run_config(run_dir: str | Path) -> SearchConfig:
    """The resolved config a run keeps in its archive (paths in it are already absolute)."""
    from evomerge.search.store import RunStore

    return RunStore(run_dir).config()


def load_run_sources(run_dir: str | Path) -> tuple[dict[str, str], str | None]:
    """{name used in plans: model dir} and the base model of a run (for export / report)."""
    cfg = load_run_config(run_dir)
    return dict(cfg.sources), cfg.base


def load_run_space(run_dir: str | Path):
    """The genome space of a run, rebuilt from its config."""
    return build_genome_space(load_run_config(run_dir))

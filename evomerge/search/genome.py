"""Genome spaces: a real/integer vector -> a merge plan.

Every space is a flat box ``[lower, upper]`` with an ``integer`` mask, which is
all an optimizer needs to know. ``decode(x)`` clips to the box, rounds the
integer genes and builds a ``MergePlan`` (or, for the combined space, a
``StagedPlan`` of two plans); it is a pure function of ``x``. ``describe(x)``
returns the same decision in readable form (named genes and per-layer series)
for reports and model cards.

Four spaces, chosen by ``genome.kind`` in the search config:

- ``parameter``: coefficients of one merge method (weights, densities, SLERP t,
  DELLA epsilon) at a chosen granularity -- one gene per source (``model``),
  per block of N layers (``block:N``) or per layer (``layer``) -- optionally
  split into attention / MLP, with optional separate genes for embeddings,
  norms and the head. Per-layer values are written as mergekit gradient lists
  of length ``num_layers``: mergekit evaluates a gradient at t = i / (L - 1)
  for layer i, so list element i is exactly layer i's value.
- ``layer_swap``: per layer, which source supplies it (passthrough slices).
- ``data_flow``: Sakana's data-flow space. T = M * r slots walk the M layers of
  the source collection r times; an inclusion gene per slot and an input scale
  per transition (or per slot). Residual-stream scaling is not a Llama op, but
  RMSNorm is scale invariant: scaling the stream that enters layer k by s gives
  the same logits as multiplying o_proj and down_proj of layer k and every
  later layer by 1/s (the stream is then 1/s of the scaled one everywhere and
  the final norm removes the factor). So the plan carries the cumulative
  1/prod(s) as passthrough ``scale`` parameters filtered to the tensors that
  write into the residual stream, which the architecture registry names
  (o_proj/down_proj for Llama, c_proj for GPT-2, every expert's down projection
  for MoE, the post-attention / post-feed-forward norms' gains for Gemma2/3);
  mergekit understands the same parameters (except Gemma's gains, see
  ``evomerge.merge.engine._offset_gain_scaled``).
- ``combined``: a parameter-space merge, then data flow over [merged + sources].
  A single mergekit config cannot reference its own output, so this decodes to
  a ``StagedPlan``: stage ``merged`` (a MergePlan), then a passthrough MergePlan
  that names ``merged`` as one of its models.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.errors import ConfigError
from evomerge.io.architectures import ARCHITECTURES, Architecture, architecture_of
from evomerge.merge.plan import MergePlan

MERGED = "merged"  # name of the intermediate model of the combined space

# Methods that merge task vectors against a base model.
BASE_METHODS = {"ties", "dare_ties", "della", "task_arithmetic", "breadcrumbs", "slerp"}
DENSITY_METHODS = {"ties", "dare_ties", "della", "breadcrumbs"}


# --------------------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Bounds = tuple[float, float]


def _check_bounds(value: Bounds, info) -> Bounds:
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"bounds must be finite, got [{lo}, {hi}]")
    if lo > hi:
        raise ValueError(f"lower bound {lo} is above upper bound {hi}")
    return value


class ParameterSpaceConfig(_Strict):
    kind: Literal["parameter"] = "parameter"
    method: Literal["ties", "dare_ties", "della", "task_arithmetic", "breadcrumbs", "linear", "slerp"]
    granularity: str = "model"  # model | layer | block:N
    per_module: bool = False  # separate attention / MLP genes
    separate: list[Literal["embed", "norm", "lm_head"]] = []  # extra genes for these tensors
    weight: Bounds = (0.0, 1.0)
    density: Bounds = (0.1, 1.0)
    epsilon: Bounds = (0.0, 0.1)  # della only
    t: Bounds = (0.0, 1.0)  # slerp only
    normalize: bool | None = None  # passed through to ties-like methods when set
    random_seed: int = 0  # fixed so DARE / DELLA drops make decoding deterministic

    _bounds = field_validator("weight", "density", "epsilon", "t")(_check_bounds)

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        if v in ("model", "layer") or re.fullmatch(r"block:[1-9][0-9]*", v):
            return v
        raise ValueError(f"must be 'model', 'layer' or 'block:N' with N >= 1, got {v!r}")

    @field_validator("density", "epsilon")
    @classmethod
    def _unit(cls, v: Bounds) -> Bounds:
        if v[0] < 0 or v[1] > 1:
            raise ValueError(f"must lie within [0, 1], got [{v[0]}, {v[1]}]")
        return v


class LayerSwapConfig(_Strict):
    kind: Literal["layer_swap"]
    sources: list[str] | None = None  # candidates per layer; default: base + all sources
    embed_from: str | None = None  # embeddings / norm / head; default: mergekit's rule (see _bracket)


class DataFlowConfig(_Strict):
    kind: Literal["data_flow"] = "data_flow"
    sources: list[str] | None = None  # the layer collection, in this order; default: all sources
    repetitions: int = Field(2, ge=1, le=8)
    max_layers: int | None = Field(None, ge=1)  # cap on the output depth; default 2 * num_layers
    scaling: Literal["transition", "slot", "none"] = "transition"
    scale: Bounds = (0.5, 2.0)
    embed_from: str | None = None

    _bounds = field_validator("scale")(_check_bounds)

    @field_validator("scale")
    @classmethod
    def _positive(cls, v: Bounds) -> Bounds:
        if v[0] <= 0:
            raise ValueError(f"scales must be positive, got lower bound {v[0]}")
        return v


class CombinedConfig(_Strict):
    kind: Literal["combined"]
    parameter: ParameterSpaceConfig
    data_flow: DataFlowConfig


GenomeConfig = Annotated[
    Union[ParameterSpaceConfig, LayerSwapConfig, DataFlowConfig, CombinedConfig], Field(discriminator="kind")
]


class _GenomeRoot(_Strict):
    genome: GenomeConfig


def _one_line(exc: ValidationError, where: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union")))
    # pydantic puts the union tag in loc ("genome.parameter.method"); drop it for readability.
    loc = re.sub(r"^genome\.(parameter|layer_swap|data_flow|combined)\b", "genome", loc)
    loc = loc.replace("genome", where, 1)
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}"


def parse_genome_config(cfg: dict | BaseModel, where: str = "genome") -> BaseModel:
    """Validate the ``genome:`` section; errors are one line naming the field."""
    if isinstance(cfg, BaseModel):
        return cfg
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(cfg).__name__}")
    if "kind" not in cfg:
        cfg = {"kind": "parameter", **cfg}
    try:
        return _GenomeRoot.model_validate({"genome": cfg}).genome
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, where)) from None


# --------------------------------------------------------------------------- plans


class StagedPlan(BaseModel):
    """Merge stages run in order; a later stage may name an earlier stage as a model.

    ``stages`` maps a stage name to its plan; the last stage is the output.
    """

    stages: list[tuple[str, MergePlan]]

    @property
    def final(self) -> MergePlan:
        return self.stages[-1][1]

    def to_dict(self) -> dict:
        return {"stages": [{"name": name, "plan": plan.to_dict()} for name, plan in self.stages]}

    @classmethod
    def from_dict(cls, d: dict) -> "StagedPlan":
        return cls(stages=[(s["name"], MergePlan.from_dict(s["plan"])) for s in d["stages"]])


class _TensorView:
    """Duck-types ``evomerge.io.checkpoint.Checkpoint`` over tensors that are already in memory
    (an earlier stage's output, or another SourceSet's resident weights), so a later stage can
    use them as a source without touching the disk."""

    def __init__(self, name: str, config: dict, names: list[str], get, path=None):
        self.name, self.config, self.tensor_names, self._get = name, config, list(names), get
        self.path = path if path is not None else Path(name)
        self._names = set(names)
        self._architecture: Architecture | None = None

    @property
    def architecture(self) -> Architecture:
        if self._architecture is None:
            self._architecture = architecture_of(self.config, self.tensor_names, where=self.name)
        return self._architecture

    @property
    def num_layers(self) -> int:
        return self.architecture.num_layers(self.config, f"config of {self.name}")

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str, mapped: bool = False):
        # Already in memory: ``mapped`` (zero-copy read) is what we give anyway.
        return self._get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str):
        return self._get(name).dtype


def staged_sources(plan: StagedPlan, sources, device=None):
    """A SourceSet for ``plan.final``: the sources plus every earlier stage's output, merged in memory."""
    from evomerge.merge.engine import SourceSet, merge, output_config

    views = {
        name: _TensorView(name, ck.config, ck.tensor_names, (lambda n, m=name: sources.tensor(m, n)), ck.path)
        for name, ck in sources.checkpoints.items()
    }
    current = sources
    for name, stage in plan.stages[:-1]:
        if name in views:
            raise ConfigError(f"stage name {name!r} is also a source name")
        weights = merge(stage, current, device)
        views[name] = _TensorView(name, output_config(stage, current), list(weights), weights.__getitem__)
        current = SourceSet(views, device=device or sources.device, resident=False)
    return current


def merge_plan(plan: MergePlan | StagedPlan, sources, device=None) -> dict:
    """In-memory weights of either plan kind (what a worker swaps into its backend)."""
    from evomerge.merge.engine import merge

    if isinstance(plan, StagedPlan):
        return merge(plan.final, staged_sources(plan, sources, device), device)
    return merge(plan, sources, device)


def plan_output_config(plan: MergePlan | StagedPlan, sources) -> dict:
    """config.json of the model either plan kind produces."""
    from evomerge.merge.engine import output_config

    if isinstance(plan, StagedPlan):
        return output_config(plan.final, staged_sources(plan, sources))
    return output_config(plan, sources)


def plan_from_dict(d: dict) -> MergePlan | StagedPlan:
    """Inverse of ``plan.to_dict()`` for both plan kinds (archive rows store these dicts)."""
    return StagedPlan.from_dict(d) if "stages" in d else MergePlan.from_dict(d)


# --------------------------------------------------------------------------- spaces


@dataclass
class _Gene:
    name: str
    low: float
    high: float
    integer: bool = False


@dataclass
class GenomeSpace:
    """A box of genes and a deterministic decoder; subclasses add the decoding."""

    genes: list[_Gene] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return len(self.genes)

    @property
    def lower(self) -> np.ndarray:
        return np.array([g.low for g in self.genes], dtype=float)

    @property
    def upper(self) -> np.ndarray:
        return np.array([g.high for g in self.genes], dtype=float)

    @property
    def integer(self) -> np.ndarray:
        return np.array([g.integer for g in self.genes], dtype=bool)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.genes]

    def _add(self, name: str, bounds: Bounds, integer: bool = False) -> int:
        self.genes.append(_Gene(name, float(bounds[0]), float(bounds[1]), integer))
        return len(self.genes) - 1

    def clip(self, x: np.ndarray) -> np.ndarray:
        """``x`` clipped to the box, integer genes rounded (half away from zero is avoided:
        numpy rounds half to even, which is still deterministic)."""
        x = np.asarray(x, dtype=float).reshape(-1)
        if x.shape[0] != self.dim:
            raise ConfigError(f"genome has {x.shape[0]} genes, the space expects {self.dim}")
        if not np.all(np.isfinite(x)):
            raise ConfigError("genome contains NaN or infinite genes")
        x = np.clip(x, self.lower, self.upper)
        x[self.integer] = np.round(x[self.integer])
        return x

    def random(self, rng: np.random.Generator) -> np.ndarray:
        """A uniform sample of the box (integers uniform over their values)."""
        x = rng.uniform(self.lower, self.upper)
        ints = self.integer
        x[ints] = rng.integers(self.lower[ints].astype(int), self.upper[ints].astype(int) + 1)
        return x

    def decode(self, x: np.ndarray) -> MergePlan | StagedPlan:
        raise NotImplementedError

    def describe(self, x: np.ndarray) -> dict:
        raise NotImplementedError


def _series_per_layer(values: list[float], granularity: str, num_layers: int) -> list[float]:
    """Expand the genes of one series to one value per layer."""
    if granularity == "model":
        return [values[0]] * num_layers
    if granularity == "layer":
        return list(values)
    block = int(granularity.split(":")[1])
    return [values[i // block] for i in range(num_layers)]


def _as_param(per_layer: list[float]) -> float | list[float]:
    # A constant series is written as a scalar: same meaning, shorter YAML.
    if all(v == per_layer[0] for v in per_layer):
        return float(per_layer[0])
    return [float(v) for v in per_layer]


class ParameterSpace(GenomeSpace):
    """Coefficients of one merge method; see the module docstring."""

    def __init__(self, cfg: ParameterSpaceConfig, sources: list[str], base_model: str | None, num_layers: int,
                 architecture: Architecture | None = None):
        super().__init__()
        self.cfg, self.num_layers, self.base_model = cfg, num_layers, base_model
        # Which tensor names the per-module / separate genes filter on.
        self.arch = architecture or ARCHITECTURES["llama"]
        if cfg.method in BASE_METHODS and base_model is None:
            raise ConfigError(f"genome.method: {cfg.method} needs a base model (set the config's base)")
        if cfg.method == "linear":
            self.models = list(sources) if base_model is None or base_model in sources else [base_model, *sources]
        else:
            self.models = [s for s in sources if s != base_model]
        if not self.models:
            raise ConfigError("genome: no source besides the base model to merge")
        if cfg.method == "slerp" and len(self.models) != 1:
            raise ConfigError(f"genome.method: slerp merges the base with exactly one source, got {len(self.models)}")
        if cfg.granularity == "model":
            self.n_groups = 1
        elif cfg.granularity == "layer":
            self.n_groups = num_layers
        else:
            self.n_groups = math.ceil(num_layers / int(cfg.granularity.split(":")[1]))
        self.modules = ["attn", "mlp"] if cfg.per_module else ["all"]

        # families: (param name, model or None for global, bounds)
        fams: list[tuple[str, str | None, Bounds]] = []
        if cfg.method == "slerp":
            fams.append(("t", None, cfg.t))
        else:
            for m in self.models:
                fams.append(("weight", m, cfg.weight))
                if cfg.method in DENSITY_METHODS:
                    fams.append(("density", m, cfg.density))
        # index[(param, model, module)] -> gene indices per group; extra[(param, model, part)] -> gene
        self.index: dict[tuple[str, str | None, str], list[int]] = {}
        self.extra: dict[tuple[str, str | None, str], int] = {}
        for param, model, bounds in fams:
            who = f"{param}[{model}]" if model else param
            for module in self.modules:
                suffix = "" if module == "all" else f".{module}"
                self.index[(param, model, module)] = [
                    self._add(f"{who}{suffix}" + (f".g{g}" if self.n_groups > 1 else ""), bounds)
                    for g in range(self.n_groups)
                ]
            for part in cfg.separate:
                self.extra[(param, model, part)] = self._add(f"{who}.{part}", bounds)
        self.epsilon: dict[str, int] = {}
        if cfg.method == "della":
            for m in self.models:
                self.epsilon[m] = self._add(f"epsilon[{m}]", cfg.epsilon)

    def _value(self, x: np.ndarray, param: str, model: str | None) -> tuple[float | list, dict[str, list[float]]]:
        """The mergekit parameter value for one (param, model) and its per-layer series."""
        series = {
            module: _series_per_layer([x[i] for i in self.index[(param, model, module)]], self.cfg.granularity, self.num_layers)
            for module in self.modules
        }
        if not self.cfg.per_module and not self.cfg.separate:
            return _as_param(series["all"]), series
        # First matching filter wins (mergekit); specific names before the catch-all.
        entries: list[dict] = []
        for part in ("embed", "lm_head", "norm"):
            if part in self.cfg.separate:
                value = float(x[self.extra[(param, model, part)]])
                entries += [{"filter": f, "value": value} for f in self.arch.separate_filters(part)]
        if self.cfg.per_module:
            for module in ("attn", "mlp"):
                value = _as_param(series[module])
                entries += [{"filter": f, "value": value} for f in self.arch.module_filters(module)]
            # Anything else inside a layer (its norms, unless they have a gene) takes the mean.
            rest = [(a + b) / 2 for a, b in zip(series["attn"], series["mlp"])]
        else:
            rest = series["all"]
        entries.append({"value": _as_param(rest)})
        return entries, series

    def _della_epsilon(self, x: np.ndarray, model: str) -> float:
        # DELLA's keep probabilities density +/- epsilon must stay inside (0, 1): shrink
        # epsilon to fit the model's tightest density (deterministic, so decoding stays pure).
        eps = float(x[self.epsilon[model]])
        densities = [float(x[i]) for key, idx in self.index.items() if key[:2] == ("density", model) for i in idx]
        densities += [float(x[i]) for key, i in self.extra.items() if key[:2] == ("density", model)]
        room = min((min(d, 1 - d) for d in densities if 0 < d < 1), default=1.0)
        return min(eps, 0.99 * room)

    def decode(self, x: np.ndarray) -> MergePlan:
        x = self.clip(x)
        cfg = self.cfg
        plan: dict[str, Any] = {"merge_method": cfg.method, "random_seed": cfg.random_seed}
        if cfg.method == "slerp":
            value, _ = self._value(x, "t", None)
            plan["models"] = [{"model": self.base_model}, {"model": self.models[0]}]
            plan["parameters"] = {"t": value}
        else:
            models = []
            for m in self.models:
                params = {"weight": self._value(x, "weight", m)[0]}
                if cfg.method in DENSITY_METHODS:
                    params["density"] = self._value(x, "density", m)[0]
                if cfg.method == "della":
                    params["epsilon"] = self._della_epsilon(x, m)
                models.append({"model": m, "parameters": params})
            plan["models"] = models
            if cfg.normalize is not None and cfg.method in DENSITY_METHODS | {"task_arithmetic", "linear"}:
                plan["parameters"] = {"normalize": cfg.normalize}
        if cfg.method != "linear":
            plan["base_model"] = self.base_model
        return MergePlan.from_dict(plan)

    def describe(self, x: np.ndarray) -> dict:
        x = self.clip(x)
        per_layer: dict[str, list[float]] = {}
        for (param, model, module), _ in self.index.items():
            if module != self.modules[0]:
                continue
            _, series = self._value(x, param, model)
            for mod, values in series.items():
                key = (f"{param}[{model}]" if model else param) + ("" if mod == "all" else f".{mod}")
                per_layer[key] = [float(v) for v in values]
        return {
            "kind": "parameter",
            "method": self.cfg.method,
            "genes": dict(zip(self.names, map(float, x))),
            "per_layer": per_layer,
        }


def _check_source(embed_from: str | None, sources: list[str]) -> str | None:
    if embed_from is not None and embed_from not in sources:
        raise ConfigError(f"genome.embed_from: {embed_from!r} is not one of the sources {sources}")
    return embed_from


def _empty_slices_supported() -> bool:
    try:
        MergePlan.from_dict({"merge_method": "passthrough",
                             "slices": [{"sources": [{"model": "m", "layer_range": [0, 0]}]}]})
        return True
    except ConfigError:
        return False


def _bracket(slices: list[dict], embed_from: str | None) -> list[dict]:
    """Wrap layer slices in empty slices of ``embed_from``.

    mergekit takes the embeddings from the first slice's model and the final norm and
    head from the last slice's; empty slices ([0, 0], valid in mergekit) at both ends
    pin them to ``embed_from`` without adding layers. Without ``embed_from`` the plain
    rule applies: embeddings from the first layer's source, head from the last one's.
    """
    if embed_from is None:
        return slices
    empty = {"sources": [{"model": embed_from, "layer_range": [0, 0]}]}
    return [empty, *slices, empty]


def _check_embed_from(embed_from: str | None, where: str) -> None:
    if embed_from is not None and not _empty_slices_supported():
        raise ConfigError(f"{where}: needs empty [0, 0] slices, which this evomerge.merge.plan refuses; "
                          "leave it unset (embeddings then come from the first layer's source, the head "
                          "from the last layer's, as in mergekit)")


class LayerSwapSpace(GenomeSpace):
    """Per layer, a categorical gene naming the source of that layer."""

    def __init__(self, cfg: LayerSwapConfig, sources: list[str], base_model: str | None, num_layers: int):
        super().__init__()
        everything = list(sources) if base_model is None or base_model in sources else [base_model, *sources]
        self.choices = cfg.sources or everything
        self.tokenizer_source = base_model or everything[0]
        for s in self.choices:
            if s not in everything:
                raise ConfigError(f"genome.sources: {s!r} is not one of the sources {everything}")
        self.embed_from = _check_source(cfg.embed_from, everything)
        _check_embed_from(self.embed_from, "genome.embed_from")
        self.num_layers = num_layers
        for i in range(num_layers):
            self._add(f"layer{i}.source", (0, len(self.choices) - 1), integer=True)

    def decode(self, x: np.ndarray) -> MergePlan:
        x = self.clip(x)
        slices = [
            {"sources": [{"model": self.choices[int(g)], "layer_range": [i, i + 1]}]} for i, g in enumerate(x)
        ]
        return MergePlan.from_dict(
            {"merge_method": "passthrough", "slices": _bracket(slices, self.embed_from),
             "tokenizer_source": self.embed_from or self.tokenizer_source}
        )

    def describe(self, x: np.ndarray) -> dict:
        x = self.clip(x)
        return {
            "kind": "layer_swap",
            "genes": dict(zip(self.names, map(float, x))),
            "layers": [self.choices[int(g)] for g in x],
            "per_layer": {"source_index": [float(g) for g in x]},
        }


class DataFlowSpace(GenomeSpace):
    """Sakana's data-flow space over the layers of a collection of models."""

    def __init__(self, cfg: DataFlowConfig, sources: list[str], base_model: str | None,
                 num_layers: int | dict[str, int], extra_models: list[str] = (),
                 architecture: Architecture | None = None):
        super().__init__()
        # Where a residual scale is folded: the tensors that write into the residual stream.
        self.arch = architecture or ARCHITECTURES["llama"]
        everything = list(sources) if base_model is None or base_model in sources else [base_model, *sources]
        everything = [*extra_models, *everything]
        self.collection = cfg.sources or everything
        self.tokenizer_source = base_model or [m for m in everything if m != MERGED][0]
        for s in self.collection:
            if s not in everything:
                raise ConfigError(f"genome.data_flow.sources: {s!r} is not one of {everything}")
        depth = num_layers if isinstance(num_layers, dict) else {s: num_layers for s in everything}
        # (model, layer) of each of the M collection layers, in order
        self.layers = [(s, i) for s in self.collection for i in range(depth[s])]
        M = len(self.layers)
        self.cfg = cfg
        self.max_layers = cfg.max_layers or 2 * max(depth[s] for s in self.collection)
        self.embed_from = _check_source(cfg.embed_from, everything)
        _check_embed_from(self.embed_from, "genome.embed_from")
        T = M * cfg.repetitions
        self.slots = [self.layers[t % M] for t in range(T)]
        self.include = [self._add(f"slot{t}.include", (0, 1), integer=True) for t in range(T)]
        self.scale_genes: dict = {}
        if cfg.scaling == "slot":
            self.scale_genes = {t: self._add(f"slot{t}.scale", cfg.scale) for t in range(T)}
        elif cfg.scaling == "transition":
            # W[i, j]: scale of the stream passed from collection layer i to layer j (Sakana's W)
            self.scale_genes = {
                (i, j): self._add(f"scale[{i}->{j}]", cfg.scale) for i in range(M) for j in range(M)
            }

    def _path(self, x: np.ndarray) -> list[tuple[str, int, float]]:
        """Chosen (model, layer, input scale) in order, after the cap."""
        M = len(self.layers)
        chosen = [t for t, g in enumerate(self.include) if x[g] >= 0.5] or [0]  # never an empty model
        chosen = chosen[: self.max_layers]
        path = []
        for k, t in enumerate(chosen):
            if self.cfg.scaling == "slot":
                s = float(x[self.scale_genes[t]])
            elif self.cfg.scaling == "transition" and k > 0:
                s = float(x[self.scale_genes[(chosen[k - 1] % M, t % M)]])
            else:
                s = 1.0  # the first layer's input scale is a no-op under the norms
            model, layer = self.slots[t]
            path.append((model, layer, s if k > 0 else 1.0))
        return path

    def slices(self, x: np.ndarray) -> list[dict]:
        slices, cumulative = [], 1.0
        for model, layer, s in self._path(x):
            cumulative *= s
            src: dict[str, Any] = {"model": model, "layer_range": [layer, layer + 1]}
            if cumulative != 1.0:
                c = 1.0 / cumulative
                src["parameters"] = {"scale": [
                    *({"filter": f, "value": c} for f in self.arch.residual_writers), {"value": 1.0}]}
            slices.append({"sources": [src]})
        return slices

    def decode(self, x: np.ndarray) -> MergePlan:
        x = self.clip(x)
        tokenizer = self.embed_from if self.embed_from not in (None, MERGED) else self.tokenizer_source
        return MergePlan.from_dict({"merge_method": "passthrough", "slices": _bracket(self.slices(x), self.embed_from),
                                    "tokenizer_source": tokenizer})

    def describe(self, x: np.ndarray) -> dict:
        x = self.clip(x)
        path = self._path(x)
        return {
            "kind": "data_flow",
            "genes": dict(zip(self.names, map(float, x))),
            "layers": [f"{m}:{i}" for m, i, _ in path],
            "num_layers": len(path),
            "per_layer": {"input_scale": [s for _, _, s in path],
                          "source_layer": [float(self.layers.index((m, i))) for m, i, _ in path]},
        }


class CombinedSpace(GenomeSpace):
    """Parameter-space merge, then data flow over [merged + sources]; decodes to a StagedPlan."""

    def __init__(self, cfg: CombinedConfig, sources: list[str], base_model: str | None, num_layers: int,
                 architecture: Architecture | None = None):
        super().__init__()
        if MERGED in sources or MERGED == base_model:
            raise ConfigError(f"genome.kind: combined reserves the model name {MERGED!r}; rename that source")
        self.param = ParameterSpace(cfg.parameter, sources, base_model, num_layers, architecture)
        df_cfg = cfg.data_flow
        self.flow = DataFlowSpace(df_cfg, sources, base_model, num_layers, extra_models=[MERGED],
                                  architecture=architecture)
        self.tokenizer_source = base_model or sources[0]
        for g in self.param.genes:
            self.genes.append(_Gene(f"param.{g.name}", g.low, g.high, g.integer))
        for g in self.flow.genes:
            self.genes.append(_Gene(f"flow.{g.name}", g.low, g.high, g.integer))

    def _split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.clip(x)
        return x[: self.param.dim], x[self.param.dim:]

    def decode(self, x: np.ndarray) -> StagedPlan:
        xp, xf = self._split(x)
        flow = self.flow.decode(xf).to_dict()
        flow["tokenizer_source"] = self.tokenizer_source
        return StagedPlan(stages=[(MERGED, self.param.decode(xp)), ("output", MergePlan.from_dict(flow))])

    def describe(self, x: np.ndarray) -> dict:
        xp, xf = self._split(x)
        return {"kind": "combined", "genes": dict(zip(self.names, map(float, self.clip(x)))),
                "parameter": self.param.describe(xp), "data_flow": self.flow.describe(xf),
                "per_layer": {**self.param.describe(xp)["per_layer"]}}


def build_space(genome: dict | BaseModel, sources: list[str], base_model: str | None,
                num_layers: int | dict[str, int], architecture: Architecture | None = None) -> GenomeSpace:
    """The genome space of a search.

    ``sources``: the model names plans refer to (the SourceSet keys); ``base_model``: one of
    them or None; ``num_layers``: the sources' depth (one int, or per source for data flow);
    ``architecture``: the sources' registry entry (``evomerge.io.architectures``; default
    Llama), which names the tensors per-module genes and data-flow scales apply to.
    """
    cfg = parse_genome_config(genome)
    if isinstance(num_layers, dict):
        depths = set(num_layers.values())
        common = next(iter(depths)) if len(depths) == 1 else None
    else:
        common = num_layers
    if common is None and not isinstance(cfg, DataFlowConfig):
        raise ConfigError(f"genome.kind: {cfg.kind} needs sources of equal depth, got {num_layers}")
    if isinstance(cfg, ParameterSpaceConfig):
        return ParameterSpace(cfg, sources, base_model, common, architecture)
    if isinstance(cfg, LayerSwapConfig):
        return LayerSwapSpace(cfg, sources, base_model, common)
    if isinstance(cfg, DataFlowConfig):
        return DataFlowSpace(cfg, sources, base_model, num_layers, architecture=architecture)
    return CombinedSpace(cfg, sources, base_model, common, architecture)

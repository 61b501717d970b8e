"""Genome spaces: a real/integer vector -> a merge plan.

Every space is a flat box ``[lower, upper]`` with an ``integer`` mask, which is
all an optimizer needs to know. ``decode(x)`` clips to the box, rounds the
integer genes and builds a ``MergePlan`` (or, for the combined space, a
``StagedPlan`` of two plans); it is a pure function of ``x``. ``describe(x)``
returns the same decision in readable form (named genes and per-layer series)
for reports and model cards.

Four spaces, chosen by ``genome.kind`` in the search config:

- ``parameter``: coefficients of one merge method -- any registered method; one gene
  family per parameter it declares with search bounds (weights, densities, SLERP t,
  DELLA epsilon, SCE select_topk, ...; ``evomerge.merge.registry``) -- at a chosen
  granularity -- one gene per source (``model``),
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
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from evomerge.errors import ConfigError, StrictModel, validate
from evomerge.io.architectures import ARCHITECTURES, Architecture
from evomerge.merge.plan import MergePlan
from evomerge.merge.registry import METHODS, MergeMethod, Param

MERGED = "merged"  # name of the intermediate model of the combined space

# Every registered merge method can be searched (``genome.method``); its genes come from its
# declared parameters (see ParameterSpace).


# --------------------------------------------------------------------------- config


Bounds = tuple[float, float]


def _check_bounds(value: Bounds, info) -> Bounds:
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"bounds must be finite, got [{lo}, {hi}]")
    if lo > hi:
        raise ValueError(f"lower bound {lo} is above upper bound {hi}")
    return value


class ParameterSpaceConfig(StrictModel):
    kind: Literal["parameter"] = "parameter"
    method: str
    granularity: str = "model"  # model | layer | block:N
    per_module: bool = False  # separate attention / MLP genes
    separate: list[Literal["embed", "norm", "lm_head"]] = []  # extra genes for these tensors
    # Gene bounds. Unset: the method's declared search bounds (weight [0, 1], density [0.1, 1],
    # DELLA epsilon [0, 0.1], SLERP t [0, 1], ...); ``bounds`` sets any declared parameter's
    # (and makes a parameter without declared search bounds a gene).
    weight: Bounds | None = None
    density: Bounds | None = None
    epsilon: Bounds | None = None
    t: Bounds | None = None
    bounds: dict[str, Bounds] = {}
    normalize: bool | None = None  # passed through to methods with a normalize parameter when set
    random_seed: int = 0  # fixed so DARE / DELLA drops make decoding deterministic

    @field_validator("weight", "density", "epsilon", "t")
    @classmethod
    def _legacy_bounds(cls, v: Bounds | None, info) -> Bounds | None:
        return None if v is None else _check_bounds(v, info)

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown merge method {v!r} (registered: {', '.join(METHODS)})")
        return v

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        if v in ("model", "layer") or re.fullmatch(r"block:[1-9][0-9]*", v):
            return v
        raise ValueError(f"must be 'model', 'layer' or 'block:N' with N >= 1, got {v!r}")

    @field_validator("density", "epsilon")
    @classmethod
    def _unit(cls, v: Bounds | None) -> Bounds | None:
        if v is not None and (v[0] < 0 or v[1] > 1):
            raise ValueError(f"must lie within [0, 1], got [{v[0]}, {v[1]}]")
        return v

    @model_validator(mode="after")
    def _declared(self):
        spec = METHODS[self.method]
        for name, b in self.bounds.items():
            if spec.param(name) is None:
                names = ", ".join(p.name for p in spec.params if p.kind is not bool or p.search) or "none"
                raise ValueError(f"bounds.{name}: merge_method {self.method} has no parameter {name!r} "
                                 f"(its parameters: {names})")
            _check_bounds(b, None)
        for p in spec.params:
            b = self.gene_bounds(p)
            if b is None:
                continue
            lo, hi = b
            if p.low is not None and (lo < p.low or (p.low_open and lo <= p.low)) or \
                    p.high is not None and (hi > p.high or (p.high_open and hi >= p.high)):
                valid = ("(" if p.low_open else "[") + ("-inf" if p.low is None else f"{p.low:g}") + ", " + \
                    ("inf" if p.high is None else f"{p.high:g}") + (")" if p.high_open else "]")
                raise ValueError(f"bounds.{p.name}: [{lo:g}, {hi:g}] leaves {self.method}'s valid range {valid}")
        return self

    def gene_bounds(self, p: Param) -> Bounds | None:
        """The bounds of parameter ``p``'s gene, or None when the search leaves it at its default."""
        if p.name in self.bounds:
            return tuple(self.bounds[p.name])
        legacy = getattr(self, p.name, None) if p.name in ("weight", "density", "epsilon", "t") else None
        if legacy is not None and p.search is not None:
            return tuple(legacy)
        return p.search


class LayerSwapConfig(StrictModel):
    kind: Literal["layer_swap"]
    sources: list[str] | None = None  # candidates per layer; default: base + all sources
    embed_from: str | None = None  # embeddings / norm / head; default: mergekit's rule (see _bracket)


class DataFlowConfig(StrictModel):
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


class CombinedConfig(StrictModel):
    kind: Literal["combined"]
    parameter: ParameterSpaceConfig
    data_flow: DataFlowConfig


GENOME_KINDS: dict[str, type[StrictModel]] = {
    "parameter": ParameterSpaceConfig, "layer_swap": LayerSwapConfig, "data_flow": DataFlowConfig,
    "combined": CombinedConfig}


def parse_genome_config(cfg: dict | BaseModel, where: str | None = None) -> BaseModel:
    """Validate the ``genome:`` section; errors are one line naming the file (``where``) and
    the field (``genome.<field>``)."""
    if isinstance(cfg, BaseModel):
        return cfg
    prefix = f"{where}: " if where else ""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{prefix}genome: must be a mapping, got {type(cfg).__name__}")
    kind = cfg.get("kind", "parameter")
    if kind not in GENOME_KINDS:
        raise ConfigError(f"{prefix}genome.kind: unknown genome kind {kind!r} "
                          f"(choose from {', '.join(GENOME_KINDS)}, or box for synthetic runs)")
    return validate(GENOME_KINDS[kind], cfg, where, "genome")


# --------------------------------------------------------------------------- plans


# Staged plans are merge plans: they live in evomerge.merge.staged (workers and export use them
# without the search layer); the names stay importable from here.
from evomerge.merge.staged import (  # noqa: E402,F401
    StagedPlan, merge_plan, merge_with_config, plan_from_dict, plan_output_config, staged_sources)


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


def _method_inputs(method: MergeMethod, sources: list[str], base_model: str | None) -> tuple[list[str], bool]:
    """(the models a parameter-space merge combines, besides a base; whether the base is one)."""
    if method.needs_base and base_model is None:
        raise ConfigError(f"genome.method: {method.name} needs a base model (set the config's base)")
    use_base = base_model is not None and method.base != "ignored"
    if use_base:
        models = [s for s in sources if s != base_model]
    else:
        models = list(sources) if base_model is None or base_model in sources else [base_model, *sources]
    if not models:
        raise ConfigError("genome: no source besides the base model to merge")
    if method.min_non_base == method.max_non_base == 1 and len(models) != 1:
        raise ConfigError(f"genome.method: {method.name} merges the base with exactly one source, got {len(models)}")
    problem = method.check_inputs(len(models) + int(use_base), use_base, "the search's sources")
    if problem:
        note = f" ({method.search_note})" if method.search_note else ""
        raise ConfigError(f"genome.method: {problem}{note}")
    return models, use_base


class ParameterSpace(GenomeSpace):
    """Coefficients of one merge method, one gene family per parameter it declares with
    search bounds (see ``evomerge.merge.registry``); see the module docstring."""

    def __init__(self, cfg: ParameterSpaceConfig, sources: list[str], base_model: str | None, num_layers: int,
                 architecture: Architecture | None = None):
        super().__init__()
        self.cfg, self.num_layers, self.base_model = cfg, num_layers, base_model
        # Which tensor names the per-module / separate genes filter on.
        self.arch = architecture or ARCHITECTURES["llama"]
        self.method: MergeMethod = METHODS[cfg.method]
        self.models, self.use_base = _method_inputs(self.method, sources, base_model)
        if cfg.granularity == "model":
            self.n_groups = 1
        elif cfg.granularity == "layer":
            self.n_groups = num_layers
        else:
            self.n_groups = math.ceil(num_layers / int(cfg.granularity.split(":")[1]))
        self.modules = ["attn", "mlp"] if cfg.per_module else ["all"]

        # Genes from the method's declared parameters: layered families (per model, then shared)
        # expand over layer groups / modules / separate parts; whole-merge genes (integers,
        # booleans, DELLA's epsilon) come last.
        searched = [(p, cfg.gene_bounds(p)) for p in self.method.params if cfg.gene_bounds(p) is not None]
        fams: list[tuple[str, str | None, Bounds]] = []  # (param name, model or None for shared, bounds)
        for m in self.models:
            fams += [(p.name, m, b) for p, b in searched if p.per_model and p.varies_over_layers]
        fams += [(p.name, None, b) for p, b in searched if not p.per_model and p.varies_over_layers]
        flat = [(p.name, m, b) for m in self.models for p, b in searched if p.per_model and not p.varies_over_layers]
        flat += [(p.name, None, b) for p, b in searched if not p.per_model and not p.varies_over_layers]
        self.per_model_genes = any(p.per_model for p, _ in searched)
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
        # flat[(param, model or None)] -> the one gene of a whole-merge parameter
        self.flat: dict[tuple[str, str | None], int] = {}
        for param, model, bounds in flat:
            kind = self.method.param(param).kind
            self.flat[(param, model)] = self._add(f"{param}[{model}]" if model else param, bounds,
                                                  integer=kind in (int, bool))

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

    def _flat_values(self, x: np.ndarray, model: str | None) -> dict[str, Any]:
        """The whole-merge genes of one model (or the shared ones), typed and fitted by the method."""
        values = {p: float(x[i]) for (p, m), i in self.flat.items() if m == model}
        if model is not None and values and self.method.fit_genes is not None:
            genes: dict[str, list[float]] = {}
            for (p, m, _), idx in self.index.items():
                if m == model:
                    genes.setdefault(p, []).extend(float(x[i]) for i in idx)
            for (p, m, _), i in self.extra.items():
                if m == model:
                    genes.setdefault(p, []).append(float(x[i]))
            for p, v in values.items():
                genes.setdefault(p, []).append(v)
            values.update(self.method.fit_genes(genes))
        kinds = {p.name: p.kind for p in self.method.params}
        return {p: (bool(round(v)) if kinds[p] is bool else int(round(v)) if kinds[p] is int else v)
                for p, v in values.items()}

    def decode(self, x: np.ndarray) -> MergePlan:
        x = self.clip(x)
        cfg, method = self.cfg, self.method
        plan: dict[str, Any] = {"merge_method": cfg.method, "random_seed": cfg.random_seed}
        shared: dict[str, Any] = {}
        if self.per_model_genes:
            models = []
            for m in self.models:
                params = {p: self._value(x, p, m)[0] for (p, mm, module) in self.index if mm == m and module == self.modules[0]}
                params.update(self._flat_values(x, m))
                models.append({"model": m, "parameters": params})
        else:
            models = ([{"model": self.base_model}] if self.use_base else []) + [{"model": m} for m in self.models]
        for (p, mm, module) in self.index:
            if mm is None and module == self.modules[0]:
                shared[p] = self._value(x, p, None)[0]
        shared.update(self._flat_values(x, None))
        if cfg.normalize is not None and method.param("normalize") is not None:
            shared["normalize"] = cfg.normalize
        plan["models"] = models
        if shared:
            plan["parameters"] = shared
        if self.use_base:
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

"""The merge-method registry: every method one object that declares itself.

A ``MergeMethod`` says which parameters it takes (name, type, scope, default, valid
range, and the bounds of its gene when a search varies it), what inputs it accepts
(base required / optional / ignored, how many models), and runs itself on the
tensors of one parameter. Everything else reads these declarations:

* ``evomerge.merge.plan`` validates recipes (unknown parameter, value out of range,
  missing base, too few models) from them;
* ``evomerge.merge.engine`` resolves each declared parameter per tensor and calls
  ``method.run(inputs)`` -- it has no per-method code;
* ``evomerge.search.genome`` makes one gene family per parameter that declares
  ``search`` bounds, so ``genome.method: NAME`` works for every method here.

Names, scopes and defaults follow mergekit 0.1.5, so a recipe means the same in both
tools. ``register`` adds a method; see docs/adding-a-merge-method.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from evomerge.merge import methods as K

REQUIRED = object()  # default of a parameter the recipe must set

Scope = Literal["shared", "input", "non_base"]
Bounds = tuple[float, float]


@dataclass(frozen=True)
class Param:
    """One method parameter.

    scope: ``shared`` (one value per tensor), ``input`` (per model, base included) or
    ``non_base`` (per model, base excluded). ``low`` / ``high`` bound valid values
    (``low_open`` / ``high_open``: the bound itself is invalid). ``search``: the default
    bounds of this parameter's gene in a parameter-space search (None: not searched).
    ``layered``: a searched value may vary over layers (a gradient); integer and boolean
    genes are one value per model or per merge.
    """

    name: str
    kind: type  # float, int or bool
    scope: Scope
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    search: Bounds | None = None
    layered: bool | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def per_model(self) -> bool:
        return self.scope != "shared"

    @property
    def varies_over_layers(self) -> bool:
        return self.layered if self.layered is not None else self.kind is float

    def coerce(self, value: Any) -> Any:
        """The resolved value as the method's type (ValueError naming the parameter if it is not one)."""
        if self.kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "on", "1"):
                    return True
                if value.lower() in ("false", "no", "off", "0"):
                    return False
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return bool(value)
        x = float(value)
        if self.kind is int:
            if not x.is_integer():
                raise ValueError(f"{self.name} must be an integer, got {value!r}")
            return int(x)
        return x

    def validate(self, value: Any, where: str) -> None:
        """Raise ValueError naming ``where`` when a leaf value is of the wrong type or out of range."""
        if self.kind is bool:
            if not isinstance(value, (bool, int)) and str(value).lower() not in ("true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"{where}: {value!r} is not a boolean")
            return
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {value!r} is not a number") from None
        if not math.isfinite(x):
            raise ValueError(f"{where}: {value!r} is not finite")
        if self.kind is int and not x.is_integer():
            raise ValueError(f"{where}: {value!r} is not an integer")
        below = self.low is not None and (x < self.low or (self.low_open and x == self.low))
        above = self.high is not None and (x > self.high or (self.high_open and x == self.high))
        if below or above:
            lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
            hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
            raise ValueError(f"{where}: {value!r} is outside {lo}, {hi}")


@dataclass
class MergeInputs:
    """The tensors of one output parameter and their resolved parameters.

    ``tensors`` are in plan order; ``per_input[i]`` holds input i's per-model values
    (the base's holds only ``input``-scope ones); ``base_index`` is None for methods
    without a base (or that ignore it). Inputs are never to be modified in place.
    """

    tensors: list[Tensor]
    base_index: int | None
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    seed: int | None = None  # this tensor's seed, for methods that draw random numbers

    @property
    def base(self) -> Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def others(self) -> list[Tensor]:
        """The non-base inputs, in plan order."""
        return [x for i, x in enumerate(self.tensors) if i != self.base_index]

    def values(self, name: str) -> list[Any]:
        """A per-model parameter's values for the non-base inputs, in plan order."""
        return [v[name] for i, v in enumerate(self.per_input) if i != self.base_index]

    def all_values(self, name: str) -> list[Any]:
        """An ``input``-scope parameter's values for every input, base included."""
        return [v[name] for v in self.per_input]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its parameters, its input contract, and how it runs on one tensor.

    base: ``required`` (a base_model among the inputs), ``optional`` (task vectors
    against it when there is one) or ``ignored`` (every input is merged alike).
    ``constraint(values)``: a cross-parameter check on one model's resolved values
    (shared and per-model together); returns an error message or None.
    ``fit_genes(genes)``: for a search, adjusts one model's whole-model genes (not layered)
    given all its gene values ``{param: [values]}`` so decoded plans satisfy ``constraint``.
    """

    name: str
    params: tuple[Param, ...]
    kernel: Callable[[MergeInputs], Tensor]
    base: Literal["required", "optional", "ignored"] = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False  # draws random numbers: gets a seed per tensor
    constraint: Callable[[dict[str, Any]], str | None] | None = None
    fit_genes: Callable[[dict[str, list[float]]], dict[str, float]] | None = None
    search_note: str = ""  # shown when a parameter-space search cannot use the method
    summary: str = ""
    reference: str = ""

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def run(self, inputs: MergeInputs) -> Tensor:
        return self.kernel(inputs)

    def check_inputs(self, n_inputs: int, has_base: bool, where: str) -> str | None:
        """Why this many inputs (base included) cannot be merged, or None."""
        if self.needs_base and not has_base:
            return f"merge_method {self.name} needs a base_model"
        if n_inputs < self.min_inputs:
            return (f"merge_method {self.name} needs at least {self.min_inputs} models (base included) "
                    f"in {where}, got {n_inputs}")
        if self.max_inputs is not None and n_inputs > self.max_inputs:
            return f"merge_method {self.name} takes at most {self.max_inputs} model(s) in {where}, got {n_inputs}"
        others = n_inputs - (1 if has_base and self.base != "ignored" else 0)
        lo, hi = self.min_non_base, self.max_non_base
        if others < lo or (hi is not None and others > hi):
            want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            return (f"merge_method {self.name} needs {want} model(s) besides the base in {where}, "
                    f"got {others}")
        return None


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Make ``method`` available by name (to plans, the engine and the genome)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    names = [p.name for p in method.params]
    if len(set(names)) != len(names):
        raise ValueError(f"merge method {method.name!r} declares a parameter twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    return METHODS[name]


# -- the methods -----------------------------------------------------------------------------

def _weight(scope: Scope = "non_base", default: Any = REQUIRED) -> Param:
    return Param("weight", float, scope, default, search=(0.0, 1.0), doc="the model's share")


def _run_linear(x: MergeInputs) -> Tensor:
    return K.linear(x.tensors, x.all_values("weight"), normalize=x.shared["normalize"])


register(MergeMethod(
    "linear", (_weight("input"), Param("normalize", bool, "shared", True)), _run_linear,
    summary="weighted average of the models", reference="https://arxiv.org/abs/2203.05482"))


def _della_constraint(v: dict[str, Any]) -> str | None:
    d, e = v["density"], v["epsilon"]
    if 0 < d < 1 and not (0 < d - e and d + e < 1):
        return (f"density {d:g} +/- epsilon {e:g} leaves (0, 1) "
                "(need 0 < density - epsilon and density + epsilon < 1)")
    return None


def _della_fit(genes: dict[str, list[float]]) -> dict[str, float]:
    # DELLA's keep probabilities density +/- epsilon must stay inside (0, 1): shrink
    # epsilon to fit the model's tightest density (deterministic, so decoding stays pure).
    room = min((min(d, 1 - d) for d in genes.get("density", []) if 0 < d < 1), default=1.0)
    return {"epsilon": min(genes["epsilon"][0], 0.99 * room)}


def _gta(name: str, sparsify: str | None, consensus: str | None, normalize: bool, rescale: bool,
         summary: str, reference: str) -> MergeMethod:
    """The generalized task arithmetic family: base + lambda * combine(w_i * sparsify(x_i - base))."""
    params = [
        Param("int8_mask", bool, "shared", False),
        Param("normalize", bool, "shared", normalize),
        Param("rescale", bool, "shared", rescale),
        Param("lambda", float, "shared", 1.0),
        _weight(),
        Param("density", float, "non_base", 1.0, 0.0, 1.0, search=(0.1, 1.0) if sparsify else None),
    ]
    if sparsify == "magnitude_outliers":
        params.append(Param("gamma", float, "non_base", 0.01, 0.0, 1.0))
    if sparsify == "della_magprune":
        params.append(Param("epsilon", float, "non_base", 0.15, 0.0, 1.0, search=(0.0, 0.1), layered=False))

    def run(x: MergeInputs) -> Tensor:
        n = len(x.others)
        return K.generalized_task_arithmetic(
            x.base, x.others, x.values("weight"), x.values("density"), sparsify=sparsify,
            consensus=consensus, normalize=x.shared["normalize"], rescale=x.shared["rescale"],
            lam=x.shared["lambda"],
            gammas=x.values("gamma") if sparsify == "magnitude_outliers" else [0.01] * n,
            epsilons=x.values("epsilon") if sparsify == "della_magprune" else [0.15] * n,
            seed=x.seed)

    della = sparsify == "della_magprune"
    return MergeMethod(name, tuple(params), run, base="required",
                       random=sparsify in ("random", "della_magprune"),
                       constraint=_della_constraint if della else None, fit_genes=_della_fit if della else None,
                       summary=summary, reference=reference)


for _m in (
    _gta("task_arithmetic", None, None, False, False, "base + sum of weighted task vectors",
         "https://arxiv.org/abs/2212.04089"),
    _gta("ties", "magnitude", "sum", True, False, "trim to the top-density magnitudes, elect signs, disjoint mean",
         "https://arxiv.org/abs/2306.01708"),
    _gta("dare_ties", "random", "sum", False, True, "random drop (keep density), L1 rescale, TIES signs",
         "https://arxiv.org/abs/2311.03099"),
    _gta("dare_linear", "random", None, False, True, "random drop (keep density), L1 rescale, sum",
         "https://arxiv.org/abs/2311.03099"),
    _gta("breadcrumbs", "magnitude_outliers", None, False, False, "drop the top-gamma outliers and the smallest",
         "https://arxiv.org/abs/2312.06795"),
    _gta("breadcrumbs_ties", "magnitude_outliers", "sum", False, False, "breadcrumbs with TIES signs",
         "https://arxiv.org/abs/2312.06795"),
    _gta("della", "della_magprune", "sum", True, True, "magnitude-ranked random drop, L1 rescale, TIES signs",
         "https://arxiv.org/abs/2406.11617"),
    _gta("della_linear", "della_magprune", None, False, True, "magnitude-ranked random drop, L1 rescale, sum",
         "https://arxiv.org/abs/2406.11617"),
):
    register(_m)


register(MergeMethod(
    "slerp", (Param("t", float, "shared", low=0.0, high=1.0, search=(0.0, 1.0)),),
    lambda x: K.slerp(x.shared["t"], x.base, x.others[0]),
    base="required", min_inputs=2, max_inputs=2, min_non_base=1, max_non_base=1,
    summary="spherical interpolation from the base (t=0) to the other model (t=1)",
    reference="https://en.wikipedia.org/wiki/Slerp"))

register(MergeMethod(
    "model_stock", (Param("filter_wise", bool, "shared", False, search=(0, 1)),),
    lambda x: K.model_stock(x.base, x.others, filter_wise=x.shared["filter_wise"]),
    base="required", min_inputs=3,
    summary="move from the base toward the fine-tunes' mean by their task vectors' mean cosine",
    reference="https://arxiv.org/abs/2403.19522"))

register(MergeMethod(
    "passthrough", (Param("scale", float, "input", None),),
    lambda x: K.passthrough(x.tensors[0], x.per_input[0]["scale"]),
    max_inputs=1,
    search_note="passthrough copies one model's tensors; search its merges with genome.kind: layer_swap or data_flow",
    summary="one model's tensors, optionally scaled"))


def _run_nuslerp(x: MergeInputs) -> Tensor:
    w = x.values("weight")
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    a, b = x.others
    kw = dict(row_wise=x.shared["nuslerp_row_wise"], flatten=x.shared["nuslerp_flatten"])
    return K.nuslerp(t, a, b, base=x.base, **kw)


register(MergeMethod(
    "nuslerp",
    (_weight(), Param("nuslerp_row_wise", bool, "shared", False), Param("nuslerp_flatten", bool, "shared", True)),
    _run_nuslerp, base="optional", min_non_base=2, max_non_base=2,
    summary="SLERP of two models (or of their task vectors, with a base) at t = w2 / (w1 + w2), "
            "over whole tensors, rows or columns"))

register(MergeMethod(
    "multislerp",
    (_weight(), Param("normalize_weights", bool, "shared", True), Param("eps", float, "shared", 1e-8, low=0.0)),
    lambda x: K.multislerp(x.others, x.values("weight"), x.base, normalize_weights=x.shared["normalize_weights"],
                           eps=x.shared["eps"]),
    base="optional", min_non_base=1,
    summary="barycentric interpolation of any number of models on the hypersphere",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"))

register(MergeMethod(
    "karcher",
    (Param("max_iter", int, "shared", 10, low=0, search=(1, 20)), Param("tol", float, "shared", 1e-5, low=0.0)),
    lambda x: K.karcher(x.tensors, max_iter=x.shared["max_iter"], tol=x.shared["tol"]),
    base="ignored", min_inputs=2,
    summary="Karcher mean of the models' directions on the sphere, equal weights, times the mean norm",
    reference="https://arxiv.org/abs/2603.04972"))

register(MergeMethod(
    "sce",
    (Param("int8_mask", bool, "shared", False),
     Param("select_topk", float, "shared", 1.0, low=0.0, high=1.0, low_open=True, search=(0.1, 1.0))),
    lambda x: K.sce(x.base, x.others, select_topk=x.shared["select_topk"]),
    base="required",
    summary="select the most varying entries, weight models by task-vector energy, erase minority signs",
    reference="https://arxiv.org/abs/2408.07990"))

register(MergeMethod(
    "nearswap", (Param("t", float, "shared", low=0.0, search=(0.0, 0.01)),),
    lambda x: K.nearswap(x.base, x.others[0], x.shared["t"]),
    base="required", min_inputs=2, max_inputs=2, min_non_base=1, max_non_base=1,
    summary="take the other model where it is within t of the base, move toward it by t/|diff| elsewhere",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"))

register(MergeMethod(
    "arcee_fusion", (), lambda x: K.arcee_fusion(
        x.base, x.others[0], None if x.seed is None else torch.Generator(x.base.device).manual_seed(x.seed)),
    base="required", min_inputs=2, max_inputs=2, min_non_base=1, max_non_base=1, random=True,
    summary="keep the other model's most important changes (|delta| * KL above median + 1.5 IQR)",
    reference="https://arcee.ai"))

register(MergeMethod(
    "ram", (Param("epsilon", float, "shared", 1e-5, low=0.0, search=(0.0, 1e-3)),),
    lambda x: K.ram(x.base, x.others, epsilon=x.shared["epsilon"]),
    base="required",
    summary="unique changes kept whole, shared changes averaged",
    reference="https://arxiv.org/abs/2601.13572"))

register(MergeMethod(
    "ramplus_tl",
    (Param("r", float, "shared", 0.1, low=0.0, search=(0.0, 0.5)),
     Param("alpha", float, "shared", 0.2, low=0.0, search=(0.0, 0.5)),
     Param("epsilon", float, "shared", 1e-5, low=0.0)),
    lambda x: K.ram(x.base, x.others, epsilon=x.shared["epsilon"], r=x.shared["r"], alpha=x.shared["alpha"]),
    base="required",
    summary="RAM with each model's unique changes rescaled by its shared/unique ratio (tensor-local)",
    reference="https://arxiv.org/abs/2601.13572"))
del _m

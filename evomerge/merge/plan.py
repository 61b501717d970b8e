"""Merge plans: mergekit's YAML config as a validated pydantic model.

A ``MergePlan`` means exactly what the same YAML means to mergekit 0.1.5, so
users can bring their recipes and every evolved genome can be exported as a
mergekit config. Parameter values ("settings") take three forms, resolved per
tensor by ``evaluate_setting``:

* a scalar: ``density: 0.5``
* a gradient: ``t: [0, 0.3, 1]`` -- piecewise-linear over the layer's relative
  position ``t`` in its slice (0 for the first layer, 1 for the last; 1 for a
  one-layer slice; embeddings, final norm and lm_head use t = 0, as mergekit);
* filters: ``[{filter: self_attn, value: 0.3}, {value: 0.7}]`` -- the first entry
  whose ``filter`` is a substring of the tensor name wins; an entry without a
  filter (or ``"*"``) matches everything.

Settings are looked up from the most specific scope to the least: the
model's/slice source's own ``parameters``, then the slice's, then the plan's;
a setting that resolves to nothing (no filter matched) falls through.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml
from pydantic import field_validator, model_validator

from evomerge.errors import UNKNOWN_FIELD, ConfigError, StrictModel, validate
from evomerge.merge.registry import METHODS, MergeMethod, Param

ParamValue = Any  # float | int | bool | str | list[float] | list[dict] | dict -- checked by _check_setting

# Keys mergekit accepts that evomerge does not implement: refuse rather than ignore.
UNSUPPORTED_KEYS = {
    "modules": "per-module configs",
    "tokenizer": "tokenizer surgery (use tokenizer_source)",
    "chat_template": "chat templates",
    "residual_weight": "slice residual weights",
}


def _check_setting(value: Any, where: str) -> Any:
    """Validate the shape of one parameter setting (not its range); ValueError naming ``where``,
    which pydantic places under the field being validated."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return _check_conditional(value, where)
    if isinstance(value, list):
        if all(isinstance(v, (bool, int, float, str)) for v in value):
            return value
        if all(isinstance(v, dict) for v in value):
            return [_check_conditional(v, where) for v in value]
        raise ValueError(f"{where}: a list must be all numbers (a gradient) or all {{filter, value}} entries")
    raise ValueError(f"{where}: unsupported value {value!r}")


def _check_conditional(entry: dict, where: str) -> dict:
    unknown = set(entry) - {"filter", "value"}
    if unknown:
        raise ValueError(f"{where}.{sorted(unknown)[0]}: {UNKNOWN_FIELD} (a filter entry holds filter and value)")
    if "value" not in entry:
        raise ValueError(f"{where}: filter entry {entry!r} has no 'value'")
    value = entry["value"]
    if not (isinstance(value, (bool, int, float, str))
            or (isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value))):
        raise ValueError(f"{where}: filter entry value must be a scalar or a gradient list, got {value!r}")
    if entry.get("filter") is not None and not isinstance(entry["filter"], str):
        raise ValueError(f"{where}: filter must be a string, got {entry['filter']!r}")
    return dict(entry)


def _check_parameters(params: dict | None) -> dict:
    params = params or {}
    return {name: _check_setting(value, name) for name, value in params.items()}


class InputModel(StrictModel):
    model: str
    parameters: dict[str, ParamValue] = {}

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v):
        return _check_parameters(v)


class SliceSource(StrictModel):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = {}

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v):
        return _check_parameters(v)

    @model_validator(mode="after")
    def _range(self):
        lo, hi = self.layer_range
        # start == end is an empty slice, as in mergekit: it adds no layer, but a first or last
        # slice still decides where the embeddings (first) or final norm and head (last) come from
        if lo < 0 or hi < lo:
            raise ValueError(f"layer_range {list(self.layer_range)} of {self.model} must satisfy 0 <= start <= end")
        return self


class Slice(StrictModel):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, ParamValue] = {}

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v):
        return _check_parameters(v)

    @model_validator(mode="after")
    def _lengths(self):
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must have the same number of layers, got {sorted(lengths)}")
        return self

    @property
    def num_layers(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


class MergePlan(StrictModel):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    base_model: str | None = None
    parameters: dict[str, ParamValue] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    random_seed: int | None = None  # evomerge extension: seeds DARE / DELLA drops

    @field_validator("parameters", mode="before")
    @classmethod
    def _params(cls, v):
        return _check_parameters(v)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r} (use one of {', '.join(sorted(DTYPES))})")
        return v

    @model_validator(mode="after")
    def _structure(self):
        if self.merge_method not in METHODS:
            raise ValueError(f"unknown merge_method {self.merge_method!r} (supported: {', '.join(METHODS)})")
        if (self.models is None) == (self.slices is None) or not (self.models or self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        if self.slices is not None and not any(sl.num_layers for sl in self.slices):
            raise ValueError("slices: every slice is empty (layer_range [n, n]); the merge would have no layers")
        spec = METHODS[self.merge_method]
        for slice_idx, group in enumerate(self.input_groups()):
            base = self.slice_base(slice_idx)
            names = [name for name, _ in group]
            where = f"slices[{slice_idx}]" if self.slices is not None else "models"
            if len(set(names)) != len(names):
                raise ValueError(f"{where} lists a model twice")
            problem = spec.check_inputs(len(names), base is not None and base in names, where)
            if problem:
                raise ValueError(problem)
        self._check_parameter_values(spec)
        return self

    def _check_parameter_values(self, spec) -> None:
        scopes = [("parameters", self.parameters)]
        for i, m in enumerate(self.models or []):
            scopes.append((f"models[{i}] ({m.model}).parameters", m.parameters))
        for i, s in enumerate(self.slices or []):
            scopes.append((f"slices[{i}].parameters", s.parameters))
            for j, src in enumerate(s.sources):
                scopes.append((f"slices[{i}].sources[{j}] ({src.model}).parameters", src.parameters))
        for where, params in scopes:
            for name, setting in params.items():
                param = spec.param(name)
                if param is None:
                    allowed = ", ".join(p.name for p in spec.params) or "none"
                    raise ValueError(f"{where}: unknown parameter {name!r} for merge_method "
                                     f"{self.merge_method} (allowed: {allowed})")
                for leaf in _leaves(setting):
                    param.validate(leaf, f"{where}.{name}")
        if spec.constraint is not None:
            _check_constraint(self, spec)

    # -- structure helpers used by the engine ---------------------------------
    def input_groups(self) -> list[list[tuple[str, dict]]]:
        """Per slice (one pseudo-slice for ``models``): [(model, its parameters)], base appended."""
        if self.models is not None:
            group = [(m.model, m.parameters) for m in self.models]
            if self.base_model is not None and self.base_model not in [n for n, _ in group]:
                group.append((self.base_model, {}))
            return [group]
        return [[(s.model, s.parameters) for s in sl.sources] for sl in self.slices or []]

    def slice_base(self, slice_idx: int) -> str | None:
        if self.slices is not None and self.slices[slice_idx].base_model is not None:
            return self.slices[slice_idx].base_model
        return self.base_model

    def referenced_models(self) -> list[str]:
        """Every model the plan reads, in first-mention order (base first)."""
        names = [self.base_model] if self.base_model else []
        for group in self.input_groups():
            names += [n for n, _ in group]
        for s in self.slices or []:
            if s.base_model:
                names.append(s.base_model)
        return list(dict.fromkeys(names))

    # -- (de)serialisation --------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "merge plan") -> MergePlan:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(d).__name__}")
        _refuse_unsupported(d, source)
        return validate(cls, d, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergePlan:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read merge config {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8); a merge config is YAML") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict:
        """A mergekit-compatible dict (drops empty fields; keeps random_seed only if set)."""
        d = self.model_dump(mode="json", exclude_none=True)
        for m in d.get("models", []):
            if not m.get("parameters"):
                m.pop("parameters", None)
        for s in d.get("slices", []):
            if not s.get("parameters"):
                s.pop("parameters", None)
            for src in s["sources"]:
                if not src.get("parameters"):
                    src.pop("parameters", None)
        if not d.get("parameters"):
            d.pop("parameters", None)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float64": "float64",
          "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _leaves(setting: Any) -> list:
    if isinstance(setting, dict):
        return _leaves(setting["value"])
    if isinstance(setting, list):
        out = []
        for v in setting:
            out += _leaves(v)
        return out
    return [setting]


def _check_constraint(plan: MergePlan, spec: MergeMethod) -> None:
    """A method's cross-parameter constraint on the plan-level values (e.g. DELLA's density +/- epsilon).

    Checked on every combination of the plan-wide settings' values here; the engine rechecks
    each model's resolved values per tensor.
    """
    choices = [[(p.name, v) for v in _leaves(plan.parameters[p.name])] if p.name in plan.parameters
               else [(p.name, p.default)] for p in spec.params if not p.required or p.name in plan.parameters]
    for combo in itertools.product(*choices):
        try:
            values = {name: spec.param(name).coerce(v) if v is not None else v for name, v in combo}
        except ValueError:
            continue  # reported per tensor with the tensor's name
        problem = spec.constraint(values)
        if problem:
            raise ValueError(f"parameters: {problem}")


def _refuse_unsupported(d: dict, source: str) -> None:
    for key, what in UNSUPPORTED_KEYS.items():
        if key in d:
            raise ConfigError(f"{source}: key {key!r} ({what}) is not supported by evomerge")
    for i, s in enumerate(d.get("slices") or []):
        if isinstance(s, dict) and "residual_weight" in s:
            raise ConfigError(f"{source}: slices[{i}].residual_weight is not supported by evomerge")
    for key in ("models", "slices"):
        for i, entry in enumerate(d.get(key) or []):
            if isinstance(entry, dict) and not isinstance(entry.get("model", ""), str):
                raise ConfigError(f"{source}: {key}[{i}].model must be a path string")


# -- parameter resolution (per tensor) ----------------------------------------------

def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve one setting for a tensor at relative layer position ``t``; None if no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], dict):
        for entry in setting:
            f = entry.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate_setting(entry["value"], tensor_name, t)
        return None
    values = [_as_number(v) for v in setting]
    if any(isinstance(v, (bool, str)) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _as_number(v: Any) -> Any:
    # YAML reads "1e-3" as a string; mergekit's validators turn it into a number.
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def resolve(param: Param, scopes: list[dict | None], tensor_name: str, t: float) -> Any:
    """The value of ``param`` from the first scope that yields one, else its default."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate_setting(scope[param.name], tensor_name, t)
            if value is not None:
                return param.coerce(value)
    return param.default



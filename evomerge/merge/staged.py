"""Staged merge plans: merge stages run in order, a later stage naming an earlier one as a model.

The ``combined`` genome decodes to one (a parameter merge, then data flow over its output).
An earlier stage's output stays in memory and serves the next stage as a source
(``_TensorView``); a plain ``MergePlan`` is the one-stage case. ``merge_with_config`` merges
every stage once and returns the output's weights with its config.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from evomerge.errors import ConfigError
from evomerge.io.architectures import Architecture, architecture_of
from evomerge.merge.plan import MergePlan


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


def iter_merge_with_config(plan: MergePlan | StagedPlan, sources, device=None) -> tuple[Iterator, dict]:
    """(iterator of (name, merged tensor), config.json) of the model either plan kind produces:
    the output streams a tensor at a time; a staged plan's earlier stages are merged into
    memory first (the last stage reads them), so it holds one stage output besides."""
    from evomerge.merge.engine import iter_merge, output_config

    if isinstance(plan, StagedPlan):
        sources, plan = staged_sources(plan, sources, device), plan.final
    return iter_merge(plan, sources, device), output_config(plan, sources)


def merge_with_config(plan: MergePlan | StagedPlan, sources, device=None) -> tuple[dict, dict]:
    """(in-memory weights, config.json) of the model either plan kind produces, every stage
    merged once (``iter_merge_with_config`` collected into a dict)."""
    tensors, config = iter_merge_with_config(plan, sources, device)
    return dict(tensors), config


def merge_plan(plan: MergePlan | StagedPlan, sources, device=None) -> dict:
    """In-memory weights of either plan kind."""
    return merge_with_config(plan, sources, device)[0]


def plan_output_config(plan: MergePlan | StagedPlan, sources) -> dict:
    """config.json of the model either plan kind produces (a staged plan's earlier stages are
    merged to know it: use ``merge_with_config`` when the weights are wanted too)."""
    from evomerge.merge.engine import output_config

    if isinstance(plan, StagedPlan):
        return output_config(plan.final, staged_sources(plan, sources))
    return output_config(plan, sources)


def plan_from_dict(d: dict) -> MergePlan | StagedPlan:
    """Inverse of ``plan.to_dict()`` for both plan kinds (archive rows store these dicts)."""
    return StagedPlan.from_dict(d) if "stages" in d else MergePlan.from_dict(d)

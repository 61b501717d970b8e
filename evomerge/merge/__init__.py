"""Merging models: mergekit-compatible plans, pure merge methods, a streaming engine.

Importing this package pulls in torch only (no transformers, no Ray) -- and only when a
name from the engine is first used (PEP 562), so ``evomerge.merge.plan`` stays cheap.
"""

from importlib import import_module

_WHERE = {"MergePlan": "plan", "SourceSet": "engine", "iter_merge": "engine", "merge": "engine",
          "merge_to_disk": "engine", "output_config": "engine"}

__all__ = ["MergePlan", "SourceSet", "iter_merge", "merge", "merge_to_disk", "output_config"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f"evomerge.merge.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'evomerge.merge' has no attribute {name!r}")

"""Merging models: mergekit-compatible plans, pure merge methods, a streaming engine.

Importing this package pulls in torch only (no transformers, no Ray).
"""

from evomerge.merge.engine import SourceSet, iter_merge, merge, merge_to_disk, output_config
from evomerge.merge.plan import MergePlan

__all__ = ["MergePlan", "SourceSet", "iter_merge", "merge", "merge_to_disk", "output_config"]

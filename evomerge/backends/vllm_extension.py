"""The merge inside vLLM's own worker processes: the controller sends a plan, not weights.

``EvomergeWorkerExtension`` is mixed into every vLLM worker (engine argument
``worker_extension_cls``; vLLM imports it by name in each worker process). The backend calls
``collective_rpc("evomerge_load_plan", args=(plan, sources))``: a plan dict and the source
paths, a few kilobytes. Each worker keeps the sources open memory-mapped (the page cache
holds one copy however many workers read it), merges the plan one tensor at a time
(``merge.engine.iter_merge``) and hands the tensors straight to vLLM's in-place reload
(``reload_weights(weights_iterator=..., is_checkpoint_format=True)``), whose model
``load_weights`` fuses q/k/v and gate/up and, with ``tensor_parallel_size > 1``, takes each
rank's shard. No merged copy of the whole model exists in any process. A candidate with
fewer layers than the engine is followed by identity layers (zeros) and the model runs only
its first layers (``vllm_backend.use_layers``), as in the in-process path.

This works with vLLM in its default multiprocess mode, where tensors cannot be passed to the
workers by reference (vLLM 0.32's RPC turns (name, tensor) pairs into lists).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class EvomergeWorkerExtension:
    """Methods vLLM adds to its worker class (``self`` is the worker)."""

    def evomerge_load_plan(self, plan: dict, sources: dict[str, str]) -> dict[str, Any]:
        """Merge ``plan`` over ``sources`` into this worker's model, tensor by tensor.

        Returns ``{"tensors": n, "layers": k, "nonfinite": name or None}``: the first merged
        tensor with NaN/inf values is reported, not raised, so that the reload completes and
        the engine stays usable (the caller fails the candidate)."""
        import torch

        from evomerge.backends.base import layer_template, pad_with_identity_layers
        from evomerge.backends.vllm_backend import use_layers
        from evomerge.merge.engine import SourceSet, iter_merge
        from evomerge.merge.staged import StagedPlan, plan_from_dict, plan_output_config, staged_sources

        key = tuple(sorted(sources.items()))
        if getattr(self, "_evomerge_key", None) != key:
            # memory-mapped, not resident: the page cache shares the files between workers
            self._evomerge_sources = SourceSet.load(sources, device="cpu", resident=False)
            self._evomerge_key = key
        source_set = self._evomerge_sources
        parsed = plan_from_dict(plan)
        final, merged_from = ((parsed.final, staged_sources(parsed, source_set)) if isinstance(parsed, StagedPlan)
                              else (parsed, source_set))
        config = plan_output_config(parsed, source_set)
        capacity = int(self.vllm_config.model_config.hf_config.num_hidden_layers)
        first = next(iter(source_set.checkpoints.values()))
        template = layer_template({n: first.shape(n) for n in first.tensor_names},
                                  {n: first.dtype(n) for n in first.tensor_names})
        stats: dict[str, Any] = {"tensors": 0, "layers": int(config.get("num_hidden_layers", 0)), "nonfinite": None}

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in iter_merge(final, merged_from):
                if stats["nonfinite"] is None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    stats["nonfinite"] = name
                stats["tensors"] += 1
                yield name, tensor
            spare, _ = pad_with_identity_layers({}, config, capacity, template)
            yield from spare.items()

        self.reload_weights(weights_iterator=stream(), is_checkpoint_format=True)
        use_layers(self, stats["layers"])
        model = self.get_model()
        head = getattr(model, "lm_head", None)
        if config.get("tie_word_embeddings") and head is not None and hasattr(head, "quant_method"):
            # CPU: the LM head's prepacked copy of the tied embedding (see vllm_backend)
            head.quant_method.process_weights_after_loading(head)
        return stats

"""Evaluation backends: score in-memory weights on task items (see DESIGN.md, "Backends")."""

from __future__ import annotations

from pathlib import Path

from evomerge.backends.base import Backend, ItemResult
from evomerge.errors import EvomergeError

BACKENDS = ("hf", "vllm")


def make_backend(kind: str, model_dir: str | Path, device: str = "cpu", **kw) -> Backend:
    """Build a backend; ``model_dir`` supplies the tokenizer and the initial architecture."""
    if kind == "hf":
        from evomerge.backends.hf import HFBackend

        return HFBackend(model_dir, device=device, **kw)
    if kind == "vllm":
        try:
            from evomerge.backends.vllm_backend import VLLMBackend
        except ImportError as exc:
            raise EvomergeError(f"backend 'vllm' needs the vllm extra (pip install 'evomerge[vllm]'): {exc}") from None
        return VLLMBackend(model_dir, device=device, **kw)
    raise EvomergeError(f"unknown backend {kind!r} (choose from {', '.join(BACKENDS)})")


__all__ = ["Backend", "ItemResult", "make_backend", "BACKENDS"]

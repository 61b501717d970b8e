"""Checkpoint I/O: lazy safetensors reading, streaming sharded writing, atomic output.

Names are imported on first use (PEP 562), so ``import evomerge.io.atomic`` -- which every
command that writes output needs -- does not pay for importing torch.
"""

from importlib import import_module

_WHERE = {"atomic_dir": "atomic", "atomic_write_bytes": "atomic", "atomic_write_text": "atomic",
          "Checkpoint": "checkpoint", "write_checkpoint": "checkpoint"}

__all__ = ["Checkpoint", "atomic_dir", "atomic_write_bytes", "atomic_write_text", "write_checkpoint"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f"evomerge.io.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'evomerge.io' has no attribute {name!r}")

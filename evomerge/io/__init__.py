"""Checkpoint I/O: lazy safetensors reading, streaming sharded writing, atomic output."""

from evomerge.io.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from evomerge.io.checkpoint import Checkpoint, write_checkpoint

__all__ = ["Checkpoint", "atomic_dir", "atomic_write_bytes", "atomic_write_text", "write_checkpoint"]

"""Checkpoints of the search controller: optimizer state + RNG state, one per generation.

``checkpoints/gen-000012.state`` holds the controller exactly as it was at the *start*
of generation 12, before ``ask``. Resuming loads it, asks again (same genomes: the
optimizer's generator is inside the state) and skips candidates already in the archive.

File format: a header line ``evomerge-search-state <format> <sha256 of payload>\\n``
followed by a pickled payload. Pickle is used only for these files, which evomerge
itself wrote and whose checksum is verified before unpickling; model weights never
travel this way. The two newest checkpoints are kept: if the newest fails its
checksum the previous one is used with a warning.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import CheckpointError
from evomerge.io.atomic import atomic_write_bytes

STATE_FORMAT = 1
MAGIC = b"evomerge-search-state"
CHECKPOINT_DIR = "checkpoints"
KEEP = 2
_NAME = re.compile(r"^gen-(\d{6})\.state$")


@dataclass
class ControllerState:
    generation: int                    # the generation about to be asked
    next_candidate_id: int             # first candidate id of that generation
    optimizer: dict[str, Any]          # Optimizer.state_dict()
    finished: bool = False
    # Steady-state runs (optimizer.steady_state) checkpoint between results instead:
    # the optimizer after ``told`` results (archive ``told`` order), and the candidates
    # asked but not yet told then, as (candidate id, genome). Defaults keep older files readable.
    told: int = 0
    pending: tuple = ()


def checkpoint_path(run_dir: Path, generation: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"gen-{generation:06d}.state"


def save_state(run_dir: str | Path, state: ControllerState) -> Path:
    """Write atomically, then drop all but the ``KEEP`` newest checkpoints."""
    payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = checkpoint_path(Path(run_dir), state.generation)
    atomic_write_bytes(path, MAGIC + b" %d " % STATE_FORMAT + digest + b"\n" + payload)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def read_state(path: Path) -> ControllerState:
    """One checkpoint file, checksum verified; ``CheckpointError`` naming the file otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror})") from None
    header, _, payload = data.partition(b"\n")
    parts = header.split(b" ")
    if len(parts) != 3 or parts[0] != MAGIC:
        raise CheckpointError(f"{path}: not an evomerge search checkpoint")
    if parts[1] != str(STATE_FORMAT).encode():
        raise CheckpointError(f"{path}: checkpoint format {parts[1].decode(errors='replace')} "
                              f"(this evomerge reads format {STATE_FORMAT})")
    if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
        raise CheckpointError(f"{path}: checksum mismatch (file is corrupted)")
    state = pickle.loads(payload)  # safe: our own file, checksum verified above
    if not isinstance(state, ControllerState):
        raise CheckpointError(f"{path}: checkpoint holds no controller state")
    return state


def load_latest(run_dir: str | Path) -> ControllerState:
    """The newest readable checkpoint; falls back to the previous one with a warning."""
    paths = list_checkpoints(run_dir)
    if not paths:
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINT_DIR}: no checkpoint to resume from")
    errors = []
    for path in reversed(paths[-KEEP:]):
        try:
            state = read_state(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {path.name}", stacklevel=2)
        return state
    raise CheckpointError(f"{Path(run_dir) / CHECKPOINT_DIR}: no usable checkpoint ({'; '.join(errors)})")

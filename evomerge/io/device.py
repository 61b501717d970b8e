"""Checking a torch device string before any work is done on it.

``torch.device("cuda")`` is accepted on every machine; the failure comes later, deep in a
model load, as ``AssertionError: Torch not compiled with CUDA enabled``. Commands check the
device up front instead, so a wrong ``--device`` / ``evaluator.device`` is one line naming
the field before anything is written.
"""

from __future__ import annotations

from evomerge.errors import ConfigError


def check_device(device: str, where: str = "device") -> None:
    """Raise a one-line ``ConfigError`` naming ``where`` unless ``device`` is usable here."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{where}: {device!r} is not a torch device ({str(exc).splitlines()[0]})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"{where}: {device!r} asked for, but this machine cannot use CUDA ({why}, "
                              f"torch {torch.__version__}); use 'cpu' or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{where}: {device!r} asked for, but this machine has {count} CUDA device(s)")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{where}: 'mps' asked for, but this machine has no usable Apple GPU")
    elif parsed.type != "cpu":
        raise ConfigError(f"{where}: {device!r}: evomerge runs on 'cpu', 'cuda[:N]' or 'mps'")

"""Starting or joining Ray, and checking that the cluster can hold the requested workers.

``evomerge search`` starts a private local Ray by default (no dashboard, a small object
store: candidates and results are tiny), watched by ``ray_watchdog`` so that it stops
with the controller even after a ``kill -9``. ``--address auto`` joins the cluster that
``ray start --head`` started on this machine; ``--address HOST:PORT`` joins a remote
head. Both fail fast with one line when nothing answers, so a search never hangs
before it has written anything.

Token authentication (on by default for clusters started by Ray >= 2.52 when a token
exists): Ray itself sends the token only when it finds the cluster on its own
(``auto``), not for an explicit address. evomerge sends it for an explicit address too,
when ``RAY_AUTH_MODE`` is unset and a token is there (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``): the user named that cluster, and the
token is the one ``ray start`` uses. ``RAY_AUTH_MODE=disabled`` opts out.
"""

from __future__ import annotations

import math
import os
import socket
import threading
from typing import Any

from evomerge.errors import ConfigError, EvomergeError

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
            timeout: float = 30.0) -> dict[str, float]:
    """Make sure this process is connected to Ray; return the cluster's total resources.

    ``address=None`` starts a local Ray with ``num_cpus`` CPUs (all of them if None).
    ``"auto"`` or ``"HOST:PORT"`` joins an existing cluster; an unreachable one raises a
    one-line ``EvomergeError`` within ``timeout`` seconds. If Ray is already initialized
    in this process it is reused as is.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address is None:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=True)
        _watch_private_ray()
        return ray.cluster_resources()
    if address != "auto":
        host, port = parse_address(address)
        _check_reachable(host, port, min(timeout, 5.0))
        use_token_for_explicit_address()
    _init_with_timeout(address, timeout)
    return ray.cluster_resources()


def token_available() -> bool:
    """Whether a Ray auth token is there to send (only its presence is checked here; Ray reads it)."""
    from pathlib import Path

    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).is_file()
    homes = {Path.home()}
    try:   # Ray's loader finds the account's home directory, which $HOME may not name
        import pwd

        homes.add(Path(pwd.getpwuid(os.getuid()).pw_dir))
    except (ImportError, KeyError):
        pass
    return any((home / ".ray" / "auth_token").is_file() for home in homes)


def use_token_for_explicit_address() -> bool:
    """Turn on token authentication for joining a named cluster when a token exists and the
    user did not choose a mode; True when token authentication is on."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:   # Ray reads its config when imported: have it read the mode again (as Ray does for "auto")
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):
            pass
        return True
    return (mode or "").lower() == "token"


def _watch_private_ray() -> None:
    """Start the watchdog that stops this process's private Ray when the process dies."""
    from evomerge.workers.ray_watchdog import start_watchdog

    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        pids = [info.process.pid for infos in node.all_processes.values() for info in infos
                if getattr(info, "process", None) is not None]
    except (AttributeError, ImportError):   # another Ray layout: Ray's own fate-sharing only
        return
    start_watchdog(pids)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--address must be 'auto' or HOST:PORT (like 10.0.0.1:6379), got {address!r}")
    return host, int(port)


def _check_reachable(host: str, port: int, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise EvomergeError(f"cannot reach the Ray cluster at {host}:{port} ({reason}); "
                            "start it with `ray start --head`, or leave out --address to run locally") from None


def _init_with_timeout(address: str, timeout: float) -> None:
    """ray.init in a helper thread, so a head that accepts TCP but never answers cannot hang us."""
    import ray

    outcome: dict[str, BaseException | None] = {"error": None}

    def attempt() -> None:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        except BaseException as exc:  # reported to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise EvomergeError(f"the Ray cluster at {address} did not answer within {timeout:.0f} s; "
                            "check the address and that `ray start` is running there")
    if outcome["error"] is not None:
        first = next((line.strip() for line in str(outcome["error"]).splitlines() if line.strip()), "")
        where = "no running Ray cluster found on this machine" if address == "auto" else f"at {address}"
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = ("; if the cluster uses token authentication, put its token in ~/.ray/auth_token "
                    "(or RAY_AUTH_TOKEN) and set RAY_AUTH_MODE=token")
        elif "auth" in first.lower() or "Unauthenticated" in str(outcome["error"]):
            hint = "; the token sent (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is not this cluster's"
        raise EvomergeError(f"cannot join the Ray cluster ({where}): "
                            f"{type(outcome['error']).__name__}: {first[:200]}{hint}") from None


def nodes() -> list[dict[str, float]]:
    """The resources of each alive node."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def placeable(per_node: list[dict[str, float]], num_cpus: float, num_gpus: float,
              memory: int | None) -> int:
    """How many actors of this shape fit on these nodes (an actor cannot span nodes)."""
    needs = [(key, need) for key, need in (("CPU", num_cpus), ("GPU", num_gpus), ("memory", memory or 0))
             if need > 0]
    if not needs:
        return 2**31   # an actor that asks for nothing fits anywhere
    return sum(min(math.floor(node.get(key, 0.0) / need + 1e-9) for key, need in needs)
               for node in per_node)


def check_resources(n_workers: int, num_cpus: float = 1, num_gpus: float = 0,
                    memory: int | None = None, per_node: list[dict[str, Any]] | None = None) -> None:
    """Raise a one-line ``EvomergeError`` if the cluster cannot place ``n_workers`` actors."""
    per_node = nodes() if per_node is None else per_node
    total_gpus = sum(node.get("GPU", 0.0) for node in per_node)
    total_cpus = sum(node.get("CPU", 0.0) for node in per_node)
    shape = f"num_cpus={num_cpus:g}, num_gpus={num_gpus:g}" + (f", memory={memory}" if memory else "")
    where = f"the Ray cluster has {total_cpus:g} CPUs and {total_gpus:g} GPUs on {len(per_node)} node(s)"
    if num_gpus * n_workers > total_gpus + 1e-9:
        raise EvomergeError(f"workers: {n_workers} worker(s) x num_gpus={num_gpus:g} need "
                            f"{num_gpus * n_workers:g} GPUs but {where}")
    fits = placeable(per_node, num_cpus, num_gpus, memory)
    if fits < n_workers:
        raise EvomergeError(f"workers: only {fits} of {n_workers} worker(s) with {shape} fit: {where}")

"""Stop the private Ray of a search when its controller dies, however it dies.

``ray.init()`` without an address starts Ray's processes (GCS, raylet, ...) as children of
the controller. Ray ties most of them to the controller's life, but not all: after a
``kill -9`` of the controller, the raylet's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) stay behind, listening on every interface. A watchdog process
started next to them watches the controller; while it lives, the watchdog keeps a list
of the Ray processes (the ones ``ray.init`` started and everything they started since),
and when the controller is gone it stops them (SIGTERM, then SIGKILL). Each process is
identified by its pid *and* its start time, so a pid reused by an unrelated process is
never touched.

Run as ``python -m evomerge.workers.ray_watchdog CONTROLLER_PID ROOT_PID...``; started by
``start_watchdog`` (see ``ray_cluster.connect``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_SECONDS = 1.0
GRACE_SECONDS = 3.0


def _start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])   # field 22 of stat; fields[0] here is field 3


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(parent, []).append(int(entry))
    return kids


def tracked(roots: dict[int, int]) -> dict[int, int]:
    """``roots`` ({pid: start time}) still alive, and all their descendants, with start times."""
    kids = _children()
    found: dict[int, int] = {}
    todo = [pid for pid, started in roots.items() if _start_time(pid) == started]
    while todo:
        pid = todo.pop()
        started = _start_time(pid)
        if started is None or pid in found:
            continue
        found[pid] = started
        todo.extend(kids.get(pid, []))
    return found


def stop(processes: dict[int, int]) -> None:
    """SIGTERM each process that is still the one recorded, then SIGKILL what remains."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid, started in processes.items() if _start_time(pid) == started]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + GRACE_SECONDS
        while sig == signal.SIGTERM and time.monotonic() < deadline and \
                any(_start_time(pid) == processes[pid] for pid in alive):
            time.sleep(0.1)


def watch(controller: int, roots: dict[int, int]) -> None:
    known: dict[int, int] = dict(roots)
    while _start_time(controller) is not None and os.getppid() == controller:
        known.update(tracked(roots))
        # processes that ended on their own are forgotten, so their pids can be reused safely
        known = {pid: started for pid, started in known.items() if _start_time(pid) == started}
        time.sleep(POLL_SECONDS)
    known.update(tracked(known))
    stop(known)


def start_watchdog(root_pids: list[int]) -> subprocess.Popen | None:
    """Start the watchdog for the Ray processes ``root_pids`` of this process (Linux only)."""
    if not Path("/proc/self/stat").exists():
        return None
    roots = [str(pid) for pid in root_pids if _start_time(pid) is not None]
    if not roots:
        return None
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    # Its own session: a Ctrl-C meant for the search does not stop the watchdog before Ray.
    return subprocess.Popen([sys.executable, "-m", "evomerge.workers.ray_watchdog", str(os.getpid()), *roots],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def main(argv: list[str]) -> None:
    controller, *pids = (int(a) for a in argv)
    roots = {pid: started for pid in pids if (started := _start_time(pid)) is not None}
    watch(controller, roots)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Joining a Ray cluster the way a cluster user does (`ray start --head`, then `evomerge search
--address`), with token authentication on; and no Ray process of a run outliving its
controller after `kill -9`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")

SEARCH = {"seed": 4, "genome": {"kind": "box", "dim": 3},
          "objectives": [{"name": "a", "task": "synthetic/a"}, {"name": "b", "task": "synthetic/b"}],
          "evaluator": {"kind": "synthetic", "sleep": 0.1},
          "optimizer": {"name": "random", "population": 4, "generations": 2},
          "workers": {"backend": "ray", "count": 2}}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def session_of(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (what `ray start` of the test started)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.fixture
def cluster():
    """A Ray head on this machine with token authentication, its own ports, a token and a
    HOME of its own (the user's ~/.ray is never touched); stopped, every process of it."""
    root = Path(tempfile.mkdtemp(prefix="evr-", dir="/tmp"))   # short: Ray's socket paths must fit
    (root / "home").mkdir()
    token = root / "token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    gcs, client, manager, objects, agent, metrics, env_agent, lo = free_ports(8)
    env = {**os.environ, "HOME": str(root / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={root / 'ray'}", f"--ray-client-server-port={client}",
         f"--node-manager-port={manager}", f"--object-manager-port={objects}",
         f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={env_agent}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def gcs_up() -> bool:
            assert head.poll() is None, "ray start --head exited"
            try:
                socket.create_connection(("127.0.0.1", gcs), timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(gcs_up, 90, "the Ray head did not come up")
        time.sleep(3)   # the raylet registers after the GCS listens
        yield {"address": f"127.0.0.1:{gcs}", "token": token, "home": root / "home", "root": root}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in session_of(head.pid):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            try:
                head.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            if not session_of(head.pid):
                break
            time.sleep(2)
        shutil.rmtree(root, ignore_errors=True)


def evomerge(args: list[str], env: dict, **kw):
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300, **kw)


def user_env(cluster, with_token: bool) -> dict:
    """The cluster user's environment: the token in a file named by RAY_AUTH_TOKEN_PATH (or no
    token at all), no RAY_AUTH_MODE set. (Ray would also read ~/.ray/auth_token of the
    account, which is not the test's to write.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(cluster["home"])
    if with_token:
        copy = cluster["home"] / "cluster-token"
        shutil.copy(cluster["token"], copy)
        env["RAY_AUTH_TOKEN_PATH"] = str(copy)
    else:
        env["RAY_AUTH_TOKEN_PATH"] = str(cluster["home"] / "no-token-here")
    return env


def worker_pids(run_dir: Path) -> set[int]:
    db = sqlite3.connect(f"file:{run_dir / 'archive.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return {int(w.rsplit(":", 1)[1]) for (w,) in db.execute("SELECT DISTINCT worker FROM evaluations")}
    finally:
        db.close()


@pytest.mark.slow
def test_a_search_joins_a_token_authenticated_cluster_and_its_workers_die_with_a_killed_controller(
        cluster, tmp_path):
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(SEARCH))

    # Without the cluster's token: refused in one line that says what to set.
    refused = evomerge(["search", str(config), "--run-dir", str(tmp_path / "refused"), "--address",
                        cluster["address"], "--no-progress"], user_env(cluster, with_token=False))
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot join the Ray cluster") and "RAY_AUTH_MODE=token" in lines[-1]
    assert not (tmp_path / "refused").exists()

    # With it: the search runs on 2 workers of the cluster.
    env = user_env(cluster, with_token=True)
    done = evomerge(["search", str(config), "--run-dir", str(tmp_path / "run"), "--address", cluster["address"],
                     "--no-progress"], env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "generation:   2 of 2 done" in done.stdout and "evaluations:  8 (8 ok" in done.stdout
    assert len(worker_pids(tmp_path / "run")) == 2

    # kill -9 of a controller joined to the cluster: its workers (actors it owns) stop with it.
    long = tmp_path / "long.yaml"
    long.write_text(yaml.safe_dump({**SEARCH, "evaluator": {"kind": "synthetic", "sleep": 0.3},
                                    "optimizer": {"name": "random", "population": 4, "generations": 100}}))
    controller = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(long), "--run-dir",
                                   str(tmp_path / "killed"), "--address", cluster["address"], "--no-progress"],
                                  env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (tmp_path / "killed" / "archive.sqlite").exists() and
                   len(worker_pids(tmp_path / "killed")) == 2, 120, "the search did not start on 2 workers")
        workers = worker_pids(tmp_path / "killed")
        os.kill(controller.pid, signal.SIGKILL)
        controller.wait()
        wait_until(lambda: not any(alive(pid) for pid in workers), 60, "a worker outlived its controller")
    finally:
        if controller.poll() is None:
            controller.kill()


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
def test_kill_9_of_a_controller_with_its_private_ray_leaves_no_ray_process_behind(tmp_path):
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({**SEARCH, "evaluator": {"kind": "synthetic", "sleep": 0.3},
                                      "optimizer": {"name": "random", "population": 4, "generations": 100}}))
    controller = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(config), "--run-dir",
                                   str(tmp_path / "run"), "--no-progress"],
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    started: list[int] = []
    try:
        wait_until(lambda: (tmp_path / "run" / "archive.sqlite").exists() and
                   len(worker_pids(tmp_path / "run")) == 2, 120, "the search did not start on 2 workers")
        started = descendants(controller.pid)
        names = " ".join(Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ") for p in started if alive(p))
        assert "raylet" in names and "gcs_server" in names and "ray_watchdog" in names
        os.kill(controller.pid, signal.SIGKILL)
        controller.wait()
        wait_until(lambda: not any(alive(pid) for pid in started), 60,
                   "Ray processes of the run outlived its controller")
    finally:
        if controller.poll() is None:
            controller.kill()
        for pid in started:          # if the test failed: clean up what it started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

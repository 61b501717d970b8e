"""Pools that evaluate candidates: in this process (LocalPool) or on Ray actors (RayPool).

Both share one small interface the search loop drives:

    pool.submit(candidate)            # queue a candidate
    pool.next_result(timeout) -> EvalResult   # the next finished one, in completion order
    pool.pending() -> int             # submitted but not yet handed back
    pool.close()

A pool is built from an ``evaluator_factory``: a picklable zero-argument callable that
returns an object with ``evaluate(candidate) -> EvalResult`` (the real
``CandidateEvaluator`` via ``functools.partial(CandidateEvaluator, spec)``, or any test
evaluator). On Ray, each actor calls the factory once, so source weights and the inference
engine stay resident for every candidate that actor evaluates.

Failure policy (the same in both pools):
- the evaluator raises, or returns a NaN objective -> ``status="failed"``, never retried:
  the candidate itself is at fault and would fail again;
- the worker process dies (killed, out of memory, a CUDA error that poisons the process)
  -> RayPool replaces the actor and retries the candidate on another worker, up to
  ``max_retries`` times, then records it as failed with the reason;
- the evaluator cannot even be built (a source model that does not load) -> one-line
  ``EvomergeError`` for the whole search, instead of restarting workers forever.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from evomerge.errors import ConfigError, EvomergeError
from evomerge.workers.types import Candidate, EvalResult


class Evaluator(Protocol):
    def evaluate(self, candidate: Candidate) -> EvalResult: ...


EvaluatorFactory = Callable[[], Evaluator]

# Text in an error that means the process (its CUDA context) is unusable afterwards: the
# worker must be replaced, and the candidate may well succeed on a fresh one.
_PROCESS_FAULTS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN error",
                   "NCCL error", "device-side assert")


def one_line(text: str, limit: int = 300) -> str:
    """The first meaningful line of an error message, for the archive and the terminal."""
    for line in str(text).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def _describe(exc: BaseException) -> str:
    message = one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def is_process_fault(error: str | None) -> bool:
    return bool(error) and any(marker in error for marker in _PROCESS_FAULTS)


def worker_label(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def checked_evaluate(evaluator: Evaluator, candidate: Candidate, worker: str) -> EvalResult:
    """Run one evaluation; turn exceptions and NaN objectives into a failed result."""
    start = time.perf_counter()
    try:
        result = evaluator.evaluate(candidate)
    except Exception as exc:  # the evaluator promised not to raise; it did: a bad candidate
        result = EvalResult(candidate.candidate_id, "failed", error=_describe(exc))
    if result.status == "ok":
        for name, score in result.objectives.items():
            if not (math.isfinite(score.value) and math.isfinite(score.stderr)):
                result.status = "failed"
                result.error = f"objective {name!r} is not finite (value={score.value}, stderr={score.stderr})"
                break
    if not result.seconds:
        result.seconds = time.perf_counter() - start
    result.worker = worker
    return result


class LocalPool:
    """Evaluates in this process, one candidate at a time, when ``next_result`` is called.

    ``n_workers`` is accepted so both pools are built the same way; a local pool has a
    single evaluator (one set of resident sources) and runs candidates in submit order.
    """

    def __init__(self, evaluator_factory: EvaluatorFactory, n_workers: int = 1):
        self.worker = worker_label("local")
        try:
            self._evaluator = evaluator_factory()
        except EvomergeError:
            raise
        except Exception as exc:
            raise EvomergeError(f"the evaluator could not start: {_describe(exc)}") from exc
        self._queue: deque[Candidate] = deque()

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(candidate)

    def next_result(self, timeout: float | None = None) -> EvalResult:
        if not self._queue:
            raise RuntimeError("next_result() called with no candidate pending")
        return checked_evaluate(self._evaluator, self._queue.popleft(), self.worker)

    def pending(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        self._queue.clear()
        self._evaluator = None


# ----------------------------------------------------------------------------- Ray


class _WorkerActor:
    """One worker slot: builds its evaluator once and keeps it for every candidate.

    A failure to build is kept and reported by ``ready()`` rather than raised, so the pool
    can stop the search with the real reason instead of seeing an anonymous dead actor.
    """

    def __init__(self, evaluator_factory: EvaluatorFactory, role: str):
        self.name = worker_label(role)
        self.startup_error: str | None = None
        try:
            self.evaluator = evaluator_factory()
        except Exception as exc:
            self.evaluator = None
            self.startup_error = _describe(exc)

    def ready(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "error": self.startup_error}

    def evaluate(self, candidate: Candidate) -> EvalResult:
        return checked_evaluate(self.evaluator, candidate, self.name)


@dataclass
class WorkerInfo:
    slot: int
    name: str
    pid: int
    host: str


@dataclass
class _Slot:
    actor: Any
    incarnation: int
    info: WorkerInfo | None = None          # None until ready() answered
    running: deque = field(default_factory=deque)   # object refs in submit order
    head_since: float = 0.0                 # when the oldest of them (the one running) started


class RayPool:
    """One Ray actor per worker slot, fed asynchronously through a bounded queue.

    Each actor holds up to ``queue_depth`` candidates (default 2: one running, the next one
    already shipped), so an actor never waits for the controller between candidates.
    Ray must be connected first (``evomerge.workers.ray_cluster.connect``); if it is not,
    a local Ray sized for the pool is started and shut down again by ``close()``.
    """

    def __init__(self, evaluator_factory: EvaluatorFactory, n_workers: int = 2, *,
                 num_cpus: float = 1, num_gpus: float = 0, memory: int | None = None,
                 max_retries: int = 2, queue_depth: int = 2, startup_timeout: float | None = None,
                 task_timeout: float | None = None):
        import ray

        from evomerge.workers import ray_cluster

        if n_workers < 1:
            raise ConfigError(f"workers.count must be at least 1, got {n_workers}")
        if max_retries < 0:
            raise ConfigError(f"workers.max_retries must be >= 0, got {max_retries}")
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            ray_cluster.connect(None, num_cpus=max(1, math.ceil(n_workers * num_cpus)))
            self._owns_ray = True
        try:
            ray_cluster.check_resources(n_workers, num_cpus=num_cpus, num_gpus=num_gpus, memory=memory)
        except EvomergeError:
            self._shutdown_own_ray()
            raise
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if memory:
            options["memory"] = int(memory)
        self._actor_class = ray.remote(**options)(_WorkerActor)
        self._factory_ref = ray.put(evaluator_factory)   # pickled once, shared by replacements
        self.max_retries = max_retries
        self.task_timeout = task_timeout   # a worker silent this long on one candidate is hung
        self.queue_depth = queue_depth
        self.replacements = 0
        self._queue: deque[Candidate] = deque()
        self._done: deque[EvalResult] = deque()
        self._tasks: dict[Any, tuple[int, Candidate]] = {}   # ref -> (slot, candidate)
        self._starting: dict[Any, int] = {}                  # ready() ref -> slot
        # One ticket per free place in an actor's queue: (slot, incarnation). Taking the
        # oldest ticket spreads work over workers and makes dispatch O(1) at any pool size;
        # tickets of a replaced actor are skipped when they come up.
        self._tickets: deque[tuple[int, int]] = deque()
        self._slots = [self._start_actor(i, 0) for i in range(n_workers)]
        # Wait for the first actors: a source that does not load stops the search here,
        # before the caller has written anything.
        try:
            self.wait_for_workers(startup_timeout)
        except TimeoutError:
            self.close()
            raise EvomergeError(f"Ray workers did not start within {startup_timeout:.0f} s "
                                f"(asked for num_cpus={num_cpus:g}, num_gpus={num_gpus:g} each)") from None
        # Level by level: every worker gets one candidate before any gets its second.
        self._tickets = deque((index, slot.incarnation) for _ in range(queue_depth)
                              for index, slot in enumerate(self._slots))

    # -- the interface the search loop uses

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(candidate)
        self._dispatch()

    def pending(self) -> int:
        return len(self._queue) + len(self._tasks) + len(self._done)

    def next_result(self, timeout: float | None = None) -> EvalResult:
        """The next finished candidate; raises TimeoutError if none within ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._done:
                return self._done.popleft()
            self._dispatch()
            waiting = list(self._tasks) + list(self._starting)
            if not waiting:
                raise RuntimeError("next_result() called with no candidate pending")
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            hung_at = self._next_hang_deadline()
            if hung_at is not None and time.monotonic() >= hung_at and self._replace_hung_workers():
                continue   # checked before waiting, so a busy pool cannot hide a hung worker
            wait = remaining if hung_at is None else max(0.0, hung_at - time.monotonic())
            if remaining is not None:
                wait = min(wait, remaining)
            ready, _ = self._ray.wait(waiting, num_returns=1, timeout=wait)
            if not ready:
                self._replace_hung_workers()
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no result within {timeout} s ({self.pending()} pending)")
                continue
            ref = ready[0]
            if ref in self._starting:
                self._on_ready(ref)
            else:
                self._on_result(ref)

    def wait_for_workers(self, timeout: float | None = None) -> list[WorkerInfo]:
        """Block until every worker (replacements included) has built its evaluator."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._starting:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = self._ray.wait(list(self._starting), num_returns=1, timeout=remaining)
            if not ready:
                raise TimeoutError(f"{len(self._starting)} worker(s) not ready within {timeout} s")
            self._on_ready(ready[0])
        return self.workers()

    def workers(self) -> list[WorkerInfo]:
        """The live workers that have started (name and pid of each actor process)."""
        return [slot.info for slot in self._slots if slot.info is not None]

    def close(self) -> None:
        for slot in getattr(self, "_slots", []):
            try:
                self._ray.kill(slot.actor)
            except Exception:
                pass
        self._slots = []
        self._tasks.clear()
        self._starting.clear()
        self._queue.clear()
        self._done.clear()
        self._shutdown_own_ray()

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _next_hang_deadline(self) -> float | None:
        if self.task_timeout is None:
            return None
        started = [slot.head_since for slot in self._slots if slot.running]
        return min(started) + self.task_timeout if started else None

    def _replace_hung_workers(self) -> bool:
        """Replace workers whose running candidate is overdue (a hung GPU, a deadlock)."""
        if self.task_timeout is None:
            return False
        now = time.monotonic()
        hung = [index for index, slot in enumerate(self._slots)
                if slot.running and now - slot.head_since >= self.task_timeout]
        for index in hung:
            self._replace(index, f"no result within task_timeout={self.task_timeout:g} s (worker hung)",
                          charge_first=True)
        return bool(hung)

    def _shutdown_own_ray(self) -> None:
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

    def _start_actor(self, index: int, incarnation: int) -> _Slot:
        actor = self._actor_class.remote(self._factory_ref, f"ray-worker-{index}.{incarnation}")
        self._starting[actor.ready.remote()] = index
        return _Slot(actor=actor, incarnation=incarnation)

    def _on_ready(self, ref: Any) -> None:
        index = self._starting.pop(ref)
        try:
            info = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            self.close()
            raise EvomergeError(f"Ray worker {index} died while starting: {_ray_reason(exc)}") from None
        if info["error"]:
            self.close()
            raise EvomergeError(f"worker {info['name']} could not start its evaluator: {info['error']}")
        slot = self._slots[index]
        slot.info = WorkerInfo(index, info["name"], info["pid"], info["host"])
        self._tickets.appendleft((index, slot.incarnation))   # a fresh worker starts at once
        self._tickets.extend([(index, slot.incarnation)] * (self.queue_depth - 1))
        self._dispatch()

    def _dispatch(self) -> None:
        while self._queue and self._tickets:
            index, incarnation = self._tickets.popleft()
            slot = self._slots[index]
            if slot.incarnation != incarnation or slot.info is None:
                continue   # that actor was replaced; its successor brings its own tickets
            candidate = self._queue.popleft()
            ref = slot.actor.evaluate.remote(candidate)
            if not slot.running:
                slot.head_since = time.monotonic()
            slot.running.append(ref)
            self._tasks[ref] = (index, candidate)

    def _on_result(self, ref: Any) -> None:
        index, candidate = self._tasks[ref]
        slot = self._slots[index]
        try:
            result: EvalResult = self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:
            # An exception escaped the actor method itself (not the evaluator): a bug or an
            # unpicklable result. As far as we can tell the candidate is at fault.
            self._forget(index, ref)
            self._done.append(EvalResult(candidate.candidate_id, "failed", error=_ray_reason(exc),
                                         worker=slot.info.name if slot.info else None))
            return
        except self._ray.exceptions.RayError as exc:   # the actor process is gone
            self._replace(index, _ray_reason(exc), charge_first=True)
            return
        self._forget(index, ref)
        if result.status == "failed" and is_process_fault(result.error):
            # An error that leaves the process unusable (CUDA): retry the candidate on a
            # fresh worker and replace this one.
            self._retry_or_fail(candidate, f"worker fault: {result.error}", result.worker)
            self._replace(index, f"process fault: {result.error}", charge_first=False)
            return
        self._done.append(result)

    def _forget(self, index: int, ref: Any) -> None:
        """A task of a live actor finished: its place in that actor's queue is free again."""
        del self._tasks[ref]
        slot = self._slots[index]
        if ref in slot.running:
            slot.running.remove(ref)
            slot.head_since = time.monotonic()   # the next one (if any) starts now
        self._tickets.append((index, slot.incarnation))

    def _replace(self, index: int, reason: str, charge_first: bool) -> None:
        """Start a new actor in slot ``index``; retry or requeue what the old one held.

        Actor tasks run in submit order, so of the tasks still unanswered only the oldest
        can have been running when the worker died: that candidate is charged an attempt,
        the others are re-sent uncharged. One case cannot be told apart from the controller:
        the oldest finished but its reply died with the process, and the next one had
        already started. Both then run again (no result is lost or returned twice), and
        the attempt is charged to the oldest. So a dead worker costs at most
        ``queue_depth`` re-runs, each of a candidate it held.
        """
        slot = self._slots[index]
        name = slot.info.name if slot.info else f"ray-worker-{index}.{slot.incarnation}"
        refs = [ref for ref in slot.running if ref in self._tasks]
        # A result the worker delivered just before it died is kept, not recomputed: the
        # failure of a later task can reach us before the success of an earlier one.
        finished, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        finished = set(finished)
        held = []
        for ref in refs:
            candidate = self._tasks.pop(ref)[1]
            result = self._delivered(ref) if ref in finished else None
            if result is not None and not (result.status == "failed" and is_process_fault(result.error)):
                self._done.append(result)
            else:
                held.append(candidate)
        for position, candidate in reversed(list(enumerate(held))):
            if position == 0 and charge_first:
                self._retry_or_fail(candidate, reason, name)
            else:
                self._queue.appendleft(candidate)
        try:
            self._ray.kill(slot.actor)
        except Exception:
            pass
        self.replacements += 1
        self._slots[index] = self._start_actor(index, slot.incarnation + 1)

    def _delivered(self, ref: Any) -> EvalResult | None:
        try:
            return self._ray.get(ref, timeout=0)
        except Exception:
            return None

    def _retry_or_fail(self, candidate: Candidate, reason: str, worker: str | None) -> None:
        if candidate.attempt >= self.max_retries:
            self._done.append(EvalResult(
                candidate.candidate_id, "failed", worker=worker,
                error=f"worker died on all {candidate.attempt + 1} attempts; last: {reason}"))
            return
        candidate.attempt += 1
        self._queue.appendleft(candidate)


def _ray_reason(exc: BaseException) -> str:
    """A one-line reason for a Ray failure (the raw messages span dozens of lines)."""
    import ray

    if isinstance(exc, ray.exceptions.OutOfMemoryError) or "OutOfMemory" in str(exc) \
            or "out of memory" in str(exc).lower():
        return "worker process ran out of memory"
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return _describe(cause)
    if isinstance(exc, ray.exceptions.RayActorError):
        text = str(exc)
        if "SIGKILL" in text or "killed" in text.lower():
            return "worker process was killed"
        return "worker process died (" + type(exc).__name__ + ")"
    return _describe(exc)


def make_pool(evaluator_factory: EvaluatorFactory, backend: str = "local", count: int = 1, *,
              num_cpus: float = 1, num_gpus: float = 0, memory: int | None = None,
              max_retries: int = 2, address: str | None = None, task_timeout: float | None = None,
              **_ignored: Any) -> LocalPool | RayPool:
    """Build the pool a config's ``workers:`` section asks for.

    ``make_pool(factory, **config.workers.model_dump())``. With ``backend="ray"`` and an
    ``address``, joins that cluster first (see ``ray_cluster.connect``).
    """
    if backend == "local":
        return LocalPool(evaluator_factory, count)
    if backend != "ray":
        raise ConfigError(f"workers.backend must be 'local' or 'ray', got {backend!r}")
    from evomerge.workers import ray_cluster

    ray_cluster.connect(address, num_cpus=max(1, math.ceil(count * num_cpus)))
    return RayPool(evaluator_factory, count, num_cpus=num_cpus, num_gpus=num_gpus, memory=memory,
                   max_retries=max_retries, task_timeout=task_timeout)

"""The broker's scheduling state machine: pure, no sockets, no clock reads.

The server feeds it decoded messages (:meth:`BrokerState.handle`) and the time
(:meth:`BrokerState.tick`), then calls :meth:`BrokerState.flush` for the messages to
send. Results of a burst of input are batched per destination, which is how the broker
batches under load. Payload frames are opaque here: they are stored and forwarded,
never unpickled.

Task lifecycle (dask's names where they match)::

    RELEASED --> WAITING --> READY --> PROCESSING --> MEMORY
        ^           |          ^           |  \\           |
        |           +----------+           |   +-> ERRED   | data lost / not needed
        +----------------------------------+---------------+

A task is *forgotten* (removed from the graph) once no client wants it and it has no
dependents left; until then a released task can be recomputed when data is lost.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import pickle
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from zdist import protocol as P
from zdist.broker.graph import TaskGraph, find_cycle
from zdist.broker.monitor import Monitor
from zdist.errors import GraphError, KilledWorker

logger = logging.getLogger(__name__)

Out = tuple[bytes, P.Message, list[Any]]


class TaskState(enum.Enum):
    RELEASED = "released"
    """In the graph but not computed and not scheduled (or its result was freed)."""
    WAITING = "waiting"
    """Some dependency is not in memory yet."""
    READY = "ready"
    """Every dependency is in memory; waiting for a worker slot."""
    PROCESSING = "processing"
    """Sent to a worker (queued or running there)."""
    MEMORY = "memory"
    """Finished; the result is on one or more workers (and inline here if small)."""
    ERRED = "erred"
    """Failed (its own exception, or a dependency's); final until forgotten."""


FINAL_STATES = frozenset({TaskState.MEMORY, TaskState.ERRED})
#: States in which a task still needs its dependencies' results.
_ACTIVE = frozenset({TaskState.WAITING, TaskState.READY, TaskState.PROCESSING})

_TRANSITIONS: frozenset[tuple[TaskState, TaskState]] = frozenset(
    {
        (TaskState.RELEASED, TaskState.WAITING),
        (TaskState.RELEASED, TaskState.READY),
        (TaskState.RELEASED, TaskState.ERRED),
        (TaskState.WAITING, TaskState.READY),
        (TaskState.WAITING, TaskState.RELEASED),
        (TaskState.WAITING, TaskState.ERRED),
        (TaskState.READY, TaskState.PROCESSING),
        (TaskState.READY, TaskState.WAITING),
        (TaskState.READY, TaskState.RELEASED),
        (TaskState.READY, TaskState.ERRED),
        (TaskState.PROCESSING, TaskState.MEMORY),
        (TaskState.PROCESSING, TaskState.ERRED),
        (TaskState.PROCESSING, TaskState.READY),
        (TaskState.PROCESSING, TaskState.WAITING),
        (TaskState.PROCESSING, TaskState.RELEASED),
        (TaskState.MEMORY, TaskState.RELEASED),
        (TaskState.MEMORY, TaskState.WAITING),
        (TaskState.MEMORY, TaskState.READY),
        (TaskState.ERRED, TaskState.RELEASED),
    }
)
# The hot path reads these as member attributes: an Enum hashes through a Python-level
# __hash__, and a (state, state) set lookup cost more than the rest of a transition.
for _state in TaskState:
    _state.allowed = tuple(b for a, b in _TRANSITIONS if a is _state)  # type: ignore[attr-defined]
    _state.active = _state in _ACTIVE  # type: ignore[attr-defined]
del _state

#: The pseudo-client that wants fire_and_forget tasks until they finish.
FIRE_AND_FORGET = b""
#: Transitions kept per task in story() for debugging (dask's ``story``).
STORY_LENGTH = 8
#: Transitions kept in all (one log for the broker, like dask's transition_log).
TRANSITION_LOG_LENGTH = 100_000
#: A dependency at least this large pins its dependent to the worker holding it.
LOCALITY_BYTES = 1_000_000
#: Keep each worker supplied with enough queued tasks to cover this much work, so it
#: never idles for a round trip; bounded by MAX_EXTRA_PER_THREAD for very short tasks.
PIPELINE_SECONDS = 0.005
MAX_EXTRA_PER_THREAD = 64


class IllegalTransition(RuntimeError):
    pass


class Task:
    __slots__ = (
        "args",
        "deps",
        "error",
        "failed_on",
        "group",
        "fn",
        "inline",
        "key",
        "n_active",
        "nbytes",
        "priority",
        "processing_on",
        "queued",
        "resources",
        "restrict",
        "retries",
        "state",
        "suspicious",
        "typename",
        "waiting_on",
        "wanted_by",
        "who_has",
    )

    def __init__(
        self,
        key: str,
        fn: list[Any] | None,
        args: list[Any],
        deps: tuple[str, ...],
        priority: tuple[int, ...],
        retries: int = 0,
        resources: dict[str, float] | None = None,
        restrict: tuple[set[str], bool] | None = None,
    ) -> None:
        self.key = key
        self.fn = fn
        self.args = args
        self.deps = deps
        self.priority = priority
        self.retries = retries
        self.resources = resources or None
        self.restrict = restrict
        self.state = TaskState.RELEASED
        self.waiting_on = 0
        # Dependents in an _ACTIVE state (kept by _transition): is my result needed?
        self.n_active = 0
        self.who_has: set[bytes] = set()
        self.inline: list[Any] | None = None
        self.nbytes = 0
        self.typename = ""
        self.processing_on: bytes | None = None
        self.wanted_by: set[bytes] = set()
        self.suspicious = 0
        self.group = ""  # dask's key_split of the key, for progress and the dashboard
        self.failed_on: list[str] = []
        self.error: tuple[list[Any], str] | None = None
        self.queued = 0  # generation of its live entry in a ready queue (0: none)


class Worker:
    __slots__ = (
        "address",
        "avail",
        "avg_duration",
        "data",
        "handoff",
        "host",
        "ident",
        "last_seen",
        "last_sent",
        "local_directory",
        "local_queue",
        "memory_limit",
        "metrics",
        "name",
        "nthreads",
        "pid",
        "processing",
        "resources",
        "seceded",
        "status",
        "stealing",
        "versions",
        "zombies",
    )

    def __init__(self, ident: bytes, msg: P.RegisterWorker, now: float) -> None:
        self.ident = ident
        self.name = msg.name
        self.address = msg.data_address
        self.host = msg.host
        self.nthreads = max(1, msg.nthreads)
        self.memory_limit = msg.memory_limit
        self.resources: dict[str, float] = dict(msg.resources)
        self.avail: dict[str, float] = dict(msg.resources)
        self.pid = msg.pid
        self.local_directory = msg.local_directory
        self.versions = msg.versions
        self.processing: dict[str, None] = {}
        self.seceded: set[str] = set()
        # Cancelled while running: the thread stays busy until the worker reports back.
        self.zombies: set[str] = set()
        # Queued here, asked back (CancelTasks) for an idle worker; see _steal().
        self.stealing: set[str] = set()
        # Results a retiring worker waits to see copied elsewhere before it exits.
        self.handoff: set[str] = set()
        self.data: set[str] = set()
        self.local_queue: list[tuple[Any, ...]] = []
        self.last_seen = now
        self.last_sent = now
        self.metrics: dict[str, Any] = {}
        self.status = "running"
        self.avg_duration = 0.0

    def capacity(self) -> int:
        if self.avg_duration > 0:
            extra = int(PIPELINE_SECONDS / self.avg_duration)
            extra = max(1, min(extra, MAX_EXTRA_PER_THREAD))
        else:
            extra = 2
        return self.nthreads * (1 + extra)

    def free_slots(self) -> int:
        if self.status != "running":
            return 0
        return self.capacity() - self.occupancy()

    def occupancy(self) -> int:
        return len(self.processing) - len(self.seceded) + len(self.zombies)


class ClientRec:
    __slots__ = ("ident", "last_seen", "name", "versions", "wants")

    def __init__(self, ident: bytes, name: str, versions: dict[str, Any], now: float):
        self.ident = ident
        self.name = name
        self.versions = versions
        self.wants: set[str] = set()
        self.last_seen = now


@dataclass(frozen=True)
class BrokerConfig:
    address: str = ""
    heartbeat_interval: float = P.HEARTBEAT_INTERVAL
    liveness: int = P.WORKER_LIVENESS
    client_heartbeat_interval: float = P.CLIENT_HEARTBEAT_INTERVAL
    client_liveness: int = P.CLIENT_LIVENESS
    #: dask's ``distributed.scheduler.allowed-failures``.
    allowed_failures: int = 3


class _Pending:
    """A gather or run request waiting for replies."""

    __slots__ = ("client", "client_request", "remaining", "results", "worker")

    def __init__(
        self,
        client: bytes,
        client_request: int,
        remaining: set[Any],
        worker: bytes = b"",
    ):
        self.client = client
        self.client_request = client_request
        self.remaining = remaining
        self.results: list[Any] = []
        #: For a gather: the one worker asked (only its reply is accepted).
        self.worker = worker


#: Statuses a worker may report in WorkerStatus.
_WORKER_STATUSES = frozenset({"running", "paused", "closing", "retiring", "closed"})


class BrokerState:
    def __init__(self, config: BrokerConfig, versions: dict[str, Any]) -> None:
        self.config = config
        self.versions = versions
        self.tasks: dict[str, Task] = {}
        self.graph = TaskGraph()
        self.workers: dict[bytes, Worker] = {}
        self.clients: dict[bytes, ClientRec] = {}
        self.ready: list[tuple[Any, ...]] = []  # global heap of (priority, gen, key)
        self._gen = itertools.count(1)
        self._seq = itertools.count()
        self._req = itertools.count(1)
        self._gathers: dict[int, _Pending] = {}
        self._gathers_by_worker: dict[bytes, set[int]] = {}
        self._runs: dict[int, _Pending] = {}
        self._runs_by_worker: dict[bytes, set[int]] = {}
        self._out: list[Out] = []
        self._run_batches: dict[bytes, tuple[list[Any], P.FrameList]] = {}
        self._updates: dict[bytes, tuple[list[Any], P.FrameList]] = {}
        self._free: dict[bytes, list[str]] = {}
        self.monitor = Monitor()
        self.transitions: deque[tuple[str, str, str]] = deque(
            maxlen=TRANSITION_LOG_LENGTH
        )
        #: Recent log lines of the broker process (set by the server: this module
        #: does no I/O) and the dashboard's address, for info().
        self.log_lines: Any = list
        self.dashboard = ""
        #: Wall-clock time of the current input, set by the server (for the task
        #: stream people read); scheduling itself only uses ``now``.
        self.wall = 0.0
        self._dirty = False  # something may be dispatchable
        self.now = 0.0
        self.counters = {"tasks_done": 0, "tasks_erred": 0, "workers_lost": 0}

    # ==================================================================================
    # entry points

    def handle(
        self, ident: bytes, msg: P.Message, payload: list[Any], now: float
    ) -> None:
        """Apply one message from peer ``ident``; replies accumulate until flush()."""
        self.now = now
        w = self.workers.get(ident)
        if w is not None:
            w.last_seen = now
        else:
            c = self.clients.get(ident)
            if c is not None:
                c.last_seen = now
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise P.ProtocolError(f"{type(msg).__name__} is not for the broker")
        handler(self, ident, msg, payload)

    def tick(self, now: float) -> None:
        """Expire silent peers and heartbeat workers that heard nothing lately."""
        self.now = now
        cfg = self.config
        deadline = now - cfg.heartbeat_interval * cfg.liveness
        for w in [w for w in self.workers.values() if w.last_seen < deadline]:
            logger.warning(
                "worker %s (%s) missed its heartbeats; removing it", w.name, w.address
            )
            self.remove_worker(w.ident, planned=False)
        deadline = now - cfg.client_heartbeat_interval * cfg.client_liveness
        for c in [c for c in self.clients.values() if c.last_seen < deadline]:
            logger.warning(
                "client %s missed its heartbeats; releasing its tasks", c.name
            )
            self.remove_client(c.ident)
        quiet = now - cfg.heartbeat_interval
        for w in self.workers.values():
            if w.last_sent < quiet:
                self._send(w.ident, P.Heartbeat({}))
        self._steal()

    def _steal(self) -> None:
        """Idle threads and nothing ready: ask busy workers for tasks queued behind
        their running ones (dask's work stealing). A worker answers ``cancelled`` for
        a task it had not started, which puts it back in the ready queue; a task it
        had started just finishes there."""
        if self.ready:
            return
        idle = sum(
            max(0, w.nthreads - w.occupancy())
            for w in self.workers.values()
            if w.status == "running"
        )
        if not idle:
            return
        for w in self.workers.values():
            surplus = w.occupancy() - w.nthreads - len(w.stealing)
            if surplus <= 0:
                continue
            keys = [k for k in reversed(w.processing) if k not in w.stealing]
            keys = keys[: min(surplus, idle)]
            if keys:
                w.stealing.update(keys)
                idle -= len(keys)
                self._send(w.ident, P.CancelTasks(keys))
            if idle <= 0:
                return

    def flush(self) -> list[Out]:
        """Dispatch what can run, then return every message to send (and forget it)."""
        if self._dirty:
            self._dispatch()
        out = self._out
        self._out = []
        for ident, keys in self._free.items():
            if ident in self.workers:
                out.append((ident, P.FreeKeys(keys), []))
        self._free.clear()
        for ident, (tasks, frames) in self._run_batches.items():
            out.append((ident, P.RunTasks(tasks), frames.frames))
        self._run_batches.clear()
        for ident, (updates, frames) in self._updates.items():
            out.append((ident, P.TaskUpdates(updates), frames.frames))
        self._updates.clear()
        for ident, _, _ in out:
            w = self.workers.get(ident)
            if w is not None:
                w.last_sent = self.now
        return out

    # ==================================================================================
    # transitions: the one choke point

    def _transition(self, t: Task, new: TaskState, why: str = "") -> None:
        old = t.state
        if old is new:
            return
        if new not in old.allowed:  # type: ignore[attr-defined]
            raise IllegalTransition(f"{t.key}: {old.value} -> {new.value} ({why})")
        t.state = new
        active = new.active  # type: ignore[attr-defined]
        if active is not old.active:  # type: ignore[attr-defined]
            # A count, not a scan of the dependents on every release check: that
            # scan made a result shared by n tasks cost O(n^2).
            delta = 1 if active else -1
            tasks = self.tasks
            for d in t.deps:
                tasks[d].n_active += delta
        self.transitions.append((t.key, new.value, why))

    def story(self, key: str) -> list[tuple[str, str]]:
        return [(s, why) for k, s, why in self.transitions if k == key][-STORY_LENGTH:]

    # ==================================================================================
    # workers

    def _on_register_worker(
        self, ident: bytes, msg: P.RegisterWorker, payload: list[Any]
    ) -> None:
        _check_resources(msg.resources)
        old = self.workers.get(ident)
        if old is not None:
            # The same worker reconnecting (its identity is stable): what it still
            # holds stays valid, so it must not be declared lost and recomputed.
            kept = old.data.intersection(k for k in msg.keys if isinstance(k, str))
            old.data -= kept
            # Its pending gathers are asked again of the new session (below).
            gathers = self._gathers_by_worker.pop(ident, set())
            self.remove_worker(ident, planned=True)
            for key in kept:
                t = self.tasks.get(key)
                if t is not None:
                    t.who_has.add(ident)
        else:
            gathers = set()
        w = Worker(ident, msg, self.now)
        self.workers[ident] = w
        logger.info(
            "worker %s registered at %s with %d threads", w.name, w.address, w.nthreads
        )
        self._send(
            ident,
            P.Welcome(
                self.config.heartbeat_interval,
                self.config.liveness,
                self.versions,
                self.config.address,
            ),
        )
        unknown = []
        for key in msg.keys:
            t = self.tasks.get(key) if isinstance(key, str) else None
            if t is not None and t.state is TaskState.MEMORY:
                t.who_has.add(ident)
                w.data.add(key)
            else:
                unknown.append(key)
        if unknown:
            self._send(ident, P.FreeKeys(unknown))
        for req in sorted(gathers):
            pending = self._gathers.pop(req, None)
            if pending is not None and pending.client in self.clients:
                self._gather(
                    pending.client, pending.client_request, sorted(pending.remaining)
                )
        self._dirty = True

    def remove_worker(self, ident: bytes, planned: bool) -> None:
        w = self.workers.pop(ident, None)
        if w is None:
            return
        if not planned:
            self.counters["workers_lost"] += 1
        for key in list(w.processing):
            t = self.tasks.get(key)
            if t is None or t.processing_on != ident:
                continue  # already erred or released while we walked the list
            t.processing_on = None
            if not planned:
                t.suspicious += 1
                t.failed_on.append(w.address)
                if t.suspicious > self.config.allowed_failures:
                    exc = KilledWorker(key, w.address, t.failed_on)
                    self._fail(t, [pickle.dumps(exc)], f"KilledWorker: {exc}")
                    continue
            self._requeue(t, "worker left")
        for key in w.data:
            t = self.tasks.get(key)
            if t is None:
                continue
            t.who_has.discard(ident)
            if not t.who_has and t.inline is None and t.state is TaskState.MEMORY:
                self._lost(t)
        for req in self._gathers_by_worker.pop(ident, ()):
            pending = self._gathers.pop(req, None)
            if pending is not None and pending.client in self.clients:
                # Serve what is still held elsewhere; the rest is reported missing so
                # that the client's gather never waits for a dead worker.
                self._gather(
                    pending.client, pending.client_request, sorted(pending.remaining)
                )
        for req in self._runs_by_worker.pop(ident, ()):
            pending = self._runs.get(req)
            if pending is not None:
                pending.results.append([w.address, False, None])
                pending.remaining.discard(ident)
                self._finish_run(req)
        for entry in w.local_queue:
            t = self.tasks.get(entry[2])
            if t is not None and t.queued == entry[1]:
                self._push_ready(t)
        self._dirty = True

    def _on_heartbeat(self, ident: bytes, msg: P.Heartbeat, payload: list[Any]) -> None:
        w = self.workers.get(ident)
        if w is not None:
            w.metrics = msg.metrics
        elif ident in self.clients:
            self._send(
                ident, P.Heartbeat({})
            )  # lets the client see the broker is alive
        else:
            self._send(ident, P.Error(0, "unregistered"))

    def _on_worker_status(
        self, ident: bytes, msg: P.WorkerStatus, payload: list[Any]
    ) -> None:
        if msg.status not in _WORKER_STATUSES:
            raise P.ProtocolError(f"unknown worker status {msg.status!r}")
        w = self.workers.get(ident)
        if w is None:
            return
        if msg.status == "closed":
            self.remove_worker(ident, planned=True)
            return
        w.status = msg.status
        if msg.status == "retiring":
            self._hand_off(w)
        for key in msg.returned:
            t = self.tasks.get(key) if isinstance(key, str) else None
            if t is not None and t.processing_on == ident:
                w.processing.pop(key, None)
                w.seceded.discard(key)
                self._release_resources(w, t)
                t.processing_on = None
                self._requeue(t, "handed back")
        self._dirty = True

    def _hand_off(self, w: Worker) -> None:
        """Copy the retiring worker's still-needed results (held nowhere else) to the
        other workers; CloseWorker lets it go once none is left."""
        others = sorted(
            (o for o in self.workers.values() if o is not w and o.status == "running"),
            key=lambda o: len(o.data),
        )
        batches: dict[bytes, list[list[str]]] = {}
        for i, key in enumerate(sorted(w.data)):
            t = self.tasks.get(key)
            if (
                others
                and t is not None
                and t.who_has == {w.ident}
                and t.inline is None
                and self._needed(t)
            ):
                target = others[i % len(others)]
                batches.setdefault(target.ident, []).append([key, w.address])
                w.handoff.add(key)
        for ident, keys in batches.items():
            self._send(ident, P.Replicate(keys))
        if not w.handoff:
            self._send(w.ident, P.CloseWorker())

    def _handed_off(self, t: Task) -> None:
        for ident in list(t.who_has):
            w = self.workers.get(ident)
            if w is not None and t.key in w.handoff:
                w.handoff.discard(t.key)
                if not w.handoff:
                    self._send(w.ident, P.CloseWorker())

    def _on_task_seceded(
        self, ident: bytes, msg: P.TaskSeceded, payload: list[Any]
    ) -> None:
        w = self.workers.get(ident)
        if w is not None and msg.key in w.processing:
            w.seceded.add(msg.key)
            self._dirty = True

    def _on_task_results(
        self, ident: bytes, msg: P.TaskResults, payload: list[Any]
    ) -> None:
        w = self.workers.get(ident)
        if w is None:
            self._send(ident, P.Error(0, "unregistered"))
            return
        # Check the whole batch first: a malformed entry must not leave earlier ones
        # applied, nor a task popped from its worker but never settled.
        frames_of = [_check_result(entry, payload) for entry in msg.results]
        for entry, frames in zip(msg.results, frames_of, strict=True):
            key, status, nbytes, typename, _ref, text, duration = entry
            t = self.tasks.get(key)
            if key in w.zombies and (t is None or t.processing_on != ident):
                w.zombies.discard(key)  # a cancelled task's thread is free again
            stolen = key in w.stealing
            w.stealing.discard(key)
            if status == "cancelled":
                if stolen and t is not None and t.processing_on == ident:
                    w.processing.pop(key, None)
                    self._release_resources(w, t)
                    t.processing_on = None
                    self._requeue(t, "stolen")
                continue
            if t is None or t.processing_on != ident:
                if status == "memory":
                    if t is not None and t.state is TaskState.MEMORY:
                        t.who_has.add(ident)
                        w.data.add(key)
                        self._handed_off(t)
                    else:
                        self._free_key(ident, key)
                continue
            w.processing.pop(key, None)
            w.seceded.discard(key)
            self._release_resources(w, t)
            t.processing_on = None
            if duration >= 0:
                w.avg_duration = (
                    duration
                    if w.avg_duration == 0
                    else 0.8 * w.avg_duration + 0.2 * duration
                )
            if status == "memory":
                self.monitor.finished(key, t.group, w.name, duration, self.wall)
                self._task_finished(t, w, nbytes, typename, frames)
            elif status == "error":
                assert frames is not None
                if t.retries > 0:
                    t.retries -= 1
                    self._requeue(t, "retry")
                else:
                    self.monitor.erred(key, t.group, w.name, duration, text, self.wall)
                    self._fail(t, frames, str(text))
            elif status == "missing":
                holder = self.tasks.get(text)
                if holder is not None:
                    for other in list(holder.who_has):
                        ow = self.workers.get(other)
                        if ow is None or ow.address == typename:
                            holder.who_has.discard(other)
                            if ow is not None:
                                ow.data.discard(holder.key)
                    if (
                        not holder.who_has
                        and holder.inline is None
                        and holder.state is TaskState.MEMORY
                    ):
                        self._lost(holder)
                self._requeue(t, f"missing dependency {text}")
        self._dirty = True

    def _task_finished(
        self, t: Task, w: Worker, nbytes: int, typename: str, inline: list[Any] | None
    ) -> None:
        self._transition(t, TaskState.MEMORY, w.name)
        self.counters["tasks_done"] += 1
        t.who_has.add(w.ident)
        w.data.add(t.key)
        t.nbytes = nbytes
        t.typename = typename
        t.inline = inline
        for c in t.wanted_by:
            self._update(c, t.key, "finished", inline, "")
        t.wanted_by.discard(FIRE_AND_FORGET)
        graph = self.graph
        for d in graph.dependents(t.key):
            dt = self.tasks[d]
            if dt.state is TaskState.WAITING:
                dt.waiting_on -= 1
                if dt.waiting_on == 0:
                    self._transition(dt, TaskState.READY, "deps done")
                    self._push_ready(dt)
        for dep in t.deps:
            self._maybe_release(self.tasks[dep])
        self._maybe_release(t)

    def _fail(self, t: Task, frames: list[Any], text: str) -> None:
        """Err ``t`` and, transitively, everything waiting on it."""
        stack = [t]
        orphans = []
        while stack:
            t = stack.pop()
            if t.state is TaskState.ERRED:
                continue
            if t.processing_on is not None:
                w = self.workers.get(t.processing_on)
                if w is not None:
                    w.processing.pop(t.key, None)
                    w.seceded.discard(t.key)
                    self._release_resources(w, t)
                    self._send(w.ident, P.CancelTasks([t.key]))
                    w.zombies.add(t.key)
                    self._dirty = True
                t.processing_on = None
            self._transition(t, TaskState.ERRED, text[:200])
            self.counters["tasks_erred"] += 1
            t.error = (frames, text)
            t.queued = 0
            for c in t.wanted_by:
                self._update(c, t.key, "error", frames, text)
            if FIRE_AND_FORGET in t.wanted_by:
                t.wanted_by.discard(FIRE_AND_FORGET)
                logger.warning("fire-and-forget task %s failed: %s", t.key, text)
                orphans.append(t)
            for d in self.graph.dependents(t.key):
                dt = self.tasks[d]
                if dt.state is not TaskState.MEMORY:
                    stack.append(dt)
        # Nobody will ever release a failed fire-and-forget task: forget it now.
        for t in orphans:
            self._maybe_release(t)

    def _lost(self, t: Task) -> None:
        """The only copy of ``t``'s result is gone: recompute it if anyone needs it."""
        t.inline = None
        t.who_has.clear()
        # Dependents first: once released, ``t`` may be forgotten (and leave the graph).
        for d in self.graph.dependents(t.key):
            dt = self.tasks[d]
            if dt.state is TaskState.WAITING:
                dt.waiting_on += 1
            elif dt.state is TaskState.READY:
                dt.waiting_on += 1
                dt.queued = 0
                self._transition(dt, TaskState.WAITING, f"lost dependency {t.key}")
        # Through RELEASED, so that _recompute can fail it if a dependency has erred.
        self._transition(t, TaskState.RELEASED, "result lost")
        if self._needed(t):
            self._recompute(t, "result lost")
        else:
            self._maybe_forget(t)

    def _recompute(self, t: Task, why: str) -> None:
        """Bring released ``t`` back into the schedule, with any released dependencies
        it needs, without recursion (chains can be long)."""
        stack = [t]
        while stack:
            t = stack.pop()
            if t.state is not TaskState.RELEASED:
                continue  # already scheduled, or erred (its dependents erred with it)
            deps = [self.tasks[d] for d in t.deps]
            erred = next((d for d in deps if d.state is TaskState.ERRED), None)
            if erred is not None:
                # A dependency was recomputed since and failed: so does this task.
                assert erred.error is not None
                self._fail(t, *erred.error)
                continue
            missing = [d for d in deps if d.state is not TaskState.MEMORY]
            t.waiting_on = len(missing)
            if missing:
                self._transition(t, TaskState.WAITING, why)
                stack.extend(missing)
            else:
                self._transition(t, TaskState.READY, why)
                self._push_ready(t)

    def _requeue(self, t: Task, why: str) -> None:
        """A task taken back from a worker: ready again, or waiting for lost deps."""
        deps = [self.tasks[d] for d in t.deps]
        erred = next((d for d in deps if d.state is TaskState.ERRED), None)
        if erred is not None:
            assert erred.error is not None
            self._fail(t, *erred.error)
            return
        missing = [d for d in deps if d.state is not TaskState.MEMORY]
        if missing:
            t.waiting_on = len(missing)
            self._transition(t, TaskState.WAITING, why)
            for d in missing:
                self._recompute(d, f"needed by {t.key}")
        else:
            self._transition(t, TaskState.READY, why)
            self._push_ready(t)

    # ==================================================================================
    # scheduling

    def _push_ready(self, t: Task) -> None:
        gen = next(self._gen)
        t.queued = gen
        entry = (t.priority, gen, t.key)
        target = self._preferred_worker(t)
        if target is not None:
            heapq.heappush(target.local_queue, entry)
        else:
            heapq.heappush(self.ready, entry)
        self._dirty = True

    def _preferred_worker(self, t: Task) -> Worker | None:
        if not t.deps:
            return None
        best: dict[bytes, int] = {}
        for d in t.deps:
            dt = self.tasks[d]
            if dt.nbytes >= LOCALITY_BYTES and dt.inline is None:
                for ident in dt.who_has:
                    best[ident] = best.get(ident, 0) + dt.nbytes
        if not best:
            return None
        ident = max(best, key=best.__getitem__)
        w = self.workers.get(ident)
        if w is None or not self._can_run(t, w):
            return None
        return w

    def _can_run(self, t: Task, w: Worker) -> bool:
        if t.restrict is not None:
            names, loose = t.restrict
            if (
                not loose
                and w.name not in names
                and w.address not in names
                and w.host not in names
            ):
                return False
        if t.resources:
            for r, need in t.resources.items():
                if w.avail.get(r, 0) < need:
                    return False
        return True

    def _dispatch(self) -> None:
        self._dirty = False
        # Least-occupied worker first (per thread), one task at a time, so an idle
        # worker gets work before a busy one's pipeline grows, and a burst of short
        # tasks spreads evenly.
        heap = [
            (w.occupancy() / w.nthreads, i, w)
            for i, w in enumerate(self.workers.values())
            if w.free_slots() > 0
        ]
        heapq.heapify(heap)
        while heap:
            _, i, w = heapq.heappop(heap)
            t = self._next_task_for(w)
            if t is None:
                continue
            self._assign(t, w)
            if w.free_slots() > 0:
                heapq.heappush(heap, (w.occupancy() / w.nthreads, i, w))

    def _next_task_for(self, w: Worker) -> Task | None:
        tasks = self.tasks
        for heap in (w.local_queue, self.ready):
            skipped = []
            found = None
            while heap:
                entry = heapq.heappop(heap)
                t = tasks.get(entry[2])
                if t is None or t.queued != entry[1] or t.state is not TaskState.READY:
                    continue  # stale entry
                if self._can_run(t, w):
                    found = t
                    break
                skipped.append(entry)
                if len(skipped) > 64:
                    break
            for entry in skipped:
                heapq.heappush(heap, entry)
            if found is not None:
                return found
        # Steal from a worker whose own queue holds more than it can start.
        for other in self.workers.values():
            if other is w or len(other.local_queue) <= max(other.free_slots(), 0):
                continue
            entry = other.local_queue[-1]
            t = tasks.get(entry[2])
            if t is not None and t.queued == entry[1] and self._can_run(t, w):
                other.local_queue.pop()
                heapq.heapify(other.local_queue)
                return t
        return None

    def _assign(self, t: Task, w: Worker) -> None:
        self._transition(t, TaskState.PROCESSING, w.name)
        w.zombies.discard(t.key)
        t.queued = 0
        t.processing_on = w.ident
        w.processing[t.key] = None
        if t.resources:
            for r, need in t.resources.items():
                w.avail[r] = w.avail.get(r, 0) - need
        batch = self._run_batches.get(w.ident)
        if batch is None:
            batch = self._run_batches[w.ident] = ([], P.FrameList())
        entries, frames = batch
        deps: list[list[Any]] = []
        for d in t.deps:
            dt = self.tasks[d]
            if w.ident in dt.who_has:
                deps.append([d, ""])
            elif dt.inline is not None:
                deps.append([d, frames.add(dt.inline, share=True)])
            else:
                holder = self.workers[next(iter(dt.who_has))]
                deps.append([d, holder.address])
        fn_ref = None if t.fn is None else frames.add(t.fn, share=True)
        entries.append([t.key, fn_ref, frames.add(t.args), deps, t.resources])

    def _release_resources(self, w: Worker, t: Task) -> None:
        if t.resources:
            for r, need in t.resources.items():
                w.avail[r] = w.avail.get(r, 0) + need

    # ==================================================================================
    # releasing and forgetting

    def _needed(self, t: Task) -> bool:
        return bool(t.wanted_by) or t.n_active > 0

    def _maybe_release(self, t: Task) -> None:
        """Free ``t``'s result / stop it if nothing needs it; forget it if possible.
        Its dependencies are then looked at the same way, so releasing the last future
        of a graph stops and forgets the rest of it (no recursion: chains are long).
        """
        tasks = self.tasks
        stack = [t]
        while stack:
            t = stack.pop()
            if tasks.get(t.key) is not t or self._needed(t):
                continue
            released = True
            if t.state is TaskState.MEMORY:
                for ident in t.who_has:
                    w = self.workers.get(ident)
                    if w is not None:
                        w.data.discard(t.key)
                        self._free_key(ident, t.key)
                t.who_has.clear()
                t.inline = None
                self._transition(t, TaskState.RELEASED, "not needed")
            elif t.state in (TaskState.WAITING, TaskState.READY):
                t.queued = 0
                self._transition(t, TaskState.RELEASED, "not needed")
            elif t.state is TaskState.PROCESSING:
                w = self.workers.get(t.processing_on or b"")
                if w is not None:
                    w.processing.pop(t.key, None)
                    w.seceded.discard(t.key)
                    self._release_resources(w, t)
                    self._send(w.ident, P.CancelTasks([t.key]))
                    w.zombies.add(t.key)
                    self._dirty = True
                t.processing_on = None
                self._transition(t, TaskState.RELEASED, "not needed")
            else:
                released = False
            forget = not t.wanted_by and not self.graph.n_dependents(t.key)
            if forget:
                del tasks[t.key]
                self.graph.remove(t.key)
                t.queued = 0
            if forget or released:
                stack.extend(tasks[d] for d in t.deps if d in tasks)

    def _maybe_forget(self, t: Task) -> None:
        """Forget ``t`` if it is released or erred and nothing refers to it."""
        if t.state in (TaskState.RELEASED, TaskState.ERRED):
            self._maybe_release(t)

    # ==================================================================================
    # clients

    def _on_register_client(
        self, ident: bytes, msg: P.RegisterClient, payload: list[Any]
    ) -> None:
        old = self.clients.get(ident)
        c = self.clients[ident] = ClientRec(ident, msg.name, msg.versions, self.now)
        if old is not None:
            # The same client registering again: the tasks still name it in
            # ``wanted_by``, so it must keep wanting them (or they never get released).
            c.wants = old.wants
        self._send(
            ident,
            P.Welcome(
                self.config.client_heartbeat_interval,
                self.config.client_liveness,
                self.versions,
                self.config.address,
            ),
        )

    def _client(self, ident: bytes) -> ClientRec | None:
        c = self.clients.get(ident)
        if c is None:
            self._send(ident, P.Error(0, "unregistered"))
        return c

    def _on_submit(self, ident: bytes, msg: P.Submit, payload: list[Any]) -> None:
        c = self._client(ident)
        if c is None:
            return
        tasks = self.tasks
        new: dict[str, tuple[Any, ...]] = {}
        frames_cache: dict[tuple[int, int], list[Any]] = {}

        def frames_for(ref: Any) -> list[Any]:
            # One list per distinct ref, so that tasks sharing a function frame share
            # it in RunTasks too (FrameList.add(share=True)).
            # Types first: (True, 1) == (1, 1) would hit another ref's cache entry.
            if (
                type(ref) is not list
                or len(ref) != 2
                or type(ref[0]) is not int
                or type(ref[1]) is not int
            ):
                raise P.ProtocolError(f"bad frame reference {ref!r}")
            k = (ref[0], ref[1])
            got = frames_cache.get(k)
            if got is None:
                got = frames_cache[k] = P.ref_frames(payload, ref)
            return got

        # Parse and check the whole batch before changing anything: a bad graph is
        # rejected as a whole and nothing of it runs.
        forward_ref = False
        for entry in msg.tasks:
            if not isinstance(entry, list) or len(entry) != 9:
                raise P.ProtocolError("malformed task entry")
            key, fn_ref, args_ref, deps, prio, retries, resources, workers, loose = (
                entry
            )
            if not isinstance(key, str) or not isinstance(deps, list):
                raise P.ProtocolError("malformed task entry")
            for d in deps:
                if type(d) is not str:
                    raise P.ProtocolError("dependency keys must be strings")
            if not _is_number(prio) or type(retries) is not int:
                raise P.ProtocolError(f"malformed priority or retries for {key!r}")
            if resources is not None:
                _check_resources(resources)
            if workers is not None and not (
                isinstance(workers, list) and all(isinstance(x, str) for x in workers)
            ):
                raise P.ProtocolError(f"malformed worker restriction for {key!r}")
            if not isinstance(loose, bool):
                raise P.ProtocolError(f"malformed allow_other_workers for {key!r}")
            fn = None if fn_ref is None else frames_for(fn_ref)
            args = frames_for(args_ref)
            if key in tasks or key in new:
                continue  # pure dedup: the first definition wins
            # A key named twice (an argument used twice) is one dependency: counted
            # twice it would keep the task waiting forever.
            if len(deps) > 1:
                deps = list(dict.fromkeys(deps))
            for d in deps:
                if d not in tasks and d not in new:
                    forward_ref = True
            new[key] = (
                fn,
                args,
                tuple(deps),
                int(prio),
                retries,
                resources,
                workers,
                loose,
            )
        problem = None
        if forward_ref:
            dangling = sorted(
                {
                    d
                    for v in new.values()
                    for d in v[2]
                    if d not in tasks and d not in new
                }
            )
            if dangling:
                problem = (
                    f"the graph refers to {len(dangling)} key(s) that it does not "
                    f"define and the broker does not hold: {', '.join(dangling[:5])}"
                )
            else:
                cycle = find_cycle(
                    (d, k) for k, v in new.items() for d in v[2] if d in new
                )
                if cycle:
                    problem = (
                        f"the graph has a cycle: {' -> '.join([*cycle, cycle[0]])}"
                    )
        if not all(isinstance(w, str) for w in msg.wants):
            raise P.ProtocolError("wanted keys must be strings")
        if problem is None:
            for w in msg.wants:
                if w not in tasks and w not in new:
                    problem = (
                        f"key {w!r} is not defined by the graph nor held by the broker"
                    )
                    break
        if problem is not None:
            err = [pickle.dumps(GraphError(problem))]
            for w in dict.fromkeys(msg.wants):
                self._update(ident, w, "error", err, f"GraphError: {problem}")
            return
        # Insert in dependency order: Kahn over the new keys (the usual case, already
        # ordered, is one pass).
        order = _dependency_order(new) if forward_ref else list(new)
        seq = next(self._seq)
        graph = self.graph
        for i, key in enumerate(order):
            fn, args, deps, prio, retries, resources, workers, loose = new[key]
            restrict = None
            if workers:
                restrict = (set(workers), loose)
            t = Task(key, fn, args, deps, (-prio, seq, i), retries, resources, restrict)
            tasks[key] = t
            graph.add(key, deps)
            t.group = self.monitor.submitted(key)
        for key in msg.wants:
            t = tasks[key]
            t.wanted_by.add(ident)
            c.wants.add(key)
        for key in order:
            t = tasks[key]
            if t.state is TaskState.RELEASED:
                self._schedule_new(t)
        for key in dict.fromkeys(msg.wants):
            if key in new:
                continue  # told by _task_finished / _fail like every new task
            t = tasks[key]
            if t.state is TaskState.MEMORY:
                self._update(ident, key, "finished", t.inline, "")
            elif t.state is TaskState.ERRED:
                assert t.error is not None
                self._update(ident, key, "error", t.error[0], t.error[1])
            elif t.state is TaskState.RELEASED:
                self._recompute(t, "wanted again")
        for key in order:
            nt = tasks.get(key)
            if nt is not None:
                self._maybe_forget(nt)

    def _schedule_new(self, t: Task) -> None:
        tasks = self.tasks
        deps = [tasks[d] for d in t.deps]
        erred = next((d for d in deps if d.state is TaskState.ERRED), None)
        if erred is not None:
            # Before recomputing any released dependency: nothing of it would be used.
            assert erred.error is not None
            self._fail(t, *erred.error)
            return
        waiting = 0
        for dt in deps:
            if dt.state is not TaskState.MEMORY:
                waiting += 1
                if dt.state is TaskState.RELEASED:
                    self._recompute(dt, f"needed by {t.key}")
        if t.state is TaskState.ERRED:
            return  # a recomputed dependency failed at once (its own dependency erred)
        t.waiting_on = waiting
        if waiting:
            self._transition(t, TaskState.WAITING, "submitted")
        else:
            self._transition(t, TaskState.READY, "submitted")
            self._push_ready(t)

    def _on_release_keys(
        self, ident: bytes, msg: P.ReleaseKeys, payload: list[Any]
    ) -> None:
        c = self.clients.get(ident)
        if c is None:
            return
        for key in msg.keys:
            if not isinstance(key, str):
                continue
            c.wants.discard(key)
            t = self.tasks.get(key)
            if t is not None:
                t.wanted_by.discard(ident)
                self._maybe_release(t)

    def _on_cancel(self, ident: bytes, msg: P.Cancel, payload: list[Any]) -> None:
        c = self._client(ident)
        if c is None:
            return
        seen: set[str] = set()
        asked = {k for k in msg.keys if isinstance(k, str)}
        stack = list(asked)
        while stack:
            key = stack.pop()
            t = self.tasks.get(key)
            if t is None or key in seen:
                continue
            seen.add(key)
            if key in asked and not msg.force and t.wanted_by - {ident}:
                # Others still want it (dask's force=False): only this client's
                # future is cancelled; the task and its dependents go on.
                clients = [ident]
            elif key not in asked and t.state in FINAL_STATES:
                continue
            else:
                clients = list(t.wanted_by)  # it will not run: cancelled for everyone
                stack.extend(self.graph.dependents(key))
            for cid in clients:
                self._update(cid, key, "cancelled", None, "cancelled")
                t.wanted_by.discard(cid)
                rec = self.clients.get(cid)
                if rec is not None:
                    rec.wants.discard(key)
        for key in seen:
            t = self.tasks.get(key)
            if t is not None:
                self._maybe_release(t)

    def _on_fire_and_forget(
        self, ident: bytes, msg: P.FireAndForget, payload: list[Any]
    ) -> None:
        if self._client(ident) is None:
            return
        for key in msg.keys:
            t = self.tasks.get(key) if isinstance(key, str) else None
            if t is not None and t.state not in FINAL_STATES:
                t.wanted_by.add(FIRE_AND_FORGET)

    def remove_client(self, ident: bytes) -> None:
        c = self.clients.pop(ident, None)
        if c is None:
            return
        for key in c.wants:
            t = self.tasks.get(key)
            if t is not None:
                t.wanted_by.discard(ident)
                self._maybe_release(t)
        self._updates.pop(ident, None)

    def _on_client_close(
        self, ident: bytes, msg: P.ClientClose, payload: list[Any]
    ) -> None:
        self.remove_client(ident)

    # --- gather -----------------------------------------------------------------------

    def _on_gather(self, ident: bytes, msg: P.Gather, payload: list[Any]) -> None:
        if self._client(ident) is None:
            return
        self._gather(ident, msg.request_id, msg.keys, reply_empty=True)

    def _gather(
        self, client: bytes, request_id: int, keys: list[Any], reply_empty: bool = False
    ) -> None:
        """Answer inline values and missing keys now; ask holders for the rest (their
        replies reach the client as further DataReply parts of the same request)."""
        values: list[Any] = []
        frames = P.FrameList()
        missing: list[Any] = []
        by_worker: dict[bytes, list[str]] = {}
        for key in keys:
            t = self.tasks.get(key) if isinstance(key, str) else None
            if t is None or t.state is not TaskState.MEMORY:
                missing.append(key)
            elif t.inline is not None:
                values.append([key, frames.add(t.inline)])
            else:
                holders = [self.workers[i] for i in t.who_has if i in self.workers]
                if not holders:
                    missing.append(key)
                    continue
                holder = min(holders, key=lambda w: len(w.processing)).ident
                by_worker.setdefault(holder, []).append(key)
        if values or missing or (reply_empty and not by_worker):
            self._out.append(
                (client, P.DataReply(request_id, values, missing), frames.frames)
            )
        for holder, held in by_worker.items():
            req = next(self._req)
            self._gathers[req] = _Pending(client, request_id, set(held), holder)
            self._gathers_by_worker.setdefault(holder, set()).add(req)
            self._send(holder, P.SendData(req, held))

    def _on_data_reply(
        self, ident: bytes, msg: P.DataReply, payload: list[Any]
    ) -> None:
        pending = self._gathers.get(msg.request_id)
        if pending is None or pending.worker != ident:
            return  # not a request of ours to this peer
        del self._gathers[msg.request_id]
        self._gathers_by_worker.get(ident, set()).discard(msg.request_id)
        if pending.client not in self.clients:
            return
        self._out.append(
            (
                pending.client,
                P.DataReply(pending.client_request, msg.values, msg.missing),
                payload,
            )
        )

    # --- run on workers ---------------------------------------------------------------

    def _on_run_on_workers(
        self, ident: bytes, msg: P.RunOnWorkers, payload: list[Any]
    ) -> None:
        if self._client(ident) is None:
            return
        targets = [
            w
            for w in self.workers.values()
            if not msg.workers or w.address in msg.workers or w.name in msg.workers
        ]
        req = next(self._req)
        pending = self._runs[req] = _Pending(
            ident, msg.request_id, {w.ident for w in targets}
        )
        for w in targets:
            self._runs_by_worker.setdefault(w.ident, set()).add(req)
            self._send(w.ident, P.RunFunction(req), payload)
        self._finish_run(req)
        del pending

    def _on_function_result(
        self, ident: bytes, msg: P.FunctionResult, payload: list[Any]
    ) -> None:
        pending = self._runs.get(msg.request_id)
        w = self.workers.get(ident)
        if pending is None or w is None or ident not in pending.remaining:
            return
        pending.remaining.discard(ident)
        self._runs_by_worker.get(ident, set()).discard(msg.request_id)
        pending.results.append([w.address, msg.ok, payload])
        self._finish_run(msg.request_id)

    def _finish_run(self, req: int) -> None:
        pending = self._runs[req]
        if pending.remaining:
            return
        del self._runs[req]
        frames = P.FrameList()
        results = []
        for address, ok, value in pending.results:
            if value is None:
                results.append([address, False, None])
            else:
                results.append([address, ok, frames.add(value) if value else None])
        self._out.append(
            (pending.client, P.RunReply(pending.client_request, results), frames.frames)
        )

    # --- information ------------------------------------------------------------------

    def _on_info_request(
        self, ident: bytes, msg: P.InfoRequest, payload: list[Any]
    ) -> None:
        if self._client(ident) is None:
            return
        self._out.append((ident, P.InfoReply(msg.request_id, self.info(msg.what)), []))

    def info(self, what: str = "scheduler_info") -> dict[str, Any]:
        workers = {}
        for w in self.workers.values():
            workers[w.address] = {
                "name": w.name,
                "host": w.host,
                "nthreads": w.nthreads,
                "memory_limit": w.memory_limit,
                "resources": w.resources,
                "local_directory": w.local_directory,
                "pid": w.pid,
                "status": w.status,
                "processing": len(w.processing),
                "in_memory": len(w.data),
                "last_seen": w.last_seen,
                "metrics": w.metrics,
                "versions": w.versions,
            }
        if what == "task_stream":
            return {"stream": self.monitor.task_stream()}
        if what == "logs":
            return {"logs": self.log_lines()}
        counts: dict[str, int] = {}
        for t in self.tasks.values():
            counts[t.state.value] = counts.get(t.state.value, 0) + 1
        info = {
            "type": "Scheduler",
            "id": "zdist-broker",
            "address": self.config.address,
            "workers": workers,
            "tasks": counts,
            "n_clients": len(self.clients),
            "counters": dict(self.counters),
            "versions": self.versions,
            "dashboard": self.dashboard,
        }
        if what == "status":  # the dashboard's and `zdist status`'s view
            info["time"] = self.wall
            info["groups"] = self.monitor.group_progress()
            info["task_stream"] = self.monitor.task_stream(since=self.wall - 300)
            info["errors"] = list(self.monitor.errors)
        return info

    # ==================================================================================
    # output helpers

    def _send(
        self, ident: bytes, msg: P.Message, payload: list[Any] | None = None
    ) -> None:
        self._out.append((ident, msg, payload or []))

    def _free_key(self, ident: bytes, key: str) -> None:
        """Tell a worker to drop a result; batched per worker until flush()."""
        self._free.setdefault(ident, []).append(key)

    def _update(
        self, client: bytes, key: str, status: str, frames: list[Any] | None, text: str
    ) -> None:
        if client not in self.clients:
            return
        batch = self._updates.get(client)
        if batch is None:
            batch = self._updates[client] = ([], P.FrameList())
        updates, fl = batch
        updates.append([key, status, None if frames is None else fl.add(frames), text])

    _handlers: dict[type, Any] = {}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_resources(resources: Any) -> None:
    """Resources are ``{name: amount}``; anything else would break dispatch later."""
    if not isinstance(resources, dict) or not all(
        isinstance(k, str) and _is_number(v) and v >= 0 for k, v in resources.items()
    ):
        raise P.ProtocolError(f"malformed resources {resources!r}")


def _check_result(entry: Any, payload: list[Any]) -> list[Any] | None:
    """Validate one TaskResults entry; return the frames its ref names (or None)."""
    if not isinstance(entry, list) or len(entry) != 7:
        raise P.ProtocolError("malformed task result entry")
    key, status, nbytes, typename, ref, text, duration = entry
    if (
        not isinstance(key, str)
        or not isinstance(typename, str)
        or not isinstance(text, str)
        or type(nbytes) is not int
        or not _is_number(duration)
    ):
        raise P.ProtocolError(f"malformed task result entry for {key!r}")
    if status == "memory":
        return None if ref is None else P.ref_frames(payload, ref)
    if status == "error":
        return P.ref_frames(payload, ref)
    if status in ("missing", "cancelled"):
        return None
    raise P.ProtocolError(f"unknown task status {status!r}")


def _dependency_order(new: dict[str, tuple[Any, ...]]) -> list[str]:
    indegree = {k: 0 for k in new}
    dependents: dict[str, list[str]] = {}
    for k, v in new.items():
        for d in v[2]:
            if d in new:
                indegree[k] += 1
                dependents.setdefault(d, []).append(k)
    order = [k for k, n in indegree.items() if n == 0]
    for k in order:  # grows while iterating
        for dk in dependents.get(k, ()):
            indegree[dk] -= 1
            if indegree[dk] == 0:
                order.append(dk)
    return order


BrokerState._handlers = {
    P.RegisterWorker: BrokerState._on_register_worker,
    P.Heartbeat: BrokerState._on_heartbeat,
    P.WorkerStatus: BrokerState._on_worker_status,
    P.TaskSeceded: BrokerState._on_task_seceded,
    P.TaskResults: BrokerState._on_task_results,
    P.DataReply: BrokerState._on_data_reply,
    P.FunctionResult: BrokerState._on_function_result,
    P.RegisterClient: BrokerState._on_register_client,
    P.Submit: BrokerState._on_submit,
    P.ReleaseKeys: BrokerState._on_release_keys,
    P.Cancel: BrokerState._on_cancel,
    P.ClientClose: BrokerState._on_client_close,
    P.Gather: BrokerState._on_gather,
    P.RunOnWorkers: BrokerState._on_run_on_workers,
    P.InfoRequest: BrokerState._on_info_request,
    P.FireAndForget: BrokerState._on_fire_and_forget,
}


def iter_keys(values: Iterable[Any]) -> list[str]:
    return [v for v in values if isinstance(v, str)]

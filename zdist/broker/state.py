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

import itertools
import logging
from collections import deque
from typing import Any

from zdist import protocol as P
from zdist.broker.clients import ClientSide
from zdist.broker.dispatch import Dispatch
from zdist.broker.graph import TaskGraph
from zdist.broker.monitor import Monitor
from zdist.broker.records import (  # re-exported: the state's vocabulary
    _ACTIVE,
    _TRANSITIONS,
    FINAL_STATES,
    FIRE_AND_FORGET,
    LOCALITY_BYTES,
    MAX_EXTRA_PER_THREAD,
    PIPELINE_SECONDS,
    STORY_LENGTH,
    TRANSITION_LOG_LENGTH,
    BrokerConfig,
    ClientRec,
    IllegalTransition,
    Out,
    Task,
    TaskState,
    Worker,
    _check_result,
    _Pending,
)
from zdist.broker.workers import WorkerSide

logger = logging.getLogger(__name__)

#: Keys freed on a worker whose results were small (the broker kept a copy) wait,
#: per worker, until this many are pending or the oldest is FREE_DELAY seconds old,
#: or a RunTasks goes there anyway: a loop of submit(...).result() would otherwise
#: wake the worker with a FreeKeys per round trip, in the middle of the next one.
#: A large result's key goes at once (its memory matters).
FREE_BATCH = 256
FREE_DELAY = 0.05

__all__ = [
    "FINAL_STATES",
    "FIRE_AND_FORGET",
    "LOCALITY_BYTES",
    "MAX_EXTRA_PER_THREAD",
    "PIPELINE_SECONDS",
    "STORY_LENGTH",
    "TRANSITION_LOG_LENGTH",
    "_ACTIVE",
    "_TRANSITIONS",
    "BrokerConfig",
    "BrokerState",
    "ClientRec",
    "IllegalTransition",
    "Out",
    "Task",
    "TaskState",
    "Worker",
]


class _Frees:
    """Keys a worker is to drop, waiting to go (BrokerState._free_key)."""

    __slots__ = ("keys", "since", "urgent")

    def __init__(self, since: float) -> None:
        self.keys: list[str] = []
        self.since = since  # when the first was queued
        self.urgent = False  # a large result among them: they go at once


class _Early:
    """A door run's report that came before its client's Submit (BrokerState._early)."""

    __slots__ = ("entry", "frames", "run", "told", "when", "worker")

    def __init__(
        self,
        worker: bytes,
        entry: list[Any],
        frames: Any,
        run: int,
        told: bool,
        when: float,
    ) -> None:
        self.worker = worker
        self.entry = entry
        self.frames = frames
        self.run = run
        self.told = told  # its result went to the client
        self.when = when


class BrokerState(ClientSide, WorkerSide, Dispatch):
    """Scheduling state: tasks, workers, clients; see the module docstring."""

    def __init__(self, config: BrokerConfig, versions: dict[str, Any]) -> None:
        self.config = config
        self.versions = versions
        self.tasks: dict[str, Task] = {}
        self.graph = TaskGraph()
        self.workers: dict[bytes, Worker] = {}
        self.clients: dict[bytes, ClientRec] = {}
        self.ready: list[tuple[Any, ...]] = []  # global heap of (priority, gen, key)
        self.unrunnable: dict[str, tuple[Any, ...]] = {}  # parked ready-queue entries
        # Workers seen with nothing to do (a heap by registration order, checked again
        # before use), and those that may hold a local queue: with many workers,
        # dispatching one task must not visit all of them (see _dispatch).
        self._idle: list[tuple[int, Worker]] = []
        self._idle_set: set[Worker] = set()
        self._queued_on: set[Worker] = set()
        self._worker_order = itertools.count()
        self._insertions: deque[Any] = deque()  # large submissions going in by slices
        self._deferred: deque[tuple[bytes, P.Message, list[Any]]] = deque()
        self._gen = itertools.count(1)
        self._seq = itertools.count()
        self._req = itertools.count(1)
        self._gathers: dict[int, _Pending] = {}
        self._gathers_by_worker: dict[bytes, set[int]] = {}
        self._runs: dict[int, _Pending] = {}
        self._runs_by_worker: dict[bytes, set[int]] = {}
        self._out: list[Out] = []
        self._info_pending: list[tuple[bytes, int, str]] = []
        self._run_batches: dict[bytes, tuple[list[Any], P.FrameList]] = {}
        # worker -> client -> [key, run] whose results the worker sends the client.
        self._run_direct: dict[bytes, dict[bytes, list[list[Any]]]] = {}
        self._direct_runs = itertools.count(1)
        # Reports of tasks that clients sent workers themselves (TaskResults.door)
        # that came before the client's Submit did: key -> [_Early, ...]. Settled
        # when a Submit of the key comes (applied if it names that worker and run).
        self._early: dict[str, list[_Early]] = {}
        self._updates: dict[bytes, tuple[list[Any], P.FrameList]] = {}
        self._free: dict[bytes, _Frees] = {}
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
        if self._insertions and type(msg) in _AFTER_INSERTION:
            # A client's later messages may name keys of the submission still being
            # inserted: keep their order by applying them once it is in.
            self._deferred.append((ident, msg, payload))
            return
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
        if self._early and not self._insertions and not self._deferred:
            # (A Submit held back behind a large insertion may still come.)
            self._expire_early(deadline)
        quiet = now - cfg.heartbeat_interval
        for w in self.workers.values():
            if w.last_sent < quiet:
                self._send(w.ident, P.Heartbeat({}))
        self._steal()

    def flush(self, now: float | None = None) -> list[Out]:
        """Dispatch what can run, then return every message to send (and forget it).
        ``now``: the time, if later than the last input's (frees fall due)."""
        if now is not None:
            self.now = now
        if self._dirty:
            self._dispatch()
        if self._info_pending:
            for ident, req, what in self._info_pending:
                self._out.append((ident, P.InfoReply(req, self.info(what)), []))
            self._info_pending.clear()
        out = self._out
        self._out = []
        free = self._free
        direct = self._run_direct
        for ident, (tasks, frames) in self._run_batches.items():
            # Keys freed on a worker that also gets tasks travel in the RunTasks,
            # which the worker frees first: the order of two messages, in one.
            by_client = direct.get(ident)
            to = None
            if by_client is not None:
                clients = self.clients
                to = []
                for c, runs in by_client.items():
                    rec = clients.get(c)
                    if rec is not None and rec.direct is not None:
                        to.append([c, rec.direct, runs])
            freeing = free.pop(ident, None)
            msg = P.RunTasks(tasks, None if freeing is None else freeing.keys, to)
            out.append((ident, msg, frames.frames))
        self._run_batches.clear()
        direct.clear()
        if free:
            self._flush_frees(out)
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
    # results from workers

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
        told = None if msg.told is None else P.key_runs(msg.told, "told")
        untold = None if msg.untold is None else P.key_runs(msg.untold, "untold")
        door = None if msg.door is None else P.key_runs(msg.door, "door")
        tasks = self.tasks
        for entry, frames in zip(msg.results, frames_of, strict=True):
            key = entry[0]
            run = None if door is None else door.get(key)
            if run is not None:
                t = tasks.get(key)
                if t is None:  # before its client's Submit: settled when it comes
                    told_run = None if told is None else told.get(key)
                    early = _Early(ident, entry, frames, run, told_run == run, self.now)
                    self._early.setdefault(key, []).append(early)
                    continue
                if t.processing_on != ident or t.direct_run != run:
                    self._not_this_run(w, t, entry)
                    continue
            self._apply_result(w, entry, frames, told)
        if untold:
            self._send_untold(untold)
        self._note_if_idle(w)
        self._dirty = True

    def _apply_result(
        self, w: Worker, entry: list[Any], frames: Any, told: dict[str, int] | None
    ) -> None:
        """One checked TaskResults entry from worker ``w``."""
        ident = w.ident
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
            return
        if t is None or t.processing_on != ident:
            if status == "memory":
                if t is not None and t.state is TaskState.MEMORY:
                    t.who_has.add(ident)
                    w.data.add(key)
                    self._handed_off(t)
                    self._drop_extra_copies(t, w)
                else:
                    self._free_key(ident, key)
            return
        if status == "refused":
            if t.direct_run < P.DOOR_RUN:
                # Not idle after all: the broker places it.
                w.processing.pop(key, None)
                t.processing_on = None
                t.direct_to = None
                t.direct_run = 0
                self._requeue(t, "refused by its worker")
            return
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
            self._task_finished(
                t,
                w,
                nbytes,
                typename,
                frames,
                told is not None and told.get(key) == t.direct_run,
            )
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

    def _assign_door(self, t: Task, w: Worker, client: bytes, run: int) -> None:
        """A new task that ``client`` sent ``w`` itself, numbered ``run``
        (Submit.via): processing there, its result going to the client straight
        from the worker."""
        t.waiting_on = 0
        self._transition(t, TaskState.READY, "submitted")
        self._transition(t, TaskState.PROCESSING, w.name)
        t.queued = 0
        t.processing_on = w.ident
        w.processing[t.key] = None
        t.direct_to = client
        t.direct_run = run

    def _settle_early(self, key: str) -> None:
        """Reports of ``key`` that came before a Submit of it, now that one came:
        the one of the run it placed is applied, any other only freed."""
        for early in self._early.pop(key, ()):
            w = self.workers.get(early.worker)
            if w is None:
                continue
            t = self.tasks.get(key)
            if (
                t is not None
                and t.processing_on == w.ident
                and t.direct_run == early.run
            ):
                told = {key: early.run} if early.told else None
                self._apply_result(w, early.entry, early.frames, told)
                self._note_if_idle(w)
                self._dirty = True
            else:
                self._not_this_run(w, t, early.entry)

    def _not_this_run(self, w: Worker, t: Task | None, entry: list[Any]) -> None:
        """A door run's report that is not the task's current run (another client's
        Submit of the key came first, say, or the task was placed again): its
        result is not the broker's. The worker drops it, unless the broker counts
        on it holding that key (the name is the same, so is the copy)."""
        if entry[1] == "memory" and (t is None or w.ident not in t.who_has):
            self._free_key(w.ident, entry[0])

    def _expire_early(self, deadline: float) -> None:
        """Reports whose Submit never came (its client died, or the submission was
        refused): the worker frees what it holds."""
        for key, entries in list(self._early.items()):
            kept = []
            for early in entries:
                w = self.workers.get(early.worker)
                if early.when >= deadline and w is not None:
                    kept.append(early)
                elif w is not None:
                    self._not_this_run(w, self.tasks.get(key), early.entry)
            if kept:
                self._early[key] = kept
            else:
                del self._early[key]

    def _send_untold(self, untold: dict[str, int]) -> None:
        """Results reported as told whose sending then failed: the broker tells their
        client after all, if the task is still that run's result and still wanted."""
        for key, run in untold.items():
            for early in self._early.get(key, ()):
                if early.run == run:  # not told after all
                    early.told = False
            t = self.tasks.get(key)
            if (
                t is not None
                and t.direct_run == run
                and t.state is TaskState.MEMORY
                and t.direct_to in t.wanted_by
            ):
                assert t.direct_to is not None
                self._update(t.direct_to, key, "finished", t.inline, "")

    def _task_finished(
        self,
        t: Task,
        w: Worker,
        nbytes: int,
        typename: str,
        inline: list[Any] | None,
        told: bool = False,
    ) -> None:
        """``told``: the worker sent this run's result to ``t.direct_to`` itself."""
        self._transition(t, TaskState.MEMORY, w.name)
        self.counters["tasks_done"] += 1
        t.who_has.add(w.ident)
        w.data.add(t.key)
        t.nbytes = nbytes
        t.typename = typename
        t.inline = inline
        wanted_by = t.wanted_by
        if wanted_by:
            told_client = t.direct_to if told else None
            for c in wanted_by:
                if c != told_client:
                    self._update(c, t.key, "finished", inline, "")
            wanted_by.discard(FIRE_AND_FORGET)
        tasks = self.tasks
        for d in self.graph.dependents(t.key):
            dt = tasks[d]
            if dt.state is TaskState.WAITING:
                dt.waiting_on -= 1
                if dt.waiting_on == 0:
                    self._transition(dt, TaskState.READY, "deps done")
                    self._push_ready(dt)
        for dep in t.deps:
            self._maybe_release(tasks[dep])
        if not wanted_by and not t.n_active:  # else still needed: nothing to release
            self._maybe_release(t)

    def _stop_on_worker(self, t: Task) -> None:
        """Take a processing task off its worker: cancel it there (if it already
        runs, its thread stays busy, counted as a zombie, until it reports back)."""
        w = self.workers.get(t.processing_on or b"")
        if w is not None:
            w.processing.pop(t.key, None)
            w.seceded.discard(t.key)
            self._release_resources(w, t)
            self._send(w.ident, P.CancelTasks([t.key]))
            w.zombies.add(t.key)
            self._dirty = True
        t.processing_on = None

    def _fail(self, t: Task, frames: list[Any], text: str) -> None:
        """Err ``t`` and, transitively, everything waiting on it."""
        stack = [t]
        # Nobody will ever release a failed task nobody needs (a door task released
        # while it ran, say): it is forgotten now.
        orphans = [] if self._needed(t) else [t]
        while stack:
            t = stack.pop()
            if t.state is TaskState.ERRED:
                continue
            if t.processing_on is not None:
                self._stop_on_worker(t)
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
        if t.state is TaskState.PROCESSING and not self._needed(t):
            # A door task released while it ran (see _maybe_release).
            self._transition(t, TaskState.RELEASED, why)
            self._maybe_release(t)
            return
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
    # releasing and forgetting

    def _needed(self, t: Task) -> bool:
        return bool(t.wanted_by) or t.n_active > 0

    def _maybe_release(self, t: Task) -> None:
        """Free ``t``'s result / stop it if nothing needs it; forget it if possible.
        Its dependencies are then looked at the same way, so releasing the last future
        of a graph stops and forgets the rest of it (no recursion: chains are long).
        """
        tasks = self.tasks
        n_dependents = self.graph.n_dependents
        stack = [t]
        while stack:
            t = stack.pop()
            if t.wanted_by or t.n_active > 0 or tasks.get(t.key) is not t:
                continue  # still needed (see _needed), or forgotten already
            if t.state is TaskState.PROCESSING and t.direct_run < P.DOOR_RUN:
                # A door task runs already (its worker took it idle), and its
                # client, which has its result as a rule, releases it before the
                # worker's report comes: that report finishes it (counted, in the
                # task stream) and it is released then. A cancel would only cost a
                # message to the worker.
                continue
            released = True
            if t.state is TaskState.MEMORY:
                small = t.inline is not None
                for ident in t.who_has:
                    w = self.workers.get(ident)
                    if w is not None:
                        w.data.discard(t.key)
                        self._free_key(ident, t.key, urgent=not small)
                t.who_has.clear()
                t.inline = None
                self._transition(t, TaskState.RELEASED, "not needed")
            elif t.state in (TaskState.WAITING, TaskState.READY):
                t.queued = 0
                self._transition(t, TaskState.RELEASED, "not needed")
            elif t.state is TaskState.PROCESSING:
                self._stop_on_worker(t)
                self._transition(t, TaskState.RELEASED, "not needed")
            else:
                released = False
            forget = not t.wanted_by and not n_dependents(t.key)
            if forget:
                del tasks[t.key]
                self.graph.remove(t.key)
                t.queued = 0
            if (forget or released) and t.deps:
                stack.extend(tasks[d] for d in t.deps if d in tasks)

    def _maybe_forget(self, t: Task) -> None:
        """Forget ``t`` if it is released or erred and nothing refers to it."""
        if t.state in (TaskState.RELEASED, TaskState.ERRED):
            self._maybe_release(t)

    # ==================================================================================
    # output helpers

    def _send(
        self, ident: bytes, msg: P.Message, payload: list[Any] | None = None
    ) -> None:
        self._out.append((ident, msg, payload or []))

    def _free_key(self, ident: bytes, key: str, urgent: bool = True) -> None:
        """Tell a worker to drop a result; batched per worker until flush(), and
        while not ``urgent`` (a small result) until due (FREE_BATCH)."""
        pending = self._free.get(ident)
        if pending is None:
            pending = self._free[ident] = _Frees(self.now)
        pending.keys.append(key)
        if urgent:
            pending.urgent = True

    def _flush_frees(self, out: list[Out]) -> None:
        due = self.now - FREE_DELAY
        workers = self.workers
        for ident, pending in list(self._free.items()):
            if ident in workers and not (
                pending.urgent
                or len(pending.keys) >= FREE_BATCH
                or pending.since <= due
            ):
                continue
            del self._free[ident]
            if ident in workers:
                out.append((ident, P.FreeKeys(pending.keys), []))

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


#: Client messages applied only after a large submission is fully inserted.
_AFTER_INSERTION = frozenset(
    {
        P.Submit,
        P.ReleaseKeys,
        P.Cancel,
        P.FireAndForget,
        P.Gather,
        P.RunOnWorkers,
        P.ClientClose,
    }
)

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

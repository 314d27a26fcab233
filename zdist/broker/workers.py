"""Workers as the broker's state sees them, as a mixin of
:class:`~zdist.broker.state.BrokerState`, pure like it (no sockets, no clock reads):
registration, heartbeats and status changes, a worker's removal (its running tasks
go back to the queue, its data is recomputed where still wanted; a task at a worker
that dies too often is a KilledWorker), and a retiring worker handing its data on.
"""

from __future__ import annotations

import heapq
import logging
import pickle
from typing import Any

from zdist import protocol as P
from zdist.broker.mixin import StateMixin
from zdist.broker.records import (
    _WORKER_STATUSES,
    Task,
    TaskState,
    Worker,
    _check_resources,
)
from zdist.errors import KilledWorker

logger = logging.getLogger(__name__)

#: More threads than any machine has: a registration claiming more is malformed (and
#: would overflow the 64-bit integers of messages built from it).
MAX_THREADS_PER_WORKER = 1 << 20


class WorkerSide(StateMixin):
    def _on_register_worker(
        self, ident: bytes, msg: P.RegisterWorker, payload: list[Any]
    ) -> None:
        _check_resources(msg.resources)
        if not 1 <= msg.nthreads <= MAX_THREADS_PER_WORKER:
            raise P.ProtocolError(f"a worker with {msg.nthreads} threads")
        if not 0 <= msg.memory_limit < 2**62:
            raise P.ProtocolError(f"a worker with memory limit {msg.memory_limit}")
        for entry in self.unrunnable.values():  # perhaps this worker can run them
            heapq.heappush(self.ready, entry)
        self.unrunnable.clear()
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
        w.order = next(self._worker_order)
        self.workers[ident] = w
        self._note_if_idle(w)
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
        self._idle_set.discard(w)  # its heap entry is skipped when popped
        if len(self._idle) > 2 * len(self._idle_set) + 64:  # workers come and go
            idle = self._idle
            idle[:] = [(x.order, x) for x in self._idle_set]
            heapq.heapify(idle)
        self._queued_on.discard(w)
        # Frees queued for it are moot (a session registering again is told anew).
        self._free.pop(ident, None)
        if not planned:
            self.counters["workers_lost"] += 1
        # Only the tasks that were running can have killed it: a worker runs its tasks
        # in the order sent, nthreads at a time; the rest were queued behind them.
        running = set(list(w.processing)[: max(0, w.nthreads - len(w.zombies))])
        running |= w.seceded
        for key in list(w.processing):
            t = self.tasks.get(key)
            if t is None or t.processing_on != ident:
                continue  # already erred or released while we walked the list
            t.processing_on = None
            if not planned and key in running:
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
        self._note_if_idle(w)
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

    def _drop_extra_copies(self, t: Task, holder: Worker) -> None:
        """A worker fetched ``t`` for tasks it runs. When every task still needing
        ``t`` runs there, the other copies only cost memory (a large input would
        otherwise live twice: W5's peak); one copy serves clients too."""
        if t.inline is not None or len(t.who_has) < 2:
            return
        for d in self.graph.dependents(t.key):
            dt = self.tasks[d]
            if dt.state.active and dt.processing_on != holder.ident:  # type: ignore[attr-defined]
                return
        for ident in list(t.who_has):
            other = self.workers.get(ident)
            if ident == holder.ident or (other is not None and t.key in other.handoff):
                continue
            t.who_has.discard(ident)
            if other is not None:
                other.data.discard(t.key)
                self._free_key(ident, t.key)

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

"""Dispatch: which ready task runs where, as a mixin of
:class:`~zdist.broker.state.BrokerState`, pure like it (no sockets, no clock reads).

Ready tasks wait in a shared heap (priority, then submission order), or in a worker's
own queue when most of their inputs live there (data locality). A dispatch gives idle
workers a task first, from a heap in registration order, without visiting the busy
ones; then the least-occupied worker per thread takes one task at a time, up to its
pipeline capacity. Restricted tasks (names, resources) go to a worker that can run
them, or wait in ``unrunnable`` until one registers. Work stealing asks a busy
worker's queue for tasks it has not started when threads elsewhere are idle.
"""

from __future__ import annotations

import heapq
from typing import Any

from zdist import protocol as P
from zdist.broker.mixin import StateMixin
from zdist.broker.records import LOCALITY_BYTES, Task, TaskState, Worker


class Dispatch(StateMixin):
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

    def _push_ready(self, t: Task) -> None:
        gen = next(self._gen)
        t.queued = gen
        entry = (t.priority, gen, t.key)
        target = self._preferred_worker(t)
        if target is not None:
            heapq.heappush(target.local_queue, entry)
            self._queued_on.add(target)
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

    def _could_ever_run(self, t: Task) -> bool:
        """Some current worker has the names and total resources this task needs."""
        return any(self._can_run(t, w, ever=True) for w in self.workers.values())

    def _can_run(self, t: Task, w: Worker, ever: bool = False) -> bool:
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
            have = w.resources if ever else w.avail
            for r, need in t.resources.items():
                if have.get(r, 0) < need:
                    return False
        return True

    def _note_if_idle(self, w: Worker) -> None:
        if not w.processing and not w.zombies and w not in self._idle_set:
            self._idle_set.add(w)
            heapq.heappush(self._idle, (w.order, w))

    def _local_queues(self) -> bool:
        """Whether any worker may hold a queue of its own (stale entries count)."""
        queued_on = self._queued_on  # remove_worker takes leavers out
        if queued_on:
            queued_on.difference_update([w for w in queued_on if not w.local_queue])
        return bool(queued_on)

    def _dispatch(self) -> None:
        self._dirty = False
        ready = self.ready
        if not ready and not self._local_queues():
            return  # nothing anyone could start: visit no worker
        # Idle workers first (in registration order, as the pass below would take
        # them), without looking at the others: one task on a broker with 1,000
        # workers must not cost a pass over all of them. A worker from _idle is
        # checked again here; one that went idle unnoticed is found by the pass.
        idle, idle_set = self._idle, self._idle_set
        while idle and ready:
            _, w = heapq.heappop(idle)
            if w not in idle_set:
                continue  # gone since (remove_worker)
            idle_set.discard(w)
            if w.occupancy() != 0 or w.free_slots() <= 0:  # busy, or not running
                continue
            t = self._next_task_for(w)
            if t is None:
                self._note_if_idle(w)  # nothing here it can run: the pass decides
                break
            self._assign(t, w)
        if not ready and not self._local_queues():
            return
        # Least-occupied worker first (per thread), one task at a time, so an idle
        # worker gets work before a busy one's pipeline grows, and a burst of short
        # tasks spreads evenly.
        # Free slots are counted once per worker here (capacity does not change
        # while dispatching; each assignment takes one slot).
        heap = []
        for i, w in enumerate(self.workers.values()):
            free = w.free_slots()
            if free > 0:
                heap.append((w.occupancy() / w.nthreads, i, w, free))
        heapq.heapify(heap)
        heappop, heappush = heapq.heappop, heapq.heappush
        queued_locally: bool | None = None
        while heap:
            load, i, w, free = heappop(heap)
            t = self._next_task_for(w)
            if t is None:
                if not ready:
                    # Nothing shared is left: only a worker's own queue (or a steal
                    # from one) can give more. With none, stop here rather than ask
                    # every other idle worker, each of which would scan all workers
                    # for a steal: O(workers^2), 0.6 s per task with 1,000 idle
                    # workers. Local queues only shrink while dispatching.
                    if queued_locally is None:
                        queued_locally = self._local_queues()
                    if not queued_locally:
                        break
                continue
            self._assign(t, w)
            if free > 1:
                heappush(heap, (load + 1 / w.nthreads, i, w, free - 1))

    def _next_task_for(self, w: Worker) -> Task | None:
        tasks = self.tasks
        ready = self.ready
        if not w.local_queue:
            # The usual case first: the shared queue's best task can run anywhere.
            while ready:
                entry = heapq.heappop(ready)
                t = tasks.get(entry[2])
                if t is None or t.queued != entry[1] or t.state is not TaskState.READY:
                    continue  # stale entry
                if t.restrict is None and not t.resources:
                    return t
                heapq.heappush(ready, entry)  # restricted: the general search below
                break
        for heap in (w.local_queue, self.ready):
            skipped = []
            found = None
            while heap:
                entry = heapq.heappop(heap)
                t = tasks.get(entry[2])
                if t is None or t.queued != entry[1] or t.state is not TaskState.READY:
                    continue  # stale entry
                if (t.restrict is None and not t.resources) or self._can_run(t, w):
                    found = t
                    break
                if not self._could_ever_run(t):
                    # No worker has what it needs (its named worker left, say): park
                    # it until one registers, so it cannot starve runnable tasks.
                    self.unrunnable[t.key] = entry
                    continue
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
        first = batch is None
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
        # The first task of a batch carries a small function in the header (a lone
        # task then goes in one frame); the rest share one function frame.
        fn_ref = None if t.fn is None else frames.add(t.fn, share=True, inline=first)
        entries.append([t.key, fn_ref, frames.add(t.args), deps, t.resources])
        t.direct_to = None
        t.direct_run = 0
        if w.local and len(t.wanted_by) == 1:
            # One client wants it, on this host: the worker sends it the result.
            for c in t.wanted_by:
                rec = self.clients.get(c)
                if rec is not None and rec.direct is not None:
                    t.direct_to = c
                    t.direct_run = run = next(self._direct_runs)
                    by_client = self._run_direct.get(w.ident)
                    if by_client is None:
                        by_client = self._run_direct[w.ident] = {}
                    by_client.setdefault(c, []).append([t.key, run])

    def _release_resources(self, w: Worker, t: Task) -> None:
        if t.resources:
            for r, need in t.resources.items():
                w.avail[r] = w.avail.get(r, 0) + need

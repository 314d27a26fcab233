"""The client side of the broker's state machine: submissions, releases, cancels,
gathers, runs on workers and information requests. A mixin of
:class:`~zdist.broker.state.BrokerState`, pure like it (no sockets, no clock reads).
"""

from __future__ import annotations

import pickle
from typing import Any

from zdist import protocol as P
from zdist.broker.graph import find_cycle
from zdist.broker.mixin import StateMixin
from zdist.broker.records import (
    FINAL_STATES,
    FIRE_AND_FORGET,
    ClientRec,
    Task,
    TaskState,
    _check_resources,
    _dependency_order,
    _Pending,
)
from zdist.errors import GraphError
from zdist.net import ipc_path, is_ipc

#: Tasks inserted per slice of a large submission (about 0.2 s of broker time).
INSERT_SLICE = 20_000
#: The pseudo-client that holds a large submission's tasks while it is inserted.
INSERTING = b"\x00inserting"


class _Insertion:
    """A validated submission being inserted in slices."""

    __slots__ = ("done", "ident", "new", "order", "seq", "via", "wanted", "wants")

    def __init__(
        self,
        ident: bytes,
        wants: list[str],
        order: list[str],
        new: dict[str, tuple[Any, ...]],
        seq: int,
        via: dict[str, tuple[bytes, int]] | None = None,
    ) -> None:
        self.ident = ident
        self.via = via
        self.wants = wants
        self.wanted = set(wants)
        self.order = order
        self.new = new
        self.seq = seq
        self.done = 0


class ClientSide(StateMixin):
    def _on_register_client(
        self, ident: bytes, msg: P.RegisterClient, payload: list[Any]
    ) -> None:
        direct = msg.direct
        if direct is not None and (not is_ipc(direct) or ipc_path(direct) is None):
            raise P.ProtocolError(f"a client's direct address {direct[:200]!r}")
        old = self.clients.get(ident)
        c = self.clients[ident] = ClientRec(
            ident, msg.name, msg.versions, self.now, direct
        )
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

    def refuse(self, ident: bytes, msg: P.Message, text: str) -> None:
        """Tell a client its message was dropped (too large): submitted keys fail,
        a request gets an error reply."""
        if ident not in self.clients:
            return
        if isinstance(msg, P.Submit):
            if msg.release:  # small, and valid on its own: the keys still go
                self._on_release_keys(ident, P.ReleaseKeys(msg.release), [])
            err = [pickle.dumps(ValueError(text))]
            for key in dict.fromkeys(msg.wants):
                if isinstance(key, str):
                    self._update(ident, key, "error", err, f"ValueError: {text}")
        else:
            self._send(ident, P.Error(getattr(msg, "request_id", 0), text))

    def _client(self, ident: bytes, request_id: int = 0) -> ClientRec | None:
        c = self.clients.get(ident)
        if c is None:
            self._send(ident, P.Error(request_id, "unregistered"))
        return c

    def _on_submit(self, ident: bytes, msg: P.Submit, payload: list[Any]) -> None:
        c = self._client(ident)
        if c is None:
            return
        if msg.release:
            self._on_release_keys(ident, P.ReleaseKeys(msg.release), payload)
        tasks = self.tasks
        new: dict[str, tuple[Any, ...]] = {}
        frames_cache: dict[tuple[int, int], list[Any]] = {}

        def frames_for(ref: Any) -> list[Any]:
            if type(ref) is bytes:  # a small frame carried in the header
                return [ref]
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
        # The per-entry checks are written out (exact types, no helper calls): this
        # loop runs once per task of every submission.
        for entry in msg.tasks:
            if type(entry) is not list or len(entry) != 9:
                raise P.ProtocolError("malformed task entry")
            key, fn_ref, args_ref, deps, prio, retries, resources, workers, loose = (
                entry
            )
            if type(key) is not str or type(deps) is not list:
                raise P.ProtocolError("malformed task entry")
            for d in deps:
                if type(d) is not str:
                    raise P.ProtocolError("dependency keys must be strings")
            if (type(prio) is not int and type(prio) is not float) or type(
                retries
            ) is not int:
                raise P.ProtocolError(f"malformed priority or retries for {key!r}")
            if resources is not None:
                _check_resources(resources)
            if workers is not None and not (
                type(workers) is list and all(type(x) is str for x in workers)
            ):
                raise P.ProtocolError(f"malformed worker restriction for {key!r}")
            if type(loose) is not bool:
                raise P.ProtocolError(f"malformed allow_other_workers for {key!r}")
            fn = None if fn_ref is None else frames_for(fn_ref)
            args = [args_ref] if type(args_ref) is bytes else frames_for(args_ref)
            if key in tasks or key in new:
                continue  # pure dedup: the first definition wins
            if deps:
                # A key named twice (an argument used twice) is one dependency:
                # counted twice it would keep the task waiting forever.
                if len(deps) > 1:
                    deps = list(dict.fromkeys(deps))
                for d in deps:
                    if d not in tasks and d not in new:
                        forward_ref = True
                deps = tuple(deps)
            else:
                deps = ()
            new[key] = (fn, args, deps, int(prio), retries, resources, workers, loose)
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
        # ordered, is one pass). A large graph goes in slices between other messages
        # (see work()), so a 1,000,000-task submit does not silence the broker's
        # heartbeats for the tens of seconds it takes.
        order = _dependency_order(new) if forward_ref else list(new)
        via = None
        if msg.via is not None:
            via = {}
            named = {e[0] for e in msg.tasks}
            for entry in msg.via:
                if (
                    type(entry) is not list
                    or len(entry) != 3
                    or type(entry[0]) is not str
                    or type(entry[1]) is not str
                    or type(entry[2]) is not int
                    or entry[2] >= P.DOOR_RUN
                    or entry[0] not in named
                ):
                    raise P.ProtocolError(f"malformed Submit.via entry {entry!r:.200}")
                via[entry[0]] = (entry[1].encode(), entry[2])
        job = _Insertion(ident, msg.wants, order, new, next(self._seq), via)
        for key in msg.wants:
            t = tasks.get(key)
            if t is not None:
                t.wanted_by.add(ident)
                if t.direct_to == ident:
                    # Wanted again by a new future: whatever the worker sends
                    # straight may have reached the old one only, so the broker
                    # tells this client too (a client takes a result once).
                    t.direct_to = None
            c.wants.add(key)
        if len(order) <= INSERT_SLICE and not self._insertions:
            self._insert_slice(job, len(order))
            self._finish_insertion(job)
        else:
            self._insertions.append(job)

    def has_work(self) -> bool:
        return bool(self._insertions or self._deferred)

    def work(self, budget: int = INSERT_SLICE) -> bool:
        """Insert up to ``budget`` tasks of pending large submissions; True while
        more remain (the server calls this between bursts of messages)."""
        while budget > 0 and (self._insertions or self._deferred):
            if self._insertions:
                job = self._insertions[0]
                budget -= self._insert_slice(job, budget)
                if job.done >= len(job.order):
                    self._insertions.popleft()
                    self._finish_insertion(job)
            else:  # replay what arrived meanwhile, until it starts another insertion
                ident, msg, payload = self._deferred.popleft()
                self.handle(ident, msg, payload, self.now)
                budget -= 1
        self._dirty = True
        return bool(self._insertions or self._deferred)

    def _insert_slice(self, job: _Insertion, n: int) -> int:
        tasks = self.tasks
        graph = self.graph
        start = job.done
        keys = job.order[start : start + n]
        pinned = len(job.order) > INSERT_SLICE
        new = job.new
        seq = job.seq
        submitted = self.monitor.submitted
        made = []
        for i, key in enumerate(keys, start):
            fn, args, deps, prio, retries, resources, workers, loose = new[key]
            restrict = None
            if workers:
                restrict = (set(workers), loose)
            t = Task(key, fn, args, deps, (-prio, seq, i), retries, resources, restrict)
            tasks[key] = t
            graph.add(key, deps)
            t.group = submitted(key)
            if pinned:  # not released before its dependents of later slices arrive
                t.wanted_by.add(INSERTING)
            made.append(t)
        if job.ident in self.clients:
            wanted = job.wanted
            for t in made:
                if t.key in wanted:
                    t.wanted_by.add(job.ident)
        via = job.via
        for t in made:
            if t.state is TaskState.RELEASED:
                if via is not None and t.key in via:
                    worker, run = via[t.key]
                    w = self.workers.get(worker)
                    if (
                        w is not None
                        and w.local
                        and w.status == "running"
                        and not t.deps
                        and not t.resources
                        and t.restrict is None
                        and job.ident in t.wanted_by
                    ):
                        self._assign_door(t, w, job.ident, run)
                        continue
                self._schedule_new(t)
        job.done += len(keys)
        return len(keys)

    def _finish_insertion(self, job: _Insertion) -> None:
        tasks = self.tasks
        new = job.new
        ident = job.ident
        if len(job.order) > INSERT_SLICE:
            for key in job.order:
                t = tasks.get(key)
                if t is not None:
                    t.wanted_by.discard(INSERTING)
                    self._maybe_release(t)
        if job.via is not None and self._early:
            for key in job.via:
                self._settle_early(key)
        if ident not in self.clients:
            return
        for key in dict.fromkeys(job.wants):
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
        for key in job.order:
            nt = tasks.get(key)
            if nt is not None:
                self._maybe_forget(nt)

    def _schedule_new(self, t: Task) -> None:
        if not t.deps:  # most tasks: nothing to wait for
            t.waiting_on = 0
            self._transition(t, TaskState.READY, "submitted")
            self._push_ready(t)
            return
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
        if self._client(ident, msg.request_id) is None:
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
        if self._client(ident, msg.request_id) is None:
            return
        targets = [
            w
            for w in self.workers.values()
            if not msg.workers or w.address in msg.workers or w.name in msg.workers
        ]
        req = next(self._req)
        self._runs[req] = _Pending(ident, msg.request_id, {w.ident for w in targets})
        for w in targets:
            self._runs_by_worker.setdefault(w.ident, set()).add(req)
            self._send(w.ident, P.RunFunction(req), payload)
        self._finish_run(req)  # answers at once when there is no worker

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
        if self._client(ident, msg.request_id) is None:
            return
        # Answered at flush, after every message of this burst: a worker's report
        # of a result its client already has (zdist.worker.direct) is then in.
        self._info_pending.append((ident, msg.request_id, msg.what))

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
                # seconds per task lately, and tasks the broker keeps queued there
                "avg_task_duration": w.avg_duration,
                "capacity": w.capacity(),
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
            info["now"] = self.now  # the clock of the workers' last_seen
            info["groups"] = self.monitor.group_progress()
            info["task_stream"] = self.monitor.task_stream(since=self.wall - 300)
            info["errors"] = list(self.monitor.errors)
        return info

"""A worker: one DEALER to the broker, one ROUTER data port for peers, task threads.

The I/O loop (the thread that calls :meth:`Worker.run`) owns every socket. It receives
tasks, fetches their inputs from peers, hands ready tasks to ``nthreads`` task threads,
and sends results back in batches. Task threads never touch a socket: they append to
``_done`` and write a byte to a pipe the loop polls. Heartbeats go out from the loop, so
they continue during a long task. Serving and fetching values between workers is
zdist.worker.transfer. Lone tasks that local clients send the worker themselves come
through its door, zdist.worker.door.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from zdist import protocol as P
from zdist import serialize
from zdist._version import versions
from zdist.keys import key_group
from zdist.localsocket import check_local_socket
from zdist.logs import RateLimitedLog, log_buffer
from zdist.net import interface_ip, is_ipc, local_ip_towards, split_address
from zdist.security import Security
from zdist.wire import recv_ready, send_frames
from zdist.worker import context
from zdist.worker.direct import ClientLinks
from zdist.worker.door import Door
from zdist.worker.execute import FunctionCache, Outcome, run_task
from zdist.worker.memory import SpillBuffer, process_memory
from zdist.worker.scratch import Janitor, make_local_directory
from zdist.worker.shm import SharedMemory
from zdist.worker.transfer import PeerTransfer

logger = logging.getLogger(__name__)

#: Seconds a retiring worker waits for its still-needed results to be copied away.
HANDOFF_TIMEOUT = 20.0
#: Seconds between reconnect attempts while the broker is away (doubles up to the max).
RECONNECT_BACKOFF = (0.1, 5.0)


@dataclass(frozen=True)
class WorkerConfig:
    address: str
    security: Security | None
    name: str = ""
    nthreads: int = 1
    memory_limit: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    #: Where the worker makes its private scratch directory (spilled results,
    #: uploaded files), removed at close; "" means $TMPDIR or /tmp.
    local_directory: str = ""
    interface: str | None = None
    #: Exit if the broker cannot be reached for this long (None: keep trying).
    death_timeout: float | None = None
    #: Stop taking tasks after this many seconds and hand queued work back.
    lifetime: float | None = None
    #: Fractions of memory_limit (see zdist.worker.memory); None disables one.
    memory_target_fraction: float | None = 0.6
    memory_spill_fraction: float | None = 0.7
    memory_pause_fraction: float | None = 0.8
    memory_terminate_fraction: float | None = 0.95
    #: Extra environment for the worker process (e.g. CUDA_VISIBLE_DEVICES).
    env: dict[str, str] = field(default_factory=dict)


class _Task:
    __slots__ = ("args", "cancelled", "fn", "has_deps", "inline", "key", "missing")

    def __init__(self, key: str, fn: list[Any] | None, args: list[Any]) -> None:
        self.key = key
        self.fn = fn
        self.args = args
        self.inline: dict[str, list[Any]] = {}
        self.missing: set[str] = set()
        self.cancelled = False
        self.has_deps = False


class Worker(PeerTransfer, Door):
    def __init__(
        self, config: WorkerConfig, ctx: zmq.Context[Any] | None = None
    ) -> None:
        self.config = config
        self.name = config.name or f"worker-{uuid.uuid4().hex[:8]}"
        log_buffer()  # recent lines for Client.get_worker_logs()
        self.nthreads = max(1, config.nthreads)
        self.resources = dict(config.resources)
        self.memory_limit = config.memory_limit
        self.broker_address = config.address
        if is_ipc(config.address):  # only we can have made it (localsocket)
            self.broker_address = check_local_socket(config.address)
        self._next_memory_check = 0.0
        self.paused = False
        self.tasks: dict[str, _Task] = {}
        self.versions = versions()
        self._own_ctx = ctx is None
        self.ctx: zmq.Context[Any] = ctx or zmq.Context()
        self._auth = None
        self.data_sock = self.ctx.socket(zmq.ROUTER)
        self.data_sock.linger = 0
        if config.security:
            if self._own_ctx:
                self._auth = config.security.start_authenticator(self.ctx)
            config.security.configure_server(self.data_sock)
        host, _ = split_address(config.address)
        ip = (
            interface_ip(config.interface)
            if config.interface
            else local_ip_towards(host)
        )
        port = self.data_sock.bind_to_random_port(f"tcp://{ip}")
        self.address = f"tcp://{ip}:{port}"
        self.host = ip if ip != "127.0.0.1" else socket.gethostname()
        self._ident = f"w-{uuid.uuid4().hex}".encode()
        self.broker: zmq.Socket[Any] | None = None
        self._init_transfer()
        self._functions = FunctionCache()
        self._ready: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._done: deque[Any] = deque()
        self._wake_r, self._wake_w = os.pipe()
        self._wake_pending = False
        os.set_blocking(self._wake_r, False)
        self._results: list[Any] = []
        self._result_frames = P.FrameList()
        self._links = ClientLinks(self.ctx)  # results straight to clients
        self._init_door()  # lone tasks straight from local clients
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._active_threads = 0
        self._executing: set[str] = set()
        # Guards the hand-over of a queued task: a task thread claims it (executing)
        # or the I/O loop withdraws it (cancelled), never both.
        self._claim = threading.Lock()
        self._stop = threading.Event()
        self._closing = False
        self._may_exit = False
        self._retire_deadline = 0.0
        self.status = "init"
        self.heartbeat_interval = P.HEARTBEAT_INTERVAL
        self.liveness = P.WORKER_LIVENESS
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._last_metrics = 0.0
        self.dropped = 0  # malformed messages from the network, logged rate-limited
        self._log = RateLimitedLog(logger)
        self._started = time.monotonic()
        self._client: Any = None
        self._io_thread: threading.Thread | None = None
        self.exit_reason = ""
        # Last: nothing above may fail and leave the directories behind.
        self.local_directory = make_local_directory(config.local_directory)
        # Same-host transfers through /dev/shm (zdist.worker.shm).
        self.shm = SharedMemory(ttl=P.HEARTBEAT_INTERVAL * P.WORKER_LIVENESS)
        shm_directory = self.shm.prepare()
        self._janitor = Janitor(
            [self.local_directory, *([shm_directory] if shm_directory else [])]
        )
        limit = self.memory_limit
        target = config.memory_target_fraction
        self.data = SpillBuffer(
            self.local_directory, int(limit * target) if limit and target else None
        )

    # ==================================================================================
    # public

    def run(self) -> None:
        """Serve until stopped, the broker is away past death_timeout, or lifetime."""
        self._io_thread = threading.current_thread()
        for _ in range(self.nthreads):
            self._start_thread()
        self._connect()
        poller = zmq.Poller()
        poller.register(self.data_sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        assert self.broker is not None
        poller.register(self.broker, zmq.POLLIN)
        broker = self.broker
        door = self._open_door(poller)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(self._poll_timeout()))
                if self.broker is not broker:  # reconnected: swap the polled socket
                    poller.unregister(broker)
                    broker = self.broker
                    poller.register(broker, zmq.POLLIN)
                if broker in events:
                    self.receive_from_broker()
                if self.data_sock in events:
                    self.serve_peers()
                if door:
                    self.serve_door(events, poller)
                for peer in self._peers.values():
                    if peer in events:
                        self.receive_from_peer(peer)
                while self._new_peers:
                    poller.register(self._new_peers.pop(), zmq.POLLIN)
                if self._wake_r in events:
                    self._drain_wake()
                self.collect_done()
                self.flush_results()
                self.check_broker()
                self.check_lifetime()
                self.check_memory()
                if self._fetching:
                    self.expire_fetches()
                if self.shm.pending:
                    self.shm.sweep(time.monotonic())
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    def close_gracefully(self, reason: str = "stopping") -> None:
        """Stop taking tasks, hand back queued ones, finish running ones, then exit."""
        self._closing = True
        self.exit_reason = reason
        self._wake()

    # ==================================================================================
    # connection to the broker

    def _connect(self) -> None:
        if self.broker is not None:
            self.broker.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.identity = self._ident
        sock.sndhwm = 0
        sock.rcvhwm = 0
        if is_ipc(self.broker_address):  # still only ours (localsocket)
            check_local_socket(self.broker_address)
        elif self.config.security:  # TCP: CurveZMQ
            self.config.security.configure_client(sock)
        sock.connect(self.broker_address)
        self.broker = sock
        self.status = "connecting"
        self._register_sent = time.monotonic()
        self._send(
            P.RegisterWorker(
                self.name,
                self.nthreads,
                int(self.memory_limit),
                self.resources,
                self.address,
                self.host,
                os.getpid(),
                self.local_directory,
                self.versions,
                list(self.data),
                is_ipc(self.broker_address),
            )
        )
        if not self._last_heard:
            self._last_heard = time.monotonic()

    def check_broker(self) -> None:
        now = time.monotonic()
        silent = now - self._last_heard
        death = self.config.death_timeout
        if death is not None and silent > death:
            logger.error(
                "worker %s: no broker at %s for %.0f s; exiting",
                self.name,
                self.broker_address,
                silent,
            )
            self.exit_reason = "death-timeout"
            self._stop.set()
            return
        if self.status == "connecting":
            backoff = min(
                RECONNECT_BACKOFF[1], RECONNECT_BACKOFF[0] * 2 ** min(silent, 6)
            )
            if now - self._register_sent > max(backoff, self.heartbeat_interval):
                self._connect()
        elif silent > self.heartbeat_interval * self.liveness:
            logger.warning(
                "worker %s: broker silent for %.1f s; reconnecting", self.name, silent
            )
            self._connect()
        elif now - self._last_metrics > self.heartbeat_interval:
            # Results count as heartbeats, but only this carries the metrics that
            # the dashboard and `zdist status` show: send it on time even when busy.
            self._last_metrics = now
            self._send(P.Heartbeat(self.metrics()))

    def check_memory(self) -> None:
        """Spill above the spill fraction, pause above the pause fraction (the
        supervisor restarts us above the terminate fraction)."""
        now = time.monotonic()
        if not self.memory_limit or now < self._next_memory_check:
            return
        self._next_memory_check = now + 0.1
        cfg = self.config
        rss = process_memory()
        limit = self.memory_limit
        if cfg.memory_spill_fraction and rss > cfg.memory_spill_fraction * limit:
            moved = self.data.evict(self.data.fast_bytes // 2)
            if moved:
                logger.info(
                    "worker %s: memory %d MB above spill threshold; spilled %d",
                    self.name,
                    rss >> 20,
                    moved,
                )
        pause = cfg.memory_pause_fraction
        if pause and not self.paused and rss > pause * limit:
            self.paused = True
            logger.warning(
                "worker %s paused: memory %d MB is above %d%% of the limit",
                self.name,
                rss >> 20,
                int(pause * 100),
            )
            if self.status == "running":
                self._send(P.WorkerStatus("paused", []))
        elif self.paused and (not pause or rss < pause * limit):
            self.paused = False
            logger.info("worker %s resumed: memory %d MB", self.name, rss >> 20)
            if self.status == "running":
                self._send(P.WorkerStatus("running", []))

    def metrics(self) -> dict[str, Any]:
        return {
            "spilled": len(self.data.slow),
            "dropped": self.dropped,
            "managed": self.data.fast_bytes,
            "memory": process_memory(),
            "executing": len(self._executing),
            "in_memory": len(self.data),
            "ready": self._ready.qsize(),
            "shm_transfers": self.shm_transfers,
            "shm_served": self.shm.written,
            "shm_fallbacks": self.shm_fallbacks,
            "shm_adopted": self.shm_adopted,
            "direct_sent": self._links.sent,
            "direct_missed": self._links.missed,
            "time": time.time(),
        }

    def _send(self, msg: P.Message, payload: list[Any] | tuple[Any, ...] = ()) -> None:
        assert self.broker is not None
        send_frames(self.broker, P.encode(msg, payload))
        self._last_sent = time.monotonic()

    def receive_from_broker(self) -> None:
        sock = self.broker
        assert sock is not None
        while True:
            frames = recv_ready(sock)
            if frames is None:
                return
            self._last_heard = time.monotonic()
            try:
                msg, payload = P.decode(frames)
                self._handle_broker(msg, payload)
            except Exception as exc:
                self._drop("a broker message", exc)
            if self.broker is not sock:  # _connect() replaced it: re-registered
                return

    def _drop(self, what: str, exc: Exception) -> None:
        """Count a message from the network that could not be used; log it,
        rate-limited per kind of failure."""
        self.dropped += 1
        self._log.warning(
            type(exc).__name__,
            "worker %s dropped %s: %s: %s",
            self.name,
            what,
            type(exc).__name__,
            exc,
        )

    def _handle_broker(self, msg: P.Message, payload: list[Any]) -> None:
        if isinstance(msg, P.RunTasks):
            self._on_run_tasks(msg, payload)
        elif isinstance(msg, P.FreeKeys):
            self._free(msg.keys)
        elif isinstance(msg, P.CancelTasks):
            self._withdraw(msg.keys)
        elif isinstance(msg, P.SendData):
            values, frames, missing = self._pack_values(msg.keys)
            self._send(P.DataReply(msg.request_id, values, missing), frames)
        elif isinstance(msg, P.RunFunction):
            self._on_run_function(msg, payload)
        elif isinstance(msg, P.Welcome):
            self.heartbeat_interval = msg.heartbeat_interval
            self.liveness = msg.liveness
            self.shm.ttl = self.heartbeat_interval * self.liveness
            self.status = "running"
            logger.info("worker %s registered with %s", self.name, self.broker_address)
        elif isinstance(msg, P.Error):
            if msg.text == "unregistered" and self.status == "running":
                logger.warning(
                    "worker %s: the broker forgot us (restarted?); registering",
                    self.name,
                )
                self._connect()
        elif isinstance(msg, P.Replicate):
            for key, peer in msg.keys:
                if key not in self.data and key not in self._fetch_wanted:
                    self._fetch_wanted[key] = []
                    self._fetch(peer, [key])
        elif isinstance(msg, P.CloseWorker):
            self._may_exit = True
        elif isinstance(msg, P.Heartbeat):
            pass
        else:
            raise P.ProtocolError(f"{type(msg).__name__} is not for a worker")

    # ==================================================================================
    # tasks

    def _free(self, keys: list[Any]) -> None:
        for key in keys:
            self.data.discard(key)
        self._links.forget(keys)

    def _on_run_tasks(self, msg: P.RunTasks, payload: list[Any]) -> None:
        if msg.free:
            self._free(msg.free)
        if msg.direct:
            self._links.note(msg.direct)
        fetch: dict[str, list[str]] = {}
        # A map's tasks share one function frame: copy it to bytes once per message
        # (bytes cache their hash, which the function cache is keyed by).
        functions: dict[tuple[int, int], list[Any]] = {}
        for entry in msg.tasks:
            key, fn_ref, args_ref, deps, _resources = entry
            fn = None
            if type(fn_ref) is bytes:  # carried in the header
                fn = [fn_ref]
            elif fn_ref is not None:
                fn = functions.get((fn_ref[0], fn_ref[1]))
                if fn is None:
                    fn = [bytes(f) for f in P.ref_frames(payload, fn_ref)]
                    functions[(fn_ref[0], fn_ref[1])] = fn
            t = _Task(key, fn, P.ref_frames(payload, args_ref))
            t.has_deps = bool(deps)
            for dep, where in deps:
                if isinstance(where, (list, bytes)):
                    t.inline[dep] = P.ref_frames(payload, where)
                elif where and dep not in self.data:
                    t.missing.add(dep)
                    waiting = self._fetch_wanted.setdefault(dep, [])
                    if not waiting:
                        fetch.setdefault(where, []).append(dep)
                    waiting.append(key)
            self.tasks[key] = t
            if t.missing:
                pass
            elif len(msg.tasks) == 1 and self._may_run_inline(t):
                self._run_inline(t)
            else:
                self._ready.put(t)
        for peer, keys in fetch.items():
            self._fetch(peer, keys)

    def _may_run_inline(self, t: _Task) -> bool:
        """A lone, known-quick task while every task thread is idle: run it here on
        the I/O thread instead of handing it over and back (latency of one-at-a-time
        workloads). Batches always go to the task threads, for parallelism."""
        return (
            t.fn is not None
            and not self._executing
            and self._ready.empty()
            and not self._closing
            and self._functions.is_quick(key_group(t.key))
        )

    def _run_inline(self, t: _Task) -> None:
        with self._claim:
            self._executing.add(t.key)
        context.set_current(self, t.key)
        try:
            out = run_task(
                t.key,
                t.fn,
                t.args,
                self._lookup_for(t) if t.has_deps else None,
                self._functions,
            )
        finally:
            context.set_current(None)
        self._task_done(out)
        # Its result goes now, not after the loop's other chores: this is the
        # latency path (one task at a time), and the send wakes the client.
        self.flush_results()

    def _withdraw(self, keys: list[Any], report: bool = True) -> list[str]:
        """Take back tasks that have not started (cancel, steal, hand-back). A
        running one finishes and reports to the broker only: its client may have
        been told it is cancelled meanwhile."""
        self._links.forget(keys)
        withdrawn = []
        with self._claim:
            for key in keys:
                t = self.tasks.get(key)
                if t is None or key in self._executing:
                    continue  # running: it finishes and reports as usual
                t.cancelled = True
                del self.tasks[key]
                withdrawn.append(key)
        for key in withdrawn:
            for waiting in self._fetch_wanted.values():
                if key in waiting:
                    waiting.remove(key)
            if report:
                self._results.append([key, "cancelled", 0, "", None, "", -1.0])
        return withdrawn

    def _lookup_for(self, t: _Task) -> Any:
        data = self.data
        inline = t.inline

        def lookup(key: str) -> Any:
            frames = inline.get(key)
            if frames is not None:
                return serialize.loads(frames)
            return data[key]

        return lookup

    def _start_thread(self) -> None:
        with self._threads_lock:
            self._active_threads += 1
        th = threading.Thread(
            target=self._task_thread, name=f"{self.name}-task", daemon=True
        )
        self._threads.append(th)
        th.start()

    def _task_thread(self) -> None:
        context.set_current(self)
        while True:
            t = self._ready.get()
            if t is None:
                return
            with self._claim:
                if t.cancelled:
                    continue
                self._executing.add(t.key)
            context.set_current(self, t.key)
            out = run_task(
                t.key,
                t.fn,
                t.args,
                self._lookup_for(t) if t.has_deps else None,
                self._functions,
            )
            context.set_current(self)
            self._done.append(("task", out))
            self._wake()
            # Drop this thread's references: an idle thread must not keep the last
            # result (or its inputs) alive after the worker frees it.
            del out, t
            if getattr(threading.current_thread(), "_zdist_seceded", False):
                return  # a replacement thread took this one's slot

    def _secede(self, key: str | None) -> None:
        th = threading.current_thread()
        if getattr(th, "_zdist_seceded", False) or th is self._io_thread:
            return  # a task run inline on the I/O thread holds no task-thread slot
        th._zdist_seceded = True  # type: ignore[attr-defined]
        self._start_thread()
        with self._threads_lock:
            self._active_threads -= 1
        if key is not None:
            self._done.append(("seceded", key))
            self._wake()

    def _rejoin(self) -> None:
        th = threading.current_thread()
        th._zdist_seceded = False  # type: ignore[attr-defined]
        with self._threads_lock:
            self._active_threads += 1
            surplus = self._active_threads > self.nthreads
        if surplus:
            self._ready.put(None)  # one idle thread retires

    def collect_done(self) -> None:
        done = self._done
        while done:
            kind, item = done.popleft()
            if kind == "task":
                self._task_done(item)
            elif kind == "seceded":
                self._send(P.TaskSeceded(item))
            elif kind == "run":
                request_id, ok, frames = item
                self._send(P.FunctionResult(request_id, ok), frames)
            elif kind == "peer-reply":
                self._reply_peer(item)

    def _task_done(self, out: Outcome) -> None:
        self._executing.discard(out.key)
        t = self.tasks.pop(out.key, None)
        frames = self._result_frames
        if out.ok:
            self.data.put(out.key, out.value, out.nbytes)
            ref = None if out.value_frames is None else frames.add(out.value_frames)
            self._results.append(
                [out.key, "memory", out.nbytes, out.typename, ref, "", out.duration]
            )
        else:
            assert out.error_frames is not None
            ref = frames.add(out.error_frames)
            self._results.append([out.key, "error", 0, "", ref, out.text, out.duration])
        del t

    def flush_results(self) -> None:
        if not self._results or self.status not in ("running", "closing", "retiring"):
            return
        links = self._links
        results, frames = self._results, self._result_frames.frames
        self._results = []
        self._result_frames = P.FrameList()
        door, first, rest = self._take_door_results(results)
        # Tasks a client sent us itself: its Submit may reach the broker after our
        # report anyway, so their results go first (the round trip's path).
        told = self._send_door_results(first, frames) if first else []
        untold: list[Any] = []
        groups = links.groups(rest, frames) if links.pending else {}
        # Reported first, delivered second: once a client has its result, the
        # broker knows of it too (a client asking the broker about its task right
        # after must not find it still running). A result counts as told if its
        # client's connection has worked; the few that then fail go in "untold".
        up = {to[1] for to in groups if links.is_up(to[1])}
        told.extend(run for to in groups if to[1] in up for run in groups[to][1])
        self._send(P.TaskResults(results, told or None, None, door), frames)
        for address, msg, runs in self._direct_messages(groups):
            if not links.send(address, msg, runs) and address in up:
                untold.extend(runs)
        untold.extend(links.take_dropped())
        if untold:
            self._send(P.TaskResults([], None, untold))

    def _direct_messages(
        self, groups: dict[tuple[bytes, str], tuple[list[Any], list[Any], P.FrameList]]
    ) -> list[tuple[str, list[Any], list[Any]]]:
        """(address, encoded DirectResults, its [key, run] pairs) per client."""
        worker = self._ident.decode()
        return [
            (
                address,
                P.encode(P.DirectResults(updates, self.door, worker), fl.frames),
                runs,
            )
            for (_, address), (updates, runs, fl) in groups.items()
        ]

    # ==================================================================================
    # Client.run

    def _on_run_function(self, msg: P.RunFunction, payload: list[Any]) -> None:
        def target() -> None:
            context.set_current(self)
            try:
                fn = self._functions.get(payload[0])
                args, kwargs = serialize.loads(payload[1:])
                result = fn(*args, **kwargs)
                frames, ok = serialize.dumps(result), True
            except BaseException as exc:
                frames, ok = serialize.dumps(exc), False
            self._done.append(("run", (msg.request_id, ok, frames)))
            self._wake()

        threading.Thread(target=target, name=f"{self.name}-run", daemon=True).start()

    # ==================================================================================
    # lifetime and shutdown

    def check_lifetime(self) -> None:
        lifetime = self.config.lifetime
        if (
            lifetime is not None
            and not self._closing
            and time.monotonic() - self._started > lifetime
        ):
            logger.info("worker %s reached its lifetime; handing work back", self.name)
            self.close_gracefully("lifetime")
        if self._closing and self.status != "closed":
            self._hand_back()

    def _hand_back(self) -> None:
        if self.status == "connecting":
            self.status = "closed"
            self._stop.set()
            return
        if self.status == "running":
            queued = self._withdraw(list(self.tasks), report=False)
            self._refuse_queued_door_tasks(queued)
            self.flush_results()
            self._send(P.WorkerStatus("closing", queued))
            self.status = "closing"
        if self.status == "closing" and not self._executing:
            self.flush_results()
            self._send(P.WorkerStatus("retiring", []))
            self.status = "retiring"
            self._retire_deadline = time.monotonic() + HANDOFF_TIMEOUT
        now = time.monotonic()
        if self.status == "retiring" and (
            self._may_exit
            or now > self._retire_deadline
            # no broker to hand results to: do not wait for it
            or now - self._last_heard > 3 * self.heartbeat_interval
        ):
            self.flush_results()
            self._send(P.WorkerStatus("closed", []))
            self.status = "closed"
            self._stop.set()

    def _poll_timeout(self) -> int:
        return int(min(self.heartbeat_interval, 0.25) * 1000)

    def _wake(self) -> None:
        # One byte per loop turn is enough: tasks finishing in a burst wake it once.
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        # Read first, then clear: cleared first, a task thread finishing in between
        # would set the flag and write a byte that this read swallows, leaving the
        # flag set with the pipe empty, and every later wake skipped (the loop then
        # ran only on its 250 ms poll timeout: W7 fell from ~20,000 to ~4,000
        # tasks/s after a few hundred thousand tasks). Whatever is appended before
        # the flag clears is collected by the collect_done() that follows.
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._wake_pending = False

    def _shutdown(self) -> None:
        for _ in self._threads:
            self._ready.put(None)
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
        for sock in self._peers.values():
            sock.close(linger=0)
        if self.broker is not None:
            self.broker.close(linger=0)
        self._links.close()
        self.data_sock.close(linger=0)
        self._close_door()
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx:
            self.ctx.term()
        self.data.close()
        if self._shm_pool is not None:
            self._shm_pool.shutdown(wait=True, cancel_futures=True)
        self.shm.close()
        self._janitor.close()  # removes the local directory
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _get_client(self, **kwargs: Any) -> Any:
        if self._client is None:
            from zdist.client.client import Client

            self._client = Client(
                self.broker_address,
                security=self.config.security or False,
                set_as_default=False,
                **kwargs,
            )
        return self._client

    def __repr__(self) -> str:
        return (
            f"<zdist.Worker {self.name!r} at {self.address}, {self.nthreads} threads>"
        )

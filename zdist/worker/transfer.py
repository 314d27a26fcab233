"""Data between workers: serving GetData on the worker's data port, and fetching
a task's inputs from the peers that hold them. A mixin of
:class:`~zdist.worker.worker.Worker`, run by its I/O loop like the rest of it.

Large values between two workers of one host skip the (encrypting) socket: they pass
through files in /dev/shm (zdist.worker.shm), written by a small thread pool. A value
that is mostly out-of-band buffers (a numpy array) is then held by the serving worker
through a mapping of the file it wrote, and its own copy is dropped: both workers
read the same pages, so a transfer does not double the value's memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq

from zdist import protocol as P
from zdist import serialize
from zdist.wire import recv_ready, send_frames
from zdist.worker.shm import MIN_SHM_BYTES, ShmError

if TYPE_CHECKING:
    import queue
    from collections import deque

    from zdist.logs import RateLimitedLog
    from zdist.worker.memory import SpillBuffer
    from zdist.worker.shm import SharedMemory
    from zdist.worker.worker import WorkerConfig, _Task

logger = logging.getLogger(__name__)


class _SharedReply:
    """A reply to a peer's GetData, waiting for its shared-memory files."""

    __slots__ = (
        "adopt",
        "failed",
        "files",
        "frames",
        "ident",
        "lock",
        "missing",
        "request_id",
        "values",
        "writing",
    )

    def __init__(
        self,
        ident: Any,
        request_id: int,
        values: list[Any],
        frames: P.FrameList,
        missing: list[Any],
    ) -> None:
        self.ident = ident
        self.request_id = request_id
        self.values = values
        self.frames = frames
        self.missing = missing
        self.files: list[Any] = []
        #: (key, the object served, views of the file it was written to)
        self.adopt: list[tuple[str, Any, list[memoryview]]] = []
        self.failed: list[tuple[str, list[Any], Exception]] = []
        self.writing = 0
        self.lock = threading.Lock()


class PeerTransfer:
    """The part of the Worker that other workers talk to, and that talks to them."""

    # The Worker's own attributes that these methods use (set in Worker.__init__).
    name: str
    config: WorkerConfig
    ctx: zmq.Context[Any]
    data: SpillBuffer
    data_sock: zmq.Socket[Any]
    shm: SharedMemory
    tasks: dict[str, _Task]
    heartbeat_interval: float
    liveness: int
    dropped: int
    _log: RateLimitedLog
    _ready: queue.SimpleQueue[_Task | None]
    _done: deque[Any]
    _results: list[Any]
    _wake: Callable[[], None]
    _drop: Callable[[str, Exception], None]

    def _init_transfer(self) -> None:
        """The transfer state, made by Worker.__init__ (its task code reads and
        prunes ``_fetch_wanted`` too)."""
        self._peers: dict[str, zmq.Socket[Any]] = {}
        self._fetching: dict[
            int, tuple[str, list[str], float]
        ] = {}  # req -> peer, keys, t
        self._new_peers: list[zmq.Socket[Any]] = []
        # Peers that shared memory failed with get the network from then on.
        self._shm_refused: set[str] = set()
        self._shm_pool: ThreadPoolExecutor | None = None  # writes files
        self.shm_transfers = 0  # values received through shared memory
        self.shm_fallbacks = 0  # ... that came over the network after all
        self.shm_adopted = 0  # values served and now held through the file's pages
        self._fetch_wanted: dict[str, list[str]] = {}  # dep key -> tasks waiting for it
        self._req = itertools.count(1)

    # ==================================================================================
    # serving peers: the data port

    def _pack_values(self, keys: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        frames = P.FrameList()
        values, missing = [], []
        for key in keys:
            if isinstance(key, str) and key in self.data:
                values.append([key, frames.add(serialize.dumps(self.data[key]))])
            else:
                missing.append(key)
        return values, frames.frames, missing

    def serve_peers(self) -> None:
        while True:
            frames = recv_ready(self.data_sock)
            if frames is None:
                return
            ident = frames[0]
            try:
                msg, _ = P.decode(frames[1:])
                if not isinstance(msg, P.GetData):
                    raise P.ProtocolError(f"{type(msg).__name__} on the data port")
                if self.shm.accepts(msg.host):
                    self._serve_shared(ident, msg)
                else:
                    values, payload, missing = self._pack_values(msg.keys)
                    reply = P.DataReply(msg.request_id, values, missing)
                    send_frames(self.data_sock, [ident, *P.encode(reply, payload)])
            except Exception as exc:
                self._drop("a peer message", exc)

    def _serve_shared(self, ident: Any, msg: P.GetData) -> None:
        """A peer of this host asked: large values go to shared-memory files, written
        by a few threads in parallel and off this loop, which sends the reply when
        the last is written (collect_done)."""
        frames = P.FrameList()
        values, missing, large = [], [], []
        for key in msg.keys:
            if isinstance(key, str) and key in self.data:
                obj = self.data[key]
                value = serialize.dumps(obj)
                if serialize.nbytes(value) >= MIN_SHM_BYTES:
                    large.append((key, obj, value))
                else:
                    values.append([key, frames.add(value)])
            else:
                missing.append(key)
        reply = _SharedReply(ident, msg.request_id, values, frames, missing)
        if not large:
            self._reply_peer(reply)
            return
        if self._shm_pool is None:
            self._shm_pool = ThreadPoolExecutor(
                min(4, os.cpu_count() or 1), thread_name_prefix=f"{self.name}-shm"
            )
        reply.writing = len(large)
        for key, obj, value in large:
            self._shm_pool.submit(self._write_shared, reply, key, obj, value)

    def _write_shared(
        self, reply: _SharedReply, key: str, obj: Any, value: list[Any]
    ) -> None:
        """In a pool thread: one value to a file, or kept for the socket on failure.
        A value that is mostly buffers is mapped back from the file here, before the
        receiver can unlink it, for this worker to hold instead of its own copy."""
        try:
            path, layout = self.shm.write(value)
        except Exception as exc:  # e.g. /dev/shm full: the network it is
            reply.failed.append((key, value, exc))
        else:
            if _mostly_buffers(value):
                try:
                    reply.adopt.append((key, obj, self.shm.map_written(path, layout)))
                except (OSError, ValueError) as exc:  # keep the copy in memory
                    logger.debug("cannot map %s back: %s", path, exc)
            reply.files.append([key, path, layout])
        with reply.lock:
            reply.writing -= 1
            last = not reply.writing
        if last:
            self._done.append(("peer-reply", reply))
            self._wake()

    def _reply_peer(self, reply: _SharedReply) -> None:
        for key, value, exc in reply.failed:
            self._log.warning(
                "shm-write",
                "worker %s cannot write %s to shared memory (%s); sending it over "
                "the network",
                self.name,
                key,
                exc,
            )
            reply.values.append([key, reply.frames.add(value)])
        msg = P.DataReply(
            reply.request_id, reply.values, reply.missing, reply.files or None
        )
        send_frames(self.data_sock, [reply.ident, *P.encode(msg, reply.frames.frames)])
        for key, obj, views in reply.adopt:
            try:
                mapped = serialize.loads(views)
            except Exception as exc:  # our own frames: not expected, never fatal
                logger.debug("cannot rebuild %s from its file: %s", key, exc)
                continue
            # Only if the value is still the one written (not freed or replaced).
            if self.data.swap(key, obj, mapped):
                self.shm_adopted += 1
        reply.adopt.clear()

    # ==================================================================================
    # fetching from peers

    def _fetch(self, peer: str, keys: list[str], shm: bool = True) -> None:
        sock = self._peers.get(peer)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 0
            if self.config.security:
                self.config.security.configure_client(sock)
            try:
                sock.connect(peer)
            except zmq.ZMQError as exc:  # a malformed address from the broker
                sock.close(linger=0)
                logger.warning(
                    "worker %s cannot connect to peer %r: %s", self.name, peer, exc
                )
                for key in keys:
                    self._fetch_wanted.setdefault(key, [])
                self._fetch_failed(peer, keys)
                return
            self._peers[peer] = sock
            self._new_peers.append(sock)
        req = next(self._req)
        self._fetching[req] = (peer, keys, time.monotonic())
        host = self.shm.token if shm and peer not in self._shm_refused else ""
        send_frames(sock, P.encode(P.GetData(req, keys, host)))

    def receive_from_peer(self, sock: zmq.Socket[Any]) -> None:
        while True:
            frames = recv_ready(sock)
            if frames is None:
                return
            try:
                msg, payload = P.decode(frames)
                if not isinstance(msg, P.DataReply):
                    raise P.ProtocolError(f"{type(msg).__name__} from a peer")
                self._on_fetched(msg, payload)
            except Exception as exc:
                self._drop("a peer reply", exc)

    def _on_fetched(self, msg: P.DataReply, payload: list[Any]) -> None:
        files = msg.shm or []
        for entry in files:
            if type(entry) is not list or len(entry) != 3 or type(entry[0]) is not str:
                raise P.ProtocolError(f"bad shared-memory entry {entry!r}")
        peer, _, _ = self._fetching.pop(msg.request_id, ("", [], 0.0))
        replicas: list[Any] = []
        for key, ref in msg.values:
            self._fetched(key, P.ref_frames(payload, ref), replicas)
        refetch = []
        for key, path, layout in files:
            try:
                frames = self.shm.read(path, layout)
            except ShmError as exc:
                self.shm_fallbacks += 1
                if peer not in self._shm_refused:
                    self._shm_refused.add(peer)
                    logger.warning(
                        "worker %s: no shared memory with %s (%s); fetching over "
                        "the network from it",
                        self.name,
                        peer or "a peer",
                        exc,
                    )
                refetch.append(key)
                continue
            self.shm_transfers += 1
            self._fetched(key, frames, replicas)
            del frames
        if replicas:
            self._results.extend(replicas)
        self._fetch_failed(peer, msg.missing)
        if refetch and peer:
            self._fetch(peer, refetch, shm=False)

    def _fetched(self, key: str, frames: list[Any], replicas: list[Any]) -> None:
        value = serialize.loads(frames)
        size = serialize.nbytes(frames)
        self.data.put(key, value, size)
        replicas.append([key, "memory", size, type(value).__name__, None, "", -1.0])
        self._dep_arrived(key)

    def _fetch_failed(self, peer: str, keys: list[Any]) -> None:
        """Tell the broker these tasks lack an input the peer could not give."""
        for key in keys:
            for tkey in self._fetch_wanted.pop(key, []):
                t = self.tasks.pop(tkey, None)
                if t is not None:
                    self._results.append([tkey, "missing", 0, peer, None, key, -1.0])

    def expire_fetches(self) -> None:
        """A peer that does not answer within the liveness period is presumed dead."""
        deadline = time.monotonic() - self.heartbeat_interval * self.liveness
        for req, (peer, keys, sent) in list(self._fetching.items()):
            if sent < deadline:
                del self._fetching[req]
                logger.warning(
                    "worker %s: peer %s did not answer; giving up on %s",
                    self.name,
                    peer,
                    keys,
                )
                self._fetch_failed(peer, keys)
                sock = self._peers.pop(peer, None)
                if sock is not None:
                    sock.close(linger=0)

    def _dep_arrived(self, key: str) -> None:
        for tkey in self._fetch_wanted.pop(key, []):
            t = self.tasks.get(tkey)
            if t is None:
                continue
            t.missing.discard(key)
            if not t.missing:
                self._ready.put(t)


def _mostly_buffers(frames: list[Any]) -> bool:
    """Is a value's pickle mostly out-of-band buffers (rebuilt from a mapping without
    copying them), rather than in-band bytes a rebuild would copy?"""
    total = serialize.nbytes(frames)
    return len(frames) > 1 and total - serialize.nbytes(frames[:1]) >= 0.9 * total

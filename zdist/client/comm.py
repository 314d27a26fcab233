"""The client's connection to the broker: two DEALER sockets and an I/O thread.

Replies arrive on the *receiving* socket and become FutureState updates and request
slots. A thread waiting on a result reads that socket itself (Connection.wait_for):
the reply then wakes the thread that wants it, not the I/O thread, which would have
to wake it in turn (a thread hand-off costs 30-100 us on these machines). When no
thread waits, the I/O thread reads it. Whoever reads holds ``_rx_lock``, and only
while reading; future callbacks always run on the I/O thread.

Everything the client sends goes out on a second socket, guarded by a lock, from
whichever thread is sending: a submit leaves straight from the user's thread instead
of waiting for the I/O thread to wake. ZeroMQ allows a socket to be used by several
threads one at a time with a memory barrier, which a lock is; nobody polls the
sending socket. The broker treats the sending socket's identity (the receiving one's
plus ``+s``) as the same client, and one socket carries every outgoing message to
the broker, so their order is kept.

Beside them, lone tasks go straight to an idle worker on this host through its door,
a plain Unix socket (zdist.datagram, zdist.worker.door), and their results come back
on it: whoever reads the receiving socket reads those connections too. A thread
holding ``_send_lock`` never waits for ``_rx_lock``; it only tries it
(_close_dead_doors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import select
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from zdist import datagram
from zdist import protocol as P
from zdist.errors import CommClosedError, ZdistError
from zdist.localsocket import (
    bind_local_socket,
    check_local_socket,
    path_of,
    remove_socket,
    sweep_stale,
    user_socket_dir,
)
from zdist.net import is_ipc
from zdist.security import Security
from zdist.wire import readable, recv_ready, send_frames

if TYPE_CHECKING:
    from zdist.client.future import FutureState

logger = logging.getLogger(__name__)

#: Milliseconds between the I/O thread's looks while a thread waits on a result (and
#: reads the socket itself): how late a message can be read once the waiting ends.
#: While no wait ends, the looks space out, doubling up to WAITER_TICK_MAX_MS (a client
#: waiting an hour on one result would otherwise use 1.5% of a core); the waiting
#: thread that ends a long wait wakes the I/O thread instead.
WAITER_TICK_MS = 5
WAITER_TICK_MAX_MS = 250
#: A waiting thread looks at its future at least this often (milliseconds), whatever
#: happens to the socket.
WAIT_RECHECK_MS = 1000
#: Worker doors (DirectResults.door) a client keeps a connection to, the latest used.
MAX_DOORS = 8


class _Waker:
    """A non-blocking pipe a thread polls beside the socket, written to wake it: the
    I/O thread's, and each waiting thread's (written when another thread finishes
    its future). ``owner``: the thread that polls it, if known; while it reads
    (``reading``), it is awake when it wakes itself (finishing its own future), and
    the write, and the next poll's early return and read, would be for nothing. (A
    signal handler on that thread, interrupting its poll, still writes.)"""

    __slots__ = ("owner", "r", "reading", "w")

    def __init__(self, owner: int | None = None) -> None:
        self.owner = owner
        self.reading = False
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def wake(self) -> None:
        if self.reading and self.owner == threading.get_ident():
            return
        try:
            os.write(self.w, b"x")
        except OSError:  # full (it is waking anyway) or closed
            pass

    def drain(self) -> None:
        try:
            while os.read(self.r, 65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        for fd in (getattr(self, "r", -1), getattr(self, "w", -1)):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.r = self.w = -1

    def __del__(self) -> None:
        self.close()


class Request:
    """A reply slot a user thread waits on."""

    __slots__ = ("event", "expect", "lost", "replies")

    def __init__(self, expect: int = 1) -> None:
        self.event = threading.Event()
        self.replies: list[tuple[P.Message, list[Any]]] = []
        self.expect = expect
        self.lost = ""  # why no reply will come (the broker went away)


class Connection:
    def __init__(
        self,
        address: str,
        security: Security | None,
        on_message: Callable[[P.Message, list[Any]], None],
        on_lost: Callable[[str], None],
        timeout: float,
        take_releases: Callable[[], list[str]] = list,
        unwanted: Callable[[list[str]], list[str]] = list,
    ) -> None:
        if is_ipc(address):  # only we can have made it (localsocket)
            address = check_local_socket(address)
        self.address = address
        self.security = security
        self.timeout = timeout
        self._on_message = on_message
        self._on_lost = on_lost
        self._take_releases = take_releases
        self._unwanted = unwanted
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = 0
        self.sock.rcvhwm = 0
        self.sock.identity = f"c-{uuid.uuid4().hex}".encode()
        #: Where workers on this host send this client results themselves (see
        #: zdist.worker.direct): the receiving socket also listens on a Unix socket
        #: of ours. Nothing is ever sent on that socket but the registration, before
        #: anyone knows the address, so its messages all go to the broker.
        self.direct: str | None = None
        if is_ipc(address):  # on the broker's host
            self.direct = _listen_locally(self.sock)
        self.out = self.ctx.socket(zmq.DEALER)
        self.out.linger = 0
        self.out.sndhwm = 0
        self.out.identity = self.sock.identity + P.SENDER_SUFFIX
        if security and not is_ipc(address):
            # TCP: CurveZMQ (a local socket is checked by the kernel, localsocket).
            security.configure_client(self.sock)
            security.configure_client(self.out)
        self._send_lock = threading.Lock()
        #: The door of the worker that last sent us results (DirectResults.door):
        #: (its address, the worker's identity with the broker), a hint written
        #: without a lock; and a connection to each door used lately (``_doors``,
        #: under _send_lock). The results of door tasks come back on them: whoever
        #: reads the receiving socket reads these too, from ``_door_rx`` (replaced
        #: whole, under _door_lock, when one is opened or retired at its end;
        #: ``_door_gen`` counts the changes, for the pollers). Retired ones wait in
        #: ``_door_dead`` to be closed (_close_dead_doors).
        self.door: tuple[str, str] | None = None
        self._doors: OrderedDict[str, socket.socket] = OrderedDict()
        self._door_runs = itertools.count(P.DOOR_RUN - 1, -1)
        self._door_lock = threading.Lock()
        self._door_rx: tuple[socket.socket, ...] = ()
        self._door_gen = 0
        self._door_dead: list[socket.socket] = []
        self._door_reader = datagram.Reader()  # under _rx_lock
        #: Threads waiting on a result (wait_for): woken when a door connection
        #: opens, to poll it too. Under _waiters_lock.
        self._waiting: set[_Waker] = set()
        # Reading the receiving socket: the I/O thread, or a thread waiting on a
        # result (wait_for), one at a time and only while reading.
        self._rx_lock = threading.Lock()
        self._rx_closed = False
        self._rx_fd: int = self.sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._waiters = 0
        self._waits_ended = 0  # under _waiters_lock
        self._waiters_lock = threading.Lock()
        #: The I/O thread's current poll timeout while threads wait (WAITER_TICK_MS).
        self._io_tick = WAITER_TICK_MS
        self._wakers = threading.local()
        self._deferred: deque[list[Callable[[], None]]] = deque()
        # Left for the I/O thread to read: a waiting thread stopped early or was
        # interrupted halfway through a message (_redo).
        self._rx_pending = False
        self._redo: deque[tuple[P.Message, list[Any]]] = deque()
        self._register: P.RegisterClient | None = None
        self._last_sent = time.monotonic()
        self._wake = _Waker()  # the I/O thread's
        self._requests: dict[int, Request] = {}
        self._req = itertools.count(1)
        self._stop = threading.Event()
        self.closed = False
        self.heartbeat_interval = P.CLIENT_HEARTBEAT_INTERVAL
        self.welcome: P.Welcome | None = None
        self._welcomed = threading.Event()
        self._last_heard = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name="zdist-client-io", daemon=True
        )

    # --- user side --------------------------------------------------------------------

    def start(self, register: P.RegisterClient) -> P.Welcome:
        self.sock.connect(self.address)
        self.out.connect(self.address)
        # Registration goes on the receiving socket (from the I/O thread), so that
        # the broker knows that connection before it answers on it.
        self._register = register
        self._thread.start()
        if not self._welcomed.wait(self.timeout):
            self.close()
            raise TimeoutError(
                f"no answer from a zdist broker at {self.address} within "
                f"{self.timeout} s: "
                f"check the address, that the broker runs, and that you hold this "
                f"cluster's keys (CurveZMQ refuses a wrong key pair silently)"
            )
        assert self.welcome is not None
        return self.welcome

    def send(self, msg: P.Message, payload: Any = ()) -> None:
        """Send ``msg`` from the calling thread; keys released since the last message
        go first, inside it if it is a Submit, else just before it (the I/O thread
        sends them when nothing else goes: a sequence of submit(...).result() calls
        then wakes no other thread to release each previous result)."""
        if self.closed:
            raise CommClosedError("this client is closed")
        released = self._take_releases()
        carried: list[str] = []
        submit = msg if type(msg) is P.Submit and msg.release is None else None
        try:
            if released and submit is not None:
                # One message, not two, on the path of every submit(...).result().
                carrying = dataclasses.replace(submit, release=released)
                frames = P.encode(carrying, payload)
                carried, released = released, []
            else:
                frames = P.encode(msg, payload)
        except BaseException:
            if released:  # the message cannot go; the releases still must
                self.send_releases(released)
            raise
        with self._send_lock:
            if self.out.closed:
                raise CommClosedError("this client is closed")
            if carried and submit is not None:
                kept = self._unwanted(carried)
                if len(kept) != len(carried):  # wanted again since taken (rare)
                    again = dataclasses.replace(submit, release=kept or None)
                    frames[0] = P.encode(again)[0]
            self._send_releases_locked(released)
            send_frames(self.out, frames)
            self._last_sent = time.monotonic()

    def note_door(self, door: str, worker: str) -> None:
        """A local worker's door (DirectResults.door), from the thread reading."""
        if self.direct is not None and is_ipc(door):
            self.door = (door, worker)

    def next_door_run(self) -> int:
        """A new run number for a door task (below DOOR_RUN, never reused)."""
        return next(self._door_runs)

    def send_door(self, door: str, frames: list[Any]) -> bool:
        """Send a lone task (a RunTasks) through a worker's door; False if it cannot
        go now (the worker has gone, or its queue is full): it then goes by the
        broker alone, and the door is forgotten until a result names it again."""
        with self._send_lock:
            if self.out.closed:
                return False
            if self._door_dead:
                self._close_dead_doors(self._rx_lock)
            conn = self._doors.get(door)
            if conn is None:
                conn = self._open_door(door)
                if conn is None:
                    return False
            else:
                self._doors.move_to_end(door)
            if datagram.send(conn, frames):
                return True
            self._forget_door(door)
            return False

    def _open_door(self, door: str) -> socket.socket | None:
        """A connection to a door (under _send_lock), or None (the door is then
        forgotten: a later result names the next)."""
        try:
            # Only our own user can have made it (zdist.localsocket); and the
            # process listening must be ours (datagram.connect).
            conn = datagram.connect(path_of(check_local_socket(door)))
        except (ZdistError, OSError, ValueError) as exc:
            logger.info("not using the worker door %r: %s", door[:200], exc)
            self._forget_door(door)
            return None
        self._doors[door] = conn
        with self._door_lock:
            self._door_rx = (*self._door_rx, conn)
            self._door_gen += 1
        while len(self._doors) > MAX_DOORS:
            self._forget_door(next(iter(self._doors)))
        # Whoever polls now must poll this one too.
        self._wake.wake()
        with self._waiters_lock:
            waiting = list(self._waiting)
        for waker in waiting:
            waker.wake()
        return conn

    def _forget_door(self, door: str) -> None:
        """Stop using a door (under _send_lock). Its connection is shut down, not
        closed: the worker's sends fail from now on (its results then come by
        ZeroMQ), and what it sent before is still read, to the connection's end,
        where a reader retires it (_read_doors)."""
        if self.door is not None and self.door[0] == door:
            self.door = None
        conn = self._doors.pop(door, None)
        if conn is None:
            return
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected any more: nothing left to read
            with self._door_lock:
                self._retire_door(conn)
            self._close_dead_doors(self._rx_lock)

    def _retire_door(self, conn: socket.socket) -> None:
        """No reader polls or reads ``conn`` from now on (under _door_lock)."""
        self._door_rx = tuple(c for c in self._door_rx if c is not conn)
        self._door_gen += 1
        if conn not in self._door_dead:
            self._door_dead.append(conn)

    def _close_dead_doors(self, other: threading.Lock) -> None:
        """Close retired connections: only while holding both the send and the read
        lock (a sender or a reader may be halfway through one), so the caller holds
        one and ``other`` is the other, tried without waiting (the two are taken in
        either order); else they are left for the next try."""
        if not self._door_dead or not other.acquire(blocking=False):
            return
        try:
            with self._door_lock:
                dead, self._door_dead = self._door_dead, []
            for conn in dead:
                for door, c in list(self._doors.items()):
                    if c is conn:
                        del self._doors[door]
                        if self.door is not None and self.door[0] == door:
                            self.door = None
                conn.close()
        finally:
            other.release()

    def send_releases(self, keys: list[str]) -> None:
        """Send these released keys now (the I/O thread's turn, a failed send)."""
        with self._send_lock:
            if not self.out.closed:
                self._send_releases_locked(keys)
                self._last_sent = time.monotonic()

    def _send_releases_locked(self, keys: list[str]) -> None:
        # Checked under the send lock: a key some thread wanted again after it was
        # taken is not released, and a message that wants it again, sent by another
        # thread, cannot overtake this release (it waits for the lock).
        keys = self._unwanted(keys) if keys else keys
        if keys:
            send_frames(self.out, P.encode(P.ReleaseKeys(keys)))

    def wake(self) -> None:
        """Have the I/O thread run a loop turn (and send pending releases)."""
        if not self.closed:
            self._wake.wake()

    def defer_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        """Run these future callbacks on the I/O thread, after the read that
        finished their futures: never under ``_rx_lock``, always in finishing order."""
        wake = not self._deferred and threading.current_thread() is not self._thread
        self._deferred.append(callbacks)
        if wake:
            self.wake()

    def wait_for(self, st: FutureState, timeout: float | None) -> bool:
        """Block until ``st`` is finished (or ``timeout`` seconds), reading the socket
        from this thread meanwhile; True if finished."""
        if st.done:
            return True
        if self._rx_closed or threading.current_thread() is self._thread:
            return st.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        waker = getattr(self._wakers, "waker", None)
        if waker is None:
            waker = self._wakers.waker = _Waker(threading.get_ident())
        counted = False
        try:
            if not st.add_waker(waker):
                return True
            with self._waiters_lock:
                self._waiters += 1
                self._waiting.add(waker)
                counted = True
            poller = select.poll()
            poller.register(self._rx_fd, select.POLLIN)
            poller.register(waker.r, select.POLLIN)
            # The door connections too (their results); again when they change.
            gen, doors = self._poll_doors(poller, [], (self._rx_fd, waker.r))
            # Every read ends by asking the socket whether more is waiting (which
            # re-arms its descriptor), or leaves _rx_pending set: unless it is set, a
            # poll sees whatever arrives from now on, and the first read can wait.
            polled = not self._rx_pending
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return st.done
                if polled:
                    polled = False
                else:
                    # Held by others only while they read.
                    if not self._rx_lock.acquire(timeout=-1 if left is None else left):
                        return st.done
                    waker.reading = True
                    try:
                        if self._rx_closed:
                            break
                        # Before polling: the socket's descriptor only signals what
                        # arrives after the last read.
                        self._read(until=st, deadline=deadline)
                    finally:
                        waker.reading = False
                        self._rx_lock.release()
                    if st.done:
                        return True
                ms = WAIT_RECHECK_MS
                if deadline is not None:
                    ms = max(
                        0, min(ms, math.ceil((deadline - time.monotonic()) * 1000))
                    )
                if any(fd == waker.r for fd, _ in poller.poll(ms)):
                    waker.drain()
                if st.done:
                    return True
                if gen != self._door_gen:
                    gen, doors = self._poll_doors(poller, doors, (self._rx_fd, waker.r))
        finally:
            if counted:
                with self._waiters_lock:
                    self._waiting.discard(waker)
                    # Read before we stop counting: the I/O thread then resets it.
                    tick = self._io_tick
                    self._waiters -= 1
                    self._waits_ended += 1
                    last = self._waiters == 0
                if last and tick > WAITER_TICK_MS:
                    # A long wait: the I/O thread looks rarely; the socket is its
                    # to read again now.
                    self.wake()
            st.remove_waker(waker)
        # Closed meanwhile: whoever closed it finishes the futures.
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return st.wait(left)

    def _poll_doors(
        self, poller: Any, polled: list[int], keep: tuple[int, ...]
    ) -> tuple[int, list[int]]:
        """Have ``poller`` poll the door connections open now instead of ``polled``
        (descriptors in ``keep`` are the poller's own); returns (``_door_gen`` as
        read, the descriptors now polled)."""
        with self._door_lock:
            gen, conns = self._door_gen, self._door_rx
        for fd in polled:
            if fd not in keep:
                poller.unregister(fd)
        fds = [fd for fd in (c.fileno() for c in conns) if fd >= 0 and fd not in keep]
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return gen, fds

    def request(
        self, make: Callable[[int], P.Message], payload: Any = (), expect: int = 1
    ) -> tuple[int, Request]:
        req_id = next(self._req)
        slot = self._requests[req_id] = Request(expect)
        self.send(make(req_id), payload)
        return req_id, slot

    def wait(
        self, req_id: int, slot: Request, timeout: float | None
    ) -> list[tuple[P.Message, list[Any]]]:
        try:
            if not slot.event.wait(timeout):
                raise TimeoutError(f"no reply from the broker within {timeout} s")
        finally:
            self._requests.pop(req_id, None)
        if slot.lost and not slot.replies:
            raise CommClosedError(slot.lost)
        for msg, _ in slot.replies:
            if isinstance(msg, P.Error):
                raise ZdistError(f"the broker refused the request: {msg.text}")
        if self.closed and not slot.replies:
            raise CommClosedError("the connection to the broker was closed")
        return slot.replies

    def fail_requests(self, why: str) -> None:
        """Wake every waiting request: no reply will come."""
        for slot in list(self._requests.values()):
            slot.lost = why
            slot.event.set()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._wake.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)
        elif self._thread.ident is None and self.direct is not None:
            remove_socket(self.direct)  # never started: its finally will not run
        for slot in list(self._requests.values()):
            slot.event.set()

    # --- I/O thread -------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake.r, select.POLLIN)
        watching = False  # the socket's descriptor is in the poll set
        # The door connections polled while watching (see wait_for).
        own = (self._wake.r, self._rx_fd)
        gen = -1
        doors: list[int] = []
        tick, ended = WAITER_TICK_MS, self._waits_ended
        self._last_sent = time.monotonic()
        try:
            if self._register is not None:
                with self._rx_lock:
                    send_frames(self.sock, P.encode(self._register))
            while True:
                # While a thread waits on a result it reads the socket itself: the
                # I/O thread stays out of its way and looks again every few ms.
                nobody_waits = self._waiters == 0
                if nobody_waits or self._rx_pending:
                    with self._rx_lock:
                        # Again under the lock: a thread may have begun to wait.
                        nobody_waits = self._waiters == 0
                        if nobody_waits or self._rx_pending:
                            self._read()  # before polling (see wait_for)
                    self._run_deferred()
                if nobody_waits:
                    if not watching:
                        poller.register(self._rx_fd, select.POLLIN)
                        watching = True
                    if gen != self._door_gen:
                        gen, doors = self._poll_doors(poller, doors, own)
                elif watching:
                    poller.unregister(self._rx_fd)
                    watching = False
                    for fd in doors:
                        poller.unregister(fd)
                    gen, doors = -1, []  # polled again once watching
                if nobody_waits or ended != self._waits_ended:
                    tick, ended = WAITER_TICK_MS, self._waits_ended
                # Set before polling: a wait that ends now wakes us if this is long.
                self._io_tick = tick
                events = poller.poll(WAITER_TICK_MAX_MS if nobody_waits else tick)
                if not events and not nobody_waits:
                    tick = min(2 * tick, WAITER_TICK_MAX_MS)
                if any(fd == self._wake.r for fd, _ in events):
                    self._wake.drain()
                self._run_deferred()
                released = self._take_releases()
                if released and not self._stop.is_set():
                    self.send_releases(released)
                if self._stop.is_set():
                    return
                now = time.monotonic()
                if self.welcome is not None:
                    if now - self._last_sent > self.heartbeat_interval:
                        self.send(P.Heartbeat({}))
                    if now - self._last_heard > max(
                        self.timeout, 3 * self.heartbeat_interval
                    ):
                        why = (
                            f"the broker at {self.address} has not answered for "
                            f"{now - self._last_heard:.0f} s"
                        )
                        self.fail_requests(why)
                        self._on_lost(why)
                        self._last_heard = now
                        self._run_deferred()
        except Exception:
            logger.exception("client I/O thread failed")
            self.fail_requests("the client's I/O thread failed")
            self._on_lost("the client's I/O thread failed")
        finally:
            with self._rx_lock:
                self._rx_closed = True
                self.sock.close(linger=0)
                if self.direct is not None:
                    remove_socket(self.direct)
            with self._send_lock:
                self.out.close(linger=0)
                with self._door_lock:
                    conns = {*self._doors.values(), *self._door_rx, *self._door_dead}
                    self._door_rx = ()
                    self._door_gen += 1
                for conn in conns:
                    conn.close()
                self._doors.clear()
                self._door_dead.clear()
            self._run_deferred()
            self.ctx.term()
            self._wake.close()

    def _run_deferred(self) -> None:
        while self._deferred:
            for cb in self._deferred.popleft():
                try:
                    cb()
                except Exception:
                    logger.exception("future callback failed")

    def _read(
        self, until: FutureState | None = None, deadline: float | None = None
    ) -> None:
        """Read and handle what the receiving socket holds (the caller holds
        ``_rx_lock``). A waiting thread stops once its own future is finished or its
        time is up; what it leaves is the I/O thread's, as the socket's descriptor
        will not signal it again. Messages a waiting thread was interrupted in
        (Ctrl-C) are handled again by the I/O thread: finishing a future twice, or
        answering a request twice with the same message, changes nothing."""
        sock = self.sock
        redo = self._redo
        while redo:
            try:
                self._handle(*redo[0])
            except Exception:
                logger.exception("client failed to handle a message from the broker")
            redo.popleft()  # not if interrupted: then it is handled again
        if self._door_rx:
            self._read_doors()
        while True:
            # Set while the socket is touched, cleared once it is seen empty: a
            # read interrupted anywhere (Ctrl-C) leaves it set, so the next reader
            # reads before it polls (the descriptor may have been drained).
            self._rx_pending = True
            if until is not None and (
                until.done or (deadline is not None and time.monotonic() >= deadline)
            ):
                if readable(sock):
                    self.wake()
                else:
                    self._rx_pending = False
                return
            decoded: tuple[P.Message, list[Any]] | None = None
            frames = None
            try:
                frames = recv_ready(sock)
                if frames is None:
                    self._rx_pending = False
                    return
                try:
                    decoded = P.decode(frames)
                except P.ProtocolError as exc:
                    logger.warning("dropped a message from the broker: %s", exc)
                    continue
                if type(decoded[0]) is not P.DirectResults:  # a worker's: not news
                    self._last_heard = time.monotonic()  # of the broker
                self._handle(*decoded)
            except Exception:  # a bug here must not stop the client reading
                logger.exception("client failed to handle a message from the broker")
            except BaseException:  # interrupted: the I/O thread handles it again
                if decoded is None and frames is not None:
                    with contextlib.suppress(P.ProtocolError):
                        decoded = P.decode(frames)
                if decoded is not None:
                    redo.append(decoded)
                self._rx_pending = True
                self.wake()
                raise

    def _read_doors(self) -> None:
        """Read and handle the results that came back through doors (the caller
        holds ``_rx_lock``). A datagram is whole: a read interrupted after one was
        taken leaves it to the I/O thread (``_redo``), as in _read."""
        reader = self._door_reader
        for conn in self._door_rx:
            while True:
                frames = None
                decoded: tuple[P.Message, list[Any]] | None = None
                try:
                    frames = reader.recv(conn)
                    if frames is None:
                        break
                    decoded = P.decode(frames)
                    if type(decoded[0]) is not P.DirectResults:
                        raise P.ProtocolError(
                            f"{type(decoded[0]).__name__} through a worker's door"
                        )
                    self._handle(*decoded)
                except EOFError:  # the worker has gone, or we shut it down
                    with self._door_lock:
                        self._retire_door(conn)
                    break
                except P.ProtocolError as exc:
                    logger.warning("dropped a message from a worker: %s", exc)
                except Exception:
                    logger.exception("client failed to handle a worker's message")
                except BaseException:  # interrupted: the I/O thread handles it again
                    if decoded is None and frames is not None:
                        with contextlib.suppress(P.ProtocolError):
                            decoded = P.decode(frames)
                    if decoded is not None and type(decoded[0]) is P.DirectResults:
                        self._redo.append(decoded)
                    self._rx_pending = True
                    self.wake()
                    raise
        if self._door_dead:
            self._close_dead_doors(self._send_lock)

    def _handle(self, msg: P.Message, payload: list[Any]) -> None:
        req_id = getattr(msg, "request_id", 0)
        if isinstance(msg, P.Welcome):
            self.welcome = msg
            self.heartbeat_interval = msg.heartbeat_interval
            self._welcomed.set()
        elif req_id and req_id in self._requests:
            slot = self._requests[req_id]
            if not any(m is msg for m, _ in slot.replies):
                slot.replies.append((msg, payload))
            if len(slot.replies) >= slot.expect or isinstance(msg, P.Error):
                slot.event.set()
        else:
            self._on_message(msg, payload)


def _listen_locally(sock: zmq.Socket[Any]) -> str | None:
    """Bind ``sock`` to a new Unix socket in this user's private directory; its
    address, or None where that cannot be (results then all come by the broker)."""
    directory = user_socket_dir()
    if directory is None:
        return None
    sweep_stale(directory)
    try:
        return bind_local_socket(
            sock, os.path.join(directory, f"{uuid.uuid4().hex}.sock"), zap=False
        )
    except (OSError, zmq.ZMQError, ZdistError) as exc:
        logger.info("results will all come by the broker: %s", exc)
        return None

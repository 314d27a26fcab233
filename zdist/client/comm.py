"""The client's connection to the broker: two DEALER sockets and an I/O thread.

The I/O thread owns the *receiving* socket: it polls it and turns replies into
FutureState updates and request slots. Everything the client sends goes out on a
second socket, guarded by a lock, from whichever thread is sending: a submit leaves
straight from the user's thread instead of waiting for the I/O thread to wake (a
thread hand-off costs about 100 us on these machines). ZeroMQ allows a socket to be
used by several threads one at a time with a memory barrier, which the lock is; the
I/O thread never polls the sending socket. The broker treats the sending socket's
identity (the receiving one's plus ``+s``) as the same client, and one socket carries
every outgoing message, so their order is kept.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from zdist import protocol as P
from zdist.errors import CommClosedError, ZdistError
from zdist.security import Security
from zdist.wire import recv_ready, send_frames

logger = logging.getLogger(__name__)


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
        self.out = self.ctx.socket(zmq.DEALER)
        self.out.linger = 0
        self.out.sndhwm = 0
        self.out.identity = self.sock.identity + P.SENDER_SUFFIX
        if security:
            security.configure_client(self.sock)
            security.configure_client(self.out)
        self._send_lock = threading.Lock()
        self._register: P.RegisterClient | None = None
        self._last_sent = time.monotonic()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
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
                carrying = P.Submit(submit.tasks, submit.wants, released)
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
                    again = P.Submit(submit.tasks, submit.wants, kept or None)
                    frames[0] = P.encode(again)[0]
            self._send_releases_locked(released)
            send_frames(self.out, frames)
            self._last_sent = time.monotonic()

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
            os.write(self._wake_w, b"x")

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
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)
        for slot in list(self._requests.values()):
            slot.event.set()

    # --- I/O thread -------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._last_sent = time.monotonic()
        try:
            if self._register is not None:
                send_frames(self.sock, P.encode(self._register))
            while True:
                events = dict(poller.poll(250))
                if self._wake_r in events:
                    try:
                        while os.read(self._wake_r, 65536):
                            pass
                    except BlockingIOError:
                        pass
                released = self._take_releases()
                if released and not self._stop.is_set():
                    self.send_releases(released)
                if self._stop.is_set():
                    return
                if self.sock in events:
                    self._receive()
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
        except Exception:
            logger.exception("client I/O thread failed")
            self.fail_requests("the client's I/O thread failed")
            self._on_lost("the client's I/O thread failed")
        finally:
            self.sock.close(linger=0)
            with self._send_lock:
                self.out.close(linger=0)
            self.ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _receive(self) -> None:
        while True:
            frames = recv_ready(self.sock)
            if frames is None:
                return
            self._last_heard = time.monotonic()
            try:
                msg, payload = P.decode(frames)
            except P.ProtocolError as exc:
                logger.warning("dropped a message from the broker: %s", exc)
                continue
            req_id = getattr(msg, "request_id", 0)
            if isinstance(msg, P.Welcome):
                self.welcome = msg
                self.heartbeat_interval = msg.heartbeat_interval
                self._welcomed.set()
            elif req_id and req_id in self._requests:
                slot = self._requests[req_id]
                slot.replies.append((msg, payload))
                if len(slot.replies) >= slot.expect or isinstance(msg, P.Error):
                    slot.event.set()
            else:
                self._on_message(msg, payload)

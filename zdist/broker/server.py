"""The broker process: one ROUTER socket and one poll loop around the state machine.

Each loop turn reads a burst of messages (so replies are batched under load), feeds them
to :class:`~zdist.broker.state.BrokerState`, expires silent peers, and sends what the
state produced. Nothing from the network is trusted: a message that does not decode or
that the state rejects is counted, logged (rate-limited) and dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from zdist import protocol as P
from zdist._version import versions
from zdist.broker.dashboard import Dashboard
from zdist.broker.state import BrokerConfig, BrokerState
from zdist.localsocket import bind_local_socket, remove_socket
from zdist.logs import RateLimitedLog, log_buffer
from zdist.net import interface_ip
from zdist.security import Security
from zdist.wire import recv_ready, send_frames

logger = logging.getLogger(__name__)

#: Messages read per loop turn before replying; larger batches more under load.
BURST = 1000
#: Seconds between liveness checks; a fraction of the heartbeat interval.
TICK_FRACTION = 0.25


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8786
    interface: str | None = None
    heartbeat_interval: float = P.HEARTBEAT_INTERVAL
    liveness: int = P.WORKER_LIVENESS
    client_heartbeat_interval: float = P.CLIENT_HEARTBEAT_INTERVAL
    client_liveness: int = P.CLIENT_LIVENESS
    allowed_failures: int = 3
    max_frames: int = P.MAX_FRAMES_DEFAULT
    max_message_bytes: int = P.MAX_MESSAGE_BYTES_DEFAULT
    #: ``":8787"`` serves the dashboard on localhost:8787; None turns it off.
    dashboard_address: str | None = None
    #: Also listen on a Unix socket at this path, for peers on this host (see
    #: zdist.localsocket); its directory must be private.
    local_socket: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class BrokerServer:
    def __init__(self, config: ServerConfig, security: Security | None) -> None:
        self.config = config
        self.security = security
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._auth = security.start_authenticator(self.ctx) if security else None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.router_handover = (
            1  # a worker reconnecting with its id replaces the old pipe
        )
        self.sock.sndhwm = 0
        self.sock.rcvhwm = 0
        self.local_address: str | None = None
        if config.local_socket:
            self.local_address = bind_local_socket(
                self.sock, config.local_socket, zap=security is not None
            )
        if security:
            security.configure_server(self.sock)
        host = interface_ip(config.interface) if config.interface else config.host
        bind_host = "*" if host in ("0.0.0.0", "") else host
        if config.port:
            self.sock.bind(f"tcp://{bind_host}:{config.port}")
            port = config.port
        else:
            port = self.sock.bind_to_random_port(f"tcp://{bind_host}")
        connect_host = host if host not in ("0.0.0.0", "", "*") else _public_host()
        self.address = f"tcp://{connect_host}:{port}"
        self.state = BrokerState(
            BrokerConfig(
                address=self.address,
                heartbeat_interval=config.heartbeat_interval,
                liveness=config.liveness,
                client_heartbeat_interval=config.client_heartbeat_interval,
                client_liveness=config.client_liveness,
                allowed_failures=config.allowed_failures,
            ),
            versions(),
        )
        self.counters = self.state.counters
        self.counters.update(dropped=0, payload_bytes_forwarded=0, messages_in=0)
        self._stop = threading.Event()
        # stop() (from a signal handler or another thread) wakes the poll at once.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._log = RateLimitedLog(logger)
        self.state.log_lines = lambda: [list(r) for r in log_buffer().records]
        self.dashboard: Dashboard | None = None
        if config.dashboard_address:
            self.dashboard = Dashboard(config.dashboard_address)
            self.state.dashboard = self.dashboard.link
        self.pid = os.getpid()

    # ----------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run the poll loop until :meth:`stop`; closes the sockets on the way out."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        tick_every = self.config.heartbeat_interval * TICK_FRACTION
        next_tick = time.monotonic()
        try:
            busy = False
            while not self._stop.is_set():
                timeout = (
                    0.0 if busy else max(0.0, min(next_tick - time.monotonic(), 0.1))
                )
                if poller.poll(int(timeout * 1000)):
                    self.receive()
                # A slice of any large submission, between bursts of messages.
                busy = self.state.has_work() and self.state.work()
                now = time.monotonic()
                if now >= next_tick:
                    self.state.tick(now)
                    next_tick = now + tick_every
                self.send_pending()
                if self.dashboard is not None and self.dashboard.wanted():
                    self.state.wall = time.time()
                    self.dashboard.publish(self.state.info("status"))
        finally:
            self.close()

    def receive(self) -> None:
        sock = self.sock
        state = self.state
        counters = self.counters
        now = time.monotonic()
        state.wall = time.time()
        for _ in range(BURST):
            frames = recv_ready(sock)
            if frames is None:
                return
            counters["messages_in"] += 1
            ident = frames[0].bytes
            if ident.endswith(P.SENDER_SUFFIX):  # a client's sending socket
                ident = ident[: -len(P.SENDER_SUFFIX)]
            try:
                if not self._check_size(frames):
                    self._refuse_oversized(ident, frames)
                    continue
                msg, payload = P.decode(frames[1:])
                state.handle(ident, msg, payload, now)
            except Exception as exc:
                counters["dropped"] += 1
                self._log.warning(
                    type(exc).__name__,
                    "dropped a message from %s: %s: %s",
                    ident.hex(),
                    type(exc).__name__,
                    exc,
                )

    def _check_size(self, frames: list[Any]) -> bool:
        if len(frames) > self.config.max_frames:
            return False
        return sum(len(f) for f in frames) <= self.config.max_message_bytes

    def _refuse_oversized(self, ident: bytes, frames: list[Any]) -> None:
        """Drop a message over the limits, and tell its sender why if it is a
        client: its futures fail instead of waiting forever."""
        self.counters["dropped"] += 1
        size = sum(len(f) for f in frames)
        text = (
            f"message of {size} bytes in {len(frames)} frames is over the broker's "
            f"limit ({self.config.max_message_bytes} bytes, {self.config.max_frames} "
            f"frames: zbroker --max-message-size)"
        )
        self._log.warning(
            "oversized", "dropped a message from %s: %s", ident.hex(), text
        )
        try:
            msg, _ = P.decode(frames[1:2])
        except P.ProtocolError:
            return
        self.state.refuse(ident, msg, text)

    def send_pending(self) -> None:
        out = self.state.flush(time.monotonic())
        if not out:
            return
        sock = self.sock
        forwarded = 0
        for ident, msg, payload in out:
            for f in payload:
                forwarded += len(f)
            try:
                frames = P.encode(msg, payload)
            except (OverflowError, TypeError, ValueError) as exc:
                # A value a peer sent that the broker cannot send on (an integer
                # beyond 64 bits after arithmetic, say): never a reason to die.
                self.counters["dropped"] += 1
                self._log.warning(
                    "unencodable",
                    "could not encode a %s for %s: %s: %s",
                    type(msg).__name__,
                    ident.hex(),
                    type(exc).__name__,
                    exc,
                )
                continue
            try:
                send_frames(sock, [ident, *frames])
            except zmq.ZMQError as exc:  # peer gone; heartbeats will notice
                logger.debug("send to %s failed: %s", ident.hex(), exc)
        self.counters["payload_bytes_forwarded"] += forwarded

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # closed already, or full: the loop is waking anyway
            pass

    def close(self) -> None:
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None
        self.sock.close(linger=0)
        if self.local_address:
            remove_socket(self.local_address)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.term()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def _public_host() -> str:
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()

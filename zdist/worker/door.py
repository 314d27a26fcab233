"""The worker's door: lone tasks that clients on this host send it themselves. A
mixin of :class:`~zdist.worker.worker.Worker`, run by its I/O loop like the rest.

A worker that reaches its broker over a Unix socket also listens on one of its own,
in its user's private directory (zdist.localsocket), and names it in the results it
sends clients straight (DirectResults.door). A client sends a lone task there (a
RunTasks naming itself in ``direct``, numbered below DOOR_RUN by the client) and
tells the broker (Submit.via). The worker runs it if idle, else refuses it, and
reports either with its number (TaskResults.door): the broker may hear of it from
the worker before it hears from the client. The result goes back on the connection
the task came on, if small, else by the client's ZeroMQ link (zdist.worker.direct).

The door is a plain Unix ``SOCK_SEQPACKET`` socket (zdist.datagram), not ZeroMQ:
that round trip wakes two threads instead of six. Each end checks the other's user
id as the kernel reports it.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING, Any

import zmq

from zdist import datagram
from zdist import protocol as P
from zdist.errors import ZdistError
from zdist.localsocket import (
    check_local_socket,
    path_of,
    remove_socket,
    user_socket_dir,
)
from zdist.net import IPC, is_ipc

if TYPE_CHECKING:
    from collections.abc import Callable

    from zdist.worker.direct import ClientLinks
    from zdist.worker.memory import SpillBuffer
    from zdist.worker.worker import _Task

logger = logging.getLogger(__name__)

#: Client connections a door keeps open; past this the oldest is closed.
MAX_DOOR_CONNECTIONS = 64


class Door:
    """The part of the Worker that local clients send lone tasks to."""

    # The Worker's own attributes that these methods use (set in Worker.__init__).
    name: str
    broker_address: str
    status: str
    paused: bool
    _closing: bool
    data: SpillBuffer
    tasks: dict[str, _Task]
    _results: list[Any]
    _drop: Callable[[str, Exception], None]
    _on_run_tasks: Callable[[P.RunTasks, list[Any]], None]
    _links: ClientLinks
    _direct_messages: Callable[
        [dict[tuple[bytes, str], tuple[list[Any], list[Any], P.FrameList]]],
        list[tuple[str, list[Any], list[Any]]],
    ]

    def _init_door(self) -> None:
        self.door: str | None = None  # its address, once open
        self._door_listener: socket.socket | None = None
        # fd -> a client's connection, the least recently used first
        self._door_conns: dict[int, socket.socket] = {}
        self._door_reader = datagram.Reader()
        self._door_runs: dict[str, int] = {}  # key -> the client's run number
        self._door_from: dict[str, int] = {}  # key -> the connection it came on
        self._door_refused: list[list[Any]] = []  # [key, run] not reported yet
        self.door_taken = 0  # tasks clients sent through the door and ran here
        self.door_refused = 0
        self.door_sent = 0  # results sent back through the door

    def _open_door(self, poller: zmq.Poller) -> bool:
        """Listen for local clients' lone tasks on a Unix socket in this user's
        private directory, if the broker is on this host too (we reach it on one)."""
        if not is_ipc(self.broker_address) or not datagram.available():
            return False
        directory = user_socket_dir()
        if directory is None:
            return False
        try:
            # Only this user can reach that directory, and each connection's user id
            # is checked too (datagram.accept).
            address = check_local_socket(
                IPC + os.path.join(directory, f"{uuid.uuid4().hex}.sock")
            )
            listener = datagram.listen(path_of(address))
        except (OSError, ZdistError) as exc:
            logger.info(
                "worker %s takes tasks from the broker only: %s", self.name, exc
            )
            return False
        self._door_listener = listener
        self.door = address
        poller.register(listener.fileno(), zmq.POLLIN)
        return True

    def _close_door(self) -> None:
        for conn in self._door_conns.values():
            conn.close()
        self._door_conns.clear()
        self._close_listener()

    def _close_listener(self) -> None:
        """Take no new connections; the door's address is no longer given out."""
        if self._door_listener is not None:
            self._door_listener.close()
            self._door_listener = None
            if self.door is not None:
                remove_socket(self.door)
                self.door = None

    def serve_door(self, events: dict[Any, int], poller: zmq.Poller) -> None:
        """Accept new connections, and take the tasks the polled ones hold."""
        listener = self._door_listener
        conns = self._door_conns
        if listener is not None and listener.fileno() in events:
            self._accept_door_conns(listener, poller)
        for fd in [fd for fd in conns if fd in events]:
            if fd in conns:  # (not retired meanwhile)
                self._read_door_conn(fd, poller)

    def _accept_door_conns(self, listener: socket.socket, poller: zmq.Poller) -> None:
        conns = self._door_conns
        try:
            while (conn := datagram.accept(listener)) is not None:
                conns[conn.fileno()] = conn
                poller.register(conn.fileno(), zmq.POLLIN)
                if len(conns) > MAX_DOOR_CONNECTIONS:
                    self._retire_door_conn(next(iter(conns)), poller)
        except OSError as exc:
            # Out of descriptors, say: the connection waiting would keep the
            # listener readable for ever. New clients go by the broker from now
            # on; those connected still use the door.
            logger.warning(
                "worker %s closes its door to new clients: %s", self.name, exc
            )
            poller.unregister(listener.fileno())
            self._close_listener()

    def _read_door_conn(self, fd: int, poller: zmq.Poller) -> None:
        conn = self._door_conns[fd]
        while True:
            try:
                frames = self._door_reader.recv(conn)
            except EOFError:  # the client has gone
                self._drop_door_conn(fd, poller)
                return
            except P.ProtocolError as exc:
                self._drop("a task from a client", exc)
                continue
            if frames is None:
                return
            if fd in self._door_conns:  # the most recently used last
                self._door_conns[fd] = self._door_conns.pop(fd)
            try:
                msg, payload = P.decode(frames)
                self._on_door_task(msg, payload, fd)
            except Exception as exc:
                self._drop("a task from a client", exc)

    def _retire_door_conn(self, fd: int, poller: zmq.Poller) -> None:
        """Close a connection without losing what its client sent: from now on
        the client's sends fail (its tasks go by the broker) and it sees the end;
        what it sent before is taken first."""
        try:
            self._door_conns[fd].shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._read_door_conn(fd, poller)  # to its end: it drops the connection
        if fd in self._door_conns:
            self._drop_door_conn(fd, poller)

    def _drop_door_conn(self, fd: int, poller: zmq.Poller) -> None:
        conn = self._door_conns.pop(fd)
        poller.unregister(fd)
        conn.close()
        for key in [k for k, f in self._door_from.items() if f == fd]:
            del self._door_from[key]  # its result goes by the ZeroMQ link

    def _send_door_results(self, first: list[Any], frames: list[Any]) -> list[Any]:
        """Send the results of door runs (``first``, from _take_door_results) to
        their clients: back on the connection each task came on, else (gone, full)
        by the client's ZeroMQ link. Returns the [key, run] pairs that went."""
        told: list[Any] = []
        links = self._links
        for address, msg, runs in self._direct_messages(links.groups(first, frames)):
            fd = self._door_from.get(runs[0][0])
            conn = None if fd is None else self._door_conns.get(fd)
            if conn is not None and datagram.send(conn, msg):
                self.door_sent += 1
                told.extend(runs)
            elif links.send(address, msg, runs):
                told.extend(runs)
        for r in first:  # errors and large results too, which go by the broker
            self._door_from.pop(r[0], None)
        return told

    def _on_door_task(self, msg: P.Message, payload: list[Any], fd: int) -> None:
        """A client's lone task (DirectResults.door): run it if idle, else refuse it
        to the broker, which the client told (Submit.via) and which then places it."""
        if type(msg) is not P.RunTasks:
            raise P.ProtocolError(f"{type(msg).__name__} through a worker's door")
        direct = msg.direct
        if (
            len(msg.tasks) != 1
            or msg.free
            or type(msg.tasks[0]) is not list
            or len(msg.tasks[0]) != 5
            or msg.tasks[0][1] is None
            or msg.tasks[0][3] != []
            or msg.tasks[0][4] is not None
            or type(direct) is not list
            or len(direct) != 1
            or type(direct[0]) is not list
            or len(direct[0]) != 3
            or type(direct[0][0]) is not bytes
            or type(direct[0][1]) is not str
            or type(direct[0][2]) is not list
            or len(direct[0][2]) != 1
            or type(direct[0][2][0]) is not list
            or len(direct[0][2][0]) != 2
            or direct[0][2][0][0] != msg.tasks[0][0]
            or type(direct[0][2][0][1]) is not int
            or direct[0][2][0][1] >= P.DOOR_RUN
        ):
            raise P.ProtocolError(
                "a door task is one task, no dependencies, a door run"
            )
        key = msg.tasks[0][0]
        if type(key) is not str:
            raise P.ProtocolError("task keys are strings")
        P.ref_frames(payload, msg.tasks[0][1])  # checked whole before it is taken
        P.ref_frames(payload, msg.tasks[0][2])
        run = direct[0][2][0][1]
        if (
            self.tasks
            or self.status != "running"
            or self.paused
            or self._closing
            or key in self.data
            or key in self._door_runs
        ):
            self._refuse_door(key, run)
            return
        self._door_runs[key] = run
        self._door_from[key] = fd
        self.door_taken += 1
        self._on_run_tasks(msg, payload)

    def _refuse_door(self, key: str, run: int) -> None:
        self._results.append([key, "refused", 0, "", None, "", -1])
        self._door_refused.append([key, run])
        self.door_refused += 1

    def _refuse_queued_door_tasks(self, keys: list[str]) -> None:
        """Queued tasks handed back at close: a door task the broker may not know
        yet is reported refused, which its early-report stash takes."""
        for key in keys:
            run = self._door_runs.pop(key, None)
            self._door_from.pop(key, None)
            if run is not None:
                self._refuse_door(key, run)

    def _take_door_results(
        self, results: list[Any]
    ) -> tuple[list[Any] | None, list[Any], list[Any]]:
        """A batch of results split for flushing: (TaskResults.door, the results
        of door runs, which go to their clients before the report, the rest)."""
        if not self._door_runs and not self._door_refused:
            return None, [], results
        runs = self._door_runs
        door = [
            [r[0], runs.pop(r[0])]
            for r in results
            if r[1] != "refused" and r[0] in runs
        ]
        ran = {key for key, _ in door}
        first = [r for r in results if r[0] in ran]
        rest = [r for r in results if r[0] not in ran] if ran else results
        door += self._door_refused
        self._door_refused = []
        return door or None, first, rest

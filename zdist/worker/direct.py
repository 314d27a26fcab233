"""Results sent straight to a client on this host (RunTasks.direct).

A client on the broker's host also listens on a Unix socket in its private directory
(RegisterClient.direct). For a task that only that client wants, the broker asks the
worker to send the result there itself: one hop instead of two (worker -> broker ->
client), and the broker off the path of a ``submit(f, x).result()`` round trip. The
worker still reports the result to the broker, naming the keys it delivered
(TaskResults.told), and the broker then sends that client nothing for them.

Nothing here waits: a client not connected yet (the first result after a connect,
while ZeroMQ's handshake runs), gone, or not reading fast enough (its queue is full)
makes :meth:`ClientLinks.send` return False, and that result goes by the broker as
before. Each client gets a DEALER of its own with ``ZMQ_IMMEDIATE``, whose send
fails at once without a live connection; and a link dropped for a newer one is
closed, not disconnected, so that what was queued on it still goes.

A task a client sent through the worker's door (zdist.worker.door) has its result
sent back on that connection instead, when it can; only when it cannot does it come
here.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import zmq

from zdist import protocol as P
from zdist.errors import SecurityError
from zdist.localsocket import check_local_socket
from zdist.wire import NOBLOCK, send_frames

logger = logging.getLogger(__name__)

#: Client sockets a worker stays connected to; the least recently used goes first.
MAX_LINKS = 16
#: Longest wait between a link's reconnection attempts (milliseconds).
RECONNECT_MAX_MS = 5000
#: How long a closed link may still send what was queued on it (milliseconds).
LINGER_MS = 1000
#: Results a link remembers having sent (handed back to the broker if it is dropped).
MAX_REMEMBERED = 4096
#: Addresses remembered as refused (then forgotten all at once).
MAX_REFUSED = 1024


class ClientLinks:
    """A worker's direct deliveries: which keys' results go to which client
    (``pending``), and a DEALER socket connected to each client's Unix socket."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.ctx = ctx
        # address as the broker named it -> a socket connected to that client
        self._links: OrderedDict[str, zmq.Socket[Any]] = OrderedDict()
        self._refused: set[str] = set()
        self._up: set[str] = set()  # addresses whose last send went out
        # [key, run] of the results each link took, the latest MAX_REMEMBERED, and
        # those of links dropped since the caller last asked (take_dropped).
        self._sent_runs: dict[str, deque[list[Any]]] = {}
        self._dropped: list[list[Any]] = []
        # Keys whose results go straight to their client (RunTasks.direct): key ->
        # (client ident, its address, the broker's number for this assignment).
        self.pending: dict[str, tuple[bytes, str, int]] = {}
        self.sent = 0  # messages handed to a client connection
        self.missed = 0  # results that went by the broker instead

    def note(self, direct: list[Any]) -> None:
        """Remember RunTasks.direct (checked whole before any of it is kept)."""
        noted = {}
        for entry in direct:
            if (
                type(entry) is not list
                or len(entry) != 3
                or type(entry[0]) is not bytes
                or type(entry[1]) is not str
                or type(entry[2]) is not list
            ):
                raise P.ProtocolError(f"malformed RunTasks.direct entry {entry!r}")
            for key, run in P.key_runs(entry[2], "RunTasks.direct").items():
                noted[key] = (entry[0], entry[1], run)
        self.pending.update(noted)

    def forget(self, keys: Any) -> None:
        """Keys freed or taken back: whatever they produce goes by the broker."""
        for key in keys:
            self.pending.pop(key, None)

    def groups(
        self, results: list[Any], frames: list[Any]
    ) -> dict[tuple[bytes, str], tuple[list[Any], list[Any], P.FrameList]]:
        """The TaskResults entries asked for here, by client: (DirectResults
        updates, [key, run] pairs, their frames). A result kept on the worker (too
        large to travel inline) or an error goes by the broker, which decides about
        retries and fetching."""
        pending = self.pending
        out: dict[tuple[bytes, str], tuple[list[Any], list[Any], P.FrameList]] = {}
        for r in results:
            to = pending.pop(r[0], None)
            if to is None or r[1] != "memory" or r[4] is None:
                continue
            group = out.get(to[:2])
            if group is None:
                group = out[to[:2]] = ([], [], P.FrameList())
            ref = group[2].add(P.ref_frames(frames, r[4]))
            group[0].append([r[0], "finished", ref, ""])
            group[1].append([r[0], to[2]])
        return out

    def send(self, address: str, frames: Sequence[Any], runs: list[Any]) -> bool:
        """Queue ``frames``, the results ``runs`` ([key, run] pairs), for the client
        listening at ``address``; False if it cannot be reached now (the caller sends
        them by the broker)."""
        if address in self._refused:
            self.missed += 1
            return False
        sock = self._links.get(address)
        if sock is None:
            sock = self._open(address)
            if sock is None:
                self.missed += 1
                return False
        else:
            self._links.move_to_end(address)
        try:
            send_frames(sock, frames, NOBLOCK)
        except zmq.ZMQError:  # not connected (yet), or its queue is full
            self._up.discard(address)
            self.missed += 1
            return False
        self._up.add(address)
        self._sent_runs[address].extend(runs)
        self.sent += 1
        return True

    def _open(self, address: str) -> zmq.Socket[Any] | None:
        """A socket connected to the client at ``address``, or None (refused)."""
        try:
            # Only we can have made it (zdist.localsocket): a socket planted by
            # another user would receive our results.
            link = check_local_socket(address)
        except (SecurityError, OSError, ValueError) as exc:
            self._refuse(address, exc)
            return None
        sock = self.ctx.socket(zmq.DEALER)
        # A link closed for a newer one still sends what was queued on it, for a
        # while (zmq_disconnect drops it at once, whatever the linger, as measured
        # with libzmq 4.3.5: hence a socket per link); and the broker is asked to
        # send those results too (take_dropped), for a client that reads too late.
        sock.linger = LINGER_MS
        # Only a connected peer has a pipe: a send to a client not connected yet,
        # or gone, fails at once instead of queueing for a connection to come.
        sock.immediate = 1
        # A client that has gone leaves its link retrying a missing path until
        # evicted: back off to one try every few seconds (libzmq starts at 0.1 s).
        sock.reconnect_ivl_max = RECONNECT_MAX_MS
        try:
            sock.connect(link)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self._refuse(address, exc)
            return None
        self._links[address] = sock
        self._sent_runs[address] = deque(maxlen=MAX_REMEMBERED)
        while len(self._links) > MAX_LINKS:
            gone, oldest = self._links.popitem(last=False)
            self._up.discard(gone)
            self._dropped.extend(self._sent_runs.pop(gone))
            oldest.close()
        return sock

    def take_dropped(self) -> list[list[Any]]:
        """[key, run] of results sent on links dropped since the last call: their
        client may not have them all, and the broker, told they went, will send
        them again if still wanted (a client takes a result once)."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def _refuse(self, address: str, exc: Exception) -> None:
        logger.warning("not sending results to %r: %s", address[:200], exc)
        if len(self._refused) >= MAX_REFUSED:
            self._refused.clear()
        self._refused.add(address)

    def is_up(self, address: str) -> bool:
        """Whether the last send to ``address`` went out: the next will, barring a
        client that has just gone or stopped reading."""
        return address in self._up

    def close(self) -> None:
        """Close every link; what is queued still goes, within LINGER_MS."""
        for sock in self._links.values():
            sock.close()
        self._links.clear()
        self._up.clear()
        self._sent_runs.clear()

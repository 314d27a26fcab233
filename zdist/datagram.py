"""Messages over a Unix ``SOCK_SEQPACKET`` socket: a worker's door (zdist.worker.door).

A lone task from a client on the worker's host, and its result, go over a plain Unix
socket instead of ZeroMQ. Each ZeroMQ message between two processes wakes four
threads (sender, sender's I/O thread, receiver's I/O thread, receiver); on this
project's virtual machines each wake of a thread on another CPU costs 10-25 us, and
a round trip through a ZeroMQ door measured 100-130 us with no work at all, against
15-60 us over this socket, where the sending thread wakes the receiving one and
nothing else (scripts/bench_floor.py). Everything else stays on ZeroMQ.

A message is the frames of :func:`zdist.protocol.encode` in one datagram: a header
of little-endian uint32s (the frame count, then each frame's length), then the
frames. ``SOCK_SEQPACKET`` keeps each datagram whole and in order; a send never
blocks (:func:`send` returns False instead, and the caller goes by ZeroMQ). The
socket lives in the user's private directory (zdist.localsocket), and each end
checks the other's user id as the kernel reports it (``SO_PEERCRED``).

Linux has ``SOCK_SEQPACKET`` for Unix sockets; where the system lacks it (macOS),
:func:`available` is False and workers open no door.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from zdist.protocol import ProtocolError

#: The largest datagram sent (header and frames): a door task (its arguments and
#: function at most INLINE_LIMIT) or a small result. Larger goes by ZeroMQ.
MAX_DATAGRAM = 192 * 1024
#: The most frames in one datagram (with the header, under the system's IOV_MAX).
MAX_FRAMES = 1000
_U32 = struct.Struct("<I")
_CRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_SEQPACKET = getattr(socket, "SOCK_SEQPACKET", None)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
# A send to a peer that has gone fails with EPIPE, whatever SIGPIPE's handler is.
_SEND_FLAGS = _DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)
_TRUNC = getattr(socket, "MSG_TRUNC", 0)
_PEERCRED = getattr(socket, "SO_PEERCRED", None)


def available() -> bool:
    """Whether this system has Unix ``SOCK_SEQPACKET`` sockets with peer credentials."""
    return _SEQPACKET is not None and _PEERCRED is not None and bool(_DONTWAIT)


def _socket() -> socket.socket:
    assert _SEQPACKET is not None
    sock = socket.socket(socket.AF_UNIX, _SEQPACKET)
    sock.setblocking(False)
    return sock


def listen(path: str, backlog: int = 64) -> socket.socket:
    """A listening socket at ``path`` (0600; its directory must be private)."""
    sock = _socket()
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    try:
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return sock


def connect(path: str) -> socket.socket:
    """A socket connected to ``path`` whose listener is this user's; raises OSError
    (nobody listens, its backlog is full, or it is another user's)."""
    sock = _socket()
    try:
        sock.connect(path)
        check_peer(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def accept(listener: socket.socket) -> socket.socket | None:
    """The next waiting connection from this user's processes, non-blocking; None
    when none waits. A connection from another user is closed unread. Raises
    OSError when the system cannot take it now (out of file descriptors, say)."""
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        sock.setblocking(False)
        try:
            check_peer(sock)
        except OSError:
            sock.close()
            continue
        return sock


def check_peer(sock: socket.socket) -> None:
    """Raise PermissionError unless the process at the other end is this user's."""
    assert _PEERCRED is not None
    _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, _PEERCRED, _CRED.size))
    if uid != os.geteuid():
        raise PermissionError(f"a Unix socket peer of user id {uid}, not ours")


def send(sock: socket.socket, frames: Sequence[Any]) -> bool:
    """Send ``frames`` as one datagram without blocking; False if it cannot go now
    (too large, the peer's queue is full, or the peer has gone)."""
    try:
        views = [memoryview(f).cast("B") for f in frames]
    except (TypeError, ValueError):  # not a contiguous buffer
        return False
    sizes = [v.nbytes for v in views]
    if len(views) > MAX_FRAMES or 4 * (len(views) + 1) + sum(sizes) > MAX_DATAGRAM:
        return False
    head = struct.pack(f"<{len(sizes) + 1}I", len(sizes), *sizes)
    try:
        sock.sendmsg([head, *views], [], _SEND_FLAGS)
    except (OSError, ValueError):  # ValueError: a closed socket object
        return False
    return True


class Reader:
    """Receives datagrams into one buffer (one reader at a time)."""

    def __init__(self) -> None:
        self._buf = bytearray(MAX_DATAGRAM)

    def recv(self, sock: socket.socket) -> list[memoryview] | None:
        """The frames of the next datagram; None when none waits. Raises EOFError
        when the peer has gone, ProtocolError for a malformed datagram (dropped)."""
        try:
            n, _, flags, _ = sock.recvmsg_into([self._buf], 0, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:  # reset by the peer, or closed here
            raise EOFError(str(exc)) from None
        if n == 0:  # (or sent an empty datagram, which zdist never does)
            raise EOFError("the peer closed the connection")
        if flags & _TRUNC:
            raise ProtocolError("a datagram over MAX_DATAGRAM")
        return unpack(memoryview(bytes(memoryview(self._buf)[:n])))


def unpack(data: memoryview) -> list[memoryview]:
    """The frames of one datagram; raises ProtocolError unless it is well formed."""
    if data.nbytes < 4:
        raise ProtocolError("a datagram shorter than its header")
    (count,) = _U32.unpack_from(data)
    end = 4 * (count + 1)
    if count > MAX_FRAMES or end > data.nbytes:
        raise ProtocolError("a datagram with a malformed header")
    sizes = struct.unpack_from(f"<{count}I", data, 4)
    if end + sum(sizes) != data.nbytes:
        raise ProtocolError("a datagram whose frames do not add up to its length")
    frames = []
    for size in sizes:
        frames.append(data[end : end + size])
        end += size
    return frames

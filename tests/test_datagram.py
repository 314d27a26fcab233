"""Messages over a Unix SOCK_SEQPACKET socket (zdist.datagram): a worker's door."""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from zdist import datagram
from zdist import protocol as P
from zdist.localsocket import user_socket_dir

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not datagram.available(), reason="no Unix SOCK_SEQPACKET"),
]


@pytest.fixture
def path() -> Iterator[str]:
    directory = user_socket_dir()
    assert directory is not None
    p = os.path.join(directory, f"test-{uuid.uuid4().hex}.sock")
    yield p
    if os.path.exists(p):
        os.unlink(p)


def _pair(path: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = datagram.listen(path)
    client = datagram.connect(path)
    server = datagram.accept(listener)
    assert server is not None
    return listener, client, server


def test_frames_arrive_whole_and_in_order(path: str) -> None:
    listener, client, server = _pair(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    reader = datagram.Reader()
    assert reader.recv(server) is None  # nothing waits
    arr = np.arange(1000, dtype=np.float64)
    sent = [[b"head", memoryview(arr), b""], [b"second"], [b"x" * 60_000]]
    for frames in sent:
        assert datagram.send(client, frames)
    for frames in sent:
        got = reader.recv(server)
        assert got is not None
        assert [bytes(f) for f in got] == [bytes(memoryview(f)) for f in frames]
    assert reader.recv(server) is None
    client.close()
    with pytest.raises(EOFError):
        reader.recv(server)
    for s in (listener, server):
        s.close()


def test_a_send_that_cannot_go_returns_false(path: str) -> None:
    listener, client, server = _pair(path)
    assert not datagram.send(client, [b"x" * datagram.MAX_DATAGRAM])  # too large
    assert not datagram.send(client, [b""] * (datagram.MAX_FRAMES + 1))
    strided = memoryview(np.arange(10.0)[::2])  # not one contiguous buffer
    assert not datagram.send(client, [b"head", strided])
    # A peer that does not read: its queue fills, and a send fails at once.
    sent = 0
    while datagram.send(client, [b"x" * 60_000]):
        sent += 1
        assert sent < 10_000
    assert sent > 0
    server.close()
    assert not datagram.send(client, [b"y"])  # the peer has gone
    for s in (listener, client):
        s.close()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00",
        struct.pack("<I", 2) + struct.pack("<I", 1),  # a header cut short
        struct.pack("<II", 1, 5) + b"abc",  # a frame longer than the datagram
        struct.pack("<II", 1, 1) + b"abc",  # bytes beyond the last frame
        struct.pack("<I", datagram.MAX_FRAMES + 1),
    ],
)
def test_a_malformed_datagram_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(P.ProtocolError):
        datagram.unpack(memoryview(data))


def test_a_connection_from_another_user_is_closed_unread(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = datagram.listen(path)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw.connect(path)
    real = os.geteuid()
    # To the listener, we are now someone else.
    monkeypatch.setattr(datagram.os, "geteuid", lambda: real + 1)
    assert datagram.accept(listener) is None
    raw.setblocking(False)
    assert raw.recv(10) == b""  # closed by the listener
    monkeypatch.undo()
    ok = datagram.connect(path)
    assert datagram.accept(listener) is not None
    for s in (listener, raw, ok):
        s.close()


def test_a_listener_of_another_user_is_refused(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = datagram.listen(path)
    real = os.geteuid()
    monkeypatch.setattr(datagram.os, "geteuid", lambda: real + 1)
    with pytest.raises(PermissionError):
        datagram.connect(path)
    listener.close()


def test_connecting_where_nobody_listens_fails(path: str, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        datagram.connect(path)  # no such socket
    listener = datagram.listen(path)
    listener.close()  # the file stays; nobody listens
    with pytest.raises(OSError):
        datagram.connect(path)

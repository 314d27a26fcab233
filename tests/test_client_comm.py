"""The client's Connection against a scripted broker (a ROUTER socket in the test):
what goes on the wire, message by message."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from zdist import protocol as P
from zdist.client.comm import Connection
from zdist.wire import recv_frames, send_frames

pytestmark = pytest.mark.timeout(60)


class Releases:
    """Stands in for the client's queue of dropped futures."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.wanted_again: set[str] = set()  # futures made again after the take

    def take(self) -> list[str]:
        # Only to the thread that sends: the I/O thread's own turn (every 250 ms)
        # would otherwise race the test for the keys it just queued.
        if threading.current_thread().name == "zdist-client-io":
            return []
        keys, self.pending = self.pending, []
        return keys

    def unwanted(self, keys: list[str]) -> list[str]:
        return [k for k in keys if k not in self.wanted_again]


@pytest.fixture
def wire() -> Iterator[tuple[Connection, zmq.Socket[Any], Releases]]:
    ctx: zmq.Context[Any] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    releases = Releases()
    conn = Connection(
        address,
        None,
        lambda m, p: None,
        lambda why: None,
        30.0,
        releases.take,
        releases.unwanted,
    )

    def welcome() -> None:
        assert router.poll(30_000)
        ident, *frames = recv_frames(router)
        assert isinstance(P.decode(frames)[0], P.RegisterClient)
        send_frames(router, [ident, *P.encode(P.Welcome(1.0, 30, {}, address))])

    t = threading.Thread(target=welcome)
    t.start()
    conn.start(P.RegisterClient("test", {}))
    t.join()
    try:
        yield conn, router, releases
    finally:
        conn.close()
        router.close()
        ctx.term()


def _received(router: zmq.Socket[Any]) -> list[P.Message]:
    """Every message waiting at the broker, heartbeats aside."""
    out = []
    while router.poll(1000 if not out else 200):
        _, *frames = recv_frames(router)
        msg = P.decode(frames)[0]
        if not isinstance(msg, P.Heartbeat):
            out.append(msg)
    return out


def _submit(**resources: Any) -> P.Submit:
    fl = P.FrameList()
    entry = P.submit_entry("k", fl.add([b"fn"]), fl.add([b"args"]), [], 0, 0, resources)
    return P.Submit([entry], ["k"])


def test_releases_ride_inside_the_next_submit(wire: Any) -> None:
    conn, router, releases = wire
    releases.pending = ["a", "b"]
    conn.send(_submit())
    (msg,) = _received(router)
    assert isinstance(msg, P.Submit)
    assert msg.release == ["a", "b"] and msg.wants == ["k"]


def test_releases_go_just_before_any_other_message(wire: Any) -> None:
    conn, router, releases = wire
    releases.pending = ["a"]
    conn.send(P.Cancel(["k"], False))
    assert _received(router) == [P.ReleaseKeys(["a"]), P.Cancel(["k"], False)]


def test_releases_still_go_when_the_submit_cannot_be_encoded(wire: Any) -> None:
    conn, router, releases = wire
    releases.pending = ["a"]
    with pytest.raises(TypeError):
        conn.send(_submit(GPU=object()))  # type: ignore[arg-type]
    assert _received(router) == [P.ReleaseKeys(["a"])]


def test_a_key_wanted_again_after_its_release_was_taken_is_not_released(
    wire: Any,
) -> None:
    # Taken for release, then a new future for the same key (another thread): the
    # check under the send lock keeps it, inside a Submit and on its own alike.
    conn, router, releases = wire
    releases.pending = ["a", "b"]
    releases.wanted_again = {"a"}
    conn.send(_submit())
    (msg,) = _received(router)
    assert isinstance(msg, P.Submit) and msg.release == ["b"]
    releases.pending = ["a"]
    conn.send(_submit())
    (msg,) = _received(router)
    assert isinstance(msg, P.Submit) and msg.release is None
    conn.send_releases(["a", "c"])
    assert _received(router) == [P.ReleaseKeys(["c"])]

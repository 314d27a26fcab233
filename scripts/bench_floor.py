"""W1's floors: the ZeroMQ hops of a zdist round trip, with no work at all.

A client DEALER sends 100 bytes to a broker ROUTER, which passes them to a worker
DEALER, which sends them back through the broker to the client: three processes, over
a Unix socket in a private directory, as a LocalCluster's processes reach their broker
(zdist.security.bind_local_socket). Broker and worker block in a poll between
messages as zdist's do; the client blocks in recv on its own socket (as zdist's waiting
thread reads its own reply).
Whatever zdist adds to W1 is above this line; a target below it cannot be met by any
client -> broker -> worker design on these sockets, however little Python it runs.

With ``hops=2`` the client sends straight to the worker and the worker answers on
the same connection, a Unix SOCK_SEQPACKET socket (zdist.datagram): the path of a
lone task sent through a worker's door (zdist.worker.door), the broker told but not
on the path. The worker polls it with a zmq.Poller beside a ZeroMQ socket, as
zdist's worker does, and the client waits in a poll on it, as zdist's waiting thread.

    python scripts/bench_floor.py [round_trips]
"""

from __future__ import annotations

import multiprocessing
import os
import select
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zmq

from zdist import datagram

QUIT = b"quit"


def _client_socket(ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    return s


def _listen(address: str, bound: Any) -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    """A ROUTER bound at ``address``; ``bound`` is set once it listens."""
    ctx: zmq.Context[Any] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(address)
    bound.set()
    return ctx, router


def _broker(address: str, bound: Any) -> None:
    ctx, router = _listen(address, bound)
    peers: dict[bytes, bytes] = {}
    while len(peers) < 2:
        ident, role = router.recv_multipart()
        peers[role] = ident
    client, worker = peers[b"client"], peers[b"worker"]
    router.send_multipart([client, b"ready"])
    _relay(router, lambda ident, body: worker if ident == client else client)
    router.close()
    ctx.term()


def _worker(address: str) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    s = _client_socket(ctx)
    s.connect(address)
    s.send(b"worker")
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    while True:
        poller.poll(250)
        body = s.recv()
        if body == QUIT:
            break
        s.send(body)
    s.close()
    ctx.term()


def _relay(router: zmq.Socket[Any], to: Callable[[bytes, bytes], bytes]) -> None:
    """Pass each message on to ``to(sender, body)``, blocking in a poll between
    messages as zdist's processes do; QUIT goes on too, and ends the loop."""
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    while True:
        poller.poll(250)
        ident, body = router.recv_multipart()
        router.send_multipart([to(ident, body), body])
        if body == QUIT:
            break


def _door(path: str, bound: Any) -> None:
    """A worker's door: each message goes back to its sender (hops=2)."""
    ctx: zmq.Context[Any] = zmq.Context()
    broker = ctx.socket(zmq.DEALER)  # polled beside the door, never used
    listener = datagram.listen(path)
    bound.set()
    poller = zmq.Poller()
    poller.register(broker, zmq.POLLIN)
    poller.register(listener.fileno(), zmq.POLLIN)
    conn = None
    while conn is None:
        poller.poll(250)
        conn = datagram.accept(listener)
    poller.register(conn.fileno(), zmq.POLLIN)
    reader = datagram.Reader()
    while True:
        poller.poll(250)
        frames = reader.recv(conn)
        if frames is None:
            continue
        datagram.send(conn, frames)
        if bytes(frames[0]) == QUIT:
            break
    for s in (conn, listener):
        s.close()
    broker.close(linger=0)
    ctx.term()


def _door_round_trips(path: str, n: int) -> list[float]:
    conn = datagram.connect(path)
    reader = datagram.Reader()
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)

    def round_trip(body: bytes) -> None:
        if not datagram.send(conn, [body]):
            raise RuntimeError("the floor benchmark's door refused a message")
        while True:
            if not poller.poll(60_000):
                raise RuntimeError("the floor benchmark's door did not answer")
            if reader.recv(conn) is not None:
                return

    try:
        body = b"x" * 100
        times = []
        for i in range(n + 200):
            t0 = time.perf_counter()
            round_trip(body)
            if i >= 200:
                times.append(time.perf_counter() - t0)
        round_trip(QUIT)
    finally:
        conn.close()
    return times


def floor_round_trip(n: int = 2000, hops: int = 4) -> float:
    """Median microseconds of ``n`` client -> broker -> worker -> broker -> client
    round trips (``hops=2``: client -> worker -> client), after 200 unmeasured
    ones."""
    mp = multiprocessing.get_context("spawn")
    private = tempfile.mkdtemp(prefix="zdist-floor-")  # mode 0700
    address = f"ipc://{private}/broker.sock"
    bound = mp.Event()
    if hops == 2:
        door = os.path.join(private, "door.sock")
        proc = mp.Process(target=_door, args=(door, bound), daemon=True)
        proc.start()
        try:
            if not bound.wait(60):
                raise RuntimeError("the floor benchmark's worker did not start")
            return statistics.median(_door_round_trips(door, n)) * 1e6
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
            shutil.rmtree(private, ignore_errors=True)
    else:
        broker = mp.Process(target=_broker, args=(address, bound), daemon=True)
        broker.start()
        if not bound.wait(60):
            raise RuntimeError("the floor benchmark's broker did not start")
        worker = mp.Process(target=_worker, args=(address,), daemon=True)
        worker.start()
        procs = [broker, worker]
    ctx: zmq.Context[Any] = zmq.Context()
    s = _client_socket(ctx)
    try:
        s.connect(address)
        s.send(b"client")
        if not s.poll(60_000):
            raise RuntimeError("the floor benchmark's broker did not answer")
        s.recv()
        body = b"x" * 100
        times = []
        for i in range(n + 200):
            t0 = time.perf_counter()
            s.send(body)
            s.recv()
            if i >= 200:
                times.append(time.perf_counter() - t0)
        s.send(QUIT)
    finally:
        s.close()
        ctx.term()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        shutil.rmtree(private, ignore_errors=True)
    return statistics.median(times) * 1e6


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(f"{floor_round_trip(n):.0f} us per round trip (median of {n}), 4 hops")
    print(
        f"{floor_round_trip(n, hops=2):.0f} us per round trip (median of {n}), 2 hops"
    )

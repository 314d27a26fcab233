"""W1's floor: the same four ZeroMQ hops as a zdist round trip, with no work at all.

A client DEALER sends 100 bytes to a broker ROUTER, which passes them to a worker
DEALER, which sends them back through the broker to the client: three processes,
CurveZMQ on, TCP on 127.0.0.1. Broker and worker block in a poll between messages as
zdist's do; the client blocks in recv on its own socket (zdist's client also pays a
hand-off from its I/O thread to the waiting thread).
Whatever zdist adds to W1 is above this line; a target below it cannot be met by any
client -> broker -> worker design on these sockets, however little Python it runs.

    python scripts/bench_floor.py [round_trips]
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from typing import Any

import zmq

QUIT = b"quit"


def _client_socket(ctx: zmq.Context[Any], keys: dict[str, bytes]) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.curve_serverkey = keys["server_public"]
    s.curve_publickey = keys["member_public"]
    s.curve_secretkey = keys["member_secret"]
    return s


def _broker(keys: dict[str, bytes], port: Any) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.curve_server = True
    router.curve_publickey = keys["server_public"]
    router.curve_secretkey = keys["server_secret"]
    port.value = router.bind_to_random_port("tcp://127.0.0.1")
    peers: dict[bytes, bytes] = {}
    while len(peers) < 2:
        ident, role = router.recv_multipart()
        peers[role] = ident
    client, worker = peers[b"client"], peers[b"worker"]
    router.send_multipart([client, b"ready"])
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    while True:
        poller.poll(250)
        ident, body = router.recv_multipart()
        if body == QUIT:
            router.send_multipart([worker, QUIT])
            break
        router.send_multipart([worker if ident == client else client, body])
    router.close()
    ctx.term()


def _worker(keys: dict[str, bytes], address: str) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    s = _client_socket(ctx, keys)
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


def floor_round_trip(n: int = 2000) -> float:
    """Median microseconds of ``n`` client -> broker -> worker -> broker -> client
    round trips, after 200 unmeasured ones."""
    server_public, server_secret = zmq.curve_keypair()
    member_public, member_secret = zmq.curve_keypair()
    keys = {
        "server_public": server_public,
        "server_secret": server_secret,
        "member_public": member_public,
        "member_secret": member_secret,
    }
    mp = multiprocessing.get_context("spawn")
    port = mp.Value("i", 0)
    broker = mp.Process(target=_broker, args=(keys, port), daemon=True)
    broker.start()
    deadline = time.monotonic() + 60
    while not port.value:
        if time.monotonic() > deadline or not broker.is_alive():
            raise RuntimeError("the floor benchmark's broker did not start")
        time.sleep(0.01)
    address = f"tcp://127.0.0.1:{port.value}"
    worker = mp.Process(target=_worker, args=(keys, address), daemon=True)
    worker.start()
    ctx: zmq.Context[Any] = zmq.Context()
    s = _client_socket(ctx, keys)
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
        for p in (broker, worker):
            p.join(10)
            if p.is_alive():
                p.kill()
    return statistics.median(times) * 1e6


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(f"{floor_round_trip(n):.0f} us per round trip (median of {n})")

"""Thousands of malformed messages, from a seeded random generator, thrown at a live
broker (security on and off) and at a live worker's data port; then the broker must
still run, have counted the drops, and serve a normal computation.

Three kinds of sender, so that garbage reaches every layer:

- an anonymous peer: random bytes, truncated or extra frames, wrong protocol
  versions, unknown ops, headers that do not decode or have the wrong shape or field
  types, huge frame counts, deeply nested headers;
- a registered client: well-typed client messages with garbage inside (bad payload
  references, junk keys, malformed task entries);
- a registered fake worker: well-typed worker messages with garbage inside (malformed
  results, results for tasks it was sent, junk statuses), which then leaves.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import tasks
import zmq
from utils import wait_for

from zdist import Client, LocalCluster, wait
from zdist import protocol as P
from zdist.security import Security

pytestmark = pytest.mark.timeout(90)

SEED = 20261127
#: Messages per sender kind (so about three times this per test).
N_MESSAGES = 1000

#: A function frame that fails to unpickle (never random bytes: a worker unpickles
#: it) and an argument frame that is None.
GARBAGE_PICKLES = (b"\x80\x05garbage", b"\x80\x05N.")
REGISTERED_OPS = sorted(P.message_types())
UNKNOWN_OPS = [op for op in range(256) if op not in P.message_types()]


# ======================================================================================
# the generator


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-able value."""
    kind = rng.randrange(11 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(
            [0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randint(-9, 9)]
        )
    if kind == 3:
        return rng.choice([0.0, -1.5, float("inf"), float("-inf"), float("nan"), 1e308])
    if kind == 4:
        return rng.choice(["", "x", "fuzz-key", "\x00", "é" * 3, "k" * 300])
    if kind == 5:
        return rng.randbytes(rng.randrange(0, 40))
    if kind == 6:
        return [rng.randrange(-3, 5), rng.randrange(-3, 5)]  # a frame ref, maybe bad
    if kind == 7:
        return msgpack.ExtType(rng.randrange(0, 127), rng.randbytes(4))
    if kind in (8, 9):
        return [junk(rng, depth + 1) for _ in range(rng.randrange(0, 6))]
    return {junk_key(rng): junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def junk_key(rng: random.Random) -> Any:
    return rng.choice(["a", "", 0, -1, 1.5, b"k", None, True])


def typed(rng: random.Random, typ: Any) -> Any:
    """A random value of the type a header field declares."""
    types = typ if isinstance(typ, tuple) else (typ,)
    t = rng.choice(types)
    if t is str:
        return rng.choice(["", "x", "running", "closed", "retiring", "k" * 100])
    if t is bool:
        return rng.random() < 0.5
    if t is int:
        return rng.choice([0, 1, -1, 7, 2**31, 2**63 - 1, -(2**63)])
    if t is float:
        return rng.choice([0.0, 0.5, -1.0, float("inf"), float("nan")])
    if t is list:
        return [junk(rng, 1) for _ in range(rng.randrange(0, 6))]
    if t is dict:
        return {
            rng.choice(["a", "b", "GPU"]): junk(rng, 2) for _ in range(rng.randrange(3))
        }
    if t is bytes:
        return rng.randbytes(8)
    return None


def wrong(rng: random.Random, typ: Any) -> Any:
    """A value that is certainly not of the declared field type."""
    types = typ if isinstance(typ, tuple) else (typ,)
    candidates = [
        v
        for v in ("s", 5, 1.5, True, b"b", [1], {"k": 1}, None)
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types)
    ]
    return rng.choice(candidates)


def header(cls: type[P.Message], values: list[Any]) -> bytes:
    return msgpack.packb(values, use_bin_type=True)


def valid_shape(rng: random.Random, cls: type[P.Message]) -> list[Any]:
    return [typed(rng, t) for t in cls._types]


def payload(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(0, 4))]


def deep(n: int) -> bytes:
    return b"\x91" * n + b"\x90"  # n nested one-element arrays (msgpack)


def anonymous(rng: random.Random) -> tuple[bool, list[bytes]]:
    """(must_drop, frames): garbage any peer may send; every one must be dropped."""
    cls = P.message_types()[rng.choice(REGISTERED_OPS)]
    op = bytes([cls.op])
    kind = rng.randrange(11)
    if kind == 0:  # random bytes
        return True, [
            rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 6))
        ]
    if kind == 1:  # truncated: a head cut before its header, or nothing
        head = P.VERSION + op + header(cls, valid_shape(rng, cls))
        return True, [head[: rng.randrange(0, P.HEAD + 1)]]
    if kind == 2:  # wrong protocol version
        v = rng.choice([b"", b"ZD0", b"ZD1", b"zd2", b"Z", rng.randbytes(3)])
        if v == P.VERSION:
            v = b"ZD0"
        return True, [v + op + header(cls, valid_shape(rng, cls)), *payload(rng)]
    if kind == 3:  # unknown op, or none at all
        bad = rng.choice([bytes([rng.choice(UNKNOWN_OPS)]), b""])
        return True, [
            P.VERSION + bad + (header(cls, valid_shape(rng, cls)) if bad else b"")
        ]
    if kind == 4:  # header that is not msgpack (or not all of it)
        good = header(cls, valid_shape(rng, cls))
        body = rng.choice(
            [rng.randbytes(rng.randrange(1, 50)), good[:-1] or b"\xc1", good + b"\xc1"]
        )
        if body == good:
            body = b"\xc1"
        try:
            msgpack.unpackb(body)
        except Exception:
            return True, [P.VERSION + op + body]
        return True, [P.VERSION + op + b"\xc1"]  # 0xc1 is never valid msgpack
    if kind == 5:  # header of the wrong shape
        n = len(cls._fields)
        shape = rng.choice([{}, 5, "x", None, [junk(rng)] * (n + 1 + rng.randrange(3))])
        if cls._required > 0 and rng.random() < 0.5:
            # A required field missing (trailing fields with defaults may go).
            shape = valid_shape(rng, cls)[: cls._required - 1]
        return True, [P.VERSION + op + header(cls, shape)]
    if kind == 6 and cls._types:  # right shape, a field of the wrong type
        values = valid_shape(rng, cls)
        i = rng.randrange(len(values))
        values[i] = wrong(rng, cls._types[i])
        return True, [P.VERSION + op + header(cls, values), *payload(rng)]
    if kind == 7:  # huge frame count, within reason, with a broken header
        return True, [P.VERSION + op + b"\xc1", *([b""] * rng.randrange(1000, 20000))]
    if kind == 8:  # deeply nested header, one element too many at the top
        n = len(cls._fields) + 1
        nested = deep(rng.choice([500, 1000, 1021, 1022, 1023, 1024, 5000]))
        return True, [
            P.VERSION + op + b"\xdc" + n.to_bytes(2, "big") + nested + b"\xc0" * (n - 1)
        ]
    if kind == 9:  # a header that decodes into wrong types everywhere
        return True, [
            P.VERSION + op + header(cls, [junk(rng) for _ in cls._fields] + [0])
        ]
    # extra payload frames on a well-formed message: accepted or rejected by the
    # handler, never fatal (an unregistered peer gets "unregistered")
    return False, [P.VERSION + op + header(cls, valid_shape(rng, cls)), *payload(rng)]


def bad_task_entry(rng: random.Random, n_frames: int) -> list[Any]:
    """A Submit task entry with at least one thing wrong."""
    entry: list[Any] = [
        f"fuzz-{rng.randrange(10**9)}",
        [0, 1],
        [0, 1],
        [],
        0,
        0,
        None,
        None,
        False,
    ]
    i = rng.randrange(9)
    entry[i] = {
        0: rng.choice([5, None, b"k", ["k"]]),
        1: rng.choice(
            [
                [n_frames, 1],
                [-1, 1],
                [0, 0],
                [0],
                ["a", 1],
                [True, 1],
                5,
                [0, n_frames + 1],
                [2**63 - 1, 1],
            ]
        ),
        2: rng.choice([[n_frames, 1], [0, -1], None, "ref", [1.0, 1], [0, 2**63 - 1]]),
        3: rng.choice([None, "dep", [5], [b"k"], {"a": 1}]),
        4: rng.choice(["high", None, [1], float("inf"), float("nan"), True]),
        5: rng.choice([1.5, "3", None, True]),
        6: rng.choice(
            [{"GPU": -1}, {"GPU": "1"}, {1: 1}, [1], "GPU", {"GPU": float("nan")}]
        ),
        7: rng.choice(["w", [1], [None], 5]),
        8: rng.choice([None, 1, "yes", 0.0]),
    }[i]
    if rng.random() < 0.3:  # the wrong length
        entry = entry[: rng.randrange(9)] if rng.random() < 0.5 else [*entry, junk(rng)]
    return entry


def client_garbage(rng: random.Random, known: list[str]) -> tuple[bool, list[bytes]]:
    """Well-typed client messages with garbage inside, from a registered client."""
    kind = rng.randrange(9)
    frames = [rng.randbytes(8) for _ in range(rng.randrange(1, 4))]
    if kind == 0:  # a Submit with one broken entry among good ones: rejected whole
        good = [
            [
                f"fuzz-good-{rng.randrange(10**9)}",
                [0, 1],
                [0, 1],
                [],
                0,
                0,
                None,
                ["nobody"],
                False,
            ]
        ]
        entries = [*good, bad_task_entry(rng, len(frames))]
        rng.shuffle(entries)
        wants = [
            e[0] for e in entries if isinstance(e, list) and e and isinstance(e[0], str)
        ]
        return True, P.encode(P.Submit(entries, wants), frames)
    if kind == 1:  # a task entry that is not a list, or wants with non-strings
        tasks_ = rng.choice([[5], ["x"], [None], [{"k": 1}]])
        return True, P.encode(P.Submit(tasks_, []), frames)
    if kind == 2:
        return True, P.encode(
            P.Submit([], [rng.choice([5, None, b"k", ["k"]])]), frames
        )
    # Accepted messages with junk inside: must not hurt anyone.
    keys = [junk(rng) for _ in range(rng.randrange(0, 5))] + rng.sample(
        known, min(len(known), 2)
    )
    msg = rng.choice(
        [
            P.Gather(rng.randrange(1, 2**31), keys),
            P.Cancel(keys, rng.random() < 0.5),
            P.ReleaseKeys(keys),
            P.FireAndForget(keys),
            P.InfoRequest(
                rng.randrange(1, 2**31), rng.choice(["", "x", "scheduler_info"])
            ),
            P.Heartbeat({"k": junk(rng)}),
            P.Submit([], []),
        ]
    )
    if rng.random() < 0.1:  # a task whose function does not unpickle: it errs
        key = f"fuzz-err-{rng.randrange(10**9)}"
        msg = P.Submit([[key, [0, 1], [1, 1], [], 0, 0, None, None, False]], [key])
        frames = list(GARBAGE_PICKLES)
    return False, P.encode(msg, frames)


def worker_garbage(rng: random.Random, sent: list[str]) -> tuple[bool, list[bytes]]:
    """Well-typed worker messages with garbage inside, from a registered fake worker
    (``sent``: task keys the broker gave it)."""
    frames = [rng.randbytes(8) for _ in range(rng.randrange(0, 3))]
    key = rng.choice(sent) if sent and rng.random() < 0.7 else "fuzz-nokey"
    kind = rng.randrange(8)
    if kind == 0:  # a malformed result entry: the whole batch is rejected
        entry = rng.choice(
            [
                [key, "memory", 1, "int", [len(frames) + 5, 1], "", 0.1],
                [key, "error", 0, "", None, "boom", 0.1],  # an error needs its frames
                [key, "bogus", 0, "", None, "", 0.1],
                [key, "memory", "1", "int", None, "", 0.1],
                [key, "memory", 1, "int", None, "", "fast"],
                [key, "memory", 1, None, None, "", 0.1],
                [5, "memory", 1, "int", None, "", 0.1],
                [key, "memory"],
                "entry",
            ]
        )
        return True, P.encode(P.TaskResults([entry]), frames)
    if kind == 1:  # an unknown worker status
        return True, P.encode(P.WorkerStatus(rng.choice(["", "dead", "x" * 50]), []))
    if kind == 2:  # malformed resources on (re-)registration
        return True, P.encode(
            P.RegisterWorker(
                "fuzz-worker",
                1,
                0,
                rng.choice([{"GPU": -1}, {"GPU": "x"}, {1: 2}]),
                "tcp://127.0.0.1:1",
                "fuzzhost",
                1,
                "/tmp",
                {},
                [],
            )
        )
    # Accepted (or ignored) worker messages with junk inside.
    status = rng.choice(["memory", "error", "missing", "cancelled"])
    ref = [0, 1] if frames and status in ("memory", "error") else None
    if status == "error" and ref is None:
        status = "cancelled"
    nbytes = rng.choice([0, 1, 10**7, -5])
    msg = rng.choice(
        [
            P.TaskResults(
                [
                    [
                        key,
                        status,
                        nbytes,
                        "int",
                        ref,
                        rng.choice(["", key, "nokey"]),
                        rng.choice([0.0, 0.01, -1.0]),
                    ]
                ]
            ),
            P.TaskSeceded(key),
            P.DataReply(
                rng.randrange(0, 50), [[key, [0, 1]]] if frames else [], [junk(rng)]
            ),
            P.FunctionResult(rng.randrange(0, 50), rng.random() < 0.5),
            P.WorkerStatus(rng.choice(["running", "paused"]), [key, junk(rng)]),
            P.Heartbeat({"memory": junk(rng), "executing": junk(rng)}),
        ]
    )
    return False, P.encode(msg, frames)


# ======================================================================================
# senders


class Peer:
    """A DEALER to the broker (or a worker's data port) that we fill with garbage."""

    def __init__(
        self, ctx: zmq.Context[Any], address: str, security: Security | None
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = 0
        if security is not None:
            security.configure_client(self.sock)
        self.sock.connect(address)
        self.received: list[tuple[P.Message, list[Any]]] = []

    def send(self, frames: list[Any]) -> None:
        self.sock.send_multipart(frames, copy=False)

    def drain(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.received.append(P.decode(frames))
            except P.ProtocolError:
                pass

    def wait_for(self, cls: type[P.Message], timeout: float = 30) -> P.Message:
        def got() -> P.Message | None:
            self.drain()
            return next((m for m, _ in self.received if isinstance(m, cls)), None)

        return wait_for(got, timeout=timeout, what=f"a {cls.__name__}")

    def close(self) -> None:
        self.sock.close(linger=0)


def counters(c: Client) -> dict[str, int]:
    return c.scheduler_info()["counters"]


def fuzz_broker(client: Client, address: str, security: Security | None) -> None:
    """Throw 3 x N_MESSAGES bad messages at the broker, then check it still works."""
    rng = random.Random(SEED)
    before = counters(client)
    n_workers = len(client.scheduler_info()["workers"])
    ctx: zmq.Context[Any] = zmq.Context()
    anon = Peer(ctx, address, security)
    fake_client = Peer(ctx, address, security)
    fake_worker = Peer(ctx, address, security)
    sent = must_drop = 0
    try:
        fake_client.send(P.encode(P.RegisterClient("fuzz-client", {})))
        fake_client.wait_for(P.Welcome)
        fake_worker.send(
            P.encode(
                P.RegisterWorker(
                    "fuzz-worker",
                    1,
                    0,
                    {},
                    "tcp://127.0.0.1:1",
                    "fuzzhost",
                    1,
                    "/tmp",
                    {},
                    ["fuzz-nokey", 5],
                )
            )
        )
        fake_worker.wait_for(P.Welcome)
        sent += 2
        # Give the fake worker some real (fuzz client) tasks to lie about.
        frames = list(GARBAGE_PICKLES)
        fake_client.send(
            P.encode(
                P.Submit(
                    [
                        [f"fuzz-run-{i}", [0, 1], [1, 1], [], 0, 0, None, None, False]
                        for i in range(20)
                    ],
                    [f"fuzz-run-{i}" for i in range(20)],
                ),
                frames,
            )
        )
        sent += 1
        known = [f"fuzz-run-{i}" for i in range(20)]
        worker_keys: list[str] = []
        for i in range(N_MESSAGES):
            drop, msg = anonymous(rng)
            anon.send(msg)
            drop2, msg2 = client_garbage(rng, known)
            fake_client.send(msg2)
            drop3, msg3 = worker_garbage(rng, worker_keys)
            fake_worker.send(msg3)
            sent += 3
            must_drop += drop + drop2 + drop3
            if i % 50 == 0:
                for peer in (anon, fake_client, fake_worker):
                    peer.drain()
                worker_keys = [
                    t[0]
                    for m, _ in fake_worker.received
                    if isinstance(m, P.RunTasks)
                    for t in m.tasks
                    if isinstance(t, list) and t
                ][-50:]
        wait_for(
            lambda: counters(client)["messages_in"] >= before["messages_in"] + sent,
            timeout=60,
            what="the broker to read every message",
        )
        # The fake worker leaves (a planned exit); its tasks go back to real workers.
        # The garbage may also have registered the other peers as workers (an
        # authenticated peer may be both client and worker): they leave too, or they
        # would linger until their heartbeats expire.
        for peer in (fake_worker, fake_client, anon):
            peer.send(P.encode(P.WorkerStatus("closed", [])))
        wait_for(
            lambda: len(client.scheduler_info()["workers"]) == n_workers,
            timeout=30,
            what="the fake worker to be gone",
        )
    finally:
        for peer in (anon, fake_client, fake_worker):
            peer.close()
        ctx.term()
    after = counters(client)
    assert after["dropped"] - before["dropped"] >= must_drop > N_MESSAGES
    check_cluster_works(client)


def check_cluster_works(client: Client) -> None:
    assert sum(client.gather(client.map(tasks.inc, range(200)))) == sum(range(1, 201))
    x = client.submit(tasks.total, client.map(tasks.double, range(50)))
    assert x.result(60) == 2 * sum(range(50))
    workers = list(client.scheduler_info()["workers"])
    assert len(workers) == 2
    # A result too large to travel inline: moved worker to worker, both ways.
    for src, dst in (workers, workers[::-1]):
        big = client.submit(tasks.make_bytes, 1_000_000, workers=[src], pure=False)
        n = client.submit(tasks.length, big, workers=[dst], pure=False)
        assert n.result(60) == 1_000_000


# ======================================================================================
# tests


@pytest.fixture(scope="module", params=["security", "no-security"])
def fuzz_cluster(request: Any) -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, security=request.param == "security"
    ) as c:
        yield c


@pytest.mark.slow
def test_fuzz_broker(fuzz_cluster: LocalCluster) -> None:
    broker = fuzz_cluster._broker_proc
    assert broker is not None
    with Client(fuzz_cluster, timeout=30) as c:
        fuzz_broker(c, fuzz_cluster.scheduler_address, fuzz_cluster.security)
        assert broker.proc.poll() is None  # the broker process is still running


@pytest.mark.slow
def test_fuzz_worker_data_port(fuzz_cluster: LocalCluster) -> None:
    rng = random.Random(SEED + 1)
    with Client(fuzz_cluster, timeout=30) as c:
        before = c.scheduler_info()["workers"]
        target = sorted(before)[0]
        # Something the target holds, for well-formed requests among the garbage.
        held = c.submit(tasks.make_bytes, 100_000, workers=[target], pure=False)
        held.result(60)
        ctx: zmq.Context[Any] = zmq.Context()
        peer = Peer(ctx, target, fuzz_cluster.security)
        try:
            for i in range(N_MESSAGES * 3):
                _, frames = anonymous(rng)
                if i % 10 == 0:  # well-typed GetData with junk keys (or a real one)
                    keys = [junk(rng), held.key] if rng.random() < 0.5 else [junk(rng)]
                    frames = P.encode(P.GetData(rng.randrange(2**31), keys))
                elif i % 10 == 1:  # another message type on the data port
                    frames = P.encode(P.Heartbeat({}))
                peer.send(frames)
                if i % 100 == 0:
                    peer.drain()
            # The data port answers a well-formed request after all that (the
            # replies come in order, so every message before it was read).
            peer.send(P.encode(P.GetData(424242, [held.key])))
            reply = wait_for(
                lambda: (
                    peer.drain()
                    or next(
                        (
                            m
                            for m, _ in peer.received
                            if isinstance(m, P.DataReply) and m.request_id == 424242
                        ),
                        None,
                    )
                ),
                timeout=60,
                what="the worker's answer",
            )
            assert [k for k, _ in reply.values] == [held.key]
        finally:
            peer.close()
            ctx.term()
        after = c.scheduler_info()["workers"]
        # The same worker process, not a restarted one.
        assert target in after and after[target]["pid"] == before[target]["pid"]
        check_cluster_works(c)


def test_unauthenticated_peer_gets_nothing_through() -> None:
    with (
        LocalCluster(n_workers=1, threads_per_worker=1) as cluster,
        Client(cluster, timeout=30) as c,
    ):
        before = counters(c)["messages_in"]
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        # The broker's public key, but a client key pair it never allowed.
        sock.curve_serverkey = cluster.security.server_public.encode()  # type: ignore[union-attr]
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.connect(cluster.scheduler_address)
        try:
            for _ in range(200):
                try:
                    sock.send_multipart(
                        P.encode(P.RegisterClient("stranger", {})), zmq.NOBLOCK
                    )
                except zmq.Again:
                    # The refused connection is gone: a DEALER with no peer would
                    # block here forever.
                    break
            assert monitor.poll(30_000), "the broker did not refuse the handshake"
            assert counters(c)["messages_in"] - before < 200
            assert c.submit(tasks.inc, 1).result(60) == 2
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            ctx.term()


@pytest.fixture
def small_broker() -> Iterator[tuple[Any, str]]:
    """An in-process broker with small limits (max_frames and max_message_bytes are
    ServerConfig fields; zbroker has no options for them), and one zworker."""
    from zdist.broker.server import BrokerServer, ServerConfig

    server = BrokerServer(
        ServerConfig(port=0, max_frames=1000, max_message_bytes=1_000_000), None
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zdist.worker",
            server.address,
            "--no-security",
            "--nthreads",
            "1",
            "--memory-limit",
            "0",
            "--log-level",
            "warning",
        ],
    )
    try:
        yield server, thread
    finally:
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        server.stop()
        thread.join(15)


def test_messages_over_the_size_limit_are_dropped(small_broker: Any) -> None:
    server, thread = small_broker
    with Client(server.address, security=False, timeout=30) as c:
        c.wait_for_workers(1, timeout=60)
        before = counters(c)
        ctx: zmq.Context[Any] = zmq.Context()
        peer = Peer(ctx, server.address, None)
        try:
            peer.send(P.encode(P.RegisterClient("big", {})))
            peer.wait_for(P.Welcome)
            too_many = P.encode(P.Heartbeat({}), [b""] * 1000)  # 1003 frames > 1000
            too_big = P.encode(P.Heartbeat({}), [b"x" * 1_100_000])  # > 1 MB
            for _ in range(10):
                peer.send(too_many)
                peer.send(too_big)
            # Heartbeats within the limits are answered: the ones before were read.
            peer.send(P.encode(P.Heartbeat({}), [b""] * 10))
            wait_for(
                lambda: counters(c)["messages_in"] >= before["messages_in"] + 22,
                timeout=60,
                what="the broker to read every message",
            )
        finally:
            peer.close()
            ctx.term()
        assert counters(c)["dropped"] - before["dropped"] == 20
        assert thread.is_alive()
        assert sum(c.gather(c.map(tasks.inc, range(100)))) == sum(range(1, 101))


def test_client_over_the_size_limit_gets_an_error(small_broker: Any) -> None:
    server, _ = small_broker
    with Client(server.address, security=False, timeout=30) as c:
        c.wait_for_workers(1, timeout=60)
        f = c.submit(tasks.identity, b"x" * 2_000_000)
        with pytest.raises(Exception) as info:
            f.result(timeout=15)
        assert not isinstance(info.value, TimeoutError), "the future stayed pending"
        assert "limit" in str(info.value)


@pytest.mark.slow
def test_garbage_peer_address_does_not_hang_a_real_workers_task() -> None:
    with (
        LocalCluster(n_workers=1, threads_per_worker=1) as cluster,
        Client(cluster, timeout=30) as c,
    ):
        [real] = [w["name"] for w in c.scheduler_info()["workers"].values()]
        ctx: zmq.Context[Any] = zmq.Context()
        fake = Peer(ctx, cluster.scheduler_address, cluster.security)
        try:
            # An authenticated worker that advertises a data address that is garbage
            # and a resource only it has.
            fake.send(
                P.encode(
                    P.RegisterWorker(
                        "fake",
                        1,
                        0,
                        {"FAKE": 1.0},
                        "not-an-endpoint",
                        "fakehost",
                        1,
                        "/tmp",
                        {},
                        [],
                    )
                )
            )
            fake.wait_for(P.Welcome)
            a = c.submit(tasks.make_bytes, 100_000, resources={"FAKE": 1}, pure=False)

            def run_tasks_for_a() -> bool:
                fake.drain()
                return any(
                    isinstance(m, P.RunTasks) and any(t[0] == a.key for t in m.tasks)
                    for m, _ in fake.received
                )

            wait_for(run_tasks_for_a, timeout=30, what="the fake worker to get a task")
            # "Done, and too large to travel inline": the result stays "on" the fake.
            fake.send(
                P.encode(
                    P.TaskResults([[a.key, "memory", 100_000, "bytes", None, "", 0.01]])
                )
            )
            wait([a], timeout=30)
            b = c.submit(tasks.length, a, workers=[real], pure=False)
            wait_for(
                lambda: c.scheduler_info()["tasks"].get("processing", 0) == 1,
                timeout=30,
                what="the real worker to be sent the dependent task",
            )
            # The real worker tried to fetch from "not-an-endpoint"; the fake leaves.
            fake.send(P.encode(P.WorkerStatus("closed", [])))
            wait_for(
                lambda: len(c.scheduler_info()["workers"]) == 1,
                timeout=30,
                what="the fake worker to be gone",
            )
        finally:
            fake.close()
            ctx.term()
        # The dependent task must be given back (its input is gone: it waits for a
        # recomputation that only a FAKE worker could do), not stay processing.
        wait_for(
            lambda: c.scheduler_info()["tasks"].get("processing", 0) == 0,
            timeout=30,
            what="the dependent task to leave the real worker",
        )
        assert not b.done()
        # And the real worker still works.
        assert c.submit(tasks.inc, 1, workers=[real]).result(30) == 2

"""A real worker (its loop on a thread, real sockets) driven by a scripted broker: a
ROUTER socket in the test that speaks the wire protocol message by message, for
orderings a live broker produces only in rare bursts."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
import tasks
import zmq

from zdist import protocol as P
from zdist import serialize
from zdist.wire import recv_frames, send_frames
from zdist.worker.execute import QUICK_AFTER_RUNS
from zdist.worker.worker import Worker, WorkerConfig

pytestmark = pytest.mark.timeout(60)


class ScriptedBroker:
    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.router_handover = 1  # a worker registering again, on a new socket
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.worker = b""

    def send(self, msg: P.Message, payload: list[Any] | tuple[Any, ...] = ()) -> None:
        send_frames(self.sock, [self.worker, *P.encode(msg, payload)])

    def expect(self, cls: type[P.Message]) -> tuple[Any, list[Any]]:
        """The worker's next message of type ``cls`` (heartbeats are skipped)."""
        while True:
            assert self.sock.poll(30_000), f"no {cls.__name__} from the worker"
            ident, *frames = recv_frames(self.sock)
            msg, payload = P.decode(frames)
            self.worker = ident.bytes
            if isinstance(msg, cls):
                return msg, payload
            if isinstance(msg, P.RegisterWorker):
                # Welcome not handled within a second (a stalled machine): again.
                self.welcome()
                continue
            assert isinstance(msg, P.Heartbeat), msg

    def welcome(self) -> None:
        self.send(P.Welcome(1.0, 30, {}, self.address))

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@contextlib.contextmanager
def scripted_worker() -> Iterator[tuple[ScriptedBroker, Worker]]:
    """A real Worker, its loop on a thread, registered with a ScriptedBroker."""
    broker = ScriptedBroker()
    worker = Worker(WorkerConfig(address=broker.address, security=None))
    thread = threading.Thread(target=worker.run, name="worker-loop", daemon=True)
    thread.start()
    try:
        broker.expect(P.RegisterWorker)
        broker.welcome()
        yield broker, worker
    finally:
        worker.stop()
        thread.join(30)
        broker.close()
    assert not thread.is_alive()


@pytest.fixture
def broker_and_worker() -> Iterator[tuple[ScriptedBroker, Worker]]:
    with scripted_worker() as both:
        yield both


def _run(broker: ScriptedBroker, key: str, free: list[str] | None) -> None:
    fl = P.FrameList()
    fn_ref = fl.add([cloudpickle.dumps(tasks.make_bytes)], inline=False)
    args_ref = fl.add(serialize.dumps(((1000,), {})))
    broker.send(P.RunTasks([[key, fn_ref, args_ref, [], None]], free), fl.frames)
    results, _ = broker.expect(P.TaskResults)
    assert [(r[0], r[1]) for r in results.results] == [(key, "memory")]


def test_keys_freed_inside_run_tasks_go_before_the_tasks_run(
    broker_and_worker: tuple[ScriptedBroker, Worker],
) -> None:
    # The broker forgot x (its client released it) and x was submitted again in the
    # same burst: one RunTasks carries free=[x] and the task x. Freed after the run,
    # the fresh value would be lost while the broker believes the worker holds it.
    broker, worker = broker_and_worker
    key = "make_bytes-0123456789abcdef"
    _run(broker, key, None)
    # Known quick (whatever this machine's load made of the first run's time), so
    # the next one runs while its RunTasks is handled, where the order shows.
    for _ in range(QUICK_AFTER_RUNS):
        worker._functions.record("make_bytes", 0.0)
    assert worker._functions.is_quick("make_bytes")
    _run(broker, key, [key])
    broker.send(P.SendData(7, [key]))
    reply, _ = broker.expect(P.DataReply)
    assert reply.request_id == 7
    assert [v[0] for v in reply.values] == [key]
    assert reply.missing == []


def test_keys_freed_inside_run_tasks_are_dropped(
    broker_and_worker: tuple[ScriptedBroker, Worker],
) -> None:
    broker, _ = broker_and_worker
    _run(broker, "make_bytes-00000000000000aa", None)
    _run(broker, "make_bytes-00000000000000bb", ["make_bytes-00000000000000aa"])
    broker.send(
        P.SendData(8, ["make_bytes-00000000000000aa", "make_bytes-00000000000000bb"])
    )
    reply, _ = broker.expect(P.DataReply)
    assert [v[0] for v in reply.values] == ["make_bytes-00000000000000bb"]
    assert reply.missing == ["make_bytes-00000000000000aa"]

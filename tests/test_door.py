"""Lone tasks a client sends straight to an idle worker on its host (the worker's door).

A worker that reaches the broker over its Unix socket also listens on one of its own,
its door, and names it with every result it sends a client itself
(DirectResults.door). A client with nothing else of its own in flight sends a task with
no dependencies and no restrictions through the door of the worker that last sent it
a result, and tells the broker in the same breath (Submit.via): the broker records
the task as processing there and sends it nowhere. The worker runs it if it is idle,
sends the result to the client, and reports it (TaskResults.door), or reports it
"refused" and the broker places it. The report may reach the broker before the
client's Submit does; the broker keeps it until then.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import tasks
import zmq
from test_broker_state import Sim, T, check_invariants, freed, run_keys, sent, updates
from test_worker_protocol import ScriptedBroker
from utils import wait_for

from zdist import Client, LocalCluster, datagram, get_worker, serialize
from zdist import protocol as P
from zdist.broker.state import FREE_DELAY
from zdist.client.comm import MAX_DOORS
from zdist.localsocket import bind_local_socket, remove_socket, user_socket_dir
from zdist.wire import recv_frames
from zdist.worker.door import MAX_DOOR_CONNECTIONS
from zdist.worker.worker import Worker, WorkerConfig

pytestmark = pytest.mark.timeout(120)

C1, C2 = b"c1", b"c2"
W1, W2 = b"w1", b"w2"
DIRECT = "ipc:///tmp/zdist-sockets-0/c1.sock"


# --- the broker's side, pure ---------------------------------------------------------


def _sim(
    workers: tuple[bytes, ...] = (W1,),
    resources: dict[str, float] | None = None,
    local: bool = True,
    **config: Any,
) -> Sim:
    sim = Sim(**config)
    for w in workers:
        sim.send(
            w,
            P.RegisterWorker(
                w.decode(),
                1,
                2**30,
                resources or {},
                f"tcp://{w.decode()}:9000",
                "node-a",
                1234,
                "/tmp/zdist",
                {"python": "3.11"},
                [],
                local,
            ),
        )
    sim.send(C1, P.RegisterClient("c1", {"python": "3.11"}, DIRECT))
    sim.flush()
    return sim


RUN = P.DOOR_RUN - 1  # a client's first door run


def _submit_via(
    sim: Sim,
    key: str,
    worker: bytes,
    client: bytes = C1,
    run: int = RUN,
    resources: dict[str, float] | None = None,
    workers: list[str] | None = None,
) -> None:
    fl = P.FrameList()
    entry = [key, fl.add([b"fn"]), fl.add([b"args"]), [], 0, 0, resources, workers]
    entry.append(False)
    via = [[key, worker.decode(), run]]
    sim.send(client, P.Submit([entry], [key], None, via), fl.frames)


def _door_result(
    sim: Sim,
    worker: bytes,
    key: str,
    status: str = "memory",
    told: bool = True,
    run: int = RUN,
) -> None:
    if status == "memory":
        entry = [key, "memory", 5, "bytes", [0, 1], "", 0.001]
        payload = [b"value"]
    elif status == "error":
        entry = [key, "error", 0, "", [0, 2], "ValueError: boom", 0.001]
        payload = [b"exc", b"tb"]
    else:
        entry = [key, status, 0, "", None, "", -1]
        payload = []
    told_runs = [[key, run]] if told and status == "memory" else None
    sim.send(worker, P.TaskResults([entry], told_runs, None, [[key, run]]), payload)


def test_a_task_sent_through_a_door_is_processing_there_and_not_sent_again() -> None:
    sim = _sim((W1, W2))
    _submit_via(sim, "a", W1)
    out = sim.flush()
    assert run_keys(out) == {}  # the client sent it; the broker sends nothing
    assert sim.state("a").name == "PROCESSING"
    assert sim.st.tasks["a"].processing_on == W1
    assert list(sim.st.workers[W1].processing) == ["a"]
    _door_result(sim, W1, "a")
    assert updates(sim.flush()) == {}  # the worker told the client itself
    assert sim.state("a").name == "MEMORY"
    assert sim.st.tasks["a"].who_has == {W1}
    assert sim.st.counters["tasks_done"] == 1


def test_a_report_before_the_submit_waits_for_it() -> None:
    sim = _sim()
    _door_result(sim, W1, "a")
    out = sim.flush()
    assert "a" not in sim.st.tasks and updates(out) == {} and freed(out, W1) == []
    _submit_via(sim, "a", W1)
    out = sim.flush()
    assert sim.state("a").name == "MEMORY"
    assert updates(out) == {} and run_keys(out) == {}
    assert sim.st._early == {}
    assert sim.st.workers[W1].processing == {}


def test_an_untold_result_reported_early_goes_by_the_broker() -> None:
    sim = _sim()
    _door_result(sim, W1, "a")
    # The send to the client failed after all (its link dropped, say).
    sim.send(W1, P.TaskResults([], None, [["a", RUN]]))
    sim.flush()
    _submit_via(sim, "a", W1)
    assert updates(sim.flush()) == {C1: [("a", "finished", [b"value"], "")]}


def test_an_early_error_reaches_the_client_when_the_submit_comes() -> None:
    sim = _sim()
    _door_result(sim, W1, "a", status="error")
    _submit_via(sim, "a", W1)
    got = updates(sim.flush())
    assert got == {C1: [("a", "error", [b"exc", b"tb"], "ValueError: boom")]}
    assert sim.state("a").name == "ERRED"


@pytest.mark.parametrize("early", [False, True])
def test_a_refused_task_is_placed_by_the_broker(early: bool) -> None:
    sim = _sim((W1, W2))
    if early:
        _door_result(sim, W1, "a", status="refused")
        _submit_via(sim, "a", W1)
    else:
        _submit_via(sim, "a", W1)
        sim.flush()
        _door_result(sim, W1, "a", status="refused")
    out = sim.flush()
    placed = run_keys(out)
    assert list(placed.values()) == [["a"]]
    assert sim.state("a").name == "PROCESSING"
    worker = next(iter(placed))
    sim.finish(worker, "a")
    assert updates(sim.flush()) == {C1: [("a", "finished", [b"value"], "")]}


def test_a_refusal_never_undoes_the_brokers_own_assignment() -> None:
    # "a" runs on W1 by the broker's dispatch; a stale refusal of a door task of
    # the same key must not take it back.
    sim = _sim()
    sim.submit(C1, T("a"))
    assert run_keys(sim.flush()) == {W1: ["a"]}
    _door_result(sim, W1, "a", status="refused")
    assert run_keys(sim.flush()) == {}
    assert sim.st.tasks["a"].processing_on == W1


def test_a_door_naming_an_unknown_worker_is_dispatched_as_usual() -> None:
    sim = _sim()
    _submit_via(sim, "a", b"w-gone")
    assert run_keys(sim.flush()) == {W1: ["a"]}


def test_a_door_task_of_a_key_the_broker_holds_is_a_replica_at_most() -> None:
    sim = _sim((W1, W2))
    sim.send(C2, P.RegisterClient("c2", {"python": "3.11"}))
    sim.submit(C2, T("a"))  # another client's
    out = sim.flush()
    (holder,) = run_keys(out)
    other = W2 if holder == W1 else W1
    _submit_via(sim, "a", other)
    assert run_keys(sim.flush()) == {}
    assert sim.st.tasks["a"].processing_on == holder
    _door_result(sim, other, "a")  # the door ran it too: not the broker's run
    assert freed(sim.flush(), other) == ["a"]
    sim.finish(holder, "a")
    got = updates(sim.flush())
    assert set(got) == {C1, C2}


def test_a_door_task_released_before_its_report_is_finished_then_freed() -> None:
    # The client got the result from the worker and released it before the
    # worker's report reached the broker (the result goes first): the task still
    # counts as done, and the worker is told to drop it then, not to cancel it.
    sim = _sim()
    _submit_via(sim, "a", W1)
    sim.flush()
    sim.send(C1, P.ReleaseKeys(["a"]))
    assert sent(sim.flush(), P.CancelTasks, W1) == []
    assert sim.state("a").name == "PROCESSING"
    _door_result(sim, W1, "a")
    out = sim.flush()
    assert updates(out) == {}
    assert sim.st._early == {} and "a" not in sim.st.tasks
    # A small result: its free waits a little, for company (FREE_BATCH).
    assert freed(out, W1) == []
    assert freed(sim.flush(sim.now + FREE_DELAY), W1) == ["a"]
    assert sim.st.counters["tasks_done"] == 1
    assert sim.st.workers[W1].processing == {}


@pytest.mark.parametrize("status", ["refused", "error"])
def test_a_released_door_task_that_then_fails_or_is_refused_is_forgotten(
    status: str,
) -> None:
    sim = _sim((W1, W2))
    _submit_via(sim, "a", W1)
    sim.send(C1, P.ReleaseKeys(["a"]))
    sim.flush()
    _door_result(sim, W1, "a", status=status)
    out = sim.flush()
    assert run_keys(out) == {} and updates(out) == {}
    assert "a" not in sim.st.tasks


def test_a_released_door_task_on_a_worker_lost_is_not_run_again() -> None:
    sim = _sim((W1, W2))
    _submit_via(sim, "a", W1)
    sim.send(C1, P.ReleaseKeys(["a"]))
    sim.flush()
    sim.st.remove_worker(W1, planned=False)
    assert run_keys(sim.flush()) == {}
    assert "a" not in sim.st.tasks


def test_a_report_whose_submit_never_comes_is_freed_after_the_client_liveness() -> None:
    sim = _sim()
    sim.tick(1.0)
    _door_result(sim, W1, "a")
    sim.flush()
    sim.send(C1, P.Heartbeat({}))  # the client stays alive
    sim.send(W1, P.Heartbeat({}))
    sim.tick(2.0)
    assert freed(sim.flush(), W1) == []
    liveness = 1.0 * 30  # Sim: client_heartbeat_interval x client_liveness
    for now in range(3, int(liveness) + 3, 5):
        sim.send(C1, P.Heartbeat({}))
        sim.send(W1, P.Heartbeat({}))
        sim.tick(float(now))
    sim.send(C1, P.Heartbeat({}))
    sim.send(W1, P.Heartbeat({}))
    sim.tick(liveness + 5)
    assert freed(sim.flush(), W1) == ["a"]
    assert sim.st._early == {}


def test_a_worker_lost_with_a_door_task_has_it_run_elsewhere() -> None:
    sim = _sim((W1, W2))
    _submit_via(sim, "a", W1)
    sim.flush()
    sim.st.remove_worker(W1, planned=False)
    assert run_keys(sim.flush()) == {W2: ["a"]}
    check_invariants(sim.st)


def test_via_is_ignored_for_restricted_tasks_remote_and_closing_workers() -> None:
    # The client never sends these; the broker still places such tasks itself.
    sim = _sim((W1,), resources={"GPU": 1})
    _submit_via(sim, "a", W1, resources={"GPU": 1})
    assert run_keys(sim.flush()) == {W1: ["a"]}
    assert sim.st.workers[W1].avail == {"GPU": 0}
    sim.finish(W1, "a")
    sim.flush()
    assert sim.st.workers[W1].avail == {"GPU": 1}
    sim = _sim((W1, W2))
    _submit_via(sim, "b", W1, workers=["w2"])
    assert run_keys(sim.flush()) == {W2: ["b"]}
    sim = _sim((W1,), local=False)
    _submit_via(sim, "c", W1)
    assert run_keys(sim.flush()) == {W1: ["c"]}
    sim = _sim((W1, W2))
    sim.send(W1, P.WorkerStatus("closing", []))
    _submit_via(sim, "d", W1)
    assert run_keys(sim.flush()) == {W2: ["d"]}


def test_an_early_report_of_another_run_is_freed_not_applied() -> None:
    # W1 ran "a" through its door once (run -5), and that report came late, after
    # its task was gone; the client now sends "a" again (run -6).
    sim = _sim()
    _door_result(sim, W1, "a", run=-5)
    _submit_via(sim, "a", W1, run=-6)
    out = sim.flush()
    assert freed(out, W1) == ["a"]  # the stale copy
    assert sim.state("a").name == "PROCESSING"
    assert sim.st.tasks["a"].direct_run == -6
    _door_result(sim, W1, "a", run=-6)
    assert updates(sim.flush()) == {}  # this run's result went to the client
    assert sim.state("a").name == "MEMORY"


def test_two_early_reports_of_one_key_are_each_settled() -> None:
    sim = _sim((W1, W2))
    _door_result(sim, W1, "a", run=-5)  # an older run, done
    _door_result(sim, W1, "a", status="refused", run=-6)  # this one, refused
    _submit_via(sim, "a", W1, run=-6)
    out = sim.flush()
    assert list(run_keys(out).values()) == [["a"]]  # placed by the broker
    assert freed(out, W1) == ["a"]
    assert sim.st._early == {}


def test_a_door_task_wanted_again_is_told_by_the_broker_too() -> None:
    # The client dropped the first future before the worker's result reached it,
    # then asked for the same key again: the worker's "told" must not silence the
    # broker, or the new future would never settle.
    sim = _sim()
    _submit_via(sim, "a", W1)
    sim.flush()
    sim.submit(C1, T("a"))
    assert run_keys(sim.flush()) == {}
    _door_result(sim, W1, "a")
    assert updates(sim.flush()) == {C1: [("a", "finished", [b"value"], "")]}


def test_a_killed_worker_does_not_keep_a_released_door_task() -> None:
    sim = _sim((W1, W2), allowed_failures=0)
    _submit_via(sim, "a", W1)
    sim.send(C1, P.ReleaseKeys(["a"]))
    sim.flush()
    sim.st.remove_worker(W1, planned=False)
    sim.flush()
    assert "a" not in sim.st.tasks


def test_malformed_via_is_a_protocol_error_and_changes_nothing() -> None:
    sim = _sim()
    fl = P.FrameList()
    entry = ["a", fl.add([b"fn"]), fl.add([b"args"]), [], 0, 0, None, None, False]
    for via in (
        [["a"]],
        [["a", "w1"]],
        [["a", 1, RUN]],
        ["a"],
        [["a", "w1", 0]],  # not a door run: the broker's own numbers
        [["a", "w1", 5]],
        [["b", "w1", RUN]],  # not a task of this Submit
    ):
        with pytest.raises(P.ProtocolError):
            sim.send(C1, P.Submit([entry], ["a"], None, via), fl.frames)
        assert "a" not in sim.st.tasks
    for door in ([1], [["a"]], [["a", "x"]]):
        with pytest.raises(P.ProtocolError):
            sim.send(W1, P.TaskResults([], None, None, door))


# --- the worker's side: a real Worker, a scripted broker on a Unix socket ------------


class _LocalScriptedBroker(ScriptedBroker):
    """ScriptedBroker listening on a Unix socket of ours, as LocalCluster's broker."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.router_handover = 1
        directory = user_socket_dir()
        assert directory is not None
        self.address = bind_local_socket(
            self.sock, os.path.join(directory, f"test-{os.getpid()}-b.sock"), zap=False
        )
        self.worker = b""

    def close(self) -> None:
        super().close()
        remove_socket(self.address)


class _FakeClient:
    """A client's direct listener (a DEALER on a Unix socket of ours: results too
    large for the door come there) and a connection to a worker's door."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        directory = user_socket_dir()
        assert directory is not None
        self.address = bind_local_socket(
            self.sock, os.path.join(directory, f"test-{os.getpid()}-c.sock"), zap=False
        )
        self.door: socket.socket | None = None
        self.reader = datagram.Reader()
        self.run = RUN

    def connect(self, door: str) -> None:
        self.door = datagram.connect(door[len("ipc://") :])

    def send(self, frames: list[Any]) -> None:
        assert self.door is not None
        assert datagram.send(self.door, frames)

    def send_task(self, key: str, fn: Any, *args: Any) -> None:
        fl = P.FrameList()
        fn_ref = fl.add([cloudpickle.dumps(fn)])
        args_ref = fl.add(serialize.dumps((args, {})))
        msg = P.RunTasks(
            [[key, fn_ref, args_ref, [], None]],
            None,
            [[b"c1", self.address, [[key, self.run]]]],
        )
        self.run -= 1
        self.send(P.encode(msg, fl.frames))

    def result(self) -> tuple[P.DirectResults, list[Any]]:
        """The next result back through the door."""
        assert self.door is not None
        poller = select.poll()
        poller.register(self.door.fileno(), select.POLLIN)
        assert poller.poll(30_000), "no DirectResults from the worker's door"
        frames = self.reader.recv(self.door)
        assert frames is not None
        msg, payload = P.decode(frames)
        assert isinstance(msg, P.DirectResults)
        return msg, payload

    def linked_result(self) -> tuple[P.DirectResults, list[Any]]:
        """The next result by the worker's ZeroMQ link to us."""
        assert self.sock.poll(30_000), "no DirectResults from the worker's link"
        msg, payload = P.decode(recv_frames(self.sock))
        assert isinstance(msg, P.DirectResults)
        return msg, payload

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.door is not None:
            self.door.close()
        self.ctx.term()
        remove_socket(self.address)


@contextmanager
def _door_worker() -> Iterator[tuple[ScriptedBroker, Worker, _FakeClient]]:
    broker = _LocalScriptedBroker()
    worker = Worker(WorkerConfig(address=broker.address, security=None))
    thread = threading.Thread(target=worker.run, name="worker-loop", daemon=True)
    thread.start()
    client = _FakeClient()
    try:
        reg, _ = broker.expect(P.RegisterWorker)
        assert reg.local
        broker.welcome()
        wait_for(lambda: worker.door is not None, what="the worker's door")
        door = worker.door
        assert door is not None
        client.connect(door)
        yield broker, worker, client
    finally:
        worker.stop()
        thread.join(30)
        client.close()
        broker.close()
    assert not thread.is_alive()
    assert worker.door is None and not Path(door[len("ipc://") :]).exists()


def _report(broker: ScriptedBroker) -> P.TaskResults:
    while True:
        msg, _ = broker.expect(P.TaskResults)
        if msg.results:
            return msg


def test_an_idle_worker_runs_a_door_task_and_sends_the_client_the_result() -> None:
    with _door_worker() as (broker, worker, client):
        for i in range(3):
            key, run = f"k{i}", client.run
            client.send_task(key, tasks.inc, i)
            # The result comes back on the door's connection, before the report.
            msg, payload = client.result()
            assert [u[0] for u in msg.updates] == [key]
            assert msg.updates[0][1] == "finished"
            assert serialize.loads(P.ref_frames(payload, msg.updates[0][2])) == i + 1
            assert msg.door == worker.door
            assert msg.worker == worker._ident.decode()
            report = _report(broker)
            assert [(r[0], r[1]) for r in report.results] == [(key, "memory")]
            assert report.door == [[key, run]]
            assert report.told == [[key, run]]
        assert worker.door_taken == 3 and worker.door_sent == 3
        assert worker.door_refused == 0


def test_a_result_for_a_client_that_closed_its_door_connection_goes_by_the_link(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    with _door_worker() as (broker, worker, client):
        client.send_task("a", tasks.wait_for_path, str(gate))
        wait_for(lambda: "a" in worker._executing, what="the door task to start")
        assert client.door is not None
        client.door.close()
        client.door = None
        wait_for(lambda: not worker._door_conns, what="the worker to see it closed")
        gate.touch()
        report = _report(broker)
        assert [(r[0], r[1]) for r in report.results] == [("a", "memory")]
        assert report.door is not None and report.door[0][0] == "a"
        assert worker.door_sent == 0
        if report.told:  # the worker's link to us was up: it came that way
            msg, _ = client.linked_result()
            assert [u[0] for u in msg.updates] == ["a"]


def test_a_busy_worker_refuses_a_door_task(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with _door_worker() as (broker, worker, client):
        fl = P.FrameList()
        fn_ref = fl.add([cloudpickle.dumps(tasks.wait_for_path)])
        args_ref = fl.add(serialize.dumps(((str(gate),), {})))
        broker.send(P.RunTasks([["slow", fn_ref, args_ref, [], None]]), fl.frames)
        wait_for(lambda: "slow" in worker._executing, what="the slow task to start")
        run = client.run
        client.send_task("a", tasks.inc, 1)
        report = _report(broker)
        assert [(r[0], r[1]) for r in report.results] == [("a", "refused")]
        assert report.door == [["a", run]] and not report.told
        assert worker.door_refused == 1
        gate.touch()
        report = _report(broker)
        assert [(r[0], r[1]) for r in report.results] == [("slow", "memory")]
        assert not report.door


def test_a_worker_past_its_connections_retires_the_least_used_losing_nothing() -> None:
    n = MAX_DOOR_CONNECTIONS + 6
    with _door_worker() as (broker, worker, client):
        assert client.door is not None
        path = worker.door[len("ipc://") :]  # type: ignore[index]
        conns = [client.door]

        def connected() -> bool:
            try:  # the backlog may be full until the worker accepts
                conns.append(datagram.connect(path))
            except BlockingIOError:
                return False
            return len(conns) == n

        wait_for(connected, what=f"{n} connections")
        client.door = None  # closed with the others
        try:
            # A task on every connection, sent as fast as they go: the oldest are
            # retired while tasks may still wait on them unread. A send to one
            # already retired fails (a client would send that task by the broker).
            sent = set()
            for i, conn in enumerate(conns):
                fl = P.FrameList()
                msg = P.RunTasks(
                    [
                        [
                            f"t{i}",
                            fl.add([cloudpickle.dumps(tasks.inc)]),
                            fl.add(serialize.dumps(((i,), {}))),
                            [],
                            None,
                        ]
                    ],
                    None,
                    [[b"c1", client.address, [[f"t{i}", RUN - i]]]],
                )
                if datagram.send(conn, P.encode(msg, fl.frames)):
                    sent.add(f"t{i}")
            assert len(sent) >= MAX_DOOR_CONNECTIONS
            # Each task sent is run or refused, and reported: none is lost.
            reported: dict[str, str] = {}
            while not sent <= set(reported):
                for r in _report(broker).results:
                    reported[r[0]] = r[1]
            assert set(reported) == sent
            assert set(reported.values()) <= {"memory", "refused"}
            wait_for(
                lambda: len(worker._door_conns) <= MAX_DOOR_CONNECTIONS,
                what="the connections over the limit retired",
            )
        finally:
            for conn in conns:
                conn.close()


def test_a_malformed_door_message_is_dropped_and_the_door_still_serves() -> None:
    with _door_worker() as (broker, worker, client):
        client.send([b"junk"])
        client.send(P.encode(P.FreeKeys(["x"])))
        fl = P.FrameList()
        bad = P.RunTasks(
            [["a", fl.add([b"fn"]), fl.add([b"args"]), [["dep", ""]], None]],
            None,
            [[b"c1", client.address, [["a", RUN]]]],
        )
        client.send(P.encode(bad, fl.frames))  # has a dependency
        fl = P.FrameList()
        broker_run = P.RunTasks(
            [["a", fl.add([b"fn"]), fl.add([b"args"]), [], None]],
            None,
            [[b"c1", client.address, [["a", 1]]]],
        )
        client.send(P.encode(broker_run, fl.frames))  # not a door run
        wait_for(lambda: worker.dropped >= 4, what="four messages dropped")
        assert worker.door_taken == 0 and not worker.tasks
        client.send_task("b", tasks.inc, 2)
        report = _report(broker)
        assert [(r[0], r[1]) for r in report.results] == [("b", "memory")]


# --- end to end: a LocalCluster -------------------------------------------------------


def _door_stats() -> tuple[int, int, str, int]:
    w = get_worker()
    return (w.door_taken, w.door_refused, w._ident.decode(), w.door_sent)


def test_one_at_a_time_round_trips_go_through_the_door(tmp_path: Path) -> None:
    with (
        LocalCluster(n_workers=2, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        for i in range(20):
            assert c.submit(tasks.inc, i).result(timeout=30) == i + 1
        assert c._conn.door is not None
        wait_for(
            lambda: sum(s[0] for s in c.run(_door_stats).values()) > 0,
            what="a task through a door",
        )
        taken = sum(s[0] for s in c.run(_door_stats).values())
        sent = sum(s[3] for s in c.run(_door_stats).values())
        done = c.scheduler_info()["counters"]["tasks_done"]
        for i in range(100, 150):
            assert c.submit(tasks.inc, i).result(timeout=30) == i + 1
        assert sum(s[0] for s in c.run(_door_stats).values()) >= taken + 40
        # Their results came back through the door, on the same connection.
        assert sum(s[3] for s in c.run(_door_stats).values()) >= sent + 40
        # The broker knows of each, and that it is done.
        wait_for(
            lambda: c.scheduler_info()["counters"]["tasks_done"] >= done + 50,
            what="the broker to count the door tasks done",
        )
        # A dependent of a door task runs, through the broker.
        a = c.submit(tasks.inc, 1000)
        assert a.result(timeout=30) == 1001
        assert c.submit(tasks.add, a, 1).result(timeout=30) == 1002
        # Of many at once, only the first goes through a door (it waits on a gate
        # meanwhile, so the others find it in flight).
        before = sum(s[0] for s in c.run(_door_stats).values())
        gate = tmp_path / "gate"
        first = c.submit(tasks.wait_for_path, str(gate))
        assert c._door_key == first.key
        futs = [c.submit(tasks.inc, i) for i in range(20)]
        gate.touch()
        assert c.gather(futs) == list(range(1, 21))
        assert first.result(timeout=30) == str(gate)
        assert sum(s[0] for s in c.run(_door_stats).values()) == before + 1


def test_a_door_task_whose_worker_dies_runs_again_elsewhere(tmp_path: Path) -> None:
    with (
        LocalCluster(n_workers=2, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        for i in range(10):
            c.submit(tasks.inc, i).result(timeout=30)
        assert c._conn.door is not None
        assert c._conn.door is not None
        conn = c._conn._doors[c._conn.door[0]]
        fut = c.submit(tasks.die_once, str(tmp_path / "died"), pure=False)
        assert c._door_key == fut.key  # it went through a door
        assert fut.result(timeout=90) == 42
        assert (tmp_path / "died").exists()
        # The dead worker's connection is read to its end and no longer polled.
        wait_for(lambda: conn not in c._conn._door_rx, what="the door dropped")
        for i in range(5):
            assert c.submit(tasks.inc, i).result(timeout=30) == i + 1


def test_a_client_keeps_connections_to_the_latest_doors_only() -> None:
    directory = user_socket_dir()
    assert directory is not None
    listeners = []
    with (
        LocalCluster(n_workers=1, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        try:
            conn = c._conn
            for i in range(MAX_DOORS + 2):
                path = os.path.join(directory, f"test-{os.getpid()}-door{i}.sock")
                listeners.append((path, datagram.listen(path)))
                assert conn.send_door(f"ipc://{path}", [b"hello"])
            assert len(conn._doors) == MAX_DOORS
            # The two oldest are shut down: the worker sees their end after what
            # was sent, and their sends fail (results then come by ZeroMQ).
            for _path, listener in listeners[:2]:
                peer = datagram.accept(listener)
                assert peer is not None
                reader = datagram.Reader()
                assert reader.recv(peer) == [b"hello"]
                with pytest.raises(EOFError):
                    reader.recv(peer)
                assert not datagram.send(peer, [b"a result"])
                peer.close()
            # The client reads them to their end and no longer polls them ...
            wait_for(
                lambda: set(conn._door_rx) == set(conn._doors.values()),
                what="the forgotten doors read to their end",
            )
            evicted = conn._door_dead[:]
            i = 0

            def closed_after_a_round_trip() -> bool:
                nonlocal i
                i += 1
                assert c.submit(tasks.inc, i).result(timeout=30) == i + 1
                return not conn._door_dead

            # ... and closes them once it holds both of its locks.
            wait_for(closed_after_a_round_trip, what="the forgotten doors closed")
            assert all(e.fileno() < 0 for e in evicted)
        finally:
            for path, listener in listeners:
                listener.close()
                os.unlink(path)


def test_a_future_argument_or_a_restriction_never_takes_the_door() -> None:
    with (
        LocalCluster(
            n_workers=1, dashboard_address=None, resources={"GPU": 1}
        ) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        for i in range(10):
            c.submit(tasks.inc, i).result(timeout=30)
        before = c.run(_door_stats)
        a = c.submit(tasks.inc, 1, workers=list(before))
        a.result(timeout=30)
        c.submit(tasks.add, a, 1).result(timeout=30)
        c.submit(tasks.inc, 5, retries=2).result(timeout=30)
        c.submit(tasks.inc, 6, priority=3).result(timeout=30)
        c.submit(tasks.inc, 7, key="explicit-key").result(timeout=30)
        c.submit(tasks.length, b"x" * 100_000).result(timeout=30)  # large argument
        c.submit(tasks.inc, 8, resources={"GPU": 1}).result(timeout=30)
        after = c.run(_door_stats)
        assert [s[0] for s in after.values()] == [s[0] for s in before.values()]


def test_a_door_path_that_is_not_ours_is_never_used(tmp_path: Path) -> None:
    with (
        LocalCluster(n_workers=1, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        c.submit(tasks.inc, 0).result(timeout=30)
        # A socket in a directory anyone may write to: it could be anyone's.
        open_dir = tmp_path / "open"
        open_dir.mkdir()
        open_dir.chmod(0o777)
        planted = f"ipc://{open_dir}/door.sock"
        c._conn.note_door(planted, "w-planted")
        c._conn.note_door = lambda door, worker: None  # type: ignore[method-assign]
        for i in range(3):
            assert c.submit(tasks.inc, i + 1).result(timeout=30) == i + 2
        assert planted not in c._conn._doors


def test_a_door_whose_worker_has_gone_leaves_tasks_to_the_broker() -> None:
    # A client with a door but no worker behind it: the task goes by the broker at
    # once (the connection fails), the door is forgotten, and nothing waits for it.
    with (
        LocalCluster(n_workers=1, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        c.submit(tasks.inc, 0).result(timeout=30)
        directory = user_socket_dir()
        assert directory is not None
        gone = f"ipc://{directory}/nobody-{time.time_ns()}.sock"
        c._conn.note_door(gone, "w-gone")
        c._conn.note_door = lambda door, worker: None  # type: ignore[method-assign]
        for i in range(5):
            assert c.submit(tasks.inc, i + 10).result(timeout=30) == i + 11
            assert c._conn.door is None and gone not in c._conn._doors


def test_a_door_future_dropped_before_it_settles_does_not_close_the_door() -> None:
    with (
        LocalCluster(n_workers=2, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        for i in range(10):
            c.submit(tasks.inc, i).result(timeout=30)
        dropped = c.submit(tasks.slow_inc, 1, delay=0.3)
        assert c._door_key == dropped.key
        del dropped  # released before it settles
        before = sum(s[0] for s in c.run(_door_stats).values())
        i = 100

        def more_through_doors() -> bool:
            nonlocal i
            i += 1
            assert c.submit(tasks.inc, i).result(timeout=30) == i + 1
            return sum(s[0] for s in c.run(_door_stats).values()) > before + 3

        wait_for(more_through_doors, timeout=30, what="doors used again")

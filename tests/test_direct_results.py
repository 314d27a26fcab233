"""Results sent by a worker straight to a client on the same host (zdist.worker.direct).

A client that reaches the broker over its Unix socket also listens on one of its own
(RegisterClient.direct); for a task only that client wants, running on a worker that
is also on the broker's host (RegisterWorker.local), the broker asks the worker to send
the result there (RunTasks.direct). The worker names the keys it delivered
(TaskResults.told) and the broker then sends that client nothing for them; any result
the worker could not hand to a live connection goes by the broker as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import tasks
import zmq
from test_broker_state import Sim, T, run_keys, sent, updates
from test_local_socket import NOBODY, _in_child, _require_root
from test_worker_protocol import ScriptedBroker, scripted_worker
from utils import wait_for

from zdist import Client, LocalCluster, serialize
from zdist import protocol as P
from zdist.localsocket import bind_local_socket, user_socket_dir
from zdist.wire import recv_ready
from zdist.worker.direct import MAX_LINKS
from zdist.worker.worker import Worker

pytestmark = pytest.mark.timeout(120)

C1, C2 = b"c1", b"c2"
W1, W2 = b"w1", b"w2"
DIRECT = "ipc:///tmp/zdist-sockets-0/c1.sock"


def _register(sim: Sim, worker: bytes, local: bool) -> None:
    sim.send(
        worker,
        P.RegisterWorker(
            worker.decode(),
            1,
            2**30,
            {},
            f"tcp://{worker.decode()}:9000",
            "node-a",
            1234,
            "/tmp/zdist",
            {"python": "3.11"},
            [],
            local,
        ),
    )


def _client(sim: Sim, ident: bytes, direct: str | None) -> None:
    sim.send(ident, P.RegisterClient(ident.decode(), {"python": "3.11"}, direct))


def _direct(out: list[Any], worker: bytes) -> list[Any]:
    """RunTasks.direct entries to ``worker``, without the run numbers."""
    return [
        [c, address, [key for key, _ in runs]]
        for m in sent(out, P.RunTasks, worker)
        for c, address, runs in m.direct or ()
    ]


def _runs(out: list[Any], worker: bytes) -> dict[str, int]:
    return {
        key: run
        for m in sent(out, P.RunTasks, worker)
        for _, _, runs in m.direct or ()
        for key, run in runs
    }


def _finish(sim: Sim, worker: bytes, key: str, told: list[Any] | None) -> None:
    entry = [key, "memory", 5, "bytes", [0, 1], "", 0.001]
    sim.send(worker, P.TaskResults([entry], told), [b"value"])


# --- the broker's side, pure ---------------------------------------------------------


def test_a_local_worker_is_asked_to_deliver_and_the_broker_then_stays_quiet() -> None:
    sim = Sim()
    _register(sim, W1, local=True)
    _client(sim, C1, DIRECT)
    sim.flush()
    sim.submit(C1, T("a"))
    out = sim.flush()
    assert run_keys(out) == {W1: ["a"]}
    assert _direct(out, W1) == [[C1, DIRECT, ["a"]]]
    _finish(sim, W1, "a", told=[["a", _runs(out, W1)["a"]]])
    assert updates(sim.flush()) == {}  # the worker told the client itself
    assert sim.state("a").name == "MEMORY"


def test_a_result_the_worker_did_not_deliver_goes_by_the_broker() -> None:
    sim = Sim()
    _register(sim, W1, local=True)
    _client(sim, C1, DIRECT)
    sim.submit(C1, T("a"))
    assert _direct(sim.flush(), W1) == [[C1, DIRECT, ["a"]]]
    _finish(sim, W1, "a", told=None)  # not connected yet, say
    assert updates(sim.flush()) == {C1: [("a", "finished", [b"value"], "")]}


def test_no_direct_delivery_to_a_remote_worker_or_a_tcp_client() -> None:
    sim = Sim()
    _register(sim, W1, local=False)
    _client(sim, C1, DIRECT)
    sim.submit(C1, T("a"))
    out = sim.flush()
    assert run_keys(out) == {W1: ["a"]}
    assert _direct(out, W1) == []
    sim = Sim()
    _register(sim, W1, local=True)
    _client(sim, C1, None)
    sim.submit(C1, T("a"))
    out = sim.flush()
    assert run_keys(out) == {W1: ["a"]}
    assert _direct(out, W1) == []


def test_a_key_two_clients_want_goes_by_the_broker_to_both() -> None:
    sim = Sim()
    _register(sim, W1, local=True)
    _client(sim, C1, DIRECT)
    _client(sim, C2, DIRECT.replace("c1", "c2"))
    sim.submit(C1, T("a"))
    sim.submit(C2, T("a"))
    out = sim.flush()
    assert run_keys(out) == {W1: ["a"]}
    assert _direct(out, W1) == []
    _finish(sim, W1, "a", told=None)
    got = updates(sim.flush())
    assert set(got) == {C1, C2}


def test_told_spares_only_the_client_that_was_told() -> None:
    # Dispatched while only c1 wanted it; c2 asked for it before it finished.
    sim = Sim()
    _register(sim, W1, local=True)
    _client(sim, C1, DIRECT)
    _client(sim, C2, None)
    sim.submit(C1, T("a"))
    out = sim.flush()
    assert _direct(out, W1) == [[C1, DIRECT, ["a"]]]
    sim.submit(C2, T("a"))
    sim.flush()
    _finish(sim, W1, "a", told=[["a", _runs(out, W1)["a"]]])
    assert updates(sim.flush()) == {C2: [("a", "finished", [b"value"], "")]}


def test_a_released_key_delivered_directly_is_freed_on_its_worker() -> None:
    # The client got the result from the worker and released it before the
    # worker's report reached the broker: the worker is told to drop it.
    sim = Sim()
    _register(sim, W1, local=True)
    _client(sim, C1, DIRECT)
    sim.submit(C1, T("a"))
    run = _runs(sim.flush(), W1)["a"]
    sim.send(C1, P.ReleaseKeys(["a"]))
    sim.flush()
    _finish(sim, W1, "a", told=[["a", run]])
    out = sim.flush()
    assert updates(out) == {}
    assert "a" not in sim.st.tasks
    assert [k for m in sent(out, P.FreeKeys, W1) for k in m.keys] == ["a"]


def test_a_late_report_of_an_earlier_run_does_not_silence_the_broker() -> None:
    # The client got run 1's result directly, released it and submitted the same
    # key again (the release rides in the Submit); it runs on the same worker. The
    # worker's late report of run 1 names run 1: the broker tells the client (the
    # new future must not depend on run 2 also reaching it directly).
    sim = Sim()
    _register(sim, W1, local=True)
    _client(sim, C1, DIRECT)
    sim.submit(C1, T("a"))
    first = _runs(sim.flush(), W1)["a"]
    fl = P.FrameList()
    entry = ["a", fl.add([b"fn:a"]), fl.add([b"args:a"]), [], 0, 0, None, None, False]
    sim.send(C1, P.Submit([entry], ["a"], ["a"]), fl.frames)
    second = _runs(sim.flush(), W1)["a"]
    assert second != first
    _finish(sim, W1, "a", told=[["a", first]])
    assert updates(sim.flush()) == {C1: [("a", "finished", [b"value"], "")]}


@pytest.mark.parametrize(
    "direct",
    [
        "tcp://127.0.0.1:1",
        "ipc://relative/path",
        "ipc:///" + "x" * 200,
        "ipc:///tmp/a\x00b",
    ],
)
def test_a_client_direct_address_must_be_a_unix_socket(direct: str) -> None:
    sim = Sim()
    msg, frames = P.decode(P.encode(P.RegisterClient("c", {}, direct)))
    with pytest.raises(P.ProtocolError):
        sim.st.handle(C1, msg, frames, 0.0)
    assert C1 not in sim.st.clients


def test_told_must_name_keys_and_runs() -> None:
    sim = Sim()
    _register(sim, W1, local=True)
    _client(sim, C1, DIRECT)
    sim.submit(C1, T("a"))
    sim.flush()
    entry = ["a", "memory", 5, "bytes", [0, 1], "", 0.001]
    for told in ([1], ["a"], [["a", "1"]], [[1, 1]]):
        msg, frames = P.decode(P.encode(P.TaskResults([entry], told), [b"value"]))
        with pytest.raises(P.ProtocolError):
            sim.st.handle(W1, msg, frames, 0.0)
        assert sim.state("a").name == "PROCESSING"


# --- a real worker, a scripted broker, a scripted client -----------------------------


@pytest.fixture
def client_socket() -> Iterator[tuple[zmq.Socket[Any], str]]:
    """A client's receiving socket listening on a Unix socket of ours."""
    directory = user_socket_dir()
    assert directory is not None
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = b"c-direct-test"
    path = os.path.join(directory, f"test-{os.getpid()}.sock")
    address = bind_local_socket(sock, path, zap=False)
    try:
        yield sock, address
    finally:
        sock.close()
        ctx.term()
        os.unlink(path)


@pytest.fixture
def broker_and_worker() -> Iterator[tuple[ScriptedBroker, Worker]]:
    with scripted_worker() as both:
        yield both


def _send_direct(
    broker: ScriptedBroker,
    key: str,
    fn: Any,
    arg: Any,
    ident: bytes,
    address: str,
    run: int,
) -> None:
    """RunTasks for ``fn(arg)`` as ``key``, its result to go to the client ``ident``
    at ``address`` (assignment ``run``)."""
    fl = P.FrameList()
    fn_ref = fl.add([cloudpickle.dumps(fn)], inline=False)
    args_ref = fl.add(serialize.dumps(((arg,), {})))
    entry = [key, fn_ref, args_ref, [], None]
    broker.send(P.RunTasks([entry], None, [[ident, address, [[key, run]]]]), fl.frames)


def _run_direct(
    broker: ScriptedBroker,
    key: str,
    value: Any,
    ident: bytes,
    address: str,
    run: int = 7,
) -> Any:
    _send_direct(broker, key, tasks.identity, value, ident, address, run)
    results, _ = broker.expect(P.TaskResults)
    assert [(r[0], r[1]) for r in results.results] == [(key, "memory")]
    return results


def _received(sock: zmq.Socket[Any]) -> dict[str, Any]:
    """What reached the client socket so far: key -> value."""
    got = {}
    while (frames := recv_ready(sock)) is not None:
        msg, payload = P.decode(frames)
        assert isinstance(msg, P.DirectResults)
        for key, status, ref, _ in msg.updates:
            assert status == "finished"
            got[key] = serialize.loads(P.ref_frames(payload, ref))
    return got


def _link_up(broker: ScriptedBroker, sock: zmq.Socket[Any], address: str) -> None:
    """Run tasks until one result reaches the client socket directly (the first
    ones go by the broker while the worker connects); drain what came."""
    for i in range(200):
        key = f"identity-link-{i}"
        if _run_direct(broker, key, i, sock.identity, address, run=i + 1).told:
            wait_for(lambda k=key: k in _received(sock), 10)
            return
    raise AssertionError("no result was ever delivered directly")


def test_every_told_result_reaches_the_client(
    broker_and_worker: tuple[ScriptedBroker, Worker],
    client_socket: tuple[zmq.Socket[Any], str],
) -> None:
    # A result counts as told only once the client's connection has worked (the
    # first ones go by the broker, and to the client too once connected); every
    # told result then arrives, with its value.
    broker, _ = broker_and_worker
    sock, address = client_socket
    told: set[str] = set()
    for i in range(200):
        key = f"identity-{i:04d}"
        results = _run_direct(broker, key, i * 3, sock.identity, address, run=i + 1)
        assert results.told in (None, [[key, i + 1]])  # only ever this run
        if results.told:
            told.add(key)
            if len(told) == 5:
                break
    assert len(told) == 5, "results were never delivered directly"
    got: dict[str, Any] = {}
    wait_for(lambda: got.update(_received(sock)) or told <= set(got), 10)
    assert all(v == int(k.split("-")[1]) * 3 for k, v in got.items())


def test_a_told_result_that_cannot_go_is_handed_back_to_the_broker(
    broker_and_worker: tuple[ScriptedBroker, Worker],
    client_socket: tuple[zmq.Socket[Any], str],
) -> None:
    # The client goes away between the worker's report (told) and its send: the
    # worker names that result in "untold", for the broker to send.
    broker, _ = broker_and_worker
    sock, address = client_socket
    _link_up(broker, sock, address)
    ident = sock.identity
    sock.close()
    told_before = None
    for i in range(200):
        key = f"identity-gone-{i}"
        _send_direct(broker, key, tasks.identity, i, ident, address, i)
        results, _ = broker.expect(P.TaskResults)
        if results.untold:  # the previous result's send failed after its report
            assert results.results == [] and results.untold == told_before
            return
        assert [r[0] for r in results.results] == [key]
        told_before = results.told
    raise AssertionError("a send to the closed client never failed after a report")


# A client that stops reading (stopped by a signal here): its receiving socket,
# in a process of its own, says which of the keys named on stdin never came.
_STALLED_CLIENT = r"""
import sys, zmq
from zdist import protocol as P
from zdist.localsocket import bind_local_socket
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.linger = 0
sock.rcvhwm = 0  # as a Client's
sock.identity = b"c-stalled"
print(bind_local_socket(sock, sys.argv[1], zap=False), flush=True)
want = set(sys.stdin.readline().split())
got = set()
while not want <= got and sock.poll(10000):
    msg, _ = P.decode(sock.recv_multipart())
    got.update(u[0] for u in msg.updates)
print("missing:", *sorted(want - got), flush=True)
"""


def _socket_buffer_bytes() -> int:
    """What the kernel buffers on a Unix socket here (at least the usual 208 KiB)."""
    try:
        with open("/proc/sys/net/core/wmem_default") as f:
            return max(int(f.read()), 212_992)
    except (OSError, ValueError):
        return 4 << 20


def test_a_link_evicted_for_another_client_still_delivers_what_it_was_told(
    broker_and_worker: tuple[ScriptedBroker, Worker],
) -> None:
    # A worker keeps MAX_LINKS client connections and drops the oldest for a new
    # one. Results told to the broker but still queued for the dropped client (it
    # has stopped reading) must reach it all the same: sent after the drop, or
    # handed back to the broker (TaskResults.untold), which then sends them.
    broker, worker = broker_and_worker
    directory = user_socket_dir()
    assert directory is not None
    stalled_path = os.path.join(directory, f"test-stalled-{os.getpid()}.sock")
    child = subprocess.Popen(
        [sys.executable, "-c", _STALLED_CLIENT, stalled_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ctx: zmq.Context[Any] = zmq.Context()
    others: list[tuple[zmq.Socket[Any], str, str]] = []
    try:
        assert child.stdout is not None and child.stdin is not None
        address = child.stdout.readline().strip()
        for i in range(200):  # until the link is up: a told result
            if _run_direct(broker, f"identity-{i}", i, b"c-stalled", address).told:
                break
        else:
            raise AssertionError("no result was ever delivered directly")
        os.kill(child.pid, signal.SIGSTOP)
        told: set[str] = set()
        # Twice what this host's Unix sockets buffer, so that results queue at the
        # worker (where they can be lost) and not only in the kernel.
        n = 2 * _socket_buffer_bytes() // (32 * 1024) + 8
        for i in range(n):
            key = f"make_bytes-stalled-{i}"
            _send_direct(
                broker, key, tasks.make_bytes, 32 * 1024, b"c-stalled", address, i + 1
            )
            results, _ = broker.expect(P.TaskResults)
            told.update(k for k, _ in results.told or [])
        assert len(told) == n  # queued on a live connection: every one counts
        handed_back: set[str] = set()
        for j in range(MAX_LINKS):  # the last one evicts the stalled client's link
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.identity = f"c-other-{j}".encode()
            path = os.path.join(directory, f"test-other-{os.getpid()}-{j}.sock")
            others.append((sock, "", path))  # closed in the end, bound or not
            others[-1] = (sock, bind_local_socket(sock, path, zap=False), path)
            for i in range(200):  # until this link is up, as _link_up
                key = f"identity-other-{j}-{i}"
                _send_direct(
                    broker, key, tasks.identity, i, sock.identity, others[-1][1], i + 1
                )
                results, _ = broker.expect(P.TaskResults)
                while not results.results:  # results of the dropped link, handed back
                    handed_back.update(k for k, _ in results.untold)
                    results, _ = broker.expect(P.TaskResults)
                if results.told:
                    break
        assert address not in worker._links._links  # dropped
        assert told <= handed_back
        os.kill(child.pid, signal.SIGCONT)
        out, _ = child.communicate(" ".join(sorted(told)) + "\n", timeout=30)
        # Whatever did not come straight (queued longer than the linger) the broker
        # would send; either way nothing told is lost.
        assert set(out.split()[1:]) <= handed_back
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait()
        for sock, _, path in others:
            sock.close()
            if os.path.exists(path):
                os.unlink(path)
        ctx.term()
        if os.path.exists(stalled_path):
            os.unlink(stalled_path)


def test_a_socket_others_could_have_made_gets_nothing(
    broker_and_worker: tuple[ScriptedBroker, Worker], tmp_path: Path
) -> None:
    # A live client socket, but in a directory anyone could have put it in.
    broker, worker = broker_and_worker
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    ctx: zmq.Context[Any] = zmq.Context()
    planted = ctx.socket(zmq.DEALER)
    planted.linger = 0
    planted.identity = b"c-x"
    address = f"ipc://{open_dir}/c.sock"
    planted.bind(address)
    try:
        for i in range(20):
            results = _run_direct(broker, f"identity-{i}", i, b"c-x", address)
            assert not results.told
        # The worker reports a result before it tries the client: wait for the try.
        wait_for(lambda: worker._links.missed == 20, 10)
        assert worker._links.sent == 0
        assert not planted.poll(200)
    finally:
        planted.close()
        ctx.term()


def test_a_bad_client_address_costs_the_worker_nothing(
    broker_and_worker: tuple[ScriptedBroker, Worker],
) -> None:
    broker, worker = broker_and_worker
    for i, address in enumerate(["ipc:///tmp/a\x00b", "ipc://relative", "tcp://x:1"]):
        results = _run_direct(broker, f"identity-{i}", i, b"c-x", address)
        assert not results.told
    # The worker reports a result before it tries the client: wait for the try.
    wait_for(lambda: worker._links.missed == 3, 10)
    results = _run_direct(broker, "identity-9", 9, b"c-x", "ipc:///tmp/a\x00b")
    assert not results.told  # still serving


def test_a_cancelled_task_that_runs_on_reports_to_the_broker_only(
    broker_and_worker: tuple[ScriptedBroker, Worker],
    client_socket: tuple[zmq.Socket[Any], str],
    tmp_path: Path,
) -> None:
    # The client was told "cancelled" by the broker; the task, already running,
    # must not then send the client a result of its own.
    broker, worker = broker_and_worker
    sock, address = client_socket
    _link_up(broker, sock, address)
    gate = tmp_path / "gate"
    key = "wait_for_path-1"
    _send_direct(broker, key, tasks.wait_for_path, str(gate), sock.identity, address, 1)
    wait_for(lambda: key in worker._executing, 10)
    broker.send(P.CancelTasks([key]))
    # Opened before the cancel arrives, the gate would let the result go first.
    wait_for(lambda: key not in worker._links.pending, 10, what="the cancel")
    gate.touch()
    results, _ = broker.expect(P.TaskResults)
    assert [(r[0], r[1]) for r in results.results] == [(key, "memory")]
    assert not results.told
    assert not sock.poll(200)


# --- end to end ----------------------------------------------------------------------


def test_local_cluster_results_come_straight_from_workers() -> None:
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        with Client(cluster) as client:
            direct = client._conn.direct
            assert direct is not None and direct.startswith("ipc://")
            assert os.stat(direct[len("ipc://") :]).st_mode & 0o777 == 0o600

            def delivered() -> int:
                workers = client.scheduler_info()["workers"].values()
                return sum(w["metrics"].get("direct_sent", 0) for w in workers)

            n = 0

            def round_trips() -> int:
                nonlocal n
                for _ in range(20):
                    assert client.submit(tasks.inc, n).result() == n + 1
                    n += 1
                return delivered()

            wait_for(round_trips, 30, what="a result sent by a worker")
            # A map and a graph still come back whole, some by either road.
            assert client.gather(client.map(tasks.inc, range(500))) == list(
                range(1, 501)
            )
        assert not os.path.exists(direct[len("ipc://") :])


def test_a_worker_result_never_overrides_a_settled_future() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster:
        with Client(cluster) as client:
            fut = client.submit(tasks.inc, 1)
            assert fut.result() == 2
            st = client._futures[fut.key]
            st.finish("cancelled", None, "cancelled by the broker")
            frames = serialize.dumps(99)
            msg = P.DirectResults([[fut.key, "finished", [0, len(frames)], ""]])
            client._on_message(msg, frames)
            assert fut.status == "cancelled"


def test_a_tcp_client_gets_everything_by_the_broker() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, protocol="tcp") as cluster:
        with Client(cluster) as client:
            assert client._conn.direct is None
            assert [client.submit(tasks.inc, i).result() for i in range(20)] == list(
                range(1, 21)
            )
            workers = client.scheduler_info()["workers"].values()
            assert sum(w["metrics"].get("direct_sent", 0) for w in workers) == 0


def test_another_user_cannot_send_a_client_results(tmp_path: Path) -> None:
    # A forged "finished" for a pending future, sent as another user to the
    # client's socket, must never arrive; as our own user (the control), it does.
    _require_root()
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster:
        with Client(cluster) as client:
            address = client._conn.direct
            assert address is not None
            ident = client._conn.sock.identity
            gate = tmp_path / "gate"
            try:
                for uid, key_suffix in ((NOBODY, "a"), (None, "b")):
                    fut = client.submit(
                        tasks.wait_for_path, str(gate), key=f"gate-{key_suffix}"
                    )

                    def forge(key: str = fut.key) -> str:
                        ctx: zmq.Context[Any] = zmq.Context()
                        s = ctx.socket(zmq.ROUTER)
                        s.linger = 1000
                        s.router_mandatory = 1
                        s.connect(address)
                        frames = P.encode(
                            P.TaskUpdates([[key, "finished", [0, 1], ""]]),
                            serialize.dumps("forged"),
                        )
                        for _ in range(200):  # up to 2 s for the handshake
                            try:
                                s.send_multipart([ident, *frames])
                                return "sent"
                            except zmq.ZMQError:
                                s.poll(10)
                        return "refused"

                    outcome = _in_child(uid, forge)
                    if uid == NOBODY:
                        assert outcome == "refused"
                        assert not fut.done()
                    else:
                        assert outcome == "sent"
                        assert fut.result(timeout=10) == "forged"
            finally:
                gate.touch()
            assert client.submit(tasks.inc, 1).result() == 2

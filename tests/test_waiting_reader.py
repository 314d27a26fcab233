"""A thread waiting on a result reads the client's socket itself (Connection.wait_for):
callbacks still run on the I/O thread, other waiting threads are woken, requests are
answered, timeouts and close still end the wait."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from tasks import wait_for_path
from utils import wait_for

from zdist import Client
from zdist import protocol as P
from zdist.client import comm
from zdist.errors import ZdistError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def no_safety_net(monkeypatch: pytest.MonkeyPatch) -> None:
    # A waiting thread looks at its future once a second whatever happens, which
    # would hide a lost wake-up from these tests: make it a minute.
    monkeypatch.setattr(comm, "WAIT_RECHECK_MS", 60_000)


RESULTS = (P.TaskUpdates, P.DirectResults)


def record_readers(client: Any, key: str) -> list[str]:
    """The names of the threads that handle ``key``'s result from now on (from the
    broker or, for a client on the broker's host, straight from its worker)."""
    conn = client._conn
    readers: list[str] = []
    handle = conn._on_message

    def recording(msg: P.Message, payload: list[Any]) -> None:
        if isinstance(msg, RESULTS) and any(u[0] == key for u in msg.updates):
            readers.append(threading.current_thread().name)
        handle(msg, payload)

    conn._on_message = recording
    return readers


def _store_result(future: Any, into: dict[int, Any], i: int) -> None:
    try:
        into[i] = future.result(timeout=60)
    except BaseException as exc:  # compared below
        into[i] = exc


def waiters(client: Any) -> int:
    return client._conn._waiters


def open_gate(path: Path) -> None:
    path.write_text("open")


def test_the_waiting_thread_reads_the_result_and_callbacks_stay_on_the_io_thread(
    client: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    f = client.submit(wait_for_path, str(gate), pure=False)
    ran_on: list[str] = []
    called = threading.Event()

    def callback(_: Any) -> None:
        ran_on.append(threading.current_thread().name)
        called.set()

    f.add_done_callback(callback)
    readers = record_readers(client, f.key)
    opener = threading.Thread(
        target=lambda: (wait_for(lambda: waiters(client) == 1), open_gate(gate))
    )
    opener.start()
    assert f.result(timeout=60) == str(gate)
    opener.join(30)
    assert readers == [threading.current_thread().name]  # this thread read it
    assert called.wait(30)
    assert ran_on == ["zdist-client-io"]


def test_threads_waiting_on_different_results_all_wake(
    client: Any, tmp_path: Path
) -> None:
    # Whichever thread reads a reply, the thread that wants it returns. Each round
    # opens one gate while both threads wait, so the reply may be read by either.
    for round_ in range(4):
        gates = [tmp_path / f"gate-{round_}-{i}" for i in range(2)]
        futures = [client.submit(wait_for_path, str(g), pure=False) for g in gates]
        got: dict[int, Any] = {}
        threads = [
            threading.Thread(target=_store_result, args=(futures[i], got, i))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: waiters(client) == 2, what="two waiting threads")
            first = round_ % 2
            open_gate(gates[first])
            threads[first].join(30)
            assert not threads[first].is_alive()
            assert got[first] == str(gates[first])
            assert threads[1 - first].is_alive()  # its gate is still shut
        finally:
            for g in gates:
                open_gate(g)
        threads[1 - first].join(30)
        assert got == {0: str(gates[0]), 1: str(gates[1])}


def test_a_request_is_answered_while_a_thread_waits_on_a_result(
    client: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    f = client.submit(wait_for_path, str(gate), pure=False)
    waiter = threading.Thread(target=f.result, kwargs={"timeout": 60})
    waiter.start()
    wait_for(lambda: waiters(client) == 1)
    info = client.scheduler_info()  # its reply is read by the waiting thread
    assert len(info["workers"]) == 2
    open_gate(gate)
    waiter.join(30)
    assert not waiter.is_alive()
    assert f.result(timeout=10) == str(gate)


def test_a_timeout_ends_the_wait_and_the_result_still_comes(
    client: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    f = client.submit(wait_for_path, str(gate), pure=False)
    with pytest.raises(TimeoutError):
        f.result(timeout=0.2)
    assert waiters(client) == 0
    open_gate(gate)
    assert f.result(timeout=60) == str(gate)


def test_closing_the_client_ends_a_wait(cluster: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    c = Client(cluster, set_as_default=False)
    try:
        f = c.submit(wait_for_path, str(gate), pure=False)
        outcome: list[BaseException | str] = []

        def wait() -> None:
            try:
                outcome.append(f.result(timeout=60))
            except (ZdistError, OSError, RuntimeError) as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_for(lambda: waiters(c) == 1)
        c.close()
        waiter.join(30)
        assert not waiter.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], BaseException), outcome
        assert "closed" in str(outcome[0])
    finally:
        open_gate(gate)  # let the worker's thread go
        c.close()


def test_a_waiting_thread_interrupted_halfway_through_a_message_loses_nothing(
    client: Any, tmp_path: Path
) -> None:
    # Ctrl-C lands while the waiting thread handles the reply: the I/O thread
    # handles that message again, so the future still finishes.
    gate = tmp_path / "gate"
    f = client.submit(wait_for_path, str(gate), pure=False)
    conn = client._conn
    handle = conn._on_message
    me = threading.current_thread()

    def interrupted(msg: P.Message, payload: list[Any]) -> None:
        if threading.current_thread() is me and isinstance(msg, RESULTS):
            conn._on_message = handle  # once
            raise KeyboardInterrupt
        handle(msg, payload)

    conn._on_message = interrupted
    opener = threading.Thread(
        target=lambda: (wait_for(lambda: waiters(client) == 1), open_gate(gate))
    )
    opener.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            f.result(timeout=60)
    finally:
        open_gate(gate)
        opener.join(30)
    assert conn._on_message is handle  # the interruption happened
    wait_for(f.done, timeout=30, what="the I/O thread to handle the message again")
    assert f.result(timeout=10) == str(gate)
    assert waiters(client) == 0


def test_a_long_wait_spaces_out_the_io_threads_looks_and_ends_with_a_wake(
    client: Any, tmp_path: Path
) -> None:
    """While a thread waits long on one result the I/O thread looks ever more rarely
    (a waiting client on a login node used 1.5% of a core); the waiting thread that
    ends such a wait wakes it, so that it reads the socket again at once."""
    conn = client._conn
    woken: list[str] = []
    wake = conn.wake

    def recording_wake() -> None:
        woken.append(threading.current_thread().name)
        wake()

    conn.wake = recording_wake
    try:
        gate = tmp_path / "gate"
        f = client.submit(wait_for_path, str(gate), pure=False)
        done: dict[int, Any] = {}
        waiter = threading.Thread(target=_store_result, args=(f, done, 0), name="w")
        waiter.start()
        wait_for(
            lambda: conn._io_tick >= 8 * comm.WAITER_TICK_MS, 30, what="backing off"
        )
        open_gate(gate)
        waiter.join(60)
        assert done == {0: str(gate)}
        assert "w" in woken  # the waiter woke the I/O thread on its way out
        wait_for(lambda: conn._io_tick == comm.WAITER_TICK_MS, 30, what="the reset")
    finally:
        conn.wake = wake

"""The broker's scheduling state machine, driven directly: messages in, a fake clock,
and the messages that flush() returns. No sockets, no threads, no real time."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import pytest

from zdist import protocol as P
from zdist.broker import records
from zdist.broker.graph import TaskGraph, find_cycle, topological_order
from zdist.broker.state import (
    _TRANSITIONS,
    FINAL_STATES,
    FREE_BATCH,
    FREE_DELAY,
    LOCALITY_BYTES,
    STORY_LENGTH,
    BrokerConfig,
    BrokerState,
    IllegalTransition,
    TaskState,
)
from zdist.errors import GraphError, KilledWorker

pytestmark = pytest.mark.timeout(30)

C1, C2 = b"c1", b"c2"
W1, W2, W3 = b"w1", b"w2", b"w3"
S = TaskState


def addr(ident: bytes) -> str:
    return f"tcp://{ident.decode()}:9000"


class T:
    """One task of a Submit: its payload is ``fn:<key>`` and ``args:<key>``."""

    def __init__(
        self,
        key: str,
        *deps: str,
        prio: int = 0,
        retries: int = 0,
        resources: dict[str, float] | None = None,
        workers: list[str] | None = None,
        loose: bool = False,
        data: bool = False,
    ) -> None:
        self.key = key
        self.deps = list(deps)
        self.prio = prio
        self.retries = retries
        self.resources = resources
        self.workers = workers
        self.loose = loose
        self.data = data  # scattered data: no function


class Sim:
    """A BrokerState, a fake clock, and helpers that speak the wire protocol to it.
    Every message in and out goes through encode/decode, so each one is valid."""

    def __init__(self, **config: Any) -> None:
        cfg = {
            "address": "tcp://broker:1",
            "heartbeat_interval": 1.0,
            "liveness": 10,
            "client_heartbeat_interval": 1.0,
            "client_liveness": 30,
            **config,
        }
        self.st = BrokerState(BrokerConfig(**cfg), {"python": "3.11"})
        self.now = 0.0

    def send(self, ident: bytes, msg: P.Message, payload: Iterable[bytes] = ()) -> None:
        msg, frames = P.decode(P.encode(msg, list(payload)))
        self.st.handle(ident, msg, frames, self.now)

    def flush(
        self, now: float | None = None
    ) -> list[tuple[bytes, P.Message, list[Any]]]:
        """What the state sends; ``now`` moves the clock on first (frees fall due)."""
        if now is not None:
            self.now = now
        out = []
        for ident, msg, payload in self.st.flush(now):
            back, frames = P.decode(P.encode(msg, payload))
            assert back == msg
            out.append((ident, back, frames))
        check_invariants(self.st)
        return out

    def tick(self, now: float) -> None:
        self.now = now
        self.st.tick(now)

    def worker(
        self,
        ident: bytes,
        nthreads: int = 1,
        resources: dict[str, Any] | None = None,
        keys: Iterable[str] = (),
        host: str = "node-a",
    ) -> None:
        self.send(
            ident,
            P.RegisterWorker(
                ident.decode(),
                nthreads,
                2**30,
                resources or {},
                addr(ident),
                host,
                1234,
                "/tmp/zdist",
                {"python": "3.11"},
                list(keys),
            ),
        )

    def client(self, ident: bytes) -> None:
        self.send(ident, P.RegisterClient(ident.decode(), {"python": "3.11"}))

    def submit(self, client: bytes, *tasks: T, wants: list[str] | None = None) -> None:
        fl = P.FrameList()
        entries = []
        for t in tasks:
            fn_ref = None if t.data else fl.add([f"fn:{t.key}".encode()])
            entries.append(
                [
                    t.key,
                    fn_ref,
                    fl.add([f"args:{t.key}".encode()]),
                    t.deps,
                    t.prio,
                    t.retries,
                    t.resources,
                    t.workers,
                    t.loose,
                ]
            )
        if wants is None:
            wants = [t.key for t in tasks]
        self.send(client, P.Submit(entries, wants), fl.frames)

    def finish(
        self,
        worker: bytes,
        key: str,
        value: bytes = b"value",
        large: bool = False,
        nbytes: int | None = None,
        duration: float = -1.0,
    ) -> None:
        """The worker reports ``key`` done: inline ``value``, or held there if large."""
        if large:
            entry = [key, "memory", nbytes or 1000, "bytes", None, "", duration]
            self.send(worker, P.TaskResults([entry]))
        else:
            entry = [key, "memory", nbytes or len(value), "bytes", [0, 1], "", duration]
            self.send(worker, P.TaskResults([entry]), [value])

    def fail(self, worker: bytes, key: str, text: str = "ValueError: boom") -> None:
        entry = [key, "error", 0, "", [0, 2], text, 0.1]
        self.send(worker, P.TaskResults([entry]), [b"exc:" + key.encode(), b"tb"])

    def state(self, key: str) -> TaskState:
        return self.st.tasks[key].state


ACTIVE = {S.WAITING, S.READY, S.PROCESSING}


def check_invariants(st: BrokerState) -> None:
    """What the state's incremental bookkeeping must agree with, recounted."""
    tasks = st.tasks
    assert set(st.graph._succ) == set(tasks)
    for key, t in tasks.items():
        assert set(st.graph.dependencies(key)) == set(t.deps), key
        assert len(set(t.deps)) == len(t.deps), key
        dependents = [tasks[d] for d in st.graph.dependents(key)]
        assert t.n_active == sum(d.state in ACTIVE for d in dependents), key
        deps = [tasks[d] for d in t.deps]
        if t.state is S.WAITING:
            assert t.waiting_on == sum(d.state is not S.MEMORY for d in deps), key
            assert t.waiting_on > 0, key
        if t.state is S.READY:
            assert all(d.state is S.MEMORY for d in deps), key
        if t.state is S.PROCESSING:
            assert key in st.workers[t.processing_on].processing, key  # type: ignore[index]
        else:
            assert t.processing_on is None, key
        if t.state is S.MEMORY:
            assert t.who_has or t.inline is not None, key
        else:
            assert not t.who_has and t.inline is None, key
        assert t.who_has <= set(st.workers), key
        if t.state is S.ERRED:
            assert t.error is not None, key
    for ident, w in st.workers.items():
        for key in w.processing:
            assert tasks[key].processing_on == ident, key
        for key in w.data:
            assert ident in tasks[key].who_has, key
        used: dict[str, float] = {}
        for key in w.processing:
            for r, n in (tasks[key].resources or {}).items():
                used[r] = used.get(r, 0) + n
        assert w.avail == {
            r: w.resources.get(r, 0) - used.get(r, 0) for r in w.avail
        }, ident
    for key, t in tasks.items():
        for ident in t.who_has:
            assert key in st.workers[ident].data, key
    for ident, c in st.clients.items():
        for key in c.wants:
            assert ident in tasks[key].wanted_by, key


def runs(out: list[Any]) -> dict[bytes, dict[str, dict[str, Any]]]:
    """``{worker: {key: {fn, args, deps, resources}}}`` from RunTasks messages; deps
    map to ``""``, a peer address, or the inline frames."""
    got: dict[bytes, dict[str, dict[str, Any]]] = {}
    for ident, msg, payload in out:
        if isinstance(msg, P.RunTasks):
            for key, fn_ref, args_ref, deps, resources in msg.tasks:
                got.setdefault(ident, {})[key] = {
                    "fn": None if fn_ref is None else P.ref_frames(payload, fn_ref),
                    "args": P.ref_frames(payload, args_ref),
                    "deps": {
                        d: P.ref_frames(payload, w)
                        if isinstance(w, (list, bytes))
                        else w
                        for d, w in deps
                    },
                    "resources": resources,
                }
    return got


def run_keys(out: list[Any]) -> dict[bytes, list[str]]:
    return {
        ident: [e[0] for e in msg.tasks]
        for ident, msg, _ in out
        if isinstance(msg, P.RunTasks)
    }


def updates(out: list[Any]) -> dict[bytes, list[tuple[str, str, Any, str]]]:
    got: dict[bytes, list[tuple[str, str, Any, str]]] = {}
    for ident, msg, payload in out:
        if isinstance(msg, P.TaskUpdates):
            for key, status, ref, text in msg.updates:
                frames = None if ref is None else P.ref_frames(payload, ref)
                got.setdefault(ident, []).append((key, status, frames, text))
    return got


def sent(out: list[Any], cls: type[P.Message], ident: bytes | None = None) -> list[Any]:
    return [
        msg
        for i, msg, _ in out
        if isinstance(msg, cls) and (ident is None or i == ident)
    ]


def freed(out: list[Any], ident: bytes) -> list[str]:
    """Keys ``ident`` is told to drop: FreeKeys, or RunTasks.free (dropped first)."""
    keys = [k for m in sent(out, P.FreeKeys, ident) for k in m.keys]
    keys += [k for m in sent(out, P.RunTasks, ident) for k in m.free or ()]
    return sorted(keys)


def cancelled(out: list[Any], ident: bytes) -> list[str]:
    return sorted(k for m in sent(out, P.CancelTasks, ident) for k in m.keys)


def snapshot(st: BrokerState) -> Any:
    """Everything observable about the state (to prove a message changed nothing)."""
    return (
        {
            k: (
                t.state,
                t.waiting_on,
                t.deps,
                t.retries,
                sorted(t.wanted_by),
                sorted(t.who_has),
                t.processing_on,
                t.queued,
                t.inline,
            )
            for k, t in st.tasks.items()
        },
        {
            i: (
                sorted(w.processing),
                sorted(w.data),
                sorted(w.local_queue),
                dict(w.avail),
                w.status,
                w.avg_duration,
            )
            for i, w in st.workers.items()
        },
        {i: sorted(c.wants) for i, c in st.clients.items()},
        len(st.graph),
        st.graph.n_edges(),
        sorted(st.ready),
        dict(st.counters),
    )


@pytest.fixture
def sim() -> Sim:
    s = Sim()
    s.worker(W1)
    s.client(C1)
    s.flush()
    return s


# --------------------------------------------------------------------------------------
# registration


def test_register_worker_and_client_are_welcomed() -> None:
    s = Sim()
    s.worker(W1, nthreads=4, resources={"GPU": 2})
    s.client(C1)
    out = s.flush()
    assert [(i, m) for i, m, _ in out] == [
        (W1, P.Welcome(1.0, 10, {"python": "3.11"}, "tcp://broker:1")),
        (C1, P.Welcome(1.0, 30, {"python": "3.11"}, "tcp://broker:1")),
    ]
    w = s.st.workers[W1]
    assert (w.name, w.nthreads, w.address, w.resources) == (
        "w1",
        4,
        addr(W1),
        {"GPU": 2},
    )
    assert set(s.st.clients) == {C1}


def test_unregistered_peers_get_an_error(sim: Sim) -> None:
    sim.submit(C2, T("x"))
    sim.send(W2, P.TaskResults([]))
    sim.send(C2, P.Heartbeat({}))
    out = sim.flush()
    assert [(i, m) for i, m, _ in out] == [
        (C2, P.Error(0, "unregistered")),
        (W2, P.Error(0, "unregistered")),
        (C2, P.Error(0, "unregistered")),
    ]
    assert sim.st.tasks == {}


@pytest.mark.parametrize(
    "msg", [P.Welcome(1.0, 1, {}, ""), P.RunTasks([]), P.GetData(1, []), P.Error(0, "")]
)
def test_messages_not_meant_for_the_broker_are_protocol_errors(
    sim: Sim, msg: P.Message
) -> None:
    with pytest.raises(P.ProtocolError, match="not for the broker"):
        sim.send(C1, msg)


def test_unregistered_worker_key_is_freed_and_known_key_becomes_a_replica(
    sim: Sim,
) -> None:
    sim.submit(C1, T("x"))
    sim.flush()
    sim.finish(W1, "x", large=True)
    sim.flush()
    sim.worker(W2, keys=["x", "stale"])
    out = sim.flush()
    assert freed(out, W2) == ["stale"]
    assert sim.st.tasks["x"].who_has == {W1, W2}
    assert sim.st.workers[W2].data == {"x"}


# --------------------------------------------------------------------------------------
# submit -> run -> result


def test_submit_one_task_runs_on_the_worker(sim: Sim) -> None:
    sim.submit(C1, T("x"))
    out = sim.flush()
    assert runs(out) == {
        W1: {"x": {"fn": [b"fn:x"], "args": [b"args:x"], "deps": {}, "resources": None}}
    }
    assert updates(out) == {}
    assert sim.state("x") is S.PROCESSING
    assert sim.st.tasks["x"].processing_on == W1
    assert list(sim.st.workers[W1].processing) == ["x"]
    assert sim.flush() == []  # nothing is sent twice


def test_scattered_data_has_no_function(sim: Sim) -> None:
    sim.submit(C1, T("d", data=True))
    assert runs(sim.flush())[W1]["d"]["fn"] is None


def test_result_finishes_with_inline_frames_to_the_client(sim: Sim) -> None:
    sim.submit(C1, T("x"))
    sim.flush()
    sim.finish(W1, "x", b"42", duration=0.5)
    out = sim.flush()
    assert updates(out) == {C1: [("x", "finished", [b"42"], "")]}
    t = sim.st.tasks["x"]
    assert (t.state, t.who_has, t.inline, t.nbytes, t.typename) == (
        S.MEMORY,
        {W1},
        [b"42"],
        2,
        "bytes",
    )
    w = sim.st.workers[W1]
    assert (w.processing, w.data, w.avg_duration) == ({}, {"x"}, 0.5)
    assert sim.st.counters["tasks_done"] == 1


def test_large_result_stays_on_the_worker(sim: Sim) -> None:
    sim.submit(C1, T("x"))
    sim.flush()
    sim.finish(W1, "x", large=True, nbytes=10**9)
    out = sim.flush()
    assert updates(out) == {C1: [("x", "finished", None, "")]}
    assert sim.st.tasks["x"].inline is None
    assert sim.st.tasks["x"].nbytes == 10**9


def test_result_from_a_worker_that_does_not_run_the_task_is_freed(sim: Sim) -> None:
    sim.worker(W2)
    sim.submit(C1, T("x", workers=["w1"]))
    sim.flush()
    sim.finish(W2, "x", b"stray")
    out = sim.flush()
    assert freed(out, W2) == ["x"]
    assert updates(out) == {}
    assert sim.state("x") is S.PROCESSING


# --------------------------------------------------------------------------------------
# dependencies


def test_task_waits_for_its_dependencies_which_travel_inline() -> None:
    s = Sim()
    s.worker(W1)
    s.worker(W2)
    s.client(C1)
    s.flush()
    # dependents first: the broker orders the batch itself
    s.submit(
        C1,
        T("b", "a", workers=["w2"]),
        T("c", "a", workers=["w1"]),
        T("a", workers=["w1"]),
        wants=["b", "c"],
    )
    out = s.flush()
    assert run_keys(out) == {W1: ["a"]}
    assert (s.state("b"), s.st.tasks["b"].waiting_on) == (S.WAITING, 1)
    s.finish(W1, "a", b"A")
    out = s.flush()
    r = runs(out)
    assert r[W2]["b"]["deps"] == {"a": [b"A"]}  # inline copy from the broker
    assert r[W1]["c"]["deps"] == {"a": ""}  # already there
    assert updates(out) == {}  # nobody wants "a"


def test_large_dependency_is_fetched_from_its_holder() -> None:
    s = Sim()
    s.worker(W1)
    s.worker(W2)
    s.client(C1)
    s.submit(C1, T("a", workers=["w1"]), T("b", "a", workers=["w2"]), wants=["b"])
    s.flush()
    s.finish(W1, "a", large=True)
    r = runs(s.flush())
    assert r == {
        W2: {
            "b": {
                "fn": [b"fn:b"],
                "args": [b"args:b"],
                "deps": {"a": addr(W1)},
                "resources": None,
            }
        }
    }


def test_dependency_on_a_task_already_in_memory(sim: Sim) -> None:
    sim.submit(C1, T("a"))
    sim.flush()
    sim.finish(W1, "a", b"A")
    sim.flush()
    sim.submit(C1, T("b", "a"))
    assert runs(sim.flush())[W1]["b"]["deps"] == {"a": ""}


def test_a_dependency_named_twice_is_one_dependency(sim: Sim) -> None:
    sim.submit(C1, T("a"), T("b", "a", "a"), wants=["b"])
    sim.flush()
    sim.finish(W1, "a", b"A")
    out = sim.flush()
    assert run_keys(out) == {W1: ["b"]}
    assert sim.st.tasks["b"].deps == ("a",)
    assert sim.st.graph.n_edges() == 1


def test_large_dependency_pins_its_dependent_to_the_holder() -> None:
    s = Sim()
    s.worker(W1, nthreads=4)
    s.worker(W2, nthreads=4)
    s.client(C1)
    s.submit(C1, T("a", workers=["w2"]), T("b", "a"), wants=["b"])
    s.flush()
    s.finish(W2, "a", large=True, nbytes=LOCALITY_BYTES * 2)
    r = runs(s.flush())
    assert list(r) == [W2]  # W1 is idle but W2 holds the big input
    assert r[W2]["b"]["deps"] == {"a": ""}


# --------------------------------------------------------------------------------------
# dedup


def test_same_key_from_two_clients_runs_once_and_both_are_told() -> None:
    s = Sim()
    s.worker(W1)
    s.client(C1)
    s.client(C2)
    s.flush()
    s.submit(C1, T("x"))
    assert run_keys(s.flush()) == {W1: ["x"]}
    s.submit(C2, T("x"))
    assert run_keys(s.flush()) == {}
    assert s.st.tasks["x"].wanted_by == {C1, C2}
    s.finish(W1, "x", b"X")
    assert updates(s.flush()) == {
        C1: [("x", "finished", [b"X"], "")],
        C2: [("x", "finished", [b"X"], "")],
    }
    # a third submission of a finished key is answered at once, and runs nothing
    s.submit(C2, T("x"))
    out = s.flush()
    assert run_keys(out) == {}
    assert updates(out) == {C2: [("x", "finished", [b"X"], "")]}


def test_same_key_twice_in_one_batch_runs_once(sim: Sim) -> None:
    sim.submit(C1, T("x"), T("x", "never-checked-again"), wants=["x", "x"])
    out = sim.flush()
    assert run_keys(out) == {W1: ["x"]}
    assert sim.st.tasks["x"].deps == ()
    sim.finish(W1, "x", b"X")
    assert updates(sim.flush()) == {C1: [("x", "finished", [b"X"], "")]}


# --------------------------------------------------------------------------------------
# graphs rejected as a whole


def _graph_errors(out: list[Any]) -> dict[str, str]:
    got = {}
    for key, status, frames, text in updates(out)[C1]:
        assert status == "error"
        exc = pickle.loads(frames[0])
        assert isinstance(exc, GraphError)
        assert text == f"GraphError: {exc}"
        got[key] = str(exc)
    return got


def test_cycle_is_rejected_as_a_whole(sim: Sim) -> None:
    sim.submit(C1, T("held"))
    sim.flush()
    before = snapshot(sim.st)
    sim.submit(
        C1,
        T("ok"),
        T("a", "c", "ok"),
        T("b", "a"),
        T("c", "b", "held"),
        wants=["ok", "a", "b", "c"],
    )
    out = sim.flush()
    errors = _graph_errors(out)
    assert sorted(errors) == ["a", "b", "c", "ok"]
    assert all("cycle" in e for e in errors.values())
    assert run_keys(out) == {}
    assert snapshot(sim.st) == before


def test_self_dependency_is_a_cycle(sim: Sim) -> None:
    sim.submit(C1, T("s", "s"))
    out = sim.flush()
    assert "cycle: s -> s" in _graph_errors(out)["s"]
    assert sim.st.tasks == {}


def test_dangling_dependency_is_rejected_as_a_whole(sim: Sim) -> None:
    before = snapshot(sim.st)
    sim.submit(C1, T("ok"), T("b", "ok", "nowhere"), wants=["ok", "b"])
    out = sim.flush()
    errors = _graph_errors(out)
    assert sorted(errors) == ["b", "ok"]
    assert all("nowhere" in e for e in errors.values())
    assert run_keys(out) == {}
    assert snapshot(sim.st) == before
    assert sim.st.tasks == {}


def test_wanting_an_undefined_key_is_rejected_as_a_whole(sim: Sim) -> None:
    sim.submit(C1, T("ok"), wants=["ok", "ghost"])
    out = sim.flush()
    errors = _graph_errors(out)
    assert sorted(errors) == ["ghost", "ok"]
    assert "'ghost' is not defined" in errors["ok"]
    assert sim.st.tasks == {}
    assert run_keys(out) == {}


def _count_free_slots(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = records.Worker.free_slots

    def counted(self: records.Worker) -> int:
        calls[0] += 1
        return real(self)

    monkeypatch.setattr(records.Worker, "free_slots", counted)
    return calls


def test_a_round_trip_among_many_idle_workers_visits_few_of_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One submit(...).result() on a broker with many idle workers: the first idle
    # worker takes the task, and nobody else is asked. Asking every worker cost
    # 0.6 s per task with 1,000 idle workers when each scanned all the others for a
    # steal (O(workers^2)), and still 4.6 ms when each dispatch visited them all.
    s = Sim()
    n = 300
    for k in range(n):
        s.worker(f"w{k:03}".encode())
    s.client(C1)
    s.flush()
    calls = _count_free_slots(monkeypatch)
    for i in range(5):
        s.submit(C1, T(f"x{i}"))
        assert run_keys(s.flush()) == {b"w000": [f"x{i}"]}  # the first registered
        s.finish(b"w000", f"x{i}", b"X")
        assert updates(s.flush()) == {C1: [(f"x{i}", "finished", [b"X"], "")]}
    assert calls[0] <= 5 * 3  # was 5 * 2 * n


def test_workers_that_come_and_go_leave_no_idle_entries_behind() -> None:
    s = Sim()
    s.client(C1)
    for k in range(500):  # adaptive scaling over a long day, nothing to run
        ident = f"w{k}".encode()
        s.worker(ident)
        s.flush()
        s.send(ident, P.WorkerStatus("closed", []))
        s.flush()
    assert s.st.workers == {}
    assert len(s.st._idle) <= 64 + 1
    s.worker(W1)
    s.submit(C1, T("x"))
    assert run_keys(s.flush()) == {W1: ["x"]}


def test_idle_workers_first_then_the_least_loaded() -> None:
    sim = _two_workers()
    # Two idle workers take one task each; the third task goes to the least loaded.
    sim.submit(C1, T("a"), T("b"))
    assert run_keys(sim.flush()) == {W1: ["a"], W2: ["b"]}
    sim.finish(W2, "b", b"B")
    sim.flush()
    sim.submit(C1, T("c"), T("d"))
    assert run_keys(sim.flush()) == {W2: ["c"], W1: ["d"]}


def test_an_idle_worker_that_cannot_run_the_task_leaves_it_to_one_that_can() -> None:
    sim = _two_workers()
    sim.submit(C1, T("x", workers=["w2"]))
    assert run_keys(sim.flush()) == {W2: ["x"]}
    sim.submit(C1, T("y"))  # W1 is still idle, and takes this one
    assert run_keys(sim.flush()) == {W1: ["y"]}


# --------------------------------------------------------------------------------------
# releasing


def test_release_frees_the_result_and_forgets_the_task(sim: Sim) -> None:
    sim.submit(C1, T("x"))
    sim.flush()
    sim.finish(W1, "x", large=True)
    sim.flush()
    sim.send(C1, P.ReleaseKeys(["x", "unknown", 3]))
    out = sim.flush()
    assert freed(out, W1) == ["x"]
    assert sim.st.tasks == {}
    assert len(sim.st.graph) == 0
    assert sim.st.workers[W1].data == set()
    assert sim.st.clients[C1].wants == set()


def test_submit_releases_its_release_keys_first(sim: Sim) -> None:
    """Submit.release is a ReleaseKeys handled before the tasks: resubmitting the
    key just released computes it afresh, and the worker is told to drop the old
    value inside the RunTasks (free first), not after it."""
    sim.submit(C1, T("x"))
    sim.flush()
    sim.finish(W1, "x", large=True)
    sim.flush()
    fl = P.FrameList()
    entry = P.submit_entry("x", fl.add([b"fn:x"]), fl.add([b"args:x"]), [])
    sim.send(C1, P.Submit([entry], ["x"], ["x"]), fl.frames)
    out = sim.flush()
    assert sent(out, P.FreeKeys) == []
    (run,) = sent(out, P.RunTasks, W1)
    assert run.free == ["x"] and [t[0] for t in run.tasks] == ["x"]
    assert sim.state("x") is S.PROCESSING
    assert sim.st.workers[W1].data == set()
    assert sim.st.clients[C1].wants == {"x"}


def test_an_oversized_submit_still_releases_what_it_carries(sim: Sim) -> None:
    # The server drops a Submit over --max-message-size and tells the client; the
    # releases riding in it are small and valid on their own, so they still apply.
    sim.submit(C1, T("x"))
    sim.flush()
    sim.finish(W1, "x", large=True)
    sim.flush()
    sim.st.refuse(C1, P.Submit([], ["y"], ["x"]), "message too large")
    out = sim.flush()
    assert freed(out, W1) == ["x"]
    assert "x" not in sim.st.tasks
    assert [(k, s) for k, s, _, _ in updates(out)[C1]] == [("y", "error")]


def test_keys_freed_on_a_worker_without_new_tasks_go_in_free_keys() -> None:
    s = Sim()
    s.worker(W1)
    s.worker(W2)
    s.client(C1)
    s.submit(C1, T("x", workers=["w1"]))
    s.flush()
    s.finish(W1, "x", large=True)
    s.flush()
    fl = P.FrameList()
    entry = P.submit_entry(
        "y", fl.add([b"fn:y"]), fl.add([b"args:y"]), [], workers=["w2"]
    )
    s.send(C1, P.Submit([entry], ["y"], ["x"]), fl.frames)
    out = s.flush()
    assert [m.keys for m in sent(out, P.FreeKeys, W1)] == [["x"]]
    (run,) = sent(out, P.RunTasks, W2)
    assert run.free is None


def test_intermediate_result_is_freed_once_its_dependents_finish(sim: Sim) -> None:
    sim.submit(C1, T("a"), T("b", "a"), T("c", "a"), wants=["b", "c"])
    sim.flush()
    sim.finish(W1, "a", large=True)
    sim.flush()
    sim.finish(W1, "b", large=True)
    out = sim.flush()
    assert freed(out, W1) == []  # c still needs a
    sim.finish(W1, "c", large=True)
    out = sim.flush()
    assert freed(out, W1) == ["a"]
    assert sim.state("a") is S.RELEASED  # kept in the graph: b and c may be recomputed
    assert sim.st.workers[W1].data == {"b", "c"}
    sim.send(C1, P.ReleaseKeys(["b"]))
    assert freed(sim.flush(), W1) == ["b"]
    assert set(sim.st.tasks) == {"a", "c"}
    sim.send(C1, P.ReleaseKeys(["c"]))
    assert freed(sim.flush(), W1) == ["c"]
    assert sim.st.tasks == {}
    assert len(sim.st.graph) == 0


def test_releasing_a_running_graph_stops_and_forgets_all_of_it() -> None:
    s = Sim()
    s.worker(W1, nthreads=2)
    s.client(C1)
    s.submit(C1, T("a"), T("b", "a"), T("c", "b"), T("other"), wants=["c", "other"])
    assert sorted(run_keys(s.flush())[W1]) == ["a", "other"]
    s.send(C1, P.ReleaseKeys(["c"]))
    out = s.flush()
    assert cancelled(out, W1) == ["a"]
    assert set(s.st.tasks) == {"other"}
    assert list(s.st.workers[W1].processing) == ["other"]
    s.send(W1, P.TaskResults([["a", "memory", 1, "int", [0, 1], "", 0.1]]), [b"1"])
    assert freed(s.flush(), W1) == ["a"]  # a late result of a forgotten task


def test_released_task_that_stays_in_the_graph_stops_its_inputs(sim: Sim) -> None:
    # b cannot be forgotten (finished c refers to it), but once d is released nothing
    # needs b, so neither does anything need a, which is running to recompute b
    sim.submit(C1, T("a"), T("b", "a"), T("c", "b"), wants=["c"])
    for key in "abc":
        sim.flush()
        sim.finish(W1, key, large=True)
    sim.flush()
    assert [sim.state(k) for k in "abc"] == [S.RELEASED, S.RELEASED, S.MEMORY]
    sim.submit(C1, T("d", "b"))
    assert run_keys(sim.flush()) == {W1: ["a"]}
    sim.send(C1, P.ReleaseKeys(["d"]))
    out = sim.flush()
    assert cancelled(out, W1) == ["a"]
    assert [sim.state(k) for k in "abc"] == [S.RELEASED, S.RELEASED, S.MEMORY]
    assert "d" not in sim.st.tasks


def test_client_close_releases_its_tasks(sim: Sim) -> None:
    sim.submit(C1, T("x"), T("y"))
    sim.flush()
    sim.finish(W1, "x", large=True)
    sim.flush()
    sim.send(C1, P.ClientClose())
    out = sim.flush()
    assert freed(out, W1) == ["x"]
    assert cancelled(out, W1) == ["y"]
    assert sim.st.tasks == {}
    assert C1 not in sim.st.clients


# --------------------------------------------------------------------------------------
# workers dying


def _two_workers(**config: Any) -> Sim:
    s = Sim(**config)
    s.worker(W1)
    s.worker(W2)
    s.client(C1)
    s.flush()
    return s


def test_dead_worker_processing_tasks_go_to_another_worker() -> None:
    s = _two_workers()
    s.submit(C1, T("x"))
    assert run_keys(s.flush()) == {W1: ["x"]}
    s.now = 5.0
    s.send(W2, P.Heartbeat({"memory": 1}))
    s.tick(9.9)
    assert W1 in s.st.workers  # 9.9 s of silence < 10 intervals
    s.tick(10.5)
    assert W1 not in s.st.workers
    out = s.flush()
    assert run_keys(out) == {W2: ["x"]}
    t = s.st.tasks["x"]
    assert (t.suspicious, t.failed_on, t.processing_on) == (1, [addr(W1)], W2)
    assert s.st.counters["workers_lost"] == 1
    assert s.st.workers[W2].metrics == {"memory": 1}


def test_task_killing_too_many_workers_errs_with_killed_worker() -> None:
    s = _two_workers(allowed_failures=1)
    s.submit(C1, T("x"), T("y", "x"))
    s.flush()
    s.now = 5.0
    s.send(W2, P.Heartbeat({}))
    s.tick(10.5)  # W1 dies running x
    assert run_keys(s.flush()) == {W2: ["x"]}
    s.worker(W3)
    s.now = 15.0
    s.send(W3, P.Heartbeat({}))
    s.tick(16.0)  # W2 dies running x: the second death > allowed_failures
    out = s.flush()
    assert run_keys(out) == {}
    ups = updates(out)[C1]
    assert [(k, st) for k, st, _, _ in ups] == [("x", "error"), ("y", "error")]
    exc = pickle.loads(ups[0][2][0])
    assert isinstance(exc, KilledWorker)
    assert exc.workers == [addr(W1), addr(W2)]
    assert exc.last_worker == addr(W2)
    assert ups[0][3].startswith("KilledWorker: Attempted to run task 'x' on 2")
    assert ups[1][2] == ups[0][2]  # y erred with x's exception
    assert (s.state("x"), s.state("y")) == (S.ERRED, S.ERRED)


def test_planned_departure_hands_tasks_back_without_blame() -> None:
    s = Sim()
    s.worker(W1, nthreads=1)
    s.worker(W2, nthreads=1)
    s.client(C1)
    s.submit(C1, *[T(f"t{i}") for i in range(6)])
    first = run_keys(s.flush())
    assert sorted(first[W1] + first[W2]) == [f"t{i}" for i in range(6)]
    running, *queued = first[W1]
    s.send(W1, P.WorkerStatus("closing", queued))
    out = s.flush()
    assert sorted(run_keys(out).get(W2, [])) == []  # W2 is full
    assert s.st.workers[W1].free_slots() == 0
    assert list(s.st.workers[W1].processing) == [running]
    assert all(s.state(k) is S.READY for k in queued)
    s.finish(W1, running, b"r")
    s.send(W1, P.WorkerStatus("closed", []))
    s.flush()
    assert W1 not in s.st.workers
    assert s.st.counters["workers_lost"] == 0
    done = first[W2][0]
    s.finish(W2, done)
    out = s.flush()
    assert len(run_keys(out)[W2]) == 1
    assert all(t.suspicious == 0 for t in s.st.tasks.values())


def test_unknown_worker_status_is_a_protocol_error(sim: Sim) -> None:
    with pytest.raises(P.ProtocolError, match="sleeping"):
        sim.send(W1, P.WorkerStatus("sleeping", []))
    assert sim.st.workers[W1].status == "running"


def test_paused_worker_gets_no_tasks_until_it_runs_again(sim: Sim) -> None:
    sim.send(W1, P.WorkerStatus("paused", []))
    sim.submit(C1, T("x"))
    assert run_keys(sim.flush()) == {}
    sim.send(W1, P.WorkerStatus("running", []))
    assert run_keys(sim.flush()) == {W1: ["x"]}


def test_lost_result_is_recomputed_with_its_released_dependency_chain() -> None:
    s = Sim()
    s.worker(W1)
    s.client(C1)
    s.submit(C1, T("a"), T("b", "a"), T("c", "b"), wants=["c"])
    for key in "abc":
        assert run_keys(s.flush()) == {W1: [key]}
        s.finish(W1, key, large=True)
    out = s.flush()
    assert updates(out) == {C1: [("c", "finished", None, "")]}
    assert freed(out, W1) == ["b"]
    assert [s.state(k) for k in "abc"] == [S.RELEASED, S.RELEASED, S.MEMORY]
    s.worker(W2)
    s.now = 20.0
    s.send(W2, P.Heartbeat({}))
    s.tick(20.0)  # W1 is gone with the only copy of c
    out = s.flush()
    assert run_keys(out) == {W2: ["a"]}
    assert [s.state(k) for k in "abc"] == [S.PROCESSING, S.WAITING, S.WAITING]
    for key in "ab":
        s.finish(W2, key, large=True)
        assert run_keys(s.flush()) == {W2: [chr(ord(key) + 1)]}
    s.finish(W2, "c", b"C")
    out = s.flush()
    assert updates(out) == {C1: [("c", "finished", [b"C"], "")]}
    assert freed(out, W2) == ["b"]
    assert [s.state(k) for k in "abc"] == [S.RELEASED, S.RELEASED, S.MEMORY]


def test_lost_result_nobody_needs_is_forgotten() -> None:
    s = _two_workers()
    s.submit(C1, T("a"), T("b", "a"), wants=["a", "b"])
    s.flush()
    s.finish(W1, "a", large=True)
    s.flush()
    s.send(C1, P.ReleaseKeys(["a"]))  # b still needs it
    s.flush()
    assert s.state("a") is S.MEMORY
    s.finish(W1, "b", b"B")  # b done: a is not needed any more
    out = s.flush()
    assert freed(out, W1) == ["a"]
    s.now = 20.0
    s.send(W2, P.Heartbeat({}))
    s.tick(20.0)  # W1 dies: b is inline here, so nothing is lost
    out = s.flush()
    assert run_keys(out) == {}
    assert s.state("b") is S.MEMORY
    assert s.st.tasks["b"].who_has == set()
    assert s.st.tasks["b"].inline == [b"B"]
    s.send(C1, P.Gather(1, ["b"]))
    [(_, reply, payload)] = s.flush()
    assert reply == P.DataReply(1, [["b", b"B"]], [])  # small: in the header
    assert payload == []


def test_missing_dependency_reported_by_a_worker_is_recomputed() -> None:
    s = _two_workers()
    s.submit(C1, T("a", workers=["w1"]), T("b", "a", workers=["w2"]), wants=["b"])
    s.flush()
    s.finish(W1, "a", large=True)
    assert runs(s.flush())[W2]["b"]["deps"] == {"a": addr(W1)}
    entry = ["b", "missing", 0, addr(W1), None, "a", -1.0]
    s.send(W2, P.TaskResults([entry]))
    out = s.flush()
    assert run_keys(out) == {W1: ["a"]}  # W1 lost it: compute it again
    assert (s.state("a"), s.state("b")) == (S.PROCESSING, S.WAITING)
    assert s.st.workers[W1].data == set()
    s.finish(W1, "a", large=True)
    assert runs(s.flush())[W2]["b"]["deps"] == {"a": addr(W1)}


def test_lost_result_whose_dependency_since_erred_errs_too() -> None:
    # b is in memory; its input a was released, recomputed for e, and failed. When b
    # is lost it cannot be recomputed: it errs (it used to crash the state machine).
    s = _two_workers()
    s.submit(C1, T("a", workers=["w1"]), T("b", "a", workers=["w1"]), wants=["b"])
    s.flush()
    s.finish(W1, "a", large=True)
    s.flush()
    s.finish(W1, "b", large=True)
    assert freed(s.flush(), W1) == ["a"]
    s.submit(C1, T("e", "a"), wants=["e"])
    assert run_keys(s.flush()) == {W1: ["a"]}
    s.fail(W1, "a")
    out = s.flush()
    assert [(k, st) for k, st, _, _ in updates(out)[C1]] == [("e", "error")]
    s.now = 20.0
    s.send(W2, P.Heartbeat({}))
    s.tick(20.0)
    out = s.flush()
    assert run_keys(out) == {}
    assert updates(out) == {C1: [("b", "error", [b"exc:a", b"tb"], "ValueError: boom")]}
    assert s.state("b") is S.ERRED


def test_reconnecting_worker_keeps_what_it_still_holds(sim: Sim) -> None:
    sim.submit(C1, T("x"), T("y"))
    sim.flush()
    sim.finish(W1, "x", large=True)
    sim.finish(W1, "y", large=True)
    sim.flush()
    sim.worker(W1, keys=["x"])  # the same identity registers again, without y
    out = sim.flush()
    assert run_keys(out) == {W1: ["y"]}  # y is gone with the old session
    assert sim.state("x") is S.MEMORY
    assert sim.st.tasks["x"].who_has == {W1}
    assert sim.st.workers[W1].data == {"x"}
    assert sim.st.counters["workers_lost"] == 0


def test_reconnecting_worker_is_asked_again_for_a_pending_gather(sim: Sim) -> None:
    sim.submit(C1, T("x"))
    sim.flush()
    sim.finish(W1, "x", large=True)
    sim.flush()
    sim.send(C1, P.Gather(3, ["x"]))
    [first] = sent(sim.flush(), P.SendData, W1)
    sim.worker(W1, keys=["x"])  # reconnects: the first SendData may be lost
    out = sim.flush()
    [again] = sent(out, P.SendData, W1)
    assert again.keys == ["x"]
    assert again.request_id != first.request_id
    assert sent(out, P.DataReply, C1) == []
    sim.send(W1, P.DataReply(first.request_id, [["x", [0, 1]]], []), [b"old"])
    assert sim.flush() == []
    sim.send(W1, P.DataReply(again.request_id, [["x", [0, 1]]], []), [b"X"])
    [(ident, reply, payload)] = sim.flush()
    assert (ident, reply, payload) == (C1, P.DataReply(3, [["x", [0, 1]]], []), [b"X"])


def test_reconnecting_client_keeps_its_tasks() -> None:
    s = Sim()
    s.worker(W1)
    s.client(C1)
    s.submit(C1, T("x"))
    s.flush()
    s.client(C1)
    assert s.st.clients[C1].wants == {"x"}
    s.send(C1, P.ClientClose())
    assert cancelled(s.flush(), W1) == ["x"]
    assert s.st.tasks == {}


# --------------------------------------------------------------------------------------
# retries and errors


def test_retries_then_error(sim: Sim) -> None:
    sim.submit(C1, T("x", retries=2))
    sim.flush()
    for _ in range(2):
        sim.fail(W1, "x")
        out = sim.flush()
        assert run_keys(out) == {W1: ["x"]}
        assert updates(out) == {}
    sim.fail(W1, "x", "ValueError: third time")
    out = sim.flush()
    assert run_keys(out) == {}
    assert updates(out) == {
        C1: [("x", "error", [b"exc:x", b"tb"], "ValueError: third time")]
    }
    t = sim.st.tasks["x"]
    assert (t.state, t.retries, t.error) == (
        S.ERRED,
        0,
        ([b"exc:x", b"tb"], "ValueError: third time"),
    )
    assert sim.st.counters["tasks_erred"] == 1


def test_error_propagates_to_dependents(sim: Sim) -> None:
    sim.submit(C1, T("a"), T("b", "a"), T("c", "b"), T("d"), wants=["b", "c", "d"])
    sim.flush()
    sim.fail(W1, "a")
    out = sim.flush()
    assert sorted(updates(out)[C1]) == [
        ("b", "error", [b"exc:a", b"tb"], "ValueError: boom"),
        ("c", "error", [b"exc:a", b"tb"], "ValueError: boom"),
    ]
    assert [sim.state(k) for k in "abcd"] == [S.ERRED, S.ERRED, S.ERRED, S.PROCESSING]
    assert sim.st.counters["tasks_erred"] == 3
    # a new task on an erred key errs at once, and an erred key wanted again is told
    sim.submit(C1, T("e", "c"), T("b"), wants=["e", "b"])
    out = sim.flush()
    assert run_keys(out) == {}
    assert sorted(updates(out)[C1]) == [
        ("b", "error", [b"exc:a", b"tb"], "ValueError: boom"),
        ("e", "error", [b"exc:a", b"tb"], "ValueError: boom"),
    ]
    # released, the erred graph is forgotten
    sim.send(C1, P.ReleaseKeys(["b", "c", "e"]))
    sim.flush()
    assert set(sim.st.tasks) == {"d"}


# --------------------------------------------------------------------------------------
# placement: resources, restrictions, priority, capacity


def test_resources_limit_where_and_how_many() -> None:
    s = Sim()
    s.worker(W1, nthreads=4)
    s.worker(W2, nthreads=4, resources={"GPU": 2})
    s.client(C1)
    gpu = [T(f"g{i}", resources={"GPU": 1}) for i in range(5)]
    s.submit(C1, *gpu, T("cpu0"), T("cpu1"))
    out = s.flush()
    placed = run_keys(out)
    assert sorted(k for k in placed[W2] if k.startswith("g")) == ["g0", "g1"]
    assert not [k for k in placed.get(W1, []) if k.startswith("g")]
    assert runs(out)[W2]["g0"]["resources"] == {"GPU": 1}
    assert s.st.workers[W2].avail == {"GPU": 0}
    s.finish(W2, "g0")
    out = s.flush()
    assert run_keys(out) == {W2: ["g2"]}
    for key in ["g1", "g2", "g3", "g4"]:
        s.finish(W2, key)
        s.flush()
    assert s.st.workers[W2].avail == {"GPU": 2}
    assert all(s.state(t.key) is S.MEMORY for t in gpu)


def test_resources_are_given_back_on_error() -> None:
    s = Sim()
    s.worker(W1, nthreads=2, resources={"GPU": 1})
    s.client(C1)
    s.submit(C1, T("a", resources={"GPU": 1}), T("b", resources={"GPU": 1}))
    assert run_keys(s.flush()) == {W1: ["a"]}
    s.fail(W1, "a")
    assert run_keys(s.flush()) == {W1: ["b"]}
    assert s.st.workers[W1].avail == {"GPU": 0}
    s.finish(W1, "b")
    s.flush()
    assert s.st.workers[W1].avail == {"GPU": 1}


def test_worker_restrictions() -> None:
    s = Sim()
    s.worker(W1, host="node-a")
    s.worker(W2, host="node-b")
    s.client(C1)
    s.submit(
        C1,
        T("by-name", workers=["w2"]),
        T("by-address", workers=[addr(W2)]),
        T("by-host", workers=["node-b"]),
        T("nowhere", workers=["w9"]),
        T("loose", workers=["w9"], loose=True),
    )
    placed = run_keys(s.flush())
    assert sorted(placed[W2]) == ["by-address", "by-host", "by-name"]
    assert placed[W1] == ["loose"]
    assert s.state("nowhere") is S.READY
    s.worker(W3)
    s.send(W3, P.RegisterWorker("w9", 1, 1, {}, addr(W3), "h", 1, "/", {}, []))
    assert run_keys(s.flush()) == {W3: ["nowhere"]}


def test_priority_order() -> None:
    s = Sim()
    s.client(C1)
    s.submit(
        C1, T("p0"), T("p5", prio=5), T("p1", prio=1), T("p5b", prio=5), T("m", prio=-1)
    )
    s.submit(C1, T("later5", prio=5), T("p3", prio=3))
    s.flush()
    s.worker(W1)  # capacity 3: one thread, two queued behind it
    assert run_keys(s.flush()) == {W1: ["p5", "p5b", "later5"]}
    order = []
    for key in ["p5", "p5b", "later5", "p3", "p1", "p0", "m"]:
        s.finish(W1, key)
        order += run_keys(s.flush()).get(W1, [])
    assert order == ["p3", "p1", "p0", "m"]


def test_capacity_is_never_exceeded_and_work_spreads() -> None:
    s = Sim()
    s.worker(W1, nthreads=2)
    s.worker(W2, nthreads=1)
    s.client(C1)
    s.submit(C1, *[T(f"t{i:02}") for i in range(12)])
    placed = run_keys(s.flush())
    assert (len(placed[W1]), len(placed[W2])) == (6, 3)  # 3 per thread
    assert sum(s.state(f"t{i:02}") is S.READY for i in range(12)) == 3
    s.finish(W2, placed[W2][0])
    assert run_keys(s.flush()) == {W2: ["t09"]}
    for _ in range(3):  # nothing more while both are full
        s.send(W1, P.Heartbeat({}))
        assert run_keys(s.flush()) == {}


def test_a_burst_goes_to_idle_workers_first() -> None:
    s = Sim()
    for w in (W1, W2, W3):
        s.worker(w)
    s.client(C1)
    s.submit(C1, T("a"), T("b"), T("c"))
    placed = run_keys(s.flush())
    assert sorted(len(v) for v in placed.values()) == [1, 1, 1]


def test_long_tasks_shrink_the_pipeline(sim: Sim) -> None:
    sim.submit(C1, *[T(f"t{i}") for i in range(10)])
    assert len(run_keys(sim.flush())[W1]) == 3
    sim.finish(W1, "t0", duration=2.0)  # long tasks: one queued behind each thread
    assert run_keys(sim.flush()) == {}
    assert sim.st.workers[W1].capacity() == 2


def test_seceded_task_frees_its_slot(sim: Sim) -> None:
    sim.submit(C1, *[T(f"t{i}") for i in range(4)])
    assert run_keys(sim.flush()) == {W1: ["t0", "t1", "t2"]}
    sim.send(W1, P.TaskSeceded("t0"))
    assert run_keys(sim.flush()) == {W1: ["t3"]}


# --------------------------------------------------------------------------------------
# cancel


def test_cancel_a_running_task_and_its_dependents(sim: Sim) -> None:
    sim.submit(C1, T("a"), T("b", "a"), T("x1"), T("x2"), T("x3"))
    assert run_keys(sim.flush()) == {W1: ["a", "x1", "x2"]}
    sim.send(C1, P.Cancel(["a"], False))
    out = sim.flush()
    assert sorted(updates(out)[C1]) == [
        ("a", "cancelled", None, "cancelled"),
        ("b", "cancelled", None, "cancelled"),
    ]
    assert cancelled(out, W1) == ["a"]
    assert run_keys(out) == {}  # a may be running: its thread is busy until told
    assert "a" not in sim.st.tasks
    assert "b" not in sim.st.tasks
    assert sim.st.clients[C1].wants == {"x1", "x2", "x3"}
    # the worker confirms a never started: its slot is free again
    sim.send(W1, P.TaskResults([["a", "cancelled", 0, "", None, "", -1.0]]))
    assert run_keys(sim.flush()) == {W1: ["x3"]}


def test_cancel_a_finished_task(sim: Sim) -> None:
    sim.submit(C1, T("x"))
    sim.flush()
    sim.finish(W1, "x", large=True)
    sim.flush()
    sim.send(C1, P.Cancel(["x"], False))
    out = sim.flush()
    assert updates(out) == {C1: [("x", "cancelled", None, "cancelled")]}
    assert freed(out, W1) == ["x"]
    assert sim.st.tasks == {}


def test_cancel_without_force_leaves_other_clients_alone() -> None:
    s = Sim()
    s.worker(W1)
    s.client(C1)
    s.client(C2)
    s.submit(C1, T("x"))
    s.submit(C2, T("x"), T("y", "x"), wants=["x", "y"])
    s.flush()
    s.send(C1, P.Cancel(["x"], False))
    out = s.flush()
    assert updates(out) == {C1: [("x", "cancelled", None, "cancelled")]}
    assert cancelled(out, W1) == []
    assert s.st.tasks["x"].wanted_by == {C2}
    assert s.st.tasks["y"].wanted_by == {C2}
    s.send(C1, P.Cancel(["x"], True))
    out = s.flush()
    assert sorted(updates(out)[C2]) == [
        ("x", "cancelled", None, "cancelled"),
        ("y", "cancelled", None, "cancelled"),
    ]
    assert cancelled(out, W1) == ["x"]
    assert s.st.tasks == {}
    assert s.st.clients[C2].wants == set()


# --------------------------------------------------------------------------------------
# gather


def test_gather_inline_results_from_the_broker(sim: Sim) -> None:
    sim.submit(C1, T("x"), T("y"))
    sim.flush()
    sim.finish(W1, "x", b"X")
    sim.flush()
    sim.send(C1, P.Gather(5, ["x", "y", "nope"]))
    [(ident, reply, payload)] = sim.flush()
    assert ident == C1
    assert isinstance(reply, P.DataReply)
    assert (reply.request_id, reply.missing) == (5, ["y", "nope"])
    assert {k: P.ref_frames(payload, r) for k, r in reply.values} == {"x": [b"X"]}
    sim.send(C1, P.Gather(6, []))
    assert [m for _, m, _ in sim.flush()] == [P.DataReply(6, [], [])]


def test_gather_large_result_is_asked_of_its_holder_and_forwarded() -> None:
    s = _two_workers()
    s.submit(C1, T("big", workers=["w2"]), T("small", workers=["w1"]))
    s.flush()
    s.finish(W2, "big", large=True)
    s.finish(W1, "small", b"S")
    s.flush()
    s.send(C1, P.Gather(7, ["small", "big"]))
    out = s.flush()
    assert [(i, type(m).__name__) for i, m, _ in out] == [
        (C1, "DataReply"),
        (W2, "SendData"),
    ]
    first, ask = out[0][1], out[1][1]
    assert isinstance(first, P.DataReply)
    assert isinstance(ask, P.SendData)
    assert (first.request_id, first.missing) == (7, [])
    assert [k for k, _ in first.values] == ["small"]
    assert ask.keys == ["big"]
    # a reply from the wrong peer, or to an unknown request, is ignored
    s.send(W1, P.DataReply(ask.request_id, [["big", [0, 1]]], []), [b"fake"])
    s.send(W2, P.DataReply(ask.request_id + 100, [], []))
    assert s.flush() == []
    s.send(W2, P.DataReply(ask.request_id, [["big", [0, 1]]], []), [b"BIG"])
    [(ident, reply, payload)] = s.flush()
    assert (ident, reply) == (C1, P.DataReply(7, [["big", [0, 1]]], []))
    assert payload == [b"BIG"]
    s.send(W2, P.DataReply(ask.request_id, [["big", [0, 1]]], []), [b"BIG"])
    assert s.flush() == []  # answered once


def test_gather_from_a_worker_that_dies_reports_the_keys_missing() -> None:
    s = _two_workers()
    s.submit(C1, T("big", workers=["w2"]))
    s.flush()
    s.finish(W2, "big", large=True)
    s.flush()
    s.send(C1, P.Gather(8, ["big"]))
    assert [type(m) for _, m, _ in s.flush()] == [P.SendData]
    s.now = 20.0
    s.send(W1, P.Heartbeat({}))
    s.tick(20.0)
    out = s.flush()
    assert sent(out, P.DataReply, C1) == [P.DataReply(8, [], ["big"])]


# --------------------------------------------------------------------------------------
# run on workers


def test_run_on_workers_collects_every_reply() -> None:
    s = _two_workers()
    s.send(C1, P.RunOnWorkers(9, []), [b"fn", b"args"])
    out = s.flush()
    asks = [(i, m, p) for i, m, p in out if isinstance(m, P.RunFunction)]
    assert sorted(i for i, _, _ in asks) == [W1, W2]
    assert all(p == [b"fn", b"args"] for _, _, p in asks)
    req = asks[0][1].request_id
    s.send(W1, P.FunctionResult(req, True), [b"r1"])
    assert s.flush() == []  # still waiting for W2
    s.send(W2, P.FunctionResult(req, False), [b"exc2"])
    [(ident, reply, payload)] = s.flush()
    assert ident == C1
    assert isinstance(reply, P.RunReply)
    assert reply.request_id == 9
    got = {a: (ok, P.ref_frames(payload, ref)) for a, ok, ref in reply.results}
    assert got == {addr(W1): (True, [b"r1"]), addr(W2): (False, [b"exc2"])}


def test_run_on_named_workers_and_on_none() -> None:
    s = _two_workers()
    s.send(C1, P.RunOnWorkers(1, ["w2"]), [b"fn", b"args"])
    out = s.flush()
    assert [(i, type(m)) for i, m, _ in out] == [(W2, P.RunFunction)]
    s.send(C1, P.RunOnWorkers(2, ["no-such-worker"]), [b"fn", b"args"])
    assert [(i, m) for i, m, _ in s.flush()] == [(C1, P.RunReply(2, []))]


def test_run_on_a_worker_that_dies_fails_for_that_worker() -> None:
    s = _two_workers()
    s.send(C1, P.RunOnWorkers(3, []), [b"fn", b"args"])
    req = sent(s.flush(), P.RunFunction)[0].request_id
    s.send(W2, P.FunctionResult(req, True), [b"ok"])
    s.now = 20.0
    s.send(W2, P.Heartbeat({}))
    s.tick(20.0)
    out = s.flush()
    [reply] = sent(out, P.RunReply, C1)
    got = {a: ok for a, ok, _ in reply.results}
    assert got == {addr(W1): False, addr(W2): True}
    assert [r for r in reply.results if r[0] == addr(W1)] == [[addr(W1), False, None]]


# --------------------------------------------------------------------------------------
# fire and forget, client liveness


def test_fire_and_forget_outlives_the_release(sim: Sim) -> None:
    sim.submit(C1, T("a"), T("x", "a"), wants=["x"])
    sim.flush()
    sim.send(C1, P.FireAndForget(["x"]))
    sim.send(C1, P.ReleaseKeys(["x"]))
    out = sim.flush()
    assert cancelled(out, W1) == []
    assert sim.state("a") is S.PROCESSING
    sim.finish(W1, "a", large=True)
    sim.flush()
    sim.finish(W1, "x", large=True)
    out = sim.flush()
    assert updates(out) == {}
    assert freed(out, W1) == ["a", "x"]
    assert sim.st.tasks == {}


def test_fire_and_forget_outlives_the_client() -> None:
    s = Sim()
    s.worker(W1)
    s.client(C1)
    s.submit(C1, T("x"))
    s.flush()
    s.send(C1, P.FireAndForget(["x"]))
    s.send(C1, P.ClientClose())
    out = s.flush()
    assert cancelled(out, W1) == []
    assert s.state("x") is S.PROCESSING
    s.finish(W1, "x", large=True)
    assert freed(s.flush(), W1) == ["x"]
    assert s.st.tasks == {}


def test_failed_fire_and_forget_task_is_forgotten(sim: Sim) -> None:
    sim.submit(C1, T("x"))
    sim.flush()
    sim.send(C1, P.FireAndForget(["x"]))
    sim.send(C1, P.ReleaseKeys(["x"]))
    sim.fail(W1, "x")
    out = sim.flush()
    assert updates(out) == {}
    assert sim.st.tasks == {}
    assert len(sim.st.graph) == 0


def test_silent_client_is_dropped_and_its_tasks_released() -> None:
    s = Sim()
    s.worker(W1)
    s.client(C1)
    s.client(C2)
    s.submit(C1, T("x"))
    s.flush()
    s.now = 20.0
    s.send(C2, P.Heartbeat({}))
    assert [(i, m) for i, m, _ in s.flush()] == [(C2, P.Heartbeat({}))]
    for now in (10.0, 20.0, 29.0):
        s.now = now
        s.send(W1, P.Heartbeat({}))
    s.tick(29.9)
    assert C1 in s.st.clients  # 29.9 s < 30 intervals
    s.tick(30.5)
    assert C1 not in s.st.clients
    assert C2 in s.st.clients
    out = s.flush()
    assert cancelled(out, W1) == ["x"]
    assert s.st.tasks == {}
    s.submit(C1, T("y"))
    assert [(i, m) for i, m, _ in s.flush()] == [(C1, P.Error(0, "unregistered"))]


def test_tick_heartbeats_quiet_workers(sim: Sim) -> None:
    sim.send(W1, P.Heartbeat({}))
    sim.tick(0.5)
    assert sim.flush() == []
    sim.now = 1.5
    sim.send(W1, P.Heartbeat({}))
    sim.tick(1.5)
    assert [(i, m) for i, m, _ in sim.flush()] == [(W1, P.Heartbeat({}))]
    sim.tick(2.0)  # just sent one
    assert sim.flush() == []


# --------------------------------------------------------------------------------------
# malformed input changes nothing


def _busy(s: Sim) -> None:
    s.submit(C1, T("done"), T("running"), T("waiting", "running"))
    s.flush()
    s.finish(W1, "done", b"D")
    s.flush()


GOOD = ["k", [0, 1], [1, 1], [], 0, 0, None, None, False]


def _entry(**change: Any) -> list[Any]:
    names = ["key", "fn", "args", "deps", "prio", "retries", "res", "workers", "loose"]
    return [change.get(n, v) for n, v in zip(names, GOOD, strict=True)]


BAD_SUBMITS = {
    "entry-not-a-list": ["k"],
    "entry-too-short": GOOD[:8],
    "entry-too-long": [*GOOD, 1],
    "key-int": _entry(key=1),
    "deps-str": _entry(deps="done"),
    "dep-int": _entry(deps=[1]),
    "dep-list": _entry(deps=[["done"]]),
    "fn-out-of-range": _entry(fn=[5, 1]),
    "fn-dict": _entry(fn={"a": 1}),
    "fn-str": _entry(fn="0:1"),
    "fn-nested": _entry(fn=[[0], [1]]),
    "args-none": _entry(args=None),
    "args-bool": _entry(args=[True, 1]),
    "prio-str": _entry(prio="high"),
    "prio-bool": _entry(prio=True),
    "prio-none": _entry(prio=None),
    "retries-float": _entry(retries=1.5),
    "retries-none": _entry(retries=None),
    "resources-list": _entry(res=["GPU"]),
    "resources-str-value": _entry(res={"GPU": "one"}),
    "resources-negative": _entry(res={"GPU": -1}),
    "resources-int-key": _entry(res={1: 1}),
    "resources-bool": _entry(res={"GPU": True}),
    "workers-str": _entry(workers="w1"),
    "workers-int": _entry(workers=[1]),
    "loose-int": _entry(loose=1),
    "loose-str": _entry(loose="yes"),
}


def _bad_submits() -> list[Any]:
    cases = []
    for name, entry in BAD_SUBMITS.items():
        cases.append(pytest.param([entry], id=f"alone-{name}"))
        cases.append(
            pytest.param([GOOD, ["k2", *GOOD[1:]], entry], id=f"after-good-{name}")
        )
        if isinstance(entry, list) and len(entry) == 9 and isinstance(entry[0], str):
            # a key the broker holds takes the dedup path, which checks the entry too
            cases.append(pytest.param([["done", *entry[1:]]], id=f"known-key-{name}"))
    return cases


@pytest.mark.parametrize("tasks", _bad_submits())
def test_malformed_submit_changes_nothing(sim: Sim, tasks: list[Any]) -> None:
    _busy(sim)
    before = snapshot(sim.st)
    with pytest.raises(P.ProtocolError):
        sim.send(C1, P.Submit(tasks, ["k"]), [b"fn", b"args"])
    assert snapshot(sim.st) == before
    assert sim.flush() == []


@pytest.mark.parametrize("wants", [[1], ["k", None], [["k"]]])
def test_malformed_wants_change_nothing(sim: Sim, wants: list[Any]) -> None:
    _busy(sim)
    before = snapshot(sim.st)
    with pytest.raises(P.ProtocolError, match="wanted keys"):
        sim.send(C1, P.Submit([GOOD], wants), [b"fn", b"args"])
    assert snapshot(sim.st) == before
    assert sim.flush() == []


BAD_RESULTS = {
    "not-a-list": "running",
    "too-short": ["running", "memory", 1, "int", None, ""],
    "key-int": [1, "memory", 1, "int", None, "", 0.1],
    "status-unknown": ["running", "done", 1, "int", None, "", 0.1],
    "nbytes-str": ["running", "memory", "1", "int", None, "", 0.1],
    "nbytes-bool": ["running", "memory", True, "int", None, "", 0.1],
    "typename-none": ["running", "memory", 1, None, None, "", 0.1],
    "text-int": ["running", "error", 1, "", [0, 1], 5, 0.1],
    "duration-str": ["running", "memory", 1, "int", None, "", "fast"],
    "memory-ref-out-of-range": ["running", "memory", 1, "int", [3, 1], "", 0.1],
    "error-ref-missing": ["running", "error", 0, "", None, "E: x", 0.1],
    "error-ref-out-of-range": ["running", "error", 0, "", [0, 9], "E: x", 0.1],
    "missing-key-unhashable": ["running", "missing", 0, "", None, ["a"], 0.1],
}


@pytest.mark.parametrize("entry", list(BAD_RESULTS.values()), ids=list(BAD_RESULTS))
def test_malformed_task_results_change_nothing(sim: Sim, entry: Any) -> None:
    _busy(sim)
    good = ["running", "memory", 1, "int", [0, 1], "", 0.1]
    before = snapshot(sim.st)
    with pytest.raises(P.ProtocolError):
        sim.send(W1, P.TaskResults([good, entry]), [b"R"])
    assert snapshot(sim.st) == before
    assert sim.flush() == []
    sim.send(W1, P.TaskResults([good]), [b"R"])  # and the worker is still served
    assert sim.state("running") is S.MEMORY


@pytest.mark.parametrize(
    "resources", [{"GPU": "two"}, {"GPU": None}, {"GPU": -1}, {3: 1}, {"GPU": False}]
)
def test_worker_with_malformed_resources_is_not_registered(resources: Any) -> None:
    s = Sim()
    with pytest.raises(P.ProtocolError, match="resources"):
        s.worker(W1, resources=resources)
    assert s.st.workers == {}
    assert s.flush() == []


@pytest.mark.parametrize("nthreads", [0, -1, 2**63 - 1])
def test_worker_with_absurd_thread_count_is_not_registered(nthreads: int) -> None:
    # 2**63 - 1 threads decode fine, but info() and dispatch multiply them: the
    # broker once failed to encode its answers (found by tests/test_fuzz.py).
    s = Sim()
    with pytest.raises(P.ProtocolError, match="threads"):
        s.worker(W1, nthreads=nthreads)
    assert s.st.workers == {}
    assert s.flush() == []


# --------------------------------------------------------------------------------------
# info, transitions, story


def test_info_describes_workers_tasks_and_clients() -> None:
    s = Sim()
    s.worker(W1, nthreads=2, resources={"GPU": 1})
    s.client(C1)
    s.submit(C1, T("a"), T("b"), T("c", "a", "b"), T("g", resources={"GPU": 5}))
    s.flush()
    s.finish(W1, "a", large=True)
    s.send(W1, P.Heartbeat({"memory": 123}))
    s.flush()
    info = s.st.info()
    assert {k: v for k, v in info.items() if k != "workers"} == {
        "type": "Scheduler",
        "id": "zdist-broker",
        "address": "tcp://broker:1",
        "tasks": {"memory": 1, "processing": 1, "waiting": 1, "ready": 1},
        "n_clients": 1,
        "counters": {"tasks_done": 1, "tasks_erred": 0, "workers_lost": 0},
        "versions": {"python": "3.11"},
        "dashboard": "",
    }
    assert info["workers"] == {
        addr(W1): {
            "name": "w1",
            "host": "node-a",
            "nthreads": 2,
            "memory_limit": 2**30,
            "resources": {"GPU": 1},
            "local_directory": "/tmp/zdist",
            "pid": 1234,
            "status": "running",
            "processing": 1,
            "in_memory": 1,
            "avg_task_duration": 0.0,  # no duration reported yet
            "capacity": 2 * (1 + 2),  # 2 threads, and 2 queued behind each meanwhile
            "last_seen": 0.0,
            "metrics": {"memory": 123},
            "versions": {"python": "3.11"},
        }
    }
    s.send(C1, P.InfoRequest(4, "scheduler_info"))
    [(ident, reply, payload)] = s.flush()
    assert (ident, payload) == (C1, [])
    assert reply == P.InfoReply(4, info)


def test_transition_table() -> None:
    assert FINAL_STATES == {S.MEMORY, S.ERRED}
    allowed = {(a.value, b.value) for a, b in _TRANSITIONS}
    for illegal in [
        ("released", "processing"),
        ("released", "memory"),
        ("waiting", "processing"),
        ("waiting", "memory"),
        ("ready", "memory"),
        ("erred", "ready"),
        ("erred", "memory"),
        ("memory", "erred"),
        ("memory", "processing"),
    ]:
        assert illegal not in allowed
    assert all(a != b for a, b in allowed)


def test_illegal_transition_raises_and_changes_nothing(sim: Sim) -> None:
    sim.submit(C1, T("a"), T("b", "a"), wants=["b"])
    sim.flush()
    t = sim.st.tasks["b"]
    story = sim.st.story("b")
    with pytest.raises(IllegalTransition, match="b: waiting -> memory"):
        sim.st._transition(t, S.MEMORY, "test")
    with pytest.raises(IllegalTransition, match="b: waiting -> processing"):
        sim.st._transition(t, S.PROCESSING, "test")
    assert t.state is S.WAITING
    assert sim.st.story("b") == story


def test_story_records_transitions(sim: Sim) -> None:
    sim.submit(C1, T("x", retries=1))
    sim.flush()
    sim.fail(W1, "x")
    sim.flush()
    sim.finish(W1, "x")
    sim.flush()
    assert sim.st.story("x") == [
        ("ready", "submitted"),
        ("processing", "w1"),
        ("ready", "retry"),
        ("processing", "w1"),
        ("memory", "w1"),
    ]
    assert sim.st.story("unknown") == []


def test_story_is_bounded() -> None:
    s = Sim()
    s.worker(W1)
    s.client(C1)
    s.submit(C1, T("x", retries=50))
    s.flush()
    for _ in range(20):
        s.fail(W1, "x")
        s.flush()
    story = s.st.story("x")
    assert len(story) == STORY_LENGTH
    assert story[-2:] == [("ready", "retry"), ("processing", "w1")]


# --------------------------------------------------------------------------------------
# the graph module


def test_task_graph_tracks_edges_both_ways() -> None:
    g = TaskGraph()
    g.add("a", [])
    g.add("b", ["a"])
    g.add("c", ["a", "b", "a"])
    assert ("a" in g, "zz" in g, len(g), g.n_edges()) == (True, False, 3, 3)
    assert sorted(g.dependents("a")) == ["b", "c"]
    assert sorted(g.dependencies("c")) == ["a", "b"]
    assert (g.n_dependents("a"), g.n_dependents("c")) == (2, 0)
    g.remove("c")
    assert (len(g), g.n_edges(), sorted(g.dependents("a"))) == (2, 1, ["b"])


def test_find_cycle() -> None:
    assert find_cycle([("a", "b"), ("b", "c"), ("a", "c")]) is None
    assert find_cycle([]) is None
    cycle = find_cycle([("x", "a"), ("a", "b"), ("b", "c"), ("c", "a")])
    assert cycle is not None
    assert sorted(cycle) == ["a", "b", "c"]
    i = cycle.index("a")
    assert cycle[i:] + cycle[:i] == ["a", "b", "c"]  # in dependency order
    assert find_cycle([("s", "s")]) == ["s"]


def test_topological_order() -> None:
    order = list(topological_order({"c": ["a", "b"], "b": ["a"], "a": [], "d": []}))
    assert sorted(order) == ["a", "b", "c", "d"]
    assert order.index("a") < order.index("b") < order.index("c")
    with pytest.raises(Exception, match="cycle"):
        list(topological_order({"a": ["b"], "b": ["a"]}))


# --------------------------------------------------------------------------------------
# random operations: the bookkeeping holds whatever the order of events


class FakeWorker:
    def __init__(self, ident: bytes) -> None:
        self.ident = ident
        self.assigned: dict[str, dict[str, Any]] = {}  # key -> deps (where)
        self.cancel: set[str] = set()
        self.data: set[str] = set()
        self.asks: list[P.SendData] = []


class Fuzz:
    def __init__(self, seed: int) -> None:
        import random

        self.rng = random.Random(seed)
        self.sim = Sim(allowed_failures=2)
        self.workers: dict[bytes, FakeWorker] = {}
        self.clients: list[bytes] = []
        self.last: dict[tuple[bytes, str], str] = {}  # last update per client and key
        self.n = 0

    def absorb(self, out: list[Any]) -> None:
        for ident, msg, _ in out:
            fw = self.workers.get(ident)
            if isinstance(msg, P.TaskUpdates):
                for key, status, _, _ in msg.updates:
                    self.last[(ident, key)] = status
            elif fw is None:
                continue
            elif isinstance(msg, P.RunTasks):
                fw.data.difference_update(msg.free or ())  # before the tasks
                for key, _, _, deps, _ in msg.tasks:
                    fw.assigned[key] = dict(deps)
                    fw.cancel.discard(key)
            elif isinstance(msg, P.CancelTasks):
                fw.cancel.update(k for k in msg.keys if k in fw.assigned)
            elif isinstance(msg, P.FreeKeys):
                fw.data.difference_update(msg.keys)
            elif isinstance(msg, P.SendData):
                fw.asks.append(msg)

    def step(self, action: str) -> None:
        rng, sim = self.rng, self.sim
        live = list(self.workers.values())
        if action == "worker":
            ident = f"w{rng.randrange(5)}".encode()
            fw = self.workers.get(ident)
            if fw is None:
                fw = self.workers[ident] = FakeWorker(ident)
            else:  # reconnects: what it ran is gone, what it holds may be kept
                fw.assigned.clear()
                fw.cancel.clear()
                fw.asks.clear()
            sim.worker(ident, nthreads=rng.randint(1, 2), keys=sorted(fw.data))
        elif action == "client" and len(self.clients) < 3:
            ident = f"c{len(self.clients)}".encode()
            self.clients.append(ident)
            sim.client(ident)
        elif action == "submit" and self.clients:
            known = list(sim.st.tasks)
            batch: list[T] = []
            for _ in range(rng.randint(1, 5)):
                self.n += 1
                pool = known + [t.key for t in batch]
                deps = rng.sample(pool, min(len(pool), rng.randint(0, 3)))
                batch.append(T(f"k{self.n}", *deps, retries=rng.choice([0, 0, 1])))
            if known and rng.random() < 0.3:
                batch.append(T(rng.choice(known)))  # dedup
            wants = [t.key for t in batch if rng.random() < 0.7] or [batch[-1].key]
            sim.submit(rng.choice(self.clients), *batch, wants=wants)
        elif action == "result" and live:
            fw = rng.choice(live)
            if not fw.assigned:
                return
            key = rng.choice(sorted(fw.assigned))
            where = fw.assigned.pop(key)
            if key in fw.cancel and rng.random() < 0.7:
                fw.cancel.discard(key)
                entry = [key, "cancelled", 0, "", None, "", -1.0]
                sim.send(fw.ident, P.TaskResults([entry]))
                return
            fw.cancel.discard(key)
            roll = rng.random()
            remote = [(d, w) for d, w in where.items() if isinstance(w, str) and w]
            if roll < 0.1:
                sim.fail(fw.ident, key)
            elif roll < 0.17 and remote:
                dep, peer = rng.choice(remote)
                entry = [key, "missing", 0, peer, None, dep, -1.0]
                sim.send(fw.ident, P.TaskResults([entry]))
            elif roll < 0.55:
                fw.data.add(key)
                sim.finish(fw.ident, key, large=True, duration=rng.choice([-1.0, 0.01]))
            else:
                sim.finish(fw.ident, key, key.encode())
        elif action == "reply" and live:
            fw = rng.choice(live)
            if fw.asks:
                ask = fw.asks.pop(0)
                have = [k for k in ask.keys if k in fw.data]
                values = [[k, [i, 1]] for i, k in enumerate(have)]
                missing = [k for k in ask.keys if k not in fw.data]
                reply = P.DataReply(ask.request_id, values, missing)
                sim.send(fw.ident, reply, [k.encode() for k in have])
        elif action == "die" and len(live) > 1:
            dead = rng.choice(live)
            del self.workers[dead.ident]
            sim.now += 11.0
            for ident in [*self.workers, *self.clients]:
                sim.send(ident, P.Heartbeat({}))
            sim.tick(sim.now)
        elif action in ("release", "cancel", "forget", "gather") and self.clients:
            c = rng.choice(self.clients)
            mine = sorted(self.sim.st.clients[c].wants) if c in sim.st.clients else []
            if not mine:
                return
            keys = rng.sample(mine, rng.randint(1, min(3, len(mine))))
            if action == "release":
                sim.send(c, P.ReleaseKeys(keys))
            elif action == "cancel":
                sim.send(c, P.Cancel(keys, rng.random() < 0.5))
            elif action == "forget":
                sim.send(c, P.FireAndForget(keys))
            else:
                sim.send(c, P.Gather(rng.randrange(100), keys))
        elif action == "close" and self.clients:
            c = rng.choice(self.clients)
            if rng.random() < 0.5:
                sim.send(c, P.ClientClose())
            else:
                sim.client(c)  # registers again
        self.absorb(sim.flush())

    def settle(self) -> None:
        """Every live worker finishes everything it is given, until all is quiet."""
        sim = self.sim
        if not self.workers:
            self.step("worker")
        for _ in range(10_000):
            busy = [fw for fw in self.workers.values() if fw.assigned or fw.asks]
            if not busy:
                break
            for fw in busy:
                for key in sorted(fw.assigned):
                    fw.assigned.pop(key)
                    fw.cancel.discard(key)
                    fw.data.add(key)
                    sim.finish(fw.ident, key, large=True)
                while fw.asks:
                    ask = fw.asks.pop(0)
                    values = [[k, [i, 1]] for i, k in enumerate(ask.keys)]
                    payload = [k.encode() for k in ask.keys]
                    sim.send(fw.ident, P.DataReply(ask.request_id, values, []), payload)
            self.absorb(sim.flush())
        else:
            raise AssertionError("the broker never settled")


ACTIONS = (
    ["submit"] * 6
    + ["result"] * 10
    + ["worker", "client", "reply", "release", "cancel", "forget", "gather", "close"]
    + ["die"]
)


@pytest.mark.parametrize("seed", range(12))
def test_random_operations_keep_the_bookkeeping_right(seed: int) -> None:
    fz = Fuzz(seed)
    fz.step("client")
    fz.step("worker")
    for _ in range(250):
        fz.step(fz.rng.choice(ACTIONS))
    fz.settle()
    st = fz.sim.st
    assert not [k for k, t in st.tasks.items() if t.state in ACTIVE]
    for ident, c in st.clients.items():
        for key in c.wants:
            t = st.tasks[key]
            assert t.state in FINAL_STATES, key
            expected = "finished" if t.state is S.MEMORY else "error"
            assert fz.last.get((ident, key)) == expected, (ident, key)


def test_task_graph_is_a_consistent_networkx_digraph() -> None:
    import networkx as nx

    from zdist.broker.graph import TaskGraph

    g = TaskGraph()
    g.add("a", [])
    g.add("b", ["a"])
    g.add("c", ["a", "b"])
    ref = nx.DiGraph([("a", "b"), ("a", "c"), ("b", "c")])
    assert set(g.nx.nodes) == set(ref.nodes) and set(g.nx.edges) == set(ref.edges)
    assert list(nx.topological_sort(g.nx)) == ["a", "b", "c"]
    assert sorted(g.dependencies("c")) == ["a", "b"] and g.n_dependents("a") == 2
    g.remove("c")
    ref.remove_node("c")
    assert set(g.nx.edges) == set(ref.edges) and g.n_dependents("a") == 1
    g.remove("b")
    g.remove("a")
    assert len(g) == 0 and g.nx.number_of_nodes() == 0 and g.n_edges() == 0


def test_large_submission_is_inserted_in_slices_with_later_messages_in_order() -> None:
    from zdist import protocol as P
    from zdist.broker.clients import INSERT_SLICE
    from zdist.broker.state import BrokerConfig, BrokerState

    st = BrokerState(BrokerConfig(address="tcp://b:1"), {})
    st.handle(
        b"w",
        P.RegisterWorker("w", 1, 0, {}, "tcp://w:1", "h", 1, "/t", {}, []),
        [],
        0.0,
    )
    st.handle(b"c", P.RegisterClient("c", {}), [], 0.0)
    st.flush()
    n = 2 * INSERT_SLICE + 5
    fl = P.FrameList()
    fn = fl.add([b"f"])
    entries = [
        [
            f"k{i}",
            fn,
            fl.add([b"a"]),
            [f"k{i - 1}"] if i else [],
            0,
            0,
            None,
            None,
            False,
        ]
        for i in range(n)
    ]
    st.handle(b"c", P.Submit(entries, [f"k{n - 1}"]), fl.frames, 1.0)
    assert st.has_work() and len(st.tasks) < n  # not inserted in one go
    # A follow-up naming a key still to be inserted waits its turn (not "dangling").
    fl2 = P.FrameList()
    follow = [
        [
            "after",
            fl2.add([b"f"]),
            fl2.add([b"a"]),
            [f"k{n - 1}"],
            0,
            0,
            None,
            None,
            False,
        ]
    ]
    st.handle(b"c", P.Submit(follow, ["after"]), fl2.frames, 1.0)
    finished: dict[str, str] = {}
    for _ in range(10 * n):
        st.work()
        for ident, msg, _ in st.flush():
            if isinstance(msg, P.RunTasks):
                results = [[e[0], "memory", 1, "int", None, "", 0.0] for e in msg.tasks]
                st.handle(ident, P.TaskResults(results), [], 2.0)
            elif isinstance(msg, P.TaskUpdates):
                finished.update({u[0]: u[1] for u in msg.updates})
        if len(finished) == 2:
            break
    assert finished == {f"k{n - 1}": "finished", "after": "finished"}
    assert not st.has_work()
    # Intermediate results were released once their dependents ran.
    assert st.tasks[f"k{n - 2}"].state.value == "released"


def test_frees_of_small_results_wait_for_company_and_large_ones_go_at_once() -> None:
    sim = Sim()
    sim.worker(W1)
    sim.client(C1)

    def run_all(*tasks: T, large: tuple[str, ...] = ()) -> None:
        sim.submit(C1, *tasks)
        left = {t.key for t in tasks}
        while left:
            for k in run_keys(sim.flush()).get(W1, []):
                sim.finish(W1, k, large=k in large)
                left.discard(k)
        assert freed(sim.flush(), W1) == []

    small = [f"s{i}" for i in range(3)]
    run_all(*(T(k) for k in small))
    sim.send(C1, P.ReleaseKeys(small))
    assert freed(sim.flush(), W1) == []  # small: kept on W1 a little longer
    assert freed(sim.flush(FREE_DELAY / 2), W1) == []
    # Due: FREE_DELAY after the first was queued.
    assert freed(sim.flush(FREE_DELAY), W1) == small
    # A large result goes at once, and takes the small ones queued with it.
    run_all(T("s3"), T("big"), large=("big",))
    sim.send(C1, P.ReleaseKeys(["s3"]))
    assert freed(sim.flush(), W1) == []
    sim.send(C1, P.ReleaseKeys(["big"]))
    assert freed(sim.flush(), W1) == ["big", "s3"]
    # FREE_BATCH small ones go together, at once.
    many = [f"m{i:04d}" for i in range(FREE_BATCH)]
    run_all(*(T(k) for k in many))
    sim.send(C1, P.ReleaseKeys(many[:-1]))
    assert freed(sim.flush(), W1) == []
    sim.send(C1, P.ReleaseKeys(many[-1:]))
    assert freed(sim.flush(), W1) == many
    # Keys pending for a worker go with the next RunTasks to it.
    run_all(T("x"))
    sim.send(C1, P.ReleaseKeys(["x"]))
    sim.submit(C1, T("y"))
    (msg,) = sent(sim.flush(), P.RunTasks, W1)
    assert msg.free == ["x"]
    sim.finish(W1, "y")
    sim.send(C1, P.ReleaseKeys(["y"]))
    sim.flush()
    # A worker that leaves takes its pending frees with it.
    sim.st.remove_worker(W1, planned=True)
    assert sim.flush(sim.now + 1) == []

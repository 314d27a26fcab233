"""Fault tolerance with real processes: workers killed or stopped mid-run, a broker
killed and restarted, clients that leave or die, many clients at once, and tasks whose
code is missing on the workers.

Brokers and workers run as ``python -m zdist.broker`` / ``python -m zdist.worker``
subprocesses with fast heartbeats (LocalCluster does not expose the heartbeat options).
Task functions defined here are imported by the workers as the module ``test_faults``
(conftest puts tests/ on their PYTHONPATH), so this module must stay free of import
side effects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tasks
from utils import descendants, wait_for

from zdist import Client, KilledWorker, fire_and_forget, get_worker, wait
from zdist.errors import CommClosedError, FutureLostError

PY = sys.executable
#: Fast heartbeats: a silent worker is declared dead after 0.05 s * 10.
FAST = ("--heartbeat-interval", "0.05", "--liveness", "10")
#: Larger than protocol.INLINE_LIMIT: such results live only on the worker that made
#: them (the broker keeps no inline copy), so losing that worker loses them.
PAD = 70_000


# ======================================================================================
# task functions (imported by the workers from this module)


def _val(v: int) -> tuple[int, bytes]:
    return (v, b"x" * PAD if v % 3 == 0 else b"")


def leaf(i: int, delay: float = 0.0) -> tuple[int, bytes]:
    time.sleep(delay)
    return _val(i)


def combine(a: tuple[int, bytes], b: tuple[int, bytes], delay: float = 0.0) -> Any:
    time.sleep(delay)
    return _val(a[0] + b[0] + 1)


def marked_leaf(i: int, delay: float, directory: str) -> tuple[int, bytes]:
    """A leaf that leaves start/end marker files named after its process."""
    stem = os.path.join(directory, f"{os.getpid()}-{i}")
    Path(stem + ".start").touch()
    time.sleep(delay)
    Path(stem + ".end").touch()
    return _val(i)


def values(xs: list[tuple[int, bytes]]) -> list[int]:
    return [x[0] for x in xs]


def kill_own_worker(x: Any = None) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_own_worker_when_queued(n_queued: int, timeout: float = 30.0) -> None:
    """Die only once ``n_queued`` other tasks wait on this worker behind this one."""
    w = get_worker()
    deadline = time.monotonic() + timeout
    while len(w.tasks) < n_queued + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


def flaky(counter: str, failures: int) -> int:
    """Fail the first ``failures`` calls (counted in a file), then return the count."""
    path = Path(counter)
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    if n <= failures:
        raise ValueError(f"attempt {n} failed")
    return n


def sleep_then_touch(path: str, delay: float) -> str:
    time.sleep(delay)
    Path(path).touch()
    return path


def local_graph(width: int, depth: int) -> list[list[int]]:
    """What the layered graph of the kill test computes, computed here."""
    layer = [leaf(i)[0] for i in range(width)]
    out = [layer]
    for _ in range(depth - 1):
        layer = [layer[j] + layer[(j + 1) % width] + 1 for j in range(width)]
        out.append(layer)
    return out


def submit_graph(c: Client, width: int, depth: int, delay: float) -> list[list[Any]]:
    layer = [c.submit(leaf, i, delay) for i in range(width)]
    out = [layer]
    for _ in range(depth - 1):
        layer = [
            c.submit(combine, layer[j], layer[(j + 1) % width], delay)
            for j in range(width)
        ]
        out.append(layer)
    return out


# ======================================================================================
# processes


class Procs:
    """Every process a test starts; all are killed (with their children) at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[Any]] = []
        self.logs: list[Any] = []

    def popen(self, args: list[str], name: str, **kwargs: Any) -> subprocess.Popen[Any]:
        path = self.tmp_path / f"{name}-{len(self.procs)}.log"
        log = open(path, "ab")
        self.logs.append(log)
        kwargs.setdefault("stderr", log)
        kwargs.setdefault("stdout", log)
        proc = subprocess.Popen(args, **kwargs)
        proc.log_path = path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def broker(self, sf: str, *extra: str, port: str | None = "0") -> tuple[Any, str]:
        args = [
            PY,
            "-m",
            "zdist.broker",
            "--scheduler-file",
            sf,
            "--log-level",
            "warning",
            *FAST,
            *extra,
        ]
        if port is not None:
            args += ["--port", port]
        proc = self.popen(args, "broker", stdout=subprocess.PIPE)
        return proc, read_address(proc)

    def worker(self, sf: str, name: str, *extra: str) -> subprocess.Popen[Any]:
        return self.popen(
            [
                PY,
                "-m",
                "zdist.worker",
                "--scheduler-file",
                sf,
                "--nthreads",
                "1",
                "--memory-limit",
                "0",
                "--name",
                name,
                "--log-level",
                "warning",
                *extra,
            ],
            f"worker-{name}",
        )

    def close(self) -> None:
        family = {p.pid: descendants(p.pid) for p in self.procs}
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            for pid in [p.pid, *family[p.pid], *descendants(p.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        for log in self.logs:
            log.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def read_address(proc: subprocess.Popen[Any], timeout: float = 60) -> str:
    """The address from the broker's 'zbroker listening at' line."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if ready else ""
    assert "listening at tcp://" in line, f"broker did not start: {line!r}"
    return line.split("listening at ", 1)[1].strip()


def workers_by_name(c: Client) -> dict[str, dict[str, Any]]:
    return {
        w["name"]: {**w, "address": a} for a, w in c.scheduler_info()["workers"].items()
    }


def call_within(fn: Callable[[], Any], limit: float) -> tuple[str, Any]:
    """Run ``fn`` in a thread; ("returned", value), ("raised", exc) or ("hung", None)
    when it is still running after ``limit`` seconds (a hang, the thing under test)."""
    out: list[tuple[str, Any]] = []

    def target() -> None:
        try:
            out.append(("returned", fn()))
        except BaseException as exc:
            out.append(("raised", exc))

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit)
    return out[0] if out else ("hung", None)


def call_all_within(
    fns: dict[str, Callable[[], Any]], limit: float
) -> dict[str, tuple[str, Any]]:
    """call_within for several functions at once (they wait side by side)."""
    out: dict[str, tuple[str, Any]] = {}
    threads = [
        threading.Thread(
            target=lambda k=k, f=f: out.__setitem__(k, call_within(f, limit)),
            daemon=True,
        )
        for k, f in fns.items()
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(limit + 5)
    return {k: out.get(k, ("hung", None)) for k in fns}


# ======================================================================================
# workers dying


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_kill_worker_mid_graph_every_result_correct(
    procs: Procs, tmp_path: Path
) -> None:
    sf = str(tmp_path / "s.json")
    procs.broker(sf)
    procs.worker(sf, "ka")
    procs.worker(sf, "kb")
    width, depth = 100, 5
    expected = local_graph(width, depth)
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(2, timeout=60)
        futures = submit_graph(c, width, depth, delay=0.05)
        wait_for(
            lambda: c.scheduler_info()["counters"]["tasks_done"] >= 100,
            timeout=60,
            what="a fifth of the graph to finish",
        )
        before = workers_by_name(c)
        victim = max(before.values(), key=lambda w: w["processing"])
        os.kill(victim["pid"], signal.SIGKILL)
        assert c.scheduler_info()["counters"]["tasks_done"] < width * depth, (
            "the graph finished before the kill: nothing was tested"
        )
        wait(futures, timeout=75)
        got = [values(c.gather(layer)) for layer in futures]
        assert got == expected
        info = c.scheduler_info()
        assert info["counters"]["workers_lost"] >= 1
        # The supervisor restarted the killed worker process under the same name.
        restarted = wait_for(
            lambda: (
                (w := workers_by_name(c).get(victim["name"]))
                and w["pid"] != victim["pid"]
                and w
            ),
            timeout=30,
            what="the nanny to restart the killed worker",
        )
        assert restarted["address"] != victim["address"]
        assert c.submit(tasks.inc, 1, workers=[victim["name"]]).result(30) == 2


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_task_killing_its_worker_fails_with_killed_worker(
    procs: Procs, tmp_path: Path
) -> None:
    sf = str(tmp_path / "s.json")
    # Deaths by heartbeat after 40 x 0.05 s: a loaded machine must not make fw-1 look
    # dead (its tasks would be blamed too).
    procs.broker(sf, "--allowed-failures", "1", "--liveness", "40")
    procs.worker(sf, "fw", "--nworkers", "2")  # fw-0 and fw-1 under one supervisor
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(2, timeout=60)
        first_pid = workers_by_name(c)["fw-0"]["pid"]
        # The killer always lands on fw-0 (the nanny restarts it under that name); the
        # other tasks run on fw-1 meanwhile.
        killer = c.submit(kill_own_worker, 1, workers=["fw-0"], pure=False)
        others = c.map(tasks.slow_inc, range(40), delay=0.05, workers=["fw-1"])
        with pytest.raises(KilledWorker) as info:
            killer.result(timeout=75)
        exc = info.value
        assert exc.task == killer.key
        assert killer.key in str(exc)
        assert len(exc.workers) == 2  # allowed_failures + 1 deaths
        assert len(set(exc.workers)) == 2 and exc.last_worker == exc.workers[-1]
        assert c.gather(others) == list(range(1, 41))
        assert c.scheduler_info()["counters"]["workers_lost"] >= 2
        # fw-0 was restarted (twice) and takes tasks again.
        wait_for(
            lambda: (w := workers_by_name(c).get("fw-0")) and w["pid"] != first_pid,
            timeout=30,
            what="fw-0 to come back",
        )
        assert sum(c.gather(c.map(tasks.inc, range(50)))) == sum(range(1, 51))
        assert c.submit(tasks.inc, 1, workers=["fw-0"]).result(30) == 2


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_tasks_queued_behind_a_killer_are_not_blamed(
    procs: Procs, tmp_path: Path
) -> None:
    sf = str(tmp_path / "s.json")
    procs.broker(sf, "--allowed-failures", "0")
    procs.worker(sf, "solo")
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(1, timeout=60)
        # The killer runs first (priority) and dies only once two innocent tasks are
        # queued on its worker, which they never start running.
        killer = c.submit(kill_own_worker_when_queued, 2, priority=10, pure=False)
        innocent = c.map(tasks.inc, range(2), priority=0, pure=False)
        with pytest.raises(KilledWorker):
            killer.result(timeout=60)
        wait(innocent, timeout=60)
        assert [f.status for f in innocent] == ["finished", "finished"]
        assert c.gather(innocent) == [1, 2]


@pytest.mark.timeout(90)
def test_tasks_pinned_to_a_lost_worker_do_not_block_others(
    procs: Procs, tmp_path: Path
) -> None:
    sf = str(tmp_path / "s.json")
    procs.broker(sf)
    gone = procs.worker(sf, "gone")
    procs.worker(sf, "here")
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(2, timeout=60)
        gone.send_signal(signal.SIGTERM)
        assert gone.wait(60) == 0
        wait_for(
            lambda: list(workers_by_name(c)) == ["here"],
            timeout=30,
            what="the broker to let the stopped worker go",
        )
        # Waiting for "gone" to come back: not runnable on "here".
        pinned = c.map(tasks.inc, range(100), workers=["gone"])
        others = c.map(tasks.double, range(10))
        wait(others, timeout=20)
        assert c.gather(others) == [2 * i for i in range(10)]
        assert not any(f.done() for f in pinned)


@pytest.mark.timeout(60)
def test_retries(procs: Procs, tmp_path: Path) -> None:
    sf = str(tmp_path / "s.json")
    procs.broker(sf)
    procs.worker(sf, "r")
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(1, timeout=60)
        enough = c.submit(flaky, str(tmp_path / "a"), 3, retries=3, pure=False)
        assert enough.result(timeout=45) == 4  # failed 3 times, then succeeded
        more = c.submit(flaky, str(tmp_path / "b"), 2, retries=5, pure=False)
        assert more.result(timeout=45) == 3
        short = c.submit(flaky, str(tmp_path / "c"), 3, retries=2, pure=False)
        with pytest.raises(ValueError, match="attempt 3 failed"):  # the last one
            short.result(timeout=45)
        assert (tmp_path / "c").read_text() == "3"  # 1 run + 2 retries, no more
        none = c.submit(flaky, str(tmp_path / "d"), 1, pure=False)
        with pytest.raises(ValueError, match="attempt 1 failed"):
            none.result(timeout=45)


# ======================================================================================
# the broker going away


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_broker_killed_and_restarted_with_same_scheduler_file(
    procs: Procs, tmp_path: Path
) -> None:
    sf = str(tmp_path / "s.json")
    broker, address = procs.broker(sf)
    workers = procs.worker(sf, "rw", "--nworkers", "2")
    keys = json.loads(Path(sf).read_text())["security"]
    old = Client(scheduler_file=sf, timeout=5)
    try:
        old.wait_for_workers(2, timeout=60)
        pids = {n: w["pid"] for n, w in workers_by_name(old).items()}
        assert old.submit(tasks.inc, 1).result(30) == 2
        # Pending forever on this broker: no worker has that name.
        pending = old.submit(tasks.inc, 10, workers=["nobody"], pure=False)
        broker.kill()
        broker.wait()
        # Both workers noticed (see test_fast_broker_restart_keeps_worker_processes
        # for a broker back before they do).
        log = workers.log_path  # type: ignore[attr-defined]
        wait_for(
            lambda: all(f"worker {n}: broker silent" in log.read_text() for n in pids),
            timeout=30,
            what="the workers to notice the broker is gone",
        )
        # Same scheduler file, no --port: address and keys are reused.
        _, address2 = procs.broker(sf, port=None)
        assert address2 == address
        info = json.loads(Path(sf).read_text())
        assert info["address"] == address and info["security"] == keys
        with Client(scheduler_file=sf, timeout=30) as new:
            # The workers re-register by themselves, without being restarted.
            wait_for(
                lambda: len(new.scheduler_info()["workers"]) == 2,
                timeout=60,
                what="the workers to re-register",
            )
            assert {n: w["pid"] for n, w in workers_by_name(new).items()} == pids
            assert sum(new.gather(new.map(tasks.inc, range(100)))) == sum(range(1, 101))
        # The old client's pending future fails clearly instead of hanging.
        with pytest.raises((FutureLostError, CommClosedError)) as lost:
            pending.result(timeout=60)
        assert "broker" in str(lost.value)

        # Resubmitting from the old client works once it has registered again.
        def resubmitted() -> int | None:
            try:
                return old.submit(tasks.inc, 41, pure=False).result(10)
            except (FutureLostError, TimeoutError):
                return None

        assert wait_for(resubmitted, timeout=60, what="a resubmission to succeed") == 42
        assert {n: w["pid"] for n, w in workers_by_name(old).items()} == pids
        assert "Traceback" not in log.read_text()
    finally:
        old.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_fast_broker_restart_keeps_worker_processes(
    procs: Procs, tmp_path: Path
) -> None:
    sf = str(tmp_path / "s.json")
    # Liveness 200 x 0.05 s: the broker is back long before the worker notices it
    # left, so the worker's next heartbeat reaches a broker that does not know it.
    broker, _ = procs.broker(sf, "--liveness", "200")
    workers = procs.worker(sf, "fr")
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(1, timeout=60)
        pid = workers_by_name(c)["fr"]["pid"]
    broker.kill()
    broker.wait()
    procs.broker(sf, "--liveness", "200", port=None)
    with Client(scheduler_file=sf, timeout=30) as c:
        wait_for(
            lambda: "fr" in workers_by_name(c),
            timeout=60,
            what="the worker to re-register",
        )
        assert c.submit(tasks.inc, 1).result(30) == 2
        log = workers.log_path  # type: ignore[attr-defined]
        assert "Traceback" not in log.read_text()
        assert workers_by_name(c)["fr"]["pid"] == pid


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_broker_gone_for_good_pending_futures_fail(
    procs: Procs, tmp_path: Path
) -> None:
    sf = str(tmp_path / "s.json")
    broker, _ = procs.broker(sf)
    procs.worker(sf, "gw")
    c = Client(scheduler_file=sf, timeout=3)
    try:
        c.wait_for_workers(1, timeout=60)
        pending = c.submit(tasks.inc, 1, workers=["nobody"], pure=False)
        big = c.submit(
            tasks.make_bytes, 200_000, pure=False
        )  # not inline: on the worker
        wait([big], timeout=30)
        broker.kill()
        broker.wait()
        # result(timeout=) honours its timeout, whatever the broker does.
        kind, exc = call_within(lambda: pending.result(timeout=1), 30)
        assert kind == "raised" and isinstance(exc, TimeoutError), (kind, exc)
        # Without a timeout, the client's own timeout turns the wait into an error.
        kind, exc = call_within(pending.result, 60)
        assert kind == "raised", (kind, exc)
        assert isinstance(exc, (FutureLostError, CommClosedError)), repr(exc)
        assert "broker" in str(exc)
        kind, exc = call_within(lambda: c.gather([pending]), 30)
        assert kind == "raised" and isinstance(exc, (FutureLostError, CommClosedError))
        kind, exc = call_within(lambda: big.result(timeout=2), 30)
        assert kind == "raised" and isinstance(exc, TimeoutError), (kind, exc)
        kind, exc = call_within(c.scheduler_info, 30)
        assert kind == "raised" and isinstance(exc, TimeoutError), (kind, exc)
    finally:
        c.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_broker_gone_for_good_requests_fail_instead_of_hanging(
    procs: Procs, tmp_path: Path
) -> None:
    sf = str(tmp_path / "s.json")
    broker, _ = procs.broker(sf)
    procs.worker(sf, "hw")
    c = Client(scheduler_file=sf, timeout=3)
    try:
        c.wait_for_workers(1, timeout=60)
        big = c.submit(tasks.make_bytes, 200_000, pure=False)
        wait([big], timeout=30)
        broker.kill()
        broker.wait()
        # The client's own timeout (max(3 s, 3 client heartbeats = 6 s)) is well
        # inside this limit.
        results = call_all_within(
            {"result": big.result, "run": lambda: c.run(os.getpid)}, 25
        )
        assert {k: v[0] for k, v in results.items()} == {
            "result": "raised",
            "run": "raised",
        }, results
    finally:
        c.close()  # also releases a hung request


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_worker_exits_after_death_timeout(procs: Procs, tmp_path: Path) -> None:
    sf = str(tmp_path / "s.json")
    broker, _ = procs.broker(sf)
    worker = procs.worker(sf, "dw", "--death-timeout", "3")
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(1, timeout=60)
        child = workers_by_name(c)["dw"]["pid"]
        assert c.submit(tasks.inc, 1).result(30) == 2
        broker.kill()
        broker.wait()
    assert worker.wait(60) == 0
    assert not os.path.exists(f"/proc/{child}") or _zombie(child)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigterm_worker_mid_run_hands_work_back(procs: Procs, tmp_path: Path) -> None:
    sf = str(tmp_path / "s.json")
    # Slow to declare deaths: any recomputation below must come from the planned exit.
    procs.broker(sf, "--liveness", "100")
    leaving = procs.worker(sf, "leaving")
    procs.worker(sf, "staying")
    markers = tmp_path / "markers"
    markers.mkdir()
    n = 30
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(2, timeout=60)
        leaving_info = workers_by_name(c)["leaving"]
        leaves = [c.submit(marked_leaf, i, 0.2, str(markers)) for i in range(n)]
        # Combined after the leaves: many need results that live only on "leaving".
        pairs = [
            c.submit(combine, leaves[j], leaves[(j + 1) % n], 0.05) for j in range(n)
        ]
        wait_for(
            lambda: (
                list(markers.glob(f"{leaving_info['pid']}-*.end"))
                and workers_by_name(c)["leaving"]["processing"] >= 2
            ),
            timeout=60,
            what="the leaving worker to be busy with queued tasks",
        )
        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(60) == 0
        wait(pairs, timeout=60)
        leaf_values = [i for i in range(n)]
        expected = [leaf_values[j] + leaf_values[(j + 1) % n] + 1 for j in range(n)]
        assert values(c.gather(pairs)) == expected
        assert values(c.gather(leaves)) == leaf_values
        assert list(workers_by_name(c)) == ["staying"]
    # Every task the leaving worker started, it finished (none was cut short).
    pid = leaving_info["pid"]
    started = {p.stem for p in markers.glob(f"{pid}-*.start")}
    ended = {p.stem for p in markers.glob(f"{pid}-*.end")}
    assert started and started == ended
    # Results held only by the leaving worker were handed over, not recomputed: each
    # leaf ran exactly once, here or there.
    ran = sorted(int(p.stem.split("-")[1]) for p in markers.glob("*.start"))
    assert ran == list(range(n))


# ======================================================================================
# clients leaving


CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import tasks, test_faults
    from zdist import Client, fire_and_forget
    sf, marker, prefix = sys.argv[1:4]
    c = Client(scheduler_file=sf, timeout=30)
    mine = [c.submit(tasks.slow_inc, i, 0.3, key=f"{prefix}-{i}") for i in range(100)]
    f = c.submit(test_faults.sleep_then_touch, marker, 1.0, pure=False)
    fire_and_forget(f)
    del f
    c.scheduler_info()  # a round trip: everything above reached the broker
    print("submitted", flush=True)
    time.sleep(300)
    """
)


def _tasks_left(c: Client) -> int:
    counts = c.scheduler_info()["tasks"]
    return sum(counts.get(s, 0) for s in ("waiting", "ready", "processing"))


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["close", "kill"])
def test_leaving_client_releases_only_its_tasks(
    procs: Procs, tmp_path: Path, how: str
) -> None:
    sf = str(tmp_path / "s.json")
    # Clients expire after 2 s * 3 missed heartbeats (the broker's client heartbeat
    # interval itself is not a zbroker option).
    procs.broker(sf, "--client-liveness", "3")
    procs.worker(sf, "cw", "--nworkers", "2")
    marker = tmp_path / "fire-and-forget-ran"
    with Client(scheduler_file=sf, timeout=30) as other:
        other.wait_for_workers(2, timeout=60)
        if how == "close":
            leaver = Client(scheduler_file=sf, timeout=30, set_as_default=False)
            mine = [
                leaver.submit(tasks.slow_inc, i, 0.3, key=f"leaver-{i}")
                for i in range(100)
            ]
            f = leaver.submit(sleep_then_touch, str(marker), 1.0, pure=False)
            fire_and_forget(f)
            del f
            leaver.scheduler_info()
        else:
            proc = procs.popen(
                [PY, "-c", CLIENT_SCRIPT, sf, str(marker), "leaver"],
                "client",
                stdout=subprocess.PIPE,
            )
            read = select.select([proc.stdout], [], [], 60)[0]
            assert read and proc.stdout.readline() == b"submitted\n"  # type: ignore[union-attr]
        # Another client's work, submitted while the leaver's is queued, and one of
        # the leaver's tasks that this client wants too.
        theirs = other.map(tasks.slow_inc, range(20), delay=0.05)
        shared = other.submit(tasks.slow_inc, 99, 0.3, key="leaver-99")
        assert other.scheduler_info()["n_clients"] == 2
        if how == "close":
            leaver.close()
            del mine
        else:
            proc.kill()
            proc.wait()
        wait_for(
            lambda: other.scheduler_info()["n_clients"] == 1,
            timeout=60,
            what="the broker to drop the leaving client",
        )
        assert other.gather(theirs) == list(range(1, 21))
        assert shared.result(60) == 100
        # The fire-and-forget task ran although its client left.
        wait_for(marker.exists, timeout=60, what="the fire-and-forget task to run")
        # The leaver's 100 x 0.3 s tasks were released, not run to the end.
        wait_for(
            lambda: _tasks_left(other) == 0,
            timeout=30,
            what="the leaver's tasks to be released",
        )
        leavers_done = other.scheduler_info()["counters"]["tasks_done"] - 20 - 1
        assert leavers_done < 100, "the leaver's tasks all ran: they were not released"


CHECKSUM_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    import tasks
    from zdist import Client
    sf, offset = sys.argv[1], int(sys.argv[2])
    with Client(scheduler_file=sf, timeout=60) as c:
        xs = c.map(tasks.inc, range(offset, offset + 1000))
        ys = c.map(tasks.add, xs, xs[1:] + xs[:1])
        got = c.gather(ys)
    print(json.dumps({"n": len(got), "sha": hashlib.sha256(repr(got).encode())
                      .hexdigest()}), flush=True)
    """
)


def _expected_checksum(offset: int) -> dict[str, Any]:
    xs = [i + 1 for i in range(offset, offset + 1000)]
    got = [a + b for a, b in zip(xs, xs[1:] + xs[:1], strict=True)]
    return {"n": 1000, "sha": hashlib.sha256(repr(got).encode()).hexdigest()}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ten_clients_at_once(procs: Procs, tmp_path: Path) -> None:
    sf = str(tmp_path / "s.json")
    # Generous liveness: ten client processes and two workers share two cores.
    procs.broker(sf, "--liveness", "100")
    procs.worker(sf, "lw", "--nworkers", "2")
    with Client(scheduler_file=sf, timeout=30) as c:
        c.wait_for_workers(2, timeout=60)
        # Offsets 500 apart: neighbouring clients share half their keys.
        offsets = [i * 500 for i in range(10)]
        clients = [
            procs.popen(
                [PY, "-c", CHECKSUM_SCRIPT, sf, str(o)],
                f"client{o}",
                stdout=subprocess.PIPE,
            )
            for o in offsets
        ]
        outputs = []
        deadline = time.monotonic() + 80
        for p in clients:
            p.wait(max(1, deadline - time.monotonic()))
            assert p.returncode == 0
            outputs.append(json.loads(p.stdout.read()))  # type: ignore[union-attr]
        assert outputs == [_expected_checksum(o) for o in offsets]
        info = c.scheduler_info()
        assert info["counters"]["tasks_erred"] == 0
        wait_for(
            lambda: c.scheduler_info()["n_clients"] == 1,
            timeout=30,
            what="the finished clients to leave",
        )
        wait_for(
            lambda: sum(c.scheduler_info()["tasks"].values()) == 0,
            timeout=30,
            what="every task to be forgotten",
        )


# ======================================================================================
# code missing on the workers


@pytest.mark.timeout(60)
def test_function_from_a_module_the_worker_cannot_import(
    procs: Procs, tmp_path: Path
) -> None:
    sf = str(tmp_path / "s.json")
    procs.broker(sf)
    procs.worker(sf, "mw")
    name = f"zdist_only_here_{os.getpid()}"
    moddir = tmp_path / "private"
    moddir.mkdir()
    (moddir / f"{name}.py").write_text("def double(x):\n    return 2 * x\n")
    sys.path.insert(0, str(moddir))
    try:
        mod = __import__(name)
        assert mod.double(2) == 4
        with Client(scheduler_file=sf, timeout=30) as c:
            c.wait_for_workers(1, timeout=60)
            f = c.submit(mod.double, 21)
            with pytest.raises(ModuleNotFoundError, match=name):
                f.result(timeout=45)
            # The worker is fine afterwards.
            assert c.submit(tasks.inc, 1).result(30) == 2
    finally:
        sys.path.remove(str(moddir))
        sys.modules.pop(name, None)

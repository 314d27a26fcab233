"""End to end: a real broker and two real worker processes, through the Client API."""

from __future__ import annotations

import itertools
import operator
import time
from pathlib import Path

import pytest
import tasks
from utils import wait_for

from zdist import (
    Client,
    FutureCancelledError,
    GraphError,
    LocalCluster,
    RemoteError,
    as_completed,
    fire_and_forget,
    wait,
)

pytestmark = pytest.mark.timeout(60)


def test_seed_local_cluster_snippet() -> None:
    # The seed's snippet, verbatim but for the import.
    from zdist import Client, LocalCluster

    # Set up a local cluster with a specific number of workers
    cluster = LocalCluster(n_workers=4)

    # Connect to the local cluster
    client = Client(cluster)

    # Submit a task to the local cluster
    future = client.submit(lambda x: x + 1, 10)

    # Get the result once the task is complete
    result = future.result()

    assert result == 11
    assert len(client.scheduler_info()["workers"]) == 4
    client.close()
    cluster.close()


def test_submit_and_result(client: Client) -> None:
    assert client.submit(tasks.inc, 1).result() == 2
    assert client.submit(tasks.add, 1, y=41).result() == 42
    f = client.submit(lambda x: x * 3, 7)
    assert f.result(timeout=10) == 21
    assert f.done() and f.status == "finished"


def test_futures_as_arguments_nested(client: Client) -> None:
    a = client.submit(tasks.inc, 1)
    b = client.submit(tasks.inc, 2)
    c = client.submit(tasks.total, [a, b, 10])
    d = client.submit(lambda m: m["x"] + m["y"][0], {"x": a, "y": (b,)})
    assert c.result() == 2 + 3 + 10
    assert d.result() == 5


def test_tree_reduction_with_futures(client: Client) -> None:
    layer = client.map(tasks.identity, range(1000))
    while len(layer) > 1:
        layer = [
            client.submit(tasks.add, layer[i], layer[i + 1])
            if i + 1 < len(layer)
            else layer[i]
            for i in range(0, len(layer), 2)
        ]
    assert layer[0].result() == sum(range(1000))


def test_tree_reduction_with_get(client: Client) -> None:
    dsk: dict = {("leaf", i): i for i in range(1000)}
    level = [("leaf", i) for i in range(1000)]
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = []
        for j in range(0, len(level), 2):
            if j + 1 < len(level):
                key = ("sum", depth, j)
                dsk[key] = (operator.add, level[j], level[j + 1])
                nxt.append(key)
            else:
                nxt.append(level[j])
        level = nxt
    assert client.get(dsk, level[0]) == sum(range(1000))
    assert client.get(dsk, [level[0], [("leaf", 3)]]) == [sum(range(1000)), [3]]


def test_get_nested_tasks_lists_and_literal_strings(client: Client) -> None:
    dsk = {
        "a": 1,
        "b": (tasks.inc, "a"),
        "c": (sum, ["a", "b", (tasks.inc, "b")]),
        "d": (operator.add, "not-a-key-", "e"),
        "e": "literal",
    }
    assert client.get(dsk, ["c", "d"]) == [1 + 2 + 3, "not-a-key-literal"]


def test_get_rejects_cycles_and_dangling_keys(client: Client) -> None:
    with pytest.raises(GraphError, match="cycle"):
        client.get({"x": (tasks.inc, "y"), "y": (tasks.inc, "x")}, "x")
    with pytest.raises(GraphError, match="not in the graph"):
        client.get({"x": (tasks.inc, 1)}, "nope")


def test_map_gather_10000_in_order(client: Client) -> None:
    futures = client.map(tasks.inc, range(10_000))
    assert client.gather(futures) == [i + 1 for i in range(10_000)]


def test_map_multiple_iterables_and_kwargs(client: Client) -> None:
    futures = client.map(tasks.add, range(5), range(10, 15))
    assert client.gather(futures) == [i + i + 10 for i in range(5)]
    assert client.gather(client.map(tasks.add, range(3), y=100)) == [100, 101, 102]


def test_exception_type_message_and_remote_traceback(client: Client) -> None:
    f = client.submit(tasks.raise_custom, 5)
    with pytest.raises(tasks.CustomError, match="custom failure 5") as info:
        f.result()
    assert "raise_custom" in str(info.value.__cause__)  # worker-side traceback
    assert f.status == "error"
    assert isinstance(f.exception(), tasks.CustomError)
    assert f.traceback() is not None or f.exception().__cause__ is not None


def test_unpicklable_exception_class_gives_remote_error(client: Client) -> None:
    def boom() -> None:
        class Local(Exception):
            def __reduce__(self):  # type: ignore[no-untyped-def]
                raise TypeError("no")

        raise Local("inner message")

    with pytest.raises(RemoteError, match="inner message") as info:
        client.submit(boom, pure=False).result()
    assert "Remote traceback" in str(info.value)


def test_dependents_of_failed_task_fail(client: Client) -> None:
    a = client.submit(tasks.fail, 1)
    b = client.submit(tasks.inc, a)
    with pytest.raises(ValueError, match="bad value 1"):
        b.result()


def test_gather_errors_skip(client: Client) -> None:
    good = client.submit(tasks.inc, 1)
    bad = client.submit(tasks.fail, 2)
    assert client.gather([good, bad], errors="skip") == [2]
    with pytest.raises(ValueError):
        client.gather([good, bad])


def test_unpicklable_argument_fails_at_submit(client: Client) -> None:
    import threading

    with pytest.raises(TypeError, match="cannot serialize the arguments of inc"):
        client.submit(tasks.inc, threading.Lock())


def test_unpicklable_result_errs_with_type_name(client: Client) -> None:
    with pytest.raises(TypeError, match="Unpicklable"):
        client.submit(tasks.return_unpicklable, 1).result()


def test_pure_deduplication_and_pure_false(client: Client) -> None:
    a = client.submit(tasks.pid, 123)
    b = client.submit(tasks.pid, 123)
    assert a.key == b.key
    c = client.submit(tasks.pid, 123, pure=False)
    assert c.key != a.key
    named = client.submit(tasks.inc, 1, key="my-key")
    assert named.key == "my-key" and named.result() == 2


def test_cancel(client: Client) -> None:
    blocker = client.submit(tasks.slow_inc, 0, 2.0, pure=False)
    blocker2 = client.submit(tasks.slow_inc, 0, 2.0, pure=False)
    queued = client.submit(tasks.slow_inc, 1, 5.0, pure=False)
    dependent = client.submit(tasks.inc, queued)
    queued.cancel()
    wait_for(lambda: queued.cancelled(), what="cancelled status")
    with pytest.raises(FutureCancelledError):
        queued.result()
    with pytest.raises(FutureCancelledError):
        dependent.result(timeout=10)
    assert blocker.result() == 1 and blocker2.result() == 1


def test_wait_and_as_completed(client: Client) -> None:
    futures = client.map(tasks.slow_inc, range(4), delay=0.05)
    done, not_done = wait(futures)
    assert len(done) == 4 and not not_done
    slow = client.submit(tasks.slow_inc, 1, 2.0, pure=False)
    with pytest.raises(TimeoutError):
        wait([slow], timeout=0.2)
    fast = client.submit(tasks.inc, 41)
    done, not_done = wait([slow, fast], return_when="FIRST_COMPLETED")
    assert fast in done and slow in not_done
    client.cancel(slow)

    seen = []
    ac = as_completed(client.map(tasks.inc, range(5)), with_results=True)
    for i, (_fut, value) in enumerate(ac):
        seen.append(value)
        if i == 0:
            ac.add(client.submit(tasks.inc, 100))
    assert sorted(seen) == [1, 2, 3, 4, 5, 101]


def test_scatter(client: Client) -> None:
    [x] = client.scatter([41])
    assert client.submit(tasks.inc, x).result() == 42
    d = client.scatter({"a": 1, "b": 2})
    assert client.submit(tasks.add, d["a"], d["b"]).result() == 3
    single = client.scatter(b"payload")
    assert single.result() == b"payload"


def test_run_on_every_worker(client: Client) -> None:
    out = client.run(tasks.pid)
    workers = client.scheduler_info()["workers"]
    assert set(out) == set(workers)
    assert len(set(out.values())) == 2
    with pytest.raises(ValueError):
        client.run(tasks.fail)


def test_scheduler_info_fields(client: Client) -> None:
    info = client.scheduler_info()
    assert info["address"] == client.scheduler_address
    assert len(info["workers"]) == 2
    for w in info["workers"].values():
        assert {"name", "host", "nthreads", "memory_limit", "resources"} <= set(w)
        assert w["nthreads"] == 1


def test_get_worker_inside_task(client: Client) -> None:
    def describe() -> dict:
        from zdist import get_worker

        w = get_worker()
        return {
            "name": w.name,
            "address": w.address,
            "nthreads": w.nthreads,
            "resources": w.resources,
            "dir": w.local_directory,
        }

    d = client.submit(describe, pure=False).result()
    assert d["address"] in client.scheduler_info()["workers"]
    assert d["nthreads"] == 1 and d["dir"]


def test_get_worker_outside_task_raises() -> None:
    from zdist import get_worker

    with pytest.raises(ValueError, match="outside"):
        get_worker()


def test_release_on_del_frees_worker_memory(client: Client) -> None:
    f = client.submit(tasks.make_bytes, 1000, pure=False)
    key = f.key
    f.result()

    def holders() -> list:
        return [a for a, keys in client.run(_data_keys).items() if key in keys]

    assert len(holders()) == 1
    del f
    wait_for(lambda: not holders(), what="worker to free the released key")


def test_release_of_an_idle_client_leaves_on_its_own(
    client: Client, cluster: LocalCluster
) -> None:
    # A dropped future's release goes first with the client's next message, or on
    # its I/O thread's next turn when the client sends nothing more (here: a second
    # client watches, the first stays silent).
    with Client(cluster, set_as_default=False) as watcher:

        def held(key: str) -> bool:
            return any(key in keys for keys in watcher.run(_data_keys).values())

        f = client.submit(tasks.make_bytes, 1000, pure=False)
        key = f.key
        f.result()
        assert held(key)
        del f
        wait_for(lambda: not held(key), what="the idle client's release")


def _data_keys() -> list:
    from zdist import get_worker

    return list(get_worker().data)


def test_result_kept_while_dependent_needs_it(client: Client) -> None:
    a = client.submit(tasks.slow_inc, 1, 0.01, pure=False)
    b = client.submit(tasks.slow_inc, a, 0.5, pure=False)
    del a
    assert b.result() == 3


def test_upload_file(client: Client, tmp_path) -> None:
    mod = tmp_path / "zdist_uploaded_mod.py"
    mod.write_text("def answer():\n    return 42\n")
    client.upload_file(str(mod))

    def use() -> int:
        import zdist_uploaded_mod

        return zdist_uploaded_mod.answer()

    assert client.submit(use, pure=False).result() == 42


def test_fire_and_forget_survives_client(cluster: LocalCluster, tmp_path) -> None:
    marker = tmp_path / "ran"
    with Client(cluster) as c1:
        f = c1.submit(tasks.slow_inc, 1, 0.3, pure=False)
        fire_and_forget(c1.submit(_touch_after, str(marker), f, pure=False))
        del f
    wait_for(marker.exists, timeout=20, what="fire-and-forget task to run")


def _touch_after(path: str, _dep: int) -> str:
    return tasks.touch(path)


def test_secede_rejoin_get_client(client: Client) -> None:
    def parent(n: int) -> int:
        from zdist import get_client, rejoin, secede

        c = get_client()
        futures = c.map(tasks.inc, range(n))
        secede()
        out = sum(c.gather(futures))
        rejoin()
        return out

    # Two parents on two single-threaded workers: without secede this would deadlock.
    a = client.submit(parent, 5, pure=False)
    b = client.submit(parent, 6, pure=False)
    assert a.result() == sum(range(1, 6))
    assert b.result() == sum(range(1, 7))


def test_result_timeout(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    f = client.submit(tasks.wait_for_path, str(gate), pure=False)
    try:
        with pytest.raises(TimeoutError):
            f.result(timeout=0.2)
        assert not f.done()  # the wait gave up; the task did not end
    finally:
        gate.touch()  # frees the shared cluster's worker thread either way
    assert f.result(timeout=30) == str(gate)


def test_add_done_callback(client: Client) -> None:
    got = []
    f = client.submit(tasks.inc, 99)
    f.add_done_callback(lambda fut: got.append(fut.key))
    f.result()
    wait_for(lambda: got == [f.key], what="callback")


def test_client_without_address_starts_local_cluster() -> None:
    with Client(n_workers=1, threads_per_worker=1) as c:
        assert c.submit(tasks.inc, 1).result() == 2
        assert len(c.scheduler_info()["workers"]) == 1


def test_resources() -> None:
    with (
        LocalCluster(n_workers=2, threads_per_worker=2, resources={"GPU": 1}) as cl,
        Client(cl) as c,
    ):
        futures = [
            c.submit(_concurrency_probe, i, resources={"GPU": 1}, pure=False)
            for i in range(4)
        ]
        spans = c.gather(futures)
        # At most one GPU task at a time per worker: its intervals never overlap.
        by_worker: dict = {}
        for name, start, end in spans:
            by_worker.setdefault(name, []).append((start, end))
        for intervals in by_worker.values():
            intervals.sort()
            for (_s1, e1), (s2, _) in itertools.pairwise(intervals):
                assert s2 >= e1
        assert len(by_worker) == 2


def _concurrency_probe(i: int) -> tuple:
    from zdist import get_worker

    start = time.monotonic()
    time.sleep(0.2)
    return get_worker().name, start, time.monotonic()


def test_threads_mode_local_cluster() -> None:
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as cl,
        Client(cl) as c,
    ):
        assert c.gather(c.map(tasks.inc, range(100))) == list(range(1, 101))


def test_version_mismatch_with_a_worker_is_reported(cluster: LocalCluster) -> None:
    import zdist._version as v

    real = v.versions

    def other_python() -> dict:
        return {**real(), "python": "3.9.1"}

    # This client claims another Python than the broker and workers it meets.
    import zdist.client.client as cc

    cc.versions = other_python  # type: ignore[assignment]
    try:
        with pytest.warns(UserWarning, match=r"worker .*python 3\.9\.1 here"):
            c = Client(cluster)
        c.close()
    finally:
        cc.versions = real  # type: ignore[assignment]

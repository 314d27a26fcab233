"""Dask collections on zdist (issue 7): dask.array, dask.dataframe, dask.bag and
dask.delayed through ``Client.get``, ``compute``, ``persist`` and the default
scheduler, each checked against dask's own synchronous scheduler (or pandas).

A real broker and two real workers (the module-scoped ``cluster`` fixture). Which
worker ran what is read from files the tasks append to, not from timings.
"""

from __future__ import annotations

import concurrent.futures
import operator
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tasks

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")
dd = pytest.importorskip("dask.dataframe")

from dask._expr import FinalizeCompute  # noqa: E402
from dask._task_spec import (  # noqa: E402
    Alias,
    DataNode,
    Dict,
    List,
    Task,
    TaskRef,
    convert_legacy_graph,
)
from dask.base import collections_to_expr  # noqa: E402

from zdist import Client, Future, GraphError, graphspec, wait  # noqa: E402
from zdist.client import dask_support  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def sync(*collections: Any) -> Any:
    return dask.compute(*collections, scheduler="sync")


def on_zdist(client: Client, *collections: Any) -> Any:
    return dask.compute(*collections, scheduler=client.get)


def tasks_done(client: Client) -> int:
    return client.scheduler_info()["counters"]["tasks_done"]


def n_dask_tasks(*collections: Any) -> int:
    """Tasks of the graph dask.compute hands a scheduler (optimised and culled)."""
    expr = FinalizeCompute(collections_to_expr(list(collections))).optimize()
    return len(convert_legacy_graph(expr.__dask_graph__()))


def noting(path: Path) -> Any:
    """A block function that appends its worker's name to ``path`` (the side channel
    that says which worker ran each block) and returns the block unchanged."""

    def note(block: Any) -> Any:
        from zdist import get_worker

        with open(path, "a") as f:
            f.write(get_worker().name + "\n")
        return block

    return note


def runs_by_worker(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


@pytest.fixture(scope="module")
def x() -> Any:
    return da.random.default_rng(42).random((4000, 4000), chunks=(500, 500))


@pytest.fixture(scope="module")
def pdf() -> Any:
    rng = np.random.default_rng(7)
    n = 2_000
    return pd.DataFrame(
        {
            "k": rng.integers(0, 20, n),
            "a": rng.normal(size=n),
            "b": rng.integers(0, 1_000, n),
        },
        index=pd.RangeIndex(n),
    )


# ======================================================================================
# zdist without dask


def test_zdist_does_not_import_dask() -> None:
    code = (
        "import sys, zdist; zdist.Client; zdist.Future\n"
        "from zdist import graphspec\n"
        "import operator\n"
        "dsk = {'a': 1, ('b', 0): (operator.add, 'a', 2),\n"
        "       'c': (sum, [('b', 0), 'a'])}\n"
        "assert not graphspec.from_dask(dsk)\n"
        "converted, deps = graphspec.convert_graph(dsk, ['c'])\n"
        "assert sorted(map(str, converted)) == [\"('b', 0)\", 'a', 'c']\n"
        "print('dask' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ======================================================================================
# graphs


def test_plain_graph_with_tuple_keys_and_nested_keys(client: Client) -> None:
    dsk = {
        ("x-abc", 0, 1): 1,
        ("x-abc", 1, 1): (tasks.inc, ("x-abc", 0, 1)),
        "total": (sum, [("x-abc", 0, 1), ("x-abc", 1, 1), (tasks.inc, 10)]),
        "unused": (tasks.fail, 1),  # culled: never runs
    }
    keys = [["total", ("x-abc", 1, 1)], [("x-abc", 0, 1)]]
    assert client.get(dsk, keys) == [[1 + 2 + 11, 2], [1]]
    converted, _ = graphspec.convert_graph(dsk, graphspec.flatten_keys(keys))
    assert "unused" not in converted and len(converted) == 3
    # dask's local scheduler packs nested keys in tuples, dask.distributed in lists.
    assert client.get(dsk, keys) == [list(v) for v in dask.get(dsk, keys)]


def test_task_spec_graph(client: Client) -> None:
    dsk = {
        "a": DataNode("a", 1),
        ("b", 0): Task(("b", 0), operator.add, TaskRef("a"), 2),
        "c": Task("c", sum, List(TaskRef("a"), TaskRef(("b", 0)))),
        "d": Alias("d", "c"),
        "e": Task("e", dict, Dict(x=TaskRef("d"), y=3)),
    }
    assert client.get(dsk, ["e", ("b", 0)]) == [{"x": 4, "y": 3}, 3]


def test_high_level_graph_with_nested_keys(client: Client) -> None:
    y = da.arange(100, chunks=10).reshape(10, 10).rechunk(5)
    got = client.get(y.__dask_graph__(), y.__dask_keys__())
    assert len(got) == 2 and len(got[0]) == 2
    np.testing.assert_array_equal(np.block(got), y.compute(scheduler="sync"))


def test_futures_inside_dask_graphs(client: Client) -> None:
    f = client.submit(tasks.inc, 1)
    assert dask.delayed(tasks.add)(f, 10).compute() == 12
    dsk = {"a": DataNode("a", f), "b": Task("b", tasks.inc, TaskRef("a"))}
    assert client.get(dsk, "b") == 3
    futures = client.get(dsk, ["a", "b"], sync=False)
    assert [type(v) for v in futures] == [Future, Future]
    assert client.gather(futures) == [2, 3]


def test_graph_errors(client: Client) -> None:
    cycle = {
        "a": Task("a", tasks.inc, TaskRef("b")),
        "b": Task("b", tasks.inc, TaskRef("a")),
    }
    with pytest.raises(GraphError, match="cycle"):
        client.get(cycle, "a")
    with pytest.raises(GraphError, match="not in the graph"):
        client.get({"a": DataNode("a", 1)}, "nope")


def test_order_becomes_submission_order() -> None:
    # The broker runs ready tasks in submission order within a graph: it must be
    # dask.order's, dependencies first.
    x = da.ones((40, 40), chunks=10)
    y = (x + x.T).sum(axis=0)
    expr = FinalizeCompute(collections_to_expr([y])).optimize()
    keys = list(dask.core.flatten(expr.__dask_keys__()))
    planned = dask_support.graph_tasks(expr, keys)
    nodes = convert_legacy_graph(expr.__dask_graph__())
    rank = dask.order.order(nodes)
    assert [k for k, _, _ in planned] == sorted(nodes, key=rank.__getitem__)
    assert len(planned) == len(nodes)
    seen: set[Any] = set()
    for k, _, (node, values) in planned:
        assert set(values) == set(node.dependencies) <= seen
        seen.add(k)


def test_dependencies_first_repairs_an_order() -> None:
    nodes = {
        "a": DataNode("a", 1),
        "b": Task("b", tasks.inc, TaskRef("a")),
        "c": Task("c", tasks.inc, TaskRef("b")),
        "d": DataNode("d", 0),
    }
    rank = {"c": 0, "d": 1, "b": 2, "a": 3}
    keys = sorted(nodes, key=rank.__getitem__)
    assert dask_support._dependencies_first(nodes, keys, rank) == ["d", "a", "b", "c"]


# ======================================================================================
# dask.array


def test_array_reductions(client: Client, x: Any) -> None:
    got = on_zdist(client, x.sum(), x.mean(), x.std())
    want = sync(x.sum(), x.mean(), x.std())
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert 0.28 < got[2] < 0.29  # uniform on [0, 1): std 1/sqrt(12)


def test_array_matmul_stays_on_workers(client: Client) -> None:
    x = da.random.default_rng(3).random((2000, 2000), chunks=(500, 500))
    before = client.scheduler_info()["counters"]["payload_bytes_forwarded"]
    (got,) = on_zdist(client, (x @ x.T).sum(axis=0))
    forwarded = client.scheduler_info()["counters"]["payload_bytes_forwarded"] - before
    (want,) = sync((x @ x.T).sum(axis=0))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # Chunks of 2 MB moved between the workers many times over; had they gone
    # through the broker its forwarded bytes would exceed the array's size.
    assert forwarded < x.nbytes / 4
    (full,) = on_zdist(client, x @ x.T)
    np.testing.assert_allclose(full, sync(x @ x.T)[0], rtol=1e-10)


def test_array_rechunk_slicing_and_block_functions(client: Client) -> None:
    x = da.random.default_rng(5).random((1000, 1200), chunks=(250, 300))
    y = da.random.default_rng(6).random((1200, 1000), chunks=(300, 250))
    exprs = [
        x.rechunk((400, 1200)),
        x[::3, 5::7],
        x[-1:10:-4, ::2].sum(axis=1),
        da.map_blocks(np.sin, x),
        x.map_blocks(lambda b, c: b * c, 2.5, dtype=x.dtype),
        da.blockwise(lambda a, b: a + b.T, "ij", x, "ij", y, "ji", dtype=x.dtype),
        x.map_overlap(lambda b: b - np.roll(b, 1, axis=0), depth=1, boundary=0),
    ]
    got = on_zdist(client, *exprs)
    want = sync(*exprs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12)


def test_one_zdist_task_per_dask_task_on_both_workers(
    client: Client, tmp_path: Path
) -> None:
    log = tmp_path / "ran"
    x = da.random.default_rng(11).random((4000, 4000), chunks=(500, 500))
    y = x.map_blocks(noting(log), dtype=x.dtype).sum()
    expected_tasks = n_dask_tasks(y)
    before = tasks_done(client)
    (got,) = on_zdist(client, y)
    assert tasks_done(client) - before == expected_tasks
    assert got == pytest.approx(sync(x.sum())[0], rel=1e-12)
    ran = runs_by_worker(log)
    assert sum(ran.values()) == x.npartitions == 64
    workers = {w["name"] for w in client.scheduler_info()["workers"].values()}
    assert set(ran) == workers and len(workers) == 2


# ======================================================================================
# dask.dataframe


def test_dataframe_groupby_aggregate(client: Client, pdf: Any) -> None:
    ddf = dd.from_pandas(pdf, npartitions=8)
    got = ddf.groupby("k").agg({"a": "sum", "b": "max"}).compute(scheduler=client.get)
    want = pdf.groupby("k").agg({"a": "sum", "b": "max"})
    pd.testing.assert_frame_equal(got.sort_index(), want, check_exact=False)


def test_dataframe_merge(client: Client, pdf: Any) -> None:
    right = pd.DataFrame({"k": np.arange(0, 20, 2), "label": np.arange(10) * 10})
    ddf = dd.from_pandas(pdf, npartitions=6)
    got = ddf.merge(dd.from_pandas(right, npartitions=3), on="k").compute(
        scheduler=client.get
    )
    want = pdf.merge(right, on="k")
    cols = ["k", "a", "b", "label"]
    pd.testing.assert_frame_equal(
        got[cols].sort_values(cols).reset_index(drop=True),
        want[cols].sort_values(cols).reset_index(drop=True),
    )


def test_dataframe_set_index_shuffle(client: Client, pdf: Any) -> None:
    ddf = dd.from_pandas(pdf, npartitions=8)
    indexed = ddf.set_index("b")
    got = indexed.compute(scheduler=client.get)
    want = pdf.set_index("b")
    assert got.index.is_monotonic_increasing
    pd.testing.assert_frame_equal(
        got.reset_index().sort_values(["b", "a"]).reset_index(drop=True),
        want.reset_index().sort_values(["b", "a"]).reset_index(drop=True),
    )
    assert indexed.npartitions > 1


def test_dataframe_value_counts_and_rolling(client: Client, pdf: Any) -> None:
    ddf = dd.from_pandas(pdf, npartitions=8)
    counts, rolled = on_zdist(client, ddf.k.value_counts(), ddf.a.rolling(5).mean())
    pd.testing.assert_series_equal(
        counts.sort_index(), pdf.k.value_counts().sort_index()
    )
    pd.testing.assert_series_equal(rolled, pdf.a.rolling(5).mean())


# ======================================================================================
# dask.bag and dask.delayed


def test_bag_foldby_and_frequencies(client: Client) -> None:
    bag = db.from_sequence(range(1_000), npartitions=8).map(lambda i: (i * 7) % 13)
    folded = bag.foldby(lambda v: v % 3, operator.add, 0, operator.add, 0)
    got = on_zdist(client, folded, bag.frequencies())
    want = sync(folded, bag.frequencies())
    assert sorted(got[0]) == sorted(want[0])
    assert sorted(got[1]) == sorted(want[1])
    assert sum(c for _, c in got[1]) == 1_000


def test_delayed_diamond(client: Client) -> None:
    a = dask.delayed(tasks.inc)(1)
    b = dask.delayed(tasks.inc)(a)
    c = dask.delayed(tasks.double)(a)
    d = dask.delayed(tasks.add)(b, c)
    assert on_zdist(client, d) == (3 + 4,)
    assert client.compute(d).result() == 7


def test_delayed_5000_calls_one_task_each(client: Client) -> None:
    leaves = [dask.delayed(tasks.inc)(i) for i in range(5_000)]
    pairs = [
        dask.delayed(tasks.add)(a, b)
        for a, b in zip(leaves[::2], leaves[1::2], strict=True)
    ]
    total = dask.delayed(tasks.total)(pairs)
    expected_tasks = n_dask_tasks(total)
    assert expected_tasks >= 7_501
    before = tasks_done(client)
    assert on_zdist(client, total) == (sum(range(1, 5_001)),)
    assert tasks_done(client) - before == expected_tasks


def test_error_keeps_its_type(client: Client) -> None:
    bad = dask.delayed(operator.truediv)(1, 0)
    with pytest.raises(ZeroDivisionError):
        on_zdist(client, dask.delayed(tasks.inc)(bad))
    x = da.ones((100, 100), chunks=50)
    with pytest.raises(tasks.CustomError, match="custom failure"):
        on_zdist(client, x.map_blocks(tasks.raise_custom, dtype=x.dtype).sum())


# ======================================================================================
# compute, persist, executor, default scheduler


def test_compute_returns_futures(client: Client, x: Any) -> None:
    f = client.compute(x.sum())
    assert isinstance(f, Future)
    a, b, c = client.compute([x.mean(), dask.delayed(tasks.inc)(1), 5])
    assert isinstance(a, Future) and isinstance(b, Future) and c == 5
    assert f.result() == pytest.approx(sync(x.sum())[0], rel=1e-12)
    assert client.gather([a, b]) == [pytest.approx(sync(x.mean())[0], rel=1e-12), 2]
    assert client.compute([x.sum(), x.max()], sync=True) == list(sync(x.sum(), x.max()))


def test_persist_reuses_results(client: Client, tmp_path: Path) -> None:
    log = tmp_path / "ran"
    x = da.random.default_rng(13).random((1000, 1000), chunks=(250, 250))
    y = x.map_blocks(noting(log), dtype=x.dtype)
    persisted = client.persist(y)
    values = list(dict(persisted.__dask_graph__()).values())
    assert len(values) == 16 and all(isinstance(v, Future) for v in values)
    wait(values, timeout=60)
    assert sum(runs_by_worker(log).values()) == 16
    got = on_zdist(client, persisted.sum(), persisted.T @ persisted, persisted)
    want = sync(x.sum(), x.T @ x, x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10)
    assert sum(runs_by_worker(log).values()) == 16  # nothing ran twice
    # dask.persist with the client as default scheduler goes through Client.persist.
    (again,) = dask.persist(x + 1)
    assert all(isinstance(v, Future) for v in dict(again.__dask_graph__()).values())
    np.testing.assert_allclose(again.compute(), x.compute(scheduler="sync") + 1)


def test_persist_dataframe_and_list(client: Client, pdf: Any) -> None:
    ddf = dd.from_pandas(pdf, npartitions=4)
    p1, p2 = client.persist([ddf, ddf.a + 1])
    pd.testing.assert_frame_equal(p1.compute(), pdf)
    pd.testing.assert_series_equal(p2.compute(), pdf.a + 1)
    assert (
        p1.groupby("k").b.sum().compute().sort_index().equals(pdf.groupby("k").b.sum())
    )


def test_executor(client: Client) -> None:
    with client.get_executor() as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        f = ex.submit(tasks.add, 1, 2)
        big = ex.submit(tasks.make_bytes, 1 << 20)  # fetched from its worker
        assert isinstance(f, concurrent.futures.Future)
        assert f.result(timeout=30) == 3
        assert big.result(timeout=30) == b"x" * (1 << 20)
        assert list(ex.map(tasks.add, range(10), range(10), timeout=30)) == [
            2 * i for i in range(10)
        ]
        err = ex.submit(tasks.raise_custom, 1)
        with pytest.raises(tasks.CustomError):
            err.result(timeout=30)
        done, _ = concurrent.futures.wait([f, big, err], timeout=30)
        assert len(done) == 3
    with pytest.raises(RuntimeError):
        ex.submit(tasks.inc, 1)


def test_client_becomes_dask_default_scheduler(cluster: Any) -> None:
    before = dask.config.get("scheduler", None)
    with Client(cluster) as c1:
        assert dask.config.get("scheduler") == c1.get
        assert dask.config.get("dataframe.shuffle.method") == "tasks"
        start = tasks_done(c1)
        y = da.ones((100, 100), chunks=25).sum()
        assert y.compute() == 10_000  # the one-line switch: plain compute()
        assert tasks_done(c1) - start == n_dask_tasks(y)
        c2 = Client(cluster)
        c3 = Client(cluster)
        assert dask.config.get("scheduler") == c3.get
        c2.close()  # out of order: c3 stays the default
        assert dask.config.get("scheduler") == c3.get
        c3.close()  # skips the closed c2
        assert dask.config.get("scheduler") == c1.get
        with dask.config.set(scheduler="sync"):
            assert y.compute() == 10_000
            assert tasks_done(c1) - start == n_dask_tasks(y)
    assert dask.config.get("scheduler", None) == before
    with Client(cluster, set_as_default=False) as c4:
        assert dask.config.get("scheduler", None) == before
        with dask.config.set(scheduler=c4.get):
            assert da.ones(10, chunks=5).sum().compute() == 10

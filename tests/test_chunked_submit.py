"""A large map or graph is sent in chunks (zdist.client.submission.SUBMIT_CHUNK), so the
broker and workers start while the client pickles the rest. Real LocalCluster; the
chunk size is made tiny here so that every graph spans many chunks and early chunks
finish before later ones arrive."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import tasks
from utils import wait_for

from zdist import Client, LocalCluster
from zdist.client import submission

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def small_chunk_client() -> Iterator[Client]:
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        with Client(cluster) as c:
            yield c


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(submission, "SUBMIT_CHUNK", 7)


def _broker_tasks(c: Client) -> int:
    return sum(c.scheduler_info()["tasks"].values())


def _chain_graph(prefix: str, n: int) -> tuple[dict[str, Any], str]:
    """A chain plus side branches: every chunk depends on earlier chunks."""
    dsk: dict[str, Any] = {f"{prefix}-0": 1}
    for i in range(1, n):
        dsk[f"{prefix}-{i}"] = (tasks.add, f"{prefix}-{i - 1}", 1)
        dsk[f"{prefix}-side-{i}"] = (tasks.inc, f"{prefix}-{i - 1}")
    dsk[f"{prefix}-total"] = (tasks.total, [f"{prefix}-side-{i}" for i in range(1, n)])
    return dsk, f"{prefix}-total"


def test_graph_spanning_many_chunks_computes_and_leaves_nothing(
    small_chunk_client: Client,
) -> None:
    c = small_chunk_client
    dsk, root = _chain_graph("chain", 60)
    # side-i = i + 1 for i in 1..59
    assert c.get(dsk, root) == sum(i + 1 for i in range(1, 60))
    assert c.get(dsk, ["chain-59", root]) == [60, sum(i + 1 for i in range(1, 60))]
    # the pins of the early chunks were dropped: once the futures are gone, the
    # broker forgets everything
    wait_for(lambda: _broker_tasks(c) == 0, what="broker holds no tasks")


def test_a_key_held_by_a_future_stays_wanted_after_a_chunked_graph_uses_it(
    small_chunk_client: Client,
) -> None:
    c = small_chunk_client
    held = c.submit(tasks.inc, 41, key="held-key")
    assert held.result() == 42
    dsk, root = _chain_graph("uses-held", 30)
    dsk["held-key"] = (tasks.inc, 41)  # the same key, inside the graph
    dsk["uses-held-0"] = (tasks.identity, "held-key")
    assert c.get(dsk, root) == sum(i + 42 for i in range(1, 30))
    wait_for(lambda: _broker_tasks(c) == 1, what="only the held key remains")
    assert held.result() == 42
    assert c.gather(held) == 42
    del held
    wait_for(lambda: _broker_tasks(c) == 0, what="broker holds no tasks")


class _PickledOnceEarlierChunksRan:
    """Pickles as 5, but only after the broker has finished ``n`` more tasks: the
    chunks before it then ran to completion before the chunks after it arrive."""

    def __init__(self, c: Client, n: int) -> None:
        self.c = c
        self.target = c.scheduler_info()["counters"]["tasks_done"] + n

    def __reduce__(self) -> Any:
        wait_for(
            lambda: self.c.scheduler_info()["counters"]["tasks_done"] >= self.target,
            what="the early chunks finished",
        )
        return (int, (5,))


def test_early_chunks_that_finish_before_the_rest_arrives_are_kept(
    small_chunk_client: Client,
) -> None:
    c = small_chunk_client
    dsk, root = _chain_graph("early", 40)
    # key order is chain-i, side-i, ...: "early-20" is in the 6th chunk of 7
    dsk["early-20"] = (tasks.add, "early-19", _PickledOnceEarlierChunksRan(c, 30))
    # early-i = i + 1 up to early-19, then early-20 = 25 and early-i = i + 5;
    # early-side-i = early-(i-1) + 1
    side = [i + 1 for i in range(1, 21)] + [i + 5 for i in range(21, 40)]
    assert c.get(dsk, root) == sum(side)
    wait_for(lambda: _broker_tasks(c) == 0, what="broker holds no tasks")


def test_a_result_used_in_every_chunk_is_computed_once(
    small_chunk_client: Client,
) -> None:
    c = small_chunk_client
    dsk: dict[str, Any] = {"src": (tasks.inc, 9)}
    for i in range(60):
        dsk[f"use-{i}"] = (tasks.add, "src", i)
    dsk["all"] = (tasks.total, [f"use-{i}" for i in range(60)])
    before = c.scheduler_info()["counters"]["tasks_done"]
    assert c.get(dsk, "all") == sum(10 + i for i in range(60))
    # src stayed pinned until its last dependent was sent: nothing ran twice
    assert c.scheduler_info()["counters"]["tasks_done"] - before == len(dsk)
    wait_for(lambda: _broker_tasks(c) == 0, what="broker holds no tasks")


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


def test_a_task_that_cannot_be_pickled_mid_graph_unpins_what_was_sent(
    small_chunk_client: Client,
) -> None:
    c = small_chunk_client
    dsk, root = _chain_graph("broken", 40)
    dsk["broken-35"] = (tasks.identity, _Unpicklable())  # in a late chunk
    with pytest.raises(TypeError, match="cannot serialize task"):
        c.get(dsk, root)
    wait_for(lambda: _broker_tasks(c) == 0, what="early chunks released")
    assert c.submit(tasks.inc, 1).result() == 2  # the client still works


def test_map_spanning_many_chunks_returns_every_result_in_order(
    small_chunk_client: Client,
) -> None:
    c = small_chunk_client
    futures = c.map(tasks.inc, range(100))
    assert c.gather(futures) == list(range(1, 101))
    assert len({f.key for f in futures}) == 100
    del futures
    wait_for(lambda: _broker_tasks(c) == 0, what="broker holds no tasks")


# --------------------------------------------------------------------------------------
# the order a plain graph is sent in (pure, no cluster)


def test_plain_graphs_go_depth_first_with_each_subtree_whole() -> None:
    from zdist.graphspec import toposort

    deps = {
        "a": set(),
        "b": set(),
        "c": set(),
        "d": set(),
        "ab": {"a", "b"},
        "cd": {"c", "d"},
        "all": {"ab", "cd"},
    }
    assert toposort(deps) == ["a", "b", "ab", "c", "d", "cd", "all"]
    # a chain far deeper than the recursion limit, and unrelated outputs in key order
    chain = {f"k{i}": {f"k{i - 1}"} if i else set() for i in range(50_000)}
    chain["other"] = set()
    order = toposort(chain)
    assert order == [f"k{i}" for i in range(50_000)] + ["other"]


def test_a_cycle_is_reported_even_with_no_output_to_start_from() -> None:
    from zdist.errors import GraphError
    from zdist.graphspec import toposort

    with pytest.raises(GraphError, match="cycle"):
        toposort({"a": {"b"}, "b": {"a"}})
    with pytest.raises(GraphError, match="cycle"):
        toposort({"x": set(), "a": {"c", "x"}, "b": {"a"}, "c": {"b"}, "out": {"x"}})

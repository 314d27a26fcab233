"""dask collections on zdist: dask's graphs as zdist tasks, and dask's executor hooks.

Only imported once dask is (dask is an optional extra), and it imports dask only
inside its functions, so that ``Client.get_executor`` works without dask.

A graph from a dask collection (a dask expression, a HighLevelGraph, or a dict of
dask's task-spec nodes) is read the way dask.distributed's scheduler reads it:
``__dask_graph__()``, then ``convert_legacy_graph`` turns every entry into a
``GraphNode``, culled to the wanted keys and ordered by ``dask.order``. Each node
becomes one zdist task running ``graphspec.run_node(node, {dependency: KeyRef})``:
the worker resolves the references to the dependencies' results (fetched from the
worker that holds them) and calls the node, which is how dask executes one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from zdist import graphspec
from zdist.errors import GraphError
from zdist.serialize import KeyRef

if TYPE_CHECKING:
    from zdist.client.client import Client
    from zdist.client.future import Future

Task = tuple[Hashable, Callable[..., Any], tuple[Any, ...]]


# ======================================================================================
# graphs


def register_futures() -> None:
    """Teach dask to tokenize zdist Futures by their key (idempotent): collections
    rebuilt on futures (``persist``), or built with futures as arguments, get
    deterministic names, as dask.distributed's futures do."""
    from dask.tokenize import normalize_token

    from zdist.client.future import Future

    normalize_token.register(Future, _normalize_future)


def _normalize_future(future: Future) -> tuple[str, str]:
    return ("zdist.Future", future.key)


def graph_tasks(dsk: Any, wanted: list[Hashable]) -> list[Task]:
    """``[(key, graphspec.run_node, (node, values))]`` for every node of ``dsk`` that
    ``wanted`` needs, dependencies first and otherwise in ``dask.order``'s order."""
    import dask.order

    nodes = _culled_nodes(_materialize(dsk), wanted)
    try:
        rank: dict[Any, int] = dask.order.order(nodes)
    except RuntimeError as exc:
        if "Cycle detected" not in str(exc):
            raise
        raise GraphError(f"the graph has a cycle: {exc}") from exc
    keys = _dependencies_first(nodes, sorted(nodes, key=rank.__getitem__), rank)
    out: list[Task] = []
    for k in keys:
        node = nodes[k]
        values = {d: KeyRef(graphspec.stringify(d)) for d in node.dependencies}
        out.append((k, graphspec.run_node, (node, values)))
    return out


def _materialize(dsk: Any) -> dict[Hashable, Any]:
    """``{key: GraphNode}`` from whatever dask hands a scheduler."""
    from dask._task_spec import convert_legacy_graph

    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()  # a dask expression (dask.compute's argument)
    if type(dsk) is not dict:
        dsk = dict(dsk)  # a HighLevelGraph
    return convert_legacy_graph(dsk)


def _culled_nodes(graph: dict[Hashable, Any], wanted: list[Hashable]) -> dict:
    """The nodes that ``wanted`` needs; entries that hold a future of their own key (a
    persisted collection's graph) are left out: the cluster holds them already."""
    from dask._task_spec import DataNode

    nodes: dict[Hashable, Any] = {}
    todo = [k for k in wanted if k in graph]
    seen: set[Hashable] = set()
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        node = graph[k]
        if isinstance(node, DataNode) and graphspec.is_held(k, node.value):
            continue
        nodes[k] = node
        todo.extend(d for d in node.dependencies if d in graph and d not in seen)
    return nodes


def _dependencies_first(
    nodes: dict[Hashable, Any], keys: list[Hashable], rank: dict[Hashable, int]
) -> list[Hashable]:
    """``keys`` (sorted by rank) if every node comes after its dependencies, which
    dask.order's result does; otherwise the dependencies-first order nearest to it."""
    placed: set[Hashable] = set()
    for k in keys:
        if any(d in nodes and d not in placed for d in nodes[k].dependencies):
            break
        placed.add(k)
    else:
        return keys
    waiting = {k: sum(1 for d in nodes[k].dependencies if d in nodes) for k in nodes}
    dependents: dict[Hashable, list[Hashable]] = {}
    for k in nodes:
        for d in nodes[k].dependencies:
            if d in nodes:
                dependents.setdefault(d, []).append(k)
    heap = [(rank[k], i, k) for i, k in enumerate(keys) if not waiting[k]]
    heapq.heapify(heap)
    position = {k: i for i, k in enumerate(keys)}
    out = []
    while heap:
        _, _, k = heapq.heappop(heap)
        out.append(k)
        for dk in dependents.get(k, ()):
            waiting[dk] -= 1
            if not waiting[dk]:
                heapq.heappush(heap, (rank[dk], position[dk], dk))
    if len(out) < len(nodes):
        stuck = [k for k, n in waiting.items() if n][:5]
        raise GraphError(f"the graph has a cycle among {stuck!r}")
    return out


# ======================================================================================
# compute / persist


def compute(
    client: Client,
    collections: Any,
    *,
    sync: bool,
    optimize_graph: bool,
    traverse: bool,
    submit: Callable[[Any, list[Hashable]], dict[Hashable, Future]],
) -> Any:
    """dask.distributed's ``Client.compute``: one Future per collection (other
    arguments pass through), one graph for all of them."""
    import dask
    from dask._expr import FinalizeCompute
    from dask.base import collections_to_expr
    from dask.core import flatten

    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    if traverse:
        # A container of collections computes as one delayed value.
        items = [
            dask.delayed(a) if isinstance(a, (list, set, tuple, dict, Iterator)) else a
            for a in items
        ]
    variables = [a for a in items if dask.is_dask_collection(a)]
    by_name: dict[Hashable, Future] = {}
    names: list[Hashable] = []
    if variables:
        expr = FinalizeCompute(
            collections_to_expr(variables, optimize_graph)
        ).optimize()
        names = list(flatten(expr.__dask_keys__()))
        by_name = submit(expr, names)
    it = iter(names)
    results = [by_name[next(it)] if dask.is_dask_collection(a) else a for a in items]
    if sync:
        results = client.gather(results)
    return results[0] if singleton else results


def persist(
    collections: Any,
    *,
    optimize_graph: bool,
    submit: Callable[[Any, list[Hashable]], dict[Hashable, Future]],
) -> Any:
    """dask.distributed's ``Client.persist``: the same collections, rebuilt on a graph
    ``{key: Future}``; computing them later reuses those results (``Client.get``
    recognises entries that hold their own key)."""
    import dask
    from dask.base import collections_to_expr
    from dask.core import flatten

    register_futures()
    singleton = not isinstance(collections, (list, tuple, set, frozenset))
    items = [collections] if singleton else list(collections)
    if not all(dask.is_dask_collection(c) for c in items):
        raise TypeError("persist takes dask collections")
    # A list of collections gives one list of keys per collection.
    expr = collections_to_expr(items, optimize_graph).optimize()
    keys = expr.__dask_keys__()
    futures = submit(expr, list(flatten(keys)))
    out = []
    for c, ks in zip(items, keys, strict=True):
        rebuild, args = c.__dask_postpersist__()
        out.append(rebuild({k: futures[k] for k in flatten(ks)}, *args))
    return out[0] if singleton else out


# ======================================================================================
# the default scheduler


def become_default(client: Client) -> tuple[Any, Any]:
    """Make ``client.get`` dask's scheduler, as dask.distributed's Client does; returns
    what :func:`restore_default` needs. Shuffles default to dask's "tasks" method:
    "disk" (dask's default without dask.distributed) writes to the client machine's
    disk, which the workers of a cluster do not share; "p2p" needs dask.distributed."""
    import dask

    register_futures()
    before = (
        dask.config.get("scheduler", None),
        dask.config.get("dataframe.shuffle.method", None),
    )
    new: dict[str, Any] = {"scheduler": client.get}
    if before[1] is None:
        new["dataframe.shuffle.method"] = "tasks"
    dask.config.set(new)
    return before


def restore_default(client: Client, before: tuple[Any, Any]) -> None:
    """Undo :func:`become_default` unless another scheduler was set since."""
    import dask

    if dask.config.get("scheduler", None) != client.get:
        return
    scheduler, shuffle = before
    # Skip clients closed in the meantime (closed out of order).
    while _closed_zdist_get(scheduler):
        scheduler, shuffle = scheduler.__self__._dask_default
    restore: dict[str, Any] = {"scheduler": scheduler}
    # The shuffle method goes back only if it is still the one set here.
    if shuffle is None and dask.config.get("dataframe.shuffle.method", None) == "tasks":
        restore["dataframe.shuffle.method"] = None
    dask.config.set(restore)


def _closed_zdist_get(scheduler: Any) -> bool:
    from zdist.client.client import Client

    owner = getattr(scheduler, "__self__", None)
    return (
        isinstance(owner, Client)
        and owner.status == "closed"
        and getattr(owner, "_dask_default", None) is not None
    )


# ======================================================================================
# concurrent.futures


class ClientExecutor(concurrent.futures.Executor):
    """A :class:`concurrent.futures.Executor` whose calls run as zdist tasks
    (dask.distributed's ``Client.get_executor``). ``**kwargs`` go to every
    ``Client.submit`` (``workers=``, ``resources=``, ``retries=``, ``pure=``...)."""

    def __init__(self, client: Client, **kwargs: Any) -> None:
        self._client = client
        self._kwargs = {"pure": False, **kwargs}
        self._lock = threading.Lock()
        self._pending: dict[concurrent.futures.Future, Future] = {}
        self._settle_queue: collections.deque[Any] = collections.deque()
        self._settling = False
        self._shutdown = False

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        zf = self._client.submit(fn, *args, **self._kwargs, **kwargs)
        return self._wrap(zf)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        # One Submit message for all calls (Client.map), not one per call.
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        zfs = self._client.map(fn, *iterables, **self._kwargs)
        cfs = [self._wrap(zf) for zf in zfs]

        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            for cf in cfs:
                left = None if deadline is None else deadline - time.monotonic()
                yield cf.result(left)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = dict(self._pending)
        if cancel_futures:
            for cf, zf in pending.items():
                if cf.cancel():
                    zf.cancel()
        if wait:
            concurrent.futures.wait(list(pending))

    def _wrap(self, zf: Future) -> concurrent.futures.Future:
        cf: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending[cf] = zf  # keeps the result alive on the cluster until read
        zf.add_done_callback(lambda _: self._enqueue(cf, zf))
        return cf

    def _enqueue(self, cf: concurrent.futures.Future, zf: Future) -> None:
        # Runs on the client's I/O thread, which must not wait: reading a large result
        # asks a worker for it through that very thread. A short-lived thread settles.
        with self._lock:
            self._settle_queue.append((cf, zf))
            if self._settling:
                return
            self._settling = True
        threading.Thread(target=self._settle, daemon=True).start()

    def _settle(self) -> None:
        while True:
            with self._lock:
                if not self._settle_queue:
                    self._settling = False
                    return
                cf, zf = self._settle_queue.popleft()
            if cf.set_running_or_notify_cancel():
                try:
                    cf.set_result(zf.result())
                except BaseException as exc:
                    cf.set_exception(exc)
            with self._lock:
                self._pending.pop(cf, None)

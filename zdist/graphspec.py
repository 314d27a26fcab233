"""dask graphs, converted by the client and evaluated on workers.

Two forms arrive at ``Client.get``:

* dask's plain format, ``{key: task}`` where a task is ``(callable, *args)``; an
  argument that is a key of the graph (or of a known future) refers to that result,
  lists are walked, and nested tasks are evaluated. The client turns each task into a
  call of :func:`run` on a tree of :class:`Call` nodes and
  :class:`~zdist.serialize.KeyRef` references, so that workers evaluate exactly what
  was a task and never mistake a tuple *result* for one. This path never imports dask.
* graphs of dask collections (dask expressions, HighLevelGraphs, dask's task-spec
  nodes). ``zdist.client.dask_support`` reads them with dask's own helpers and each
  node becomes a call of :func:`run_node`.

Either way one graph key is one zdist task, named by :func:`stringify`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

from zdist.errors import GraphError
from zdist.serialize import KeyRef


class Call:
    __slots__ = ("args", "func")

    def __init__(self, func: Callable[..., Any], args: list[Any]) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (Call, (self.func, self.args))


class ListOf:
    """A list argument that holds references or nested tasks (evaluated in place)."""

    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __reduce__(self) -> tuple[Any, ...]:
        return (ListOf, (self.items,))


def evaluate(expr: Any) -> Any:
    if type(expr) is Call:
        return expr.func(*[evaluate(a) for a in expr.args])
    if type(expr) is ListOf:
        return [evaluate(a) for a in expr.items]
    return expr


def run(func: Callable[..., Any], args: list[Any]) -> Any:
    """What a graph task runs on the worker: ``func`` on its evaluated arguments."""
    return func(*[evaluate(a) for a in args])


def run_node(node: Any, values: dict[Hashable, Any]) -> Any:
    """What a dask task-spec node runs on the worker: ``node(values)``, where
    ``values`` maps each of its dependencies' keys to their results (dask's own way of
    executing a node, as in ``dask._task_spec.execute_graph``)."""
    return node(values)


def identity(x: Any) -> Any:
    return x


def from_dask(dsk: Any) -> bool:
    """Whether ``dsk`` needs dask to be read: a dask expression or HighLevelGraph, or a
    dict holding dask task-spec nodes. False whenever dask is not imported: a graph
    that came from dask means dask is loaded, and a plain dict must not load it."""
    if "dask" not in sys.modules:
        return False
    if type(dsk) is not dict:
        return True
    spec = sys.modules.get("dask._task_spec")
    if spec is None:
        return False
    node_type = spec.GraphNode
    return any(isinstance(v, node_type) for v in dsk.values())


def is_held(key: Hashable, value: Any) -> bool:
    """A graph entry ``{key: future}`` whose future *is* that key (a persisted
    collection's graph): nothing to compute, the cluster already holds it."""
    # Asked of the type: instances may answer any attribute (a DataFrame's columns).
    if not hasattr(type(value), "__zdist_key__"):
        return False
    return value.__zdist_key__ == stringify(key)


def stringify(key: Hashable) -> str:
    """The wire name of a dask key: strings stay, tuple keys become their repr."""
    return key if type(key) is str else repr(key)


def is_task(x: Any) -> bool:
    return type(x) is tuple and bool(x) and callable(x[0])


def convert_task(
    task: Any, is_key: Callable[[Any], bool], deps: set[Hashable]
) -> tuple[Callable[..., Any], list[Any]]:
    """``(func, [converted args])`` for one graph value; ``deps`` collects keys used."""
    if is_task(task):
        return task[0], [_convert(a, is_key, deps) for a in task[1:]]
    return identity, [_convert(task, is_key, deps)]


def _convert(arg: Any, is_key: Callable[[Any], bool], deps: set[Hashable]) -> Any:
    typ = type(arg)
    if typ is str or typ is tuple:
        if is_key(arg):
            deps.add(arg)
            return KeyRef(stringify(arg))
        if typ is tuple and is_task(arg):
            return Call(arg[0], [_convert(a, is_key, deps) for a in arg[1:]])
        return arg
    if typ is list:
        items = [_convert(a, is_key, deps) for a in arg]
        if any(type(i) in (Call, ListOf, KeyRef) for i in items):
            return ListOf(items)
        return items
    if typ is dict:
        return arg
    try:
        if is_key(arg):
            deps.add(arg)
            return KeyRef(stringify(arg))
    except TypeError:  # unhashable
        pass
    return arg


def convert_graph(
    dsk: Mapping[Hashable, Any], wanted: list[Hashable]
) -> tuple[dict[Hashable, tuple[Callable[..., Any], list[Any]]], dict[Hashable, set]]:
    """Convert the part of a plain graph that ``wanted`` needs (dask culls the same
    way): ``({key: (func, args)}, {key: dependency keys})``. Entries that name a future
    of their own key are left out: they are already computed."""

    def is_key(x: Any) -> bool:
        # Inside dask graphs, a plain string that is not a key is a literal.
        try:
            return x in dsk
        except TypeError:
            return False

    converted: dict[Hashable, tuple[Callable[..., Any], list[Any]]] = {}
    deps_of: dict[Hashable, set[Hashable]] = {}
    used: set[Hashable] = set()
    for k, task in dsk.items():
        if type(task) is not tuple and is_held(k, task):
            continue
        deps: set[Hashable] = set()
        converted[k] = convert_task(task, is_key, deps)
        deps_of[k] = deps
        used.update(deps)
    # Converting everything, then culling only if some task feeds nothing wanted, is
    # the fast path for the usual graph where everything is needed.
    wanted_set = set(wanted)
    if any(k not in used and k not in wanted_set for k in converted):
        needed: set[Hashable] = set()
        todo = [k for k in wanted_set if k in converted]
        while todo:
            k = todo.pop()
            if k not in needed:
                needed.add(k)
                todo.extend(d for d in deps_of[k] if d in converted)
        converted = {k: v for k, v in converted.items() if k in needed}
        deps_of = {k: v for k, v in deps_of.items() if k in needed}
    return converted, deps_of


def flatten_keys(keys: Any) -> list[Any]:
    """Every key in a (nested list of) key(s)."""
    if isinstance(keys, list):
        return [k for sub in keys for k in flatten_keys(sub)]
    return [keys]


def pack_results(keys: Any, values: Mapping[Any, Any]) -> Any:
    if isinstance(keys, list):
        return [pack_results(k, values) for k in keys]
    return values[keys]


def toposort(deps_of: dict[Hashable, set[Hashable]]) -> list[Hashable]:
    """Dependencies first, depth first from the graph's outputs (each subtree whole,
    as dask.order keeps it): the broker runs ready tasks in this order, so a
    reduction runs as soon as its inputs exist and their results can be freed, and a
    chunked submission rarely leaves a task's dependent for a later chunk. Children
    are visited in the graph's own key order; raises GraphError on a cycle."""
    index = {k: i for i, k in enumerate(deps_of)}

    def children(k: Hashable) -> Iterator[Hashable]:
        return iter(
            sorted((d for d in deps_of[k] if d in index), key=index.__getitem__)
        )

    has_dependent = {d for deps in deps_of.values() for d in deps}
    roots = [k for k in deps_of if k not in has_dependent]
    order: list[Hashable] = []
    on_path: set[Hashable] = set()
    done: set[Hashable] = set()
    for root in [*roots, *deps_of]:  # the rest only matters for a cycle
        if root in done:
            continue
        stack = [(root, children(root))]
        on_path.add(root)
        while stack:
            k, todo = stack[-1]
            for d in todo:
                if d in done:
                    continue
                if d in on_path:
                    cycle = [x for x, _ in stack]
                    cycle = cycle[cycle.index(d) :]
                    raise GraphError(f"the graph has a cycle among {cycle[:5]!r}")
                on_path.add(d)
                stack.append((d, children(d)))
                break
            else:
                stack.pop()
                on_path.discard(k)
                done.add(k)
                order.append(k)
    return order

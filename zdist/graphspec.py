"""dask's plain graph format, converted by the client and evaluated on workers.

A graph is ``{key: task}`` where a task is ``(callable, *args)``; an argument that is a
key of the graph (or of a known future) refers to that result, lists are walked, and
nested tasks are evaluated. The client turns each task into a call of :func:`run` on a
tree of :class:`Call` nodes and :class:`~zdist.serialize.KeyRef` references, so that
workers evaluate exactly what was a task and never mistake a tuple *result* for one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

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


def identity(x: Any) -> Any:
    return x


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


def flatten_keys(keys: Any) -> list[Any]:
    """Every key in a (nested list of) key(s)."""
    if isinstance(keys, list):
        return [k for sub in keys for k in flatten_keys(sub)]
    return [keys]


def pack_results(keys: Any, values: Mapping[Any, Any]) -> Any:
    if isinstance(keys, list):
        return [pack_results(k, values) for k in keys]
    return values[keys]

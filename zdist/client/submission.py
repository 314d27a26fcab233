"""Turning the Client's calls into Submit messages: task keys, argument frames, and
large maps and graphs sent in chunks of SUBMIT_CHUNK tasks."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from zdist import graphspec, serialize
from zdist import protocol as P
from zdist.client.future import Future
from zdist.errors import GraphError

if TYPE_CHECKING:
    from zdist.client.client import Client

#: Pickled functions kept per client, so a loop of submit(f, i) pickles f once.
_FUNCTION_CACHE_SIZE = 256
#: Tasks per Submit message of a large map or graph: the broker and workers start on
#: the first chunk while the client pickles the rest.
SUBMIT_CHUNK = 1000


def dumps_function(client: Client, func: Callable[..., Any]) -> bytes:
    try:
        cached = client._fn_cache.get(func)
    except TypeError:  # unhashable callable
        cached = None
    if cached is not None:
        return cached
    try:
        data = serialize.dumps_function(func)
    except Exception as exc:
        raise TypeError(f"cannot serialize function {func!r}: {exc}") from exc
    try:
        if len(client._fn_cache) >= _FUNCTION_CACHE_SIZE:
            client._fn_cache.clear()
        client._fn_cache[func] = data
    except TypeError:
        pass
    return data


def submit_call(
    client: Client,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    key: str | None,
    workers: Any,
    resources: dict[str, float] | None,
    retries: int | None,
    priority: int,
    allow_other_workers: bool,
    pure: bool,
) -> Future:
    """The task of ``Client.submit``: one Submit message."""
    fn = dumps_function(client, func)
    frames, deps = _dumps_args(func, (args, kwargs))
    explicit_key = key is not None
    if key is None:
        key = (
            _make_key(func, fn, frames)
            if pure
            else f"{_funcname(func)}-{uuid.uuid4().hex}"
        )
    with client._lock:
        existing = client._futures.get(key)
        if existing is not None:
            return Future(key, client, existing)
        future = Future(key, client)
    fl = P.FrameList()
    entry = P.submit_entry(
        key,
        # One task: a small function travels in the header (one frame fewer to
        # send and receive); a map's tasks share one function frame instead.
        fl.add([fn]),
        fl.add(frames),
        deps,
        priority,
        retries or 0,
        resources,
        _worker_list(workers),
        allow_other_workers,
    )
    via = None
    conn = client._conn
    door = conn.door
    if (
        door is not None
        and not explicit_key
        and not deps
        and not resources
        and entry[7] is None
        and not retries
        and not priority
        and _door_free(client)
        and sum(len(f) for f in frames) + len(fn) <= P.INLINE_LIMIT
    ):
        # A lone task with nothing to wait for: straight to the idle worker that
        # last sent us a result (it refuses if busy), and the broker told (via).
        run = conn.next_door_run()
        msg = P.RunTasks(
            [[key, entry[1], entry[2], [], None]],
            None,
            [[conn.sock.identity, conn.direct, [[key, run]]]],
        )
        if conn.send_door(door[0], P.encode(msg, fl.frames)):
            via = [[key, door[1], run]]
            client._door_key = key
    conn.send(P.Submit([entry], [key], None, via), fl.frames)
    return future


def _door_free(client: Client) -> bool:
    """No task of this client's is in flight through a door (one at a time: a loop
    of submits without waiting goes by the broker, which spreads it)."""
    key = client._door_key
    if key is None:
        return True
    st = client._futures.get(key)
    return st is None or st.done


def submit_map(
    client: Client,
    func: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    kwargs: dict[str, Any],
    *,
    key: str | list[str] | None,
    workers: Any,
    retries: int | None,
    resources: dict[str, float] | None,
    priority: int,
    allow_other_workers: bool,
    pure: bool,
) -> list[Future]:
    """The tasks of ``Client.map``, sent in chunks of SUBMIT_CHUNK."""
    fn = dumps_function(client, func)
    arg_lists = list(zip(*iterables, strict=False))
    fl = P.FrameList()
    fn_ref = fl.add([fn], inline=False)
    entries: list[list[Any]] = []
    futures = []
    wants: list[str] = []
    name = _funcname(func)
    wl = _worker_list(workers)
    with client._lock:
        for i, args in enumerate(arg_lists):
            if len(entries) >= SUBMIT_CHUNK:
                # The broker starts on these while the rest is being pickled.
                client._conn.send(P.Submit(entries, wants), fl.frames)
                fl = P.FrameList()
                fn_ref = fl.add([fn], inline=False)
                entries, wants = [], []
            frames, deps = _dumps_args(func, (args, kwargs))
            if isinstance(key, list):
                k = key[i]
            elif isinstance(key, str):
                k = f"{key}-{i}" if not pure else f"{key}-{_digest(fn, frames)}"
            elif pure:
                k = f"{name}-{_digest(fn, frames)}"
            else:
                k = f"{name}-{uuid.uuid4().hex}"
            existing = client._futures.get(k)
            futures.append(Future(k, client, existing))
            if existing is None:
                entries.append(
                    P.submit_entry(
                        k,
                        fn_ref,
                        fl.add(frames),
                        deps,
                        priority,
                        retries or 0,
                        resources,
                        wl,
                        allow_other_workers,
                    )
                )
                wants.append(k)
    if entries:
        client._conn.send(P.Submit(entries, wants), fl.frames)
    return futures


def submit_data(
    client: Client, items: list[tuple[Any, Any]], workers: Any, hash: bool
) -> list[Future]:
    """The data of ``Client.scatter`` (``(key or None, value)`` pairs), sent as one
    Submit message of tasks with no function; a Future per value."""
    fl = P.FrameList()
    entries, keys = [], []
    wl = _worker_list(workers)
    for k, value in items:
        frames = serialize.dumps(value)
        if k is None:
            k = (
                f"{type(value).__name__}-{_digest(b'', frames)}"
                if hash
                else f"{type(value).__name__}-{uuid.uuid4().hex}"
            )
        keys.append(str(k))
        entries.append(P.submit_entry(str(k), None, fl.add(frames), [], workers=wl))
    with client._lock:
        futures = [Future(k, client) for k in keys]
    client._conn.send(P.Submit(entries, keys), fl.frames)
    return futures


def submit_graph(
    client: Client,
    dsk: Any,
    keys: Any,
    resources: Any,
    retries: int | None,
    priority: int,
    workers: Any,
) -> dict[Hashable, Future]:
    """Send the culled graph ``dsk`` for ``keys``; a Future per wanted key."""
    wanted = graphspec.flatten_keys(keys)
    # (key, function, arguments), dependencies before dependents. The broker runs
    # ready tasks in this order (after higher ``priority``, and after earlier
    # graphs), so for dask collections it is dask.order's.
    tasks: list[tuple[Hashable, Callable[..., Any], Any]]
    deps_of: Mapping[Hashable, Iterable[Hashable]]
    if graphspec.from_dask(dsk):
        from zdist.client import dask_support

        tasks = dask_support.graph_tasks(dsk, wanted)
        # graph_tasks' arguments are (node, {dependency: KeyRef})
        deps_of = {k: args[1] for k, _, args in tasks}
    else:
        converted, deps_of = graphspec.convert_graph(dsk, wanted)
        order = graphspec.toposort(deps_of)  # raises GraphError on a cycle
        tasks = [(k, graphspec.run, converted[k]) for k in order]
    defined = {k for k, _, _ in tasks}
    with client._lock:
        missing = [
            k
            for k in wanted
            if k not in defined and graphspec.stringify(k) not in client._futures
        ]
    if missing:
        raise GraphError(
            f"requested key(s) {missing[:5]!r} are not in the graph and not held "
            f"by this client"
        )
    futures: dict[Hashable, Future] = {}
    with client._lock:
        for k in wanted:
            futures[k] = Future(graphspec.stringify(k), client)
    wanted_keys = [graphspec.stringify(k) for k in futures]
    send_graph(
        client, tasks, deps_of, wanted_keys, workers, resources, retries, priority
    )
    return futures


def send_graph(
    client: Client,
    tasks: list[tuple[Hashable, Callable[..., Any], Any]],
    deps_of: Mapping[Hashable, Iterable[Hashable]],
    wanted_keys: list[str],
    workers: Any,
    resources: Any,
    retries: int | None,
    priority: int,
) -> None:
    """Pickle and send ``tasks`` (dependencies first). A large graph goes in
    chunks of SUBMIT_CHUNK, so the broker and workers start while the rest is
    pickled. A task with a dependent in a later chunk is wanted by this client
    until that chunk is sent (else, finished and wanted by nobody, it would be
    forgotten before its dependent arrives); then that pin is dropped."""
    stringify = graphspec.stringify
    chunk = SUBMIT_CHUNK
    last_chunk: dict[str, int] = {}  # key -> chunk of its last dependent
    if len(tasks) > chunk:
        for i, (k, _, _) in enumerate(tasks):
            for d in deps_of.get(k, ()):
                last_chunk[stringify(d)] = i // chunk
    wanted = set(wanted_keys)
    unpin_after: dict[int, list[str]] = {}  # chunk -> pins it makes needless
    fl = P.FrameList()
    fn_refs: dict[Any, Any] = {}
    entries: list[list[Any]] = []
    wl = _worker_list(workers)
    n_chunk = 0
    try:
        for k, func, args in tasks:
            if len(entries) >= chunk:
                pins = []
                for e in entries:
                    later = last_chunk.get(e[0], -1)
                    if later > n_chunk or e[0] in wanted:
                        pins.append(e[0])
                        if e[0] not in wanted:
                            unpin_after.setdefault(later, []).append(e[0])
                client._conn.send(P.Submit(entries, pins), fl.frames)
                unpin(client, unpin_after.pop(n_chunk, []))
                fl, fn_refs, entries = P.FrameList(), {}, []
                n_chunk += 1
            fn_ref = fn_refs.get(func)
            if fn_ref is None:
                fn_ref = fn_refs[func] = fl.add(
                    [dumps_function(client, func)], inline=False
                )
            try:
                frames, deps = serialize.dumps_args((args, {}))
            except Exception as exc:
                raise TypeError(f"cannot serialize task {k!r}: {exc}") from exc
            entries.append(
                P.submit_entry(
                    stringify(k),
                    fn_ref,
                    fl.add(frames),
                    deps,
                    priority,
                    retries or 0,
                    resources,
                    wl,
                )
            )
    except BaseException:
        # what was sent must not stay pinned by this client
        unpin(client, [k for keys in unpin_after.values() for k in keys])
        raise
    client._conn.send(P.Submit(entries, wanted_keys), fl.frames)
    unpin(client, [k for keys in unpin_after.values() for k in keys])


def unpin(client: Client, keys: list[str]) -> None:
    """Drop this client's want of ``keys``, but of none it holds futures of."""
    if keys:
        with client._lock:
            drop = [k for k in keys if k not in client._futures]
        client._conn.send(P.ReleaseKeys(drop))


def _funcname(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return "lambda" if name == "<lambda>" else name


def _digest(fn: bytes, frames: list[Any]) -> str:
    h = hashlib.md5(fn, usedforsecurity=False)
    for f in frames:
        h.update(f)
    return h.hexdigest()


def _make_key(func: Any, fn: bytes, frames: list[Any]) -> str:
    return f"{_funcname(func)}-{_digest(fn, frames)}"


def _dumps_args(func: Any, args: Any) -> tuple[list[Any], list[str]]:
    try:
        return serialize.dumps_args(args)
    except Exception as exc:
        raise TypeError(
            f"cannot serialize the arguments of {_funcname(func)}: {exc}"
        ) from exc


def _worker_list(workers: Any) -> list[str] | None:
    if workers is None:
        return None
    if isinstance(workers, str):
        return [workers]
    return [str(w) for w in workers]

"""Client: dask.distributed's Client API on a zdist broker."""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from zdist import graphspec, serialize
from zdist import protocol as P
from zdist._version import mismatches, versions
from zdist.client import submission
from zdist.client.comm import Connection
from zdist.client.future import Future, FutureState
from zdist.client.on_worker import _count, _install_file, _worker_logs
from zdist.client.results import _flatten_futures, fetch_values, gather_results
from zdist.client.submission import _worker_list
from zdist.errors import CommClosedError, SecurityError
from zdist.net import split_address
from zdist.security import Security, wait_for_scheduler_file

logger = logging.getLogger(__name__)

_default_client: Client | None = None
_default_lock = threading.Lock()
#: Pending releases that wake the I/O thread at once instead of waiting for its turn.
RELEASE_BATCH = 10_000


def default_client() -> Client | None:
    return _default_client


class Client:
    """Connect to a zdist broker (or start a LocalCluster) and run tasks on it.

    ``address`` is ``"tcp://host:port"``, a cluster object (LocalCluster, PBSCluster,
    SLURMCluster), or None to start a LocalCluster with ``**kwargs`` (as dask does).
    Credentials come from the cluster object, ``scheduler_file=``, or ``security=``
    (a :class:`~zdist.Security`, a path to a security file, or False for a broker
    started with ``--no-security``).
    """

    #: dask's get_scheduler reads this when given ``scheduler=client``.
    asynchronous = False

    def __init__(
        self,
        address: Any = None,
        *,
        scheduler_file: str | None = None,
        security: Security | str | bool | None = None,
        timeout: float = 30,
        name: str | None = None,
        set_as_default: bool = True,
        asynchronous: bool = False,
        direct_to_workers: bool | None = None,
        heartbeat_interval: float | None = None,
        **kwargs: Any,
    ) -> None:
        if asynchronous:
            raise NotImplementedError(
                "zdist's Client is synchronous (asynchronous=False)"
            )
        self._futures: dict[str, FutureState] = {}
        self._refcount: dict[str, int] = {}
        self._releases: dict[str, None] = {}  # keys to release, in order
        self._lock = threading.RLock()
        self._fn_cache: dict[Any, bytes] = {}
        # The key of the last task sent through a worker's door
        # (submission.submit_call): one at a time, while its future is held.
        self._door_key: str | None = None
        self.cluster: Any = None
        self._owns_cluster = False
        self.status = "connecting"
        if address is None and scheduler_file is None:
            from zdist.client.local import LocalCluster

            self.cluster = LocalCluster(**kwargs)
            self._owns_cluster = True
            address = self.cluster
        elif kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(kwargs)}")
        if address is not None and not isinstance(address, str):
            self.cluster = address
            if security is None:
                # A cluster object knows its keys; None there means security is off.
                security = address.security if address.security is not None else False
            # A LocalCluster's own Unix socket when it has one (zdist.localsocket).
            local = getattr(address, "local_address", None)
            address = local or address.scheduler_address
        sec_info: dict[str, Any] = {}
        if scheduler_file is not None:
            sec_info = wait_for_scheduler_file(scheduler_file, timeout)
            address = address or sec_info.get("address")
        if not isinstance(address, str):
            raise ValueError(f"cannot find a broker address in {scheduler_file!r}")
        split_address(address)
        self.security = _resolve_security(address, security, sec_info, scheduler_file)
        self.scheduler_file = scheduler_file
        self.id = f"Client-{uuid.uuid4()}"
        self.name = name or self.id
        self._conn = Connection(
            address,
            self.security,
            self._on_message,
            self._on_lost,
            timeout,
            self._take_releases,
            self._unwanted,
        )
        welcome = self._conn.start(
            P.RegisterClient(self.name, versions(), self._conn.direct)
        )
        try:
            self._started(welcome, address, set_as_default)
        except BaseException:
            self._conn.close()  # its thread, its socket file
            raise
        self._finalizer = weakref.finalize(self, _close_connection, self._conn)

    def _started(self, welcome: P.Welcome, address: str, set_as_default: bool) -> None:
        self.scheduler_address = welcome.address or address
        self.status = "running"
        # The seed insists on one Python everywhere: a pickled function needs the same
        # Python and cloudpickle to load. Say so now rather than fail in a task.
        mine = versions()
        bad = [f"broker: {m}" for m in mismatches(mine, welcome.versions)]
        for addr, w in self._info("scheduler_info")["workers"].items():
            bad += [
                f"worker {w.get('name', addr)}: {m}"
                for m in mismatches(mine, w.get("versions", {}))
            ]
        if bad:
            warnings.warn(
                f"zdist version mismatch with this client ({'; '.join(bad[:5])}); "
                f"use one Python environment everywhere",
                UserWarning,
                stacklevel=3,  # the Client(...) call
            )
        self._previous_default: Client | None = None
        self._set_as_default = set_as_default
        if set_as_default:
            self._make_default()
        # dask's default scheduler becomes this client (as with dask.distributed), so a
        # plain x.compute() runs here; only if dask is loaded, since zdist never loads
        # it on its own. Its previous default returns on close().
        self._dask_default: tuple[Any, Any] | None = None
        if set_as_default and "dask" in sys.modules:
            from zdist.client import dask_support

            self._dask_default = dask_support.become_default(self)

    # ==================================================================================
    # futures bookkeeping (called from Future)

    def _state_for(self, key: str) -> FutureState:
        with self._lock:
            st = self._futures.get(key)
            if st is None:
                st = self._futures[key] = FutureState()
            return st

    def _inc_ref(self, key: str) -> None:
        with self._lock:
            n = self._refcount.get(key, 0)
            if not n:
                self._releases.pop(key, None)  # wanted again before the release left
            self._refcount[key] = n + 1

    def _dec_ref(self, key: str) -> None:
        with self._lock:
            n = self._refcount.get(key, 0) - 1
            if n > 0:
                self._refcount[key] = n
                return
            self._refcount.pop(key, None)
            self._futures.pop(key, None)
            self._releases[key] = None
            many = len(self._releases) == RELEASE_BATCH
        # Releases leave with the next message this client sends, or on the I/O
        # thread's next turn (at most 250 ms away): dropping the 20,000 futures of a
        # map is one message, not 20,000, and dropping one wakes no thread.
        if many and self.status == "running":
            self._conn.wake()

    def _unwanted(self, keys: list[str]) -> list[str]:
        """Those of ``keys`` this client holds no future of (now). Reads without the
        lock: the connection asks while holding its send lock, and a thread holding
        this client's lock may be waiting for that one (map's chunks)."""
        refcount = self._refcount
        return [k for k in keys if k not in refcount]

    def _take_releases(self) -> list[str]:
        with self._lock:
            if not self._releases:
                return []
            keys = list(self._releases)
            self._releases.clear()
        return keys

    def _on_message(self, msg: P.Message, payload: list[Any]) -> None:
        """Messages that are not request replies, from whichever thread reads the
        socket (the I/O thread, or one waiting on a result) under its read lock."""
        if isinstance(msg, P.TaskUpdates):
            futures = self._futures
            # Callbacks run on the I/O thread after this read, whoever reads.
            defer = self._conn.defer_callbacks
            for key, status, ref, text in msg.updates:
                st = futures.get(key)
                if st is None:
                    continue
                frames = None if ref is None else P.ref_frames(payload, ref)
                if status == "finished":
                    st.finish("finished", frames, "", defer)
                elif status == "error":
                    st.finish("error", frames, text, defer)
                elif status in ("cancelled", "lost"):
                    st.finish(status, None, text, defer)
        elif isinstance(msg, P.DirectResults):
            # From a worker on this host (zdist.worker.direct): the broker may have
            # settled the future otherwise meanwhile (cancelled, say), and has the
            # last word.
            futures = self._futures
            defer = self._conn.defer_callbacks
            if msg.door is not None and msg.worker is not None:
                self._conn.note_door(msg.door, msg.worker)
            for key, _, ref, _ in msg.updates:
                st = futures.get(key)
                if st is not None:
                    frames = P.ref_frames(payload, ref)
                    st.finish("finished", frames, "", defer, only_pending=True)
        elif isinstance(msg, P.Error):
            if msg.text == "unregistered":
                self._on_lost("the broker restarted and no longer knows these tasks")
                self._conn.send(
                    P.RegisterClient(self.name, versions(), self._conn.direct)
                )
            else:
                logger.warning("broker error: %s", msg.text)
        elif isinstance(msg, P.Heartbeat):
            pass

    def _on_lost(self, why: str) -> None:
        """Fail every pending future (from the connection, while it still runs:
        their callbacks go to its I/O thread)."""
        with self._lock:
            states = list(self._futures.values())
        defer = self._conn.defer_callbacks
        for st in states:
            if not st.done:
                st.finish("lost", None, why, defer)

    # ==================================================================================
    # submitting

    def submit(
        self,
        func: Callable[..., Any],
        *args: Any,
        key: str | None = None,
        workers: Any = None,
        resources: dict[str, float] | None = None,
        retries: int | None = None,
        priority: int = 0,
        fifo_timeout: Any = None,
        allow_other_workers: bool = False,
        actor: bool = False,
        actors: bool = False,
        pure: bool = True,
        **kwargs: Any,
    ) -> Future:
        """Run ``func(*args, **kwargs)`` on a worker; returns a Future at once."""
        if not callable(func):
            raise TypeError("First input to submit must be a callable function")
        if actor or actors:
            raise NotImplementedError("zdist has no actors")
        return submission.submit_call(
            self,
            func,
            args,
            kwargs,
            key=key,
            workers=workers,
            resources=resources,
            retries=retries,
            priority=priority,
            allow_other_workers=allow_other_workers,
            pure=pure,
        )

    def map(
        self,
        func: Callable[..., Any],
        *iterables: Iterable[Any],
        key: str | list[str] | None = None,
        workers: Any = None,
        retries: int | None = None,
        resources: dict[str, float] | None = None,
        priority: int = 0,
        allow_other_workers: bool = False,
        fifo_timeout: Any = None,
        actor: bool = False,
        actors: bool = False,
        pure: bool = True,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> list[Future]:
        """``submit`` over zipped iterables, sent to the broker in Submit messages of
        up to SUBMIT_CHUNK tasks (the broker and workers start on the first)."""
        if not callable(func):
            raise TypeError("First input to map must be a callable function")
        if (
            isinstance(iterables[0] if iterables else None, (str, bytes))
            or not iterables
        ):
            raise TypeError("Dask/zdist map requires iterables of arguments")
        return submission.submit_map(
            self,
            func,
            iterables,
            kwargs,
            key=key,
            workers=workers,
            retries=retries,
            resources=resources,
            priority=priority,
            allow_other_workers=allow_other_workers,
            pure=pure,
        )

    def get(
        self,
        dsk: Any,
        keys: Any,
        *,
        workers: Any = None,
        resources: dict[str, float] | None = None,
        retries: int | None = None,
        priority: int = 0,
        sync: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Run a dask graph and return the values of ``keys`` (a key or nested list of
        keys): dask's scheduler interface, so ``dask.compute(x, scheduler=client.get)``
        runs ``x`` here. ``dsk`` is a plain graph ``{key: (func, *args)}`` or what dask
        collections produce (expressions, HighLevelGraphs, task-spec nodes). Each task
        of the culled graph is one zdist task; the graph travels in Submit
        messages of up to SUBMIT_CHUNK tasks, dependencies first."""
        futures = submission.submit_graph(
            self, dsk, keys, resources, retries, priority, workers
        )
        if not sync:
            return graphspec.pack_results(keys, futures)
        try:
            values = self.gather(list(futures.values()))
            by_key = dict(zip(futures, values, strict=True))
            return graphspec.pack_results(keys, by_key)
        finally:
            del futures

    def compute(
        self,
        collections: Any,
        sync: bool = False,
        optimize_graph: bool = True,
        workers: Any = None,
        allow_other_workers: bool = False,
        resources: dict[str, float] | None = None,
        retries: int | None = 0,
        priority: int = 0,
        fifo_timeout: Any = "60s",
        actors: Any = None,
        traverse: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Start computing dask collections; a Future per collection (a list for a
        list), or their values with ``sync=True``. Other arguments pass through."""
        from zdist.client import dask_support

        return dask_support.compute(
            self,
            collections,
            sync=sync,
            optimize_graph=optimize_graph,
            traverse=traverse,
            submit=lambda expr, names: submission.submit_graph(
                self, expr, names, resources, retries, priority, workers
            ),
        )

    def persist(
        self,
        collections: Any,
        optimize_graph: bool = True,
        workers: Any = None,
        allow_other_workers: bool | None = None,
        resources: dict[str, float] | None = None,
        retries: int | None = None,
        priority: int = 0,
        fifo_timeout: Any = "60s",
        actors: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Start computing dask collections and return them (a list for a list) backed
        by futures: later computations on them reuse these results."""
        from zdist.client import dask_support

        return dask_support.persist(
            collections,
            optimize_graph=optimize_graph,
            submit=lambda expr, names: submission.submit_graph(
                self, expr, names, resources, retries, priority, workers
            ),
        )

    def get_executor(self, **kwargs: Any) -> Any:
        """A :class:`concurrent.futures.Executor` running calls on this cluster;
        ``**kwargs`` go to every ``submit`` (``workers=``, ``resources=``...)."""
        from zdist.client.dask_support import ClientExecutor

        return ClientExecutor(self, **kwargs)

    def scatter(
        self,
        data: Any,
        workers: Any = None,
        broadcast: bool = False,
        direct: bool | None = None,
        hash: bool = True,
        timeout: Any = None,
        asynchronous: bool | None = None,
    ) -> Any:
        """Move local data to the cluster; returns Future(s) in the same structure."""
        if isinstance(data, Mapping):
            items = list(data.items())
        elif isinstance(data, (list, tuple, set, frozenset)):
            items = [(None, v) for v in data]
        else:
            items = [(None, data)]
        futures = submission.submit_data(self, items, workers, hash)
        if broadcast:
            wait(futures)
            self.replicate(futures)
        if isinstance(data, Mapping):
            return dict(zip(data.keys(), futures, strict=False))
        if isinstance(data, (list, tuple, set, frozenset)):
            return (
                type(data)(futures)
                if not isinstance(data, (set, frozenset))
                else futures
            )
        return futures[0]

    def replicate(
        self, futures: Any, n: int | None = None, workers: Any = None
    ) -> None:
        """Copy results to every worker (or ``n`` of them): a task pinned to each worker
        takes the futures as inputs, which makes that worker fetch and keep replicas."""
        futs = _flatten_futures(futures)
        targets = _worker_list(workers) or list(self.scheduler_info()["workers"])
        pinned = [
            self.submit(_count, futs, workers=[a], pure=False)
            for a in targets[: n or None]
        ]
        self.gather(pinned)

    def cancel(
        self, futures: Any, asynchronous: bool | None = None, force: bool = False
    ) -> None:
        futs = _flatten_futures(futures)
        if futs:
            self._conn.send(P.Cancel([f.key for f in futs], force))

    # ==================================================================================
    # results

    def gather(
        self,
        futures: Any,
        errors: str = "raise",
        direct: bool | None = None,
        asynchronous: bool | None = None,
    ) -> Any:
        """Values of (a structure of) futures, in the same structure."""
        if errors not in ("raise", "skip"):
            raise ValueError("errors must be 'raise' or 'skip'")
        return gather_results(self, futures, errors)

    def _fetch_values(self, futures: list[Future], timeout: float | None) -> list[Any]:
        return fetch_values(self, futures, timeout)

    # ==================================================================================
    # cluster-wide operations

    def run(
        self,
        function: Callable[..., Any],
        *args: Any,
        workers: Any = None,
        wait: bool = True,
        nanny: bool = False,
        on_error: str = "raise",
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Run ``function`` on every worker (not as a task); ``{address: result}``."""
        fn = submission.dumps_function(self, function)
        arg_frames = serialize.dumps((args, kwargs))
        req_id, slot = self._conn.request(
            lambda r: P.RunOnWorkers(r, _worker_list(workers) or []), [fn, *arg_frames]
        )
        [(msg, payload)] = self._conn.wait(req_id, slot, None)
        assert isinstance(msg, P.RunReply)
        out: dict[str, Any] = {}
        for address, ok, ref in msg.results:
            if ref is None:
                value: Any = CommClosedError(f"worker {address} left before answering")
                ok = False
            else:
                value = serialize.loads(P.ref_frames(payload, ref))
            if not ok and on_error == "raise":
                raise value
            out[address] = value
        return out

    def scheduler_info(self, **kwargs: Any) -> dict[str, Any]:
        return self._info("scheduler_info")

    def _info(self, what: str) -> dict[str, Any]:
        req_id, slot = self._conn.request(lambda r: P.InfoRequest(r, what))
        [(msg, _)] = self._conn.wait(req_id, slot, self._conn.timeout)
        assert isinstance(msg, P.InfoReply)
        return msg.info

    def nthreads(self) -> dict[str, int]:
        return {a: w["nthreads"] for a, w in self.scheduler_info()["workers"].items()}

    ncores = nthreads

    def wait_for_workers(
        self, n_workers: int = 1, timeout: float | None = None
    ) -> None:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            if len(self.scheduler_info()["workers"]) >= n_workers:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n_workers} workers after {timeout} s")
            time.sleep(delay)  # polling the broker; backs off to 0.2 s
            delay = min(0.2, delay * 2)

    def get_versions(self, check: bool = False, packages: Any = None) -> dict[str, Any]:
        info = self.scheduler_info()
        out = {
            "client": versions(),
            "scheduler": info["versions"],
            "workers": {a: w["versions"] for a, w in info["workers"].items()},
        }
        if check:
            problems = mismatches(out["client"], out["scheduler"])
            for addr, v in out["workers"].items():
                problems += [
                    f"worker {addr}: {p}" for p in mismatches(out["client"], v)
                ]
            if problems:
                raise ValueError("version mismatch: " + "; ".join(problems))
        return out

    def upload_file(self, filename: str, load: bool = True) -> dict[str, Any]:
        """Send a .py/.zip/.egg file to every worker and put it on their sys.path."""
        with open(filename, "rb") as f:
            data = f.read()
        return self.run(_install_file, os.path.basename(filename), data, load)

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard's URL, token included (None if the broker serves none)."""
        link = getattr(self.cluster, "dashboard_link", None)
        return link or self.scheduler_info().get("dashboard") or None

    def get_task_stream(
        self,
        start: float | None = None,
        stop: float | None = None,
        count: int | None = None,
    ) -> list[dict[str, Any]]:
        """Recent task runs: key, group, worker, start, stop (epoch seconds), status."""
        stream = self._info("task_stream")["stream"]
        stream = [
            t
            for t in stream
            if (start is None or t["stop"] >= start)
            and (stop is None or t["start"] <= stop)
        ]
        return stream[-count:] if count else stream

    def get_scheduler_logs(self, n: int | None = None) -> list[tuple[str, str]]:
        """The broker's recent log records as (level, line), newest last."""
        logs = [tuple(x) for x in self._info("logs")["logs"]]
        return logs[-n:] if n else logs

    def get_worker_logs(
        self, n: int | None = None, workers: Any = None
    ) -> dict[str, list[tuple[str, str]]]:
        """Each worker's recent log records as (level, line), by worker address."""
        return self.run(_worker_logs, n, workers=workers)

    # ==================================================================================
    # lifecycle

    def _make_default(self) -> None:
        global _default_client
        with _default_lock:
            self._previous_default = _default_client
            _default_client = self

    def close(self, timeout: Any = None) -> None:
        global _default_client
        if self.status == "closed":
            return
        try:
            self._conn.send(P.ClientClose())
        except CommClosedError:
            pass
        self.status = "closed"
        self._conn.close()
        with self._lock:
            states = list(self._futures.values())
        for st in states:
            if not st.done:
                st.finish("lost", None, "the client was closed")
        with _default_lock:
            if _default_client is self:
                _default_client = self._previous_default
        if self._dask_default is not None:
            from zdist.client import dask_support

            dask_support.restore_default(self, self._dask_default)
        if self._owns_cluster and self.cluster is not None:
            self.cluster.close()

    shutdown = close

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client: {self.scheduler_address!r} status={self.status}>"


# ======================================================================================
# helpers


def _close_connection(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:
        pass


def _resolve_security(
    address: str, security: Any, info: dict[str, Any], scheduler_file: str | None
) -> Security | None:
    if isinstance(security, Security):
        return security
    if security is False:
        return None
    if isinstance(security, (str, os.PathLike)):
        return Security.from_file(security)
    if info:
        sec = info.get("security")
        if sec:
            return Security.from_dict(sec)
        if "security" in info:
            warnings.warn(
                f"{scheduler_file} says the broker runs without security",
                UserWarning,
                stacklevel=3,
            )
            return None
    raise SecurityError(
        f"no credentials for {address}: zdist clusters are secured by default. Connect "
        f"with Client(scheduler_file=...) (written by zbroker --scheduler-file), "
        f"Client(address, security=Security.from_file(path)), or security=False for a "
        f"broker started with --no-security"
    )


def wait(
    fs: Any, timeout: float | None = None, return_when: str = "ALL_COMPLETED"
) -> Any:
    from zdist.client.waiting import wait as _wait

    return _wait(fs, timeout, return_when)

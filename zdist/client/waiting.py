"""wait, as_completed, fire_and_forget and progress (dask.distributed's names)."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator
from typing import Any

from zdist import protocol as P
from zdist.client.future import Future

DoneAndNotDoneFutures = namedtuple("DoneAndNotDoneFutures", ["done", "not_done"])


def _futures_in(fs: Any) -> list[Future]:
    from zdist.client.results import _flatten_futures

    return _flatten_futures(fs)


def wait(
    fs: Any, timeout: float | None = None, return_when: str = "ALL_COMPLETED"
) -> DoneAndNotDoneFutures:
    """Wait until all (or, with ``FIRST_COMPLETED``/``FIRST_EXCEPTION``, one) of the
    futures are done; raises ``TimeoutError`` after ``timeout`` seconds."""
    futures = _futures_in(fs)
    if return_when not in ("ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"):
        raise ValueError(f"unknown return_when {return_when!r}")
    deadline = None if timeout is None else time.monotonic() + timeout
    if return_when == "ALL_COMPLETED":
        for f in futures:
            remaining = (
                None if deadline is None else max(0.0, deadline - time.monotonic())
            )
            if not f._wait(remaining):
                raise TimeoutError(
                    f"{sum(not g.done() for g in futures)} futures not "
                    f"done after {timeout} s"
                )
    else:
        signal = threading.Event()
        for f in futures:
            f.add_done_callback(lambda _: signal.set())
        while True:
            done = [f for f in futures if f.done()]
            if (
                (return_when == "FIRST_COMPLETED" and done)
                or (
                    return_when == "FIRST_EXCEPTION"
                    and any(f.status != "finished" for f in done)
                )
                or len(done) == len(futures)
            ):
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"no future done within {timeout} s")
            signal.wait(remaining)
            signal.clear()
    finished = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(finished, {f for f in futures if f not in finished})


class as_completed:
    """Iterate over futures as they finish; ``add`` more while iterating."""

    def __init__(
        self,
        futures: Any = None,
        loop: Any = None,
        with_results: bool = False,
        raise_errors: bool = True,
        timeout: float | None = None,
    ) -> None:
        self.with_results = with_results
        self.raise_errors = raise_errors
        self.timeout = timeout
        self._queue: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self.update(_futures_in(futures) if futures is not None else [])

    def add(self, future: Future) -> None:
        with self._lock:
            self._pending += 1
        future.add_done_callback(self._queue.put)

    def update(self, futures: Any) -> None:
        for f in _futures_in(futures):
            self.add(f)

    def count(self) -> int:
        with self._lock:
            return self._pending

    def is_empty(self) -> bool:
        return self.count() == 0

    def has_ready(self) -> bool:
        return not self._queue.empty()

    def next_batch(self, block: bool = True) -> list[Any]:
        out = [next(self)] if block else []
        while self.has_ready():
            out.append(next(self))
        return out

    def batches(self) -> Iterator[list[Any]]:
        while not self.is_empty():
            yield self.next_batch()

    def __iter__(self) -> as_completed:
        return self

    def __next__(self) -> Any:
        with self._lock:
            if self._pending == 0:
                raise StopIteration
        try:
            f = self._queue.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"no future completed within {self.timeout} s") from None
        with self._lock:
            self._pending -= 1
        if self.with_results:
            try:
                return f, f.result()
            except Exception:
                if self.raise_errors:
                    raise
                return f, f.exception()
        return f


def fire_and_forget(obj: Any) -> None:
    """Run these futures to completion even if this client lets them go or exits."""
    by_client: dict[int, tuple[Any, list[str]]] = {}
    for f in _futures_in(obj):
        by_client.setdefault(id(f.client), (f.client, []))[1].append(f.key)
    for client, keys in by_client.values():
        client._conn.send(P.FireAndForget(keys))


def progress(
    *futures: Any,
    notebook: bool | None = None,
    multi: bool = True,
    complete: bool = True,
    group_by: Any = "prefix",
    **kwargs: Any,
) -> None:
    """Show live progress bars until the futures are done (dask.distributed's name).

    One bar per task group (the key's prefix: ``inc-3f2a...`` -> ``inc``) with
    ``multi=True``, else one bar for everything. A terminal gets tqdm's text bars
    (they work over ssh and in job logs); Jupyter gets widgets with ``notebook=True``,
    or by itself with ``notebook=None`` when ipywidgets is installed. Failed or
    cancelled tasks count as finished and show in the bar's postfix (``erred=2``).

    ``futures`` are futures, lists/dicts of them, or dask collections returned by
    ``client.persist``. ``complete=False`` follows only the futures not yet done.
    ``group_by`` may be a function from key to group name. Other keyword arguments go
    to tqdm (``file=``, ``mininterval=``, ``ncols=`` ...); dask's ``interval="100ms"``
    is understood as well.
    """
    fs = _progress_futures(futures)
    if not complete:
        fs = [f for f in fs if not f.done()]
    if group_by == "prefix":
        from zdist.keys import key_group

        group_of = key_group
    elif callable(group_by):
        group_of = group_by
    else:
        raise ValueError(f"group_by must be 'prefix' or a function, not {group_by!r}")
    interval = kwargs.pop("interval", None)
    if interval is not None:
        kwargs.setdefault("mininterval", _seconds(interval))
    kwargs.pop("width", None)  # dask's bar width; tqdm sizes itself to the terminal
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("unit", "task")
    tqdm = _tqdm_class(notebook)

    groups: dict[str, list[Future]] = {}
    for f in fs:
        name = str(group_of(f.key)) if multi else "tasks"
        groups.setdefault(name, []).append(f)
    done_q: queue.SimpleQueue[tuple[str, Future]] = queue.SimpleQueue()
    bars: dict[str, Any] = {}
    failed: dict[str, dict[str, int]] = {}
    try:
        for position, (name, members) in enumerate(groups.items()):
            opts = {"desc": name, "total": len(members), "position": position}
            bars[name] = tqdm(**{**opts, **kwargs})
        for name, members in groups.items():
            report = _reporter(done_q, name)
            for f in members:
                f.add_done_callback(report)
        # Only this thread touches the bars: callbacks run on the client's I/O thread.
        # tqdm skips drawing updates that come faster than ``mininterval``; a burst
        # followed by a quiet spell would leave a bar behind, so redraw it then.
        # On a terminal, the elapsed time also ticks while nothing finishes.
        isatty = getattr(kwargs["file"], "isatty", None)
        tick = _TICK if isatty is not None and isatty() else None
        remaining = len(fs)
        behind: set[str] = set()
        while remaining:
            try:
                name, f = done_q.get(timeout=_REDRAW_AFTER if behind else tick)
            except queue.Empty:
                for name in behind or bars:
                    bars[name].refresh()
                behind.clear()
                continue
            remaining -= 1
            bar = bars[name]
            status = f.status
            if status != "finished":
                what = "cancelled" if status == "cancelled" else "erred"
                counts = failed.setdefault(name, {})
                counts[what] = counts.get(what, 0) + 1
                bar.set_postfix(counts, refresh=False)
                if hasattr(bar, "colour"):
                    bar.colour = "red"
            bar.update(1)
            if getattr(bar, "last_print_n", bar.n) != bar.n:
                behind.add(name)
    finally:
        # Bottom bar first: closing a positioned bar moves the cursor below it.
        for bar in reversed(list(bars.values())):
            bar.close()


#: Seconds without news after which progress() draws bars tqdm left behind.
_REDRAW_AFTER = 0.2
#: Seconds between redraws of idle bars on a terminal (their clocks move).
_TICK = 1.0


def _progress_futures(objs: tuple[Any, ...]) -> list[Future]:
    """Futures to follow, without repeats; persisted dask collections give theirs."""
    out: dict[str, Future] = {}
    for x in objs:
        if hasattr(x, "__dask_graph__") and not isinstance(x, Future):
            # A persisted collection's graph maps each key to its Future (newer dask
            # may wrap it in a node holding it as ``.value``).
            values = dict(x.__dask_graph__()).values()
            found = [
                f
                for f in (
                    v if isinstance(v, Future) else getattr(v, "value", None)
                    for v in values
                )
                if isinstance(f, Future)
            ]
            if not found:
                raise TypeError(
                    f"progress follows futures, and this {type(x).__name__} has none: "
                    "pass client.persist(collection) or client.compute(collection)"
                )
        else:
            found = _futures_in(x)
        for f in found:
            out.setdefault(f.key, f)
    return list(out.values())


def _reporter(
    done_q: queue.SimpleQueue[tuple[str, Future]], name: str
) -> Callable[[Future], None]:
    def report(f: Future) -> None:
        done_q.put((name, f))

    return report


def _tqdm_class(notebook: bool | None) -> Any:
    if notebook is None:
        from tqdm.auto import tqdm
    elif notebook:
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm
    return tqdm


def _seconds(value: Any) -> float:
    """``0.1``, ``"100ms"``, ``"1s"`` -> seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    for unit, scale in (("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)

"""wait, as_completed, fire_and_forget and progress (dask.distributed's names)."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import namedtuple
from collections.abc import Iterator
from typing import Any

from zdist import protocol as P
from zdist.client.future import Future

DoneAndNotDoneFutures = namedtuple("DoneAndNotDoneFutures", ["done", "not_done"])


def _futures_in(fs: Any) -> list[Future]:
    from zdist.client.client import _flatten_futures

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
            if not f._state.wait(remaining):
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
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, {f for f in futures if f not in done})


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
    **kwargs: Any,
) -> None:
    """Show a progress bar until the futures are done (a tqdm bar in a terminal)."""
    from tqdm.auto import tqdm

    fs = [f for x in futures for f in _futures_in(x)]
    done_q: queue.SimpleQueue[Future] = queue.SimpleQueue()
    for f in fs:
        f.add_done_callback(done_q.put)
    errors = 0
    with tqdm(total=len(fs), file=kwargs.get("file", sys.stderr), unit="task") as bar:
        for _ in range(len(fs)):
            f = done_q.get()
            if f.status != "finished":
                errors += 1
                bar.set_postfix(errors=errors)
            bar.update(1)
